"""The causal LM: embedding, decoder layers (dense first, MoE after), final norm, output head, MTP.

Layers live in a ModuleDict keyed by their global index so parameter names stay the same whichever
pipeline stage holds them. Under tensor parallelism the embedding and head split the vocabulary and
the loss is computed on vocabulary-parallel logits; with sequence parallelism the residual stream holds
the rank's sequence shard. Legend: B batch, S sequence, D hidden, V vocabulary (local under TP).
"""

import zlib
from dataclasses import dataclass

import torch
from torch import nn

from megajoy.config import ModelConfig
from megajoy.kernels.attention import prepare_document_mask
from megajoy.kernels.backend import cast_as_autocast, cross_entropy_chunk
from megajoy.kernels.cross_entropy import linear_cross_entropy
from megajoy.kernels.rope import rope_cos_sin, rope_frequencies
from megajoy.model.mla import MLA
from megajoy.model.mlp import MLP
from megajoy.model.moe import GroupedExperts, MoE, Router
from megajoy.model.mtp import MTPLayer, mtp_loss_mask, shift_left
from megajoy.model.norm import RMSNorm
from megajoy.model.recompute import Recompute, checkpointed_call, run_decoder_layers, run_discarding
from megajoy.parallel.context import ParallelContext
from megajoy.parallel.cross_entropy import vocab_parallel_cross_entropy
from megajoy.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from megajoy.parallel.mappings import enter_tp, gather_along


@dataclass
class SequenceInfo:
    """Per-token metadata every layer needs: rotary cos/sin and, for packed rows, document ids (and the
    attention kernel's mask built from them once per forward, when its fast path wants one)."""

    cos: torch.Tensor
    sin: torch.Tensor
    document_ids: torch.Tensor | None
    document_mask: object | None = None
    padding_mask: torch.Tensor | None = None  # [B, S] bool, True at padding (see MoE.forward)


@dataclass
class CausalLMOutput:
    """Loss sums and token counts, so callers can normalise over a whole global batch."""

    logits: torch.Tensor | None
    lm_loss_sum: torch.Tensor | None = None
    lm_tokens: torch.Tensor | None = None
    mtp_loss_sum: torch.Tensor | None = None
    mtp_tokens: torch.Tensor | None = None
    mtp_logits: list | None = None
    lm_token_loss: torch.Tensor | None = None  # [B, S] per-token cross-entropy, unmasked (DPO, RL need it)

    @property
    def lm_loss(self) -> torch.Tensor:
        return self.lm_loss_sum / self.lm_tokens.clamp(min=1)

    @property
    def mtp_loss(self) -> torch.Tensor | None:
        return None if self.mtp_loss_sum is None else self.mtp_loss_sum / self.mtp_tokens.clamp(min=1)


class DecoderLayer(nn.Module):
    recompute_modules: frozenset = frozenset()  # selective recomputation: layernorm, mlp, moe

    def __init__(self, cfg: ModelConfig, moe: bool, pc):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, pc)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg, pc) if moe else MLP(cfg.hidden_size, cfg.intermediate_size, pc.tp, pc.sequence_parallel)

    def forward(self, h_BSD: torch.Tensor, seq: SequenceInfo) -> torch.Tensor:
        h_BSD = h_BSD + self._normed(self.input_layernorm, lambda x: self.self_attn(x, seq), h_BSD,
                                     reader=self.self_attn.kv_a_proj_with_mqa)
        return h_BSD + self._normed(self.post_attention_layernorm, lambda x: self._feed_forward(x, seq), h_BSD,
                                    reader=self.mlp.gate_proj if isinstance(self.mlp, MLP) else None)

    def _normed(self, norm: RMSNorm, block, h_BSD: torch.Tensor, reader) -> torch.Tensor:
        """block(norm(h)). With `layernorm` recomputation the norm's output, which the block's first GEMMs
        keep, is released after the block and rebuilt in backward. Where only GEMMs read it (`reader` is
        one of them: attention, the dense MLP; None for the MoE, whose router reads fp32) it is cast to
        autocast's dtype first, so the one bf16 copy the GEMMs share is what gets released (their
        gradients then add in bf16). FP8 GEMMs keep their own rounded copy: nothing to release there."""
        if "layernorm" not in self.recompute_modules or (reader is not None and reader.matmul is not None):
            return block(norm(h_BSD))
        return run_discarding(norm if reader is None else (lambda x: cast_as_autocast(norm(x))), block, h_BSD)

    def _feed_forward(self, x_BSD: torch.Tensor, seq: SequenceInfo) -> torch.Tensor:
        kind = "moe" if isinstance(self.mlp, MoE) else "mlp"
        args = (x_BSD, seq.padding_mask) if kind == "moe" else (x_BSD,)
        return checkpointed_call(self.mlp, *args) if kind in self.recompute_modules else self.mlp(*args)


