"""`megajoy pretrain`: exact resume, kill -9 during a save, SIGTERM, accumulation, ramp-up, MTP switch,
router bias, outputs, and the errors for bad input. Runs a model small enough for many short runs."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import TINY_MODEL_OVERRIDES, load_tool
from megajoy.ckpt.distributed import read_full_tensors
from megajoy.ckpt.native import load_model_dir
from megajoy.cli import main
from megajoy.train.checkpoint import latest_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args(out, data_prefix, tokenizer_file, iters=12, *extra):
    base = ["pretrain", "--data-path", data_prefix, "--tokenizer", tokenizer_file, "--seq-length", "32",
            "--global-batch-size", "4", "--micro-batch-size", "2", "--train-iters", str(iters), "--log-interval",
            "1", "--eval-interval", "5", "--eval-iters", "2", "--lr-warmup-iters", "2", "--mtp-start-iter", "3",
            "--lr", "3e-3", "--out", str(out)]
    return base + [a for o in TINY_MODEL_OVERRIDES for a in ("--set", o)] + list(extra)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_records(out):
    return {r["step"]: r for r in metrics(out) if "loss" in r}


def final_weights(out):
    return load_model_dir(latest_checkpoint(str(out)))[1]


def optimizer_state(path):
    """{name: {"exp_avg", "exp_avg_sq", "step"}} read whole from a checkpoint."""
    state = {}
    for key, tensor in read_full_tensors(path, "optim.").items():
        name, field = key.rsplit(".", 1)
        state.setdefault(name, {})[field] = tensor
    return state


def trainer_state(path):
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_is_bit_exact(tmp_path, data_prefix, tokenizer_file):
    """40 steps in one run equal 20 steps + resume + 20 steps, loss for loss, weight for weight."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(args(one, data_prefix, tokenizer_file, 40)) == 0
    assert main(args(two, data_prefix, tokenizer_file, 40, "--exit-interval", "20")) == 0
    assert os.path.basename(latest_checkpoint(str(two))) == "iter_0000020"
    assert main(args(two, data_prefix, tokenizer_file, 40, "--resume")) == 0
    a, b = train_records(one), train_records(two)
    assert sorted(a) == sorted(b) == list(range(1, 41))
    for step in a:
        for key in ("loss", "grad_norm", "lr"):
            assert a[step][key] == b[step][key], (step, key)
        if step > 3:
            assert a[step]["mtp_loss"] == b[step]["mtp_loss"]
    assert_same_weights(final_weights(one), final_weights(two))
    opt_a = optimizer_state(latest_checkpoint(str(one)))
    opt_b = optimizer_state(latest_checkpoint(str(two)))
    assert opt_a.keys() == final_weights(one).keys() - {"layers.1.mlp.gate.e_score_correction_bias"}
    for name, state in opt_a.items():
        assert torch.equal(state["exp_avg_sq"], opt_b[name]["exp_avg_sq"])
        assert state["step"] == opt_b[name]["step"] == (37 if name.startswith("mtp.") else 40)


