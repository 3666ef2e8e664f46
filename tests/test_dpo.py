"""DPO: the loss, rewards and gradients against TRL's DPOTrainer on fixed log-probabilities; preference
data (formats, the response-only mask, pairs side by side in packed rows, bad input); `megajoy dpo`
end to end with both reference modes; parallel layouts equal the single process."""

import argparse
import json
import math
import random
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from helpers import init_tiny_checkpoint
from megajoy.cli import main
from megajoy.data.demo import write_jsonl
from megajoy.data.packing import stack
from megajoy.data.preference import load_pairs, pack_pairs, tokenize_pair
from megajoy.data.sft import ChatTokenizer, Sample
from megajoy.stages.dpo import DpoStage

EOS = "<｜end▁of▁sentence｜>"


# ---------------------------------------------------------------------------------------- the loss

def random_pairs(n: int, seed: int) -> list:
    """Pairs of token sequences: an untrained prompt then a trained response, of random lengths."""
    from megajoy.data.preference import Pair

    rng = random.Random(seed)

    def side(prompt: int) -> Sample:
        response = rng.randint(1, 9)
        return Sample([5] * (prompt + response), [False] * prompt + [True] * response)

    pairs = []
    for _ in range(n):
        prompt = rng.randint(2, 6)
        pairs.append(Pair(side(prompt), side(prompt), {}))
    return pairs


def scored_pieces(rows, values):
    """Per (row, document), the values at that document's scored positions, in order."""
    pieces = {}
    for b, row in enumerate(rows):
        mask, docs = row.loss_mask[0].bool(), row.document_ids[0]
        for d in docs[mask].unique().tolist():
            pieces[(b, d)] = values[b][0][mask & (docs == d)]
    return pieces


def trl_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_types, loss_weights, label_smoothing=0.0):
    """TRL's DPOTrainer._compute_loss on given per-token log-probabilities (lists of 1-D tensors, one
    per response, which may require grad), with precomputed reference sums. The "model" it calls
    returns those log-probabilities; everything after is TRL's own code. Returns (loss, metrics)."""
    from accelerate import Accelerator
    from trl import DPOTrainer

    sequences = chosen + rejected
    width = max(len(s) for s in sequences)
    log_probs = torch.stack([torch.cat([s, s.new_zeros(width - len(s))]) for s in sequences])
    completion = torch.zeros(len(sequences), width + 1, dtype=torch.long)
    for i, s in enumerate(sequences):
        completion[i, 1:1 + len(s)] = 1
    outputs = SimpleNamespace(log_probs=log_probs, entropy=torch.zeros(log_probs.shape),
                              mean_logits=torch.zeros(log_probs.shape), is_top1=torch.zeros(log_probs.shape, dtype=torch.bool))
    trainer = SimpleNamespace(
        beta=beta, loss_types=loss_types, loss_weights=loss_weights, label_smoothing=label_smoothing,
        f_divergence_type="reverse_kl", ld_alpha=None, precompute_ref_logps=True, aux_loss_enabled=False,
        use_weighting=False, accelerator=Accelerator(cpu=True), model=SimpleNamespace(training=True),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(completion), "attention_mask": torch.ones_like(completion),
              "completion_mask": completion, "ref_chosen_logps": torch.stack(ref_chosen),
              "ref_rejected_logps": torch.stack(ref_rejected)}
    loss = DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


LOSS_CASES = [(0.1, 0.0, 0.0, "sigmoid"), (0.5, 0.3, 0.0, "sigmoid"), (0.2, 0.0, 0.2, "sigmoid"),
              (0.1, 0.0, 0.0, "hinge"), (0.5, 0.0, 0.0, "ipo"), (0.1, 0.2, 0.1, "robust"),
              (0.1, 0.0, 0.1, "exo_pair"), (0.5, 0.0, 0.0, "sigmoid_norm"), (0.1, 0.0, 0.0, "nca_pair"),
              (0.1, 0.0, 0.0, "bco_pair"), (0.5, 0.0, 0.0, "sppo_hard"), (0.1, 0.0, 0.0, "apo_zero"),
              (0.1, 0.0, 0.0, "apo_down")]


@pytest.mark.parametrize("beta, sft_weight, label_smoothing, loss_type", LOSS_CASES,
                         ids=[f"{c[3]}-{i}" for i, c in enumerate(LOSS_CASES)])
