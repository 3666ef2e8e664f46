"""The `megajoy` command line: info, init, convert_ckpt round trip, and the pinned set of flags."""

import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import load_tool

from megajoy.cli import build_parser, main
from megajoy.ckpt.native import load_model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flags(parser) -> dict[str, set[str]]:
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[name] = {s for a in sub._actions for s in a.option_strings}
    return out


# Megatron-LM's flags for the model's shape (every command that takes a preset)
MODEL_SHAPE_FLAGS = {"--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads", "--num-experts",
                     "--moe-router-topk", "--moe-ffn-hidden-size", "--moe-router-topk-scaling-factor",
                     "--moe-aux-loss-coeff", "--q-lora-rank", "--kv-lora-rank", "--qk-head-dim", "--qk-pos-emb-head-dim",
                     "--v-head-dim", "--max-position-embeddings", "--rotary-base", "--norm-epsilon", "--init-method-std",
                     "--mtp-num-layers"}
# Changing a flag breaks users' scripts: update this list only on purpose.
PINNED_FLAGS = {
    "info": {"-h", "--help", "--preset", "--config", "--set", "--seq-length", "--json", "--tp",
             "--tensor-model-parallel-size", "--pp", "--pipeline-model-parallel-size", "--ep",
             "--expert-model-parallel-size", "--dp", "--data-parallel-size", "--virtual-pipeline-stages", "--schedule",
             "--pp-schedule", "--pp-layout", "--sequence-parallel", "--use-distributed-optimizer", "--micro-batch-size",
             "--global-batch-size", "--gpu-memory", "--precision", "--params-dtype", "--optimizer",
             "--recompute-granularity", "--recompute-method", "--recompute-num-layers", "--recompute-modules",
             "--kernels", "--cross-entropy-chunk", "--qat", "--qat-modules", "--rollout-qat",
             "--rollout-qat-modules"} | MODEL_SHAPE_FLAGS,
    "init": {"-h", "--help", "--preset", "--config", "--set", "--out", "--seed", "--tokenizer", "--dtype"} | MODEL_SHAPE_FLAGS,
    "pretrain": {
        "-h", "--help", "--preset", "--config", "--set", "--train-iters", "--train-samples", "--global-batch-size",
        "--micro-batch-size", "--rampup-batch-size", "--seed", "--mtp-start-iter", "--mtp-loss-scaling-factor",
        "--mtp-loss-weight",
        "--moe-router-bias-update-rate", "--router-bias-update-rate", "--freeze-router-bias", "--bf16", "--fp32",
        "--params-dtype", "--kernels", "--cross-entropy-chunk", "--recompute-granularity", "--recompute-method",
        "--recompute-num-layers", "--recompute-modules", "--peak-tflops",
        "--log-interval", "--eval-interval", "--eval-iters", "--exit-interval", "--exit-duration-in-mins", "--plot",
        "--seq-length",
        "--data-path", "--split", "--tokenizer", "--tokenizer-model", "--eod-token", "--data-cache-path",
        "--eod-mask-loss", "--no-eod-mask-loss", "--optimizer", "--lr", "--min-lr", "--lr-warmup-iters",
        "--lr-decay-style", "--lr-wsd-decay-style", "--lr-wsd-decay-iters", "--lr-decay-iters", "--lr-warmup-samples",
        "--lr-wsd-decay-samples", "--lr-decay-samples", "--weight-decay", "--clip-grad",
        "--adam-beta1", "--adam-beta2", "--adam-eps", "--out", "--save-interval", "--keep-last", "--resume", "--init",
        "--tp", "--tensor-model-parallel-size", "--pp", "--pipeline-model-parallel-size", "--ep",
        "--expert-model-parallel-size", "--cp", "--context-parallel-size", "--dp", "--data-parallel-size",
        "--sequence-parallel", "--use-distributed-optimizer", "--ddp-bucket-size-mb", "--virtual-pipeline-stages",
        "--num-virtual-stages-per-pipeline-rank", "--virtual-pipeline-model-parallel-size", "--pp-schedule",
        "--pp-layout", "--async-save", "--no-async-save", "--muon-momentum", "--muon-ns-steps", "--muon-ns-dtype",
        "--muon-scale", "--muon-per-head", "--muon-router", "--qk-clip-tau", "--qat", "--qat-start-iter",
        "--qat-modules", "--qat-group", "--fp8", "--fp8-backend",
    } | MODEL_SHAPE_FLAGS,
    "chat-template": {"-h", "--help", "--render", "--tokenizer", "--thinking", "--limit"},
    "generate": {"-h", "--help", "--ckpt", "--prompt", "--chat", "--thinking", "--max-new-tokens", "--temperature",
                 "--top-k", "--top-p", "--stop", "--seed", "--mtp-draft", "--json", "--bf16", "--tp",
                 "--tensor-model-parallel-size", "--pp", "--pipeline-model-parallel-size", "--virtual-pipeline-stages",
                 "--num-virtual-stages-per-pipeline-rank", "--virtual-pipeline-model-parallel-size", "--pp-schedule",
                 "--pp-layout", "--ep", "--expert-model-parallel-size", "--dp", "--data-parallel-size"},
}
# The post-training stages read their own --data, not the pretraining corpus.
POST_TRAINING_FLAGS = PINNED_FLAGS["pretrain"] - {"--data-path", "--split", "--eod-token", "--data-cache-path",
                                                  "--eod-mask-loss", "--no-eod-mask-loss"}
