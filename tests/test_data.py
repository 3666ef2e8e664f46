"""Data: preprocessing into Megatron's format, blends, packing against megatron-core's own masks,
the built-in tokenizer and corpus, and the errors for bad files."""

import json
import os
import re

import numpy as np
import pytest
import torch

from helpers import byte_level_bpe, load_tool, synthetic_documents, write_jsonl
from megajoy.config import DataConfig, load_job_config
from megajoy.data.gpt import build_gpt_datasets, parse_blend, parse_split
from megajoy.data.indexed import check_indexed_dataset
from megajoy.data.packing import document_positions, pack_samples
from megajoy.data.tokenizer import TokenizerInfo, load_tokenizer


def test_preprocess_equals_megatron_builder_and_reports_bad_lines(tmp_path, tokenizer_file, capsys):
    """Our files are byte-identical to megatron-core's IndexedDatasetBuilder (what Megatron-LM's own
    preprocess_data.py calls) fed the same documents; bad lines are named and counted."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

    docs = synthetic_documents(30, seed=5)
    path = tmp_path / "in.jsonl"
    write_jsonl(path, docs[:10])
    with open(path, "ab") as f:
        f.write(b'{"text": "unterminated\n')  # line 11
        f.write(b'{"body": "no text field"}\n')  # line 12
        f.write(b'{"text": 42}\n')  # line 13
        f.write(b'{"text": "bad \xff byte"}\n')  # line 14
        f.write(b"[1, 2]\n")  # line 15
        for doc in docs[10:]:
            f.write((json.dumps({"text": doc}) + "\n").encode())
    tool = load_tool("preprocess_data")
    assert tool.main(["--input", str(path), "--output-prefix", str(tmp_path / "ours"), "--tokenizer",
                      tokenizer_file, "--workers", "2"]) == 0
    out = capsys.readouterr()
    assert "5 malformed line(s) skipped" in out.out and "30 documents" in out.out
    for line in (11, 12, 13, 14, 15):
        assert f"line {line}:" in out.err
    assert "line 12: no field 'text' (it has 'body')" in out.err and "invalid UTF-8" in out.err

    tok, info = load_tokenizer(tokenizer_file), TokenizerInfo.from_file(tokenizer_file)
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=DType.optimal_dtype(info.vocab_size))
    for doc in docs:
        ids = tok.encode(doc, add_special_tokens=False).ids + [info.eod]
        builder.add_document(ids, [len(ids)])
    builder.finalize(str(tmp_path / "ref.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours_text_document{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()
    ds = IndexedDataset(str(tmp_path / "ours_text_document"))
    assert len(ds) == 30 and tok.decode(ds[3][:-1].tolist()) == docs[3] and ds[3][-1] == info.eod


def test_preprocess_takes_megatron_lms_tokenizer_flags(tmp_path, tokenizer_file, capsys):
    """A Megatron-LM command line (--tokenizer-type HuggingFaceTokenizer --tokenizer-model, --append-eod) writes
    the files megajoy's own flags write; another tokenizer type is refused by argparse."""
    write_jsonl(tmp_path / "in.jsonl", synthetic_documents(5, seed=3))
    tool = load_tool("preprocess_data")
    common = ["--input", str(tmp_path / "in.jsonl"), "--json-keys", "text"]
    assert tool.main(common + ["--output-prefix", str(tmp_path / "ours"), "--tokenizer", tokenizer_file]) == 0
    megatron_flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_file, "--append-eod"]
    assert tool.main(common + ["--output-prefix", str(tmp_path / "megatron"), *megatron_flags]) == 0
    for ext in (".bin", ".idx"):
        ours, megatron = (tmp_path / f"{p}_text_document{ext}" for p in ("ours", "megatron"))
        assert ours.read_bytes() == megatron.read_bytes()
    with pytest.raises(SystemExit):
        tool.main(common + ["--output-prefix", str(tmp_path / "x"), "--tokenizer-type", "GPT2BPETokenizer",
                            "--tokenizer-model", tokenizer_file])
    assert "invalid choice: 'GPT2BPETokenizer'" in capsys.readouterr().err


