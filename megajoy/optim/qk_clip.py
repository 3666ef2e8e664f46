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
def apply_qk_clip(model: torch.nn.Module, tau: float, replica_group=None, weights_context=None) -> dict:
    """Clip every MLA's over-threshold heads; reset the trackers. The largest logit is taken over the
    data-parallel replicas (`replica_group`) first, so every replica makes the same change. The weights
    are rescaled inside `weights_context()` (e.g. fp32 masters put back for it), entered only when some
    head is over the threshold."""
    import contextlib

    import torch.distributed as dist

    layers = [m for m in model.modules() if isinstance(m, MLA)]
    logits = [all_reduce_no_grad(m.max_logit.float().clone(), replica_group, dist.ReduceOp.MAX) for m in layers]
    peak = max((float(x.max()) for x in logits), default=0.0)
    clipped = sum(int((x > tau).sum()) for x in logits)
    if clipped:
        with (weights_context or contextlib.nullcontext)():
            for mla, layer_logits in zip(layers, logits):
                for head in torch.nonzero(layer_logits > tau).flatten().tolist():
                    _rescale_head(mla, head, tau / float(layer_logits[head]))
    for mla in layers:
        mla.max_logit.zero_()
    return {"qk_clip_heads": clipped, "max_attention_logit": peak}


def _rescale_head(mla: MLA, head: int, gamma: float) -> None:
    nope, rope, v = mla.nope_dim, mla.rope_dim, mla.v_dim
    q_weight = (mla.q_proj if hasattr(mla, "q_proj") else mla.q_b_proj).weight
    q_rows = q_weight[head * (nope + rope):(head + 1) * (nope + rope)]
    q_rows[:nope].mul_(gamma ** 0.5)
    q_rows[nope:].mul_(gamma)
    mla.kv_b_proj.weight[head * (nope + v):head * (nope + v) + nope].mul_(gamma ** 0.5)
