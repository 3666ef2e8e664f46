"""Distributed checkpoints through torch.distributed.checkpoint (DCP): every rank writes its own shards
with global tensor metadata, and any layout (or a single process) can read them back, resharding as
it goes.

Each local shard is presented to DCP as a DTensor over a mesh built from megajoy's own process groups:
dense tensors over (data parallel, tensor parallel), experts over (expert data parallel, expert
parallel); replicated copies are written once. Keys: `model.NAME` for parameters and buffers,
`optim.NAME.{exp_avg,exp_avg_sq,step}` for the optimizer.
"""

import contextlib
import hashlib
import json
import os
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from megajoy.parallel.params import ParamSpec

CHECKSUMS = "checksums.json"
# Fault injection for tests: seconds the writer waits before writing its files.
PAUSE_ENV = "MEGAJOY_TEST_SAVE_PAUSE"


class _Writer(FileSystemWriter):
    def write_data(self, plan, planner):
        if os.environ.get(PAUSE_ENV):
            time.sleep(float(os.environ[PAUSE_ENV]))
        return super().write_data(plan, planner)


# ------------------------------------------------------------------------------------------ meshes

class Meshes:
    """The two device meshes of this rank's pipeline stage, built from existing groups (no new ones).
    They only place the host copies of the shards in the global tensors: CPU meshes on every machine,
    since DTensor.from_local moves a local tensor to its mesh's device type (a CUDA mesh would put every
    staged copy back on the GPU, which DCP would then copy to the host again)."""

    def __init__(self, pc):
        from torch.distributed.device_mesh import DeviceMesh

        self.pc = pc
        layout, pp, kind = pc.layout, pc.coords["pp"], "cpu"
        dense = torch.tensor([[layout.rank_of(t, c, d, pp) for t in range(layout.tp)]
                              for d in range(layout.dp) for c in range(layout.cp)])
        stage0 = pp * layout.stage
        experts = torch.tensor([[stage0 + e + layout.ep * x for e in range(layout.ep)] for x in range(layout.edp)])
        self.dense = DeviceMesh.from_group([pc.groups["dp_cp"], pc.groups["tp"]], kind, mesh=dense,
                                           mesh_dim_names=("dp", "tp"))
        self.expert = DeviceMesh.from_group([pc.groups["edp"], pc.groups["ep"]], kind, mesh=experts,
                                            mesh_dim_names=("edp", "ep"))

    def wrap(self, local: torch.Tensor, spec: ParamSpec):
        from torch.distributed.tensor import DTensor, Replicate, Shard

        if spec.expert:
            return DTensor.from_local(local, self.expert, [Replicate(), Shard(0)], run_check=False,
                                      shape=torch.Size(spec.global_shape), stride=_contiguous_stride(spec.global_shape))
        placement = Shard(spec.tp_dim) if spec.tp_sharded else Replicate()
        return DTensor.from_local(local, self.dense, [Replicate(), placement], run_check=False,
                                  shape=torch.Size(spec.global_shape), stride=_contiguous_stride(spec.global_shape))


def _contiguous_stride(shape) -> tuple:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= size
    return tuple(reversed(stride))


# ------------------------------------------------------------------------------------------ state dicts

def sharded_state(model, optimizer_state: dict | None, specs: dict[str, ParamSpec], pc) -> dict:
    """What this rank contributes to a checkpoint: its shards (CPU copies), keyed by global name."""
    distributed = dist.is_initialized() and pc.size("world") > 1
    meshes = Meshes(pc) if distributed else None

    def wrap(tensor, spec):
        staged = tensor.detach().to("cpu", copy=True)
        return meshes.wrap(staged, spec) if distributed and spec is not None else staged

    state = {}
    params = dict(model.named_parameters())
    for name, tensor in model.state_dict().items():
        if model.cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        state[f"model.{name}"] = wrap(params[name] if name in params else tensor, specs.get(name))
    for name, entry in (optimizer_state or {}).items():
        for field, value in entry.items():
            key = f"optim.{name}.{field}"
            state[key] = wrap(value, specs[name]) if torch.is_tensor(value) else torch.tensor(float(value))
    return state


@contextlib.contextmanager
def _quiet_single_process():
    # DCP warns that it assumes a single process even when told so with no_dist=True.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process.*")
        yield


def save(state: dict, path: str, pc, background: bool):
    """Write `state` under `path`; returns a future (done at once when not in the background)."""
    from concurrent.futures import Future

    distributed = dist.is_initialized() and pc.size("world") > 1
    group = pc.groups.get("ckpt") if distributed else None
    writer = _Writer(path)
    with _quiet_single_process():
        if background:
            return dcp.async_save(state, storage_writer=writer, process_group=group, no_dist=not distributed)
        dcp.save(state, storage_writer=writer, process_group=group, no_dist=not distributed)
    done = Future()
    done.set_result(None)
    return done


def saved_shapes(path: str) -> dict[str, tuple]:
    """{key: global shape} of everything a checkpoint holds."""
    return {k: tuple(getattr(m, "size", ())) for k, m in FileSystemReader(path).read_metadata().state_dict_metadata.items()}


