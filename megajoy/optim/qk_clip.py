"""QK-clip (MuonClip, Kimi K2) for MLA: after each optimizer step, a head whose largest pre-softmax
logit S exceeded tau has its query / key weights rescaled by gamma = tau / S so that logit becomes tau:
q_nope and k_nope rows by sqrt(gamma) each, q_rope rows by gamma, and the rope key (shared by all
heads) untouched. Values and the output projection are not touched."""

import torch

from megajoy.model.mla import MLA
from megajoy.parallel.mappings import all_reduce_no_grad


def track_max_logits(model: torch.nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if isinstance(module, MLA):
            module.track_max_logit = enabled


@torch.no_grad()
def apply_qk_clip(model: torch.nn.Module, tau: float, replica_group=None, scale_rows=None) -> dict:
    """Clip every MLA's over-threshold heads; reset the trackers. The largest logit is taken over the
    data-parallel replicas (`replica_group`) first, so every replica makes the same change. The rescaling
    is a list of (weight, rows, factor) handed to `scale_rows` (default: multiply the weight's rows in
    place; with bf16 weights, megajoy.optim.master_weights scales the fp32 masters wherever they live)."""
    import torch.distributed as dist

    layers = [m for m in model.modules() if isinstance(m, MLA)]
    logits = [all_reduce_no_grad(m.max_logit.float().clone(), replica_group, dist.ReduceOp.MAX) for m in layers]
    peak = max((float(x.max()) for x in logits), default=0.0)
    rows = [op for mla, layer_logits in zip(layers, logits)
            for head in torch.nonzero(layer_logits > tau).flatten().tolist()
            for op in head_rescaling(mla, head, tau / float(layer_logits[head]))]
    if rows:
        (scale_rows or scale_rows_in_place)(rows)
    for mla in layers:
        mla.max_logit.zero_()
    return {"qk_clip_heads": sum(int((x > tau).sum()) for x in logits), "max_attention_logit": peak}


def head_rescaling(mla: MLA, head: int, gamma: float) -> list[tuple[torch.Tensor, slice, float]]:
    """(weight, rows, factor) that bring one head's largest logit from S to gamma S."""
    nope, rope, v = mla.nope_dim, mla.rope_dim, mla.v_dim
    q_weight = (mla.q_proj if hasattr(mla, "q_proj") else mla.q_b_proj).weight
    q = head * (nope + rope)
    kv = head * (nope + v)
    return [(q_weight, slice(q, q + nope), gamma ** 0.5), (q_weight, slice(q + nope, q + nope + rope), gamma),
            (mla.kv_b_proj.weight, slice(kv, kv + nope), gamma ** 0.5)]


@torch.no_grad()
def scale_rows_in_place(rows: list[tuple[torch.Tensor, slice, float]]) -> None:
    for weight, span, factor in rows:
        weight[span].mul_(factor)