def test_preprocess_strict_leaves_no_output(tmp_path, tokenizer_file, capsys):
    write_jsonl(tmp_path / "in.jsonl", ["fine"])
    with open(tmp_path / "in.jsonl", "a") as f:
        f.write("not json\n")
    tool = load_tool("preprocess_data")
    assert tool.main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "o"),
                      "--tokenizer", tokenizer_file, "--strict"]) == 2
    assert "line 2: not valid JSON" in capsys.readouterr().err
    assert not [p for p in os.listdir(tmp_path) if p.startswith("o_")]


def test_preprocess_skips_blank_lines_and_a_byte_order_mark(tmp_path, tokenizer_file, capsys):
    """A BOM before line 1 and blank lines are not documents and not errors, even under --strict: the
    output equals that of the same documents without them."""
    docs = synthetic_documents(6, seed=3)
    write_jsonl(tmp_path / "clean.jsonl", docs)
    lines = (tmp_path / "clean.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "messy.jsonl").write_text("\ufeff" + lines[0] + "\n" + "".join(lines[1:4]) + "  \r\n\n" +
                                          "".join(lines[4:]), encoding="utf-8")
    tool = load_tool("preprocess_data")
    for name in ("clean", "messy"):
        assert tool.main(["--input", str(tmp_path / f"{name}.jsonl"), "--output-prefix", str(tmp_path / name),
                          "--tokenizer", tokenizer_file, "--strict"]) == 0
    assert "6 documents" in capsys.readouterr().out
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"messy_text_document{ext}").read_bytes() == \
            (tmp_path / f"clean_text_document{ext}").read_bytes()


def test_wrong_json_key_stops_early_and_bad_lines_print_a_few(tmp_path, tokenizer_file, capsys):
    """A --json-keys no line has stops after 1000 lines with the fields the lines do have, writing nothing
    (it printed one line per input line and went through the whole file); otherwise the first 20 malformed
    lines are printed and the rest counted."""
    tool = load_tool("preprocess_data")
    docs = synthetic_documents(40, seed=6)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": docs[i % 40], "id": i}) + "\n" for i in range(1500)))
    args = ["--input", str(path), "--output-prefix", str(tmp_path / "o"), "--tokenizer", tokenizer_file]
    assert tool.main(args + ["--json-keys", "txt"]) == 2
    err = capsys.readouterr().err
    assert "1000 lines lack the field and none has it (line 1000: no field 'txt' (it has 'text', 'id'))" in err
    assert len(re.findall(r"line \d+: no field", err)) == 21  # 20 printed, then the one that stops the run
    assert not [p for p in os.listdir(tmp_path) if p.startswith("o")]

    with open(path, "a") as f:
        f.write("not json\n" * 30)
    assert tool.main(args) == 0
    out = capsys.readouterr()
    assert "1500 documents" in out.out and "30 malformed line(s) skipped: line 1501: not valid JSON" in out.out
    assert "(and 25 more)" in out.out
    assert len(re.findall(r"line \d+: not valid JSON", out.err)) == 20
    assert "line 1521 and further malformed lines are counted, not printed" in out.err


