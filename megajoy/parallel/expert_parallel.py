"""Expert parallelism: dropless dispatch of token copies to the ranks owning their experts.

dispatch: permute locally by global expert id -> exchange per-(rank, expert) counts -> all-to-all with
uneven splits (rows arrive source-rank-major) -> regroup by local expert for the grouped GEMM.
combine: the same steps in reverse, then the weighted un-permute. Legend: E experts, L = E / EP local
experts, R = EP ranks.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megajoy.kernels.moe_permute import permute, unpermute
from megajoy.model.moe import TokenDispatcher
from megajoy.parallel.mappings import group_size


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the backward sends gradients back along the same routes."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return _AllToAll.apply(grad, input_splits, output_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, output_splits, input_splits, group)


def source_to_expert_order(counts_RL: torch.Tensor) -> torch.Tensor:
    """Row indices that reorder rows grouped (source rank, local expert) into (local expert, source rank)."""
    flat = counts_RL.flatten()
    starts_RL = (torch.cumsum(flat, 0) - flat).view_as(counts_RL)
    counts_LR, starts_LR = counts_RL.t().flatten(), starts_RL.t().flatten()
    offsets_LR = torch.cumsum(counts_LR, 0) - counts_LR
    total = int(flat.sum())
    shift = torch.repeat_interleave(starts_LR - offsets_LR, counts_LR, output_size=total)
    return torch.arange(total, device=counts_RL.device) + shift


@dataclass
class ExpertParallelMeta:
    source: torch.Tensor  # local permutation (as in the single-process dispatcher)
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank
    order: torch.Tensor  # received rows -> expert-major order


class ExpertParallelDispatcher(TokenDispatcher):
    def __init__(self, num_experts: int, group):
        super().__init__(num_experts)
        self.group = group
        self.ranks = group_size(group)
        self.local_experts = num_experts // self.ranks

    def dispatch(self, x_TH: torch.Tensor, expert_ids_TK: torch.Tensor):
        x_perm, tokens_per_expert, source = permute(x_TH, expert_ids_TK, self.num_experts)
        send_RL = tokens_per_expert.view(self.ranks, self.local_experts)
        recv_RL = torch.empty_like(send_RL)
        dist.all_to_all_single(recv_RL, send_RL.contiguous(), group=self.group)
        send_splits, recv_splits = send_RL.sum(1).tolist(), recv_RL.sum(1).tolist()
        x_recv = all_to_all(x_perm, recv_splits, send_splits, self.group)
        order = source_to_expert_order(recv_RL)
        meta = ExpertParallelMeta(source, send_splits, recv_splits, order)
        return x_recv.index_select(0, order), recv_RL.sum(0), meta

    def combine(self, y_local: torch.Tensor, weights_TK: torch.Tensor, meta: ExpertParallelMeta) -> torch.Tensor:
        y_recv = torch.empty_like(y_local).index_copy(0, meta.order, y_local)
        y_perm = all_to_all(y_recv, meta.send_splits, meta.recv_splits, self.group)
        return unpermute(y_perm, meta.source, weights_TK)
