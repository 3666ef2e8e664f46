"""Multi-head latent attention (DeepSeek-V2/V3).

Queries come from a low-rank path (q_a_proj -> q_a_layernorm -> q_b_proj); keys and values from a
compressed latent c_kv (kv_a_proj_with_mqa -> kv_a_layernorm -> kv_b_proj) plus one rotary key shared
by all heads. Under tensor parallelism the heads split over ranks: the down projections and their norms
are replicated and run on the rank's tokens, the latents enter the tensor-parallel region (gathered
over the sequence with sequence parallelism), q_b_proj / kv_b_proj are column-parallel and o_proj
row-parallel. Legend: B batch, S sequence, H local heads, D hidden, C kv_lora_rank, R rope dim,
N nope dim, V value dim.
"""

import torch
from torch import nn

from megajoy.config import ModelConfig
from megajoy.kernels.attention import attention
from megajoy.kernels.backend import cast_as_autocast
from megajoy.kernels.rope import apply_rope
from megajoy.model.norm import RMSNorm
from megajoy.model.recompute import checkpointed_call, is_recomputing, run_discarding
from megajoy.parallel.layers import ColumnParallelLinear, RowParallelLinear, shared_input
from megajoy.parallel.context import ParallelContext
from megajoy.parallel.mappings import enter_tp, group_size

# The latent norms use DeepSeek-V3's fixed epsilon, not rms_norm_eps (as its reference code does).
LATENT_NORM_EPS = 1e-6
# QK-clip's logit tracking computes at most this many fp32 scores at once (256 MiB).
MAX_LOGIT_BLOCK_ELEMENTS = 2 ** 26


