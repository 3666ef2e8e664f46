"""The benchmark scripts run end to end on CPU at their small shapes and write what RESULTS.md is made
from: every row timed, held against a positive floor and (where there is one) its baseline."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_hot_path_scripts_report_floor_ratios_and_baselines(tmp_path):
    # one of each kind (elementwise, gather / scatter, GEMMs with autograd): the other scripts share their flags
    # and report (benchmarks/common.py); all of them run in a GPU session (gpu_session.py)
    scripts = ["rmsnorm", "moe_permute", "cross_entropy"]
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run_all.py"), "--only", *scripts,
                           "--results", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in scripts:
        payload = json.loads((tmp_path / f"{name}.json").read_text())
        floors = payload["floors"]
        assert floors["matmul_flops_per_s"] > 1e9 and floors["copy_bytes_per_s"] > 1e8
        assert len(payload["rows"]) >= 3
        for row in payload["rows"]:
            assert row["ms"] > 0 and row["floor ms"] > 0
            assert math.isclose(row["x floor"], row["ms"] / row["floor ms"], rel_tol=1e-9)
            assert row["speed-up"] > 0 and math.isclose(row["speed-up"], row["baseline ms"] / row["ms"], rel_tol=1e-9)
    summary = (tmp_path / "summary.md").read_text()
    assert all(f"### {name}" in summary for name in scripts) and "failed" not in summary


def test_throughput_times_pretrain_at_a_layout(tmp_path):
    out = tmp_path / "throughput"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), "--layout", "",
                           "--layout", "--dp 2", "--steps", "2", "--warmup", "1", "--batch", "2", "--seq-length", "64",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    layouts = json.loads((tmp_path / "throughput_layouts.json").read_text())["layouts"]
    assert [(r["layout"], r["ranks"]) for r in layouts] == [("(one process)", 1), ("--dp 2", 2)]
    for row in layouts:
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1
        assert math.isclose(row["tokens_per_s_per_rank"] * row["ranks"], row["tokens_per_s"])


def test_throughput_variants_beside_transformers(tmp_path):
    """One-process variants in the same run: megajoy, megajoy with bf16 weights over fp32 masters,
    transformers' DeepseekV3ForCausalLM and TorchTitan's DeepSeek-V3 with the same weights; ratios against
    both baselines."""
    out = tmp_path / "throughput"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), "--params-dtype", "bf16",
                           "--torchtitan", "--steps", "1", "--warmup", "1", "--batch", "2", "--seq-length", "32",
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    payload = json.loads((tmp_path / "throughput.json").read_text())
    rows = {r["variant"]: r for r in payload["results"]}
    assert list(rows) == ["megajoy", "megajoy --params-dtype bf16", "transformers", "torchtitan"]
    from megajoy.config import tiny
    from megajoy.model.transformer import JoyAIForCausalLM

    with torch.device("meta"):  # the tiny preset without its MTP module, as the script trains it
        params = sum(p.numel() for p in JoyAIForCausalLM(dataclasses.replace(tiny(), num_nextn_predict_layers=0))
                     .parameters())
    for row in rows.values():
        assert "error" not in row, row
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1
        # the training's memory, not the libraries' (transformers' import alone holds ~200 MB): weights, gradients
        # and AdamW's two moments (16 bytes a parameter), at most 64 MB more for 64 tokens' activations and
        # torch's first-step buffers
        assert 16 * params < row["peak_memory_gb"] * 1e9 < 16 * params + 64e6, row
        # MFU over the matmul rate measured in the variant's own process
        assert math.isclose(row["mfu"], payload["training_flops_per_token"] * row["tokens_per_s"]
                            / row["matmul_flops_per_s"])
        for base in ("transformers", "torchtitan"):
            assert math.isclose(row[f"ratio_to_{base}"], row["tokens_per_s"] / rows[base]["tokens_per_s"])
    assert (tmp_path / "throughput.md").exists() and (tmp_path / "throughput.png").exists()


def test_torchtitan_baseline_computes_megajoys_model(tmp_path):
    """TorchTitan's DeepSeek-V3, built from a megajoy config and loaded through TorchTitan's own Hugging Face
    adapter, gives megajoy's logits (random router bias, so routing is exercised), once its final norm has
    megajoy's epsilon (TorchTitan leaves torch's default there; 1.5e-3 relative on this model)."""
    from helpers import random_model, rel_err, small_config
    from megajoy.ckpt.hf import save_hf_dir
    from megajoy.ckpt.native import model_state
    from megajoy.ckpt.view import state_view

    from benchmarks.torchtitan_baseline import build_torchtitan, torchtitan_args

    cfg = small_config(num_nextn_predict_layers=0)
    model = random_model(cfg)
    save_hf_dir(str(tmp_path), state_view(cfg, model_state(model)), dtype=torch.float32)
    titan, forward = build_torchtitan(cfg, str(tmp_path), 48, torch.device("cpu"), torch.float32)
    titan.norm.eps = cfg.rms_norm_eps
    ids = torch.randint(0, cfg.vocab_size, (2, 49), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids[:, :-1]).logits
        assert rel_err(titan(ids[:, :-1]), ours) <= 1e-5
        loss = forward(ids[:, :-1], ids[:, 1:])
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(ours.flatten(0, 1), ids[:, 1:].flatten()), rtol=1e-5)
    with pytest.raises(ValueError, match="no equal of this config's tie_word_embeddings, aux_loss_alpha$"):
        torchtitan_args(small_config(tie_word_embeddings=True, aux_loss_alpha=1e-4), 48, torch.device("cpu"))


def test_throughput_refuses_bf16_weights_without_fp32_masters(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), "--bf16",
                           "--params-dtype", "bf16"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2
    assert "--params-dtype bf16 keeps fp32 master weights beside the bf16 ones; --bf16 has no fp32 weights" in done.stderr


def test_quantization_script_times_qat_rollouts_beside_per_step_quantisation(tmp_path):
    out = tmp_path / "quantization.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "quantization.py"), "--rows", "256",
                           "--cols", "256", "--rollout-prompts", "2", "--rollout-tokens", "6", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    payload = json.loads(out.read_text())
    rollout = payload["qat_rollout"]
    assert rollout["same tokens"] is True and rollout["new tokens"] == 6
    assert min(rollout["no qat s"], rollout["reused s"], rollout["quantised every step s"]) > 0
    assert math.isclose(rollout["speed-up"], rollout["quantised every step s"] / rollout["reused s"], rel_tol=1e-9)
    assert [row["format"] for row in payload["fake_quant"]][:3] == ["int4", "q4_0", "q8_0"]


def test_pipelined_decoding_script_times_both_ways(tmp_path):
    """Two forked pipeline ranks decode the same tokens with the rows in groups and in one (the script
    checks), and it reports both timings and their ratio."""
    out = tmp_path / "pipelined_decoding.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "pipelined_decoding.py"), "--batch", "4",
                           "--prompt-length", "5", "--new-tokens", "4", "--hidden-size", "64", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    turn, ring = json.loads(out.read_text())["rows"]
    assert turn["method"] == "stages in turn (one group)" and ring["method"] == "ring of 2 groups"
    assert min(turn["seconds"], ring["seconds"]) > 0
    assert math.isclose(ring["speedup"], turn["seconds"] / ring["seconds"], rel_tol=1e-9)


def test_gpu_session_plan_parses_and_resumes(tmp_path):
    """The GPU session's plan: every benchmark and megajoy command's flags parse with their own parsers
    (a renamed flag is caught); a call runs what is not yet done, skips a check whose package is missing, stops
    a check at its time limit, leaves one that does not fit its budget to the next call, and packs what it
    wrote for the device tool to bring back."""
    from benchmarks.gpu_session import Check, check_arguments, main, run_check

    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_session.py"), "--check-args"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    renamed = Check("renamed", "", [[sys.executable, os.path.join(ROOT, "benchmarks", "run_all.py"), "--rezults", "x"]], 1)
    assert check_arguments([renamed]) == ["renamed: run_all.py ['--rezults', 'x'] refused (exit 2)"]
    plan = Check("plan", "", [[sys.executable, "-m", "megajoy", "info", "--optimiser", "adamw"]], 1)
    assert check_arguments([plan]) == ["plan: megajoy ['info', '--optimiser', 'adamw'] refused (exit 2)"]

    with pytest.raises(SystemExit):  # an unknown check is refused, naming the plan's
        main(["--only", "envv", "--state", str(tmp_path / "unused")])
    assert not (tmp_path / "unused").exists()
    state, out = tmp_path / "state", tmp_path / "out"
    state.mkdir()
    assert run_check(Check("absent", "", [], 10, needs=("no_such_package_here",)), str(state))["status"] == "skipped"
    slow = run_check(Check("slow", "", [[sys.executable, "-c", "import time; time.sleep(30)"]], 2), str(state))
    assert slow["status"] == "timeout" and slow["seconds"] < 10
    assert main(["--only", "env", "gpu-tests", "--budget-s", "100", "--state", str(state), "--out", str(out)]) == 0
    record = json.loads((out / "session.json").read_text())
    assert list(record) == ["env"] and record["env"]["status"] == "passed"  # gpu-tests' 420 s did not fit
    import tarfile

    with tarfile.open(out / "gpu_session.tar.gz") as tar:
        env = json.loads(tar.extractfile("gpu_session/env.json").read())
    assert env["torch"] == torch.__version__ and env["gpu"] == "no GPU"
    assert main(["--only", "env", "--budget-s", "100", "--state", str(state)]) == 0  # done: not run again
    assert json.loads((state / "session.json").read_text())["env"]["seconds"] == record["env"]["seconds"]


def test_sft_packing_trims_micro_batches_to_their_longest_conversation():
    """The "padded to the micro-batch's longest" variant keeps every conversation whole: a row its conversation
    fills (seq_length or seq_length + 1 tokens) has no padding document, and sets the micro-batch's width."""
    from megajoy.data.packing import stack
    from megajoy.data.sft import Sample, pack_rows

    from benchmarks.sft_packing import conversation_tokens, trimmed

    pad, seq = 2, 8
    fills = [Sample(list(range(10, 10 + n)), [True] * n) for n in (seq + 1, seq)]
    short = Sample([20, 21, 22, 23], [True] * 4)
    rows = pack_rows([*fills, short], seq, pad, pack=False)
    for group in ([rows[0], rows[2]], [rows[1], rows[2]], [rows[0]], [rows[1]]):
        cut = trimmed(stack(group), pad)
        assert cut.input_ids.shape == (len(group), seq)
        assert cut.input_ids[0].tolist() == list(range(10, 10 + seq))
        assert conversation_tokens(cut, pad) == seq + (4 if len(group) == 2 else 0)
    cut = trimmed(stack([rows[2], rows[2]]), pad)
    assert cut.input_ids[:, :4].tolist() == [[20, 21, 22, 23]] * 2 and conversation_tokens(cut, pad) == 8


