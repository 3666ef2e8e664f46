"""Sharded safetensors directories (Hugging Face layout): a streaming writer and a lazy reader."""

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class ShardedWriter:
    """Add tensors one by one; a shard is written whenever `max_shard_bytes` would be exceeded.

    With one shard the file is `model.safetensors`; with several, `model-0000i-of-0000n.safetensors`
    plus `model.safetensors.index.json`.
    """

    def __init__(self, directory: str, max_shard_bytes: int = 5 * 2**30, metadata: dict | None = None):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in shard for shard in self.shards):
            raise ValueError(f"tensor {name!r} written twice")
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.detach().contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        index = len(self.shards)
        save_file(self.pending, os.path.join(self.directory, f"shard-{index}.tmp"), metadata=self.metadata)
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.rename(os.path.join(self.directory, "shard-0.tmp"), os.path.join(self.directory, SINGLE_NAME))
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            filename = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(os.path.join(self.directory, f"shard-{i}.tmp"), os.path.join(self.directory, filename))
            weight_map.update(dict.fromkeys(names, filename))
        with open(os.path.join(self.directory, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)


class SafetensorsDir:
    """Lazy view of a directory holding `model.safetensors` or an index with shards."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_NAME)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    self.weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index_path}: not a safetensors index ({e})") from None
        elif os.path.exists(os.path.join(directory, SINGLE_NAME)):
            self.weight_map = dict.fromkeys(_keys_of(os.path.join(directory, SINGLE_NAME)), SINGLE_NAME)
        else:
            raise FileNotFoundError(f"{directory}: neither {SINGLE_NAME} nor {INDEX_NAME} found")
        for filename in sorted(set(self.weight_map.values())):
            path = os.path.join(directory, filename)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{index_path}: shard {path} is missing")
        self._handles: dict[str, object] = {}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def load(self, name: str) -> torch.Tensor:
        filename = self.weight_map[name]
        if filename not in self._handles:
            self._handles[filename] = _open(os.path.join(self.directory, filename))
        return self._handles[filename].get_tensor(name)

    def shape(self, name: str) -> list[int]:
        filename = self.weight_map[name]
        if filename not in self._handles:
            self._handles[filename] = _open(os.path.join(self.directory, filename))
        return self._handles[filename].get_slice(name).get_shape()


def _open(path: str):
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"{path}: unreadable safetensors file ({e})") from None


def _keys_of(path: str) -> list[str]:
    return list(_open(path).keys())