def test_loss_rewards_and_gradients_match_trl(beta, sft_weight, label_smoothing, loss_type):
    torch.manual_seed(0)
    rows = pack_pairs(random_pairs(13, seed=1), 40, pad_id=0)
    assert len(rows) > 1
    batch = stack(rows)
    logps = (-3 * torch.rand(batch.input_ids.shape)).requires_grad_()
    batch.ref_logps = -3 * torch.rand(batch.input_ids.shape)
    stage = DpoStage(argparse.Namespace(beta=beta, label_smoothing=label_smoothing, sft_weight=sft_weight,
                                        loss_type=loss_type))
    counts = stage.token_counts(None, batch)
    assert counts["pairs"] == 13
    loss, parts = stage.objective(None, SimpleNamespace(lm_token_loss=-logps), counts, batch)
    loss.backward()

    ours = scored_pieces(rows, logps.detach().split(1))
    refs = scored_pieces(rows, batch.ref_logps.split(1))
    pairs = sorted({(b, d // 2) for b, d in ours})
    assert len(pairs) == 13
    leaf = {key: ours[key].clone().requires_grad_() for key in ours}
    chosen, rejected = [leaf[(b, 2 * k)] for b, k in pairs], [leaf[(b, 2 * k + 1)] for b, k in pairs]
    ref_chosen = [refs[(b, 2 * k)].sum() for b, k in pairs]
    ref_rejected = [refs[(b, 2 * k + 1)].sum() for b, k in pairs]
    if label_smoothing and loss_type == "sigmoid":
        # TRL's smoothed sigmoid is its "aot" loss, which sorts the batch's log-ratios: for one pair at
        # a time that is the conservative DPO loss; the batch loss is the mean over pairs.
        results = [trl_loss([c], [r], [rc], [rr], beta, ["aot"], [1.0], label_smoothing)
                   for c, r, rc, rr in zip(chosen, rejected, ref_chosen, ref_rejected)]
        reference = torch.stack([loss for loss, _ in results]).mean()
        metrics = {key: sum(m[key] for _, m in results) / len(results) for key in results[0][1]}
    else:
        loss_types, weights = ([loss_type, "sft"], [1.0, sft_weight]) if sft_weight else ([loss_type], [1.0])
        reference, metrics = trl_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_types, weights,
                                      label_smoothing)
    reference.backward()

    assert abs(loss.item() - reference.item()) < 1e-6
    if sft_weight:
        sft_reference = -torch.cat(chosen).mean()
        assert abs(parts["sft_loss"].item() - sft_reference.item()) < 1e-6
        assert abs(parts["loss"].item() - (reference - sft_weight * sft_reference).item()) < 1e-6
    for ours_key, trl_key in (("chosen_reward", "rewards/chosen"), ("rejected_reward", "rewards/rejected"),
                              ("reward_margin", "rewards/margins"), ("reward_accuracy", "rewards/accuracies")):
        assert abs(parts[ours_key].item() - metrics[trl_key]) < 1e-6, ours_key
    assert 0 < parts["reward_accuracy"] < 1
    grads = scored_pieces(rows, logps.grad.split(1))
    worst = max((grads[key] - leaf[key].grad).abs().max().item() for key in leaf)
    largest = max(g.abs().max().item() for g in grads.values())
    # fp32 rounding; sppo_hard's gradient is linear in the summed log-ratios, so their rounding (summed in
    # another order than TRL's) shows in it directly
    tolerance = 1e-6 if loss_type == "sppo_hard" else 1e-7
    assert worst < tolerance * max(1.0, largest) and largest > 1e-3
    unscored = logps.grad[batch.loss_mask == 0]
    assert unscored.abs().max() == 0


def test_loss_is_log_2_when_the_policy_is_the_reference():
    rows = pack_pairs(random_pairs(5, seed=2), 64, pad_id=0)
    batch = stack(rows)
    batch.ref_logps = -torch.rand(batch.input_ids.shape)
    stage = DpoStage(argparse.Namespace(beta=0.1, label_smoothing=0.0, sft_weight=0.0, loss_type="sigmoid"))
    loss, parts = stage.objective(None, SimpleNamespace(lm_token_loss=-batch.ref_logps),
                                  stage.token_counts(None, batch), batch)
    assert abs(loss.item() - math.log(2)) < 1e-6
    assert parts["reward_accuracy"] == 0 and parts["chosen_reward"] == 0 and parts["reward_margin"] == 0


# ---------------------------------------------------------------------------------------- the data

def test_pair_formats_share_the_prompt_and_score_only_the_response(tokenizer_file):
    tokenizer = ChatTokenizer(tokenizer_file, 320)
    as_strings = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}
    as_messages = {"messages": [{"role": "user", "content": "What is 2 + 2?"}],
                   "chosen": {"role": "assistant", "content": "4"},
                   "rejected": [{"role": "assistant", "content": "5"}]}
    a, b = tokenize_pair(as_strings, tokenizer), tokenize_pair(as_messages, tokenizer)
    assert (a.chosen.ids, a.rejected.ids) == (b.chosen.ids, b.rejected.ids)
    for side, answer in ((a.chosen, "4"), (a.rejected, "5")):
        trained = [i for i, t in zip(side.ids, side.trained) if t]
        assert tokenizer.decode(trained) == answer + EOS
        assert tokenizer.decode(side.ids).endswith("<｜User｜>What is 2 + 2?<｜Assistant｜></think>" + answer + EOS)
    # A multi-turn prompt: its earlier assistant answer is context, not scored.
    history = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                            {"role": "user", "content": "bye"}], "chosen": "see you", "rejected": "no"}
    pair = tokenize_pair(history, tokenizer)
    assert tokenizer.decode([i for i, t in zip(pair.chosen.ids, pair.chosen.trained) if t]) == "see you" + EOS
    # Thinking: a response with reasoning puts both sides in the thinking form.
    thinking = dict(as_strings, chosen={"role": "assistant", "content": "4", "reasoning_content": "2 and 2"})
    pair = tokenize_pair(thinking, tokenizer)
    assert tokenizer.decode([i for i, t in zip(pair.chosen.ids, pair.chosen.trained) if t]) == "2 and 2</think>4" + EOS
    assert tokenizer.decode(pair.rejected.ids).endswith("<｜Assistant｜><think></think>5" + EOS)


