"""SFT: the chat template (thinking, non-thinking, tool calls), the loss mask, best-fit-decreasing
packing, the load report for bad conversations, `megajoy chat-template` and `megajoy sft` end to end."""

import json
import math
import random

import pytest
from helpers import init_tiny_checkpoint, say_seven_data
from megajoy.cli import main
from megajoy.data.chat import parse_tool_calls, render
from megajoy.data.demo import sft_conversations, write_jsonl
from megajoy.data.sft import (ChatTokenizer, best_fit_decreasing, load_conversations, pack_rows,
                              padding_fraction)

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
TWO_TURNS = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "two and two"},
    {"role": "user", "content": "3+3?"},
    {"role": "assistant", "content": "6", "reasoning_content": "three and three"}]}


def text_of(pieces, trained=None):
    return "".join(p.text for p in pieces if trained is None or p.trained == trained)


def test_thinking_and_non_thinking_forms():
    thinking = render(TWO_TURNS)
    assert text_of(thinking) == (
        BOS + "Be brief.<｜User｜>2+2?<｜Assistant｜></think>4" + EOS
        + "<｜User｜>3+3?<｜Assistant｜><think>three and three</think>6" + EOS)
    assert text_of(thinking, trained=True) == "4" + EOS + "three and three</think>6" + EOS
    plain = render(TWO_TURNS, mode="off")
    assert text_of(plain) == (BOS + "Be brief.<｜User｜>2+2?<｜Assistant｜></think>4" + EOS
                              + "<｜User｜>3+3?<｜Assistant｜></think>6" + EOS)
    assert text_of(plain, trained=True) == "4" + EOS + "6" + EOS
    prompt = render({"messages": TWO_TURNS["messages"][:4]}, mode="on", generation_prompt=True)
    assert text_of(prompt).endswith("<｜User｜>3+3?<｜Assistant｜><think>")


def test_tool_calls_in_qwen3_coder_xml():
    conversation = {"tools": [{"type": "function", "function": {"name": "calculator"}}], "messages": [
        {"role": "user", "content": "12*3"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "12*3"}'}}]},
        {"role": "tool", "content": "36"},
        {"role": "assistant", "content": "36"}]}
    text = text_of(render(conversation))
    call = "<tool_call>\n<function=calculator>\n<parameter=expression>\n12*3\n</parameter>\n</function>\n</tool_call>"
    assert '<tools>\n{"type": "function", "function": {"name": "calculator"}}\n</tools>' in text  # keys as given
    assert ("<｜Assistant｜></think>" + call + EOS + "<｜tool▁output▁begin｜>36<｜tool▁output▁end｜>"
            "<｜Assistant｜></think>36" + EOS) in text
    assert parse_tool_calls(text) == [{"name": "calculator", "arguments": {"expression": "12*3"}}]
    assert text_of(render(conversation), trained=True) == call + EOS + "36" + EOS


def test_tool_call_arguments_read_back_with_their_schema_types():
    """render() writes non-string arguments as JSON; with the tools' schemas, parsing gives back the values the
    conversation held. Before, every argument came back as text ("3", "true", '["a"]')."""
    arguments = {"city": "Oslo", "days": 3, "metric": True, "ratio": 0.5, "tags": ["a", "b"], "code": "007",
                 "extra": {"x": 1}}
    properties = {"city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
                  "ratio": {"type": "number"}, "tags": {"type": "array"}, "code": {"type": "string"},
                  "extra": {"type": "object"}}
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object",
                                                                                "properties": properties}}}]
    conversation = {"tools": tools, "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "weather", "arguments": arguments}}]},
    ]}
    text = text_of(render(conversation))
    assert parse_tool_calls(text, tools) == [{"name": "weather", "arguments": arguments}]
    as_text = parse_tool_calls(text)[0]["arguments"]
    assert as_text["days"] == "3" and as_text["code"] == "007" and as_text["tags"] == '["a", "b"]'


