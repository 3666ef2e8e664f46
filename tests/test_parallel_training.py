"""Every layout trains like the single process: after 3 optimizer steps of `megajoy pretrain` on the same
global batch, the losses, gradient norms and every updated weight (from the gathered checkpoint) equal
the single-process run's, fp32, relative error <= 1e-5 (per tensor, ||a - b|| / ||b||).

The learning rate is small on purpose: Adam gives every element a step of about lr whatever its
gradient's size, so the fp32 rounding of a sum taken in another order (a few 1e-7 overall, more for
elements whose gradient is a near-cancelling sum) turns into weight differences proportional to lr.
Each tensor must still move by at least ten times the tolerance, so the comparison has teeth."""

import json
import os
import shutil

import pytest
import torch

from megajoy.parallel.spawn import cli_worker, run_workers, slurm_env, torchrun_env
from helpers import TINY_MODEL_OVERRIDES
from megajoy.ckpt.native import load_model_dir
from megajoy.cli import main
from megajoy.config import RECOMPUTE_MODULES
from megajoy.train.checkpoint import latest_checkpoint


def pretrain_args(out, data_prefix, tokenizer_file, *extra, iters=3):
    base = ["pretrain", "--data-path", data_prefix, "--tokenizer", tokenizer_file, "--seq-length", "32",
            "--global-batch-size", "8", "--micro-batch-size", "1", "--train-iters", str(iters), "--log-interval", "1",
            "--eval-interval", "3", "--eval-iters", "1", "--lr-warmup-iters", "1", "--mtp-start-iter", "0",
            "--lr", "1e-4", "--min-lr", "1e-5", "--out", str(out)]
    return base + [a for o in TINY_MODEL_OVERRIDES for a in ("--set", o)] + list(extra)


def run_layout(out, data_prefix, tokenizer_file, world, flags, env_fn=torchrun_env, iters=3):
    argv = pretrain_args(out, data_prefix, tokenizer_file, *flags, iters=iters)
    if world == 1:
        assert main(argv) == 0
    else:
        run_workers(world, cli_worker, argv, env_fn=env_fn)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return records, load_model_dir(latest_checkpoint(str(out)))[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_prefix, tokenizer_file):
    out = tmp_path_factory.mktemp("single")
    return run_layout(out, data_prefix, tokenizer_file, 1, [])


def test_reference_run_moves_every_tensor(reference):
    """The three steps change every tensor by far more than the equivalence tolerance."""
    from megajoy.config import load_job_config
    from megajoy.model import create_model

    job = load_job_config("tiny", None, TINY_MODEL_OVERRIDES)
    initial = create_model(job.model, seed=job.train.seed).state_dict()
    moved = min((relative_error(reference[1][n], initial[n].float()), n) for n in reference[1]
                if not n.endswith("e_score_correction_bias"))
    assert moved[0] >= 1e-4, moved


@pytest.fixture(scope="module")
def reference_aux(tmp_path_factory, data_prefix, tokenizer_file):
    out = tmp_path_factory.mktemp("single_aux")
    return run_layout(out, data_prefix, tokenizer_file, 1, ["--set", "model.aux_loss_alpha=0.01"])


def assert_equivalent(run, reference, rtol=1e-5):
    (records, weights), (ref_records, ref_weights) = run, reference
    # and the statistics every stage and TP rank contributes to (routers on some stages, heads on each TP rank)
    keys = ("loss", "mtp_loss", "val_loss", "val_mtp_loss", "grad_norm", "expert_load_max_mean",
            "expert_load_max_mean_worst", "qk_clip_heads", "max_attention_logit")
    losses = [(r["step"], *(r.get(k) for k in keys)) for r in records]
    ref_losses = [(r["step"], *(r.get(k) for k in keys)) for r in ref_records]
    assert len(losses) == len(ref_losses)
    for got, want in zip(losses, ref_losses):
        assert got[0] == want[0]
        for a, b in zip(got[1:], want[1:]):
            assert (a is None) == (b is None)
            if a is not None:
                assert abs(a - b) <= rtol * abs(b), (got, want)
    assert weights.keys() == ref_weights.keys()
    worst = max((relative_error(weights[n], ref), n) for n, ref in ref_weights.items())
    assert worst[0] <= rtol, worst


def assert_same_model_flops(records, ref_records, world):
    """The logged TFLOP/s per device, times the devices, over the tokens/s: the model FLOPs per token, which
    no layout changes."""
    per_token = [r["tflops_per_gpu"] * world / r["tokens_per_s"] for r in records if "loss" in r]
    want = [r["tflops_per_gpu"] / r["tokens_per_s"] for r in ref_records if "loss" in r]
    assert per_token == pytest.approx(want, rel=1e-9)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over the whole tensor."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


