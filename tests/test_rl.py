"""RL plumbing: verifiers, the Gaussian curriculum, prompt loading, the stage's objective on micro-batches,
and `megajoy rl` end to end (diagnostics, ratios, --compare, rollouts under INT4 weights)."""

import argparse
import collections
import json
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import init_tiny_checkpoint, say_seven_data

from megajoy.cli import main
from megajoy.data.chat import Piece
from megajoy.data.demo import write_jsonl
from megajoy.stages.rl.curriculum import CurriculumSampler
from megajoy.stages.rl.losses import fiber_terms, fiberpo_loss, ppo_clip_loss
from megajoy.stages.rl.rewards import calculator_reward, math_reward, safe_eval

EOS = "<｜end▁of▁sentence｜>"


def test_verifiers():
    assert math_reward("3 + 4 = 7.</think>7" + EOS, "7") == 1
    assert math_reward("7.0" + EOS, "7") == 1 and math_reward("-1", "-1") == 1
    assert math_reward("3 + 4 = 7.</think>8" + EOS, "7") == 0 and math_reward("7 apples", "7") == 0
    call = "<tool_call>\n<function=calculator>\n<parameter=expression>\n12 * 3\n</parameter>\n</function>\n</tool_call>"
    assert calculator_reward(call + EOS, "36") == 1
    assert calculator_reward(call.replace("12", "13"), "36") == 0
    assert calculator_reward(call.replace("calculator", "search"), "36") == 0
    # a call written inside the reasoning is not made (engines parse tool calls from the answer only)
    assert calculator_reward("I could call " + call + " here.</think>36" + EOS, "36") == 0
    assert calculator_reward("12 times 3.</think>" + call + EOS, "36") == 1
    assert safe_eval("(2 + 3) * -4 / 2") == -10
    assert safe_eval("__import__('os').getcwd()") is None and safe_eval("1 / 0") is None and safe_eval("2 ** 9") is None


def calculator_call(expression: str) -> str:
    return (f"<tool_call>\n<function=calculator>\n<parameter=expression>\n{expression}\n</parameter>\n"
            "</function>\n</tool_call>")


def test_calculator_verifier_computes_decimals_exactly_and_survives_huge_numbers():
    # A calculator gives 0.3 for 0.1 + 0.2 and 3.3 for 1.1 * 3 (binary floats: 0.30000000000000004,
    # 3.3000000000000003)
    assert calculator_reward(calculator_call("0.1 + 0.2"), "0.3") == 1
    assert calculator_reward(calculator_call("1.1 * 3"), "3.3") == 1
    assert calculator_reward(calculator_call("0.1 + 0.2"), "0.30000000000000004") == 0
    assert calculator_reward(calculator_call("1 / 3"), "0.3333333333333333") == 1  # the answer as a float prints it
    assert calculator_reward(calculator_call("10 / 4"), "2.5") == 1
    assert calculator_reward(calculator_call("7"), "7.0") == 1
    # A sampled completion with a number beyond float's range is wrong, not a crash of the run
    huge = "1" + "0" * 400
    assert calculator_reward(calculator_call(huge), "1") == 0
    assert calculator_reward(calculator_call(huge + " / 3"), "1") == 0
    assert calculator_reward(calculator_call(huge + " - " + huge + " + 2"), "2") == 1