def test_trl_implicit_prompt_pairs_split_as_trl_splits_them(tokenizer_file, tmp_path):
    """TRL's implicit-prompt form (whole conversations as chosen and rejected) tokenizes as the explicit pair
    TRL's own extract_prompt makes of it: the shared turns are the prompt, only the last answers scored.
    Before, every such line was dropped as malformed."""
    from trl import extract_prompt

    from megajoy.stages.dpo import chosen_conversation

    tokenizer = ChatTokenizer(tokenizer_file, 320)
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "bye"}]
    implicit = {"chosen": turns + [{"role": "assistant", "content": "see you"}],
                "rejected": turns + [{"role": "assistant", "content": "no"}], "answer": "see you"}
    pair, reference = tokenize_pair(implicit, tokenizer), tokenize_pair(extract_prompt(implicit), tokenizer)
    assert (pair.chosen.ids, pair.rejected.ids) == (reference.chosen.ids, reference.rejected.ids)
    assert (pair.chosen.trained, pair.rejected.trained) == (reference.chosen.trained, reference.rejected.trained)
    assert tokenizer.decode([i for i, t in zip(pair.chosen.ids, pair.chosen.trained) if t]) == "see you" + EOS
    assert chosen_conversation(pair.source)["messages"] == implicit["chosen"]  # held-out exact match's conversation
    write_jsonl(str(tmp_path / "pairs.jsonl"), [implicit])
    pairs, report = load_pairs(str(tmp_path / "pairs.jsonl"), tokenizer, 256)
    assert report.kept == 1 and pairs[0].chosen.ids == reference.chosen.ids


def test_a_cut_implicit_prompt_pair_keeps_its_split_prompt(tokenizer_file, tmp_path):
    """An overlong pair in TRL's implicit-prompt form, cut to fit the row, still holds the prompt split from
    it: before, the cut pair kept the line as given (no "prompt"), and the held-out exact match's conversation
    of it raised ConversationError, stopping `megajoy dpo` at setup."""
    from megajoy.stages.dpo import chosen_conversation

    tokenizer = ChatTokenizer(tokenizer_file, 320)
    user = [{"role": "user", "content": "hi"}]
    implicit = {"chosen": user + [{"role": "assistant", "content": "the dog " * 30}],
                "rejected": user + [{"role": "assistant", "content": "no"}]}
    write_jsonl(str(tmp_path / "pairs.jsonl"), [implicit])
    pairs, report = load_pairs(str(tmp_path / "pairs.jsonl"), tokenizer, 60, "truncate")
    assert report.kept == 1 and report.truncated == 1
    assert chosen_conversation(pairs[0].source)["messages"] == implicit["chosen"]
    assert pairs[0].source["prompt"] == user


