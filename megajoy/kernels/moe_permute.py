"""Token permutation for dropless MoE: group the (token, expert) assignments by expert and back.

`permute` / `unpermute` are the torch reference. On the fast path every step is a gather, so no
atomics and deterministic results: the permute forward stays torch's index_select (faster than a
Triton row copy on an H100, benchmarks/RESULTS.md); its backward, the unpermute and the unpermute's
backward are Triton kernels: per-token (weighted) sums of K gathered rows in fp32, rows copied by an
index and scaled, and per-assignment dot products for the weights' gradient.
Legend: T tokens, K experts per token, E experts, H hidden, R = T*K permuted rows.
"""

import torch

from megajoy.kernels.backend import use_triton


def permute(x_TH: torch.Tensor, expert_ids_TK: torch.Tensor, num_experts: int):
    """Rows of x copied once per assignment and sorted by expert.

    Returns (x_perm [T*K, H], tokens_per_expert [E], source [T*K]) where source[r] is the flat
    assignment index (token * K + slot) that row r came from.
    """
    flat = expert_ids_TK.reshape(-1)
    source = torch.argsort(flat, stable=True)
    tokens_per_expert = count_per_expert(flat, num_experts)
    if use_triton(x_TH):
        return _TritonPermute.apply(x_TH, source, expert_ids_TK.shape[1]), tokens_per_expert, source
    x_perm = x_TH.index_select(0, source // expert_ids_TK.shape[1])
    return x_perm, tokens_per_expert, source


def count_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64 counts of the ids. Under torch.compile a scatter-add: bincount's output length depends
    on the data (at least minlength), which would break the graph at every MoE layer."""
    if torch.compiler.is_compiling():
        counts = torch.zeros(num_experts, dtype=torch.int64, device=expert_ids.device)
        ids = expert_ids.reshape(-1).long()
        return counts.scatter_add_(0, ids, torch.ones_like(ids))
    return torch.bincount(expert_ids.reshape(-1), minlength=num_experts)


def unpermute(y_perm: torch.Tensor, source: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's expert outputs: y[t] = sum_k weights[t, k] * y_perm[row of (t, k)]."""
    if use_triton(y_perm):
        return _TritonUnpermute.apply(y_perm, source, weights_TK)
    return unpermute_reference(y_perm, source, weights_TK)


def unpermute_reference(y_perm: torch.Tensor, source: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    return _WeightedSum.apply(y_perm, source, weights_TK)


class _WeightedSum(torch.autograd.Function):
    """The combine in fp32 whatever the rows' dtype, as the Triton kernels do: fp32 combine weights times
    rows upcast on the fly, summed in fp32 and rounded once; backward, the weights' gradient as fp32 dot
    products. Only the rows (in their own dtype) and the weights are kept for backward."""

    @staticmethod
    def forward(ctx, y_perm, source, weights_TK):
        num_tokens, k = weights_TK.shape
        ctx.save_for_backward(y_perm, source, weights_TK)
        w_R1 = weights_TK.reshape(-1).index_select(0, source).unsqueeze(-1).float()
        out = torch.zeros(num_tokens, y_perm.shape[-1], dtype=torch.float32, device=y_perm.device)
        return out.index_add_(0, source // k, y_perm.float() * w_R1).to(y_perm.dtype)

    @staticmethod
    def backward(ctx, grad_TH):
        y_perm, source, weights_TK = ctx.saved_tensors
        k = weights_TK.shape[1]
        grad_RH = grad_TH.float().index_select(0, source // k)
        w_R1 = weights_TK.reshape(-1).index_select(0, source).unsqueeze(-1).float()
        grad_y = (grad_RH * w_R1).to(y_perm.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[2]:
            dots_R = (grad_RH * y_perm.float()).sum(-1)
            grad_w = torch.zeros_like(weights_TK, dtype=torch.float32).reshape(-1).index_copy_(0, source, dots_R)
            grad_w = grad_w.view_as(weights_TK).to(weights_TK.dtype)
        return grad_y, None, grad_w


def row_of_assignment(source: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: row_of_assignment[token * K + slot] = the permuted row holding it."""
    inverse = torch.empty_like(source)
    inverse[source] = torch.arange(source.numel(), device=source.device)
    return inverse


class _TritonPermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TH, source, k):
        ctx.k, ctx.tokens = k, x_TH.shape[0]
        ctx.save_for_backward(source)
        return x_TH.index_select(0, source // k)

    @staticmethod
    def backward(ctx, grad_perm):
        from megajoy.kernels import moe_permute_triton as t

        (source,) = ctx.saved_tensors
        rows_TK = row_of_assignment(source).view(ctx.tokens, ctx.k)
        return t.gather_sum(grad_perm, rows_TK, None), None, None


class _TritonUnpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_perm, source, weights_TK):
        from megajoy.kernels import moe_permute_triton as t

        rows_TK = row_of_assignment(source).view_as(weights_TK)
        ctx.save_for_backward(y_perm, source, rows_TK, weights_TK)
        return t.gather_sum(y_perm, rows_TK, weights_TK)

    @staticmethod
    def backward(ctx, grad_TH):
        from megajoy.kernels import moe_permute_triton as t

        y_perm, source, rows_TK, weights_TK = ctx.saved_tensors
        k = weights_TK.shape[1]
        grad_y = t.gather_rows(grad_TH, source // k, weights_TK.reshape(-1).index_select(0, source))
        grad_w = t.row_dots(grad_TH, rows_TK, y_perm) if ctx.needs_input_grad[2] else None
        return grad_y.to(y_perm.dtype), None, grad_w