def test_curriculum_sampler():
    rates = [1.0, 0.8, 0.8, 0.2, 0.2, 0.5] + [0.5] * 10
    domains = ["a", "a", "a", "a", "a", "a"] + ["b"] * 10
    sampler = CurriculumSampler(rates, domains, seed=0)
    assert 0 not in sampler.by_domain["a"]  # always solved: dropped
    probabilities = sampler.domain_probabilities()  # sqrt(5) : sqrt(10)
    assert probabilities["a"] == pytest.approx(math.sqrt(5) / (math.sqrt(5) + math.sqrt(10)))
    assert sampler.mu(0) == pytest.approx(0.8) and sampler.mu(1) == pytest.approx(0.2)
    assert sampler.mu(0.5) == pytest.approx(0.5)
    early = collections.Counter(sampler.sample(20000, progress=0.0))
    late = collections.Counter(sampler.sample(20000, progress=1.0))
    domain_a = sum(v for k, v in early.items() if k < 6) / 20000
    assert abs(domain_a - probabilities["a"]) < 0.02
    # Within domain a at mu = 0.8: weights exp(0), exp(0), exp(-8), exp(-8), exp(-2) for p = .8 .8 .2 .2 .5
    w = [1, 1, math.exp(-8), math.exp(-8), math.exp(-2)]
    share_high = (early[1] + early[2]) / sum(early[i] for i in range(1, 6))
    assert abs(share_high - 2 / sum(w)) < 0.02
    share_low = (late[3] + late[4]) / sum(late[i] for i in range(1, 6))
    assert abs(share_low - 2 / sum(w)) < 0.02
    with pytest.raises(ValueError, match="always solved"):
        CurriculumSampler([1.0, 1.0], ["a", "b"])


def test_bad_prompts_are_counted(tmp_path, tokenizer_file):
    from megajoy.data.prompts import load_prompts
    from megajoy.data.sft import ChatTokenizer

    lines = [{"prompt": "1 + 1?", "answer": "2"}, {"prompt": "no answer"},
             {"prompt": "x", "answer": "1", "verifier": "oracle"},
             {"messages": [{"role": "robot", "content": "x"}], "answer": "1"},
             {"prompt": "the cat " * 40, "answer": "1"}, {"messages": [{"role": "user", "content": "3 * 4"}],
                                                           "answer": 12, "verifier": "calculator", "domain": "tool"}]
    write_jsonl(str(tmp_path / "p.jsonl"), lines)
    prompts, report = load_prompts(str(tmp_path / "p.jsonl"), ChatTokenizer(tokenizer_file, 320), 60)
    assert [p.answer for p in prompts] == ["2", "12"] and prompts[1].domain == "tool"
    assert dict(report.dropped) == {"no_answer": 1, "unknown_verifier": 1, "unknown_role": 1, "too_long": 1}
    assert report.first_lines == {"no_answer": 2, "unknown_verifier": 3, "unknown_role": 4, "too_long": 5}


def test_null_verifier_and_domain_read_as_absent(tmp_path, tokenizer_file):
    """As for "thinking", "tools" or "messages": a null field is the default, not a verifier named None (the
    line was dropped) or a curriculum domain "None" apart from the absent field's."""
    from megajoy.data.prompts import load_prompts
    from megajoy.data.sft import ChatTokenizer

    lines = [{"prompt": "1 + 1?", "answer": "2", "verifier": None, "domain": None}, {"prompt": "1 + 2?", "answer": "3"},
             {"prompt": "3 * 4", "answer": "12", "verifier": "calculator", "domain": None}]
    write_jsonl(str(tmp_path / "p.jsonl"), lines)
    prompts, report = load_prompts(str(tmp_path / "p.jsonl"), ChatTokenizer(tokenizer_file, 320), 60)
    assert [(p.answer, p.verifier, p.domain) for p in prompts] == [
        ("2", "math", "math"), ("3", "math", "math"), ("12", "calculator", "calculator")]
    assert not report.dropped


