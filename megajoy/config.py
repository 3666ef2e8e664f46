"""Typed configs: the model (Hugging Face `config.json` field names), presets, YAML and `--set` overrides.

A job's configuration is a `JobConfig` of sections (`model`, and the sections later stages add). Every
section validates itself at construction, so a bad value fails before any work starts, with a message
that names the field and what it must be.
"""

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields

import yaml


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class ModelConfig:
    """A DeepSeek-V3-family MoE transformer. Field names and meanings follow Hugging Face's `DeepseekV3Config`."""

    vocab_size: int = 129280
    hidden_size: int = 2048
    intermediate_size: int = 7168  # dense FFN of the leading dense layers and of the MTP layer
    moe_intermediate_size: int = 768
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    q_lora_rank: int | None = 1536  # None: a full-rank q_proj, as DeepSeek-V2-Lite
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    max_position_embeddings: int = 131072
    rope_theta: float = 3.2e7
    rope_scaling: dict | None = None  # {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 1
    initializer_range: float = 0.02
    attention_bias: bool = False
    # megajoy fields (not in Hugging Face's config): training-time behaviour of the model.
    mtp_loss_weight: float = 0.1
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight (DeepSeek-V3 uses ~1e-4); 0 = off

    def __post_init__(self):
        self.validate()

    # ---- derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Per-token, per-layer width of the MLA latent cache: the compressed kv plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """(qk head dim)^-0.5, times the YaRN mscale squared when YaRN with mscale_all_dim is on."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs and rs.get("mscale_all_dim"):
            m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
            scale *= m * m
        return scale

    # ---- validation
    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                     "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                     "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
                     "n_group", "topk_group"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                     f"{name}={value!r} must be a positive integer")
        _require(self.q_lora_rank is None or self.q_lora_rank > 0,
                 f"q_lora_rank={self.q_lora_rank!r} must be a positive integer or null (full-rank q_proj)")
        _require(self.qk_rope_head_dim % 2 == 0,
                 f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (rotary dimensions come in pairs)")
        _require(self.n_shared_experts >= 0, f"n_shared_experts={self.n_shared_experts} must be >= 0")
        _require(self.num_experts_per_tok <= self.n_routed_experts,
                 f"num_experts_per_tok={self.num_experts_per_tok} exceeds n_routed_experts={self.n_routed_experts}")
        _require(self.n_routed_experts % self.n_group == 0,
                 f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
        _require(self.topk_group <= self.n_group,
                 f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        per_group = self.n_routed_experts // self.n_group
        _require(self.n_group == 1 or per_group >= 2,
                 f"group-limited routing scores a group by its top-2 experts: n_routed_experts/n_group="
                 f"{per_group} must be >= 2")
        _require(self.n_group == 1 or self.num_experts_per_tok <= self.topk_group * per_group,
                 f"num_experts_per_tok={self.num_experts_per_tok} exceeds the {self.topk_group * per_group} "
                 f"experts in topk_group={self.topk_group} groups")
        _require(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
                 f"first_k_dense_replace={self.first_k_dense_replace} must lie in [0, num_hidden_layers="
                 f"{self.num_hidden_layers}]")
        _require(self.scoring_func == "sigmoid",
                 f"scoring_func={self.scoring_func!r}: only 'sigmoid' (DeepSeek-V3 / JoyAI routing) is supported")
        _require(self.topk_method in ("noaux_tc", "greedy"),
                 f"topk_method={self.topk_method!r} must be 'noaux_tc' (bias-corrected) or 'greedy'")
        _require(self.hidden_act == "silu", f"hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU) is supported")
        _require(self.num_nextn_predict_layers >= 0,
                 f"num_nextn_predict_layers={self.num_nextn_predict_layers} must be >= 0")
        _require(self.rms_norm_eps > 0, f"rms_norm_eps={self.rms_norm_eps} must be > 0")
        _require(self.rope_theta > 0, f"rope_theta={self.rope_theta} must be > 0")
        _require(self.rope_interleave, "rope_interleave=false is not supported: megajoy rotates interleaved pairs, "
                                       "as DeepSeek-V3's checkpoints are laid out")
        _require(0 <= self.bos_token_id < self.vocab_size and 0 <= self.eos_token_id < self.vocab_size,
                 f"bos_token_id={self.bos_token_id} / eos_token_id={self.eos_token_id} must lie in "
                 f"[0, vocab_size={self.vocab_size})")
        _require(self.mtp_loss_weight >= 0, f"mtp_loss_weight={self.mtp_loss_weight} must be >= 0")
        _require(self.aux_loss_alpha >= 0, f"aux_loss_alpha={self.aux_loss_alpha} must be >= 0")
        self._validate_rope_scaling()

    def _validate_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        _require(isinstance(rs, dict), f"rope_scaling={rs!r} must be a mapping or null")
        kind = rs.get("type", rs.get("rope_type"))
        _require(kind == "yarn", f"rope_scaling type {kind!r}: only 'yarn' is supported (or null for none)")
        for key in ("factor", "original_max_position_embeddings"):
            _require(rs.get(key) is not None, f"rope_scaling (yarn) needs '{key}'")
        for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                    "mscale_all_dim", "attention_factor"):
            value = rs.get(key)
            _require(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)),
                     f"rope_scaling.{key}={value!r} must be a number")
        _require(rs["factor"] >= 1, f"rope_scaling.factor={rs['factor']} must be >= 1")
        _require(rs["original_max_position_embeddings"] > 0,
                 f"rope_scaling.original_max_position_embeddings={rs['original_max_position_embeddings']} "
                 "must be positive")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction, 0.1 * mscale * ln(scale) + 1 (1 when not extending)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


