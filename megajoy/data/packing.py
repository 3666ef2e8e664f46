"""Packed rows: documents separated by EOD keep their boundaries. Each token gets its document index
and its position within its document; the EOD belongs to the document it ends (Megatron's
reset_attention_mask convention)."""

import dataclasses
from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S], the next token of each input
    loss_mask: torch.Tensor  # [B, S] float
    position_ids: torch.Tensor  # [B, S], restarting at 0 in every document
    document_ids: torch.Tensor  # [B, S], 0, 1, ... per row
    # [B, S] log-probability of each label under a fixed model: DPO's reference, RL's rollout policy
    ref_logps: torch.Tensor | None = None
    advantages: torch.Tensor | None = None  # [B, S] RL: each response token's advantage
    # [B, S] bool, True at padding: the routers leave it out of the expert load and the balance loss
    padding_mask: torch.Tensor | None = None

    def to(self, device) -> "Batch":
        return Batch(**{name: t.to(device, non_blocking=True) for name, t in self.tensors().items()})

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()


def stack(rows: list[Batch]) -> Batch:
    """One Batch of the rows of several."""
    return Batch(**{name: torch.cat([r.tensors()[name] for r in rows]) for name in rows[0].tensors()})


def held_out_batches(rows: list[Batch], micro: int, dp_rank: int, dp: int) -> list[Batch]:
    """This data-parallel rank's share of the held-out rows in micro-batches of `micro` rows. Every row
    is scored once whatever the layout; shares are topped up with rows whose loss mask is empty, so
    every rank runs the same number of micro-batches (and collectives)."""
    if not rows:
        return []
    share = -(-len(rows) // (dp * micro)) * micro
    blank = dataclasses.replace(rows[0], loss_mask=torch.zeros_like(rows[0].loss_mask))
    mine = [rows[i] if i < len(rows) else blank for i in range(dp_rank * share, (dp_rank + 1) * share)]
    return [stack(mine[i:i + micro]) for i in range(0, share, micro)]


def document_positions(tokens_BS: torch.Tensor, eod: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids, document_ids) for rows of packed tokens."""
    is_eod = (tokens_BS == eod).long()
    document_ids = torch.cumsum(is_eod, dim=1) - is_eod  # an EOD closes its own document
    index = torch.arange(tokens_BS.shape[1], device=tokens_BS.device).expand_as(tokens_BS)
    # Start of each token's document: the running maximum of (index after each EOD).
    starts = torch.where(torch.roll(is_eod, 1, dims=1).bool() & (index > 0), index, torch.zeros_like(index))
    starts = torch.cummax(starts, dim=1).values
    return index - starts, document_ids


def pack_samples(samples: list[dict], eod: int, eod_mask_loss: bool) -> Batch:
    """Stack megatron-core GPTDataset items into a Batch. With `eod_mask_loss`, positions whose input is
    EOD are not trained (their label is the next document's first token)."""
    tokens = torch.stack([s["tokens"] for s in samples])
    labels = torch.stack([s["labels"] for s in samples])
    loss_mask = torch.stack([s["loss_mask"] for s in samples]).float()
    if eod_mask_loss:
        loss_mask = loss_mask * (tokens != eod)
    position_ids, document_ids = document_positions(tokens, eod)
    return Batch(tokens, labels, loss_mask, position_ids, document_ids)
