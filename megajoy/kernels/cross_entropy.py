"""Output projection and cross-entropy in one op that never holds the full logits.

`linear_cross_entropy(h, W, target)` equals cross_entropy(h @ W^T, target) per token. Tokens go through
in chunks: the forward keeps only each token's log-sum-exp, the backward recomputes a chunk's logits,
forms (softmax - one_hot) * grad there and folds it into dh and dW at once. Peak extra memory is one
chunk's fp32 logits, [chunk, V], instead of the whole micro-batch's (for JoyAI's 129,280-token
vocabulary, 2.1 GB per 4,096 tokens); the price is one more N x V x K matmul (the recomputation). Under tensor parallelism W is this rank's vocabulary slice: the chunk's
max, sum of exponentials and target logit are all-reduced over the group (as the vocab-parallel
cross-entropy does), and dh is this slice's partial sum, which the caller's enter_tp sums in backward.

The matmuls run in the autocast dtype when autocast is on (as F.linear would), logits and the softmax
in fp32.
"""

import torch
import torch.distributed as dist

from megajoy.kernels.backend import autocast_dtype
from megajoy.parallel.mappings import group_rank, group_size


def linear_cross_entropy(h_NK: torch.Tensor, w_VK: torch.Tensor, target_N: torch.Tensor, group=None,
                         chunk: int = 4096) -> torch.Tensor:
    """Per-token loss [N] in fp32. `w_VK` is the rank's vocabulary slice under `group`. Negative targets
    (-100, as F.cross_entropy's ignore_index) give loss 0 and no gradient."""
    if chunk <= 0:
        raise ValueError(f"linear_cross_entropy: chunk={chunk} must be positive")
    return _LinearCrossEntropy.apply(h_NK, w_VK, target_N, group, chunk, autocast_dtype(h_NK))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_NK, w_VK, target_N, group, chunk, compute_dtype):
        dtype = compute_dtype or torch.promote_types(h_NK.dtype, w_VK.dtype)
        w = w_VK.to(dtype)
        start = group_rank(group) * w_VK.shape[0] if group_size(group) > 1 else 0
        ignored = target_N < 0
        local_target = target_N - start
        inside = (local_target >= 0) & (local_target < w_VK.shape[0]) & ~ignored
        local_target = local_target.masked_fill(~inside, 0)
        lse_N = torch.empty(h_NK.shape[0], device=h_NK.device, dtype=torch.float32)
        target_logit_N = torch.empty_like(lse_N)
        with torch.autocast(h_NK.device.type, enabled=False):
            for lo in range(0, h_NK.shape[0], chunk):
                hi = min(lo + chunk, h_NK.shape[0])
                logits = (h_NK[lo:hi].to(dtype) @ w.T).float()
                lse_N[lo:hi], target_logit_N[lo:hi] = _chunk_statistics(
                    logits, local_target[lo:hi], inside[lo:hi], group)
        ctx.save_for_backward(h_NK, w_VK, local_target, inside, ignored, lse_N)
        ctx.group, ctx.chunk, ctx.dtype = group, chunk, dtype
        return (lse_N - target_logit_N).masked_fill_(ignored, 0.0)

    @staticmethod
    def backward(ctx, grad_N):
        h_NK, w_VK, local_target, inside, ignored, lse_N = ctx.saved_tensors
        dtype, chunk = ctx.dtype, ctx.chunk
        grad_N = grad_N.masked_fill(ignored, 0.0)
        w = w_VK.to(dtype)  # cast again rather than keep a [V, K] copy alive through the whole backward
        grad_h = torch.empty_like(h_NK) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(w_VK.shape, device=w_VK.device, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        with torch.autocast(h_NK.device.type, enabled=False):
            for lo in range(0, h_NK.shape[0], chunk):
                hi = min(lo + chunk, h_NK.shape[0])
                h = h_NK[lo:hi].to(dtype)
                # softmax over the whole vocabulary in fp32 (the subtraction promotes low-precision logits)
                g = torch.sub(h @ w.T, lse_N[lo:hi, None]).exp_()
                rows = torch.arange(hi - lo, device=g.device)
                g[rows, local_target[lo:hi]] -= inside[lo:hi].float()  # before rounding: p - 1 may be tiny
                g = _scale_into(g, grad_N[lo:hi, None], dtype)
                if grad_h is not None:
                    grad_h[lo:hi] = g @ w
                if grad_w is not None:
                    grad_w += g.T @ h
        return grad_h, None if grad_w is None else grad_w.to(w_VK.dtype), None, None, None, None


def _scale_into(g: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """g * scale in `dtype`: one pass that multiplies and rounds (in place when dtype is g's)."""
    if dtype == g.dtype:
        return g.mul_(scale)
    return torch.mul(g, scale, out=torch.empty(g.shape, device=g.device, dtype=dtype))


def _chunk_statistics(logits_nV, local_target_n, inside_n, group):
    """(log-sum-exp, target logit) of a chunk's rows over the whole (possibly sharded) vocabulary:
    each rank's slice reduced in one pass (torch.logsumexp), the slices combined as
    m + log(sum_r exp(lse_r - m)) with m the largest slice's log-sum-exp."""
    rows = torch.arange(logits_nV.shape[0], device=logits_nV.device)
    target_n = logits_nV[rows, local_target_n].masked_fill(~inside_n, 0.0)
    lse_n = torch.logsumexp(logits_nV, dim=-1)
    if group_size(group) > 1:
        peak_n = lse_n.clone()
        dist.all_reduce(peak_n, op=dist.ReduceOp.MAX, group=group)
        sum_n = (lse_n - peak_n).exp_()
        dist.all_reduce(sum_n, group=group)
        dist.all_reduce(target_n, group=group)
        lse_n = peak_n + sum_n.log()
    return lse_n, target_n