def test_pairs_sit_side_by_side_in_packed_rows(tokenizer_file):
    tokenizer = ChatTokenizer(tokenizer_file, 320)
    pairs = [tokenize_pair({"prompt": f"say {w}", "chosen": w, "rejected": w[::-1]}, tokenizer)
             for w in ("cat", "dog", "bird", "tree", "lamp")]
    rows = pack_pairs(pairs, 48, tokenizer.pad_id)
    seen = []
    for row in rows:
        docs, mask = row.document_ids[0], row.loss_mask[0].bool()
        for d in range(0, int(docs.max()), 2):
            chosen = tokenizer.decode(row.labels[0][mask & (docs == d)].tolist())
            rejected = tokenizer.decode(row.labels[0][mask & (docs == d + 1)].tolist())
            assert chosen[:-len(EOS)][::-1] + EOS == rejected
            seen.append(chosen[:-len(EOS)])
    assert sorted(seen) == ["bird", "cat", "dog", "lamp", "tree"]
    assert all(row.input_ids.shape == (1, 48) for row in rows)


def test_bad_pairs_are_counted_and_reported(tmp_path, tokenizer_file):
    good = {"prompt": "hi", "chosen": "hello", "rejected": "go"}
    lines = [good, {"prompt": "hi", "chosen": "hello"}, {"chosen": "a", "rejected": "b"},
             {"messages": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"},
             {"prompt": "the cat " * 30, "chosen": "yes", "rejected": "no"},
             {"prompt": "hi", "chosen": "the dog " * 30, "rejected": "no"}, good]
    path = tmp_path / "pairs.jsonl"
    write_jsonl(str(path), lines)
    tokenizer = ChatTokenizer(tokenizer_file, 320)
    pairs, report = load_pairs(str(path), tokenizer, 60, "truncate")
    assert report.kept == 3 and report.truncated == 1 and len(pairs) == 3
    assert dict(report.dropped) == {"malformed": 2, "unknown_role": 1, "too_long": 1}
    assert report.first_lines == {"malformed": 2, "unknown_role": 4, "too_long": 5}
    assert len(pairs[1].chosen.ids) == 30 and pairs[1].length <= 60
    assert "3 pairs kept; 1 truncated" in report.summary(str(path))
    _, report = load_pairs(str(path), tokenizer, 60, "drop")
    assert report.kept == 2 and report.dropped["too_long"] == 2
    with open(path, "a") as f:
        f.write("{oops\n")
    with pytest.raises(ValueError, match=rf"{path}:8: malformed JSON"):
        load_pairs(str(path), tokenizer, 60)


def test_pairs_with_identical_responses_are_dropped_and_reported(tmp_path, tokenizer_file):
    """Chosen and rejected the same tokens (as given, or once cut to half a row): no preference to learn."""
    lines = [{"prompt": "hi", "chosen": "the dog", "rejected": "the dog"},
             {"prompt": "hi", "chosen": {"role": "assistant", "content": ""}, "rejected": ""},
             {"prompt": "hi", "chosen": "the dog " * 30 + "ran", "rejected": "the dog " * 30 + "sat"},
             {"prompt": "hi", "chosen": "the dog", "rejected": "the cat"}]
    path = tmp_path / "pairs.jsonl"
    write_jsonl(str(path), lines)
    tokenizer = ChatTokenizer(tokenizer_file, 320)
    pairs, report = load_pairs(str(path), tokenizer, 60, "truncate")
    assert report.kept == 1 and report.truncated == 0 and pairs[0].source == lines[3]
    assert dict(report.dropped) == {"identical_responses": 3} and report.first_lines == {"identical_responses": 1}
    assert "1 pairs kept; 3 dropped: identical responses (first at line 1)" in report.summary(str(path))


def test_a_null_field_is_an_absent_one(tmp_path, tokenizer_file):
    """As `datasets` exports a file mixing the two prompt forms: the null one is ignored."""
    lines = [{"prompt": "What is 2 + 2?", "messages": None, "chosen": "4", "rejected": "5"},
             {"prompt": None, "messages": [{"role": "user", "content": "What is 2 + 2?"}], "chosen": "4",
              "rejected": "5"}]
    path = tmp_path / "pairs.jsonl"
    write_jsonl(str(path), lines)
    tokenizer = ChatTokenizer(tokenizer_file, 320)
    pairs, report = load_pairs(str(path), tokenizer, 60)
    assert report.kept == 2 and not report.dropped
    reference = tokenize_pair({"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}, tokenizer)
    assert all(p.chosen.ids == reference.chosen.ids and p.rejected.ids == reference.rejected.ids for p in pairs)


# ---------------------------------------------------------------------------------------- end to end

def test_loss_settings_that_train_nothing_or_backwards_are_refused(tmp_path, capsys):
    for flags, message in ((("--beta", "0"), "--beta must be > 0 (0 trains nothing, below 0 the rejected "
                                             "response), got 0.0"),
                           (("--beta", "-0.1"), "--beta must be > 0"),
                           (("--sft-weight", "-1"), "--sft-weight must be >= 0, got -1.0"),
                           (("--label-smoothing", "0.5"), "--label-smoothing must be in [0, 0.5), got 0.5"),
                           (("--loss-type", "ipo", "--label-smoothing", "0.1"),
                            "--label-smoothing applies to --loss-type sigmoid, robust, exo_pair, not ipo"),
                           (("--loss-type", "exo_pair"), "--loss-type exo_pair needs --label-smoothing > 0")):
        assert main(dpo_args(tmp_path / "init", tmp_path / "out", *flags)) == 2
        assert message in capsys.readouterr().err


def dpo_args(init, out, *extra):
    return ["dpo", "--init", str(init), "--out", str(out), "--train-iters", "12", "--seq-length", "128",
            "--global-batch-size", "4", "--micro-batch-size", "1", "--demo-pairs", "300", "--valid-pairs", "24",
            "--eval-interval", "6", "--log-interval", "1", "--exact-match-samples", "0", "--lr", "1e-3",
            *extra]


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory, tokenizer_file):
    out = tmp_path_factory.mktemp("dpo_init")
    init_tiny_checkpoint(out, tokenizer_file)
    return out


def records(out) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny_init):
    out = tmp_path_factory.mktemp("dpo_single")
    assert main(dpo_args(tiny_init, out, "--sft-weight", "0.1")) == 0
    return out


def test_dpo_end_to_end(single_run):
    log = records(single_run)
    train = [r for r in log if "loss" in r]
    assert abs(train[0]["loss"] - math.log(2)) < 1e-5  # the first step's policy is the reference
    assert train[0]["reward_accuracy"] == 0 and train[-1]["reward_accuracy"] > 0.5
    assert train[-1]["loss"] < train[0]["loss"] and train[-1]["reward_margin"] > 0
    results = json.loads((single_run / "dpo_results.json").read_text())
    assert results["reference"] == "cached" and results["step"] == 12 and results["pairs"] > 250
    # Held out: the DPO loss falls below ln 2 and the margin opens (accuracy on 24 pairs is too coarse here).
    assert results["val_loss"] < math.log(2) - 0.01 and results["val_reward_margin"] > 0
    assert results["ranking_accuracy_before"] is not None


def test_frozen_reference_model_gives_the_cached_run(tmp_path, tiny_init, single_run):
    assert main(dpo_args(tiny_init, tmp_path, "--sft-weight", "0.1", "--reference", "model")) == 0
    for got, want in zip(records(tmp_path), records(single_run), strict=True):
        for key in ("loss", "sft_loss", "reward_margin", "val_loss", "grad_norm"):
            if key in want:
                assert abs(got[key] - want[key]) <= 1e-5 * abs(want[key]) + 1e-7, (key, got, want)


@pytest.mark.parametrize("world, flags", [(2, ["--dp", "2"]), (2, ["--tp", "2", "--sequence-parallel"]),
                                          (2, ["--pp", "2", "--reference", "model"]),
                                          (4, ["--pp", "2", "--ep", "2", "--use-distributed-optimizer"])],
                         ids=["dp2", "tp2_sp", "pp2_frozen_reference", "pp2_ep2_dp2_zero"])
def test_layouts_equal_the_single_process(world, flags, tmp_path, tiny_init, single_run):
    from megajoy.parallel.spawn import cli_worker, run_workers

    run_workers(world, cli_worker, dpo_args(tiny_init, tmp_path, "--sft-weight", "0.1", *flags))
    for got, want in zip(records(tmp_path), records(single_run), strict=True):
        for key in ("loss", "sft_loss", "reward_margin", "val_loss", "grad_norm"):
            if key in want:
                assert abs(got[key] - want[key]) <= 1e-5 * abs(want[key]) + 1e-7, (key, got, want)