def test_failed_preprocessing_writes_nothing_and_keeps_earlier_output(tmp_path, tokenizer_file, capsys):
    """Every key's files appear together or not at all; a failed run leaves the previous good output of
    the same prefix byte for byte, and no temporary files."""
    tool = load_tool("preprocess_data")
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("".join(json.dumps({"text": d, "title": d[:9]}) + "\n" for d in synthetic_documents(5, seed=4)))
    bad.write_text(good.read_text() + json.dumps({"text": "has no title"}) + "\n")
    args = ["--output-prefix", str(tmp_path / "o"), "--tokenizer", tokenizer_file, "--json-keys", "text", "title"]
    assert tool.main(["--input", str(good)] + args) == 0
    before = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path) if p.startswith("o_")}
    assert sorted(before) == ["o_text_document.bin", "o_text_document.idx", "o_title_document.bin",
                              "o_title_document.idx"]
    capsys.readouterr()

    assert tool.main(["--input", str(bad), "--output-prefix", str(tmp_path / "lenient")] + args[2:]) == 0
    assert "different numbers of documents ({'text': 6, 'title': 5})" in capsys.readouterr().err

    assert tool.main(["--input", str(bad), "--strict"] + args) == 2
    assert "line 6: no field 'title' (it has 'text') (--strict: no output written)" in capsys.readouterr().err
    assert {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path) if p.startswith("o_")} == before
    (tmp_path / "junk.jsonl").write_text("[1]\n{}\n")
    assert tool.main(["--input", str(tmp_path / "junk.jsonl")] + args) == 2
    assert "no tokens for key 'text'" in capsys.readouterr().err
    assert {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path) if p.startswith("o_")} == before

    assert tool.main(["--input", str(tmp_path)] + args) == 2
    assert f"input {tmp_path} is a directory" in capsys.readouterr().err


def test_parse_blend():
    assert parse_blend(["0.7", "a", "0.3", "b"]) == (["a", "b"], [0.7, 0.3])
    assert parse_blend(["0.7 a 0.3 b"]) == (["a", "b"], [0.7, 0.3])
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    with pytest.raises(ValueError, match="must alternate"):
        parse_blend(["0.7", "a", "0.3"])


@pytest.mark.parametrize("blend", [["-1", "a", "2", "b"], ["0", "a", "1", "b"], ["nan", "a"], ["inf", "a"]])
def test_blend_weights_megatron_would_refuse_are_named(blend):
    """megatron-core's BlendedDataset asserts every weight is positive, with no message."""
    with pytest.raises(ValueError, match=r"--data-path .*weights must be positive"):
        DataConfig(data_path=blend)


def test_split_parses_as_megatron_core_does_and_nonsense_is_refused(tmp_path):
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split

    from megajoy.ckpt.native import CONFIG_NAME, read_job_config

    for split in ("98,2,0", "969, 30, 1", "1", "3,1", "90/10/0", "0.5,0.25,0.25", "98 2 0", "98,2,0,", "[98, 2, 0]"):
        assert parse_split(split) == pytest.approx(parse_and_normalize_split(split), abs=1e-15)
        assert DataConfig(split=split).split == split  # megatron-core gets the text as given
    for split, message in [("abc", "up to three"), ("1,2,3,4", "up to three"), ("0,0,0", "all zero"),
                           ("98,-2", "up to three"), ("nan,1", "up to three"), ("1e2,1", "up to three"),
                           ("1.2.3", "up to three")]:
        with pytest.raises(ValueError, match=re.escape(f"--split {split!r}: ") + f".*{message}"):
            DataConfig(split=split)
    (tmp_path / CONFIG_NAME).write_text("data:\n  split: abc\n")  # a checkpoint's config names its file
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / CONFIG_NAME}: JobConfig.data: --split 'abc'")):
        read_job_config(str(tmp_path))


def test_a_tokenizer_directory_reads_its_tokenizer_json(tmp_path, tokenizer_file):
    """`--tokenizer DIR` (a Hugging Face model directory) means DIR/tokenizer.json everywhere."""
    from megajoy.stages.sft import stage_tokenizer

    directory = os.path.dirname(tokenizer_file)
    assert TokenizerInfo.from_file(directory) == TokenizerInfo.from_file(tokenizer_file)
    job = load_job_config("tiny", None, [f"data.tokenizer={directory}"])
    assert stage_tokenizer(job) == tokenizer_file  # what SFT, DPO and RL copy into their checkpoints
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/tokenizer.json does not exist"):
        TokenizerInfo.from_file(str(tmp_path))


