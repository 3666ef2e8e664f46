"""Training checkpoints: OUT/checkpoints/iter_NNNNNNN/ holds the model directory (model.safetensors,
config.yaml, tokenizer.json, so conversion tools read it directly), optimizer.pt, rng.pt and
trainer_state.json (step, consumed samples). Each is written under a temporary name and renamed into
place whole; OUT/checkpoints/latest names the newest, and only the last `keep_last` are kept."""

import json
import os
import random
import shutil
import time

import numpy as np
import torch

from megajoy.ckpt.atomic import atomic_directory
from megajoy.ckpt.native import load_model_dir, write_model_files

LATEST = "latest"
# Fault injection for tests: seconds to pause inside a save, before it is renamed into place.
PAUSE_ENV = "MEGAJOY_TEST_SAVE_PAUSE"


def checkpoints_dir(out: str) -> str:
    return os.path.join(out, "checkpoints")


def _name(step: int) -> str:
    return f"iter_{step:07d}"


def save_checkpoint(out: str, step: int, job, model_state: dict, optimizer_state: dict, trainer_state: dict,
                    tokenizer_file: str | None, keep_last: int) -> str:
    """Write full (layout-independent) model and optimizer state; called on the writing rank only."""
    root = checkpoints_dir(out)
    path = os.path.join(root, _name(step))
    with atomic_directory(path) as tmp:
        write_model_files(tmp, job, model_state, tokenizer_file)
        torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
        torch.save(rng_state(), os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({**trainer_state, "step": step}, f, indent=2)
        if os.environ.get(PAUSE_ENV):
            time.sleep(float(os.environ[PAUSE_ENV]))
    _write_latest(root, _name(step))
    _prune(root, keep_last)
    return path


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


def _prune(root: str, keep_last: int) -> None:
    for name in _complete_checkpoints(root)[:-keep_last]:
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


def load_checkpoint(path: str) -> tuple[dict, dict, dict]:
    """(full model state, optimizer state, trainer state); restores the RNG. Errors name the file."""
    _, model_state, _ = load_model_dir(path)
    optimizer_state = _torch_load(os.path.join(path, "optimizer.pt"))
    set_rng_state(_torch_load(os.path.join(path, "rng.pt")))
    state_path = os.path.join(path, "trainer_state.json")
    try:
        with open(state_path) as f:
            return model_state, optimizer_state, json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{state_path}: unreadable trainer state ({e})") from None


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
