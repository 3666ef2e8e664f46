"""Triton kernels for SwiGLU, silu(gate) * up (imported only where Triton runs). Gate and up are row-strided
[M, N] views (the two halves of the experts' [M, 2N] GEMM output, or two separate tensors); a program
handles a BLOCK_M x BLOCK_N tile. The forward reads gate and up once and writes the product; the backward
reads gate, up and dy once and writes both input gradients, recomputing sigmoid instead of keeping it."""

import torch
import triton
import triton.language as tl


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows[:, None].to(tl.int64), cols[None, :], (rows[:, None] < M) & (cols[None, :] < N)


@triton.jit
def _forward_kernel(G, U, Y, M, N, stride_g, stride_u, stride_y, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, cols, mask = _tile(M, N, BLOCK_M, BLOCK_N)
    g = tl.load(G + rows * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + rows * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(G, U, DY, DG, DU, M, N, stride_g, stride_u, stride_dy, stride_dg, stride_du,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, cols, mask = _tile(M, N, BLOCK_M, BLOCK_N)
    g = tl.load(G + rows * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DU + rows * stride_du + cols, (dy * silu).to(DU.dtype.element_ty), mask=mask)
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))  # d silu / dg = sig + g sig (1 - sig)
    tl.store(DG + rows * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)


def _blocks(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, warps): tiles of about 4096 elements, up to 1024 columns wide."""
    block_n = min(1024, triton.next_power_of_2(n))
    return max(1, 4096 // block_n), block_n, 4


def _grid(m: int, n: int, block_m: int, block_n: int) -> tuple[int, int]:
    return triton.cdiv(m, block_m), triton.cdiv(n, block_n)


def forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    m, n = gate.shape
    y = torch.empty((m, n), device=gate.device, dtype=torch.promote_types(gate.dtype, up.dtype))
    block_m, block_n, warps = _blocks(n)
    if m and n:
        _forward_kernel[_grid(m, n, block_m, block_n)](gate, up, y, m, n, gate.stride(0), up.stride(0), y.stride(0),
                                                       BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return y


def backward(gate: torch.Tensor, up: torch.Tensor, dy: torch.Tensor, dgate: torch.Tensor, dup: torch.Tensor) -> None:
    """Writes the gradients into dgate and dup (views, possibly the two halves of one buffer)."""
    m, n = gate.shape
    block_m, block_n, warps = _blocks(n)
    if m and n:
        _backward_kernel[_grid(m, n, block_m, block_n)](
            gate, up, dy, dgate, dup, m, n, gate.stride(0), up.stride(0), dy.stride(0), dgate.stride(0), dup.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