# ---------------------------------------------------------------------------------------------- presets

def joyai_flash() -> ModelConfig:
    """JoyAI-LLM Flash exactly as released (JOYAI.md section 1)."""
    return ModelConfig()


def joyai_slice() -> ModelConfig:
    """Full JoyAI width, 4 layers (1 dense + 3 MoE) and 64 experts: one GPU's worth, for benchmarks."""
    return ModelConfig(num_hidden_layers=4, n_routed_experts=64)


def tiny() -> ModelConfig:
    """CPU-sized, same structure: a dense first layer, MoE layers with a shared expert, MTP on."""
    return ModelConfig(
        vocab_size=4096, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, q_lora_rank=96, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
        num_experts_per_tok=4, max_position_embeddings=4096, rope_theta=1e4,
    )


PRESETS: dict[str, typing.Callable[[], ModelConfig]] = {
    "joyai-flash": joyai_flash,
    "joyai-slice": joyai_slice,
    "tiny": tiny,
}


# ---------------------------------------------------------------------------------------------- training

@dataclass
class DataConfig:
    data_path: list[str] | None = None  # Megatron blend: ["0.7", "prefA", "0.3", "prefB"]; None = built-in corpus
    split: str = "98,2,0"  # train, valid, test shares (Megatron's --split)
    tokenizer: str | None = None  # a Hugging Face tokenizer.json; None = the built-in BPE
    eod_token: str | None = None  # the tokenizer's end-of-document token, when not one megajoy looks for
    seq_length: int = 256
    eod_mask_loss: bool = True  # do not train the position whose input is EOD (next document's first token)
    data_cache_path: str | None = None  # where megatron-core caches its sample indices (default OUT/data_cache)
    builtin_corpus_mb: float = 16.0
    num_workers: int = 2  # tokenizer processes when the built-in corpus is first built

    def __post_init__(self):
        _require(self.seq_length > 0, f"seq_length={self.seq_length} must be positive")
        _require(self.builtin_corpus_mb > 0, f"builtin_corpus_mb={self.builtin_corpus_mb} must be positive")
        from megajoy.data.gpt import parse_blend, parse_split

        parse_split(self.split)
        if self.data_path is not None:
            parse_blend(self.data_path)


