"""The DPO objective on packed pair rows (see megajoy/data/preference.py for the layout: document 2k of a
row is pair k's chosen sequence, 2k + 1 its rejected one). Legend: B rows, S positions, K pair slots.

For a pair with policy log-probabilities c, r of its chosen and rejected responses (summed over the
response tokens) and the reference model's rc, rr:

    delta = (c - rc) - (r - rr)
    loss  = -(1 - eps) * log sigmoid(beta * delta) - eps * log sigmoid(-beta * delta)

(Rafailov et al. 2023; eps > 0 is the conservative, label-smoothed form of Mitchell 2023). The implicit
rewards are beta * (c - rc) and beta * (r - rr). The other loss types are TRL's of the same names, over the
log-ratios c - rc and r - rr (ipo and sigmoid_norm over their means per response token).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def document_sums(values_BS: torch.Tensor, document_ids_BS: torch.Tensor) -> torch.Tensor:
    """[B, S'] sums of `values` per (row, document id); S' = S rounded up to even."""
    rows, positions = values_BS.shape
    sums = values_BS.new_zeros(rows, positions + positions % 2)
    return sums.scatter_add(1, document_ids_BS, values_BS)


def chosen_mask(loss_mask_BS: torch.Tensor, document_ids_BS: torch.Tensor) -> torch.Tensor:
    """The scored tokens of chosen sequences."""
    return loss_mask_BS * (document_ids_BS % 2 == 0)


def pair_logps(token_logps_BS: torch.Tensor, loss_mask_BS: torch.Tensor, document_ids_BS: torch.Tensor):
    """(chosen [B, K], rejected [B, K]): summed log-probabilities of each pair slot's responses."""
    return _chosen_and_rejected(document_sums(token_logps_BS.float() * loss_mask_BS.float(), document_ids_BS))


def pair_token_counts(loss_mask_BS: torch.Tensor, document_ids_BS: torch.Tensor):
    """(chosen [B, K], rejected [B, K]): the scored tokens of each pair slot's responses."""
    return _chosen_and_rejected(document_sums(loss_mask_BS.float(), document_ids_BS))


def present_pairs(chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor) -> torch.Tensor:
    """[B, K]: whether a pair slot holds a pair (both sides scored)."""
    return (chosen_tokens > 0) & (rejected_tokens > 0)


def pair_count(loss_mask_BS: torch.Tensor, document_ids_BS: torch.Tensor) -> torch.Tensor:
    return present_pairs(*pair_token_counts(loss_mask_BS, document_ids_BS)).sum()


def _chosen_and_rejected(sums_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return sums_BD[:, 0::2], sums_BD[:, 1::2]


@dataclass
class DpoTerms:
    losses: torch.Tensor  # per pair
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def _sigmoid(c, r, beta, eps, nc, nr):
    z = beta * (c - r)
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _robust(c, r, beta, eps, nc, nr):  # Chowdhury et al. 2024: unbiased under a fraction eps of flipped labels
    z = beta * (c - r)
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _exo_pair(c, r, beta, eps, nc, nr):  # Ji et al. 2024: KL(policy's pair distribution || [1 - eps, eps])
    z = beta * (c - r)
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


def _per_token_delta(c, r, nc, nr):
    """The log-ratios' difference over their means per response token (TRL's normalisation for ipo)."""
    return c / nc.clamp(min=1) - r / nr.clamp(min=1)


# name: per-pair loss of (chosen log-ratio, rejected log-ratio, beta, label smoothing, chosen / rejected tokens)
LOSSES = {
    "sigmoid": _sigmoid,
    "hinge": lambda c, r, beta, eps, nc, nr: torch.relu(1 - beta * (c - r)),  # SLiC
    "ipo": lambda c, r, beta, eps, nc, nr: (_per_token_delta(c, r, nc, nr) - 1 / (2 * beta)) ** 2,
    "robust": _robust,
    "exo_pair": _exo_pair,
    "sigmoid_norm": lambda c, r, beta, eps, nc, nr: -F.logsigmoid(beta * _per_token_delta(c, r, nc, nr)),
    "nca_pair": lambda c, r, beta, eps, nc, nr: (-F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c)
                                                 - 0.5 * F.logsigmoid(-beta * r)),
    "bco_pair": lambda c, r, beta, eps, nc, nr: -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r),
    "sppo_hard": lambda c, r, beta, eps, nc, nr: (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2,
    "apo_zero": lambda c, r, beta, eps, nc, nr: 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r),
    "apo_down": lambda c, r, beta, eps, nc, nr: torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * (c - r)),
}
SMOOTHED_LOSSES = ("sigmoid", "robust", "exo_pair")  # those --label-smoothing applies to


def check_loss_type(loss_type: str, label_smoothing: float) -> None:
    if loss_type not in LOSSES:
        raise ValueError(f"--loss-type {loss_type!r} is not one of {list(LOSSES)}")
    if label_smoothing and loss_type not in SMOOTHED_LOSSES:
        raise ValueError(f"--label-smoothing applies to --loss-type {', '.join(SMOOTHED_LOSSES)}, not {loss_type}")
    if loss_type == "exo_pair" and not label_smoothing:
        raise ValueError("--loss-type exo_pair needs --label-smoothing > 0 (the probability it gives the rejected "
                         "response; 1e-3 in the EXO paper)")


def dpo_terms(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
              beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "sigmoid",
              chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None) -> DpoTerms:
    """Per-pair losses and implicit rewards; the token counts are needed by the per-token loss types only."""
    chosen_logratios, rejected_logratios = chosen - ref_chosen, rejected - ref_rejected
    losses = LOSSES[loss_type](chosen_logratios, rejected_logratios, beta, label_smoothing, chosen_tokens,
                               rejected_tokens)
    return DpoTerms(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())
