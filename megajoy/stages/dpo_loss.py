"""The DPO objective on packed pair rows (see megajoy/data/preference.py for the layout: document 2k of a
row is pair k's chosen sequence, 2k + 1 its rejected one). Legend: B rows, S positions, K pair slots.

For a pair with policy log-probabilities c, r of its chosen and rejected responses (summed over the
response tokens) and the reference model's rc, rr:

    delta = (c - rc) - (r - rr)
    loss  = -(1 - eps) * log sigmoid(beta * delta) - eps * log sigmoid(-beta * delta)

(Rafailov et al. 2023; eps > 0 is the conservative, label-smoothed form of Mitchell 2023). The implicit
rewards are beta * (c - rc) and beta * (r - rr).
"""

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
    """(chosen [B, K], rejected [B, K], present [B, K]): summed log-probabilities of each pair slot's
    responses, and whether the slot holds a pair (both sides scored)."""
    mask = loss_mask_BS.float()
    sums = document_sums(token_logps_BS.float() * mask, document_ids_BS)
    counts = document_sums(mask, document_ids_BS)
    present = (counts[:, 0::2] > 0) & (counts[:, 1::2] > 0)
    return sums[:, 0::2], sums[:, 1::2], present


def pair_count(loss_mask_BS: torch.Tensor, document_ids_BS: torch.Tensor) -> torch.Tensor:
    return pair_logps(torch.zeros_like(loss_mask_BS), loss_mask_BS, document_ids_BS)[2].sum()


@dataclass
class DpoTerms:
    losses: torch.Tensor  # per pair
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_terms(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
              beta: float = 0.1, label_smoothing: float = 0.0) -> DpoTerms:
    chosen_logratios, rejected_logratios = chosen - ref_chosen, rejected - ref_rejected
    logits = beta * (chosen_logratios - rejected_logratios)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return DpoTerms(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())