class MLA(nn.Module):
    recompute_modules: frozenset = frozenset()  # selective recomputation: core_attn, mla_up_proj

    def __init__(self, cfg: ModelConfig, pc=None):
        super().__init__()
        pc = pc or ParallelContext.single()
        self.tp, self.sp = pc.tp, pc.sequence_parallel
        self.num_heads = cfg.num_attention_heads // pc.tp_size
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.softmax_scale = cfg.softmax_scale
        qk_out = cfg.num_attention_heads * cfg.qk_head_dim
        bias = cfg.attention_bias
        if cfg.q_lora_rank:
            self.q_a_proj = ColumnParallelLinear(cfg.hidden_size, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(cfg.q_lora_rank, qk_out, self.tp)
        else:
            self.q_proj = ColumnParallelLinear(cfg.hidden_size, qk_out, self.tp)
        self.kv_a_proj_with_mqa = ColumnParallelLinear(cfg.hidden_size, cfg.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = ColumnParallelLinear(
            cfg.kv_lora_rank, cfg.num_attention_heads * (self.nope_dim + self.v_dim), self.tp)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * self.v_dim, cfg.hidden_size, self.tp, bias=bias)
        # QK-clip (MuonClip) bookkeeping: the largest pre-softmax logit of each local head since the last clip.
        self.track_max_logit = False
        self.register_buffer("max_logit", torch.zeros(self.num_heads), persistent=False)

    def query_latent(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """The query up projection's input for the full sequence: the normalised q latent (x itself
        without q_lora_rank). Under autocast the norm's fp32 output is cast here, once, as q_b_proj would
        cast it: it is gathered (sequence parallelism) and kept in bf16."""
        if hasattr(self, "q_proj"):
            return enter_tp(x_BSD, self.tp, self.sp)
        return enter_tp(cast_as_autocast(self.q_a_layernorm(self.q_a_proj(x_BSD))), self.tp, self.sp)

    def project_q(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Local heads' queries [B,S,H,N+R] for the full sequence."""
        return self._up_project_q(self.query_latent(x_BSD))

    def _up_project_q(self, q_latent: torch.Tensor) -> torch.Tensor:
        up = self.q_proj if hasattr(self, "q_proj") else self.q_b_proj
        return up(q_latent).unflatten(-1, (self.num_heads, self.nope_dim + self.rope_dim))

    def project_latent(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised latent c_kv [B,S,C] and the un-rotated shared rope key [B,S,R], full sequence.
        Under autocast the norm's output is cast as kv_b_proj would cast it; left fp32, it promoted the
        rope key, and with it every head's key, to fp32 before attention cast them back."""
        c_kv, k_rope = self.kv_a_proj_with_mqa(x_BSD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        normed = cast_as_autocast(self.kv_a_layernorm(c_kv))
        latent = enter_tp(torch.cat((normed, k_rope), dim=-1), self.tp, self.sp)
        return latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)

    def up_project(self, q_latent, c_kv_BSC, k_rope_BSR, cos, sin) -> tuple[torch.Tensor, ...]:
        """The up projections (`mla_up_proj`): rotated queries and keys [B,S,H,N+R], and kv_b's output
        [B,S,H,N+V] (the values are a view of it)."""
        q_BSHN, q_rope_BSHR = self._up_project_q(q_latent).split([self.nope_dim, self.rope_dim], dim=-1)
        kv_BSHX = self.kv_b_proj(c_kv_BSC).unflatten(-1, (self.num_heads, self.nope_dim + self.v_dim))
        q_rope_BSHR = apply_rope(q_rope_BSHR, cos, sin)
        k_rope_BS1R = apply_rope(k_rope_BSR.unsqueeze(2), cos, sin)
        q_BSHQ = torch.cat((q_BSHN, q_rope_BSHR), dim=-1)
        k_BSHQ = torch.cat((kv_BSHX[..., :self.nope_dim], k_rope_BS1R.expand(-1, -1, self.num_heads, -1)), dim=-1)
        return q_BSHQ, k_BSHQ, kv_BSHX

    def forward(self, x_BSD: torch.Tensor, seq) -> torch.Tensor:
        q_latent = hasattr(self, "q_a_proj")
        if q_latent or group_size(self.tp) == 1:  # both projections read x itself: one autocast copy for both
            to_q, to_kv = shared_input(x_BSD, self.q_a_proj if q_latent else self.q_proj, self.kv_a_proj_with_mqa)
        else:  # q_proj reads x through the tensor-parallel region (its gradient all-reduced in x's dtype)
            to_q = to_kv = x_BSD
        latents = (self.query_latent(to_q), *self.project_latent(to_kv), seq.cos, seq.sin)
        if "mla_up_proj" in self.recompute_modules:
            out_BSHV = run_discarding(self.up_project, lambda qkv: self._attend(*qkv, seq), *latents)
        else:
            out_BSHV = self._attend(*self.up_project(*latents), seq)
        return self.o_proj.forward_exit(out_BSHV.flatten(2), self.sp)

    def _attend(self, q_BSHQ: torch.Tensor, k_BSHQ: torch.Tensor, kv_BSHX: torch.Tensor, seq) -> torch.Tensor:
        """Core attention of the local heads (`core_attn`), [B,S,H,V]."""
        v_BSHV = kv_BSHX[..., self.nope_dim:]
        if self.track_max_logit and self.training and not is_recomputing():
            self._record_max_logit(q_BSHQ, k_BSHQ, seq.document_ids, seq.padding_mask)

        def core(q, k, v):
            return attention(q, k, v, self.softmax_scale, seq.document_ids, seq.document_mask)

        return checkpointed_call(core, q_BSHQ, k_BSHQ, v_BSHV) if "core_attn" in self.recompute_modules else (
            core(q_BSHQ, k_BSHQ, v_BSHV))

    @torch.no_grad()
    def _record_max_logit(self, q_BSHQ: torch.Tensor, k_BSHQ: torch.Tensor, document_ids_BS,
                          padding_mask_BS=None) -> None:
        """max over allowed (query, key) pairs of scale * q.k, per head (recomputes the scores, a block of
        queries at a time: all [B, H, S, S] at once would be 2 GiB a layer at 4K tokens, TiBs at 128K).
        Padding (`padding_mask_BS`, True there) is no data: its logits must not make QK-clip shrink a head."""
        batch, seq, heads, _ = q_BSHQ.shape
        block = max(1, MAX_LOGIT_BLOCK_ELEMENTS // (batch * heads * seq))
        keys = k_BSHQ.float()
        positions = torch.arange(seq, device=q_BSHQ.device)
        real_BS = None if padding_mask_BS is None else ~padding_mask_BS.to(q_BSHQ.device, torch.bool)
        peak_H = torch.full((heads,), float("-inf"), device=q_BSHQ.device)
        for start in range(0, seq, block):
            rows = slice(start, start + block)
            with torch.autocast(q_BSHQ.device.type, enabled=False):  # autocast would run this bmm in bf16
                scores_BHST = torch.einsum("bshd,bthd->bhst", q_BSHQ[:, rows].float(), keys).mul_(self.softmax_scale)
            allowed = (positions[rows, None] >= positions[None, :])[None, None]
            if document_ids_BS is not None:
                allowed = allowed & (document_ids_BS[:, rows, None] == document_ids_BS[:, None, :]).unsqueeze(1)
            if real_BS is not None:
                allowed = allowed & (real_BS[:, None, rows, None] & real_BS[:, None, None, :])
            peak_H = torch.maximum(peak_H, scores_BHST.masked_fill_(~allowed, float("-inf")).amax(dim=(0, 2, 3)))
        self.max_logit.copy_(torch.maximum(self.max_logit, peak_H.to(self.max_logit.dtype)))
