"""Sharded safetensors directories (Hugging Face layout), written and read one tensor at a time.

Both sides stream: the writer takes a plan of tensors (name, dtype, shape) whose bytes are produced
piece by piece while the file is written, and the reader copies one tensor, or a range of its rows,
into memory with plain reads (no memory map: mapped pages of a multi-gigabyte file count against the
process's resident memory). Peak memory is the largest piece, not the model.
"""

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


# ------------------------------------------------------------------------------------------ writing

@dataclass(frozen=True)
class TensorEntry:
    """One output tensor: its bytes are the concatenation of what `chunks()` yields (converted to `dtype`)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[torch.Tensor]]

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> "TensorEntry":
        return cls(name, tensor.dtype, tuple(tensor.shape), lambda: (tensor,))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def write_safetensors_dir(directory: str, entries: Iterable[TensorEntry], max_shard_bytes: int = 5 * 10**9,
                          metadata: dict | None = None) -> list[str]:
    """Write `entries` in order into `model.safetensors`, or into `model-0000i-of-0000n.safetensors`
    shards plus `model.safetensors.index.json`; returns the file names. The directory should be a
    temporary one (see `atomic_directory`): a failure leaves partial files behind."""
    entries = list(entries)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"tensor {twice!r} planned twice")
    shards = _plan_shards(entries, max_shard_bytes)
    n = len(shards)
    filenames = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for filename, shard in zip(filenames, shards):
        _write_file(os.path.join(directory, filename), shard, {"format": "pt", **(metadata or {})})
    if n > 1:
        weight_map = {e.name: filename for filename, shard in zip(filenames, shards) for e in shard}
        total = sum(e.nbytes for e in entries)
        with open(os.path.join(directory, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return filenames


def _plan_shards(entries: Sequence[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    shards, size = [[]], 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _write_file(path: str, entries: list[TensorEntry], metadata: dict) -> None:
    header, offset = {"__metadata__": metadata}, 0
    for e in entries:
        header[e.name] = {"dtype": DTYPE_CODES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            _write_entry(f, e)


def _write_entry(f, entry: TensorEntry) -> None:
    written = 0
    for chunk in entry.chunks():
        data = chunk.detach().to(entry.dtype).contiguous().reshape(-1)
        written += data.numel() * data.element_size()
        if written > entry.nbytes:
            break
        f.write(data.view(torch.uint8).numpy().data)
    if written != entry.nbytes:
        raise ValueError(f"tensor {entry.name!r}: its pieces hold {written} bytes, its shape {list(entry.shape)} "
                         f"in {entry.dtype} needs {entry.nbytes}")


# ------------------------------------------------------------------------------------------ reading

class SafetensorsFile:
    """One .safetensors file: header parsed and checked at open, tensors read on demand with positioned reads."""

    def __init__(self, path: str):
        self.path, self._fd = path, None
        header, self.data_start = _read_header(path)
        data_size = os.path.getsize(path) - self.data_start
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {
            name: _parse_entry(path, name, info, data_size) for name, info in header.items()}

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The tensor, or its rows [start, stop) along the first dimension."""
        dtype, shape, begin, end = self.entries[name]
        if start is not None:
            row = math.prod(shape[1:]) * dtype.itemsize
            begin, end = begin + start * row, begin + stop * row
            shape = (stop - start, *shape[1:])
        buffer = bytearray(end - begin)
        self._read_into(buffer, self.data_start + begin)
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def _read_into(self, buffer: bytearray, offset: int) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        view, done = memoryview(buffer), 0
        while done < len(buffer):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                raise ValueError(f"{self.path}: file ended while reading (truncated during conversion?)")
            done += n

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()


def _read_header(path: str) -> tuple[dict, int]:
    """The header's tensor entries (without `__metadata__`) and where the data section starts."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: unreadable safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise ValueError(f"{path}: truncated safetensors file (header of {length} bytes, file of {size})")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is a JSON {type(header).__name__}, expected an object of tensor entries")
    header.pop("__metadata__", None)
    return header, 8 + length


def _parse_entry(path: str, name: str, info, data_size: int) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, checked: offsets within the data section, spanning
    exactly the bytes the shape and dtype need."""
    where = f"{path}: tensor {name!r}"
    missing = [key for key in ("dtype", "shape", "data_offsets") if not isinstance(info, dict) or key not in info]
    if missing:
        raise ValueError(f"{where}: header entry {info!r:.100} lacks {', '.join(missing)}; expected an object "
                         f"with dtype, shape and data_offsets")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or code not in CODE_DTYPES:
        raise ValueError(f"{where}: dtype {code!r}, expected one of {', '.join(CODE_DTYPES)}")
    if not _naturals(shape):
        raise ValueError(f"{where}: shape {shape!r}, expected a list of non-negative integers")
    if not _naturals(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise ValueError(f"{where}: data_offsets {offsets!r}, expected [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if end > data_size:
        raise ValueError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte {end} of the data "
                         f"section, which holds {data_size}")
    nbytes = math.prod(shape) * CODE_DTYPES[code].itemsize
    if end - begin != nbytes:
        raise ValueError(f"{where}: data_offsets {offsets} span {end - begin} bytes, expected {nbytes} "
                         f"(shape {shape} of {code})")
    return CODE_DTYPES[code], tuple(shape), begin, end


def _naturals(value) -> bool:
    return isinstance(value, list) and all(type(x) is int and x >= 0 for x in value)


class SafetensorsDir:
    """Lazy view of a directory holding `model.safetensors` or an index with its shards."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_NAME)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index_path}: not a safetensors index ({e})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ValueError(f"{index_path}: weight_map {weight_map!r:.80}, expected an object mapping tensor "
                                 f"names to file names")
            for filename in sorted(set(weight_map.values())):
                if not os.path.exists(os.path.join(directory, filename)):
                    raise FileNotFoundError(f"{index_path}: shard {os.path.join(directory, filename)} is missing")
            self.files = {f: SafetensorsFile(os.path.join(directory, f)) for f in sorted(set(weight_map.values()))}
            for name, filename in weight_map.items():
                if name not in self.files[filename].entries:
                    raise ValueError(f"{index_path}: tensor {name!r} is listed in {filename}, which does not hold it")
        elif os.path.exists(os.path.join(directory, SINGLE_NAME)):
            self.files = {SINGLE_NAME: SafetensorsFile(os.path.join(directory, SINGLE_NAME))}
            weight_map = dict.fromkeys(self.files[SINGLE_NAME].keys(), SINGLE_NAME)
        else:
            raise FileNotFoundError(f"{directory}: neither {SINGLE_NAME} nor {INDEX_NAME} found")
        self.weight_map: dict[str, str] = weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self.weight_map:
            raise KeyError(f"{self.directory}: no tensor {name!r}")
        return self.files[self.weight_map[name]]

    def path(self, name: str) -> str:
        """The file holding tensor `name`."""
        return self._file(name).path

    def load(self, name: str) -> torch.Tensor:
        return self._file(name).read(name)

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._file(name).read(name, start, stop)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._file(name).entries[name][0]