def _write_prefix(path, documents, eod=1):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(path) + ".bin", dtype=np.uint16)
    for doc in documents:
        builder.add_document(doc + [eod], [len(doc) + 1])
    builder.finalize(str(path) + ".idx")
    return str(path)


def test_blend_weights_are_respected(tmp_path, tokenizer_file):
    """Samples from two prefixes (token 10s vs token 20s) arrive in the 0.7 / 0.3 proportion."""
    a = _write_prefix(tmp_path / "a", [[10] * 30 for _ in range(200)])
    b = _write_prefix(tmp_path / "b", [[20] * 30 for _ in range(200)])
    info = TokenizerInfo.from_file(tokenizer_file)
    train, valid = build_gpt_datasets(["0.7", a, "0.3", b], "90,10,0", 16, 1000, 50, 7, info, str(tmp_path / "c"))
    from_a = sum(int((train[i]["tokens"] == 10).any()) for i in range(1000))
    assert abs(from_a / 1000 - 0.7) < 0.02
    assert valid is not None and len(valid) >= 50


def test_document_positions_match_megatron_reset_masks():
    """Positions and the block-diagonal causal mask equal megatron-core's reset_position_ids /
    reset_attention_mask computation; the EOD loss mask equals its eod_mask_loss."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    from megajoy.kernels.attention import document_causal_mask

    tokens = torch.tensor([5, 6, 1, 7, 8, 9, 1, 1, 3, 4, 5, 1, 6])
    mask, loss_mask, positions = _get_ltor_masks_and_position_ids(tokens, 1, True, True, True, True)
    ours_pos, ours_doc = document_positions(tokens.unsqueeze(0), eod=1)
    assert torch.equal(ours_pos[0], positions)
    allowed = ~mask[0]  # megatron marks masked-out entries True
    assert torch.equal(document_causal_mask(ours_doc)[0, 0], allowed)
    sample = {"tokens": tokens, "labels": torch.roll(tokens, -1), "loss_mask": torch.ones(13)}
    assert torch.equal(pack_samples([sample], eod=1, eod_mask_loss=True).loss_mask[0], loss_mask)
    assert pack_samples([sample], eod=1, eod_mask_loss=False).loss_mask.sum() == 13


def test_builtin_tokenizer_round_trips_python_source(tokenizer_file):
    tok = load_tokenizer(tokenizer_file)
    assert [tok.id_to_token(i) for i in range(3)] == ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"]
    text = "def f(x):\n    return {'λ': x ** 2}  # ünïcode\n"
    assert tok.decode(tok.encode(text).ids) == text
    info = TokenizerInfo.from_file(tokenizer_file)
    assert (info.eod, info.bos) == (1, 0)


def test_builtin_corpus_is_built_once_and_cached(tmp_path, monkeypatch):
    from megajoy.data.corpus import builtin_corpus, stdlib_files

    monkeypatch.setenv("MEGAJOY_CACHE", str(tmp_path))
    manifest = builtin_corpus(vocab_size=512, max_mb=0.3, quiet=True)
    files = stdlib_files(int(0.3 * 2**20))
    assert manifest["files"] == len(files) and manifest["bytes"] == sum(s for _, s in files)
    documents, tokens = check_indexed_dataset(manifest["prefix"])
    assert documents == len(files) and tokens == manifest["tokens"] > manifest["bytes"] / 8
    stamp = os.path.getmtime(manifest["prefix"] + ".bin")
    assert builtin_corpus(vocab_size=512, max_mb=0.3, quiet=True) == manifest
    assert os.path.getmtime(manifest["prefix"] + ".bin") == stamp
    assert TokenizerInfo.from_file(manifest["tokenizer"]).vocab_size == 512


@pytest.mark.parametrize("damage, message", [
    (lambda p: open(p + ".idx", "r+b").write(b"NOTMEGA"), "not a Megatron index file"),
    (lambda p: os.truncate(p + ".idx", os.path.getsize(p + ".idx") - 8), "truncated or corrupt"),
    (lambda p: os.truncate(p + ".bin", os.path.getsize(p + ".bin") - 2), "the pair does not match"),
    (lambda p: os.remove(p + ".bin"), ".bin does not exist"),
    (lambda p: _write_prefix(p, []), "the dataset holds no tokens"),
])
def test_damaged_files_are_named(tmp_path, damage, message):
    prefix = _write_prefix(tmp_path / "d", [[3, 4, 5]] * 4)
    damage(prefix)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        check_indexed_dataset(prefix)
    assert message in str(e.value) and str(tmp_path / "d") in str(e.value)


def test_a_prefix_given_with_its_extension_is_named(tmp_path):
    """Megatron's --data-path takes PREFIX, not PREFIX.bin: the error says which prefix was meant."""
    prefix = _write_prefix(tmp_path / "d", [[3, 4, 5]] * 4)
    with pytest.raises(FileNotFoundError, match=rf"without its extension: {prefix}\)$"):
        check_indexed_dataset(prefix + ".bin")