class JoyAIForCausalLM(nn.Module):
    """The whole model, or (under pipeline parallelism) the parts of it this rank's stages run: their
    decoder layers, the embedding on the first stage, norm, head and MTP (with an embedding copy) on the
    last. Parts a rank does not hold are None."""

    def __init__(self, cfg: ModelConfig, pc: ParallelContext | None = None):
        super().__init__()
        self.cfg = cfg
        self.pc = pc = pc or ParallelContext.single()
        self.stages = pc.local_stages(cfg.num_hidden_layers)
        first, last = any(s.is_first for s in self.stages), any(s.is_last for s in self.stages)
        needs_embedding = first or (last and (cfg.num_nextn_predict_layers > 0 or cfg.tie_word_embeddings))
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, pc.tp) if needs_embedding else None
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer(cfg, cfg.is_moe_layer(i), pc) for s in self.stages for i in s.layers})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if last else None
        self.lm_head = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, pc.tp) if last else None
        self.tie_weights()
        self.mtp = nn.ModuleList(
            MTPLayer(cfg, DecoderLayer(cfg, moe=False, pc=pc)) for _ in range(cfg.num_nextn_predict_layers if last else 0))
        self.recompute = None  # activation recomputation (set by the trainer)
        self.loss_temperature = 1.0  # the LM loss's logits are divided by it (RL: the temperature it samples at)
        # Kept off the module's buffers so dtype casts and meta construction never touch it.
        self._inv_freq, self.rope_amplitude = rope_frequencies(
            cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)

    @property
    def recompute(self) -> Recompute | None:
        return self._recompute

    @recompute.setter
    def recompute(self, recompute: Recompute | None) -> None:
        """Full recomputation checkpoints whole layers (run_decoder_layers); selective tells each layer's
        parts (`recompute_modules`) which of them to recompute."""
        self._recompute = recompute
        selected = frozenset(recompute.modules) if recompute else frozenset()
        for module in self.modules():
            if isinstance(module, (DecoderLayer, MLA, MoE, GroupedExperts)):
                module.recompute_modules = selected

    def tie_weights(self) -> None:
        """With tie_word_embeddings the head is the embedding (again after `to_empty`, which unties)."""
        if self.cfg.tie_word_embeddings and self.lm_head is not None:
            self.lm_head.weight = self.embed_tokens.weight

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Normal(0, initializer_range) weights, output projections scaled by 1/sqrt(2 * layers)
        (Megatron's scaled init), unit norms, zero biases and router bias. Each tensor is drawn whole
        from a generator seeded by its name (experts one by one), then this rank keeps its shard, so
        every parallel layout starts from the same weights. Works after `to_empty` from meta."""
        from megajoy.parallel.params import local_slice, parameter_specs, shard_index

        specs = parameter_specs(self, self.pc)
        std = self.cfg.initializer_range
        out_std = std / (2 * (self.cfg.num_hidden_layers + self.cfg.num_nextn_predict_layers)) ** 0.5
        for name, p in self.named_parameters():
            spec = specs[name]
            if name.endswith(("norm.weight", "layernorm.weight")):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif spec.expert:
                first, rows = shard_index(spec, self.pc)
                scale = out_std if name.endswith("down_proj") else std
                for i in range(rows):
                    p[i].copy_(_draw(spec.global_shape[1:], scale, seed, f"{name}[{first + i}]"))
            else:
                scale = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                p.copy_(local_slice(_draw(spec.global_shape, scale, seed, name), spec, self.pc))
        for module in self.modules():
            if isinstance(module, Router):
                module.e_score_correction_bias.zero_()
        self.reset_statistics()

    @torch.no_grad()
    def reset_statistics(self) -> None:
        """Zero the running statistics (routers' expert load, attention's max logit): non-persistent
        buffers that `to_empty` leaves uninitialised and no checkpoint restores."""
        for module in self.modules():
            if isinstance(module, Router):
                module.expert_load.zero_()
            elif isinstance(module, MLA):
                module.max_logit.zero_()

    # ------------------------------------------------------------------ forward pieces
    def sequence_info(self, position_ids_BS: torch.Tensor, document_ids_BS: torch.Tensor | None,
                      padding_mask_BS: torch.Tensor | None = None) -> SequenceInfo:
        if self._inv_freq.device != position_ids_BS.device:
            self._inv_freq = self._inv_freq.to(position_ids_BS.device)
        cos, sin = rope_cos_sin(position_ids_BS, self._inv_freq, self.rope_amplitude)
        return SequenceInfo(cos, sin, document_ids_BS, prepare_document_mask(document_ids_BS), padding_mask_BS)

    def run_layers(self, h_BSD: torch.Tensor, seq: SequenceInfo) -> torch.Tensor:
        return run_decoder_layers(list(self.layers.values()), h_BSD, seq, self.recompute)

    def embed(self, ids_BS: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids_BS, self.pc.sequence_parallel)

    def head(self, h_BSD: torch.Tensor) -> torch.Tensor:
        """Logits for the full sequence over this rank's vocabulary slice."""
        return self.lm_head(enter_tp(h_BSD, self.pc.tp, self.pc.sequence_parallel))

    def full_logits(self, logits_BSV: torch.Tensor) -> torch.Tensor:
        return gather_along(logits_BSV, self.pc.tp, dim=-1, grad_is_partial=False)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None, compute_mtp: bool | None = None,
                return_logits: bool | None = None, padding_mask: torch.Tensor | None = None) -> CausalLMOutput:
        """input_ids [B,S]. Packed rows pass per-document position_ids and document_ids, and padded ones a
        padding_mask (True at padding), which the routers' load and balance loss leave out.

        labels[b, i] is the token after input_ids[b, i] (Megatron's convention); -100 there leaves the position
        untrained, as loss_mask 0 does. With labels, the LM
        loss and (when `compute_mtp`, default: the model has an MTP module) the MTP loss are returned as
        masked sums; logits are kept only when asked for or when there are no labels.
        """
        if len(self.stages) != 1 or not (self.stages[0].is_first and self.stages[0].is_last):
            raise RuntimeError("this rank holds part of a pipeline: run it through its stage modules")
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        seq = self.sequence_info(position_ids, document_ids, padding_mask)
        h_BSD = self.run_layers(self.embed(input_ids), seq)
        return self.finish(h_BSD, input_ids, labels, loss_mask, seq, compute_mtp, return_logits)

    def finish(self, h_BSD: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor | None,
               loss_mask: torch.Tensor | None, seq: SequenceInfo, compute_mtp: bool | None = None,
               return_logits: bool | None = None) -> CausalLMOutput:
        """The last stage's work on the last decoder layer's output: norm, head, losses, MTP."""
        h_BSD = self.norm(h_BSD)
        keep_logits = return_logits if return_logits is not None else labels is None
        logits_BSV = self.head(h_BSD) if keep_logits else None
        out = CausalLMOutput(logits=self.full_logits(logits_BSV) if keep_logits else None)
        if compute_mtp is None:
            compute_mtp = len(self.mtp) > 0
        if labels is None and not compute_mtp:
            return out
        if loss_mask is None:
            loss_mask = torch.ones_like(input_ids, dtype=torch.float32)
        if labels is not None:  # Hugging Face's ignore_index (-100) marks untrained positions as loss_mask does
            loss_mask, labels = loss_mask * (labels >= 0), labels.clamp(min=0)
            tempered_h_BSD, tempered_logits_BSV = self._tempered(h_BSD, logits_BSV)
            ce_BS = self.head_cross_entropy(tempered_h_BSD, labels, tempered_logits_BSV)
            mask = loss_mask.float()
            out.lm_loss_sum, out.lm_tokens, out.lm_token_loss = (ce_BS * mask).sum(), mask.sum(), ce_BS
        if compute_mtp and len(self.mtp):
            self._mtp_forward(out, h_BSD, input_ids, labels, loss_mask, seq, keep_logits)
        return out

    def _mtp_forward(self, out, h_BSD, input_ids, labels, loss_mask, seq, keep_logits) -> None:
        """Depth k (1-based) sees Emb(t_{i+k}) and predicts t_{i+k+1}; its loss is masked where the loss
        mask is unset anywhere from i to i + k (mtp_loss_mask)."""
        sums, counts, logits = [], [], []
        tokens = labels if labels is not None else shift_left(input_ids, 1, 0)
        for depth, layer in enumerate(self.mtp, start=1):
            next_ids = shift_left(tokens, depth - 1, 0)
            h_BSD = self._mtp_layer(layer, h_BSD, self.embed(next_ids), seq)
            logits_BSV = self.head(h_BSD) if keep_logits else None
            if keep_logits:
                logits.append(self.full_logits(logits_BSV))
            if labels is not None:
                mask = mtp_loss_mask(loss_mask, depth).float()
                ce_BS = self.head_cross_entropy(h_BSD, shift_left(labels, depth, 0), logits_BSV)
                sums.append((ce_BS * mask).sum())
                counts.append(mask.sum())
        if labels is not None:
            # DeepSeek-V3 averages the depths, (1/D) sum_k L_k; pooling the depths' sums and counts gives
            # exactly that when every depth scores the same number of tokens, and stays additive over
            # micro-batches.
            out.mtp_loss_sum = torch.stack(sums).mean()
            out.mtp_tokens = torch.stack(counts).mean()
        out.mtp_logits = logits or None

    def _mtp_layer(self, layer: MTPLayer, h_BSD: torch.Tensor, next_embeds_BSD: torch.Tensor, seq) -> torch.Tensor:
        """One MTP depth; under full recomputation checkpointed whatever the method (as Megatron does)."""
        if self.recompute is not None and self.recompute.full:
            return checkpointed_call(lambda h, e: layer(h, e, seq), h_BSD, next_embeds_BSD)
        return layer(h_BSD, next_embeds_BSD, seq)

    def _tempered(self, h_BSD: torch.Tensor, logits_BSV: torch.Tensor | None) -> tuple:
        """(h, logits) for the LM loss at loss_temperature T: the head is linear, so logits / T is the head of
        h / T, which every cross-entropy path (chunked, vocabulary-parallel) takes as it is."""
        t = self.loss_temperature
        if t == 1:
            return h_BSD, logits_BSV
        return h_BSD / t, None if logits_BSV is None else logits_BSV / t

    def head_cross_entropy(self, h_BSD: torch.Tensor, labels_BS: torch.Tensor,
                           logits_BSV: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token cross-entropy [B, S] in fp32 of the head's prediction from the normed hidden states,
        on every tensor-parallel rank. Without logits at hand (and no low-precision head GEMM), the head
        and the loss run fused in token chunks where that is switched on (megajoy.kernels.backend)."""
        chunk = cross_entropy_chunk(h_BSD)
        if logits_BSV is None and chunk and self.lm_head.matmul is None:
            h_NK = enter_tp(h_BSD, self.pc.tp, self.pc.sequence_parallel).flatten(0, 1)
            ce = linear_cross_entropy(h_NK, self.lm_head.effective_weight(), labels_BS.flatten(), self.pc.tp, chunk)
            return ce.view_as(labels_BS)
        if logits_BSV is None:
            logits_BSV = self.head(h_BSD)
        return self.token_cross_entropy(logits_BSV, labels_BS)

    def token_cross_entropy(self, logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy [B, S] in fp32 of vocabulary-parallel logits."""
        ce = vocab_parallel_cross_entropy(logits_BSV.flatten(0, 1), labels_BS.flatten(), self.pc.tp)
        return ce.view_as(labels_BS)


def _draw(shape: tuple, std: float, seed: int, name: str) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator, dtype=torch.float32).mul_(std)


def create_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int | None = 0,
                 dtype: torch.dtype = torch.float32, pc: ParallelContext | None = None) -> JoyAIForCausalLM:
    """Build on the meta device, allocate on `device`, then initialise (no double initialisation).
    `seed=None` leaves the memory uninitialised for a caller that loads a checkpoint next. `dtype` is the
    parameters' (allocated in it directly); buffers keep their own (the router bias and the QK-clip
    statistics stay fp32, as the trainer keeps them under bf16 weights)."""
    with torch.device("meta"):
        model = JoyAIForCausalLM(cfg, pc)
        for parameter in model.parameters():
            parameter.data = parameter.data.to(dtype)
    model = model.to_empty(device=device)
    model.tie_weights()
    if seed is not None:
        model.init_weights(seed)
    else:
        model.reset_statistics()
    return model
