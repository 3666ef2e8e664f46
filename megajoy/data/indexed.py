"""Megatron's indexed dataset format (`PREFIX.bin` + `PREFIX.idx`): writing it from text documents with
megatron-core's IndexedDatasetBuilder, and checking a pair of files before megatron-core reads them.

The `.idx` layout (megatron-core `indexed_dataset.py`): 9-byte magic `MMIDIDX\\0\\0`, uint64 version (1),
uint8 dtype code, uint64 sequence count, uint64 document count, then int32 sequence lengths, int64
sequence byte offsets and int64 document indices.
"""

import contextlib
import json
import multiprocessing
import os
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from megajoy.data.jsonl import LONE_SURROGATE, Unreadable, has_lone_surrogate

_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<QBQQ")  # version, dtype code, sequences, documents
_HEADER_SIZE = len(_MAGIC) + _HEADER.size
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
           8: np.uint16}


MISSING_FIELD = "no field"  # how the reason for a line without the key's field begins
PRINTED_BAD_LINES = 20  # then malformed lines are only counted: a wrong --json-keys would print every line
WRONG_KEY_LINES = 1000  # this many lines without the key, and none with it, stop the run


@dataclass
class WriteReport:
    documents: int = 0
    tokens: int = 0
    malformed: int = 0
    missing_key: int = 0  # malformed lines that lack the key's field
    bad_lines: list = field(default_factory=list)  # the first few (line number, reason)

    def summary(self, source: str) -> str:
        text = f"{source}: {self.documents} documents, {self.tokens} tokens"
        if self.malformed:
            shown = "; ".join(f"line {n}: {why}" for n, why in self.bad_lines)
            more = f" (and {self.malformed - len(self.bad_lines)} more)" if self.malformed > len(self.bad_lines) else ""
            text += f"; {self.malformed} malformed line(s) skipped: {shown}{more}"
        return text

    def skip(self, line_no: int, why: str, source: str) -> None:
        missing = why.startswith(MISSING_FIELD)
        self.malformed += 1
        self.missing_key += missing
        if len(self.bad_lines) < 5:
            self.bad_lines.append((line_no, why))
        if self.malformed <= PRINTED_BAD_LINES:
            print(f"{source}: line {line_no}: {why}", file=sys.stderr)
        elif self.malformed == PRINTED_BAD_LINES + 1:
            print(f"{source}: line {line_no} and further malformed lines are counted, not printed", file=sys.stderr)
        if missing and self.missing_key == WRONG_KEY_LINES and self.documents == 0:
            raise ValueError(f"{source}: {WRONG_KEY_LINES} lines lack the field and none has it (line {line_no}: "
                             f"{why}); is --json-keys right?")


# ------------------------------------------------------------------------------------------ encoding

_worker_tokenizer = None
_worker_key = None


def _init_worker(tokenizer_path: str, json_key: str | None) -> None:
    from megajoy.data.tokenizer import load_tokenizer

    global _worker_tokenizer, _worker_key
    _worker_tokenizer, _worker_key = load_tokenizer(tokenizer_path), json_key


