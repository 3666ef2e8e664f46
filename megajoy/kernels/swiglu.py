"""SwiGLU's element-wise part, silu(gate) * up, for the dense MLPs and the routed experts.

`swiglu(gate, up)` takes two tensors; `swiglu_packed(gate_up)` the experts' fused [.., 2I] projection
output (gate first), whose gradient is then one [.., 2I] tensor, as the GEMM's backward wants it. The
torch reference runs two kernels and keeps silu(gate) for backward; the Triton path is one pass each
way and keeps only the inputs (on a GPU, see megajoy.kernels.backend).
"""

import torch
import torch.nn.functional as F

from megajoy.kernels.backend import use_triton


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if use_triton(gate) and gate.shape == up.shape:
        return _TritonSwiGLU.apply(gate, up)
    return swiglu_reference(gate, up)


def swiglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    if use_triton(gate_up):
        return _TritonPackedSwiGLU.apply(gate_up)
    return swiglu_reference(*gate_up.chunk(2, dim=-1))


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A [rows, width] view with unit column stride (a copy only when there is none)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class _TritonSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        from megajoy.kernels import swiglu_triton as k

        g2, u2 = _rows(gate), _rows(up)
        ctx.save_for_backward(g2, u2)
        return k.forward(g2, u2).view(*gate.shape[:-1], gate.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        from megajoy.kernels import swiglu_triton as k

        g2, u2 = ctx.saved_tensors
        dg, du = torch.empty_like(g2), torch.empty_like(u2)
        k.backward(g2, u2, _rows(dy), dg, du)
        return dg.view(dy.shape), du.view(dy.shape)


class _TritonPackedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        from megajoy.kernels import swiglu_triton as k

        x2 = _rows(gate_up)
        ctx.save_for_backward(x2)
        half = x2.shape[-1] // 2
        return k.forward(x2[:, :half], x2[:, half:]).view(*gate_up.shape[:-1], half)

    @staticmethod
    def backward(ctx, dy):
        from megajoy.kernels import swiglu_triton as k

        (x2,) = ctx.saved_tensors
        half = x2.shape[-1] // 2
        dx = torch.empty_like(x2)
        k.backward(x2[:, :half], x2[:, half:], _rows(dy), dx[:, :half], dx[:, half:])
        return dx.view(*dy.shape[:-1], 2 * half)