def _wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _spawn(argv, log, **env):
    """The CLI in a child process whose output goes to `log`: an undrained pipe would fill and block it.
    Python's fault handler is on, so `_wait_exit` can show where a child that never exits is stuck."""
    with open(log, "wb") as output:
        return subprocess.Popen([sys.executable, "-m", "megajoy"] + argv, stdout=output, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONFAULTHANDLER": "1", **env}, cwd=ROOT)


def _wait_exit(proc, timeout, log) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # the fault handler prints every thread's stack to the log
        proc.wait(timeout=30)
        with open(log, errors="replace") as f:
            tail = f.read()[-6000:]
        raise AssertionError(f"the child did not exit within {timeout} s; its output ends:\n{tail}") from None


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, data_prefix, tokenizer_file):
    out, ref = tmp_path / "out", tmp_path / "ref"
    proc = _spawn(args(out, data_prefix, tokenizer_file, 20, "--save-interval", "5"), tmp_path / "child.log",
                  MEGAJOY_TEST_SAVE_PAUSE="2")
    ckpts = out / "checkpoints"
    try:
        _wait_for(lambda: (ckpts / "iter_0000005").is_dir() and any(
            p.startswith("iter_0000010.tmp-") for p in os.listdir(ckpts)), 120, "the second save to start")
        proc.send_signal(signal.SIGKILL)
        _wait_exit(proc, 30, tmp_path / "child.log")
    finally:
        proc.kill()
    assert not (ckpts / "iter_0000010").exists()
    assert os.path.basename(latest_checkpoint(str(out))) == "iter_0000005"
    # The previous checkpoint loads; resuming removes the partial save and finishes as if never killed.
    previous = latest_checkpoint(str(out))
    state = trainer_state(previous)
    assert state["step"] == 5 and state["consumed_samples"] == 20
    assert all(entry["step"] == (2 if name.startswith("mtp.") else 5)  # MTP switched on at step 3
               for name, entry in optimizer_state(previous).items())
    assert main(args(out, data_prefix, tokenizer_file, 20, "--save-interval", "5", "--resume")) == 0
    assert not [p for p in os.listdir(ckpts) if ".tmp-" in p]
    assert main(args(ref, data_prefix, tokenizer_file, 20)) == 0
    assert_same_weights(final_weights(out), final_weights(ref))
    a, b = train_records(out), train_records(ref)
    assert [a[s]["loss"] for s in range(1, 21)] == [b[s]["loss"] for s in range(1, 21)]


def test_sigterm_saves_and_exits_zero(tmp_path, data_prefix, tokenizer_file):
    out = tmp_path / "out"
    proc = _spawn(args(out, data_prefix, tokenizer_file, 100000, "--eval-interval", "100000"), tmp_path / "child.log")
    try:
        _wait_for(lambda: (out / "metrics.jsonl").exists() and len(train_records(out)) >= 3, 120, "three steps")
        proc.send_signal(signal.SIGTERM)
        assert _wait_exit(proc, 60, tmp_path / "child.log") == 0
    finally:
        proc.kill()
    last_logged = max(train_records(out))
    assert trainer_state(latest_checkpoint(str(out)))["step"] == last_logged >= 3


def test_a_sigterm_during_the_stop_vote_is_not_lost(monkeypatch):
    """A SIGTERM whose handler runs while the ranks vote on stopping (between reading the flag and
    storing the outcome) stops the run at the next vote: it is not overwritten by the vote's outcome."""
    from megajoy.config import load_job_config
    from megajoy.parallel.context import ParallelContext
    from megajoy.train import trainer as trainer_module

    trainer = trainer_module.Trainer.__new__(trainer_module.Trainer)  # only the vote's state
    trainer.device, trainer.pc = torch.device("cpu"), ParallelContext.single(torch.device("cpu"))
    trainer.sigterm_received = trainer.stop_requested = False
    trainer.job = load_job_config("tiny", None, [])

    def reduce_while_signalled(tensor, group, op):
        trainer._on_sigterm(signal.SIGTERM, None)
        return tensor

    monkeypatch.setattr(trainer_module, "all_reduce_no_grad", reduce_while_signalled)
    assert trainer._stop_agreed() is False  # the vote had read the flag before the signal
    assert trainer._stop_agreed() is True and trainer.stop_requested