def test_loss_mask_selects_exactly_the_assistant_tokens(tokenizer_file):
    tokenizer = ChatTokenizer(tokenizer_file, 320)
    assert tokenizer.added == []  # megajoy's BPE trainer reserves the template tokens
    samples = [tokenizer.encode(render(c)) for c in (TWO_TURNS, {"messages": [
        {"role": "user", "content": "a cat"}, {"role": "assistant", "content": "the dog"}]})]
    (row,) = pack_rows(samples, sum(len(s.ids) for s in samples) + 5, tokenizer.pad_id)
    labels = row.labels[0][row.loss_mask[0].bool()].tolist()
    expected = "4" + EOS + "three and three</think>6" + EOS + "the dog" + EOS
    assert tokenizer.decode(labels) == expected
    assert tokenizer.tok.token_to_id("<｜Assistant｜>") in row.input_ids[0].tolist()
    n0 = len(samples[0].ids)
    assert row.position_ids[0, :n0].tolist() == list(range(n0)) and row.position_ids[0, n0] == 0
    assert row.document_ids[0, n0 - 1] == 0 and row.document_ids[0, n0] == 1 and row.document_ids[0, -1] == 2
    assert row.loss_mask[0, n0 - 1] == 0  # the first document's last token does not predict the next's BOS