def test_a_thinking_prompt_is_answered_only_after_its_reasoning_closes(tmp_path, tokenizer_file):
    """A prompt in thinking mode ends in <think>: a completion without </think> is all reasoning and answers
    nothing, however its text reads; rewarding it taught the policy to skip the end of its reasoning."""
    from megajoy.data.prompts import load_prompts
    from megajoy.data.sft import ChatTokenizer
    from megajoy.stages.rl.stage import RlStage

    lines = [{"prompt": "What is 3 + 4?", "answer": "7", "thinking": True},
             {"prompt": "What is 3 + 4?", "answer": "7", "thinking": False},
             {"tools": [{"name": "calculator"}], "prompt": "Use the calculator: 12 * 3", "answer": "36",
              "verifier": "calculator", "thinking": True}]
    write_jsonl(str(tmp_path / "p.jsonl"), lines)
    stage = RlStage(argparse.Namespace())
    stage.tokenizer = ChatTokenizer(tokenizer_file, 320)
    thinking, plain, tool = load_prompts(str(tmp_path / "p.jsonl"), stage.tokenizer, 200)[0]
    texts = {"7" + EOS: (0, 1), "3 + 4 = 7.</think>7" + EOS: (1, 1), "3 + 4 = 7" + EOS: (0, 0)}
    for text, (want_thinking, want_plain) in texts.items():
        ids = [stage.tokenizer.encode([Piece(text, True)]).ids]
        assert stage._rewards([thinking, plain], ids * 2) == [want_thinking, want_plain], text
    call = calculator_call("12 * 3") + EOS
    got = [stage._rewards([tool], [stage.tokenizer.encode([Piece(t, True)]).ids])[0] for t in (call, "</think>" + call)]
    assert got == [0, 1]


@pytest.mark.parametrize("loss", ["fiberpo", "ppo-clip"])
def test_objective_is_the_whole_batch_loss_however_it_is_split(loss):
    """Micro-batch contributions sum to the loss of the whole rollout batch (trajectory- or
    token-normalised), and so do their gradients."""
    from megajoy.data.packing import Batch
    from megajoy.stages.rl.stage import RlStage

    torch.manual_seed(0)
    rows, width = 6, 10
    mask = (torch.arange(width)[None, :] >= torch.tensor([[3], [4], [2], [6], [3], [5]])).float()
    old = -torch.rand(rows, width) * mask
    advantages = torch.randn(rows)
    new = (old + torch.randn(rows, width) * 0.1).requires_grad_()
    whole_fn = {"fiberpo": fiberpo_loss, "ppo-clip": ppo_clip_loss}[loss]
    want = whole_fn(new * mask - old, advantages, mask)[0]
    (want_grad,) = torch.autograd.grad(want, new)
    args = argparse.Namespace(policy_loss=loss, fiber_c_plus=0.12, fiber_c_minus=0.08, fiber_epsilon=0.05,
                              clip_epsilon=0.2)
    stage = RlStage(args)
    batch = Batch(torch.zeros(rows, width, dtype=torch.long), torch.zeros(rows, width, dtype=torch.long), mask,
                  torch.zeros(rows, width, dtype=torch.long), torch.zeros(rows, width, dtype=torch.long),
                  ref_logps=old, advantages=advantages[:, None] * mask)
    counts = stage.token_counts(None, batch)
    total = 0
    for part in (slice(0, 2), slice(2, 6)):
        sub = Batch(**{k: v[part] for k, v in batch.tensors().items()})
        out = SimpleNamespace(lm_token_loss=-new[part])
        total = total + stage.objective(None, out, counts, sub)[0]
    (got_grad,) = torch.autograd.grad(total, new)
    assert abs(total.item() - want.item()) < 1e-6
    assert torch.allclose(got_grad, want_grad, atol=1e-7) and want_grad.abs().max() > 1e-3


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory, tokenizer_file):
    out = tmp_path_factory.mktemp("rl_init")
    # experts 32 wide, so that INT4 rollouts can use groups of 32
    init_tiny_checkpoint(out, tokenizer_file, "model.moe_intermediate_size=32")
    return out


@pytest.fixture(scope="module")
def warm_init(tmp_path_factory, tiny_init):
    """(checkpoint, prompts): tiny_init after 30 SFT steps on "Say seven, i." -> "7", and those prompts for
    RL. Its greedy answers are right and, at temperature 0.4, about half its samples: advantages and
    updates are not zero (the untrained policy never earns a reward)."""
    out = tmp_path_factory.mktemp("rl_warm")
    chat, prompts = say_seven_data(out)
    assert main(["sft", "--init", str(tiny_init), "--data", chat, "--out", str(out / "sft"), "--train-iters", "30",
                 "--seq-length", "64", "--lr", "3e-3", "--valid-conversations", "4", "--exact-match-samples", "0",
                 "--eval-interval", "1000"]) == 0
    return out / "sft", prompts


