"""The MoE router's element-wise part, DeepSeek-V3 style: from fp32 router logits [T, E] to sigmoid scores,
the top-k experts by score + correction bias (optionally within the best groups; the bias steers
selection only), and combine weights from the chosen unbiased scores (normalised to sum 1 if
norm_topk_prob, times routed_scaling_factor).

The torch reference runs about ten kernels each way over [T, E] and [T, K] tensors and keeps several of
them for backward; the Triton path (a GPU outside torch.compile, see megajoy.kernels.backend; not for
group-limited routing) is one pass each way and keeps the scores, ids and weights it returns.
"""

import torch

from megajoy.kernels.backend import use_triton


def route(logits_TE: torch.Tensor, bias_E: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert ids [T, K] int64, weights [T, K] fp32, scores [T, E] fp32); ids in descending order of
    score + bias, as torch.topk gives them."""
    if use_triton(logits_TE) and fused_routing_supported(cfg):
        bias = bias_E if cfg.topk_method == "noaux_tc" else torch.zeros_like(bias_E)
        return _TritonRoute.apply(logits_TE, bias, cfg.num_experts_per_tok, cfg.routed_scaling_factor,
                                  cfg.norm_topk_prob)
    return route_reference(logits_TE, bias_E, cfg)


def fused_routing_supported(cfg) -> bool:
    """Whether the Triton path computes this routing (not group-limited routing)."""
    return cfg.n_group <= 1


def route_reference(logits_TE: torch.Tensor, bias_E: torch.Tensor, cfg):
    scores_TE = logits_TE.sigmoid()
    expert_ids_TK = select_experts(scores_TE, bias_E, cfg)
    weights_TK = scores_TE.gather(1, expert_ids_TK)
    if cfg.norm_topk_prob:
        weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
    return expert_ids_TK, weights_TK * cfg.routed_scaling_factor, scores_TE


def select_experts(scores_TE: torch.Tensor, bias_E: torch.Tensor, cfg) -> torch.Tensor:
    """Top-k experts by score + bias (the bias steers selection only), optionally within the best groups."""
    choice_TE = scores_TE + bias_E if cfg.topk_method == "noaux_tc" else scores_TE
    if cfg.n_group > 1:
        grouped = choice_TE.unflatten(-1, (cfg.n_group, -1))
        group_score = grouped.topk(2, dim=-1).values.sum(-1)
        best_groups = group_score.topk(cfg.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best_groups, True)
        choice_TE = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)
    return choice_TE.topk(cfg.num_experts_per_tok, dim=-1).indices


class _TritonRoute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, bias_E, k, scale, normalise):
        from megajoy.kernels import router_triton

        rows = logits_TE if logits_TE.stride(-1) == 1 else logits_TE.contiguous()
        scores, ids, weights = router_triton.forward(rows, bias_E.float().contiguous(), k, scale, normalise)
        ctx.mark_non_differentiable(ids)
        ctx.save_for_backward(scores, ids, weights)
        ctx.scale, ctx.normalise = scale, normalise
        return ids, weights, scores

    @staticmethod
    def backward(ctx, _d_ids, d_weights, d_scores):
        from megajoy.kernels import router_triton

        scores, ids, weights = ctx.saved_tensors
        d_weights = torch.zeros_like(weights) if d_weights is None else d_weights.float().contiguous()
        d_scores = None if d_scores is None else d_scores.float().contiguous()
        d_logits = router_triton.backward(scores, ids, weights, d_weights, d_scores, ctx.scale, ctx.normalise)
        return d_logits, None, None, None, None
