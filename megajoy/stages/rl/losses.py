"""Policy losses on trajectories laid out one per row: `log_ratio` [B, T] = log pi_theta - log pi_old per
response token, `mask` [B, T] marks response tokens, `advantages` [B] (one per trajectory, GRPO-style
group-normalised). Every loss returns (loss to minimise, diagnostics). Legend: B trajectories, T tokens.

FiberPO (JOYAI.md section 5): per trajectory the signed aggregates

    log s+ = mean_t max(log r_t, 0),    log s- = mean_t max(-log r_t, 0)

pass through the gate g(x, C, T) (identity up to the budget C, a rollback of slope -T up to (1 + 1/T) C,
zero beyond), w_base = exp(g(log s+, C+, T) - g(log s-, C-, T)); each token's fiber factor
r_fiber = exp(clip(l u, +-eps) - clip(l v, +-eps)) with l = sign(log r) (ties +1),
u = l log r - log s^(l), v = -log s^(-l); G = w_base r_fiber; J = mean over trajectories of the token mean
of G A; loss = -J. Unclipped, G equals r exactly (and so does its gradient).
"""

from dataclasses import dataclass

import torch

GLOBAL_REGIMES = ("G-I", "G-II,r", "G-II", "G-III,r", "G-III")
LOCAL_REGIMES = ("L-I", "L-II", "L-III")
PASS, ROLLBACK, ZEROED = 0, 1, 2


def masked_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Per-trajectory token mean [B]."""
    return (x_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1)


def trajectories(mask_BT: torch.Tensor) -> torch.Tensor:
    """[B] bool: the rows with at least one response token. A row without any is no trajectory (a padding
    row); counting it would make the loss depend on how a batch is split into micro-batches."""
    return mask_BT.sum(-1) > 0


def trajectory_mean(x_B: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Mean over the trajectories (`trajectories`)."""
    present = trajectories(mask_BT).to(x_B.dtype)
    return (x_B * present).sum() / present.sum().clamp(min=1)


def _mean_or_zero(values: torch.Tensor) -> float:
    """A diagnostic's mean over the selected tokens or trajectories; 0 when there are none (not NaN, which
    would spread through the step's metrics)."""
    return values.float().mean().item() if values.numel() else 0.0


def check_inputs(log_ratio_BT: torch.Tensor, advantages_B: torch.Tensor, mask_BT: torch.Tensor) -> None:
    """One advantage per trajectory, log-ratios and mask [B, T] alike: anything else would broadcast into
    a wrong loss without an error."""
    b = log_ratio_BT.shape[0] if log_ratio_BT.dim() == 2 else None
    if b is None or tuple(mask_BT.shape) != tuple(log_ratio_BT.shape) or tuple(advantages_B.shape) != (b,):
        raise ValueError(f"policy loss: expected log_ratio and mask [B, T] and advantages [B] (one per trajectory), "
                         f"got log_ratio {tuple(log_ratio_BT.shape)}, mask {tuple(mask_BT.shape)}, advantages "
                         f"{tuple(advantages_B.shape)}")


def gate(x: torch.Tensor, budget: float, length: torch.Tensor) -> torch.Tensor:
    """g(x, C, T) elementwise (x, T broadcast together)."""
    rollback = torch.sign(x) * (length + 1) * budget - length * x
    out = torch.where(x.abs() <= budget, x, torch.where(x.abs() < (1 + 1 / length) * budget, rollback, torch.zeros_like(x)))
    return out


def gate_state(x: torch.Tensor, budget: float, length: torch.Tensor) -> torch.Tensor:
    return torch.where(x.abs() <= budget, PASS, torch.where(x.abs() < (1 + 1 / length) * budget, ROLLBACK, ZEROED))


@dataclass
class FiberTerms:
    weight: torch.Tensor  # G [B, T]
    w_base: torch.Tensor  # [B]
    r_fiber: torch.Tensor  # [B, T]
    u: torch.Tensor  # [B, T]
    clipped: torch.Tensor  # [B, T] bool: a fiber term was clipped
    channels: torch.Tensor  # [B, 2] gate state of the + and - channels


def fiber_terms(log_ratio_BT: torch.Tensor, mask_BT: torch.Tensor, c_plus: float, c_minus: float,
                epsilon: float) -> FiberTerms:
    mask = mask_BT.to(log_ratio_BT.dtype)
    length = mask.sum(-1).clamp(min=1)
    log_s_plus = masked_mean(log_ratio_BT.clamp(min=0), mask)
    log_s_minus = masked_mean((-log_ratio_BT).clamp(min=0), mask)
    w_base = torch.exp(gate(log_s_plus, c_plus, length) - gate(log_s_minus, c_minus, length))
    sign = torch.where(log_ratio_BT >= 0, 1.0, -1.0).to(log_ratio_BT.dtype)
    positive = sign > 0
    same = torch.where(positive, log_s_plus[:, None], log_s_minus[:, None])
    opposite = torch.where(positive, log_s_minus[:, None], log_s_plus[:, None])
    u = sign * log_ratio_BT - same
    v = -opposite
    lu, lv = sign * u, sign * v
    r_fiber = torch.exp(lu.clamp(-epsilon, epsilon) - lv.clamp(-epsilon, epsilon))
    clipped = ((lu.abs() > epsilon) | (lv.abs() > epsilon)) & mask_BT.bool()
    channels = torch.stack([gate_state(log_s_plus, c_plus, length), gate_state(log_s_minus, c_minus, length)], -1)
    return FiberTerms(w_base[:, None] * r_fiber, w_base, r_fiber, u, clipped, channels)