def test_exit_duration_saves_and_stops_after_a_step(tmp_path, data_prefix, tokenizer_file, capsys):
    """--exit-duration-in-mins (Megatron's): past the limit the ranks agree to stop, save and exit 0 as on
    SIGTERM; a run always makes one step first, so a resumed one progresses whatever its start-up took.
    Here the limit (6 ms) has passed before the first step: each run does one step, then the last
    run, without the limit, goes on to the end, ending where an unbroken run ends."""
    out, ref = tmp_path / "out", tmp_path / "ref"
    limited = ["--exit-duration-in-mins", "0.0001", "--eval-iters", "0", "--log-interval", "1"]
    assert main(args(out, data_prefix, tokenizer_file, 4, *limited)) == 0
    assert "stopped after step 1 of 4 (SIGTERM, or past --exit-duration-in-mins)" in capsys.readouterr().err
    assert trainer_state(latest_checkpoint(str(out)))["step"] == 1
    assert main(args(out, data_prefix, tokenizer_file, 4, *limited, "--resume")) == 0
    assert trainer_state(latest_checkpoint(str(out)))["step"] == 2
    assert "stopped after step 2 of 4" in capsys.readouterr().err
    assert main(args(out, data_prefix, tokenizer_file, 4, "--eval-iters", "0", "--log-interval", "1", "--resume")) == 0
    assert "stopped after" not in capsys.readouterr().err
    assert main(args(ref, data_prefix, tokenizer_file, 4, "--eval-iters", "0", "--log-interval", "1")) == 0
    assert sorted(train_records(out)) == [1, 2, 3, 4]
    assert [train_records(out)[s]["loss"] for s in range(1, 5)] == [train_records(ref)[s]["loss"] for s in range(1, 5)]
    assert_same_weights(final_weights(out), final_weights(ref))


def test_gradient_accumulation_equals_one_big_batch(tmp_path, data_prefix, tokenizer_file):
    big, small = tmp_path / "big", tmp_path / "small"
    assert main(args(big, data_prefix, tokenizer_file, 6, "--micro-batch-size", "4")) == 0
    assert main(args(small, data_prefix, tokenizer_file, 6, "--micro-batch-size", "1")) == 0
    a, b = train_records(big), train_records(small)
    for step in a:
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-5 * a[step]["loss"]
    wa, wb = final_weights(big), final_weights(small)
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=1e-4, atol=1e-6), name


def test_rampup_consumed_samples(tmp_path, data_prefix, tokenizer_file):
    out = tmp_path / "out"
    assert main(args(out, data_prefix, tokenizer_file, 8, "--global-batch-size", "6",
                     "--rampup-batch-size", "2", "2", "16")) == 0
    # batch 2 until 8 samples, 4 until 16, then 6: 2+2+2+2+4+4+6+6
    assert trainer_state(latest_checkpoint(str(out)))["consumed_samples"] == 28


def test_train_samples_run_steps_and_schedules_in_samples(tmp_path, data_prefix, tokenizer_file, capsys):
    """Megatron's sample-based flags: 33 samples hold the same 8 steps as above (one more batch of 6 would
    overflow), and the logged LRs follow warmup and cosine decay counted in samples."""
    out = tmp_path / "out"
    argv = args(out, data_prefix, tokenizer_file, 8, "--global-batch-size", "6", "--rampup-batch-size", "2", "2",
                "16", "--train-samples", "33", "--lr-warmup-samples", "5", "--lr-decay-samples", "24",
                "--lr-decay-style", "cosine", "--min-lr", "3e-4")
    i = argv.index("--train-iters")
    assert main(argv[:i] + argv[i + 2:]) == 0
    assert trainer_state(latest_checkpoint(str(out)))["consumed_samples"] == 28
    starts = [0, 2, 4, 6, 8, 12, 16, 22]  # each step's first sample
    warmup = [3e-3 * min(s + b, 5) / 5 for s, b in zip(starts[:3], [2, 2, 2])]
    cosine = [3e-4 + 2.7e-3 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - 5) / 19))) for s in starts[3:]]
    records = sorted(train_records(out).values(), key=lambda r: r["step"])
    assert [record["lr"] for record in records] == pytest.approx(warmup + cosine, rel=1e-6)
    # Megatron's log line fields: samples consumed after the step, and the step's global batch
    assert [record["consumed_samples"] for record in records] == starts[1:] + [28]
    assert [record["global_batch_size"] for record in records] == [2, 2, 2, 2, 4, 4, 6, 6]
    assert main(argv) == 2
    assert "give --train-iters or --train-samples, not both" in capsys.readouterr().err