def test_router_benchmark_backward_is_the_same_work_for_both_routers():
    """router.py's forward + backward: megajoy's router and transformers' (the baseline) each run the forward GEMM
    and both backward ones (input and weight gradients), the 3 x 2 T H E FLOPs the script counts, and agree."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from megajoy.config import ModelConfig
    from megajoy.model.moe import Router

    from benchmarks.router import forward_backward, hf_router

    class GemmFlops(TorchDispatchMode):
        flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                a, b = args[-2], args[-1]
                self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
            return func(*args, **(kwargs or {}))

    tokens, hidden, experts = 32, 64, 16
    cfg = ModelConfig(hidden_size=hidden, n_routed_experts=experts, num_experts_per_tok=4, vocab_size=256,
                      num_hidden_layers=2)
    router = Router(cfg).train()
    with torch.no_grad():
        router.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    baseline, baseline_weight = hf_router(cfg, router.weight.detach(), router.e_score_correction_bias)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1), requires_grad=True)
    grads = []
    for route_weights, weight in ((lambda t: router(t).weights_TK, router.weight),
                                  (lambda t: baseline(t)[0], baseline_weight)):
        with GemmFlops() as counted:
            grads.append(forward_backward(route_weights, x, weight))
        assert counted.flops == 3 * 2 * tokens * hidden * experts
    for ours, theirs in zip(*grads):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7)