def test_template_tokens_are_added_when_missing(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens([BOS, EOS])
    tok.add_tokens(list("abc"))
    tok.save(str(tmp_path / "t.json"))
    chat = ChatTokenizer(str(tmp_path / "t.json"), 64)
    assert len(chat.added) == 8 and chat.tok.get_vocab_size() == 13
    assert len(chat.encode(render(TWO_TURNS)).ids) > 0
    assert chat.tok.encode("<｜User｜><think>", add_special_tokens=False).ids == [5, 7]
    with pytest.raises(ValueError, match="more than the model's vocab_size=10"):
        ChatTokenizer(str(tmp_path / "t.json"), 10)


def test_best_fit_decreasing():
    # longest first, each into the fullest bin it fits: 7 | 5 | 4 -> (5) | 3 -> (7) | 2 -> new | 1 -> (5, 4)
    assert best_fit_decreasing([7, 5, 4, 3, 2, 1], 10) == [[0, 3], [1, 2, 5], [4]]
    rng = random.Random(0)
    for _ in range(20):
        lengths = [rng.randint(1, 100) for _ in range(rng.randint(1, 300))]
        bins = best_fit_decreasing(lengths, 128)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
        lower = math.ceil(sum(lengths) / 128)
        assert len(bins) <= 11 / 9 * max(lower, sum(x > 64 for x in lengths)) + 1  # BFD's worst-case bound


def test_packing_pads_under_one_percent_on_the_demo_data(tokenizer_file):
    tokenizer = ChatTokenizer(tokenizer_file, 320)
    samples = [tokenizer.encode(render(c)) for c in sft_conversations(2000, seed=1)]
    # 2048-token rows: the test's 320-token BPE spends about twice the tokens of the main job's 4096-token
    # one, whose conversations fill the stage's default 1024-token rows alike (0.4% padding, README).
    packed = pack_rows(samples, 2048, tokenizer.pad_id)
    padded = pack_rows(samples, 2048, tokenizer.pad_id, pack=False)
    assert padding_fraction(packed, tokenizer.pad_id) < 0.01
    assert padding_fraction(padded, tokenizer.pad_id) > 0.9
    tokens = sum(len(s.ids) for s in samples)
    assert len(packed) == math.ceil(tokens / 2049)  # as few rows as the tokens need


def test_exact_match_prompts_each_conversation_as_it_was_trained(tokenizer_file, monkeypatch):
    """Held-out exact match decodes from the trained sequence's tokens up to the answer: `<think>` opens a
    thinking conversation's answer, `</think>` a non-thinking one's; a thinking reply that never closes its
    reasoning answers nothing (it matched when its reasoning was the answer's text)."""
    import megajoy.model.generate
    from megajoy.data.demo import arithmetic
    from megajoy.stages.sft import exact_match

    tokenizer = ChatTokenizer(tokenizer_file, 320)
    rng = random.Random(0)
    conversations = [arithmetic(rng, thinking=True), arithmetic(rng, thinking=False)]
    prompts = []
    monkeypatch.setattr(megajoy.model.generate, "generate", lambda model, ids, params: prompts.extend(ids) or
                        [[] for _ in ids])
    assert exact_match(None, tokenizer, conversations, "auto") == (0, 2)
    for conversation, prompt in zip(conversations, prompts, strict=True):
        sample = tokenizer.encode(render(conversation))
        assert prompt == sample.ids[:sample.trained.index(True)]
    assert tokenizer.decode(prompts[0]).endswith("<｜Assistant｜><think>")
    # the answer counts after the reasoning closes: a thinking reply of the bare answer is all reasoning
    for reply, hits in (("{}", 1), ("so</think>{}", 2)):
        monkeypatch.setattr(megajoy.model.generate, "generate", lambda model, ids, params: [
            tokenizer.tok.encode(reply.format(c["answer"]), add_special_tokens=False).ids for c in conversations])
        assert exact_match(None, tokenizer, conversations, "auto") == (hits, 2), reply


def test_bad_conversations_are_counted_and_reported(tmp_path, tokenizer_file):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    long = {"messages": [{"role": "user", "content": "the cat " * 40}, {"role": "assistant", "content": "yes"}]}
    long_answer = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the dog " * 40}]}
    lines = [good, {"messages": [{"role": "user", "content": "hi"}]},
             {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
             long, {"messages": "nope"}, long_answer, good]
    path = tmp_path / "chat.jsonl"
    write_jsonl(str(path), lines)
    tokenizer = ChatTokenizer(tokenizer_file, 320)
    samples, report = load_conversations(str(path), tokenizer, 40, "truncate")
    assert report.kept == 3 and report.truncated == 1 and len(samples) == 3
    assert dict(report.dropped) == {"no_assistant": 1, "unknown_role": 1, "too_long": 1, "malformed": 1}
    assert report.first_lines == {"no_assistant": 2, "unknown_role": 3, "too_long": 4, "malformed": 5}
    assert len(samples[1].ids) == 40 and samples[1].source == long_answer
    assert "1 dropped: no assistant (first at line 2)" in report.summary(str(path))
    _, report = load_conversations(str(path), tokenizer, 40, "drop")
    assert report.kept == 2 and report.dropped["too_long"] == 2
    with open(path, "a") as f:
        f.write('{"messages": [}\n')
    with pytest.raises(ValueError, match=rf"{path}:8: malformed JSON"):
        load_conversations(str(path), tokenizer, 40)


def test_wrong_typed_fields_are_malformed_and_bad_bytes_named(tmp_path, tokenizer_file):
    """Fields of the wrong JSON type are counted as malformed (before, a traceback naming no line, or the
    tools string listed one "tool" per character); a UTF-8 byte-order mark is skipped; a line that is not
    UTF-8 is an error naming the file and line, and so is a directory given as the file. A "thinking" flag
    must be a JSON boolean (the string "false" used to switch thinking on); null leaves it undecided."""
    from megajoy.data.preference import load_pairs
    from megajoy.data.prompts import load_prompts

    user, assistant = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    good = [{"messages": [user, assistant]}, {"messages": [user, assistant], "thinking": None}]
    bad = [{"messages": [user, dict(assistant, tool_calls={"function": {"name": "f", "arguments": {}}})]},
           {"messages": [user, dict(assistant, tool_calls=[{"function": {"name": "f", "arguments": "[1, 2]"}}])]},
           {"messages": [user, dict(assistant, tool_calls=["f"])]},
           {"messages": [user, dict(assistant, reasoning_content=5)]},
           {"messages": [user, assistant], "tools": "calc"}, {"messages": ["hi", assistant]},
           {"messages": [user, assistant], "thinking": "false"}, {"messages": [user, assistant], "thinking": 1}]
    tokenizer = ChatTokenizer(tokenizer_file, 320)
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(x) + "\n" for x in [*good, *bad]).encode())
    samples, report = load_conversations(str(path), tokenizer, 100)
    assert len(samples) == 2 and dict(report.dropped) == {"malformed": len(bad)}
    assert report.first_lines == {"malformed": 3}
    assert samples[0].ids == samples[1].ids
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(str(pairs), [{"prompt": "hi", "chosen": ["hello"], "rejected": "no"},
                             {"prompt": ["hi"], "chosen": "a", "rejected": "b"},
                             {"prompt": "hi", "chosen": "a", "rejected": "b", "thinking": "no"},
                             {"prompt": "hi", "chosen": "a", "rejected": "b"}])
    kept, report = load_pairs(str(pairs), tokenizer, 100)
    assert len(kept) == 1 and dict(report.dropped) == {"malformed": 3}
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(str(prompts), [{"prompt": "2+2", "answer": None}, {"prompt": "2+2", "answer": "4", "tools": "calc"},
                               {"prompt": "2+2", "answer": 4}, {"prompt": "2+2", "answer": 4, "messages": None}])
    kept, report = load_prompts(str(prompts), tokenizer, 100)
    assert [p.answer for p in kept] == ["4", "4"] and kept[0].ids == kept[1].ids
    assert dict(report.dropped) == {"no_answer": 1, "malformed": 1}
    with open(path, "ab") as f:
        f.write(b'{"messages": "\xff"}\n')
    with pytest.raises(ValueError, match=rf"{path}:{len(good) + len(bad) + 1}: invalid UTF-8"):
        load_conversations(str(path), tokenizer, 100)
    with pytest.raises(ValueError, match=rf"data file {tmp_path} is a directory"):
        load_conversations(str(tmp_path), tokenizer, 100)


