"""Causal attention over packed documents: tokens attend to earlier tokens of their own document only.

Shapes: q_BSHD, k_BSHD [batch, seq, heads, qk dim], v_BSHE [.., v dim]; document_ids_BS tags each
token with its document (None: one document per row).
"""

import torch
import torch.nn.functional as F


def document_causal_mask(document_ids_BS: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, S, S]: True where query i may attend key j (j <= i, same document)."""
    seq = document_ids_BS.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids_BS.device).tril()
    same_doc = document_ids_BS.unsqueeze(2) == document_ids_BS.unsqueeze(1)
    return (same_doc & causal).unsqueeze(1)


def attention(q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHE: torch.Tensor, scale: float,
              document_ids_BS: torch.Tensor | None = None) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in (q_BSHD, k_BSHD, v_BSHE))
    if document_ids_BS is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        mask = document_causal_mask(document_ids_BS)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)