def test_preprocess_reports_a_lone_surrogate_escape_by_line(tmp_path, tokenizer_file, capsys):
    """'\\ud83d' alone is valid JSON but no text a tokenizer can encode: the line is reported and skipped like
    invalid UTF-8 (before: a TypeError traceback from the tokenizers library). A paired escape is kept."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "smile \\ud83d\\ude00"}\n{"text": "broken \\ud83d"}\n{"text": "fine"}\n')
    tool = load_tool("preprocess_data")
    assert tool.main(["--input", str(path), "--output-prefix", str(tmp_path / "out"), "--tokenizer",
                      tokenizer_file]) == 0
    out = capsys.readouterr()
    assert "line 2: field 'text' holds an unpaired UTF-16 surrogate" in out.err and "2 documents" in out.out
    tok = load_tokenizer(tokenizer_file)
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert [tok.decode(ds[i][:-1].tolist()) for i in range(len(ds))] == ["smile \U0001F600", "fine"]


def test_pretrain_takes_the_eod_token_preprocessing_was_given(tmp_path):
    """A tokenizer whose end-of-document token megajoy does not guess (Llama 3's <|end_of_text|>): data
    preprocessed with --eod-token trains with `megajoy pretrain --eod-token`, documents split at that token.
    Before, pretrain refused the tokenizer, naming a flag it did not have."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megajoy.cli import build_parser
    from megajoy.data.pretrain import resolve_data
    from megajoy.stages.pretrain import build_job

    tok = load_tokenizer(byte_level_bpe(["hello world"] * 10, ["<|begin_of_text|>", "<|end_of_text|>"],
                                        tmp_path / "t.json"))
    write_jsonl(tmp_path / "in.jsonl", ["hello", "world"])
    assert load_tool("preprocess_data").main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix",
                                              str(tmp_path / "d"), "--tokenizer", str(tmp_path / "t.json"),
                                              "--eod-token", "<|end_of_text|>"]) == 0
    prefix = str(tmp_path / "d_text_document")
    args = build_parser().parse_args(["pretrain", "--data-path", prefix, "--tokenizer", str(tmp_path / "t.json"),
                                      "--eod-token", "<|end_of_text|>"])
    blend, info = resolve_data(build_job(args))
    assert blend == [prefix] and info.eod == tok.token_to_id("<|end_of_text|>") == 1
    ds = IndexedDataset(prefix)
    assert [int(ds[i][-1]) for i in range(2)] == [info.eod] * 2
    with pytest.raises(ValueError, match="need --data-path"):
        resolve_data(build_job(build_parser().parse_args(["pretrain", "--eod-token", "<|end_of_text|>"])))