LAYOUTS = {
    # name: (world, flags)
    "dp2": (2, ["--dp", "2"]),
    "dp4_zero": (4, ["--use-distributed-optimizer"]),
    "tp2": (2, ["--tp", "2"]),
    "tp2_sp": (2, ["--tp", "2", "--sequence-parallel"]),
    "ep2_dp2": (2, ["--ep", "2"]),
    "ep4_dp4_zero": (4, ["--ep", "4", "--use-distributed-optimizer"]),
    # ZeRO-1 in buckets of 0.1 MB: each sharded, reduce-scattered and gathered on its own
    "tp2_ep2_dp2_sp_zero": (4, ["--tp", "2", "--ep", "2", "--sequence-parallel", "--use-distributed-optimizer",
                                "--ddp-bucket-size-mb", "0.1"]),
    "tp2_ep4_dp2": (4, ["--tp", "2", "--ep", "4"]),
    "tp2_ep4_dp4_sp": (8, ["--tp", "2", "--ep", "4", "--sequence-parallel"]),
    # activation recomputation: the layers' forward again in backward (all-to-alls and TP collectives too)
    "recompute_block": (1, ["--recompute-granularity", "full", "--recompute-method", "block"]),
    "tp2_ep2_dp2_sp_zero_recompute": (4, ["--tp", "2", "--ep", "2", "--sequence-parallel",
                                          "--use-distributed-optimizer", "--recompute-granularity", "full"]),
    "tp2_ep2_dp2_sp_selective": (4, ["--tp", "2", "--ep", "2", "--sequence-parallel", "--recompute-granularity",
                                     "selective", "--recompute-modules", *RECOMPUTE_MODULES]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_equals_single_process(name, tmp_path, data_prefix, tokenizer_file, reference):
    world, flags = LAYOUTS[name]
    run = run_layout(tmp_path / name, data_prefix, tokenizer_file, world, flags)
    assert_equivalent(run, reference)
    assert_same_model_flops(run[0], reference[0], world)


# Pipeline layouts run an 8-layer model (1 dense + 7 MoE) so that PP 4 x 2 virtual stages get a layer each.
DEEP = ["--set", "model.num_hidden_layers=8"]
PIPELINE_LAYOUTS = {
    "pp2": (2, ["--pp", "2"]),
    "pp4": (4, ["--pp", "4"]),
    "pp2_uneven": (2, ["--pp", "2", "--pp-layout", "3", "5"]),
    "pp2_v2_interleaved": (2, ["--pp", "2", "--pp-schedule", "interleaved", "--virtual-pipeline-stages", "2"]),
    "pp4_v2_interleaved": (4, ["--pp", "4", "--pp-schedule", "interleaved", "--virtual-pipeline-stages", "2"]),
    "pp2_zero_bubble": (2, ["--pp", "2", "--pp-schedule", "zero-bubble"]),
    "pp2_tp2_sp": (4, ["--pp", "2", "--tp", "2", "--sequence-parallel"]),
    "pp2_ep2_dp2_zero": (4, ["--pp", "2", "--ep", "2", "--use-distributed-optimizer"]),
    "pp2_v2_tp2_ep2": (4, ["--pp", "2", "--pp-schedule", "interleaved", "--tp", "2", "--ep", "2"]),
    "pp2_tp2_ep2_dp2_sp_zero": (8, ["--pp", "2", "--tp", "2", "--ep", "2", "--sequence-parallel",
                                    "--use-distributed-optimizer"]),
    "pp4_v2_tp2_zero_bubble": (8, ["--pp", "4", "--tp", "2", "--pp-schedule", "zero-bubble"]),
    "pp2_v2_interleaved_recompute": (2, ["--pp", "2", "--pp-schedule", "interleaved", "--virtual-pipeline-stages",
                                         "2", "--recompute-granularity", "full", "--recompute-num-layers", "2"]),
    "pp2_selective": (2, ["--pp", "2", "--recompute-granularity", "selective", "--recompute-modules", "layernorm",
                          "moe_act", "mla_up_proj", "core_attn", "moe"]),
}


@pytest.fixture(scope="module")
def deep_reference(tmp_path_factory, data_prefix, tokenizer_file):
    return run_layout(tmp_path_factory.mktemp("single_deep"), data_prefix, tokenizer_file, 1, DEEP)


@pytest.mark.parametrize("name", list(PIPELINE_LAYOUTS))
def test_pipeline_layout_equals_single_process(name, tmp_path, data_prefix, tokenizer_file, deep_reference):
    world, flags = PIPELINE_LAYOUTS[name]
    run = run_layout(tmp_path / name, data_prefix, tokenizer_file, world, flags + DEEP)
    assert_equivalent(run, deep_reference)
    assert_same_model_flops(run[0], deep_reference[0], world)


@pytest.mark.parametrize("flags, message", [
    (["--pp-schedule", "interleaved", "--global-batch-size", "10"],
     "runs a step's micro-batches in 2 equal rounds of about PP=2: batch size 10 / (micro_batch_size x DP) = 5 "
     "micro-batches per rank is no multiple of 2"),
    (["--rampup-batch-size", "2", "2", "16"],
     "needs at least PP=2 micro-batches per step and rank; batch size 2 / (micro_batch_size x DP) = 1")],
    ids=["interleaved_rounds", "rampup_start"])
def test_micro_batch_counts_the_pipeline_schedule_refuses_stop_at_start_up(flags, message, tmp_path, data_prefix,
                                                                           tokenizer_file, capfd):
    """PP 2 x DP 2: torch's interleaved 1F1B runs n micro-batches in n // PP equal rounds, and 1F1B needs PP of
    them in every step, the ramp-up's first included. Such a count stops the run before it starts (before, the
    first step of that size failed in torch, after the setup and the first validation)."""
    argv = pretrain_args(tmp_path, data_prefix, tokenizer_file, "--pp", "2", "--dp", "2", *flags, *DEEP)
    with pytest.raises(AssertionError, match="megajoy exited with 2"):
        run_workers(4, cli_worker, argv)
    assert message in capfd.readouterr().err
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_balance_loss_under_tp_sp_ep_dp(tmp_path, data_prefix, tokenizer_file, reference_aux, reference):
    flags = ["--tp", "2", "--ep", "2", "--sequence-parallel", "--set", "model.aux_loss_alpha=0.01"]
    run = run_layout(tmp_path / "aux", data_prefix, tokenizer_file, 4, flags)
    assert_equivalent(run, reference_aux)
    # The balance loss changes training, so matching the reference with it is a real check.
    assert run[1]["layers.1.mlp.gate.weight"].ne(reference[1]["layers.1.mlp.gate.weight"]).any()


def test_srun_launch_runs_the_driver(tmp_path, data_prefix, tokenizer_file, reference):
    """Ranks started by srun (SLURM_* variables only, master from SLURM_STEP_NODELIST) train the same way."""
    run = run_layout(tmp_path / "slurm", data_prefix, tokenizer_file, 4, ["--tp", "2", "--ep", "2"], env_fn=slurm_env)
    assert_equivalent(run, reference)


PARALLEL = ["--tp", "2", "--ep", "2", "--use-distributed-optimizer"]


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, data_prefix, tokenizer_file):
    return run_layout(tmp_path_factory.mktemp("six_steps"), data_prefix, tokenizer_file, 1, [], iters=6)


@pytest.mark.parametrize("first, second", [(1, 4), (4, 1)], ids=["single_then_tp2_ep2_zero", "tp2_ep2_zero_then_single"])
def test_checkpoints_move_between_layouts(first, second, tmp_path, data_prefix, tokenizer_file, six_steps):
    """Saved at one layout, resumed at another: the run ends exactly where an uninterrupted one does."""
    out = tmp_path / "moved"
    run_layout(out, data_prefix, tokenizer_file, first, (PARALLEL if first > 1 else []) + ["--exit-interval", "3"], iters=6)
    assert os.path.basename(latest_checkpoint(str(out))) == "iter_0000003"
    moved = run_layout(out, data_prefix, tokenizer_file, second, (PARALLEL if second > 1 else []) + ["--resume"], iters=6)
    assert_equivalent(moved, six_steps)


def test_torchrun_launches_the_driver(tmp_path, data_prefix, tokenizer_file, reference):
    import subprocess
    import sys

    from megajoy.parallel.spawn import free_port

    argv = pretrain_args(tmp_path / "torchrun", data_prefix, tokenizer_file, "--tp", "2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "megajoy"] + argv
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / "torchrun" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    weights = load_model_dir(latest_checkpoint(str(tmp_path / "torchrun")))[1]
    assert_equivalent((records, weights), reference)


def test_async_save_is_not_changed_by_later_steps(tmp_path, data_prefix, tokenizer_file, monkeypatch, capfd):
    """Steps 3 and 4 run while the step-2 checkpoint is still being written; what it holds is still
    exactly the state after step 2."""
    monkeypatch.setenv("MEGAJOY_TEST_SAVE_PAUSE", "1.5")
    out = tmp_path / "async"
    assert main(pretrain_args(out, data_prefix, tokenizer_file, "--save-interval", "2", "--keep-last", "5",
                              iters=4)) == 0
    err = capfd.readouterr().err
    assert err.index("step 3/4 | loss") < err.index("iter_0000002 complete")
    monkeypatch.delenv("MEGAJOY_TEST_SAVE_PAUSE")
    two = tmp_path / "two_steps"
    assert main(pretrain_args(two, data_prefix, tokenizer_file, iters=4, *["--exit-interval", "2"])) == 0
    saved = load_model_dir(str(out / "checkpoints" / "iter_0000002"))[1]
    after_two = load_model_dir(latest_checkpoint(str(two)))[1]
    assert all(torch.equal(saved[n], after_two[n]) for n in after_two)


@pytest.fixture(scope="module")
def saved_at_tp2_pp2(tmp_path_factory, data_prefix, tokenizer_file):
    """A run's directory with its checkpoint after two steps, written by TP 2 x PP 2 ranks."""
    saved = tmp_path_factory.mktemp("tp2_pp2")
    run_layout(saved, data_prefix, tokenizer_file, 4, ["--tp", "2", "--pp", "2", "--exit-interval", "2"] + DEEP)
    return saved


def test_saved_at_tp2_pp2_resumes_at_ep2_and_single(tmp_path, data_prefix, tokenizer_file, deep_reference,
                                                    saved_at_tp2_pp2):
    """Saved at TP 2 x PP 2, loaded at TP 1 x PP 1 x EP 2 (so DP 2), in one process and at PP 2 x DP 2 with
    ZeRO-1 (each stage skipping the other's optimizer state): the next step's loss is the same, and equals
    the uninterrupted run's."""
    losses = {}
    for name, world, flags in (("ep2", 2, ["--ep", "2"]), ("single", 1, []),
                               ("pp2_dp2_zero", 4, ["--pp", "2", "--use-distributed-optimizer"])):
        out = tmp_path / name
        shutil.copytree(saved_at_tp2_pp2, out)
        records, _ = run_layout(out, data_prefix, tokenizer_file, world, flags + ["--resume"] + DEEP)
        losses[name] = {r["step"]: r["loss"] for r in records if "loss" in r}
    reference = {r["step"]: r["loss"] for r in deep_reference[0] if "loss" in r}
    assert losses["ep2"][3] == pytest.approx(losses["single"][3], rel=1e-6)
    assert losses["pp2_dp2_zero"][3] == pytest.approx(losses["single"][3], rel=1e-6)
    assert losses["single"][3] == pytest.approx(reference[3], rel=1e-5)


def test_hf_export_from_a_tp2_pp2_checkpoint(tmp_path, saved_at_tp2_pp2):
    """tools/convert_ckpt.py reads a checkpoint written by TP 2 x PP 2 ranks; transformers' logits on the
    export equal megajoy's on the same checkpoint."""
    from transformers import AutoModelForCausalLM

    from helpers import load_tool, rel_err
    from megajoy.model import create_model

    out = saved_at_tp2_pp2
    assert load_tool("convert_ckpt").main(["--input", str(out), "--output", str(tmp_path / "hf"), "--to", "hf",
                                           "--dtype", "fp32"]) == 0
    job, state, _ = load_model_dir(latest_checkpoint(str(out)))
    model = create_model(job.model, seed=None)
    model.load_state_dict(state)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ids = torch.randint(0, job.model.vocab_size, (2, 24))
    with torch.no_grad():
        assert rel_err(model.eval()(ids).logits, hf(ids).logits) <= 1e-4


# Muon: every layout's update equals the single process's (Gram all-reduce for TP shards, one owner per
# matrix in each data-parallel group, broadcast results).
MUON = ["--optimizer", "muon", "--lr", "1e-3", "--qk-clip-tau", "0.03"]  # MuonClip: clips 3, 1, 0 heads in the 3 steps
MUON_LAYOUTS = {
    "tp2": (2, ["--tp", "2"], []),
    "tp2_sp_per_head": (2, ["--tp", "2", "--sequence-parallel"], ["--muon-per-head"]),
    "ep2_dp2": (2, ["--ep", "2"], []),
    "dp4_zero": (4, ["--use-distributed-optimizer", "--ddp-bucket-size-mb", "0.01"], []),  # Muon's broadcasts in buckets
    "tp2_ep2_dp2_zero": (4, ["--tp", "2", "--ep", "2", "--use-distributed-optimizer"], []),
    "pp2_tp2_dp2": (8, ["--pp", "2", "--tp", "2"], DEEP),
}


@pytest.fixture(scope="module")
def muon_references(tmp_path_factory, data_prefix, tokenizer_file):
    refs = {}

    def reference(extra):
        key = tuple(extra)
        if key not in refs:
            out = tmp_path_factory.mktemp("single_muon")
            refs[key] = run_layout(out, data_prefix, tokenizer_file, 1, MUON + extra)
        return refs[key]

    return reference


@pytest.mark.parametrize("name", list(MUON_LAYOUTS))
def test_muon_layout_equals_single_process(name, tmp_path, data_prefix, tokenizer_file, muon_references):
    world, flags, model_flags = MUON_LAYOUTS[name]
    run = run_layout(tmp_path / name, data_prefix, tokenizer_file, world, MUON + model_flags + flags)
    assert_equivalent(run, muon_references(model_flags))


def _muon_owner_worker(rank, world):
    import dataclasses

    from megajoy.config import load_job_config
    from megajoy.launch import setup_parallel
    from megajoy.model import create_model
    from megajoy.parallel.optimizer import build_parallel_optimizer

    job = load_job_config("tiny", None, TINY_MODEL_OVERRIDES + ["parallel.expert_model_parallel_size=2",
                                                                "parallel.use_distributed_optimizer=true",
                                                                "optimizer.optimizer=muon"])
    job = dataclasses.replace(job, data=dataclasses.replace(job.data, seq_length=16))
    pc = setup_parallel(job)
    model = create_model(job.model, pc=pc).train()
    optimizer = build_parallel_optimizer(model, pc, job.optimizer, True)
    ids = torch.randint(0, job.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(rank))
    out = model(ids, labels=torch.roll(ids, -1, 1))
    (out.lm_loss + out.mtp_loss).backward()
    optimizer.reduce_gradients()
    counts = []
    for _ in range(2):
        optimizer.step()
        counts.append(list(optimizer.muon.orthogonalised))
    matrices = [e.name for e in optimizer.muon.entries]
    return counts, matrices, pc.coords


def test_each_matrix_orthogonalised_once_per_step_in_its_data_parallel_group():
    """4 ranks, EP 2 (so DP 4 for dense matrices, EDP 2 for experts), ZeRO-1: per step, every dense matrix
    is orthogonalised by exactly one of the 4 ranks and every expert stack by one rank of its EDP pair."""
    results = run_workers(4, _muon_owner_worker)
    matrices = results[0][1]
    dense = [n for n in matrices if ".experts." not in n]
    for step in range(2):
        done = [name for counts, _, _ in results for name in counts[step] if ".experts." not in name]
        assert sorted(done) == sorted(dense)  # each exactly once across the data-parallel group
        for ep in (0, 1):  # experts: within each EDP group (ranks holding the same experts)
            group = [r for r in results if r[2]["ep"] == ep]
            done = [n for counts, _, _ in group for n in counts[step] if ".experts." in n]
            assert sorted(done) == sorted(n for n in matrices if ".experts." in n)
    loads = [len(counts[0]) for counts, _, _ in results]
    assert max(loads) - min(loads) <= 3  # spread over the ranks, not piled on one


def test_int4_qat_of_every_projection_under_tp2_ep2(tmp_path, data_prefix, tokenizer_file):
    """Groups never straddle shards, so fake-quant on each shard equals fake-quant of the whole tensor."""
    dims = ["model.intermediate_size=128", "model.q_lora_rank=32", "model.kv_lora_rank=32", "model.v_head_dim=32",
            "model.moe_intermediate_size=32"]  # every projection's input splits into whole 32-groups per rank
    qat = ["--qat", "int4", "--qat-modules", "linear", "--qat-group", "32"] + [a for d in dims for a in ("--set", d)]
    single = run_layout(tmp_path / "single", data_prefix, tokenizer_file, 1, qat)
    run = run_layout(tmp_path / "tp2_ep2", data_prefix, tokenizer_file, 4, qat + ["--tp", "2", "--ep", "2"])
    # a fake-quant rounding step turns fp32 summation-order differences (1e-7) into slightly larger ones
    assert_equivalent(run, single, rtol=5e-5)
