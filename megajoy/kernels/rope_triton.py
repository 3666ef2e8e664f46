"""Triton kernel for rotary embeddings (imported only where Triton runs): one program per (batch,
position) rotates all of its heads. Forward loads each head's interleaved pairs in one contiguous read,
splits them into evens and odds and writes [x[2j] c - x[2j+1] s | x[2j+1] c + x[2j] s]; the inverse
reads that layout, rotates back and interleaves the pairs into one contiguous write. The head width
must be a power of two (64 for JoyAI)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(X, COS, SIN, Y, S, H, sxb, sxs, sxh, scb, scs, HALF: tl.constexpr,
                 BLOCK_H: tl.constexpr, INVERSE: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // S
    s = pid % S
    heads = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, HALF)[None, :]
    d = tl.arange(0, 2 * HALF)[None, :]
    in_heads = heads < H
    b64, s64 = b.to(tl.int64), s.to(tl.int64)  # strided views of large tensors pass 2**31 elements
    c = tl.load(COS + b64 * scb + s64 * scs + j).to(tl.float32)
    sn = tl.load(SIN + b64 * scb + s64 * scs + j).to(tl.float32)
    x_row = X + b64 * sxb + s64 * sxs + heads * sxh
    y_row = Y + (pid.to(tl.int64) * H + heads) * (2 * HALF)  # Y is contiguous [B, S, H, 2 * HALF]
    if INVERSE:
        g1 = tl.load(x_row + j, mask=in_heads, other=0.0).to(tl.float32)
        g2 = tl.load(x_row + HALF + j, mask=in_heads, other=0.0).to(tl.float32)
        pairs = tl.interleave(g1 * c + g2 * sn, g2 * c - g1 * sn)
        tl.store(y_row + d, pairs.to(Y.dtype.element_ty), mask=in_heads)
    else:
        x = tl.load(x_row + d, mask=in_heads, other=0.0).to(tl.float32)
        even, odd = tl.split(tl.reshape(x, (BLOCK_H, HALF, 2)))
        tl.store(y_row + j, (even * c - odd * sn).to(Y.dtype.element_ty), mask=in_heads)
        tl.store(y_row + HALF + j, (odd * c + even * sn).to(Y.dtype.element_ty), mask=in_heads)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """x [B, S, H, D] with a unit last stride; cos/sin broadcastable to [B, S, D/2]."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    b, s, h, d = x.shape
    cos, sin = cos.expand(b, s, d // 2), sin.expand(b, s, d // 2)
    if cos.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    y = torch.empty((b, s, h, d), device=x.device, dtype=x.dtype)
    if y.numel():
        _rope_kernel[(b * s,)](x, cos, sin, y, s, h, x.stride(0), x.stride(1), x.stride(2),
                               cos.stride(0), cos.stride(1), HALF=d // 2, BLOCK_H=triton.next_power_of_2(h),
                               INVERSE=inverse, num_warps=4)
    return y