PINNED_FLAGS["sft"] = POST_TRAINING_FLAGS | {"--data", "--thinking", "--overlong", "--no-pack",
                                                  "--valid-conversations", "--demo-conversations",
                                                  "--exact-match-samples"}
PINNED_FLAGS["rl"] = POST_TRAINING_FLAGS | {
    "--data", "--policy-loss", "--compare", "--fiber-c-plus", "--fiber-c-minus", "--fiber-epsilon", "--clip-epsilon",
    "--gspo-epsilon-low", "--gspo-epsilon-high", "--prompts-per-step", "--rollouts-per-prompt", "--updates-per-batch",
    "--max-new-tokens", "--temperature", "--rollout-qat", "--rollout-qat-modules", "--curriculum",
    "--curriculum-rollouts", "--thinking", "--valid-prompts", "--demo-prompts"}
PINNED_FLAGS["dpo"] = POST_TRAINING_FLAGS | {"--data", "--beta", "--loss-type", "--label-smoothing", "--sft-weight",
                                                  "--reference", "--thinking", "--overlong", "--valid-pairs",
                                                  "--demo-pairs", "--exact-match-samples"}


def test_cli_flags_are_pinned():
    assert _flags(build_parser()) == PINNED_FLAGS


def test_model_shape_flags_are_megatrons_onto_hugging_faces_fields(capsys):
    """Each model-shape flag is Megatron-LM's name of a megatron-core MLATransformerConfig field (two are
    renamed there; --max-position-embeddings is a training argument), sets the field of transformers'
    DeepseekV3Config that --set sets, and comes before --set."""
    import dataclasses

    from megatron.core.transformer.transformer_config import MLATransformerConfig
    from transformers import DeepseekV3Config

    from megajoy.stages.flags import MODEL_FLAGS

    megatron_fields = {f.name for f in dataclasses.fields(MLATransformerConfig)}
    renamed = {"num_experts": "num_moe_experts", "norm_epsilon": "layernorm_epsilon"}
    argv, want = [], []
    for i, (flags, path, kwargs) in enumerate(MODEL_FLAGS):
        name, field = flags[0].lstrip("-").replace("-", "_"), path.split(".")[1]
        assert renamed.get(name, name) in megatron_fields or name == "max_position_embeddings", flags[0]
        value = {"num_layers": 3, "hidden_size": 96, "num_attention_heads": 4, "num_experts": 8,
                 "moe_router_topk": 2}.get(name, kwargs["type"](16 + i))
        if field != "aux_loss_alpha":  # megajoy's own field
            hf = DeepseekV3Config(**{field: value}).to_dict()
            assert value in (hf.get(field), hf["rope_parameters"].get(field)), path
        argv += [flags[0], str(value)]
        want += ["--set", f"{path}={value}"]
    outputs = []
    for command in (argv, want):
        assert main(["info", "--json", "--set", "model.n_group=1", *command]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1] and outputs[0]["total_params"] < 10e6
    assert main(["info", "--json", "--num-layers", "5", "--set", "model.num_hidden_layers=3", *argv[2:]]) == 0
    assert json.loads(capsys.readouterr().out) == outputs[0]  # --set wins