def _parse(raw: str) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason) for one input item."""
    if isinstance(raw, Unreadable):
        return None, str(raw)
    if _worker_key is None:
        return raw, None
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    if _worker_key not in record:
        return None, f"{MISSING_FIELD} {_worker_key!r} (it has {_field_names(record)})"
    if not isinstance(record[_worker_key], str):
        return None, f"field {_worker_key!r} is {type(record[_worker_key]).__name__}, not a string"
    if has_lone_surrogate(raw, record[_worker_key]):
        return None, f"field {_worker_key!r} {LONE_SURROGATE}"
    return record[_worker_key], None


def _field_names(record: dict, shown: int = 8) -> str:
    names = ", ".join(repr(k) for k in list(record)[:shown])
    return (names + (", ..." if len(record) > shown else "")) or "no fields"


def _encode_chunk(chunk: list[tuple[int, str]]) -> list[tuple[int, list[int] | None, str | None]]:
    parsed = [(n, *_parse(raw)) for n, raw in chunk]
    texts = [text for _, text, _ in parsed if text is not None]
    encoded = iter(_worker_tokenizer.encode_batch(texts, add_special_tokens=False)) if texts else iter(())
    return [(n, next(encoded).ids if text is not None else None, why) for n, text, why in parsed]


def _chunks(items: Iterable[tuple[int, str]], size: int) -> Iterator[list[tuple[int, str]]]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class MalformedItem(ValueError):
    """A malformed input item under `strict`: 'line N: why'."""


def write_indexed_dataset(items: Iterable[tuple[int, str]], prefix: str, tokenizer_path: str, eod: int,
                          vocab_size: int, json_key: str | None = None, workers: int = 1,
                          append_eod: bool = True, progress: str | None = None, strict: bool = False,
                          commit: bool = True) -> WriteReport:
    """Tokenize numbered items (JSONL lines when `json_key` is set, raw texts otherwise) into
    PREFIX.bin / PREFIX.idx. A malformed item is reported and skipped, or with `strict` raises
    MalformedItem. The files are written under temporary names and appear under their final ones only
    once complete; with `commit=False` they stay temporary until an enclosing `all_or_none` ends."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    report = WriteReport()
    builder = IndexedDatasetBuilder(_staged(prefix)[0], dtype=DType.optimal_dtype(vocab_size))
    try:
        with _encoder(tokenizer_path, json_key, workers) as encode:
            bar = tqdm(desc=progress, unit="doc", disable=progress is None, file=sys.stderr)
            for results in encode(_chunks(items, 64)):
                for line_no, ids, why in results:
                    if ids is None:
                        if strict:
                            raise MalformedItem(f"line {line_no}: {why}")
                        report.skip(line_no, why, progress or prefix)
                        continue
                    if not ids:  # an empty text: no document, not a lone EOD (Megatron-LM appends none either)
                        continue
                    if append_eod:
                        ids = ids + [eod]
                    builder.add_document(ids, [len(ids)])
                    report.documents += 1
                    report.tokens += len(ids)
                bar.update(len(results))
            bar.close()
        builder.finalize(_staged(prefix)[1])
    except BaseException:
        builder.data_file.close()
        _discard(prefix)
        raise
    if commit:
        _commit(prefix)
    return report


def _staged(prefix: str) -> tuple[str, str]:
    return prefix + ".bin.tmp", prefix + ".idx.tmp"


@contextlib.contextmanager
def all_or_none(prefixes: Iterable[str]):
    """Datasets written inside the block with `commit=False` all appear when it ends, or, when it
    raises, none of them does and earlier files under the same names stay as they were."""
    prefixes = list(prefixes)
    try:
        yield
    except BaseException:
        for prefix in prefixes:
            _discard(prefix)
        raise
    for prefix in prefixes:
        _commit(prefix)


def _commit(prefix: str) -> None:
    bin_tmp, idx_tmp = _staged(prefix)
    os.replace(bin_tmp, prefix + ".bin")
    os.replace(idx_tmp, prefix + ".idx")  # last: the pair is loadable only from here on


def _discard(prefix: str) -> None:
    for path in _staged(prefix):
        if os.path.exists(path):
            os.remove(path)


class _encoder:
    """Context manager yielding a function that maps chunks to encoded chunks, in order."""

    def __init__(self, tokenizer_path: str, json_key: str | None, workers: int):
        self.args, self.workers, self.pool = (tokenizer_path, json_key), workers, None

    def __enter__(self):
        if self.workers <= 1:
            _init_worker(*self.args)
            return lambda chunks: map(_encode_chunk, chunks)
        self.pool = multiprocessing.get_context("fork").Pool(self.workers, _init_worker, self.args)
        return lambda chunks: self.pool.imap(_encode_chunk, chunks)

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate() if exc[0] else self.pool.close()
            self.pool.join()


# ------------------------------------------------------------------------------------------ checking

