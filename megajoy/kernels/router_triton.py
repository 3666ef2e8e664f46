"""Triton kernels for the MoE router's element-wise part (imported only where Triton runs): from the fp32
router logits [T, E] to the sigmoid scores, the top-k experts by score + bias, and their combine weights,
in one pass over a block of rows; the backward in one more. A program holds BLOCK_T whole rows (E up to a
few hundred), so the top-k is k rounds of a row-wise argmax, in the order torch.topk returns them."""

import torch
import triton
import triton.language as tl


@triton.jit
def _rows(T, E, K, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols, ks = tl.arange(0, E_PAD), tl.arange(0, K_PAD)
    live = rows[:, None] < T
    return rows[:, None].to(tl.int64), cols[None, :], ks[None, :], live & (cols[None, :] < E), live & (ks[None, :] < K)


@triton.jit
def _forward_kernel(L, BIAS, S, IDS, W, T, E, stride_l, scale, K: tl.constexpr, NORMALISE: tl.constexpr,
                    BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr):
    rows, cols, ks, mask, kmask = _rows(T, E, K, BLOCK_T, E_PAD, K_PAD)
    s = tl.sigmoid(tl.load(L + rows * stride_l + cols, mask=mask, other=0.0))
    tl.store(S + rows * E + cols, s, mask=mask)
    bias = tl.load(BIAS + cols, mask=cols < E, other=0.0)
    # NaN ranks first, as in torch.topk: a GPU's argmax lets -inf beat NaN, which would pick padding or a
    # column already taken
    choice = s + bias
    choice = tl.where(mask, tl.where(choice != choice, float("inf"), choice), float("-inf"))
    ids = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int64)
    weights = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    for j in tl.static_range(K):
        best = tl.argmax(choice, axis=1)[:, None]
        hit = cols == best
        ids = tl.where(ks == j, best.to(tl.int64), ids)
        weights = tl.where(ks == j, tl.sum(tl.where(hit, s, 0.0), axis=1)[:, None], weights)
        choice = tl.where(hit, float("-inf"), choice)
    if NORMALISE:
        weights = weights / (tl.sum(weights, axis=1)[:, None] + 1e-20)
    tl.store(IDS + rows * K + ks, ids, mask=kmask)
    tl.store(W + rows * K + ks, weights * scale, mask=kmask)


@triton.jit
def _backward_kernel(S, IDS, W, DW, DS, DL, T, E, scale, K: tl.constexpr, NORMALISE: tl.constexpr,
                     HAS_DS: tl.constexpr, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr):
    rows, cols, ks, mask, kmask = _rows(T, E, K, BLOCK_T, E_PAD, K_PAD)
    s = tl.load(S + rows * E + cols, mask=mask, other=0.0)
    ids = tl.load(IDS + rows * K + ks, mask=kmask, other=0)
    dw = tl.load(DW + rows * K + ks, mask=kmask, other=0.0)
    d_chosen = scale * dw  # the gradient of each chosen expert's score, through the weights
    if NORMALISE:  # w = scale * s_j / total:  d s_j = (scale * dw_j - sum_i dw_i w_i) / total
        total = tl.sum(tl.load(S + rows * E + ids, mask=kmask, other=0.0), axis=1)[:, None] + 1e-20
        w = tl.load(W + rows * K + ks, mask=kmask, other=0.0)
        d_chosen = (d_chosen - tl.sum(dw * w, axis=1)[:, None]) / total
    if HAS_DS:
        ds = tl.load(DS + rows * E + cols, mask=mask, other=0.0)
    else:
        ds = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
    for j in tl.static_range(K):
        expert = tl.sum(tl.where(ks == j, ids, 0), axis=1)[:, None]
        ds += tl.where(cols == expert, tl.sum(tl.where(ks == j, d_chosen, 0.0), axis=1)[:, None], 0.0)
    tl.store(DL + rows * E + cols, ds * s * (1.0 - s), mask=mask)


def _blocks(experts: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_T, E_PAD, K_PAD): about 1024 scores per program (8 per thread of 4 warps; 4096 took 255
    registers a thread for sm_90, see benchmarks/triton_compile.py)."""
    e_pad = triton.next_power_of_2(experts)
    return max(1, 1024 // e_pad), e_pad, triton.next_power_of_2(k)


def forward(logits_TE: torch.Tensor, bias_E: torch.Tensor, k: int, scale: float, normalise: bool):
    """(scores [T, E], expert ids [T, K] int64, weights [T, K]), all fp32 but the ids."""
    t, e = logits_TE.shape
    scores = torch.empty(t, e, device=logits_TE.device, dtype=torch.float32)
    ids = torch.empty(t, k, device=logits_TE.device, dtype=torch.int64)
    weights = torch.empty(t, k, device=logits_TE.device, dtype=torch.float32)
    block_t, e_pad, k_pad = _blocks(e, k)
    if t:
        _forward_kernel[(triton.cdiv(t, block_t),)](logits_TE, bias_E, scores, ids, weights, t, e, logits_TE.stride(0),
                                                    scale, K=k, NORMALISE=normalise, BLOCK_T=block_t, E_PAD=e_pad,
                                                    K_PAD=k_pad, num_warps=4)
    return scores, ids, weights


def backward(scores_TE, ids_TK, weights_TK, d_weights_TK, d_scores_TE, scale: float, normalise: bool):
    """The logits' gradient [T, E] fp32 (`d_scores_TE` may be None)."""
    t, e = scores_TE.shape
    k = ids_TK.shape[1]
    d_logits = torch.empty_like(scores_TE)
    block_t, e_pad, k_pad = _blocks(e, k)
    if t:
        has_ds = d_scores_TE is not None
        _backward_kernel[(triton.cdiv(t, block_t),)](
            scores_TE, ids_TK, weights_TK, d_weights_TK, d_scores_TE if has_ds else scores_TE, d_logits, t, e, scale,
            K=k, NORMALISE=normalise, HAS_DS=has_ds, BLOCK_T=block_t, E_PAD=e_pad, K_PAD=k_pad, num_warps=4)
    return d_logits