def test_info_json_matches_published_numbers(capsys):
    assert main(["info", "--preset", "joyai-flash", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert abs(stats["total_params"] / 48.94e9 - 1) < 1e-3
    assert abs(stats["active_params"] / 2.775e9 - 1) < 1e-3
    assert stats["kv_cache_bytes_per_token"] == 46080


def test_info_text_and_bad_override(capsys):
    assert main(["info", "--preset", "tiny", "--set", "model.hidden_size=96"]) == 0
    assert "total parameters" in capsys.readouterr().out
    assert main(["info", "--set", "model.n_routed_experts=10", "--set", "model.n_group=4"]) == 2
    assert "n_routed_experts=10 is not divisible by n_group=4" in capsys.readouterr().err


def test_init_then_convert_round_trip(tmp_path):
    ckpt, hf_dir, back = tmp_path / "ckpt", tmp_path / "hf", tmp_path / "back"
    assert main(["init", "--preset", "tiny", "--set", "model.num_hidden_layers=2", "--out", str(ckpt), "--seed", "3"]) == 0
    tool = load_tool("convert_ckpt")  # in this process (the script's own entry point: tests/test_convert.py)
    assert tool.main(["--input", str(ckpt), "--output", str(hf_dir), "--to", "hf", "--dtype", "fp32"]) == 0
    assert tool.main(["--input", str(hf_dir), "--output", str(back), "--to", "megajoy"]) == 0
    job_a, state_a, _ = load_model_dir(str(ckpt))
    job_b, state_b, _ = load_model_dir(str(back))
    assert job_a.model == job_b.model
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["num_nextn_predict_layers"] == 1
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_convert_rejects_wrong_shapes(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    assert main(["init", "--set", "model.num_hidden_layers=2", "--out", str(ckpt)]) == 0
    weights = load_file(str(ckpt / "model.safetensors"))
    weights["layers.1.self_attn.o_proj.weight"] = torch.zeros(3, 3)
    save_file(weights, str(ckpt / "model.safetensors"))
    capsys.readouterr()
    assert load_tool("convert_ckpt").main(["--input", str(ckpt), "--output", str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert "'layers.1.self_attn.o_proj.weight' has shape (3, 3)" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "hf")


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "megajoy", "info", "--preset", "joyai-slice"],
                            capture_output=True, text=True, check=True)
    assert "joyai-slice" in result.stdout


def test_init_stores_the_tokenizer(tmp_path, tokenizer_file):
    from helpers import TINY_MODEL_OVERRIDES

    argv = ["init", "--out", str(tmp_path / "c"), "--tokenizer", tokenizer_file]
    assert main(argv + [a for o in TINY_MODEL_OVERRIDES for a in ("--set", o)]) == 0
    _, _, tokenizer = load_model_dir(str(tmp_path / "c"))
    assert open(tokenizer).read() == open(tokenizer_file).read()
    directory = ["init", "--out", str(tmp_path / "e"), "--tokenizer", os.path.dirname(tokenizer_file)]
    assert main(directory + [a for o in TINY_MODEL_OVERRIDES for a in ("--set", o)]) == 0  # DIR/tokenizer.json
    assert open(load_model_dir(str(tmp_path / "e"))[2]).read() == open(tokenizer_file).read()
    assert main(argv + ["--set", "model.vocab_size=100", "--out", str(tmp_path / "d")]) == 2


def test_joyai_presets_default_to_muon():
    from megajoy.stages.pretrain import build_job

    parser = build_parser()
    for preset, optimizer in (("joyai-flash", "muon"), ("joyai-slice", "muon"), ("tiny", "adamw")):
        args = parser.parse_args(["pretrain", "--preset", preset])
        assert build_job(args).optimizer.optimizer == optimizer
    args = parser.parse_args(["pretrain", "--preset", "joyai-flash", "--optimizer", "adamw"])
    assert build_job(args).optimizer.optimizer == "adamw"


def test_dpo_and_rl_follow_the_published_recipe_for_the_joyai_presets():
    """JOYAI.md: DPO 1,000 steps at LR 1e-6 cosine to 1e-7, global batch 256; RL at LR 1e-6. The tiny preset
    keeps the CPU demo's settings, and flags still win. Before, both stages ran the demo's LR 1e-4 on any
    preset."""
    from megajoy.stages import dpo
    from megajoy.stages.rl import stage as rl

    parser = build_parser()
    for preset in ("joyai-flash", "joyai-slice"):
        job = dpo.build_job(parser.parse_args(["dpo", "--preset", preset]))
        o, t = job.optimizer, job.train
        assert (o.lr, o.min_lr, o.lr_decay_style, t.train_iters, t.global_batch_size) == (1e-6, 1e-7, "cosine", 1000,
                                                                                           256)
        job = rl.build_job(parser.parse_args(["rl", "--preset", preset]))
        o, t = job.optimizer, job.train
        assert (o.lr, o.min_lr, o.lr_decay_style, t.micro_batch_size, t.global_batch_size) == (1e-6, 1e-6, "constant",
                                                                                                1, 64)
    job = dpo.build_job(parser.parse_args(["dpo"]))
    assert (job.optimizer.lr, job.train.train_iters, job.train.global_batch_size) == (1e-4, 60, 8)
    job = rl.build_job(parser.parse_args(["rl", "--preset", "joyai-flash", "--lr", "3e-6"]))
    assert (job.optimizer.lr, rl.build_job(parser.parse_args(["rl"])).optimizer.lr) == (3e-6, 1e-4)


def _training_refuses(gbs: int, mbs: int, dp: int, pp: int) -> bool:
    """Whether the trainer's own batch-layout check refuses these sizes."""
    import types

    from megajoy.config import ParallelConfig, load_job_config
    from megajoy.parallel.context import planning_context
    from megajoy.train.trainer import Trainer

    job = load_job_config("tiny", None, [f"train.global_batch_size={gbs}", f"train.micro_batch_size={mbs}"])
    pc = planning_context(ParallelConfig(pipeline_model_parallel_size=pp), dp * pp, 0, job.model, 64)
    try:
        Trainer._check_batch_layout(types.SimpleNamespace(job=job, pc=pc))
    except ValueError:
        return True
    return False


def test_info_plans_only_batch_layouts_training_runs(capsys):
    """A plan's micro-batches per step are global batch / (micro-batch x DP), as the trainer counts them: before,
    a global batch smaller than PP x micro-batch x DP planned 0 micro-batches in flight (no activations), and
    one not divisible planned a step the trainer refuses."""
    for gbs, mbs, dp, pp in [(1, 1, 2, 2), (2, 1, 2, 2), (3, 1, 2, 1), (6, 2, 2, 2), (8, 1, 2, 2), (12, 2, 3, 2)]:
        argv = ["info", "--seq-length", "64", "--json", "--global-batch-size", str(gbs), "--micro-batch-size",
                str(mbs), "--dp", str(dp), "--pp", str(pp)]
        refused = _training_refuses(gbs, mbs, dp, pp)
        assert main(argv) == (2 if refused else 0), (gbs, mbs, dp, pp)
        out = capsys.readouterr().out
        if not refused:
            per_step = gbs // (mbs * dp)
            in_flight = [m["micro_batches_in_flight"] for m in json.loads(out)["memory_plan"]]
            assert in_flight == [min(per_step, pp - stage) for stage in range(pp)]
    assert main(["info", "--tp", "1", "--micro-batch-size", "0"]) == 2


def test_info_plans_no_job_training_refuses(capsys):
    """Recomputation under the zero-bubble schedule: `megajoy pretrain` refuses the job, so the plan does too."""
    from megajoy.config import load_job_config

    with pytest.raises(ValueError, match="zero-bubble"):
        load_job_config("tiny", None, ["train.recompute_granularity=full", "parallel.pipeline_model_parallel_size=2",
                                       "parallel.pipeline_schedule=zero-bubble"])
    assert main(["info", "--pp", "2", "--schedule", "zero-bubble", "--recompute-granularity", "full"]) == 2
    assert "zero-bubble" in capsys.readouterr().err


def test_version_flag_prints_the_packaged_version():
    setup = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
    version = re.search(r'version="([^"]+)"', setup).group(1)
    result = subprocess.run([sys.executable, "-m", "megajoy", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == f"megajoy {version}"


def test_help_names_each_value_after_its_flag():
    """Before, every training flag's value read FLAG__<NAME> (its internal dest) in `--help`."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        text = sub.format_help()
        assert "FLAG__" not in text, name
    assert "--train-iters TRAIN_ITERS" in subparsers.choices["pretrain"].format_help()


@pytest.mark.parametrize("first, second", [("--bf16", "--fp32"), ("--eod-mask-loss", "--no-eod-mask-loss"),
                                           ("--async-save", "--no-async-save")])
def test_opposite_switches_together_are_refused(first, second):
    """Before, the switch listed later in the flag table won whatever the command line's order (`--fp32 --bf16`
    trained in fp32), silently."""
    from megajoy.stages.pretrain import build_job

    for pair in ((first, second), (second, first)):
        with pytest.raises(ValueError, match=f"give {first} or {second}, not both"):
            build_job(build_parser().parse_args(["pretrain", *pair]))


def test_each_switch_alone_still_sets_its_field():
    from megajoy.stages.pretrain import build_job

    parser = build_parser()

    def job(*flags):
        return build_job(parser.parse_args(["pretrain", *flags]))

    assert (job("--bf16").train.bf16, job("--fp32").train.bf16, job().train.bf16) == (True, False, None)
    assert (job("--eod-mask-loss").data.eod_mask_loss, job("--no-eod-mask-loss").data.eod_mask_loss) == (True, False)
    assert (job("--async-save").parallel.async_save, job("--no-async-save").parallel.async_save) == (True, False)


@pytest.mark.parametrize("argv", [["generate", "--prompt", "hi", "--ckpt"], ["sft", "--init"], ["pretrain", "--init"]])
def test_a_checkpoint_path_that_does_not_exist_is_named(argv, tmp_path, capsys):
    """Before: `generate` said the (missing) checkpoint stored no tokenizer.json, `--init` that config.yaml was
    missing from it."""
    missing = str(tmp_path / "no_such_run")
    extra = [] if argv[0] == "generate" else ["--out", str(tmp_path / "out"), "--train-iters", "1"]
    assert main([*argv, missing, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("training --out directory") and f"{missing} does not exist" in err and "\n" not in err