def test_chat_template_command_marks_trained_tokens(tmp_path, tokenizer_file, capsys):
    write_jsonl(str(tmp_path / "c.jsonl"), [{"messages": [{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "the cat"}]}])
    assert main(["chat-template", "--render", str(tmp_path / "c.jsonl"), "--tokenizer", tokenizer_file]) == 0
    out = capsys.readouterr().out
    assert BOS + "<｜User｜>hi<｜Assistant｜></think>⟦the cat" + EOS + "⟧" in out
    tokenizer = ChatTokenizer(tokenizer_file, 320)
    n = len(tokenizer.tok.encode("the cat" + EOS, add_special_tokens=False).ids)
    assert f"tokens, {n} trained" in out


def test_chat_template_into_a_closed_pipe_ends_without_a_traceback(tmp_path, tokenizer_file):
    """`megajoy chat-template ... | head`: the reader goes away before the output is written. Before, the command
    ended in a BrokenPipeError traceback."""
    import subprocess
    import sys

    write_jsonl(str(tmp_path / "c.jsonl"), [{"messages": [{"role": "user", "content": "hi " * 2000},
                                                         {"role": "assistant", "content": "the cat"}]}] * 20)
    command = [sys.executable, "-m", "megajoy", "chat-template", "--render", str(tmp_path / "c.jsonl"),
               "--tokenizer", tokenizer_file]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # long before the interpreter has started and rendered anything
    err = process.stderr.read()
    assert process.wait() == 1 and "Traceback" not in err, err


