"""megajoy's own model directory: `model.safetensors` (megajoy names), `config.yaml` (the job config)
and, when there is one, `tokenizer.json`."""

import os

import torch
import yaml

from megajoy.ckpt.atomic import atomic_directory
from megajoy.ckpt.safetensors_io import SafetensorsDir, write_safetensors_dir
from megajoy.config import JobConfig
from megajoy.data.tokenizer import copy_tokenizer

CONFIG_NAME = "config.yaml"
TOKENIZER_NAME = "tokenizer.json"


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers, with tied weights stored once."""
    state = model.state_dict()
    if getattr(model, "cfg", None) is not None and model.cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def megajoy_entries(view, dtype: torch.dtype = torch.float32) -> list:
    """megajoy's own tensors (experts stacked per layer) from any view, produced while written. The
    router bias stays fp32."""
    from megajoy.ckpt.safetensors_io import TensorEntry

    cfg = view.cfg
    inter, hidden, n = cfg.moe_intermediate_size, cfg.hidden_size, cfg.n_routed_experts
    entries = []
    for name in view.dense_names():
        out = torch.float32 if name.endswith("e_score_correction_bias") else dtype
        entries.append(TensorEntry(name, out, view.dense_shape(name),
                                   lambda name=name: (view.dense(name),)))
    for layer in view.moe_layers():
        def gate_up(layer=layer):
            for e in range(n):
                yield view.expert(layer, e, "gate_proj")
                yield view.expert(layer, e, "up_proj")

        def down(layer=layer):
            for e in range(n):
                yield view.expert(layer, e, "down_proj")

        entries.append(TensorEntry(f"layers.{layer}.mlp.experts.gate_up_proj", dtype, (n, 2 * inter, hidden), gate_up))
        entries.append(TensorEntry(f"layers.{layer}.mlp.experts.down_proj", dtype, (n, hidden, inter), down))
    return entries


def save_model_dir(directory: str, view, dtype: torch.dtype = torch.float32, max_shard_bytes: int = 5 * 10**9) -> None:
    with atomic_directory(directory) as tmp:
        write_safetensors_dir(tmp, megajoy_entries(view, dtype), max_shard_bytes)
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            yaml.safe_dump(view.job.to_dict(), f, sort_keys=False)
        if view.tokenizer:
            copy_tokenizer(view.tokenizer, tmp)


def read_job_config(directory: str) -> JobConfig:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} is not a megajoy checkpoint: {CONFIG_NAME} is missing")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    return JobConfig.from_dict(data, source=path)


def load_model_dir(directory: str) -> tuple[JobConfig, dict[str, torch.Tensor], str | None]:
    """(job config, full model state, tokenizer path or None) from a model directory (safetensors) or a
    training checkpoint (distributed, any layout; read whole in this process)."""
    from megajoy.ckpt import distributed as dcp_io

    job = read_job_config(directory)
    if dcp_io.is_distributed_checkpoint(directory):
        dcp_io.verify_checksums(directory)
        state = dcp_io.read_full_tensors(directory)
    else:
        files = SafetensorsDir(directory)
        state = {name: files.load(name) for name in files.names()}
    tokenizer = os.path.join(directory, TOKENIZER_NAME)
    return job, state, tokenizer if os.path.exists(tokenizer) else None