@dataclass
class OptimizerConfig:
    optimizer: str = "adamw"
    lr: float = 4e-3
    min_lr: float = 4e-4
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global gradient-norm clip; 0 = off
    lr_warmup_iters: int = 20
    lr_decay_style: str = "WSD"  # constant | linear | cosine | WSD
    lr_wsd_decay_style: str = "linear"  # linear | cosine | 1-sqrt
    lr_wsd_decay_iters: int | None = None  # default: 20% of train_iters
    lr_decay_iters: int | None = None  # default: train_iters
    # Sample-based runs (train.train_samples): the same lengths in samples, as Megatron's --lr-*-samples
    lr_warmup_samples: int | None = None  # default: lr_warmup_iters full global batches
    lr_wsd_decay_samples: int | None = None
    lr_decay_samples: int | None = None  # default: train_samples
    # Muon (optimizer: muon): the Moonlight / Kimi recipe
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    muon_ns_coefficients: list[float] = field(default_factory=lambda: [3.4445, -4.7750, 2.0315])
    muon_ns_dtype: str = "auto"  # bf16 on GPU, fp32 on CPU; or bf16 / fp32
    muon_scale: str = "match_rms_adamw"  # 0.2 sqrt(max(m, n)), so AdamW learning rates carry over; original; none
    muon_per_head: bool = False  # orthogonalise MLA's q_b / kv_b / o projections head by head
    muon_router: bool = False  # the router weight with Muon (default AdamW)
    qk_clip_tau: float | None = None  # MuonClip: cap per-head max attention logits at tau (Kimi K2: 100)

    def __post_init__(self):
        _require(self.lr > 0 and 0 <= self.min_lr <= self.lr, f"need 0 <= min_lr={self.min_lr} <= lr={self.lr}, lr > 0")
        _require(self.optimizer in ("adamw", "muon"), f"optimizer={self.optimizer!r} must be adamw or muon")
        _require(self.muon_ns_dtype in ("auto", "bf16", "fp32"), f"muon_ns_dtype={self.muon_ns_dtype!r} must be "
                 f"auto, bf16 or fp32")
        _require(self.muon_scale in ("match_rms_adamw", "original", "none"),
                 f"muon_scale={self.muon_scale!r} must be match_rms_adamw, original or none")
        _require(len(self.muon_ns_coefficients) == 3, "muon_ns_coefficients takes three numbers (a, b, c)")
        _require(self.qk_clip_tau is None or self.qk_clip_tau > 0, f"qk_clip_tau={self.qk_clip_tau} must be > 0")
        _require(self.lr_decay_style in ("constant", "linear", "cosine", "WSD"),
                 f"lr_decay_style={self.lr_decay_style!r} must be constant, linear, cosine or WSD")
        _require(self.lr_wsd_decay_style in ("linear", "cosine", "1-sqrt"),
                 f"lr_wsd_decay_style={self.lr_wsd_decay_style!r} must be linear, cosine or 1-sqrt")
        for name in ("lr_warmup_iters", "lr_warmup_samples"):
            _require((getattr(self, name) or 0) >= 0, f"{name}={getattr(self, name)} must be >= 0")
        for name in ("lr_wsd_decay_iters", "lr_decay_iters", "lr_wsd_decay_samples", "lr_decay_samples"):
            _require(getattr(self, name) is None or getattr(self, name) > 0, f"{name}={getattr(self, name)} must be "
                     f"positive")
        _require(self.clip_grad >= 0, f"clip_grad={self.clip_grad} must be >= 0")


# Megatron's --recompute-modules (megajoy.model.recompute)
RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts")
# Fake quantisation: the weight formats (megajoy.quant.formats) and the weights they apply to (megajoy.quant.qat)
QAT_FORMATS = ("int4", "q4_0", "q8_0")
QAT_MODULES = ("routed-experts", "experts", "linear")