def test_sft_end_to_end(tmp_path, tokenizer_file):
    init_tiny_checkpoint(tmp_path / "init", tokenizer_file)
    out = tmp_path / "sft"
    assert main(["sft", "--init", str(tmp_path / "init"), "--out", str(out), "--train-iters", "30", "--seq-length",
                 "512", "--demo-conversations", "300", "--eval-interval", "15", "--exact-match-samples", "4",
                 "--lr", "3e-3"]) == 0
    results = json.loads((out / "sft_results.json").read_text())
    assert 0 < results["padding_fraction"] < 0.3 and results["packed"] is True and results["rows"] < 200
    assert results["exact_match_before"] is not None and results["exact_match_after"] is not None
    val = [json.loads(line)["val_loss"] for line in open(out / "metrics.jsonl") if "val_loss" in line]
    assert len(val) == 3 and val[-1] < 0.8 * val[0]
    from megajoy.ckpt.native import load_model_dir
    from megajoy.train.checkpoint import latest_checkpoint

    job, _, tokenizer = load_model_dir(latest_checkpoint(str(out)))
    assert job.model.hidden_size == 32  # the --init checkpoint's model, not the preset's
    assert ChatTokenizer(tokenizer, 320).added == []


def test_eval_iters_zero_switches_evaluation_off(tmp_path, tokenizer_file):
    """Megatron's --eval-iters 0: no validation, also in a stage that scores its whole held-out set (before,
    SFT and DPO evaluated whatever eval_iters said)."""
    init_tiny_checkpoint(tmp_path / "init", tokenizer_file)
    out = tmp_path / "sft"
    assert main(["sft", "--init", str(tmp_path / "init"), "--out", str(out), "--train-iters", "4", "--seq-length",
                 "256", "--demo-conversations", "40", "--valid-conversations", "8", "--eval-interval", "2",
                 "--exact-match-samples", "0", "--eval-iters", "0", "--log-interval", "1"]) == 0
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert not [r for r in records if any(k.startswith("val_") for k in r)]


