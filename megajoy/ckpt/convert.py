"""Checkpoint conversion (the engine behind tools/convert_ckpt.py): any input a `CheckpointView` opens,
to megajoy's own directory, a Hugging Face directory or a GGUF file, one tensor at a time."""

import os

import torch

from megajoy.ckpt import gguf_export, hf, native
from megajoy.ckpt.view import open_view

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TARGETS = ("hf", "megajoy", "gguf")


def convert(src: str, dst: str, to: str, dtype: str | None = None, int4_group: int | None = None,
            gguf_type: str = "f16", tokenizer_pre: str | None = None, max_shard_bytes: int = 5 * 10**9,
            int4: bool = False) -> list[str]:
    """Returns notes for the user (what was read differently from the input's config, tensors that fell
    back to another type). `int4` (or an `int4_group`): the routed experts packed INT4, in groups of
    `int4_group`, by default those the checkpoint was trained with (--qat int4 --qat-group), else 64."""
    if to not in TARGETS:
        raise ValueError(f"unknown target {to!r} (one of {TARGETS})")
    int4 = int4 or bool(int4_group)
    if int4 and to != "hf":
        raise ValueError("--int4 and --int4-group apply to --to hf (an INT4 export for serving engines)")
    if to == "gguf" and dtype and gguf_type != "qat":
        raise ValueError(f"--dtype applies to --to gguf only with --gguf-type qat (the type of the tensors it does not "
                         f"quantise); name the GGUF's type with --gguf-type (here {gguf_type})")
    view = open_view(src)
    check_output(dst, to, view.source)
    if to == "hf":
        group, notes = _int4_group(view, int4_group) if int4 else (None, [])
        hf.save_hf_dir(dst, view, DTYPES[dtype or "bf16"], max_shard_bytes, group)
        return [*view.notes, *notes, *(_qat_not_started(view) if int4 else [])]
    if to == "megajoy":
        native.save_model_dir(dst, view, DTYPES[dtype or "fp32"], max_shard_bytes)
    else:
        fallbacks = gguf_export.save_gguf(dst, view, gguf_type, DTYPES[dtype or "bf16"], tokenizer_pre)
        quantised = gguf_type in (*gguf_export.BLOCK_TYPES, "qat")
        return [*view.notes, *_gguf_grid(view, gguf_type), *(_qat_not_started(view) if quantised else []),
                *(f"{name}: rows are not whole 32-wide blocks, written as f16" for name in fallbacks)]
    return list(view.notes)


def _int4_group(view, requested: int | None) -> tuple[int, list[str]]:
    """The INT4 export's group: the one asked for, else the one an INT4 input's experts are packed in (they
    pass through unchanged), else the one the checkpoint's INT4 QAT used (so the export holds exactly the
    weights its forward was trained with), else 64; and a note where the export's grid is not the input's."""
    quant, stored = view.job.quant, view.int4_group()
    trained = quant.qat_group if quant.qat == "int4" else None
    group = requested or stored or trained or 64
    notes = []
    if stored and group != stored:
        notes.append(f"{view.source} holds its routed experts as INT4 in groups of {stored}: re-quantised in "
                     f"groups of {group}, their weights change")
    if quant.qat is not None and group != trained:
        trained_as = f"--qat {quant.qat}" + (f" --qat-group {trained}" if trained else "")
        notes.append(f"{view.source} was trained with {trained_as}: the INT4 export (groups of {group}) holds "
                     "other weights than its forward used")
    return group, notes


def _qat_not_started(view) -> list[str]:
    """A note where a quantised export is of a checkpoint saved before its run's QAT began: its weights were
    never trained on the grid, so the export is plain post-training round-to-nearest."""
    from megajoy.train.checkpoint import TRAINER_STATE, read_trainer_state

    quant = view.job.quant
    if quant.qat is None or not os.path.isfile(os.path.join(view.source, TRAINER_STATE)):  # a training checkpoint
        return []
    step = read_trainer_state(view.source).get("step")
    if step is None or step > quant.qat_start_iter:
        return []
    return [f"{view.source} is step {step}, before its QAT (--qat {quant.qat}) starts at --qat-start-iter "
            f"{quant.qat_start_iter}: no step trained on the quantisation grid, so the quantised weights are plain "
            f"round-to-nearest"]


def _gguf_grid(view, gguf_type: str) -> list[str]:
    """A note where a GGUF quantisation is not the grid the checkpoint's QAT trained on."""
    qat = view.job.quant.qat
    if qat is None or gguf_type not in gguf_export.BLOCK_TYPES or gguf_type == qat:
        return []
    exact = " (--gguf-type qat writes those exactly)" if qat in gguf_export.BLOCK_TYPES else ""
    return [f"{view.source} was trained with --qat {qat}: its {gguf_type} weights are not the ones its forward "
            f"used{exact}"]


def check_output(dst: str, to: str, source: str) -> None:
    """Refuse an output whose replacement would delete what is not a model: a file where a directory goes
    (or the reverse), a directory holding other things, one holding the input (a training run's
    directory, whose checkpoints and logs would go with it), or one of the input's own files. A model
    directory is replaced whole, the input's own included (it is read before the rename)."""
    from megajoy.ckpt.native import CONFIG_NAME

    dst, source = os.path.abspath(dst), os.path.abspath(source)
    if to == "gguf":
        if os.path.isdir(dst):
            raise ValueError(f"output {dst} is a directory: --to gguf writes a file")
        if os.path.exists(dst) and os.path.commonpath([dst, source]) == source and not dst.endswith(".gguf"):
            raise ValueError(f"output {dst} is a file of the input {source}: writing the GGUF there would destroy "
                             "the input (name a .gguf file)")
        return
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise ValueError(f"output {dst} exists and is not a directory: --to {to} writes a directory")
    if dst != source and os.path.commonpath([dst, source]) == dst:
        raise ValueError(f"output {dst} contains the input {source}: replacing it would delete the input")
    if os.path.isdir(dst) and os.listdir(dst) and not any(
            os.path.exists(os.path.join(dst, name)) for name in ("config.json", CONFIG_NAME)):
        raise ValueError(f"output {dst} is a directory that holds no model (no config.json or {CONFIG_NAME}): "
                         "refusing to replace it")