def _write_multimodal(path, documents, modes):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(path) + ".bin", dtype=np.uint16, multimodal=True)
    for doc, mode in zip(documents, modes):
        builder.add_document(doc, [len(doc)], modes=[mode])
    builder.finalize(str(path) + ".idx")
    return str(path)


def test_a_text_only_multimodal_index_reads_as_megatron_core_reads_it(tmp_path):
    """megatron-core's multimodal layout (an int8 mode per sequence after the document indices) with every
    sequence text: GPTDataset reads it as text, and so does megajoy (before: "truncated or corrupt"). One
    non-text sequence is refused by name."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = _write_multimodal(tmp_path / "text", [[3, 4, 5, 1], [6, 7, 1], [8, 1]], [0, 0, 0])
    ds = IndexedDataset(prefix)
    assert check_indexed_dataset(prefix) == (len(ds), int(ds.sequence_lengths.sum())) == (3, 9)
    prefix = _write_multimodal(tmp_path / "image", [[3, 4, 5, 1], [6, 7, 1]], [0, 1])
    with pytest.raises(ValueError, match=r"image\.idx: a multimodal index in which 1 of 2 sequences are not text"):
        check_indexed_dataset(prefix)


def test_negative_token_ids_are_refused(tmp_path, tokenizer_file):
    """An int32 dataset (megatron-core's type for vocabularies of 65,500 and more) with a negative id: refused
    before training, as ids past the vocabulary are (before: accepted, then an IndexError in the embedding)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megajoy.data.pretrain import check_vocab

    def write(name, documents):
        builder = IndexedDatasetBuilder(str(tmp_path / name) + ".bin", dtype=np.int32)
        for doc in documents:
            builder.add_document(doc, [len(doc)])
        builder.finalize(str(tmp_path / name) + ".idx")
        return str(tmp_path / name)

    info = TokenizerInfo.from_file(tokenizer_file)
    with pytest.raises(ValueError, match=r"d\.bin: token id -7 is outside the model's vocab_size=70000"):
        check_vocab(info, [write("d", [[3, 4, 1], [6, -7, 1]])], 70000)
    check_vocab(info, [write("ok", [[0, 4, 1], [69999, 1]])], 70000)


def _build_error_within(seconds, *build_args):
    """The error build_gpt_datasets raises, run in a forked child: megatron-core loops forever on a split with no
    tokens, which must fail the test rather than hang it."""
    import multiprocessing
    import traceback

    def child(conn):
        try:
            build_gpt_datasets(*build_args)
            conn.send("built")
        except BaseException as e:
            conn.send(f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-1)}")

    parent, child_end = multiprocessing.get_context("fork").Pipe()
    proc = multiprocessing.get_context("fork").Process(target=child, args=(child_end,))
    proc.start()
    try:
        return parent.recv() if parent.poll(seconds) else f"no answer within {seconds} s"
    finally:
        proc.kill()
        proc.join()


@pytest.mark.parametrize("weights", ["single", "weighted", "unweighted"])
def test_a_split_that_leaves_a_prefix_no_documents_is_named(tmp_path, tokenizer_file, weights):
    """10 documents under --split 98,2,0: round(9.8) = 10 leaves none to validation. megatron-core then loops
    forever for the validation samples (single prefix, weighted blend; even with no evaluation asked for) or
    fails an assert (unweighted blend); the prefix and split are named instead."""
    small = _write_prefix(tmp_path / "small", [[10] * 30 for _ in range(10)])
    big = _write_prefix(tmp_path / "big", [[20] * 30 for _ in range(200)])
    blend = {"single": [small], "weighted": ["0.5", big, "0.5", small], "unweighted": [big, small]}[weights]
    info = TokenizerInfo.from_file(tokenizer_file)
    error = _build_error_within(30, blend, "98,2,0", 16, 40, 0, 7, info, str(tmp_path / "c"))
    assert error.startswith(f"ValueError: --split 98,2,0 gives {small} no validation documents (of its 10, "
                            f"documents 10 to 10)"), error
    train, _ = build_gpt_datasets(blend, "90,10,0", 16, 40, 8, 7, info, str(tmp_path / "c"))  # round(9.0) = 9
    assert len(train) >= 40