def test_sft_refuses_missing_tokenizer_and_empty_data(tmp_path, tokenizer_file, capsys):
    init_tiny_checkpoint(tmp_path / "bare")  # no tokenizer stored
    assert main(["sft", "--init", str(tmp_path / "bare"), "--out", str(tmp_path / "a")]) == 2
    assert "no tokenizer: pass --tokenizer, or --init a checkpoint that stores one" in capsys.readouterr().err
    write_jsonl(str(tmp_path / "empty.jsonl"), [{"messages": [{"role": "user", "content": "hi"}]}])
    assert main(["sft", "--init", str(tmp_path / "bare"), "--tokenizer", tokenizer_file, "--data",
                 str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'empty.jsonl'}: no training rows: every conversation was dropped" in err
    assert "1 dropped: no assistant (first at line 1)" in err  # the load report says why


def test_resume_refuses_another_stages_checkpoint(tmp_path, tokenizer_file, data_prefix, capsys):
    """`pretrain --resume` in an SFT run's OUT is refused before anything loads, pointing at --init (before, it
    went on to load the SFT weights and optimizer as a pretraining run's and continued from SFT's step)."""
    from helpers import TINY_MODEL_OVERRIDES

    from megajoy.train.checkpoint import latest_checkpoint

    init_tiny_checkpoint(tmp_path / "init", tokenizer_file)
    assert main(sft_args(tmp_path / "init", tmp_path / "out", "--train-iters", "1")) == 0
    capsys.readouterr()
    code = main(["pretrain", "--resume", "--out", str(tmp_path / "out"), "--data-path", data_prefix, "--tokenizer",
                 tokenizer_file, "--seq-length", "32", "--train-iters", "2", "--global-batch-size", "2",
                 "--micro-batch-size", "2"] + [a for o in TINY_MODEL_OVERRIDES for a in ("--set", o)])
    expected = (f"{latest_checkpoint(str(tmp_path / 'out'))}: saved by `megajoy sft`; `megajoy pretrain --resume` "
                "continues only its own runs (start from these weights with --init instead)")
    assert code == 2 and expected in capsys.readouterr().err


def sft_args(init, out, *extra):
    return ["sft", "--init", str(init), "--out", str(out), "--train-iters", "3", "--seq-length", "128",
            "--global-batch-size", "4", "--micro-batch-size", "1", "--demo-conversations", "200",
            "--valid-conversations", "16", "--eval-interval", "3", "--log-interval", "1", "--exact-match-samples",
            "0", "--lr", "1e-3", *extra]


@pytest.fixture(scope="module")
def sft_single(tmp_path_factory, tokenizer_file):
    init, out = tmp_path_factory.mktemp("sft_init"), tmp_path_factory.mktemp("sft_single")
    init_tiny_checkpoint(init, tokenizer_file)
    assert main(sft_args(init, out)) == 0
    return init, out


@pytest.mark.parametrize("world, flags", [(2, ["--dp", "2"]), (2, ["--tp", "2", "--sequence-parallel"]),
                                          (4, ["--pp", "2", "--ep", "2", "--use-distributed-optimizer"])],
                         ids=["dp2", "tp2_sp", "pp2_ep2_dp2_zero"])
def test_sft_layouts_equal_the_single_process(world, flags, tmp_path, sft_single):
    """Packed rows, the assistant-only mask and the MTP loss give the single process's losses."""
    from megajoy.parallel.spawn import cli_worker, run_workers

    init, single = sft_single
    run_workers(world, cli_worker, sft_args(init, tmp_path, *flags))
    log = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    want_log = [json.loads(line) for line in open(single / "metrics.jsonl")]
    assert len(log) == len(want_log) == 5  # validation at 0 and 3, three steps
    for got, want in zip(log, want_log):
        for key in ("loss", "mtp_loss", "val_loss", "val_mtp_loss", "grad_norm"):
            assert (key in got) == (key in want)
            if key in want:
                assert abs(got[key] - want[key]) <= 1e-5 * abs(want[key]), (key, got, want)


def test_held_out_exact_match_is_shared_between_data_parallel_ranks(tmp_path, tokenizer_file):
    """Exact match on five held-out conversations after 30 steps of "Say seven, i." -> "7", where the
    recorded answer of every odd i is "8" (so the rate is a fraction of the held-out set), is the same with
    two expert-parallel ranks (data-parallel shares of 3 and 2 conversations, decoded in lockstep, hits and
    counts summed) as in one process; before training it is 0."""
    from megajoy.parallel.spawn import cli_worker, run_workers

    init_tiny_checkpoint(tmp_path / "init", tokenizer_file)
    chat, _ = say_seven_data(tmp_path)
    lines = [json.loads(line) for line in open(chat)]
    write_jsonl(chat, [dict(c, answer="7" if i % 2 == 0 else "8") for i, c in enumerate(lines)])

    def args(out, *extra):
        return ["sft", "--init", str(tmp_path / "init"), "--data", chat, "--out", str(tmp_path / out), "--train-iters",
                "30", "--seq-length", "64", "--lr", "3e-3", "--valid-conversations", "5", "--exact-match-samples", "5",
                "--eval-interval", "1000", *extra]

    assert main(args("one")) == 0
    run_workers(2, cli_worker, args("ep", "--ep", "2"), timeout=180)
    one, ep = (json.loads((tmp_path / out / "sft_results.json").read_text()) for out in ("one", "ep"))
    assert one["exact_match_before"] == ep["exact_match_before"] == 0.0
    assert 0 < one["exact_match_after"] < 1 and ep["exact_match_after"] == one["exact_match_after"]


def test_a_lone_surrogate_escape_stops_loading_with_its_line(tmp_path, tokenizer_file):
    """'\\ud83d' alone is valid JSON but no text the tokenizer can encode: before, a TypeError from the
    tokenizers library, naming neither file nor line. A paired escape (an emoji) is fine."""
    path = tmp_path / "chat.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi \\ud83d\\ude00"}, {"role": "assistant", '
                    '"content": "ok"}]}\n{"messages": [{"role": "user", "content": "hi \\ud83d"}, '
                    '{"role": "assistant", "content": "ok"}]}\n')
    with pytest.raises(ValueError, match=rf"^{path}:2: the line holds an unpaired UTF-16 surrogate"):
        load_conversations(str(path), ChatTokenizer(tokenizer_file, 320), 64)