def warm_rl_args(warm, out, *extra):
    init, prompts = warm
    return rl_args(init, out, "--data", str(prompts), "--temperature", "0.4", *extra)


def rl_args(init, out, *extra):
    return ["rl", "--init", str(init), "--out", str(out), "--train-iters", "4", "--prompts-per-step", "4",
            "--rollouts-per-prompt", "4", "--micro-batch-size", "8", "--max-new-tokens", "6", "--demo-prompts", "60",
            "--valid-prompts", "8", "--eval-interval", "4", "--temperature", "2.0", "--lr", "1e-3", *extra]


def test_rl_end_to_end_with_every_diagnostic(tmp_path, warm_init):
    """From a briefly fine-tuned policy (rewards neither all 0 nor all 1), with INT4 rollouts and the
    curriculum: every diagnostic is logged, and the second update of a rollout batch sees a changed policy."""
    assert main(warm_rl_args(warm_init, tmp_path, "--rollout-qat", "int4", "--qat-group", "32", "--curriculum",
                             "--curriculum-rollouts", "2", "--plot")) == 0
    assert (tmp_path / "rl.png").stat().st_size > 10000 and (tmp_path / "loss.png").exists()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        for key in ("entropy", "importance_ratio", "response_length", "grad_norm", "mean_abs_u", "token_clip_fraction",
                    "reward"):
            assert key in r and math.isfinite(r[key]), key
        assert sum(r[f"regime_{g}"] for g in ("G-I", "G-II,r", "G-II", "G-III,r", "G-III")) == pytest.approx(1)
        assert sum(r[f"regime_{g}"] for g in ("L-I", "L-II", "L-III")) == pytest.approx(1)
        assert 0 < r["response_length"] <= 6 and r["entropy"] > 0
    # The first update of each rollout batch sees the rollout policy itself; the second a changed one.
    assert steps[0]["importance_ratio"] == pytest.approx(1, abs=1e-5) and steps[0]["mean_abs_u"] < 1e-5
    assert abs(steps[1]["importance_ratio"] - 1) > 1e-4 and steps[1]["mean_abs_u"] > 1e-4
    assert any(0 < r["reward"] < 1 and r["grad_norm"] > 0.1 for r in steps)
    assert [r["step"] for r in records if "val_accuracy" in r] == [0, 4]
    results = json.loads((tmp_path / "rl_results.json").read_text())
    assert results["policy_loss"] == "fiberpo" and results["step"] == 4


def test_compare_runs_both_losses_with_the_same_seeds(tmp_path, tiny_init):
    assert main(rl_args(tiny_init, tmp_path, "--compare", "fiberpo", "grpo", "--train-iters", "2",
                        "--eval-interval", "2")) == 0
    assert (tmp_path / "compare.png").stat().st_size > 10000
    runs = {loss: [json.loads(line) for line in open(tmp_path / loss / "metrics.jsonl")] for loss in ("fiberpo", "grpo")}
    first = {loss: next(r for r in records if "reward" in r) for loss, records in runs.items()}
    # Same seeds: the same first rollouts (before the losses make the policies differ).
    assert first["fiberpo"]["reward"] == first["grpo"]["reward"]
    assert first["fiberpo"]["response_length"] == first["grpo"]["response_length"]
    assert json.loads((tmp_path / "compare.json").read_text()).keys() == {"fiberpo", "grpo"}


