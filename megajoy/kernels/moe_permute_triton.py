"""Triton kernels behind the MoE permute / unpermute (imported only where Triton runs). Each program
owns one output row and walks the hidden dimension (a compile-time constant) in blocks."""

import torch
import triton
import triton.language as tl

BLOCK_H = 1024


@triton.jit
def _gather_rows_kernel(SRC, INDEX, SCALE, OUT, H: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    src_row = tl.load(INDEX + row).to(tl.int64)
    if HAS_SCALE:
        scale = tl.load(SCALE + row).to(tl.float32)
    for start in range(0, H, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < H
        v = tl.load(SRC + src_row * H + cols, mask=mask, other=0.0)
        if HAS_SCALE:
            v = v.to(tl.float32) * scale
        tl.store(OUT + row.to(tl.int64) * H + cols, v.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gather_sum_kernel(SRC, INDEX, WEIGHT, OUT, H: tl.constexpr, K: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                       BLOCK: tl.constexpr):
    token = tl.program_id(0)
    for start in range(0, H, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < H
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in tl.static_range(K):
            src_row = tl.load(INDEX + token * K + k).to(tl.int64)
            v = tl.load(SRC + src_row * H + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                v = v * tl.load(WEIGHT + token * K + k).to(tl.float32)
            acc += v
        tl.store(OUT + token.to(tl.int64) * H + cols, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _row_dots_kernel(A, INDEX, B, OUT, H: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    for k in tl.static_range(K):
        src_row = tl.load(INDEX + token * K + k).to(tl.int64)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, H, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < H
            a = tl.load(A + token.to(tl.int64) * H + cols, mask=mask, other=0.0).to(tl.float32)
            b = tl.load(B + src_row * H + cols, mask=mask, other=0.0).to(tl.float32)
            acc += a * b
        tl.store(OUT + token * K + k, tl.sum(acc, axis=0))


def _block(h: int) -> int:
    return min(BLOCK_H, triton.next_power_of_2(h))


def gather_rows(src: torch.Tensor, index: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """out[r] = scale[r] * src[index[r]] (scale optional)."""
    src = src.contiguous()
    out = torch.empty((index.numel(), src.shape[1]), device=src.device, dtype=src.dtype)
    if out.numel():
        _gather_rows_kernel[(index.numel(),)](src, index, scale if scale is not None else index, out, src.shape[1],
                                              HAS_SCALE=scale is not None, BLOCK=_block(src.shape[1]), num_warps=4)
    return out


def gather_sum(src: torch.Tensor, index_TK: torch.Tensor, weight_TK: torch.Tensor | None) -> torch.Tensor:
    """out[t] = sum_k weight[t, k] * src[index[t, k]] (weight optional), accumulated in fp32."""
    src = src.contiguous()
    tokens, k = index_TK.shape
    out = torch.empty((tokens, src.shape[1]), device=src.device, dtype=src.dtype)
    if out.numel():
        weight = weight_TK.contiguous() if weight_TK is not None else index_TK
        _gather_sum_kernel[(tokens,)](src, index_TK.contiguous(), weight, out, src.shape[1], K=k,
                                      HAS_WEIGHT=weight_TK is not None, BLOCK=_block(src.shape[1]), num_warps=4)
    return out


def row_dots(a_TH: torch.Tensor, index_TK: torch.Tensor, b_RH: torch.Tensor) -> torch.Tensor:
    """out[t, k] = a[t] . b[index[t, k]] in fp32."""
    tokens, k = index_TK.shape
    out = torch.empty((tokens, k), device=a_TH.device, dtype=torch.float32)
    if out.numel():
        _row_dots_kernel[(tokens,)](a_TH.contiguous(), index_TK.contiguous(), b_RH.contiguous(), out,
                                    a_TH.shape[1], K=k, BLOCK=_block(a_TH.shape[1]), num_warps=4)
    return out