def load_into(model, optimizer, specs: dict[str, ParamSpec], pc, path: str) -> None:
    """Fill this rank's model shards (and optimizer state, if `optimizer`) from a checkpoint written at
    any layout. Tensors the checkpoint lacks are named in the error."""
    distributed = dist.is_initialized() and pc.size("world") > 1
    meshes = Meshes(pc) if distributed else None
    shapes = saved_shapes(path)
    keys = set(shapes)
    target, params = {}, dict(model.named_parameters())
    for name, tensor in model.state_dict().items():
        if model.cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if f"model.{name}" not in keys:
            raise ValueError(f"{path}: tensor {name!r} is missing from the checkpoint")
        _check_shape(path, name, shapes[f"model.{name}"], specs[name].global_shape if name in specs else tensor.shape)
        local = torch.empty_like(params[name] if name in params else tensor, device="cpu")
        target[f"model.{name}"] = meshes.wrap(local, specs[name]) if distributed and name in specs else local
    fields = _optimizer_fields(keys)
    if optimizer is not None:
        for name in fields:
            if f"model.{name}" not in keys:
                raise ValueError(f"{path}: optimizer state for unknown tensor {name!r}")
        for name, names in fields.items():
            if name not in params or not optimizer.holds_state(name):
                continue  # another pipeline stage's tensor, or state another rank keeps
            for field in names:
                key = f"optim.{name}.{field}"
                if shapes[key]:  # a tensor shaped like the parameter
                    local = torch.empty(params[name].shape, dtype=torch.float32)
                    target[key] = meshes.wrap(local, specs[name]) if distributed else local
                else:
                    target[key] = torch.zeros(())
    with _quiet_single_process():
        dcp.load(target, checkpoint_id=path, process_group=pc.groups.get("ckpt") if distributed else None,
                 no_dist=not distributed)
    _copy_into_model(model, target)
    if optimizer is not None:
        loaded = {}
        for key, value in target.items():
            if key.startswith("optim."):
                name, field = key[len("optim."):].rsplit(".", 1)
                loaded.setdefault(name, {})[field] = _local(value) if shapes[key] else float(value)
        optimizer.load_local_state(loaded, path)


def _check_shape(path: str, name: str, saved: tuple, expected) -> None:
    if tuple(saved) != tuple(expected):
        raise ValueError(f"{path}: tensor {name!r} has shape {list(saved)} in the checkpoint; this model expects "
                         f"{list(expected)} (a checkpoint of another model configuration?)")


def _optimizer_fields(keys) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for key in sorted(keys):
        if key.startswith("optim."):
            name, field = key[len("optim."):].rsplit(".", 1)
            fields.setdefault(name, []).append(field)
    return fields


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _copy_into_model(model, target: dict) -> None:
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            key = f"model.{name}"
            if key in target:
                tensor.copy_(_local(target[key]).to(tensor.device))


def read_full_tensors(path: str, prefix: str = "model.", names: list[str] | None = None,
                      metadata: dict | None = None) -> dict[str, torch.Tensor]:
    """Whole tensors under `prefix` (or just `names`, without the prefix) from a checkpoint written at any
    layout, read in this process alone; shapes and dtypes come from the checkpoint's metadata (pass its
    `state_dict_metadata` when reading tensor after tensor, so it is not re-read each time)."""
    metadata = metadata or FileSystemReader(path).read_metadata().state_dict_metadata
    wanted = [prefix + n for n in names] if names is not None else [k for k in metadata if k.startswith(prefix)]
    missing = [k for k in wanted if k not in metadata]
    if missing:
        raise ValueError(f"{path}: tensor {missing[0][len(prefix):]!r} is missing from the checkpoint")
    target = {k: torch.empty(tuple(metadata[k].size), dtype=metadata[k].properties.dtype) for k in wanted}
    if target:
        with _quiet_single_process():
            dcp.load(target, checkpoint_id=path, no_dist=True)
    return {k[len(prefix):]: t for k, t in target.items()}


def is_distributed_checkpoint(path: str) -> bool:
    return os.path.exists(os.path.join(path, ".metadata"))


# ------------------------------------------------------------------------------------------ integrity

def write_checksums(path: str) -> None:
    sums = {name: _sha256(os.path.join(path, name)) for name in sorted(os.listdir(path)) if name != CHECKSUMS}
    with open(os.path.join(path, CHECKSUMS), "w") as f:
        json.dump(sums, f, indent=1)


def verify_checksums(path: str) -> None:
    manifest = os.path.join(path, CHECKSUMS)
    if not os.path.exists(manifest):
        raise ValueError(f"{path}: no {CHECKSUMS}; the checkpoint is incomplete")
    try:
        with open(manifest) as f:
            sums = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{manifest}: unreadable ({e}); the checkpoint is incomplete or corrupt") from None
    if not isinstance(sums, dict):
        raise ValueError(f"{manifest}: expected an object of file names and SHA-256 sums")
    for name, expected in sums.items():
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise ValueError(f"{file}: listed in {CHECKSUMS} but missing")
        if _sha256(file) != expected:
            raise ValueError(f"{file}: checksum mismatch; the file is corrupt")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