def test_resume_inside_a_rollout_batch_under_the_curriculum(tmp_path, tiny_init):
    """Stopped after step 3 (inside the second rollout batch) and resumed: step 4 updates on the saved batch and
    step 5 draws the unbroken run's curriculum prompts; every logged number and the final weights are the same."""
    from megajoy.ckpt.native import load_model_dir
    from megajoy.train.checkpoint import latest_checkpoint

    flags = ("--train-iters", "6", "--eval-interval", "6", "--curriculum", "--curriculum-rollouts", "2")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(rl_args(tiny_init, one, *flags)) == 0
    assert main(rl_args(tiny_init, two, *flags, "--exit-interval", "3")) == 0
    assert len(json.loads((two / "checkpoints" / "iter_0000003" / "trainer_state.json").read_text())
               ["rollout"]["rows"][0]) == 16  # 4 prompts x 4 rollouts
    assert main(rl_args(tiny_init, two, *flags, "--resume")) == 0
    steps = [{r["step"]: r for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r} for out in (one, two)]
    assert sorted(steps[0]) == sorted(steps[1]) == [1, 2, 3, 4, 5, 6]
    assert abs(steps[0][4]["importance_ratio"] - 1) > 1e-6  # a second update of its batch
    for step, record in steps[0].items():
        timed = {"tokens_per_s", "tflops_per_gpu"}  # the clock's, not the run's
        assert record.keys() - timed == steps[1][step].keys() - timed
        for key in record.keys() - timed:
            assert record[key] == steps[1][step][key], (step, key)
    weights = [load_model_dir(latest_checkpoint(str(out)))[1] for out in (one, two)]
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name


@pytest.mark.parametrize("chunk", [0, 8])
def test_the_update_trains_the_policy_at_the_sampling_temperature(chunk):
    """With loss_temperature T (RL sets its --temperature), the per-token loss the rollout log-probabilities and
    the update read is -log softmax(logits / T) at the label, and its gradients those of that expression, on
    the plain and the chunked (fused head) cross-entropy; the entropy the rollouts report is the tempered
    policy's (torch.distributions). Before, both were taken at temperature 1 whatever the sampling one."""
    from helpers import random_model, rel_err, small_config
    from megajoy.kernels.backend import kernel_settings
    from megajoy.model.generate import SamplingParams, sample_step

    model = random_model(small_config(initializer_range=0.2), seed=3).train()
    ids, labels = torch.randint(0, 256, (2, 12)), torch.randint(0, 256, (2, 12))
    logits = model(ids, compute_mtp=False).logits
    want = -torch.log_softmax(logits / 0.6, -1).gather(-1, labels[..., None])[..., 0]
    want_grads = torch.autograd.grad(want.sum(), model.lm_head.weight)
    model.loss_temperature = 0.6
    with kernel_settings(cross_entropy_chunk=chunk):
        got = model(ids, labels=labels, compute_mtp=False).lm_token_loss
    got_grads = torch.autograd.grad(got.sum(), model.lm_head.weight)
    assert rel_err(got, want) < 1e-5 and rel_err(got_grads[0], want_grads[0]) < 1e-5
    _, entropy = sample_step(logits[:, -1], SamplingParams(temperature=0.6), torch.rand(2), with_entropy=True)
    reference = torch.distributions.Categorical(logits=logits[:, -1].detach() / 0.6).entropy()
    assert torch.allclose(entropy, reference, rtol=1e-5)


def test_rollouts_under_int4_weights_then_back_to_full_precision():
    from helpers import random_model, small_config
    from megajoy.config import QuantConfig
    from megajoy.stages.rl.stage import RlStage

    model = random_model(small_config(initializer_range=0.2), seed=1)
    ids = torch.randint(0, 256, (1, 16))
    full = model(ids, compute_mtp=False).logits
    stage = RlStage(argparse.Namespace(rollout_qat="int4", rollout_qat_modules="experts"))
    trainer = SimpleNamespace(model=model, job=SimpleNamespace(quant=QuantConfig(qat_group=32)))
    with stage._rollout_weights(trainer):
        quantised = model(ids, compute_mtp=False).logits
        assert all(m.weight_quant is not None for n, m in model.named_modules() if n.endswith("mlp.experts"))
    assert (quantised - full).abs().max() > 1e-4
    assert all(m.weight_quant is None for n, m in model.named_modules() if hasattr(m, "weight_quant"))
    assert torch.equal(model(ids, compute_mtp=False).logits, full)


