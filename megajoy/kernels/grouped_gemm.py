"""Grouped GEMM over experts: rows of x sorted by expert, each block times its expert's matrix.

x_TK: [tokens, in], w_EKN: [experts, in, out] (a transposed view of [E, out, in] is fine),
tokens_per_expert: [E] integer counts summing to tokens. No Python loop over experts.

torch._grouped_mm (CUTLASS on Hopper, a loop of GEMMs on CPU) runs it where its rules allow (bf16 on
CUDA, 16-byte-aligned strides); elsewhere one padded batched GEMM stands in. Autocast does not know
_grouped_mm, so its casts are applied here as F.linear would get them: under bf16 autocast on a GPU
the experts take the grouped kernel, not the padded fallback.
"""

import torch

from megajoy.kernels.backend import cast_as_autocast


def grouped_mm(x_TK: torch.Tensor, w_EKN: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    x_TK, w_EKN = cast_as_autocast(x_TK), cast_as_autocast(w_EKN)
    if _native_grouped_mm_ok(x_TK, w_EKN):
        offsets = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
        if x_TK.dtype != torch.bfloat16 and torch.compiler.is_compiling():
            return _opaque_grouped_mm(x_TK, w_EKN, offsets)
        return _DenseGradient.apply(torch._grouped_mm(x_TK, w_EKN, offs=offsets))
    return padded_grouped_mm(x_TK, w_EKN, tokens_per_expert)


def _dense(dy: torch.Tensor) -> torch.Tensor:
    """A gradient with strides _grouped_mm's backward accepts: an expanded one (a sum()'s) has zero strides,
    which contiguous() keeps where there are no elements (an expert-parallel rank that received no tokens)."""
    return dy.contiguous() if dy.numel() else torch.zeros(dy.shape, dtype=dy.dtype, device=dy.device)


class _DenseGradient(torch.autograd.Function):
    """Identity whose backward hands a dense gradient on to _grouped_mm's own derivative."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        return _dense(dy)


# torch.compile's fake-tensor rule for _grouped_mm accepts bf16 only, while the CPU kernel also runs fp32.
# Under compile an fp32 grouped GEMM goes through these two custom ops instead: opaque to the compiler
# (each with its own shape rule and autograd formula), so the graph does not break at every MoE layer.
@torch.library.custom_op("megajoy::grouped_mm", mutates_args=())
def _opaque_grouped_mm(x_TK: torch.Tensor, w_EKN: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(x_TK, w_EKN, offs=offsets)


@_opaque_grouped_mm.register_fake
def _(x_TK, w_EKN, offsets):
    return x_TK.new_empty(x_TK.shape[0], w_EKN.shape[-1])


@torch.library.custom_op("megajoy::grouped_mm_weight_grad", mutates_args=())
def _opaque_weight_grad(x_TK: torch.Tensor, dy_TN: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[E, K, N]: each expert's x rows transposed times its dy rows."""
    return torch._grouped_mm(x_TK.t(), dy_TN, offs=offsets)


@_opaque_weight_grad.register_fake
def _(x_TK, dy_TN, offsets):
    return x_TK.new_empty(offsets.shape[0], x_TK.shape[1], dy_TN.shape[1])


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy_TN):
    x_TK, w_EKN, offsets = ctx.saved_tensors
    dy_TN = _dense(dy_TN)
    dx = _opaque_grouped_mm(dy_TN, w_EKN.transpose(-2, -1), offsets) if ctx.needs_input_grad[0] else None
    dw = _opaque_weight_grad(x_TK, dy_TN, offsets) if ctx.needs_input_grad[1] else None
    return dx, dw, None


_opaque_grouped_mm.register_autograd(_backward, setup_context=_setup_context)


def _native_grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    # Every non-unit stride must be a multiple of 16 bytes (CPU and CUDA alike); CUDA also wants bf16.
    if not (_aligned(x) and _aligned(w) and (w.shape[-1] * x.element_size()) % 16 == 0):
        return False
    return x.device.type == "cpu" or (x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16)


def _aligned(t: torch.Tensor) -> bool:
    return all(s == 1 or (s * t.element_size()) % 16 == 0 for s in t.stride())


def padded_grouped_mm(x_TK: torch.Tensor, w_EKN: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Fallback: scatter each expert's rows into a zero-padded [E, max_rows, in] block, one bmm, gather back."""
    num_experts = w_EKN.shape[0]
    counts = tokens_per_expert.to(torch.long)
    max_rows = int(counts.max()) if counts.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    expert_of_row = torch.repeat_interleave(torch.arange(num_experts, device=x_TK.device), counts)
    slot_of_row = torch.arange(x_TK.shape[0], device=x_TK.device) - starts[expert_of_row]
    padded = x_TK.new_zeros(num_experts, max_rows, x_TK.shape[1])
    padded = padded.index_put((expert_of_row, slot_of_row), x_TK)
    out = torch.bmm(padded, w_EKN)
    return out[expert_of_row, slot_of_row]
