"""Token permutation for dropless MoE: group the (token, expert) assignments by expert and back.

Legend: T tokens, K experts per token, E experts, H hidden.
"""

import torch


def permute(x_TH: torch.Tensor, expert_ids_TK: torch.Tensor, num_experts: int):
    """Rows of x copied once per assignment and sorted by expert.

    Returns (x_perm [T*K, H], tokens_per_expert [E], source [T*K]) where source[r] is the flat
    assignment index (token * K + slot) that row r came from.
    """
    flat = expert_ids_TK.reshape(-1)
    source = torch.argsort(flat, stable=True)
    tokens_per_expert = torch.bincount(flat, minlength=num_experts)
    x_perm = x_TH.index_select(0, source // expert_ids_TK.shape[1])
    return x_perm, tokens_per_expert, source


def unpermute(y_perm: torch.Tensor, source: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's expert outputs: y[t] = sum_k weights[t, k] * y_perm[row of (t, k)]."""
    num_tokens, k = weights_TK.shape
    scaled = y_perm * weights_TK.reshape(-1).index_select(0, source).unsqueeze(-1).to(y_perm.dtype)
    out = y_perm.new_zeros(num_tokens, y_perm.shape[-1])
    return out.index_add_(0, source // k, scaled)