@dataclass
class TrainConfig:
    # The defaults are the tiny preset's CPU recipe: `megajoy pretrain` with no arguments (README).
    train_iters: int = 320
    # Megatron's --train-samples: train_iters becomes the number of whole global batches (following the ramp-up)
    # these samples hold, and the LR schedule counts samples
    train_samples: int | None = None
    global_batch_size: int = 8
    micro_batch_size: int = 8
    rampup_batch_size: list[int] | None = None  # [start, increment, samples], Megatron's --rampup-batch-size
    seed: int = 1234
    mtp_start_iter: int = 220  # MTP loss from this step on (JoyAI switches it on in mid-training)
    router_bias_update_rate: float = 1e-3  # gamma of the aux-loss-free balancing
    freeze_router_bias: bool = False
    bf16: bool | None = None  # bf16 autocast; default: on for GPUs, off (fp32) on CPU
    params_dtype: str = "fp32"  # bf16: bf16 weights over fp32 master weights (megajoy.optim.master_weights)
    log_interval: int = 10
    eval_interval: int = 80
    eval_iters: int = 8  # validation batches (each global_batch_size rows) per evaluation, as Megatron counts
    exit_interval: int | None = None  # save and stop after a step divisible by this (Megatron's --exit-interval)
    exit_duration_in_mins: float | None = None  # save and stop once the run has lasted this long (Megatron's flag)
    plot: bool = False
    # Per-device dense peak TFLOP/s that the logged MFU is over; None: the data sheet's bf16 figure for known GPUs
    peak_tflops: float | None = None
    kernels: str = "auto"  # auto: fast paths on GPUs; torch: reference ops everywhere; triton (see megajoy.kernels)
    cross_entropy_chunk: int | None = None  # fused head + loss in token chunks; None: 4096 on GPUs, off on CPU; 0 off
    # Activation recomputation, as Megatron's flags (megajoy.model.recompute): granularity full | selective | None
    recompute_granularity: str | None = None
    recompute_method: str = "uniform"  # full: uniform (chunks of recompute_num_layers) | block (first N per stage)
    recompute_num_layers: int = 1
    recompute_modules: list[str] | None = None  # selective: parts of every layer; None: ["core_attn"]

    def __post_init__(self):
        _require(self.params_dtype in ("fp32", "bf16"), f"params_dtype={self.params_dtype!r} must be fp32 or bf16")
        _require(self.recompute_granularity in (None, "full", "selective"),
                 f"recompute_granularity={self.recompute_granularity!r} must be full, selective or null")
        unknown = sorted(set(self.recompute_modules or ()) - set(RECOMPUTE_MODULES))
        _require(not unknown, f"recompute_modules: {unknown} unknown; choose from {list(RECOMPUTE_MODULES)}")
        _require(not self.recompute_modules or self.recompute_granularity == "selective",
                 "recompute_modules needs recompute_granularity=selective")
        _require(self.recompute_method in ("uniform", "block"),
                 f"recompute_method={self.recompute_method!r} must be uniform or block")
        _require(self.recompute_num_layers >= 1, f"recompute_num_layers={self.recompute_num_layers} must be >= 1")
        _require(self.params_dtype == "fp32" or self.bf16 is not False,
                 "params_dtype=bf16 computes under bf16 autocast: it cannot be combined with bf16=false (--fp32)")
        _require(self.kernels in ("auto", "torch", "triton"), f"kernels={self.kernels!r} must be auto, torch or triton")
        _require(self.cross_entropy_chunk is None or self.cross_entropy_chunk >= 0,
                 f"cross_entropy_chunk={self.cross_entropy_chunk} must be >= 0 (0: off)")
        for name in ("train_iters", "global_batch_size", "micro_batch_size", "log_interval", "eval_interval"):
            _require(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be positive")
        for name in ("peak_tflops", "exit_duration_in_mins"):  # optional
            value = getattr(self, name)
            _require(value is None or value > 0, f"{name}={value} must be positive")
        _require(self.eval_iters >= 0, f"eval_iters={self.eval_iters} must be >= 0")
        _require(self.global_batch_size % self.micro_batch_size == 0,
                 f"global_batch_size={self.global_batch_size} is not divisible by micro_batch_size="
                 f"{self.micro_batch_size}")
        if self.rampup_batch_size is not None:
            _require(len(self.rampup_batch_size) == 3, "rampup_batch_size takes three numbers: START INCREMENT SAMPLES")
            start, increment, samples = self.rampup_batch_size
            _require(start > 0 and increment > 0 and samples > 0, f"rampup_batch_size={self.rampup_batch_size} "
                     f"must be positive")
            _require(start <= self.global_batch_size, f"rampup_batch_size starts at {start}, above "
                     f"global_batch_size={self.global_batch_size}: the batch ramps up to global_batch_size")
            _require((self.global_batch_size - start) % increment == 0,
                     f"global_batch_size - rampup start = {self.global_batch_size - start} is not divisible by "
                     f"the increment {increment}")
        if self.train_samples is not None:
            from megajoy.optim.schedules import batch_sizes, iterations_for_samples

            self.train_iters = iterations_for_samples(self, self.train_samples)
            _require(self.train_iters > 0, f"train_samples={self.train_samples} holds no whole global batch "
                     f"(the first has {batch_sizes(self)[0]} samples)")


@dataclass
class CheckpointConfig:
    out: str = "runs/pretrain"  # checkpoints, TensorBoard events, metrics.jsonl
    save_interval: int | None = None  # default: only at the end
    keep_last: int = 2
    resume: bool = False  # continue from OUT's latest checkpoint
    init: str | None = None  # start from these weights (a megajoy checkpoint or model directory)

    def __post_init__(self):
        _require(self.keep_last >= 1, f"keep_last={self.keep_last} must be >= 1")
        _require(self.save_interval is None or self.save_interval > 0,
                 f"save_interval={self.save_interval} must be positive")


@dataclass
class ParallelConfig:
    """The rank grid: world = TP x CP x DP x PP (TP fastest); experts fold as EP x EDP over TP x CP x DP."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    data_parallel_size: int | None = None  # inferred from the world size
    virtual_pipeline_model_parallel_size: int | None = None  # model chunks per pipeline rank
    pipeline_schedule: str = "1f1b"  # 1f1b | interleaved | zero-bubble (ZB-V)
    pipeline_layout: list[int] | None = None  # decoder layers per (virtual) stage, in stage order
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False  # ZeRO-1: optimizer state sharded over data-parallel ranks
    ddp_bucket_size_mb: float = 25.0
    async_save: bool = True  # checkpoints written in the background while training goes on

    def __post_init__(self):
        _require(self.pipeline_schedule in ("1f1b", "interleaved", "zero-bubble"),
                 f"pipeline_schedule={self.pipeline_schedule!r} must be 1f1b, interleaved or zero-bubble")
        _require(self.virtual_pipeline_model_parallel_size is None or self.virtual_pipeline_model_parallel_size >= 1,
                 f"virtual_pipeline_model_parallel_size={self.virtual_pipeline_model_parallel_size} must be >= 1")
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                     "expert_model_parallel_size"):
            _require(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        _require(self.data_parallel_size is None or self.data_parallel_size >= 1,
                 f"data_parallel_size={self.data_parallel_size} must be >= 1")
        _require(self.ddp_bucket_size_mb > 0, f"ddp_bucket_size_mb={self.ddp_bucket_size_mb} must be positive")


@dataclass
class QuantConfig:
    qat: str | None = None  # int4 | q4_0 | q8_0: fake-quantised weights in the forward pass
    qat_start_iter: int = 0
    qat_modules: str = "routed-experts"  # routed-experts | experts | linear
    qat_group: int = 64  # int4 group size (64 or 32; ggml's grids use their block of 32)
    fp8: str = "off"  # off | tensorwise | blockwise
    fp8_backend: str = "torch"  # torch | te | emulate (CPU)

    def __post_init__(self):
        _require(self.qat in (None, *QAT_FORMATS), f"qat={self.qat!r} must be int4, q4_0, q8_0 or null")
        _require(self.qat_modules in QAT_MODULES,
                 f"qat_modules={self.qat_modules!r} must be routed-experts, experts or linear")
        _require(self.qat_group in (32, 64), f"qat_group={self.qat_group} must be 32 or 64")
        _require(self.fp8 in ("off", "tensorwise", "blockwise"), f"fp8={self.fp8!r} must be off, tensorwise or blockwise")
        _require(self.fp8_backend in ("torch", "te", "emulate"),
                 f"fp8_backend={self.fp8_backend!r} must be torch, te or emulate")
        _require(self.qat_start_iter >= 0, f"qat_start_iter={self.qat_start_iter} must be >= 0")
        # Transformer Engine's Linear owns its weight: a fake-quantised weight handed to it would be a new
        # leaf, cut off from the real weight's gradient (the routed experts' FP8 GEMMs do not go through TE).
        _require(not (self.qat and self.fp8 != "off" and self.fp8_backend == "te" and self.qat_modules != "routed-experts"),
                 f"qat_modules={self.qat_modules!r} with fp8_backend=te is not supported: Transformer Engine's Linear "
                 "would not pass the gradient to the quantised weight; use qat_modules=routed-experts or fp8_backend "
                 "torch / emulate")


# ---------------------------------------------------------------------------------------------- job config

@dataclass
class JobConfig:
    """Everything a `megajoy` command runs from, one section per concern."""

    model: ModelConfig = field(default_factory=tiny)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)

    def __post_init__(self):
        given = [name for name in ("lr_warmup_samples", "lr_wsd_decay_samples", "lr_decay_samples")
                 if getattr(self.optimizer, name) is not None]
        _require(not given or self.train.train_samples is not None,
                 f"{', '.join(given)} count samples: they need a sample-based run (train_samples, --train-samples)")
        _require(not (self.train.recompute_granularity and self.parallel.pipeline_model_parallel_size > 1
                      and self.parallel.pipeline_schedule == "zero-bubble"),
                 "recompute_granularity with pipeline_schedule=zero-bubble is not supported: its split input and "
                 "weight backward passes would each recompute; use 1f1b or interleaved")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "JobConfig":
        """Build from plain sections; an error names `source` (a file, an override) and the field."""
        try:
            return build_checked(cls, data, cls.__name__)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None


def preset_model(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def model_overrides(model: ModelConfig) -> list[str]:
    """`model.field=value` overrides that set every field of `model` (a checkpoint's, over a preset's)."""
    import json

    return [f"model.{k}={json.dumps(v)}" for k, v in dataclasses.asdict(model).items()]


def load_job_config(preset: str | None = None, yaml_path: str | None = None,
                    overrides: list[str] = (), defaults: dict | None = None) -> JobConfig:
    """Section defaults (a stage's), the preset's model, the YAML file's sections, then
    `section.field=value` overrides, in that order. An error names the layer that brought it in."""
    layers = _config_layers(preset, yaml_path, overrides, defaults)
    try:
        return build_checked(JobConfig, _stack(layers), JobConfig.__name__)
    except ValueError as e:
        raise ValueError(f"{_culprit(layers, str(e))}: {e}") from None


def with_recipe(defaults: dict, recipe: dict | None) -> dict:
    """A stage's section defaults with a preset's recipe (its published settings) over them."""
    out = copy.deepcopy(defaults)
    _merge(out, copy.deepcopy(recipe or {}))
    return out


def _config_layers(preset, yaml_path, overrides, defaults) -> list[tuple[str, dict]]:
    base = dataclasses.asdict(JobConfig())
    _merge(base, copy.deepcopy(defaults or {}))
    preset = preset or "tiny"
    layers = [("defaults", base), (f"preset {preset}", {"model": dataclasses.asdict(preset_model(preset))})]
    if yaml_path:
        layers.append((yaml_path, _read_yaml(yaml_path)))
    layers += [(f"override {item}", _parse_override(item)) for item in overrides]
    return layers


def _stack(layers: list[tuple[str, dict]]) -> dict:
    data: dict = {}
    for _, layer in layers:
        _merge(data, copy.deepcopy(layer))
    return data


def _culprit(layers: list[tuple[str, dict]], error: str) -> str:
    """The first layer after which the stacked config fails with `error`: the one that set the bad value
    (a later layer may fix an earlier one's, so the first failure alone is not the answer)."""
    for n in range(1, len(layers)):
        try:
            build_checked(JobConfig, _stack(layers[:n]), JobConfig.__name__)
        except ValueError as e:
            if str(e) == error:
                return layers[n - 1][0]
    return layers[-1][0]


def _read_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of sections (model: ...), got {type(data).__name__}")
    return data


def _parse_override(item: str) -> dict:
    """'model.hidden_size=96' -> {'model': {'hidden_size': 96}}; the value is read as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or "." not in key:
        raise ValueError(f"--set {item!r}: expected SECTION.FIELD=VALUE, e.g. model.hidden_size=96")
    value = yaml.safe_load(raw) if raw.strip() else None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "rope_scaling":
            _merge(base[key], value)
        else:
            base[key] = value


def build_checked(cls, data: dict, where: str):
    """Construct dataclass `cls` (at `where`, e.g. JobConfig.model) from a plain mapping, checking names
    and types on the way."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} needs a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:  # the section's own check names the field, not the section
        raise ValueError(f"{where}: {e}") from None


def _coerce(tp, value, where: str):
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else build_checked(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}={value!r} must be a list")
        (item_tp, *_) = typing.get_args(tp) or (typing.Any,)
        return origin(_coerce(item_tp, v, where) for v in value)
    if tp is typing.Any or origin is dict or tp is dict:
        if (origin is dict or tp is dict) and not isinstance(value, dict):
            raise ValueError(f"{where}={value!r} must be a mapping")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}={value!r} must be a string")
        return value
    return value
