"""Tensor-parallel layers: plain layers when the group has one rank. They hold their local shard only;
the caller enters and leaves the tensor-parallel region explicitly (mappings.enter_tp / exit_tp)."""

import torch
import torch.nn.functional as F
from torch import nn

from megajoy.kernels.backend import cast_for_readers
from megajoy.parallel.mappings import exit_tp, group_rank, group_size


class ProjectionHooks:
    """Two optional hooks every projection honours: `weight_quant` (quantisation-aware training's
    fake-quant of the weight) and `matmul` (a low-precision GEMM back-end such as FP8)."""

    weight_quant = None
    matmul = None

    def effective_weight(self) -> torch.Tensor:
        return self.weight_quant(self.weight) if self.weight_quant is not None else self.weight

    def project(self, x: torch.Tensor) -> torch.Tensor:
        w = self.effective_weight()
        if self.matmul is None:
            return F.linear(x, w)
        return self.matmul.linear(x, w, self.group, self.tp_dim)


def shared_input(x: torch.Tensor, *projections: ProjectionHooks) -> tuple[torch.Tensor, ...]:
    """`x` for projections that all read it: under autocast one low-precision copy they keep together
    (megajoy.kernels.backend.cast_for_readers), unless a low-precision back-end rounds its input itself."""
    if any(p.matmul is not None for p in projections):
        return (x,) * len(projections)
    return cast_for_readers(x, len(projections))


class ColumnParallelLinear(ProjectionHooks, nn.Module):
    """y_local = x W_local^T: the output features split over the group (weight [out / n, in]); with no
    group, a plain linear layer."""

    tp_dim = 0

    def __init__(self, in_features: int, out_features: int, group=None, bias: bool = False):
        super().__init__()
        n = group_size(group)
        if out_features % n:
            raise ValueError(f"ColumnParallelLinear: {out_features} output features do not split over {n} ranks")
        self.group = group
        self.weight = nn.Parameter(torch.empty(out_features // n, in_features))
        self.bias = nn.Parameter(torch.empty(out_features // n)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(x)
        return y if self.bias is None else y + self.bias


class RowParallelLinear(ProjectionHooks, nn.Module):
    """Partial y = x_local W_local^T with the input features split (weight [out, in / n]); the caller
    sums the partials on leaving the region. A bias is added after that sum (see `forward_exit`)."""

    tp_dim = 1

    def __init__(self, in_features: int, out_features: int, group=None, bias: bool = False):
        super().__init__()
        n = group_size(group)
        if in_features % n:
            raise ValueError(f"RowParallelLinear: {in_features} input features do not split over {n} ranks")
        self.group = group
        self.weight = nn.Parameter(torch.empty(out_features, in_features // n))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward_exit(self, x: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
        y = exit_tp(self.project(x), self.group, sequence_parallel)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over the group; each rank looks up the ids in its range and the partial
    results are summed on leaving the region (all-reduce, or reduce-scatter over the sequence)."""

    tp_dim = 0

    def __init__(self, vocab_size: int, dim: int, group=None):
        super().__init__()
        n = group_size(group)
        if vocab_size % n:
            raise ValueError(f"VocabParallelEmbedding: vocab_size={vocab_size} does not split over {n} ranks")
        self.group = group
        self.rows = vocab_size // n
        self.start = group_rank(group) * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, dim))

    def forward(self, ids: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        if group_size(self.group) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.start) | (ids >= self.start + self.rows)
        local = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return exit_tp(out, self.group, sequence_parallel)
