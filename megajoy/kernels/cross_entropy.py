"""Output projection and cross-entropy in one op that never holds the full logits.

`linear_cross_entropy(h, W, target)` equals cross_entropy(h @ W^T, target) per token. Tokens go through
in chunks: the forward keeps only each token's log-sum-exp, the backward recomputes a chunk's logits,
forms (softmax - one_hot) * grad there and folds it into dh and dW at once. Peak extra memory is one
chunk's fp32 logits, [chunk, V], worked on in place (beside the GEMM's bf16 output under autocast),
instead of the whole micro-batch's (for JoyAI's 129,280-token vocabulary, 2.1 GB of fp32 per 4,096
tokens); the price is one more N x V x K matmul (the recomputation). Under tensor parallelism W is this
rank's vocabulary slice: the chunk's max, sum of exponentials and target logit are all-reduced over the
group (as the vocab-parallel cross-entropy does), and dh is this slice's partial sum, which the caller's
enter_tp sums in backward.

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
                lse_N[lo:hi], target_logit_N[lo:hi] = _chunk_statistics(
                    h_NK[lo:hi], w, local_target[lo:hi], inside[lo:hi], group, dtype)
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
                _chunk_backward(h_NK[lo:hi], w, lse_N[lo:hi], local_target[lo:hi], inside[lo:hi], grad_N[lo:hi],
                                dtype, None if grad_h is None else grad_h[lo:hi], grad_w)
        return grad_h, None if grad_w is None else grad_w.to(w_VK.dtype), None, None, None, None


# One chunk per call: its [chunk, V] buffers are freed on return, before the next chunk's are made.

def _chunk_statistics(h_nK, w_VK, local_target_n, inside_n, group, dtype):
    """(log-sum-exp, target logit) of a chunk's rows over the whole (possibly sharded) vocabulary: each
    rank's slice reduced as torch.logsumexp does (max, then the sum of exponentials), but in place on the
    chunk's one fp32 copy of its logits, where torch.logsumexp would hold two more; the slices combined as
    m + log(sum_r exp(lse_r - m)) with m the largest slice's log-sum-exp."""
    logits_nV = (h_nK.to(dtype) @ w_VK.T).float()
    rows = torch.arange(logits_nV.shape[0], device=logits_nV.device)
    target_n = logits_nV[rows, local_target_n].masked_fill(~inside_n, 0.0)
    max_n = logits_nV.amax(dim=-1)
    lse_n = logits_nV.sub_(max_n[:, None]).exp_().sum(dim=-1).log_().add_(max_n)
    if group_size(group) > 1:
        peak_n = lse_n.clone()
        dist.all_reduce(peak_n, op=dist.ReduceOp.MAX, group=group)
        sum_n = (lse_n - peak_n).exp_()
        dist.all_reduce(sum_n, group=group)
        dist.all_reduce(target_n, group=group)
        lse_n = peak_n + sum_n.log()
    return lse_n, target_n


def _chunk_backward(h_nK, w_VK, lse_n, local_target_n, inside_n, grad_n, dtype, grad_h_nK, grad_w_VK) -> None:
    """Writes the chunk's dh into `grad_h_nK` and adds its dW to `grad_w_VK` (either may be None)."""
    h = h_nK.to(dtype)
    g = _logit_gradient(h, w_VK, lse_n, local_target_n, inside_n, grad_n, dtype)
    if grad_h_nK is not None:
        grad_h_nK.copy_(g @ w_VK)
    if grad_w_VK is not None:
        grad_w_VK += g.T @ h


def _logit_gradient(h_nK, w_VK, lse_n, local_target_n, inside_n, grad_n, dtype) -> torch.Tensor:
    """(softmax - one_hot) * grad of the chunk's logits, in `dtype`: the softmax over the whole vocabulary in
    fp32, in place on the chunk's one fp32 copy of its logits."""
    g = (h_nK @ w_VK.T).float().sub_(lse_n[:, None]).exp_()
    rows = torch.arange(g.shape[0], device=g.device)
    g[rows, local_target_n] -= inside_n.float()  # before rounding: p - 1 may be tiny
    return _scale_into(g, grad_n[:, None], dtype)


def _scale_into(g: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """g * scale in `dtype`: one pass that multiplies and rounds (in place when dtype is g's)."""
    if dtype == g.dtype:
        return g.mul_(scale)
    return torch.mul(g, scale, out=torch.empty(g.shape, device=g.device, dtype=dtype))