def global_regime(channels_B2: torch.Tensor) -> list[str]:
    """G-I both channels pass; G-II,r / G-II one rolls back / is zeroed; G-III,r both out of pass-through
    with at least one rolling back; G-III both zeroed (w_base = 1)."""
    out = []
    for plus, minus in channels_B2.tolist():
        states = sorted((plus, minus))
        if states == [PASS, PASS]:
            out.append("G-I")
        elif states == [PASS, ROLLBACK]:
            out.append("G-II,r")
        elif states == [PASS, ZEROED]:
            out.append("G-II")
        elif states == [ZEROED, ZEROED]:
            out.append("G-III")
        else:
            out.append("G-III,r")
    return out


def local_regime(clipped_BT: torch.Tensor, mask_BT: torch.Tensor) -> list[str]:
    n_clipped, n = clipped_BT.sum(-1), mask_BT.bool().sum(-1)
    return ["L-I" if c == 0 else "L-III" if c == t else "L-II" for c, t in zip(n_clipped.tolist(), n.tolist())]


def fiberpo_loss(log_ratio_BT, advantages_B, mask_BT, c_plus=0.12, c_minus=0.08, epsilon=0.05):
    check_inputs(log_ratio_BT, advantages_B, mask_BT)
    terms = fiber_terms(log_ratio_BT, mask_BT, c_plus, c_minus, epsilon)
    objective = trajectory_mean(masked_mean(terms.weight * advantages_B[:, None], mask_BT.to(terms.weight.dtype)),
                                mask_BT)
    mask = mask_BT.bool()
    stats = {"mean_abs_u": _mean_or_zero(terms.u.detach().abs()[mask]),
             "token_clip_fraction": _mean_or_zero(terms.clipped[mask])}
    present = trajectories(mask_BT).tolist()
    for names, labels in ((GLOBAL_REGIMES, global_regime(terms.channels)),
                          (LOCAL_REGIMES, local_regime(terms.clipped, mask_BT))):
        labels = [label for label, kept in zip(labels, present) if kept]
        for name in names:
            stats[f"regime_{name}"] = labels.count(name) / max(len(labels), 1)
    return -objective, stats


def grpo_loss(log_ratio_BT, advantages_B, mask_BT, epsilon=0.2):
    """DeepSeekMath's GRPO surrogate: per token min(r A, clip(r, 1 -+ eps) A), token mean per trajectory,
    mean over trajectories (no KL term)."""
    check_inputs(log_ratio_BT, advantages_B, mask_BT)
    per_token, clipped = _clipped_surrogate(log_ratio_BT, advantages_B[:, None], epsilon, epsilon)
    mask = mask_BT.to(per_token.dtype)
    return -trajectory_mean(masked_mean(per_token, mask), mask_BT), {
        "token_clip_fraction": _mean_or_zero(clipped[mask_BT.bool()])}


def ppo_clip_loss(log_ratio_BT, advantages_B, mask_BT, epsilon=0.2):
    """PPO-clip with the mean over all tokens of the batch (each token weighs the same)."""
    check_inputs(log_ratio_BT, advantages_B, mask_BT)
    per_token, clipped = _clipped_surrogate(log_ratio_BT, advantages_B[:, None], epsilon, epsilon)
    mask = mask_BT.to(per_token.dtype)
    return -(per_token * mask).sum() / mask.sum().clamp(min=1), {
        "token_clip_fraction": _mean_or_zero(clipped[mask_BT.bool()])}


def gspo_loss(log_ratio_BT, advantages_B, mask_BT, epsilon_low=3e-4, epsilon_high=4e-4):
    """GSPO (Zheng et al. 2025): the sequence ratio s = exp(mean_t log r_t), clipped to
    [1 - eps_low, 1 + eps_high], in the PPO surrogate per trajectory; mean over trajectories."""
    check_inputs(log_ratio_BT, advantages_B, mask_BT)
    seq_log_ratio = masked_mean(log_ratio_BT, mask_BT.to(log_ratio_BT.dtype))
    per_seq, clipped = _clipped_surrogate(seq_log_ratio, advantages_B, epsilon_low, epsilon_high)
    return -trajectory_mean(per_seq, mask_BT), {
        "sequence_clip_fraction": _mean_or_zero(clipped[trajectories(mask_BT)])}


def _clipped_surrogate(log_ratio, advantages, eps_low, eps_high):
    ratio = log_ratio.exp()
    clipped_ratio = ratio.clamp(1 - eps_low, 1 + eps_high)
    surrogate = torch.minimum(ratio * advantages, clipped_ratio * advantages)
    return surrogate, (ratio != clipped_ratio) & (ratio * advantages > clipped_ratio * advantages)


POLICY_LOSSES = {"fiberpo": fiberpo_loss, "grpo": grpo_loss, "gspo": gspo_loss, "ppo-clip": ppo_clip_loss}


def group_advantages(rewards_PN: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's advantages: each reward minus its group's (prompt's) mean, over the group's std. A group whose
    rewards are all equal has nothing to prefer: exactly 0 (in float arithmetic the mean of equal fractional
    rewards may differ from them in the last bit, which the division by a tiny std would blow up)."""
    mean = rewards_PN.mean(-1, keepdim=True)
    std = rewards_PN.std(-1, keepdim=True)
    advantages = (rewards_PN - mean) / (std + eps)
    undecided = (rewards_PN == rewards_PN[..., :1]).all(-1, keepdim=True)
    return torch.where(undecided, torch.zeros_like(advantages), advantages)
