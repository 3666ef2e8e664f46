"""megajoy <-> Hugging Face DeepSeek-V3 names, tensors and config.json.

megajoy keeps routed experts stacked ([E, 2I, H] gate_up, [E, H, I] down) and the MTP module under
`mtp.{k}`; the Hugging Face layout (the one DeepSeek-V3 and JoyAI-Flash checkpoints ship) has one tensor
per expert and projection, and the MTP module as decoder layer `num_hidden_layers + k` with copies of the
embedding and output head (`embed_tokens`, `shared_head.head`) that inference engines load from there.
Conversions are generators over (name, tensor) pairs so callers can stream them.
"""

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping

import torch

from megajoy.config import ModelConfig

_EXPERTS = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_HF_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")

# Hugging Face config.json fields megajoy's ModelConfig carries under the same names.
HF_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "first_k_dense_replace", "scoring_func",
    "topk_method", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor", "max_position_embeddings",
    "rope_theta", "rope_scaling", "rope_interleave", "rms_norm_eps", "hidden_act", "tie_word_embeddings",
    "num_nextn_predict_layers", "bos_token_id", "eos_token_id", "initializer_range", "attention_bias",
)


# ------------------------------------------------------------------------------------------ config.json

def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> dict:
    d = {name: getattr(cfg, name) for name in HF_FIELDS}
    d.update(
        architectures=["DeepseekV3ForCausalLM"],
        model_type="deepseek_v3",
        num_key_value_heads=cfg.num_attention_heads,
        attention_dropout=0.0,
        use_cache=True,
        dtype=str(dtype).removeprefix("torch."),
    )
    return d


def model_config_from_hf(d: Mapping, source: str = "config.json") -> ModelConfig:
    if d.get("model_type") not in ("deepseek_v3", "joyai", None):
        raise ValueError(f"{source}: model_type {d.get('model_type')!r} is not a DeepSeek-V3-family model")
    kwargs = {k: d[k] for k in HF_FIELDS if k in d}
    params = d.get("rope_parameters")  # transformers 5 writes rope settings here
    if isinstance(params, dict):
        kwargs.setdefault("rope_theta", params.get("rope_theta", ModelConfig.rope_theta))
        if params.get("rope_type", "default") != "default" and not kwargs.get("rope_scaling"):
            kwargs["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    if isinstance(kwargs.get("eos_token_id"), list):
        kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
    try:
        return ModelConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def generation_config(cfg: ModelConfig) -> dict:
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}


# ------------------------------------------------------------------------------------------ names

def to_hf_name(name: str, cfg: ModelConfig) -> str:
    """Name of a non-expert megajoy tensor in the Hugging Face layout."""
    if name.startswith("mtp."):
        k, rest = name[len("mtp."):].split(".", 1)
        prefix = f"model.layers.{cfg.num_hidden_layers + int(k)}."
        if rest.startswith("decoder."):
            return prefix + rest[len("decoder."):]
        if rest.startswith("norm."):
            return prefix + "shared_head." + rest
        return prefix + rest
    if name == "lm_head.weight":
        return name
    return "model." + name


def from_hf_name(hf_name: str, cfg: ModelConfig) -> str | None:
    """Inverse of `to_hf_name`; None for the MTP's copies of the embedding and head."""
    if hf_name == "lm_head.weight":
        return hf_name
    if not hf_name.startswith("model."):
        raise ValueError(f"tensor {hf_name!r} is not a DeepSeek-V3 weight name")
    name = hf_name[len("model."):]
    m = re.match(r"^layers\.(\d+)\.(.*)$", name)
    if m is None or int(m.group(1)) < cfg.num_hidden_layers:
        return name
    k = int(m.group(1)) - cfg.num_hidden_layers
    if k >= cfg.num_nextn_predict_layers:
        raise ValueError(f"tensor {hf_name!r}: layer {m.group(1)} is beyond num_hidden_layers="
                         f"{cfg.num_hidden_layers} + num_nextn_predict_layers={cfg.num_nextn_predict_layers}")
    rest = m.group(2)
    if rest in ("embed_tokens.weight", "shared_head.head.weight"):
        return None
    if rest.startswith(("enorm.", "hnorm.", "eh_proj.")):
        return f"mtp.{k}.{rest}"
    if rest.startswith("shared_head.norm."):
        return f"mtp.{k}.{rest[len('shared_head.'):]}"
    return f"mtp.{k}.decoder.{rest}"


# ------------------------------------------------------------------------------------------ tensors

def export_tensors(cfg: ModelConfig, state: Mapping[str, torch.Tensor], int4=None) -> Iterator[tuple[str, torch.Tensor]]:
    """megajoy state -> Hugging Face (name, tensor) pairs, one tensor at a time. With `int4` (a
    WeightFormat), routed experts come out packed (compressed-tensors pack-quantized)."""
    from megajoy.quant.pack import packed_tensors

    for name, tensor in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        m = _EXPERTS.match(name)
        if not m:
            yield to_hf_name(name, cfg), tensor
        elif int4 is None:
            yield from _split_experts(int(m.group(1)), m.group(2), tensor, cfg)
        else:
            for hf_name, expert in _split_experts(int(m.group(1)), m.group(2), tensor, cfg):
                yield from packed_tensors(hf_name, expert, int4)
    for k in range(cfg.num_nextn_predict_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}."
        head = "embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        yield prefix + "embed_tokens.weight", state["embed_tokens.weight"].clone()
        yield prefix + "shared_head.head.weight", state[head].clone()


