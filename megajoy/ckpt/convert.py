"""Checkpoint conversion between layouts (the engine behind tools/convert_ckpt.py)."""

import os

import torch

from megajoy.ckpt import hf, native
from megajoy.config import JobConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_input(path: str) -> str:
    """A `megajoy pretrain --out` directory stands for its latest checkpoint."""
    from megajoy.train.checkpoint import latest_checkpoint

    if os.path.isdir(os.path.join(path, "checkpoints")):
        latest = latest_checkpoint(path)
        if latest is None:
            raise ValueError(f"{path}: a training output directory without any complete checkpoint")
        return latest
    return path


def detect_layout(path: str) -> str:
    if os.path.exists(os.path.join(path, native.CONFIG_NAME)):
        return "megajoy"
    if os.path.exists(os.path.join(path, "config.json")):
        return "hf"
    if not os.path.isdir(path):
        raise FileNotFoundError(f"input {path} does not exist")
    raise ValueError(f"{path}: neither a megajoy checkpoint ({native.CONFIG_NAME}) nor a Hugging Face "
                     f"directory (config.json)")


def convert(src: str, dst: str, to: str, dtype: str | None = None, int4_group: int | None = None) -> None:
    src = resolve_input(src)
    layout = detect_layout(src)
    if to == "hf":
        if layout != "megajoy":
            raise ValueError(f"{src} is already a Hugging Face directory")
        job, state, tokenizer = native.load_model_dir(src)
        _check_against_model(job, state, src)
        hf.save_hf_dir(dst, job.model, state, DTYPES[dtype or "bf16"], tokenizer, int4_group=int4_group)
    elif to == "megajoy":
        if layout != "hf":
            raise ValueError(f"{src} is already a megajoy checkpoint")
        if int4_group:
            raise ValueError("--int4 applies to --to hf (an INT4 export for serving engines)")
        cfg, state = hf.load_hf_dir(src, DTYPES[dtype or "fp32"])
        job = JobConfig(model=cfg)
        _check_against_model(job, state, src)
        tokenizer = os.path.join(src, native.TOKENIZER_NAME)
        native.save_model_dir(dst, job, state, tokenizer if os.path.exists(tokenizer) else None)
    else:
        raise ValueError(f"unknown target layout {to!r}")


def _check_against_model(job: JobConfig, state: dict, source: str) -> None:
    """Every tensor present, known and shaped as the config says (checked on meta tensors: no memory)."""
    from megajoy.model.stats import meta_model

    native.check_state(meta_model(job.model), state, source)