def _chat_sample_tokenizer(tmp_path, pre_tokenizer, special):
    from tokenizers import Tokenizer, models, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizer
    tok.train_from_iterator([f"the answer is yes and no, hello world {i}" for i in range(100)], trainers.BpeTrainer(
        vocab_size=120, special_tokens=special, initial_alphabet=list("<>|_"), show_progress=False))
    tok.save(str(tmp_path / "t.json"))
    return str(tmp_path / "t.json")


def test_bos_and_eos_are_added_when_missing(tmp_path):
    """A tokenizer with other names for its specials (Llama 3's): DeepSeek-V3's BOS and EOS are added with the
    template's tokens. Before, the EOS the model must learn to end its turn with was spelled out in 20+ tokens."""
    from tokenizers import pre_tokenizers

    path = _chat_sample_tokenizer(tmp_path, pre_tokenizers.ByteLevel(add_prefix_space=False),
                                  ["<|begin_of_text|>", "<|end_of_text|>"])
    chat = ChatTokenizer(path, 200)
    assert chat.added[:2] == [BOS, EOS] and len(chat.added) == 10
    sample = chat.encode(render({"messages": [{"role": "user", "content": "hello"},
                                              {"role": "assistant", "content": "world"}]}))
    assert sample.ids[0] == chat.tok.token_to_id(BOS)
    trained = [i for i, t in zip(sample.ids, sample.trained) if t]
    assert trained == chat.tok.encode("world", add_special_tokens=False).ids + [chat.tok.token_to_id(EOS)]


def test_a_conversation_tokenizes_as_apply_chat_template_tokenizes_it(tmp_path):
    """With a SentencePiece-style tokenizer (Metaspace, prepend_scheme "first", as Mistral's tokenizer.json),
    the ids equal transformers' apply_chat_template(tokenize=True) with megajoy's template, and the trained
    tokens are the answers. Before, each piece was tokenized alone and every answer began with an extra '▁'."""
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from megajoy.data.chat import JINJA_TEMPLATE

    path = _chat_sample_tokenizer(tmp_path, pre_tokenizers.Metaspace(prepend_scheme="first"), ["<unk>", BOS, EOS])
    chat = ChatTokenizer(path, 200)
    hf = PreTrainedTokenizerFast(tokenizer_object=chat.tok, chat_template=JINJA_TEMPLATE)
    messages = [{"role": "user", "content": "the answer"}, {"role": "assistant", "content": "yes"},
                {"role": "user", "content": "hello"}, {"role": "assistant", "content": "no world"}]
    sample = chat.encode(render({"messages": messages}, mode="off"))
    expected = hf.apply_chat_template(messages, tokenize=True, return_dict=True, thinking=False)["input_ids"]
    assert sample.ids == expected
    trained = [chat.tok.id_to_token(i) for i, t in zip(sample.ids, sample.trained) if t]
    assert trained == ["yes", EOS, "no", "▁world", EOS]


@pytest.mark.parametrize("stage", ["sft", "dpo", "rl"])
def test_post_training_stages_refuse_the_pretraining_corpus_flags(stage, capsys):
    """The post-training stages read --data; `--data-path` and the other corpus flags used to be accepted
    and ignored, so `megajoy sft --data-path chat` trained on the built-in demo data without a word."""
    for flag in (["--data-path", "corpus_text_document"], ["--split", "98,2,0"], ["--eod-token", "</s>"],
                 ["--data-cache-path", "cache"], ["--eod-mask-loss"]):
        with pytest.raises(SystemExit) as exit:
            main([stage, *flag])
        assert exit.value.code == 2
        assert f"unrecognized arguments: {' '.join(flag)}" in capsys.readouterr().err


