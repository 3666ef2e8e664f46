"""Training checkpoints: OUT/checkpoints/iter_NNNNNNN/ holds the distributed checkpoint (every rank's
shards of model and optimizer state, readable at any layout), config.yaml, tokenizer.json,
trainer_state.json (step, consumed samples), rng.pt and checksums.json. A save is written under a
temporary name, in the background while training goes on, and renamed into place once every rank has
finished and the checksums are written; OUT/checkpoints/latest names the newest complete one, and only
the last `keep_last` are kept."""

import json
import os
import random
import shutil
import sys

import numpy as np
import torch
import torch.distributed as dist
import yaml

from megajoy.ckpt import distributed as dcp_io
from megajoy.ckpt.atomic import replace_directory, temporary_sibling
from megajoy.ckpt.native import CONFIG_NAME
from megajoy.data.tokenizer import copy_tokenizer

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"


def checkpoints_dir(out: str) -> str:
    return os.path.join(out, "checkpoints")


def _name(step: int) -> str:
    return f"iter_{step:07d}"


class CheckpointWriter:
    """Saves checkpoints, at most one in flight; the writing rank finishes them once complete."""

    def __init__(self, out: str, pc, keep_last: int, background: bool):
        self.out, self.pc, self.keep_last, self.background = out, pc, keep_last, background
        self.pending = None  # (future, tmp path, final path)

    def save(self, step: int, model, optimizer, specs, job, trainer_state: dict, tokenizer_file: str | None) -> None:
        self.wait()
        final = os.path.join(checkpoints_dir(self.out), _name(step))
        tmp = self._agree_on_tmp(final)
        state = dcp_io.sharded_state(model, optimizer.local_state(), specs, self.pc)
        future = dcp_io.save(state, tmp, self.pc, self.background)  # returns once the state is staged
        if self.pc.rank == 0:
            _write_extras(tmp, job, {**trainer_state, "step": step}, tokenizer_file)
        self.pending = (future, tmp, final)
        self.poll()

    def poll(self) -> None:
        if self.pending is not None and self.pending[0].done():
            self._finish()

    def wait(self) -> None:
        if self.pending is not None:
            self._finish()

    def _finish(self) -> None:
        future, tmp, final = self.pending
        self.pending = None
        future.result()  # re-raises a failed write
        if self.pc.rank == 0:
            dcp_io.write_checksums(tmp)
            replace_directory(tmp, final)
            _write_latest(checkpoints_dir(self.out), os.path.basename(final))
            _prune(checkpoints_dir(self.out), self.keep_last, os.path.basename(final))
            print(f"megajoy: checkpoint {final} complete", file=sys.stderr)

    def _agree_on_tmp(self, final: str) -> str:
        tmp = [temporary_sibling(final) if self.pc.rank == 0 else None]
        if self.pc.rank == 0:
            os.makedirs(tmp[0])
        if dist.is_initialized() and self.pc.size("world") > 1:
            dist.broadcast_object_list(tmp, src=0, group=self.pc.groups.get("ckpt"))
        return tmp[0]


def _write_extras(path: str, job, trainer_state: dict, tokenizer_file: str | None) -> None:
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        yaml.safe_dump(job.to_dict(), f, sort_keys=False)
    if tokenizer_file:
        copy_tokenizer(tokenizer_file, path)
    with open(os.path.join(path, TRAINER_STATE), "w") as f:
        json.dump(trainer_state, f, indent=2)
    torch.save(rng_state(), os.path.join(path, "rng.pt"))


def _write_latest(root: str, name: str) -> None:
    tmp = os.path.join(root, LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, LATEST))


def _complete_checkpoints(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if d.startswith("iter_") and ".tmp-" not in d and ".old-" not in d)


def _prune(root: str, keep_last: int, newest: str) -> None:
    """Keep the last `keep_last` up to `newest`, the one just saved. Later steps' checkpoints are another run's
    (a fresh run or one resumed from an earlier step in the same OUT): ranked by name they would evict `newest`."""
    for name in [n for n in _complete_checkpoints(root) if n <= newest][:-keep_last]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def remove_partial_saves(out: str) -> list[str]:
    """Delete what a killed save left behind (`iter_*.tmp-*`); return their names."""
    root = checkpoints_dir(out)
    if not os.path.isdir(root):
        return []
    partial = [d for d in os.listdir(root) if ".tmp-" in d or ".old-" in d or d == LATEST + ".tmp"]
    for name in partial:
        path = os.path.join(root, name)
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
    return partial


def latest_checkpoint(out: str) -> str | None:
    """The checkpoint `latest` names, or the newest complete one if `latest` is missing or stale."""
    root = checkpoints_dir(out)
    latest = os.path.join(root, LATEST)
    if os.path.exists(latest):
        with open(latest) as f:
            path = os.path.join(root, f.read().strip())
        if os.path.isdir(path):
            return path
    names = _complete_checkpoints(root)
    return os.path.join(root, names[-1]) if names else None


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory as given, or a training output directory's latest checkpoint."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} does not exist or is not a directory: expected a checkpoint, a model "
                                "directory or a training --out directory")
    return latest_checkpoint(path) or path


def load_weights(model, specs, pc, path: str) -> None:
    """This rank's share of the weights (only) from a training checkpoint at any layout, a training output
    directory (its latest), or a model directory (`megajoy init`, a converted Hugging Face model)."""
    from megajoy.ckpt.native import load_model_dir
    from megajoy.parallel.state import load_full_model_state

    checkpoint = resolve_checkpoint(path)
    if dcp_io.is_distributed_checkpoint(checkpoint):
        _verify_on_rank0(checkpoint, pc)
        dcp_io.load_into(model, None, specs, pc, checkpoint)
        return
    _, state, _ = load_model_dir(checkpoint)
    load_full_model_state(model, state, specs, pc, checkpoint)


def load_checkpoint(path: str, model, optimizer, specs, pc, stage: str) -> dict:
    """Verify checksums and that `stage` (pretrain, sft, ...) saved the checkpoint, restore this rank's model and
    optimizer shards (any saved layout) and the RNG; return the trainer state. Errors name the file."""
    _verify_on_rank0(path, pc)
    state = read_trainer_state(path)
    if state.get("stage", stage) != stage:
        raise ValueError(f"{path}: saved by `megajoy {state['stage']}`; `megajoy {stage} --resume` continues only "
                         f"its own runs (start from these weights with --init instead)")
    dcp_io.load_into(model, optimizer, specs, pc, path)
    set_rng_state(_torch_load(os.path.join(path, "rng.pt")))
    return state


def read_trainer_state(path: str) -> dict:
    state_path = os.path.join(path, TRAINER_STATE)
    try:
        with open(state_path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{state_path}: unreadable trainer state ({e})") from None


def _verify_on_rank0(path: str, pc) -> None:
    error = [None]
    if pc.rank == 0:
        try:
            dcp_io.verify_checksums(path)
        except ValueError as e:
            error[0] = str(e)
    if dist.is_initialized() and pc.size("world") > 1:
        dist.broadcast_object_list(error, src=0, group=pc.groups.get("ckpt"))
    if error[0]:
        raise ValueError(error[0])


def _torch_load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file {path} is missing") from None
    except Exception as e:  # torch raises several types for truncated or corrupt files
        raise ValueError(f"{path}: unreadable checkpoint file ({type(e).__name__}: {e})") from None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
