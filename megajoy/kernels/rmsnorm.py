"""RMSNorm: x / sqrt(mean(x^2) + eps) * weight, with the statistics in fp32 (as DeepSeek-V3 does).

`rms_norm` is the torch reference; on the fast path one Triton program normalises a row in a single
pass (forward) and the backward reads x and dy once, writing dx and per-program partial sums of dw.
"""

import torch

from megajoy.kernels.backend import use_triton


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x) and x.shape[-1] <= 16384:
        return _TritonRMSNorm.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class _TritonRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        from megajoy.kernels import rmsnorm_triton as k

        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        weight = weight.contiguous()  # the kernels read it as one dense row
        y2, rstd = k.forward(x2, weight, eps, torch.promote_types(x.dtype, weight.dtype))
        ctx.save_for_backward(x2, weight, rstd)
        return y2.view(*x.shape[:-1], x.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        from megajoy.kernels import rmsnorm_triton as k

        x2, weight, rstd = ctx.saved_tensors
        dx2, dw = k.backward(dy.reshape(-1, dy.shape[-1]).contiguous(), x2, weight, rstd)
        return dx2.view(dy.shape), dw.to(weight.dtype), None