def test_rollouts_decode_in_the_runs_precision():
    """Rollouts decode under the trainer's compute precision (bf16 autocast with --bf16): the entropies
    of a rollout are those of generating under bf16 autocast, not fp32's."""
    import contextlib

    from helpers import random_model, small_config
    from megajoy.kernels.backend import bf16_autocast
    from megajoy.model.generate import SamplingParams, generate
    from megajoy.stages.rl.stage import RlStage

    model = random_model(small_config(initializer_range=0.2), seed=1)
    prompts = [SimpleNamespace(ids=[5, 9, 2, 7]), SimpleNamespace(ids=[3, 3, 8])]

    stage = RlStage(argparse.Namespace(rollout_qat=None, max_new_tokens=6, temperature=1.0))
    stage.eos = 1
    trainer = SimpleNamespace(model=model, autocast=lambda: bf16_autocast("cpu"))  # Trainer.autocast() with --bf16
    completions, entropies = stage._sample(trainer, prompts, 2, seed=4)

    def reference(precision):
        found = []
        with precision():
            out = generate(model, [p.ids for p in prompts for _ in range(2)], SamplingParams(6, 1.0, stop_token_ids=(1,),
                                                                                           seed=4), found)
        return out, found

    assert (completions, entropies) == reference(trainer.autocast)
    assert entropies != reference(contextlib.nullcontext)[1]


def test_rl_under_data_parallelism(tmp_path, tiny_init, capfd):
    """Each rank rolls out its share of the prompts; the step's statistics cover both ranks. With bf16
    weights over ZeRO-1's shards, the int4 rollouts quantise the values the experts keep for it."""
    from megajoy.parallel.spawn import cli_worker, run_workers

    run_workers(2, cli_worker, rl_args(tiny_init, tmp_path, "--dp", "2", "--train-iters", "2", "--eval-interval", "2",
                                       "--bf16", "--params-dtype", "bf16", "--use-distributed-optimizer",
                                       "--rollout-qat", "int4", "--qat-group", "32"))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2 and steps[0]["importance_ratio"] == pytest.approx(1, abs=1e-5)
    assert [r["step"] for r in records if "val_accuracy" in r] == [0, 2]
    capfd.readouterr()
    with pytest.raises(AssertionError, match="megajoy exited with 2"):
        run_workers(2, cli_worker, rl_args(tiny_init, tmp_path / "odd", "--dp", "2", "--prompts-per-step", "3",
                                           "--micro-batch-size", "2"))
    assert "--prompts-per-step 3 is not divisible by the 2 data-parallel ranks" in capfd.readouterr().err


def _assert_same_run(got_dir, want_dir, steps):
    """The same rollouts (rewards, lengths, entropies) and updates (ratios, losses, gradient norms) as the
    one-process run, to float rounding, with rewards that are neither all 0 nor all 1."""
    got, want = ([json.loads(line) for line in open(d / "metrics.jsonl")] for d in (got_dir, want_dir))
    assert [r["step"] for r in got] == [r["step"] for r in want] == steps
    assert all(0 < r["reward"] < 1 and r["grad_norm"] > 0.1 for r in want if "reward" in r)
    for g, w in zip(got, want):
        for key in ("reward", "response_length", "val_accuracy"):
            assert g.get(key) == w.get(key), key
        for key in ("entropy", "importance_ratio", "loss", "grad_norm"):
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), key


