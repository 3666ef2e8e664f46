"""Mixture of experts, DeepSeek-V3 style: sigmoid router with the aux-loss-free bias, dropless grouped
experts, one shared expert beside them.

Under tensor parallelism the block works on a rank's own tokens (its sequence shard): with sequence
parallelism they arrive sharded; without it the block takes its shard of the replicated sequence and
gathers the outputs back (outside training, a sequence the ranks do not divide, such as a decoding
step's one position, is routed whole on every rank). Router and shared expert are replicated, experts
split over expert-parallel ranks. Legend: T tokens, K experts per token, E routed experts, H hidden, I
expert intermediate size.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megajoy.config import ModelConfig
from megajoy.kernels.backend import cast_as_autocast
from megajoy.kernels.grouped_gemm import grouped_mm
from megajoy.kernels.moe_permute import count_per_expert, permute, unpermute
from megajoy.kernels.router import route
from megajoy.kernels.swiglu import swiglu_packed
from megajoy.model.mlp import MLP
from megajoy.model.recompute import checkpointed_call, is_recomputing, run_discarding
from megajoy.parallel.context import ParallelContext
from megajoy.parallel.mappings import (all_reduce_no_grad, gather_along, group_rank, group_size, reduce_from_region,
                                       split_along)


@dataclass
class Routing:
    expert_ids_TK: torch.Tensor  # chosen experts
    weights_TK: torch.Tensor  # fp32 combine weights (normalised unbiased scores times the scaling factor)
    scores_TE: torch.Tensor  # fp32 sigmoid scores of every expert


class _Fp32Linear(torch.autograd.Function):
    """x W^T in fp32, forward and backward, under autocast or not. The backward runs where autograd runs
    it, inside the trainer's (or a pipeline schedule's) autocast block, where a plain F.linear's backward
    GEMMs would be cast to bf16 (Megatron's router keeps its backward in fp32 too)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), w.float())

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.float()
            dx = (grad @ w.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
            dw = (grad.flatten(0, -2).T @ x.float().flatten(0, -2)).to(w.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


class Router(nn.Module):
    """Scores in fp32; selection on score + e_score_correction_bias; weights from the unbiased scores.

    The bias is an fp32 buffer (checkpointed, never cast with the module). `expert_load` counts the
    tokens routed to each expert in training forwards since the last bias update.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        self.register_buffer("expert_load", torch.zeros(cfg.n_routed_experts, dtype=torch.int64), persistent=False)

    def forward(self, x_TH: torch.Tensor, padding_T: torch.Tensor | None = None) -> Routing:
        """`padding_T` (True at padding): tokens routed as the others but left out of the expert load."""
        logits_TE = _Fp32Linear.apply(x_TH, self.weight)
        expert_ids_TK, weights_TK, scores_TE = route(logits_TE, self.e_score_correction_bias, self.cfg)
        if self.training and not is_recomputing():  # counted once, not again in backward's recomputation
            e = self.expert_load.numel()
            with torch.no_grad():  # padding counted in an extra bin, dropped (a fixed shape under compile)
                ids = expert_ids_TK if padding_T is None else expert_ids_TK.masked_fill(padding_T.unsqueeze(1), e)
                self.expert_load += count_per_expert(ids, e + 1)[:e]
        return Routing(expert_ids_TK, weights_TK, scores_TE)

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor, rate: float) -> None:
        """Aux-loss-free balancing: b_e += rate * sign(mean load - load_e), with the load of the whole batch."""
        load = load_E.to(torch.float32)
        self.e_score_correction_bias += rate * torch.sign(load.mean() - load)

    def _apply(self, fn, recurse=True):
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        moved = self.e_score_correction_bias
        # Follow the module's device, never its dtype: the bias accumulates 1e-3-sized steps.
        self.e_score_correction_bias = moved.float() if bias.is_meta or moved.is_meta else bias.to(moved.device, torch.float32)
        return self


class GroupedExperts(nn.Module):
    """This rank's routed experts' SwiGLU weights as stacked tensors (Hugging Face transformers 5
    layout): gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    weight_quant = None  # quantisation-aware training's fake-quant (see megajoy.quant.qat)
    matmul = None  # a low-precision grouped-GEMM back-end (see megajoy.quant.fp8)
    recompute_modules: frozenset = frozenset()  # selective recomputation: moe_act

    def forward(self, x_NH: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x_NH: rows sorted by expert, tokens_per_expert[e] rows for expert e."""
        w1, w2 = self.gate_up_proj, self.down_proj
        if self.weight_quant is not None:
            w1, w2 = self.weight_quant(w1), self.weight_quant(w2)
        if self.matmul is not None:  # a low-precision back-end rounds the weights itself
            gemm = self.matmul.grouped
        else:  # autocast's cast, taken on the contiguous weights (after the transposes, a strided copy)
            gemm, w1, w2 = grouped_mm, cast_as_autocast(w1), cast_as_autocast(w2)
        gate_up = gemm(x_NH, w1.transpose(1, 2), tokens_per_expert)

        def down(hidden):
            return gemm(hidden, w2.transpose(1, 2), tokens_per_expert)

        # The down GEMM keeps SwiGLU's output: released and rebuilt (an FP8 GEMM keeps its own rounded copy)
        if "moe_act" in self.recompute_modules and self.matmul is None:
            return run_discarding(swiglu_packed, down, gate_up)
        return down(swiglu_packed(gate_up))


@dataclass
class DispatchMeta:
    """What combine needs to undo dispatch: where each permuted row came from."""

    source: torch.Tensor


class TokenDispatcher:
    """Single-process dispatch: sort assignments by expert; combine: weighted un-permute.

    The expert-parallel dispatcher extends this with the all-to-all exchange between the two steps.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x_TH: torch.Tensor, expert_ids_TK: torch.Tensor):
        x_perm, tokens_per_expert, source = permute(x_TH, expert_ids_TK, self.num_experts)
        return x_perm, tokens_per_expert, DispatchMeta(source)

    def combine(self, y_perm: torch.Tensor, weights_TK: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        return unpermute(y_perm, meta.source, weights_TK)


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on the activations whose backward also starts the aux loss's gradient (Megatron's trick):
    the balance loss reaches the optimizer without being threaded through every layer and pipeline stage."""

    @staticmethod
    def forward(ctx, x, aux_loss):
        ctx.save_for_backward(aux_loss)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.ones_like(aux_loss)


def sequence_balance_loss(routing: Routing, batch: int, cfg: ModelConfig, tp_group=None,
                          padding_T: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, alpha * mean_b sum_e f_be * P_be (a scalar), over each
    sequence's tokens but its padding (`padding_T`, True there; as Megatron-Core's padding_mask). With the
    sequence sharded over `tp_group`, per-sequence sums are completed across its ranks."""
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    scores_BSE = routing.scores_TE.view(batch, -1, e)
    real_BS = (torch.ones(scores_BSE.shape[:2], device=scores_BSE.device) if padding_T is None
               else (~padding_T).view(batch, -1).float())
    with torch.no_grad():
        seq_B1 = all_reduce_no_grad(real_BS.sum(1, keepdim=True), tp_group).clamp(min=1)
        ids_BX = routing.expert_ids_TK.view(batch, -1)
        counts_BE = torch.zeros(batch, e, device=ids_BX.device).scatter_add_(1, ids_BX, real_BS.repeat_interleave(k, 1))
        all_reduce_no_grad(counts_BE, tp_group)
    normalised_BSE = scores_BSE / scores_BSE.sum(-1, keepdim=True)
    prob_sum_BE = reduce_from_region((normalised_BSE * real_BS.unsqueeze(-1)).sum(1), tp_group)
    frac_BE = counts_BE * e / (k * seq_B1)
    return cfg.aux_loss_alpha * (frac_BE * prob_sum_BE / seq_B1).sum(-1).mean()


class MoE(nn.Module):
    recompute_modules: frozenset = frozenset()  # selective recomputation: shared_experts

    def __init__(self, cfg: ModelConfig, pc=None):
        super().__init__()
        pc = pc or ParallelContext.single()
        self.cfg = cfg
        self.tp, self.sp = pc.tp, pc.sequence_parallel
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts // pc.ep_size, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        if pc.ep_size > 1:
            from megajoy.parallel.expert_parallel import ExpertParallelDispatcher

            self.dispatcher = ExpertParallelDispatcher(cfg.n_routed_experts, pc.group("ep"))
        else:
            self.dispatcher = TokenDispatcher(cfg.n_routed_experts)
        self.aux_loss_scale = 1.0  # set by the trainer: 1 / (micro-batches per step x data-parallel ranks)

    def forward(self, x_BSH: torch.Tensor, padding_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
        """`padding_mask_BS` (full sequence, True at padding) leaves padding out of the routers' statistics."""
        tp = group_size(self.tp)
        shard_tokens = tp > 1 and not self.sp and (self.training or x_BSH.shape[1] % tp == 0)
        if shard_tokens:
            x_BSH = split_along(x_BSH, self.tp, dim=1)
        padding_T = None
        if padding_mask_BS is not None:
            if shard_tokens or (tp > 1 and self.sp):  # this rank's part of the sequence
                padding_mask_BS = padding_mask_BS.chunk(tp, dim=1)[group_rank(self.tp)]
            padding_T = padding_mask_BS.flatten()
        x_TH = x_BSH.flatten(0, 1)
        routing = self.gate(x_TH, padding_T)
        # Under autocast, cast the tokens once, before they are copied K times and sent to other ranks (K
        # times fewer bytes cast, half the all-to-all traffic); the experts' GEMMs take that dtype anyway.
        x_perm, tokens_per_expert, meta = self.dispatcher.dispatch(cast_as_autocast(x_TH), routing.expert_ids_TK)
        y_perm = self.experts(x_perm, tokens_per_expert)
        y_TH = self.dispatcher.combine(y_perm, routing.weights_TK, meta)
        if self.shared_experts is not None:
            recomputed = "shared_experts" in self.recompute_modules
            y_TH = y_TH + (checkpointed_call(self.shared_experts, x_TH) if recomputed else self.shared_experts(x_TH))
        y_BSH = y_TH.view_as(x_BSH)
        if self.training and self.cfg.aux_loss_alpha > 0:
            aux = sequence_balance_loss(routing, x_BSH.shape[0], self.cfg, self.tp, padding_T) * self.aux_loss_scale
            y_BSH = _AttachAuxLoss.apply(y_BSH, aux)
        if shard_tokens:
            y_BSH = gather_along(y_BSH, self.tp, dim=1, grad_is_partial=False)
        return y_BSH
