"""megajoy's own model directory: `model.safetensors` (megajoy names), `config.yaml` (the job config)
and, when there is one, `tokenizer.json`."""

import os
import shutil

import torch
import yaml

from megajoy.ckpt.atomic import atomic_directory
from megajoy.ckpt.safetensors_io import SafetensorsDir, ShardedWriter
from megajoy.config import JobConfig

CONFIG_NAME = "config.yaml"
TOKENIZER_NAME = "tokenizer.json"


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers, with tied weights stored once."""
    state = model.state_dict()
    if getattr(model, "cfg", None) is not None and model.cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def write_model_files(directory: str, job: JobConfig, state: dict[str, torch.Tensor],
                      tokenizer_file: str | None = None) -> None:
    """Write into an existing directory (the caller decides about atomicity)."""
    writer = ShardedWriter(directory)
    for name, tensor in state.items():
        writer.add(name, tensor)
    writer.close()
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        yaml.safe_dump(job.to_dict(), f, sort_keys=False)
    if tokenizer_file:
        shutil.copyfile(tokenizer_file, os.path.join(directory, TOKENIZER_NAME))


def save_model_dir(directory: str, job: JobConfig, state: dict[str, torch.Tensor],
                   tokenizer_file: str | None = None) -> None:
    with atomic_directory(directory) as tmp:
        write_model_files(tmp, job, state, tokenizer_file)


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



def load_state_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`load_state_dict` with one error naming the first missing, unexpected or mis-shaped tensor."""
    check_state(model, state, source)
    model.load_state_dict(state, strict=False)


def check_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor of `model` present in `state`, none unknown, each shaped as the model's (meta is fine)."""
    expected = model.state_dict()
    if getattr(model, "cfg", None) is not None and model.cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise ValueError(f"{source}: {len(missing)} tensor(s) missing, first {missing[0]!r}")
    if unexpected:
        raise ValueError(f"{source}: unknown tensor {unexpected[0]!r} ({len(unexpected)} unknown in all)")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, the config "
                             f"expects {tuple(expected[name].shape)}")
