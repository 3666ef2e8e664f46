"""Multi-head latent attention (DeepSeek-V2/V3).

Queries come from a low-rank path (q_a_proj -> q_a_layernorm -> q_b_proj); keys and values from a
compressed latent c_kv (kv_a_proj_with_mqa -> kv_a_layernorm -> kv_b_proj) plus one rotary key shared
by all heads. Legend: B batch, S sequence, H heads, D hidden, C kv_lora_rank, R rope dim, N nope dim,
V value dim.
"""

import torch
from torch import nn

from megajoy.config import ModelConfig
from megajoy.kernels.attention import attention
from megajoy.kernels.rope import apply_rope
from megajoy.model.norm import RMSNorm

# The latent norms use DeepSeek-V3's fixed epsilon, not rms_norm_eps (as its reference code does).
LATENT_NORM_EPS = 1e-6


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.softmax_scale = cfg.softmax_scale
        qk_out = self.num_heads * cfg.qk_head_dim
        bias = cfg.attention_bias
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, qk_out, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, qk_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, cfg.hidden_size, bias=bias)

    def project_q(self, x_BSD: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BSD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        return q.unflatten(-1, (self.num_heads, self.nope_dim + self.rope_dim))

    def project_latent(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised latent c_kv [B,S,C] and the un-rotated shared rope key [B,S,R]."""
        c_kv, k_rope = self.kv_a_proj_with_mqa(x_BSD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), k_rope

    def forward(self, x_BSD: torch.Tensor, seq) -> torch.Tensor:
        q_BSHN, q_rope_BSHR = self.project_q(x_BSD).split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv_BSC, k_rope_BSR = self.project_latent(x_BSD)
        kv_BSHX = self.kv_b_proj(c_kv_BSC).unflatten(-1, (self.num_heads, self.nope_dim + self.v_dim))
        k_BSHN, v_BSHV = kv_BSHX.split([self.nope_dim, self.v_dim], dim=-1)

        q_rope_BSHR = apply_rope(q_rope_BSHR, seq.cos, seq.sin)
        k_rope_BS1R = apply_rope(k_rope_BSR.unsqueeze(2), seq.cos, seq.sin)
        q_BSHQ = torch.cat((q_BSHN, q_rope_BSHR), dim=-1)
        k_BSHQ = torch.cat((k_BSHN, k_rope_BS1R.expand(-1, -1, self.num_heads, -1)), dim=-1)

        out_BSHV = attention(q_BSHQ, k_BSHQ, v_BSHV, self.softmax_scale, seq.document_ids)
        return self.o_proj(out_BSHV.flatten(2))
