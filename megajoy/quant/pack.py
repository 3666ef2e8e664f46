"""Packed INT4 in compressed-tensors' "pack-quantized" layout (what vLLM and SGLang load): each weight
[out, in] becomes `weight_packed` int32 [out, in / 8] (eight 4-bit codes per word, code i in bits
4i..4i+3, stored as code + 8), `weight_scale` fp32 [out, in / group] and `weight_shape` int64 [2]."""

import torch

from megajoy.quant.formats import WeightFormat


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7] of shape [rows, cols] (cols a multiple of 8) -> int32 [rows, cols / 8]."""
    if codes.shape[-1] % 8:
        raise ValueError(f"packing int4 needs a multiple of 8 columns, got {codes.shape[-1]}")
    nibbles = (codes.to(torch.int64) + 8).unflatten(-1, (-1, 8))
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (nibbles << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    words = packed.to(torch.int64) & 0xFFFFFFFF
    nibbles = (words.unsqueeze(-1) >> torch.arange(0, 32, 4, dtype=torch.int64)) & 0xF
    return (nibbles - 8).flatten(-2).to(torch.int8)


def compressed_tensors_config(group: int) -> dict:
    """config.json's quantization_config: symmetric int4 groups on the routed experts' projections. vLLM and
    SGLang refuse a checkpoint with a linear layer that matches neither a target nor an ignore entry ("Unable
    to find matching target"), so every other projection (attention, shared experts, dense MLPs, the router,
    MTP's) is listed as ignored, as released INT4 MoE checkpoints list them."""
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": [r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                        "group_size": group, "dynamic": False, "observer": "minmax"},
            "input_activations": None, "output_activations": None, "format": "pack-quantized"}},
        "ignore": ["lm_head", r"re:.*self_attn\..*", r"re:.*shared_experts\..*",
                   r"re:.*mlp\.(gate|up|gate_up|down)_proj$", r"re:.*mlp\.gate$", r"re:.*eh_proj$",
                   r"re:.*shared_head\.head$"],
        "kv_cache_scheme": None,
    }


def pack_ggml(codes: torch.Tensor, scales: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """q8_0 / q4_0 codes and fp16 block scales -> ggml's block bytes, uint8 [..., n / 32 * block bytes].
    q8_0 block: d (fp16) then 32 int8; q4_0 block: d (fp16) then 16 bytes, byte j holding the codes of
    j (low nibble) and j + 16 (high nibble), each stored as code + 8."""
    if fmt.name not in ("q8_0", "q4_0"):
        raise ValueError(f"{fmt.name} is not a ggml block format")
    blocks = codes.unflatten(-1, (-1, 32))
    d = scales.to(torch.float16).unsqueeze(-1).view(torch.uint8)  # [..., n / 32, 2], little-endian
    if fmt.name == "q8_0":
        qs = blocks.view(torch.uint8)
    else:
        nibbles = (blocks + 8).to(torch.uint8)
        qs = nibbles[..., :16] | (nibbles[..., 16:] << 4)
    return torch.cat([d, qs], dim=-1).flatten(-2)
