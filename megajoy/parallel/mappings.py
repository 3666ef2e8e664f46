"""Communication with autograd: each op is a forward/backward pair taking its process group. A group of
None (size 1) makes every op the identity, so parallel code is plain code in a single process.

Tensor-parallel regions are entered and left through `enter_tp` / `exit_tp`:
  without sequence parallelism: copy in (backward all-reduce), all-reduce out (backward identity);
  with it: all-gather the sequence in (backward reduce-scatter), reduce-scatter it out (backward
  all-gather). Sequence is dim 1 of [batch, seq, ...] activations.
"""

import torch
import torch.distributed as dist


class PlanningGroup:
    """Stands in for a process group when modules are built only to be measured (the memory planner):
    it knows its size and this rank's place, and cannot communicate."""

    def __init__(self, size: int, rank: int):
        self.size, self.rank = size, rank


def group_size(group) -> int:
    if group is None:
        return 1
    return group.size if isinstance(group, PlanningGroup) else dist.get_world_size(group)


def group_rank(group) -> int:
    if group is None:
        return 0
    return group.rank if isinstance(group, PlanningGroup) else dist.get_rank(group)


# --------------------------------------------------------------------------- raw collectives

def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = group_size(group)
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty((n * moved.shape[0], *moved.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, moved, group=group)
    # Contiguous once here (free when the leading dims are 1), not once per consuming GEMM, each of which
    # would copy a strided input and keep its own copy for backward (the same for _reduce_scatter's).
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = group_size(group)
    moved = x.movedim(dim, 0).contiguous()
    if moved.shape[0] % n:
        raise ValueError(f"reduce-scatter: dim {dim} of size {moved.shape[0]} is not divisible by {n} ranks")
    out = moved.new_empty((moved.shape[0] // n, *moved.shape[1:]))
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, moved, group=group)
    return out.movedim(0, dim).contiguous()  # the residual stream: every norm and GEMM after it reads it


def _split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = group_size(group)
    if x.shape[dim] % n:
        raise ValueError(f"split: dim {dim} of size {x.shape[dim]} is not divisible by {n} ranks")
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


# --------------------------------------------------------------------------- autograd pairs

class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherAlong(torch.autograd.Function):
    """All-gather along `dim`; backward reduce-scatters (when the output's gradient is partial per rank)
    or splits (when it is already complete and identical on every rank)."""

    @staticmethod
    def forward(ctx, x, group, dim, grad_is_partial):
        ctx.group, ctx.dim, ctx.partial = group, dim, grad_is_partial
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        if ctx.partial:
            return _reduce_scatter(grad, ctx.group, ctx.dim), None, None, None
        return _split(grad, ctx.group, ctx.dim), None, None, None


class _ReduceScatterAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


class _SplitAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


# --------------------------------------------------------------------------- public ops

def copy_to_region(x, group):
    """Identity; backward all-reduces (the input feeds rank-local partial computations)."""
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_region(x, group):
    """All-reduce (sum); backward identity."""
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group)


def gather_along(x, group, dim: int, grad_is_partial: bool = True):
    return x if group_size(group) == 1 else _GatherAlong.apply(x, group, dim, grad_is_partial)


def reduce_scatter_along(x, group, dim: int):
    return x if group_size(group) == 1 else _ReduceScatterAlong.apply(x, group, dim)


def split_along(x, group, dim: int):
    """This rank's chunk of a tensor every rank holds whole; backward all-gathers."""
    return x if group_size(group) == 1 else _SplitAlong.apply(x, group, dim)


def enter_tp(x, group, sequence_parallel: bool):
    """Into a tensor-parallel region: full-sequence activations every TP rank holds identically."""
    return gather_along(x, group, 1) if sequence_parallel else copy_to_region(x, group)


def exit_tp(x, group, sequence_parallel: bool):
    """Out of it: sum the ranks' partial results (scattered over the sequence with SP)."""
    return reduce_scatter_along(x, group, 1) if sequence_parallel else reduce_from_region(x, group)


def all_reduce_no_grad(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce outside autograd (counts, statistics); a no-op for a size-1 group."""
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x