def test_an_unweighted_blend_shorter_than_the_run_is_refused_before_training(tmp_path, tokenizer_file):
    """Several prefixes without weights blend one epoch of each (megatron-core caps the blend there): 2 x 20
    documents of 31 tokens give (20 x 31 - 1) // 16 = 38 samples per prefix. Asking for more is refused at
    build time, not met by an IndexError once training reaches the end of the epoch."""
    a = _write_prefix(tmp_path / "a", [[10] * 30 for _ in range(20)])
    b = _write_prefix(tmp_path / "b", [[20] * 30 for _ in range(20)])
    info = TokenizerInfo.from_file(tokenizer_file)
    train, _ = build_gpt_datasets([a, b], "100,0,0", 16, 76, 0, 7, info, str(tmp_path / "c"))
    assert len(train) == 76 and {int(train[i]["tokens"][0]) for i in range(76)} >= {10, 20}
    with pytest.raises(ValueError, match=rf"^--data-path {a} {b}: 76 training samples, fewer than the 77 the run "
                                         rf"needs; a blend without weights is one epoch of each prefix"):
        build_gpt_datasets([a, b], "100,0,0", 16, 77, 0, 7, info, str(tmp_path / "c"))


def test_an_empty_text_adds_no_tokens_as_in_megatron_lm(tmp_path, tokenizer_file):
    """Megatron-LM's preprocess_data.py appends the EOD only to a document with tokens, so an empty "text" adds
    none to the token stream (before: a lone EOD, which shifted every later sample). The reference follows
    Megatron-LM's Encoder.encode: tokenize, EOD appended when there are ids, add_document."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

    texts = ["The cat sat.", "", "A dog ran.", "", ""]
    write_jsonl(tmp_path / "in.jsonl", texts)
    assert load_tool("preprocess_data").main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix",
                                              str(tmp_path / "ours"), "--tokenizer", tokenizer_file]) == 0
    tok, info = load_tokenizer(tokenizer_file), TokenizerInfo.from_file(tokenizer_file)
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=DType.optimal_dtype(info.vocab_size))
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        ids += [info.eod] if ids else []
        builder.add_document(ids, [len(ids)] if ids else [])
    builder.finalize(str(tmp_path / "ref.idx"))
    assert (tmp_path / "ours_text_document.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()
    ours, ref = IndexedDataset(str(tmp_path / "ours_text_document")), IndexedDataset(str(tmp_path / "ref"))
    assert ours.sequence_lengths.tolist() == ref.sequence_lengths.tolist() == [len(ours[0]), len(ours[1])]
    assert int(ours[0][-1]) == int(ours[1][-1]) == info.eod and info.eod not in ours[0][:-1].tolist()


def test_preprocess_creates_the_output_prefix_directory(tmp_path, tokenizer_file):
    """`--output-prefix data/docs` (the tool's own example) into a directory not made yet: before, it failed on an
    internal temporary file's name."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megajoy.data.tokenizer import TokenizerInfo, load_tokenizer

    docs = synthetic_documents(4, seed=7)
    write_jsonl(tmp_path / "in.jsonl", docs)
    prefix = tmp_path / "new" / "data" / "docs"
    assert load_tool("preprocess_data").main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(prefix),
                                              "--tokenizer", tokenizer_file]) == 0
    tok, eod = load_tokenizer(tokenizer_file), TokenizerInfo.from_file(tokenizer_file).eod
    ds = IndexedDataset(str(prefix) + "_text_document")
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(d, add_special_tokens=False).ids + [eod]
                                                        for d in docs]
