"""Causal attention over packed documents: tokens attend to earlier tokens of their own document only.

Shapes: q_BSHD, k_BSHD [batch, seq, heads, qk dim], v_BSHE [.., v dim]; document_ids_BS tags each
token with its document (None: one document per row).

Reference: SDPA, with a dense [B, 1, S, S] boolean mask for packed documents. Fast path on CUDA:
FlexAttention with a block-sparse document mask built once per forward (`prepare_document_mask`), so
the cost follows the documents' own lengths, not the row's, and no S x S mask is stored; one document
per row goes to SDPA's causal kernels (flash / cuDNN / memory-efficient, whichever takes MLA's
192 / 128 head dims).
"""

import functools

import torch
import torch.nn.functional as F

from megajoy.kernels.backend import use_fused_cuda_path


def document_causal_mask(document_ids_BS: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, S, S]: True where query i may attend key j (j <= i, same document)."""
    seq = document_ids_BS.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids_BS.device).tril()
    same_doc = document_ids_BS.unsqueeze(2) == document_ids_BS.unsqueeze(1)
    return (same_doc & causal).unsqueeze(1)


def prepare_document_mask(document_ids_BS: torch.Tensor | None):
    """The fast path's block mask for these documents (None where the reference path will run)."""
    if document_ids_BS is None or not use_fused_cuda_path(document_ids_BS) or torch.compiler.is_compiling():
        return None
    return document_block_mask(document_ids_BS)


FLEX_BLOCK = 128


def document_block_mask(document_ids_BS: torch.Tensor):
    """FlexAttention's BlockMask for causal attention within documents, built at block granularity from
    each 128-token block's range of document ids (a handful of small tensor ops, where create_block_mask
    would evaluate the mask on all S x S pairs). A (query block, key block) pair is skipped when the
    ranges cannot meet or the key block lies after the query block; it is full (no per-element mask)
    when both blocks lie inside one document and the key block is strictly earlier; otherwise partial,
    and the mask is evaluated per element there."""
    from torch.nn.attention.flex_attention import BlockMask

    docs = document_ids_BS
    batch, seq = docs.shape
    blocks = -(-seq // FLEX_BLOCK)
    padded = torch.cat((docs, docs[:, -1:].expand(batch, blocks * FLEX_BLOCK - seq)), dim=1)
    lo, hi = padded.view(batch, blocks, FLEX_BLOCK).amin(-1), padded.view(batch, blocks, FLEX_BLOCK).amax(-1)
    q_lo, q_hi, k_lo, k_hi = lo[:, :, None], hi[:, :, None], lo[:, None, :], hi[:, None, :]
    index = torch.arange(blocks, device=docs.device)
    earlier_or_same, earlier = index[:, None] >= index[None, :], index[:, None] > index[None, :]
    touching = earlier_or_same & (k_lo <= q_hi) & (q_lo <= k_hi)
    one_document = (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
    full = touching & one_document & earlier
    partial = touching & ~full

    def listed(selected):  # per row block: how many column blocks, and which (selected first, in order)
        order = torch.argsort(selected.to(torch.int8), dim=-1, descending=True, stable=True)
        return (selected.sum(-1, dtype=torch.int32)[:, None].contiguous(),
                order.to(torch.int32, memory_format=torch.contiguous_format)[:, None])

    def same_document_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (docs[b, q_idx] == docs[b, kv_idx])

    # The backward's lists (per key block, its query blocks) come from the same block matrices, transposed:
    # BlockMask.from_kv_blocks would rebuild them from the forward's lists, most of the mask's build time.
    (partial_count, partial_index), (full_count, full_index) = listed(partial), listed(full)
    (partial_q_count, partial_q_index), (full_q_count, full_q_index) = listed(partial.mT), listed(full.mT)
    return BlockMask(seq_lengths=(seq, seq), kv_num_blocks=partial_count, kv_indices=partial_index,
                     full_kv_num_blocks=full_count, full_kv_indices=full_index, q_num_blocks=partial_q_count,
                     q_indices=partial_q_index, full_q_num_blocks=full_q_count, full_q_indices=full_q_index,
                     BLOCK_SIZE=(FLEX_BLOCK, FLEX_BLOCK), mask_mod=same_document_causal)


def attention(q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHE: torch.Tensor, scale: float,
              document_ids_BS: torch.Tensor | None = None, document_mask=None) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in (q_BSHD, k_BSHD, v_BSHE))
    if document_ids_BS is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    elif document_mask is not None:
        flex = _compiled_flex_attention() if q.is_cuda else _eager_flex_attention()
        out = flex(q, k, v, block_mask=document_mask, scale=scale)
    else:
        mask = document_causal_mask(document_ids_BS)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def _eager_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)
