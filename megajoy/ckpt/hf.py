"""megajoy <-> Hugging Face DeepSeek-V3 names, tensors and config.json.

megajoy keeps routed experts stacked ([E, 2I, H] gate_up, [E, H, I] down) and the MTP module under
`mtp.{k}`; the Hugging Face layout (the one DeepSeek-V3 and JoyAI-Flash checkpoints ship) has one tensor
per expert and projection, and the MTP module as decoder layer `num_hidden_layers + k` with copies of the
embedding and output head (`embed_tokens`, `shared_head.head`) that inference engines load from there.
Tensors are read from a `CheckpointView` (megajoy/ckpt/view.py) and written one at a time.
"""

import functools
import itertools
import json
import os
import re
from collections.abc import Mapping

import torch

from megajoy.config import ModelConfig, build_checked


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


# Fields that shape the model, whose defaults differ between megajoy (JoyAI's) and transformers
# (DeepSeek-V3's): a config without them is refused rather than read as either model.
SHAPE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "first_k_dense_replace", "n_group", "topk_group",
)
HF_ROPE_THETA = 10000.0  # DeepseekV3Config's, where config.json gives none


def model_config_from_hf(d: Mapping, source: str = "config.json") -> ModelConfig:
    if not isinstance(d, Mapping):
        raise ValueError(f"{source}: expected a JSON object of config fields, got a {type(d).__name__}")
    if d.get("model_type") not in ("deepseek_v3", "joyai", None):
        raise ValueError(f"{source}: model_type {d.get('model_type')!r} is not a DeepSeek-V3-family model")
    missing = [k for k in SHAPE_FIELDS if k not in d]
    if missing:
        raise ValueError(f"{source}: no {missing[0]!r} ({len(missing)} model-shaping field(s) missing: "
                         f"{', '.join(missing)}); megajoy's and transformers' defaults differ, so it does not guess")
    kwargs = {k: d[k] for k in HF_FIELDS if k in d}
    kwargs.setdefault("num_nextn_predict_layers", 0)  # transformers builds no MTP layer
    params = d.get("rope_parameters")  # transformers 5 writes rope settings here
    if isinstance(params, dict):
        if "rope_theta" in params:
            kwargs.setdefault("rope_theta", params["rope_theta"])
        if params.get("rope_type", "default") != "default" and not kwargs.get("rope_scaling"):
            kwargs["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    kwargs.setdefault("rope_theta", HF_ROPE_THETA)
    for token in ("bos_token_id", "eos_token_id"):
        value = kwargs.get(token)
        if isinstance(value, list):
            value = kwargs[token] = value[0] if value else None
        if token in kwargs and not isinstance(value, int):
            raise ValueError(f"{source}: {token} must be a token id (or a non-empty list of them), got {d[token]!r}")
    try:  # each field's type checked, so that an error names the field
        return build_checked(ModelConfig, kwargs, "config")
    except ValueError as e:
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

def hf_entries(view, dtype: torch.dtype, int4=None) -> list:
    """The Hugging Face file's tensors, in order, each produced from `view` only while it is written.
    Routed experts follow their layer's other tensors; with `int4` (a WeightFormat) they come out packed
    (compressed-tensors pack-quantized). The router bias stays fp32, as DeepSeek-V3 keeps it."""
    from megajoy.ckpt.safetensors_io import TensorEntry

    cfg, entries = view.cfg, []
    for layer, names in itertools.groupby(sorted(view.dense_names(), key=_file_position), key=_layer_of):
        for name in names:
            keep_fp32 = name.endswith("e_score_correction_bias")
            entries.append(TensorEntry(to_hf_name(name, cfg), torch.float32 if keep_fp32 else dtype,
                                       view.dense_shape(name), _reader(view.served, name)))
        if layer in view.moe_layers():
            entries.extend(_expert_entries(view, layer, dtype, int4))
    head = "embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    for k in range(cfg.num_nextn_predict_layers):  # the MTP layer's own copies, where engines look for them
        prefix = f"model.layers.{cfg.num_hidden_layers + k}."
        entries.append(TensorEntry(prefix + "embed_tokens.weight", dtype, view.dense_shape("embed_tokens.weight"),
                                   _reader(view.dense, "embed_tokens.weight")))
        entries.append(TensorEntry(prefix + "shared_head.head.weight", dtype, view.dense_shape(head),
                                   _reader(view.dense, head)))
    return entries


def _file_position(name: str) -> int:
    """Embedding, then the layers in order, then the rest (a distributed checkpoint lists its tensors
    by pipeline stage, not by layer)."""
    layer = _layer_of(name)
    if layer is not None:
        return layer
    return -1 if name.startswith("embed_tokens.") else 1 << 30


def _layer_of(name: str) -> int | None:
    m = re.match(r"^layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _reader(load, *args):
    return lambda: (load(*args),)


def _expert_entries(view, layer: int, dtype: torch.dtype, int4) -> list:
    from megajoy.ckpt.safetensors_io import TensorEntry

    entries = []
    for e in range(view.cfg.n_routed_experts):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            name = f"model.layers.{layer}.mlp.experts.{e}.{proj}."
            shape = view.expert_shape(proj)
            if int4 is None:
                entries.append(TensorEntry(name + "weight", dtype, shape, _reader(view.expert, layer, e, proj)))
            else:
                quantize = functools.partial(_int4_expert, view, layer, e, proj, int4)
                entries.extend(_packed_entries(name, shape, quantize, int4))
    return entries


def _int4_expert(view, layer: int, e: int, proj: str, int4) -> tuple[torch.Tensor, torch.Tensor]:
    """An expert's int4 (codes, scales): as the input holds them where it stores them packed in these groups
    (quantising their dequantised values again would move them: the max / 7.5 grid is not idempotent)."""
    stored = view.expert_int4(layer, e, proj, int4.group)
    return stored if stored is not None else int4.quantize(view.expert(layer, e, proj))


def _packed_entries(prefix: str, shape: tuple[int, int], quantize, int4) -> list:
    """NAME.weight_packed / weight_scale / weight_shape, quantising the weight once for the first two."""
    from megajoy.ckpt.safetensors_io import TensorEntry
    from megajoy.quant.pack import pack_int4

    rows, cols = shape
    if cols % int4.group:
        raise ValueError(f"{prefix}weight: input dimension {cols} is not a multiple of the int4 group {int4.group}")
    cache = {}

    def quantized():
        if not cache:
            cache["q"] = quantize()
        return cache["q"]

    def codes():
        yield pack_int4(quantized()[0])

    def scales():
        yield quantized()[1].float()
        cache.clear()

    return [TensorEntry(prefix + "weight_packed", torch.int32, (rows, cols // 8), codes),
            TensorEntry(prefix + "weight_scale", torch.float32, (rows, cols // int4.group), scales),
            TensorEntry.of(prefix + "weight_shape", torch.tensor([rows, cols], dtype=torch.int64))]


# ------------------------------------------------------------------------------------------ directories

def save_hf_dir(directory: str, view, dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 5 * 10**9,
                int4_group: int | None = None) -> None:
    """A Hugging Face model directory, written atomically and one tensor at a time: weights (sharded
    safetensors), config.json, generation_config.json and the tokenizer. With `int4_group`, the routed
    experts are packed INT4 with fp32 group scales (the rest in `dtype`)."""
    from megajoy.ckpt.atomic import atomic_directory
    from megajoy.ckpt.safetensors_io import write_safetensors_dir
    from megajoy.data.tokenizer import write_hf_tokenizer_files
    from megajoy.quant.formats import WeightFormat
    from megajoy.quant.pack import compressed_tensors_config

    # Not WeightFormat.of, which allows QAT's groups only: an INT4 input's experts pass through in any group.
    int4 = WeightFormat("int4", int4_group) if int4_group else None
    entries = hf_entries(view, dtype, int4)
    with atomic_directory(directory) as tmp:
        write_safetensors_dir(tmp, entries, max_shard_bytes)
        config = hf_config(view.cfg, dtype)
        if int4 is not None:
            config["quantization_config"] = compressed_tensors_config(int4.group)
        _write_json(os.path.join(tmp, "config.json"), config)
        _write_json(os.path.join(tmp, "generation_config.json"), generation_config(view.cfg))
        if view.tokenizer:
            write_hf_tokenizer_files(view.tokenizer, tmp, view.cfg)


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
