"""Rotary position embeddings as DeepSeek-V3 lays them out: interleaved pairs (x0, x1), (x2, x3), ...

`rope_frequencies` builds the inverse frequencies (plain or YaRN) and the cos/sin amplitude factor;
`apply_rope` rotates. The rotated output is written de-interleaved, [rotated evens, rotated odds]: one
fixed permutation applied to queries and keys alike, so every q.k product equals the interleaved one
and no re-interleaving copy is needed.
"""

import math

import torch

from megajoy.config import yarn_mscale
from megajoy.kernels.backend import use_triton


def rope_frequencies(dim: int, theta: float, rope_scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] (fp32) and the factor that scales cos and sin (YaRN's mscale ratio)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    inv_freq = 1.0 / (theta ** exponents)
    if not rope_scaling:
        return inv_freq, 1.0
    return _yarn(inv_freq, dim, theta, rope_scaling)


def _yarn(inv_freq: torch.Tensor, dim: int, theta: float, rs: dict) -> tuple[torch.Tensor, float]:
    factor = rs["factor"]
    original = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if rs.get("attention_factor") is not None:  # an explicit amplitude, as transformers takes it
        amplitude = rs["attention_factor"]
    elif mscale and mscale_all_dim:
        amplitude = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
        amplitude = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):  # transformers' option (gpt-oss): the ramp's ends on whole dimensions
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep_original = 1 - ramp  # 1 for the fast (high-frequency) dimensions, which are not interpolated
    inv_freq = (inv_freq / factor) * (1 - keep_original) + inv_freq * keep_original
    return inv_freq, amplitude


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, amplitude: float):
    """cos, sin of shape position_ids.shape + [dim/2], in fp32."""
    angles = position_ids.unsqueeze(-1).float() * inv_freq.to(position_ids.device)
    return angles.cos() * amplitude, angles.sin() * amplitude


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, S, H, D]; cos/sin: [B, S, D/2]. Computes in fp32 and returns x's dtype (contiguous)."""
    width = x.shape[-1]
    if use_triton(x) and x.stride(-1) == 1 and width >= 4 and width & (width - 1) == 0:
        return _TritonRope.apply(x, cos, sin)
    return apply_rope_reference(x, cos, sin)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x32 = x.float()
    even, odd = x32[..., 0::2], x32[..., 1::2]
    return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1).to(x.dtype)


class _TritonRope(torch.autograd.Function):
    """One pass over x (any strides but a unit last one) into the de-interleaved output; the backward
    rotates the gradient back by the negative angle into the interleaved layout."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        from megajoy.kernels import rope_triton

        ctx.save_for_backward(cos, sin)
        return rope_triton.rotate(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, grad):
        from megajoy.kernels import rope_triton

        cos, sin = ctx.saved_tensors
        return rope_triton.rotate(grad, cos, sin, inverse=True), None, None