def test_outputs_mtp_switch_router_bias_and_learning(tmp_path, data_prefix, tokenizer_file):
    out = tmp_path / "out"
    assert main(args(out, data_prefix, tokenizer_file, 30, "--plot", "--save-interval", "10", "--keep-last", "2")) == 0
    records = train_records(out)
    assert all("mtp_loss" not in records[s] for s in (1, 2, 3)) and all("mtp_loss" in records[s] for s in (4, 30))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "expert_load_max_mean"):
        assert key in records[30]
    val = [r["val_loss"] for r in metrics(out) if "val_loss" in r]
    assert val[-1] < 0.8 * val[0]  # it learns the synthetic grammar
    assert os.path.getsize(out / "loss.png") > 1000
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tensorboard"))
    assert sorted(os.listdir(out / "checkpoints")) == ["iter_0000020", "iter_0000030", "latest"]
    ckpt = out / "checkpoints" / "iter_0000030"
    assert {".metadata", "__0_0.distcp", "config.yaml", "tokenizer.json", "rng.pt", "trainer_state.json",
            "checksums.json"} == set(os.listdir(ckpt))
    bias = final_weights(out)["layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.abs().max() > 0 and bias.dtype == torch.float32
    frozen = tmp_path / "frozen"
    assert main(args(frozen, data_prefix, tokenizer_file, 3, "--freeze-router-bias")) == 0
    assert final_weights(frozen)["layers.1.mlp.gate.e_score_correction_bias"].abs().max() == 0
    greedy = tmp_path / "greedy"  # picks experts without the bias: it stays zero, as the exports write it
    assert main(args(greedy, data_prefix, tokenizer_file, 3, "--set", "model.topk_method=greedy")) == 0
    assert final_weights(greedy)["layers.1.mlp.gate.e_score_correction_bias"].abs().max() == 0
    # The output directory converts directly (its latest checkpoint).
    tool = load_tool("convert_ckpt")
    assert tool.main(["--input", str(out), "--output", str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").exists()


def test_bad_input_errors(tmp_path, data_prefix, tokenizer_file, capsys):
    def run(*extra, prefix=data_prefix):
        code = main(args(tmp_path / "o", prefix, tokenizer_file, 2, *extra))
        return code, capsys.readouterr().err

    code, err = run(prefix=str(tmp_path / "missing_text_document"))
    assert code == 2 and "missing_text_document.idx does not exist" in err
    code, err = run("--set", "model.vocab_size=100")
    assert code == 2 and tokenizer_file in err and "more than the model's vocab_size=100" in err
    broken = tmp_path / "broken"
    for ext in (".bin", ".idx"):
        shutil.copy(data_prefix + ext, str(broken) + ext)
    with open(str(broken) + ".idx", "r+b") as f:
        f.write(b"garbage!!")
    code, err = run(prefix=str(broken))
    assert code == 2 and f"{broken}.idx: not a Megatron index file" in err
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    import numpy as np

    builder = IndexedDatasetBuilder(str(tmp_path / "big_ids.bin"), dtype=np.uint16)
    builder.add_document([5, 400, 1], [3])
    builder.finalize(str(tmp_path / "big_ids.idx"))
    code, err = run(prefix=str(tmp_path / "big_ids"))
    assert code == 2 and "big_ids.bin: token id 400" in err

    out = tmp_path / "o"
    shutil.rmtree(out, ignore_errors=True)
    assert main(args(out, data_prefix, tokenizer_file, 2)) == 0
    shards = os.path.join(latest_checkpoint(str(out)), "__0_0.distcp")
    flip_byte(shards, 100)
    code, err = run("--resume", "--train-iters", "4")
    assert code == 2 and f"{shards}: checksum mismatch" in err
    flip_byte(shards, 100)
    state_file = os.path.join(latest_checkpoint(str(out)), "trainer_state.json")
    os.remove(state_file)
    code, err = run("--resume", "--train-iters", "4")
    assert code == 2 and f"{state_file}: listed in checksums.json but missing" in err


def test_checkpoint_of_another_model_or_damaged_is_named(tmp_path, data_prefix, tokenizer_file, capsys):
    """--resume and --init name the checkpoint, the tensor and both shapes for another model's checkpoint; --init
    verifies checksums as --resume does; an unreadable checksums.json is named."""
    out = tmp_path / "o"
    assert main(args(out, data_prefix, tokenizer_file, 2)) == 0
    ckpt = latest_checkpoint(str(out))
    capsys.readouterr()

    def run(target, *extra):
        code = main(args(target, data_prefix, tokenizer_file, 2, *extra))
        return code, capsys.readouterr().err

    wider = ("--set", "model.hidden_size=64")
    expected = (f"{ckpt}: tensor 'embed_tokens.weight' has shape [320, 32] in the checkpoint; "
                "this model expects [320, 64]")
    for extra in (("--resume", *wider), ("--init", ckpt, *wider)):
        code, err = run(out if extra[0] == "--resume" else tmp_path / "init", *extra)
        assert code == 2 and expected in err, err[-2000:]
    shards = os.path.join(ckpt, "__0_0.distcp")
    flip_byte(shards, 100)
    code, err = run(tmp_path / "init", "--init", ckpt)
    assert code == 2 and f"{shards}: checksum mismatch" in err
    flip_byte(shards, 100)
    sums = os.path.join(ckpt, "checksums.json")
    with open(sums, "r+") as f:
        f.truncate(20)
    code, err = run(out, "--resume")
    assert code == 2 and f"{sums}: unreadable (" in err


@pytest.mark.parametrize("specials, eod_flag, bos, eos", [
    (["<unk>", "<|begin_of_text|>", "<|end_of_text|>"], ["--eod-token", "<|end_of_text|>"], 1, 2),  # Llama 3
    (["<unk>", "<pad>", "<|endoftext|>"], [], 2, 2)])  # GPT-2: <|endoftext|> is its BOS and EOS
def test_exports_end_text_with_the_tokenizers_end_of_document(tmp_path, specials, eod_flag, bos, eos):
    """A model pretrained on another tokenizer's data ends text with that data's end-of-document token: the
    Hugging Face export's config and generation config name it. Before, they kept DeepSeek's ids 0 and 1."""
    from helpers import byte_level_bpe, synthetic_documents, write_jsonl

    byte_level_bpe(synthetic_documents(200, seed=3), specials, tmp_path / "t.json", vocab_size=300)
    write_jsonl(tmp_path / "in.jsonl", synthetic_documents(300, seed=4))
    assert load_tool("preprocess_data").main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix",
                                              str(tmp_path / "d"), "--tokenizer", str(tmp_path / "t.json"),
                                              *eod_flag]) == 0
    out = tmp_path / "out"
    assert main(args(out, str(tmp_path / "d_text_document"), str(tmp_path / "t.json"), 1, *eod_flag)) == 0
    assert load_tool("convert_ckpt").main(["--input", str(out), "--output", str(tmp_path / "hf"), "--to", "hf"]) == 0
    for name in ("config.json", "generation_config.json"):
        with open(tmp_path / "hf" / name) as f:
            exported = json.load(f)
        assert (exported["bos_token_id"], exported["eos_token_id"]) == (bos, eos), name


def test_a_fresh_run_in_a_used_out_keeps_its_checkpoint(tmp_path, data_prefix, tokenizer_file):
    """A run started afresh where an earlier run saved later steps: --keep-last does not delete the checkpoint it
    just wrote, and `latest` names it (not the earlier run's)."""
    out = tmp_path / "o"
    assert main(args(out, data_prefix, tokenizer_file, 4, "--save-interval", "2")) == 0
    assert main(args(out, data_prefix, tokenizer_file, 1)) == 0
    assert sorted(os.listdir(out / "checkpoints")) == ["iter_0000001", "iter_0000002", "iter_0000004", "latest"]
    newest = latest_checkpoint(str(out))
    assert os.path.basename(newest) == "iter_0000001"
    assert trainer_state(newest) == {"consumed_samples": 4, "stage": "pretrain", "step": 1}


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_non_finite_gradient_stops_training_before_the_weights(tmp_path, data_prefix, tokenizer_file, capsys):
    """A step whose gradient norm is NaN or inf stops the run with an error (as Megatron-LM's
    check_for_nan_in_loss_and_grad does) before the optimizer step; the checkpoints saved before it stay
    finite and `latest` names the last of them. Before, training ran on with NaN weights and saved them."""
    out = tmp_path / "out"
    code = main(args(out, data_prefix, tokenizer_file, 4, "--lr", "1e30", "--lr-warmup-iters", "0", "--clip-grad",
                     "0", "--save-interval", "1"))
    err = capsys.readouterr().err
    assert code == 2
    failed = [r["step"] for r in metrics(out) if "loss" in r]
    bad_step = (failed[-1] if failed else 0) + 1
    assert f"megajoy pretrain: error: step {bad_step}: the gradient norm is " in err
    assert 1 < bad_step <= 4  # the first step's gradient is finite; the weights it makes are not usable
    assert trainer_state(latest_checkpoint(str(out)))["step"] == bad_step - 1
    assert all(torch.isfinite(t).all() for t in final_weights(out).values())


def tensorboard_scalars(out, tag):
    """{step: value} of `tag` as TensorBoard shows the run directory (earlier files' purged records hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)} if tag in events.Tags()["scalars"] else {}


def test_tensorboard_shows_what_metrics_jsonl_records(tmp_path, data_prefix, tokenizer_file):
    """After a resume, TensorBoard keeps the records of the checkpoint's own step (the resumed run starts after
    it); after a fresh run in a used output directory it shows none of the earlier run's. Before, the first
    lost the checkpoint step's loss and validation, the second mixed both runs' curves."""
    out = tmp_path / "out"

    def run(iters, *extra):
        assert main(args(out, data_prefix, tokenizer_file, iters, "--log-interval", "2", "--eval-interval", "2",
                         *extra)) == 0

    def assert_same_as_jsonl():
        for tag in ("loss", "val_loss"):
            want = {r["step"]: r[tag] for r in metrics(out) if tag in r}
            assert tensorboard_scalars(out, tag) == pytest.approx(want, rel=1e-6), tag

    run(4)
    run(6, "--resume")
    assert sorted(tensorboard_scalars(out, "loss")) == [2, 4, 6]
    assert_same_as_jsonl()
    run(2, "--seed", "7")
    assert sorted(tensorboard_scalars(out, "loss")) == [2]
    assert_same_as_jsonl()


def test_resume_drops_a_half_written_last_metrics_record(tmp_path, capsys):
    """A run killed while appending to metrics.jsonl leaves an unfinished last line: a resume drops it (and the
    records after its checkpoint) and goes on; an unreadable line elsewhere is named, and the file kept."""
    from megajoy.train.metrics import MetricsLog, read_metrics

    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "lo')
    MetricsLog(str(tmp_path), resume_step=2).write({"step": 3, "loss": 0.5})
    assert read_metrics(str(path)) == records[:2] + [{"step": 3, "loss": 0.5}]
    assert f"{path}:4: dropped an unfinished last record" in capsys.readouterr().err
    damaged = json.dumps(records[0]) + "\n{oops\n" + json.dumps(records[2]) + "\n"
    path.write_text(damaged)
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        MetricsLog(str(tmp_path), resume_step=2)
    assert path.read_text() == damaged


def test_logged_throughput_is_model_flops_over_the_peak(tmp_path, data_prefix, tokenizer_file):
    """TFLOP/s per device = tokens/s x the FLOPs per token `megajoy info` counts (the MTP head's from
    --mtp-start-iter on); MFU = that over --peak-tflops. No peak is known for a CPU, so no MFU without it."""
    from megajoy.config import load_job_config
    from megajoy.model.stats import measure, meta_model

    out, no_peak = tmp_path / "peak", tmp_path / "no_peak"
    assert main(args(out, data_prefix, tokenizer_file, 4, "--eval-iters", "0", "--peak-tflops", "0.5")) == 0
    assert main(args(no_peak, data_prefix, tokenizer_file, 1, "--eval-iters", "0")) == 0
    stats = measure(meta_model(load_job_config("tiny", None, TINY_MODEL_OVERRIDES).model), seq_length=32)
    records = train_records(out)
    for step, record in records.items():
        flops = stats.training_flops_per_token(with_mtp=step > 3)  # step 4 is the first at --mtp-start-iter 3
        assert record["tflops_per_gpu"] * 1e12 == pytest.approx(record["tokens_per_s"] * flops, rel=1e-9)
        assert record["mfu"] == pytest.approx(record["tflops_per_gpu"] / 0.5, rel=1e-12)
    assert "mfu" not in train_records(no_peak)[1] and train_records(no_peak)[1]["tflops_per_gpu"] > 0


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.4), ("NVIDIA H20", 148.0), ("NVIDIA GH200 480GB", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA L40S", 362.1), ("NVIDIA L4", 121.0), ("NVIDIA B200", 2250.0), ("AMD Instinct MI300X", 1307.4),
    ("NVIDIA GeForce RTX 4090", None)])
def test_data_sheet_peak_of_a_device_name(name, tflops):
    """Names that contain another's (H200 / H20, L40S / L4, GH200 / H200) get their own figure."""
    from megajoy.train.mfu import bf16_peak_tflops

    assert bf16_peak_tflops(name) == tflops


