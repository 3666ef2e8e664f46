"""Cross-entropy over vocabulary-parallel logits: each rank holds logits for its vocabulary slice and
the full-vocabulary logits are never gathered (three all-reduces of [tokens] vectors instead)."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megajoy.parallel.mappings import group_rank, group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV, target_N, group):
        vocab_local = logits_NV.shape[-1]
        start = group_rank(group) * vocab_local
        # One fp32 copy of the logits, worked on in place: it becomes the softmax backward keeps.
        logits = logits_NV.to(torch.float32, copy=True)
        max_N = logits.max(dim=-1).values
        dist.all_reduce(max_N, op=dist.ReduceOp.MAX, group=group)
        logits.sub_(max_N.unsqueeze(-1))
        outside = (target_N < start) | (target_N >= start + vocab_local)
        local_target = (target_N - start).masked_fill(outside, 0)
        rows = torch.arange(logits.shape[0], device=logits.device)
        target_logit = logits[rows, local_target].masked_fill(outside, 0.0)
        dist.all_reduce(target_logit, group=group)
        exp = logits.exp_()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ignored = target_N < 0
        ctx.save_for_backward(softmax, local_target, outside, ignored)
        ctx.input_dtype = logits_NV.dtype
        return (torch.log(sum_exp) - target_logit).masked_fill_(ignored, 0.0)

    @staticmethod
    def backward(ctx, grad_N):
        softmax, local_target, outside, ignored = ctx.saved_tensors
        grad = softmax.clone()
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_target] -= (~outside).float()
        grad.mul_(grad_N.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None


def vocab_parallel_cross_entropy(logits_NV: torch.Tensor, target_N: torch.Tensor, group=None) -> torch.Tensor:
    """Per-token loss [N] in fp32; with one rank, torch's own cross-entropy. Negative targets (-100, as
    F.cross_entropy's ignore_index) give loss 0 and no gradient on every path, as linear_cross_entropy's."""
    if group_size(group) == 1:
        return F.cross_entropy(logits_NV.float(), target_N.masked_fill(target_N < 0, -100), reduction="none")
    return _VocabParallelCrossEntropy.apply(logits_NV, target_N, group)