def test_rl_under_expert_and_data_parallelism_is_the_one_process_run(tmp_path, warm_init):
    """Two data-parallel ranks, each with half the experts, roll out their shares of the step's prompts
    (decoding in lockstep, sampling keyed by a completion's place in the step's set), score and update as
    one process does with the same seeds. Neither the held-out evaluation (three prompts: two on rank 0,
    one on rank 1) nor the curriculum's pass rates (61 training prompts two at a time: 16 generation
    batches on rank 0, the last of them empty on rank 1) leaves a rank waiting for an all-to-all that
    never comes."""
    from megajoy.parallel.spawn import cli_worker, run_workers

    common = ("--train-iters", "2", "--eval-interval", "2", "--valid-prompts", "3", "--curriculum",
              "--curriculum-rollouts", "32")
    assert main(warm_rl_args(warm_init, tmp_path / "one", *common)) == 0
    run_workers(2, cli_worker, warm_rl_args(warm_init, tmp_path / "ep", *common, "--dp", "2", "--ep", "2"),
                timeout=180)
    _assert_same_run(tmp_path / "ep", tmp_path / "one", [0, 1, 2, 2])


def test_rl_under_tensor_parallelism_is_the_one_process_run(tmp_path, warm_init):
    """A tensor-parallel pair with sequence parallelism (off while decoding) rolls out, scores and updates
    as one process does with the same seeds. Rows are padded to a multiple of the two ranks."""
    from megajoy.parallel.spawn import cli_worker, run_workers

    common = ("--train-iters", "2", "--eval-interval", "2", "--valid-prompts", "3")
    assert main(warm_rl_args(warm_init, tmp_path / "one", *common)) == 0
    run_workers(2, cli_worker, warm_rl_args(warm_init, tmp_path / "tp", *common, "--tp", "2", "--sequence-parallel"),
                timeout=180)
    _assert_same_run(tmp_path / "tp", tmp_path / "one", [0, 1, 2, 2])


def test_rl_under_pipeline_parallelism_is_the_one_process_run(tmp_path, warm_init):
    """Two pipeline stages decode the rollouts together (the last samples, and sends the tokens back) and
    take their log-probabilities and updates through the pipeline schedule, as one process does: four
    rollout batches, each with rows as long as its longest trajectory."""
    from megajoy.parallel.spawn import cli_worker, run_workers

    common = ("--train-iters", "4", "--updates-per-batch", "1", "--eval-interval", "4", "--valid-prompts", "3")
    assert main(warm_rl_args(warm_init, tmp_path / "one", *common)) == 0
    run_workers(2, cli_worker, warm_rl_args(warm_init, tmp_path / "pp", *common, "--pp", "2"), timeout=180)
    _assert_same_run(tmp_path / "pp", tmp_path / "one", [0, 1, 2, 3, 4, 4])


def test_resume_inside_a_rollout_batch_under_the_zero_bubble_schedule(tmp_path, tiny_init):
    """ZB-V puts the last stage (which alone holds the rollout log-probabilities) on pipeline rank 0, not PP - 1:
    a run stopped inside a rollout batch and resumed updates on the saved batch as the unbroken run does (before,
    rank PP - 1 saved its zeros, and the resumed update saw ratios of about exp(log p) instead of 1)."""
    from megajoy.parallel.spawn import cli_worker, run_workers

    flags = ("--pp", "2", "--pp-schedule", "zero-bubble", "--pp-layout", "1", "0", "1", "0", "--valid-prompts", "2")
    one, two = tmp_path / "one", tmp_path / "two"
    run_workers(2, cli_worker, rl_args(tiny_init, one, *flags), timeout=180)
    run_workers(2, cli_worker, rl_args(tiny_init, two, *flags, "--exit-interval", "3"), timeout=180)
    run_workers(2, cli_worker, rl_args(tiny_init, two, *flags, "--resume"), timeout=180)
    steps = [{r["step"]: r for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r} for out in (one, two)]
    assert steps[0][4]["importance_ratio"] != 1  # a second update of its batch
    for key in ("importance_ratio", "loss", "grad_norm", "entropy"):
        assert steps[1][4][key] == pytest.approx(steps[0][4][key], rel=1e-6, abs=1e-7), key