def test_steps_before_an_exit_are_logged(tmp_path, data_prefix, tokenizer_file):
    """The steps an --exit-interval stop (or SIGTERM, the same path) cuts off before their logging interval ends
    are logged at the last step run, averaged as a log line averages. Before, they were never logged: the
    resumed run starts a fresh interval after them."""
    every, stopped = tmp_path / "every", tmp_path / "stopped"

    def run(out, *extra):  # no validation: only the training records matter here
        assert main(args(out, data_prefix, tokenizer_file, 6, "--eval-iters", "0", *extra)) == 0

    run(every, "--log-interval", "1")
    per_step = {s: r["loss"] for s, r in train_records(every).items()}
    run(stopped, "--log-interval", "4", "--exit-interval", "3")
    run(stopped, "--log-interval", "4", "--resume")
    logged = {s: r["loss"] for s, r in train_records(stopped).items()}
    want = {3: sum(per_step[s] for s in (1, 2, 3)) / 3, 4: per_step[4], 6: (per_step[5] + per_step[6]) / 2}
    assert logged == pytest.approx(want, rel=1e-6)


def test_steps_before_a_non_finite_gradient_are_logged(tmp_path, data_prefix, tokenizer_file, capsys):
    """The losses that led up to a non-finite gradient are logged before the run stops (they were lost when the
    stop came inside a logging interval)."""
    diverging = ["--lr", "1e30", "--lr-warmup-iters", "0", "--clip-grad", "0"]
    assert main(args(tmp_path / "nan_every", data_prefix, tokenizer_file, 4, "--log-interval", "1", *diverging)) == 2
    capsys.readouterr()
    finite = {s: r["loss"] for s, r in train_records(tmp_path / "nan_every").items()}
    assert finite  # the first step's gradient is finite
    assert main(args(tmp_path / "nan", data_prefix, tokenizer_file, 4, "--log-interval", "10", *diverging)) == 2
    assert f"error: step {max(finite) + 1}: the gradient norm is " in capsys.readouterr().err
    logged = {s: r["loss"] for s, r in train_records(tmp_path / "nan").items()}
    assert logged == pytest.approx({max(finite): sum(finite.values()) / len(finite)}, rel=1e-6)