@pytest.mark.parametrize("base", ["megajoy_bpe", "llama_names"])
def test_reasoning_and_tool_call_marks_survive_skip_special_tokens(tmp_path, tokenizer_file, base):
    """A chat model's exported tokenizer, decoded as transformers' text-generation pipeline and vLLM decode
    replies (skip_special_tokens=True), keeps </think> and the tool-call tags that reasoning and tool-call parsers
    read, and drops the end of sentence; Qwen3's and DeepSeek-R1's tokenizers mark these tokens "special": false.
    Before, they were special tokens (reserved so by megajoy's BPE, added so when missing) and vanished."""
    import dataclasses

    from transformers import AutoTokenizer

    from megajoy.config import tiny
    from megajoy.data.tokenizer import write_hf_tokenizer_files

    if base == "llama_names":
        tokenizer_file = _llama_named_byte_level_bpe(tmp_path)
    chat = ChatTokenizer(tokenizer_file, 400)
    chat.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "hf").mkdir()
    write_hf_tokenizer_files(str(tmp_path / "tokenizer.json"), str(tmp_path / "hf"),
                             dataclasses.replace(tiny(), vocab_size=400))
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    reply = "yes</think>no<tool_call>\n<function=f>\n<parameter=x>\nyes\n</parameter>\n</function>\n</tool_call>"
    for tokenizer in (chat.tok, hf):
        ids = tokenizer.encode(BOS + reply + EOS, add_special_tokens=False)
        ids = getattr(ids, "ids", ids)
        assert tokenizer.decode(ids, skip_special_tokens=True) == reply
    assert hf.decode(hf.encode("<think>yes", add_special_tokens=False), skip_special_tokens=True) == "<think>yes"


def _llama_named_byte_level_bpe(tmp_path) -> str:
    """A byte-level BPE with Llama 3's names for its specials and none of the chat template's tokens."""
    from helpers import byte_level_bpe

    return byte_level_bpe(["yes and no, the cat"] * 10, ["<|begin_of_text|>", "<|end_of_text|>"],
                          tmp_path / "llama.json")


def test_a_chat_model_exports_the_end_of_turn_it_was_trained_with(tmp_path):
    """SFT from a tokenizer whose own end token is not the template's (Llama 3's names; the template's BOS and
    EOS are added): the checkpoint and its Hugging Face export name the EOS the model learned to end every turn
    with, so that transformers' generate (and llama.cpp, from the same ids) stops there. Before, they kept the
    model's eos_token_id=1, <|end_of_text|>, a token the chat data never holds."""
    from helpers import load_tool
    from tokenizers import Tokenizer

    base = _llama_named_byte_level_bpe(tmp_path)
    init_tiny_checkpoint(tmp_path / "init", base)
    assert main(["sft", "--init", str(tmp_path / "init"), "--out", str(tmp_path / "sft"), "--train-iters", "1",
                 "--seq-length", "128", "--demo-conversations", "20", "--valid-conversations", "0",
                 "--exact-match-samples", "0"]) == 0
    assert load_tool("convert_ckpt").main(["--input", str(tmp_path / "sft"), "--output", str(tmp_path / "hf"),
                                           "--to", "hf"]) == 0
    tok = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    n = Tokenizer.from_file(base).get_vocab_size()
    assert (bos, eos) == (n, n + 1)  # appended to the tokenizer's own tokens
    for name in ("config.json", "generation_config.json"):
        config = json.loads((tmp_path / "hf" / name).read_text())
        assert (config["bos_token_id"], config["eos_token_id"]) == (bos, eos), name
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == (BOS, EOS)