def test_first_update_sees_ratio_one_under_bf16_autocast(tmp_path, tiny_init):
    """The rollout log-probabilities are taken with the update's own numerics (autocast included)."""
    assert main(rl_args(tiny_init, tmp_path, "--bf16", "--train-iters", "1", "--eval-interval", "100")) == 0
    (step,) = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"loss"' in line]
    assert step["importance_ratio"] == pytest.approx(1, abs=1e-6) and step["mean_abs_u"] == pytest.approx(0, abs=1e-6)


def test_bad_sampling_settings_are_refused(tmp_path, tiny_init, capsys):
    assert main(rl_args(tiny_init, tmp_path, "--rollouts-per-prompt", "1")) == 2
    assert "--rollouts-per-prompt must be at least 2" in capsys.readouterr().err
    assert main(rl_args(tiny_init, tmp_path, "--temperature", "0")) == 2
    assert "--temperature must be > 0 (rollouts are sampled), got 0.0" in capsys.readouterr().err
    assert main(["generate", "--ckpt", str(tiny_init), "--prompt", "x", "--temperature", "1", "--top-p", "0"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
    assert main(["generate", "--ckpt", str(tiny_init), "--prompt", "x", "--mtp-draft", "-1"]) == 2


@pytest.mark.parametrize("flag, value", [("--updates-per-batch", "0"), ("--max-new-tokens", "0"),
                                         ("--curriculum-rollouts", "0"), ("--valid-prompts", "-1")])
def test_rl_counts_out_of_range_are_refused(flag, value):
    """Zero updates per batch or curriculum rollouts divided by zero, zero new tokens trained on empty
    completions, a negative held-out count held out all but one prompt."""
    from megajoy.stages.rl import stage as rl

    parser = argparse.ArgumentParser()
    rl.add_arguments(parser)
    with pytest.raises(ValueError, match=f"{flag} must be at least {0 if flag == '--valid-prompts' else 1}, "
                                         f"got {value}"):
        rl.build_job(parser.parse_args([flag, value]))


@pytest.mark.parametrize("flag, value", [("--fiber-epsilon", "-0.05"), ("--fiber-c-plus", "0"),
                                         ("--fiber-c-minus", "nan"), ("--clip-epsilon", "-0.2"),
                                         ("--gspo-epsilon-low", "-0.0003"), ("--gspo-epsilon-high", "0")])
def test_rl_clip_budgets_out_of_range_are_refused(flag, value):
    """A clip or budget <= 0 turned the policy loss into a constant without an error: FiberPO's fiber factor
    with epsilon -0.05 is clamp(x, 0.05, -0.05) = -0.05 for every term, so r_fiber = 1 for every token,
    and GRPO with epsilon -0.2 clipped every ratio to 0.8."""
    from megajoy.stages.rl import stage as rl

    log_ratio, mask = torch.tensor([[0.3, -0.02, 0.01]]), torch.ones(1, 3)
    assert torch.equal(fiber_terms(log_ratio, mask, 0.12, 0.08, -0.05).r_fiber, torch.ones(1, 3))
    parser = argparse.ArgumentParser()
    rl.add_arguments(parser)
    with pytest.raises(ValueError, match=f"{flag} must be > 0, got {float(value)}"):
        rl.build_job(parser.parse_args([flag, value]))


def test_fewer_training_prompts_than_a_step_draws_are_named(tmp_path, tiny_init, capsys):
    """Without the curriculum a step draws --prompts-per-step distinct prompts: fewer is refused by count at
    start-up (it was Python's "Sample larger than population" from the first rollout)."""
    data = tmp_path / "p.jsonl"
    write_jsonl(str(data), [{"prompt": f"{i} + 1?", "answer": str(i + 1)} for i in range(5)])
    assert main(rl_args(tiny_init, tmp_path / "out", "--data", str(data), "--prompts-per-step", "8")) == 2
    assert f"{data}: 4 training prompts (1 held out), fewer than --prompts-per-step 8" in capsys.readouterr().err