def check_indexed_dataset(prefix: str) -> tuple[int, int]:
    """Verify PREFIX.idx / PREFIX.bin are a consistent pair; return (documents, tokens).

    megatron-core asserts on a bad header and reads garbage from a truncated file; this names the file
    and what is wrong instead."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.exists(path):
            hint = ""
            if prefix.endswith((".bin", ".idx")) and os.path.exists(prefix[:-4] + ".idx"):
                hint = f" (a prefix names the pair without its extension: {prefix[:-4]})"
            raise FileNotFoundError(f"data prefix {prefix}: {path} does not exist{hint}")
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER_SIZE)
    if len(head) < _HEADER_SIZE or head[:len(_MAGIC)] != _MAGIC:
        raise ValueError(f"{idx_path}: not a Megatron index file (bad magic or truncated header)")
    version, code, n_seq, n_doc = _HEADER.unpack(head[len(_MAGIC):])
    if version != 1 or code not in _DTYPES:
        raise ValueError(f"{idx_path}: unsupported index version {version} or dtype code {code}")
    expected = _HEADER_SIZE + n_seq * (4 + 8) + n_doc * 8
    multimodal = n_seq > 0 and size == expected + n_seq  # megatron-core's layout: an int8 mode per sequence follows
    if multimodal:
        _check_text_modes(idx_path, expected, n_seq)
    elif size != expected:
        raise ValueError(f"{idx_path}: {size} bytes, but its header ({n_seq} sequences, {n_doc} documents) "
                         f"implies {expected}; the file is truncated or corrupt")
    tokens = int(_lengths(idx_path, n_seq).sum(dtype=np.int64))
    itemsize = np.dtype(_DTYPES[code]).itemsize
    if os.path.getsize(bin_path) != tokens * itemsize:
        raise ValueError(f"{bin_path}: {os.path.getsize(bin_path)} bytes, but {idx_path} lists {tokens} tokens of "
                         f"{itemsize} bytes; the pair does not match")
    if tokens == 0:
        raise ValueError(f"data prefix {prefix}: the dataset holds no tokens")
    return max(n_doc - 1, 0), tokens


def sequence_lengths(prefix: str) -> np.ndarray:
    """The token count of each sequence (here: document) in PREFIX.idx, read from disk as needed."""
    with open(prefix + ".idx", "rb") as f:
        n_seq = _HEADER.unpack(f.read(_HEADER_SIZE)[len(_MAGIC):])[2]
    return _lengths(prefix + ".idx", n_seq)


def _lengths(idx_path: str, n_seq: int) -> np.ndarray:
    return np.memmap(idx_path, dtype=np.int32, mode="r", offset=_HEADER_SIZE, shape=(n_seq,))


def _check_text_modes(idx_path: str, offset: int, n_seq: int) -> None:
    """A multimodal index is read as text (as megatron-core's GPTDataset reads it) when every sequence is text."""
    modes = np.memmap(idx_path, dtype=np.int8, mode="r", offset=offset, shape=(n_seq,))
    others = int(np.count_nonzero(modes))
    if others:
        raise ValueError(f"{idx_path}: a multimodal index in which {others} of {n_seq} sequences are not text "
                         f"(mode != 0); megajoy trains on text datasets only")


def token_id_range(prefix: str, scan_bytes: int = 2**30) -> tuple[int, int, bool]:
    """(smallest token id, largest, whether the whole file was scanned): files above `scan_bytes` are checked in
    their first and last `scan_bytes / 2`, which catches a wrong tokenizer without reading terabytes."""
    with open(prefix + ".idx", "rb") as f:
        code = f.read(len(_MAGIC) + 9)[-1]
    data = np.memmap(prefix + ".bin", dtype=_DTYPES[code], mode="r")
    if data.size == 0:
        return 0, -1, True
    if data.nbytes <= scan_bytes:
        return int(data.min()), int(data.max()), True
    half = scan_bytes // 2 // data.itemsize
    head, tail = data[:half], data[-half:]
    return int(min(head.min(), tail.min())), int(max(head.max(), tail.max())), False