def _split_experts(layer: int, kind: str, stacked: torch.Tensor, cfg: ModelConfig):
    inter = cfg.moe_intermediate_size
    for e in range(stacked.shape[0]):
        prefix = f"model.layers.{layer}.mlp.experts.{e}."
        if kind == "gate_up_proj":
            yield prefix + "gate_proj.weight", stacked[e, :inter]
            yield prefix + "up_proj.weight", stacked[e, inter:]
        else:
            yield prefix + "down_proj.weight", stacked[e]


def import_tensors(cfg: ModelConfig, names: list[str], load: Callable[[str], torch.Tensor]
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Hugging Face names (with a loader for each) -> megajoy (name, tensor) pairs; experts are stacked
    per layer as soon as that layer's expert tensors have been read."""
    expert_names: dict[int, dict[tuple[int, str], str]] = {}
    for hf_name in names:
        m = _HF_EXPERT.match(hf_name)
        if m:
            layer, e, proj = int(m.group(1)), int(m.group(2)), m.group(3)
            expert_names.setdefault(layer, {})[(e, proj)] = hf_name
            continue
        name = from_hf_name(hf_name, cfg)
        if name is not None:
            yield name, load(hf_name)
    for layer, found in sorted(expert_names.items()):
        yield from _stack_experts(layer, found, load, cfg)


def _stack_experts(layer: int, found: dict, load: Callable, cfg: ModelConfig):
    n = cfg.n_routed_experts
    missing = [f"model.layers.{layer}.mlp.experts.{e}.{p}.weight" for e in range(n)
               for p in ("gate_proj", "up_proj", "down_proj") if (e, p) not in found]
    if missing:
        raise ValueError(f"layer {layer}: {len(missing)} expert tensors missing, first {missing[0]}")
    if len(found) != 3 * n:
        extra = sorted(v for (e, _), v in found.items() if e >= n)
        raise ValueError(f"layer {layer}: expert tensor {extra[0]} is beyond n_routed_experts={n}")
    gate_up = torch.stack([torch.cat((load(found[(e, "gate_proj")]), load(found[(e, "up_proj")])))
                           for e in range(n)])
    yield f"layers.{layer}.mlp.experts.gate_up_proj", gate_up
    del gate_up
    yield f"layers.{layer}.mlp.experts.down_proj", torch.stack([load(found[(e, "down_proj")]) for e in range(n)])


# ------------------------------------------------------------------------------------------ directories

def save_hf_dir(directory: str, cfg: ModelConfig, state: Mapping[str, torch.Tensor],
                dtype: torch.dtype = torch.bfloat16, tokenizer_file: str | None = None,
                max_shard_bytes: int = 5 * 2**30, int4_group: int | None = None) -> None:
    """A Hugging Face model directory, written atomically: weights (sharded safetensors), config.json,
    generation_config.json and the tokenizer. The router bias stays fp32 (DeepSeek-V3 keeps it so).
    With `int4_group`, the routed experts are packed INT4 with fp32 group scales (the rest in `dtype`)."""
    from megajoy.ckpt.atomic import atomic_directory
    from megajoy.ckpt.safetensors_io import ShardedWriter
    from megajoy.data.tokenizer import write_hf_tokenizer_files

    with atomic_directory(directory) as tmp:
        from megajoy.quant.formats import WeightFormat
        from megajoy.quant.pack import compressed_tensors_config

        int4 = WeightFormat.of("int4", int4_group) if int4_group else None
        writer = ShardedWriter(tmp, max_shard_bytes)
        for name, tensor in export_tensors(cfg, state, int4):
            writer.add(name, _export_dtype(name, tensor, dtype))
        writer.close()
        config = hf_config(cfg, dtype)
        if int4 is not None:
            config["quantization_config"] = compressed_tensors_config(int4.group)
        _write_json(os.path.join(tmp, "config.json"), config)
        _write_json(os.path.join(tmp, "generation_config.json"), generation_config(cfg))
        if tokenizer_file:
            write_hf_tokenizer_files(tokenizer_file, tmp, cfg)


def load_hf_dir(directory: str, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from megajoy.ckpt.safetensors_io import SafetensorsDir

    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} is not a Hugging Face model directory: config.json is missing")
    with open(path) as f:
        cfg = model_config_from_hf(json.load(f), source=path)
    files = SafetensorsDir(directory)
    state = {}
    for name, tensor in import_tensors(cfg, files.names(), files.load):
        keep_fp32 = name.endswith("e_score_correction_bias")
        state[name] = tensor.to(torch.float32 if keep_fp32 else dtype)
    return cfg, state


def _export_dtype(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The router bias and INT4 scales stay fp32, packed codes and shapes keep their integer types."""
    if not tensor.is_floating_point():
        return tensor
    keep_fp32 = name.endswith(("e_score_correction_bias", ".weight_scale"))
    return tensor.to(torch.float32 if keep_fp32 else dtype)


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
