"""Model arithmetic: parameters (total, active per token, MTP), training FLOPs per token, KV-cache bytes.

`measure` reads the numbers off real module objects (build them on the meta device for large presets);
`closed_form` computes the same numbers from the config alone. The two are kept separate on purpose so
each checks the other.
"""

from dataclasses import asdict, dataclass

import torch
from torch import nn

from megajoy.config import ModelConfig
from megajoy.model.moe import GroupedExperts, Router
from megajoy.parallel.layers import ColumnParallelLinear, RowParallelLinear

_LINEAR = (nn.Linear, ColumnParallelLinear, RowParallelLinear)


@dataclass
class ModelStats:
    total_params: int  # main model: embedding, layers, final norm, head (no MTP)
    embedding_params: int
    head_params: int
    mtp_params: int  # the MTP module's own parameters (it shares embedding and head)
    active_params: int  # per token, main model, without embedding and head
    forward_flops_per_token: float  # main model at the given sequence length (causal attention)
    mtp_forward_flops_per_token: float
    kv_cache_bytes_per_token: int  # MLA latent + rope key, all layers, 2-byte elements

    @property
    def active_params_with_embeddings(self) -> int:
        return self.active_params + self.embedding_params + self.head_params

    def training_flops_per_token(self, with_mtp: bool) -> float:
        """Forward + backward (3x forward) FLOPs per token."""
        return 3 * (self.forward_flops_per_token + (self.mtp_forward_flops_per_token if with_mtp else 0))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["active_params_with_embeddings"] = self.active_params_with_embeddings
        d["training_flops_per_token"] = self.training_flops_per_token(with_mtp=False)
        d["training_flops_per_token_with_mtp"] = self.training_flops_per_token(with_mtp=True)
        return d


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _attention_flops(cfg: ModelConfig, seq_length: int, causal: bool = True) -> float:
    """Scores and weighted values per token per layer; a causal token attends (S+1)/2 keys on average
    (`causal=False` counts all S keys, as kernels that compute the full score matrix do)."""
    context = (seq_length + 1) / 2 if causal else seq_length
    return 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * context


def _layer_flops(layer: nn.Module, cfg: ModelConfig, seq_length: int, causal: bool) -> tuple[float, int]:
    """(forward FLOPs per token, active parameters) of one decoder or MTP layer, from its modules."""
    flops, active = _attention_flops(cfg, seq_length, causal), 0
    for module in layer.modules():
        if isinstance(module, _LINEAR):
            flops += 2 * module.weight.numel()
        elif isinstance(module, Router):
            flops += 2 * module.weight.numel()
        elif isinstance(module, GroupedExperts):
            per_expert = (module.gate_up_proj.numel() + module.down_proj.numel()) // module.gate_up_proj.shape[0]
            flops += 2 * cfg.num_experts_per_tok * per_expert
            active -= _numel(module) - cfg.num_experts_per_tok * per_expert
    return flops, active + _numel(layer)


def measure(model: nn.Module, seq_length: int = 4096, cache_bytes: int = 2, causal: bool = True) -> ModelStats:
    """Numbers read off the modules of a `JoyAIForCausalLM` (meta-device modules are fine)."""
    cfg = model.cfg
    emb = model.embed_tokens.weight.numel()
    head = 0 if cfg.tie_word_embeddings else model.lm_head.weight.numel()
    mtp = _numel(model.mtp)
    total = sum(p.numel() for p in model.parameters()) - mtp
    flops, active = 2.0 * model.lm_head.weight.numel(), _numel(model.norm)
    for layer in model.layers.values():
        f, a = _layer_flops(layer, cfg, seq_length, causal)
        flops, active = flops + f, active + a
    mtp_flops = sum(_layer_flops(m, cfg, seq_length, causal)[0] + 2.0 * model.lm_head.weight.numel() for m in model.mtp)
    kv_bytes = sum(layer.self_attn.kv_a_layernorm.weight.numel() + layer.self_attn.rope_dim
                   for layer in model.layers.values()) * cache_bytes
    return ModelStats(total, emb, head, mtp, active, flops, mtp_flops, kv_bytes)


def closed_form(cfg: ModelConfig, seq_length: int = 4096, cache_bytes: int = 2, causal: bool = True) -> ModelStats:
    """The same numbers from the configuration alone."""
    h, heads, qr = cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank or 0
    q_matmul = h * qr + qr * heads * cfg.qk_head_dim if qr else h * heads * cfg.qk_head_dim
    kv_matmul = h * cfg.kv_cache_dim + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    attn_matmul = q_matmul + kv_matmul + heads * cfg.v_head_dim * h
    attn_bias = (qr + cfg.kv_cache_dim + h) if cfg.attention_bias else 0
    attn = attn_matmul + qr + cfg.kv_lora_rank + attn_bias  # + the two latent norms
    norms = 2 * h
    dense = 3 * h * cfg.intermediate_size
    expert = 3 * h * cfg.moe_intermediate_size
    shared = expert * cfg.n_shared_experts
    router = cfg.n_routed_experts * h  # the correction bias is a buffer, not a parameter
    routed = cfg.n_routed_experts * expert
    n_dense = cfg.first_k_dense_replace
    n_moe = cfg.num_hidden_layers - n_dense
    emb = cfg.vocab_size * h
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h

    dense_layer = attn + norms + dense
    moe_layer = attn + norms + routed + shared + router
    total = emb + head + h + n_dense * dense_layer + n_moe * moe_layer
    active = h + n_dense * dense_layer + n_moe * (moe_layer - routed + cfg.num_experts_per_tok * expert)
    mtp = cfg.num_nextn_predict_layers * (2 * h + 2 * h * h + dense_layer + h)

    attn_flops = _attention_flops(cfg, seq_length, causal)
    dense_flops = 2 * (attn_matmul + dense) + attn_flops
    moe_flops = 2 * (attn_matmul + shared + router + cfg.num_experts_per_tok * expert) + attn_flops
    flops = n_dense * dense_flops + n_moe * moe_flops + 2 * cfg.vocab_size * h
    mtp_flops = cfg.num_nextn_predict_layers * (2 * 2 * h * h + dense_flops + 2 * cfg.vocab_size * h)
    kv_bytes = cfg.num_hidden_layers * cfg.kv_cache_dim * cache_bytes
    return ModelStats(total, emb, head, mtp, active, flops, mtp_flops, kv_bytes)


def meta_model(cfg: ModelConfig):
    from megajoy.model.transformer import JoyAIForCausalLM

    with torch.device("meta"):
        return JoyAIForCausalLM(cfg)
