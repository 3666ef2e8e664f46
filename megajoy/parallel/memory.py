"""Memory planner: what each rank of a layout holds during training.

Parameters, gradients and optimizer state are read off this rank's real modules, built on the meta
device with placeholder groups (fp32 master parameters and gradients, AdamW's two moments; with ZeRO-1
the rank's slice of fp32 master copies and moments, sliced as the distributed optimizer slices; Muon's
momentum on the rank that owns each matrix, assigned as the optimizer assigns it; with bf16 parameters,
their bf16 copies, beside whole fp32 masters unless ZeRO-1 holds the only ones).
Activations are the tensors autograd keeps for backward, counted per micro-batch from the shapes and
dtypes this implementation saves (see `layer_activation_bytes`) with the kernels a step runs
(`ActivationFormat`: autocast or not, the weights' dtype, a GPU's fused kernels or the CPU's torch
references), times the micro-batches the schedule keeps in flight on the rank. Beside them, the bf16
copies of weights that a step under autocast keeps once (`weight_copy_bytes`), and the most backward
holds at once beyond the kept activations (`backward_working_bytes`). Gradients count as allocated, as
they are from a step's second micro-batch on.
"""

from dataclasses import asdict, dataclass

import torch

from megajoy.config import ModelConfig
from megajoy.kernels.backend import GPU_CROSS_ENTROPY_CHUNK
from megajoy.kernels.router import fused_routing_supported
from megajoy.parallel.context import planning_context
from megajoy.parallel.optimizer import buckets, owned_elements
from megajoy.parallel.params import parameter_specs

GiB = 2**30


@dataclass
class RankMemory:
    rank: int
    pp_stage: int
    layers: tuple
    parameters: int  # bytes
    gradients: int
    optimizer: int
    activations: int
    micro_batches_in_flight: float
    weight_copies: int = 0  # bf16 copies of weights a step's GEMMs keep beside the weights (see weight_copy_bytes)
    working_set: int = 0  # what backward holds at once beyond the kept activations (backward_working_bytes)

    @property
    def total(self) -> int:
        return (self.parameters + self.gradients + self.optimizer + self.activations + self.working_set
                + self.weight_copies)

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class ActivationFormat:
    """How a step's kernels keep activations for backward. `gemm`: bytes per element of GEMM inputs and
    outputs (2 under bf16 autocast, else 4); `weights`: of the weights, which is also the width of the
    residual stream (the MTP layer's excepted: it starts from a GEMM) and of every RMSNorm's output, since
    autocast leaves both alone. Norm statistics, router scores and the loss's log-softmax are fp32 whatever
    these say. The defaults are a GPU step under bf16 autocast over fp32 weights with the fast paths on."""
    gemm: int = 2
    weights: int = 4
    fused_kernels: bool = True  # Triton RMSNorm, SwiGLU and router, which keep less (megajoy.kernels)
    flash_attention: bool = True  # flash / flex attention: q, k, v, output, log-sum-exp; else torch's math SDPA
    head_chunk: int = GPU_CROSS_ENTROPY_CHUNK  # tokens per chunk of the fused head + loss (0: unfused)

    @property
    def chunked_head(self) -> bool:
        """The fused head + cross-entropy: a log-sum-exp per token, never the logits."""
        return self.head_chunk > 0

    @classmethod
    def of(cls, bf16: bool = True, params_dtype: str = "fp32", kernels: str = "auto",
           cross_entropy_chunk: int | None = None, gpu: bool = True) -> "ActivationFormat":
        """What a run keeps, from its training settings (train.bf16, params_dtype, kernels, cross_entropy_chunk;
        megajoy.kernels.backend decides the same way): on GPUs by default, or on the CPU (math attention,
        the torch references unless kernels is triton, the head unfused unless a chunk is given). With
        kernels torch on a GPU, packed documents go through SDPA with a dense mask: counted as a fused
        kernel, without the mask bias it may keep (2 B S^2 bytes a layer)."""
        if params_dtype == "bf16" and not bf16:
            raise ValueError("bf16 weights compute under bf16 autocast: they cannot plan fp32 activations")
        fast = kernels == "triton" or (gpu and kernels == "auto")  # a GPU image with Triton installed
        chunk = GPU_CROSS_ENTROPY_CHUNK if gpu else 0
        chunk = 0 if kernels == "torch" else (cross_entropy_chunk if cross_entropy_chunk is not None else chunk)
        return cls(gemm=2 if bf16 else 4, weights=2 if params_dtype == "bf16" else 4, fused_kernels=fast,
                   flash_attention=gpu, head_chunk=chunk)

    def describe(self) -> str:
        compute = "bf16 autocast" if self.gemm == 2 else "fp32"
        kernels = "fused kernels" if self.fused_kernels else "torch kernels"
        head = f"head in {self.head_chunk:,}-token chunks" if self.chunked_head else "unfused head"
        return f"{compute}, {kernels}, {head}"


def rank_model(model_cfg: ModelConfig, parallel_cfg, world: int, rank: int, seq_length: int):
    from megajoy.model.transformer import JoyAIForCausalLM

    pc = planning_context(parallel_cfg, world, rank, model_cfg, seq_length)
    with torch.device("meta"):
        return JoyAIForCausalLM(model_cfg, pc), pc


def state_bytes(model, pc, params_dtype: str = "fp32", optimizer=None, fake_quant: tuple = (),
                specs: dict | None = None, bucket_mb: float = 25.0) -> tuple[int, int, int]:
    """(parameter, gradient, optimizer) bytes of this rank, as the trainer allocates them. `optimizer`: the
    OptimizerConfig (default AdamW). Gradients are fp32. AdamW keeps two moments, and under ZeRO-1 the
    rank's fp32 slice of the weights; Muon's matrices keep one momentum on the rank that orthogonalises
    them. With params_dtype bf16 the parameters are the bf16 copies plus whole fp32 masters, or, under
    ZeRO-1, plus only the Muon matrices this rank owns (AdamW's fp32 slices count as optimizer state), and
    the bf16 fake-quantised values the weights keep in place of whole fp32 masters (`kept_fake_quant_elements`
    of `fake_quant`, the (format, modules) selections a run quantises: training's QAT, RL's --rollout-qat).
    `specs`: the modules' parameter_specs, when already at hand; `bucket_mb`: ZeRO-1's bucket size, each
    bucket sharded on its own."""
    from megajoy.optim.muon import assign_owners
    from megajoy.parallel.mappings import group_rank
    from megajoy.parallel.muon import muon_entries

    params = list(model.named_parameters())
    specs = specs or parameter_specs(model, pc)
    matrices = []
    if optimizer is not None and optimizer.optimizer == "muon":
        matrices = muon_entries(params, specs, pc, optimizer, model.cfg.num_attention_heads)
        assign_owners(matrices)
    owned_matrices = sum(e.param.numel() for e in matrices if e.dp_ranks[e.owner] == pc.rank)
    matrix_names = {e.name for e in matrices}
    adam = [(n, p) for n, p in params if n not in matrix_names]
    numel = sum(p.numel() for _, p in params)
    bf16 = params_dtype == "bf16"
    if not pc.distributed_optimizer:
        return (6 if bf16 else 4) * numel, 4 * numel, 8 * sum(p.numel() for _, p in adam) + 4 * owned_matrices
    adam_owned = 0
    for expert, group in ((False, "dp_cp"), (True, "edp")):
        for bucket in buckets([(n, p) for n, p in adam if specs[n].expert == expert], int(bucket_mb * 2**20)):
            adam_owned += owned_elements([p.numel() for _, p in bucket], pc.size(group), group_rank(pc.groups[group]))
    kept = kept_fake_quant_elements(model, fake_quant)
    param_bytes = 2 * numel + 4 * owned_matrices + 2 * kept if bf16 else 4 * numel
    return param_bytes, 4 * numel, 12 * adam_owned + 4 * owned_matrices


def plan_memory(model_cfg: ModelConfig, parallel_cfg, world: int, micro_batch_size: int, seq_length: int,
                micro_batches_per_step: int, fmt: ActivationFormat | None = None, params_dtype: str = "fp32",
                optimizer=None, qat: tuple[str, str] | None = None, recompute=None,
                rollout_qat: tuple[str, str] | None = None) -> list[RankMemory]:
    """One entry per pipeline stage, for the stage's rank that holds the most: the stage's modules are
    built once, and each of its ranks' share counted from its own place (ZeRO-1 slices, Muon's owners).
    `fmt`: how the step keeps activations (default: a GPU's, under bf16 autocast, with these weights).
    `qat`, `rollout_qat`: (format, modules) of training's QAT and of RL's rollouts under quantised weights."""
    fmt = fmt or ActivationFormat.of(params_dtype=params_dtype)
    if fmt.weights != (2 if params_dtype == "bf16" else 4):
        raise ValueError(f"activation format {fmt} does not hold {params_dtype} weights")
    plan = []
    probe = planning_context(parallel_cfg, world, 0, model_cfg, seq_length)
    for stage in range(probe.size("pp")):
        model, pc = rank_model(model_cfg, parallel_cfg, world, stage * probe.layout.stage, seq_length)
        shares, specs = {}, parameter_specs(model, pc)  # the same for every rank of the stage
        for rank in range(world):
            place = planning_context(parallel_cfg, world, rank, model_cfg, seq_length)
            if place.coords["pp"] == stage:
                shares[rank] = state_bytes(model, place, params_dtype, optimizer, [q for q in (qat, rollout_qat) if q],
                                           specs, parallel_cfg.ddp_bucket_size_mb)
        rank = max(shares, key=lambda r: (sum(shares[r]), -r))
        params, grads, optim = shares[rank]
        in_flight = micro_batches_in_flight(pc, micro_batches_per_step)
        per_micro = stage_activation_bytes(model, pc, micro_batch_size, seq_length, fmt, recompute)
        working = backward_working_bytes(model, pc, micro_batch_size, seq_length, fmt, recompute)
        layers = tuple(i for s in model.stages for i in s.layers)
        copies = weight_copy_bytes(model, fmt, qat[1] if qat else None, pc.distributed_optimizer, recompute)
        plan.append(RankMemory(rank, stage, layers, params, grads, optim, int(per_micro * in_flight), in_flight,
                               copies, working))
    return plan


def kept_fake_quant_elements(model, fake_quant) -> int:
    """Elements of fake-quantised values that bf16 weights over ZeRO-1's shards keep (MasterWeights.keep_fake_quant):
    one copy per format of every weight a (format, modules) selection quantises in it."""
    from megajoy.quant.qat import quantised_weights

    by_format = {}
    for fmt, modules in fake_quant:
        by_format.setdefault(fmt, {}).update({id(p): p.numel() for _, p in quantised_weights(model, modules)})
    return sum(n for weights in by_format.values() for n in weights.values())


def weight_copy_bytes(model, fmt: ActivationFormat, qat_modules: str | None = None,
                      distributed_optimizer: bool = False, recompute=None) -> int:
    """bf16 copies of weights that a training step keeps from its first forward to its last backward.
    Under bf16 autocast with fp32 weights: every projection's and expert's weight cast once per step
    (autocast's cache; megajoy.kernels.backend.reuse_weight_casts for the experts, but not those of a
    checkpointed part, cast afresh where they are used), except the router's, which stays fp32, and the
    output head's when the chunked cross-entropy casts it per call. With bf16 weights and QAT over whole
    fp32 masters: the quantised weights' fake-quantised values, computed once per step
    (megajoy.quant.formats.reuse_fake_quant; over ZeRO-1's shards they are the kept values, counted with
    the parameters)."""
    from megajoy.model.moe import GroupedExperts
    from megajoy.parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megajoy.quant.qat import quantised_weights

    if fmt.gemm != 2:  # no autocast
        return 0
    if fmt.weights == 4:
        uncached = _checkpointed_experts(model, recompute)
        kinds = (ColumnParallelLinear, RowParallelLinear, GroupedExperts)
        gemms = [m for name, m in model.named_modules() if isinstance(m, kinds) and id(m) not in uncached
                 and not (name == "lm_head" and fmt.chunked_head)]
        return 2 * sum(p.numel() for m in gemms for p in m.parameters(recurse=False) if p.ndim >= 2)
    if qat_modules and not distributed_optimizer:
        return 2 * sum(p.numel() for _, p in quantised_weights(model, qat_modules))
    return 0


def micro_batches_in_flight(pc, micro_batches_per_step: int) -> float:
    """Micro-batches whose activations a rank holds at its peak. 1F1B: PP - stage on stage `stage`;
    interleaved 1F1B: the chunks torch's ScheduleInterleaved1F1B runs forward before its first backward
    (warm-up) and one more, over V chunks a micro-batch; ZB-V: PP."""
    pp = pc.size("pp")
    if pp == 1:
        return 1.0
    stage = pc.coords["pp"]
    if pc.pipeline_schedule == "1f1b":
        return float(min(micro_batches_per_step, pp - stage))
    if pc.pipeline_schedule == "interleaved":
        # Warm-up: (V - 1) rounds plus 2 chunks a rank away from the last. A round is n / max(1, n // PP) micro-batches,
        # PP only when n is a multiple of PP (then rank 0 holds Megatron's PP x (1 + (PP - 1) / (PP x V))).
        virtual = len(pc.plan) // pp
        per_round = micro_batches_per_step // max(1, micro_batches_per_step // pp)
        chunks = (virtual - 1) * per_round + 2 * (pp - 1 - stage) + 1
        return min(chunks, micro_batches_per_step * virtual) / virtual
    return float(min(micro_batches_per_step, pp))


# ------------------------------------------------------------------------------------------ activations

def stage_activation_bytes(model, pc, micro_batch_size: int, seq_length: int, fmt: ActivationFormat,
                           recompute=None) -> float:
    """Bytes autograd keeps for one micro-batch through this rank's stages. With full recomputation
    (megajoy.model.recompute), a checkpointed chunk keeps only its input; with selective recomputation each
    layer keeps less; backward rebuilds one chunk's (one layer's) activations at a time
    (`recomputed_chunk_bytes`, which the plan adds once)."""
    cfg = model.cfg
    modules = _selected(recompute)
    tokens = micro_batch_size * seq_length
    local = tokens // pc.tp_size if pc.sequence_parallel else tokens
    first = any(s.is_first for s in model.stages)
    last = any(s.is_last for s in model.stages)
    total = 4 * tokens * cfg.qk_rope_head_dim  # cos and sin, fp32, shared by the layers
    total += 8 * tokens if first else 0  # the embedding's token ids
    for stage in model.stages:
        for chunk, checkpointed in recompute.chunks(list(stage.layers)) if recompute else [(stage.layers, False)]:
            if checkpointed:
                total += local * cfg.hidden_size * fmt.weights  # the chunk's input
                continue
            total += sum(_layer_bytes(cfg, pc, micro_batch_size, seq_length, i, fmt, modules) for i in chunk)
    if last:
        total += _norm(fmt, local, cfg.hidden_size, fmt.weights) + _head(cfg, pc, tokens, fmt)
        total += len(model.mtp) * _mtp_depth_bytes(cfg, pc, micro_batch_size, seq_length, fmt, recompute)
    return total


def _mtp_depth_bytes(cfg, pc, micro_batch_size: int, seq_length: int, fmt: ActivationFormat, recompute) -> int:
    """What an MTP depth keeps: its layer, its head, and the next tokens' ids."""
    tokens = micro_batch_size * seq_length
    return (_mtp_layer_bytes(cfg, pc, micro_batch_size, seq_length, fmt, recompute) + _head(cfg, pc, tokens, fmt)
            + 8 * tokens)


def _head(cfg, pc, tokens: int, fmt: ActivationFormat) -> int:
    """The output head and loss on the final norm's output: the fused head keeps that output itself and
    per token the target (int64), two masks and the log-sum-exp; unfused, the head's cast input, the
    loss's fp32 log-softmax over this rank's vocabulary slice and the targets."""
    if fmt.chunked_head:
        return tokens * cfg.hidden_size * fmt.weights + tokens * (8 + 1 + 1 + 4)
    return tokens * cfg.hidden_size * fmt.gemm + 4 * tokens * (cfg.vocab_size // pc.tp_size) + 8 * tokens


def head_working_bytes(cfg, pc, tokens: int, fmt: ActivationFormat) -> int:
    """The most the output head and loss hold at once beyond what their forward keeps, reached in their
    backward (the first thing backward runs, while every activation of the micro-batch is alive). V is
    this rank's vocabulary slice, N the tokens through the head (gathered under sequence parallelism).
    Fused (megajoy.kernels.cross_entropy): the head weight's bf16 cast (fp32 weights under autocast),
    the fp32 weight gradient, the input gradient, and one chunk's logits: the GEMM's output beside its
    fp32 copy, or later the chunk's gradient beside its [V, K] product. Unfused: fp32 [N, V] buffers
    beside the kept log-softmax: torch's log-softmax backward takes its incoming gradient and writes a
    new one (two); the vocabulary-parallel loss copies its softmax and casts that to the GEMM's dtype."""
    vocab, width = cfg.vocab_size // pc.tp_size, cfg.hidden_size
    if fmt.chunked_head:
        rows = min(fmt.head_chunk, tokens)
        cast = 2 * vocab * width if fmt.gemm == 2 and fmt.weights == 4 else 0
        logits = max(_with_fp32_copy(fmt) * rows * vocab, fmt.gemm * (rows * vocab + vocab * width))
        return cast + 4 * vocab * width + tokens * width * fmt.weights + logits
    if pc.tp_size == 1:
        return 8 * tokens * vocab
    return _with_fp32_copy(fmt) * tokens * vocab


def _with_fp32_copy(fmt: ActivationFormat) -> int:
    """Bytes per element of a GEMM's output and its fp32 copy, both alive (an fp32 output is its own copy)."""
    return 4 + (fmt.gemm if fmt.gemm != 4 else 0)


def _mtp_layer_bytes(cfg, pc, micro_batch_size: int, seq_length: int, fmt: ActivationFormat, recompute) -> int:
    """An MTP depth: enorm, hnorm (on the final norm's output, which the head may keep already), the
    concatenation eh_proj reads, its decoder layer (whose residual stream is eh_proj's output) and final
    norm; under full recomputation only the next tokens' embedding (its other input is the head's)."""
    h = cfg.hidden_size
    tokens = micro_batch_size * seq_length
    local = tokens // pc.tp_size if pc.sequence_parallel else tokens
    if recompute is not None and recompute.full:
        return local * h * fmt.weights
    # the head's input is the final norm's output itself (not a cast, nor a sequence-parallel gather)
    head_keeps_it = (fmt.chunked_head or fmt.gemm == fmt.weights) and not (pc.sequence_parallel and pc.tp_size > 1)
    norm_keeps_it = fmt.fused_kernels or fmt.weights == 4  # hnorm keeps its input itself (not an fp32 copy)
    hnorm = _norm(fmt, local, h, fmt.weights) - (local * h * fmt.weights if head_keeps_it and norm_keeps_it else 0)
    layer = layer_activation_bytes(cfg, pc, micro_batch_size, seq_length, False, fmt, _selected(recompute),
                                   stream=fmt.gemm)
    return _norm(fmt, local, h, fmt.weights) + hnorm + 2 * local * h * fmt.gemm + layer + _norm(fmt, local, h, fmt.gemm)


def backward_working_bytes(model, pc, micro_batch_size: int, seq_length: int, fmt: ActivationFormat,
                           recompute=None) -> int:
    """The most backward holds at once beyond the activations kept for it, while they are all alive: on
    the last stage the output head and loss's working set (`head_working_bytes`; the MTP's head first, then
    the main head's beside the shared weights' gradients the MTP left waiting), and with recomputation the
    activations of the chunk it rebuilds (`recomputed_chunk_bytes`); the larger, since the head's are freed
    before any chunk is rebuilt."""
    rebuilt = recomputed_chunk_bytes(model, pc, micro_batch_size, seq_length, fmt, recompute)
    if not any(s.is_last for s in model.stages):
        return int(rebuilt)
    cfg, tokens = model.cfg, micro_batch_size * seq_length
    head = head_working_bytes(cfg, pc, tokens, fmt)
    # Backward runs the MTP branch first (made last). Its gradients for the head and embedding it shares wait
    # in autograd's buffers for the main model's (the unfused heads share autocast's one cast of the head
    # weight: they meet there, in its dtype); by the main head's turn the MTP's activations are freed.
    if len(model.mtp):
        head_gradient = fmt.weights if fmt.chunked_head else fmt.gemm
        waiting = (cfg.vocab_size // pc.tp_size) * cfg.hidden_size * (head_gradient + fmt.weights)
        freed = len(model.mtp) * _mtp_depth_bytes(cfg, pc, micro_batch_size, seq_length, fmt, recompute)
        head += max(0, waiting - freed)
    return int(max(rebuilt, head))


def recomputed_chunk_bytes(model, pc, micro_batch_size: int, seq_length: int, fmt: ActivationFormat,
                           recompute) -> float:
    """What backward rebuilds at once: the largest checkpointed chunk's (or MTP layer's) activations (full),
    or the most one layer gets back (selective: its recomputed parts, then its released outputs)."""
    if recompute is None:
        return 0.0

    def layer_bytes(i, modules=frozenset()):
        return _layer_bytes(model.cfg, pc, micro_batch_size, seq_length, i, fmt, modules)

    if recompute.full:
        sizes = [sum(layer_bytes(i) for i in chunk) for stage in model.stages
                 for chunk, checkpointed in recompute.chunks(list(stage.layers)) if checkpointed]
    else:
        sizes = [layer_bytes(i) - layer_bytes(i, _selected(recompute)) for stage in model.stages for i in stage.layers]
    if len(model.mtp):  # an MTP layer gets back what recomputation took from it
        mtp = [_mtp_layer_bytes(model.cfg, pc, micro_batch_size, seq_length, fmt, r) for r in (None, recompute)]
        sizes.append(mtp[0] - mtp[1])
    return float(max(sizes, default=0))


def _selected(recompute) -> frozenset:
    return frozenset(recompute.modules) if recompute is not None else frozenset()


def _layer_bytes(cfg, pc, micro_batch_size: int, seq_length: int, i: int, fmt: ActivationFormat,
                 modules: frozenset = frozenset()) -> int:
    """Bytes a decoder layer of the main model keeps for backward, its index tensors included."""
    moe = cfg.is_moe_layer(i)
    index_bytes = _moe_index_bytes(cfg, pc, micro_batch_size * seq_length) if moe and "moe" not in modules else 0
    return layer_activation_bytes(cfg, pc, micro_batch_size, seq_length, moe, fmt, modules) + index_bytes


def _norm(fmt: ActivationFormat, rows: int, width: int, input_width: int, input_storage: int | None = None) -> int:
    """An RMSNorm on `input_width`-byte inputs: torch's keeps its input in fp32 (the input itself when fp32,
    with the whole storage it is a view of: `input_storage` elements a row) and the normalised input in
    the input's dtype; Triton's keeps its input only. Both keep one fp32 statistic per row."""
    if fmt.fused_kernels:
        return rows * width * input_width + 4 * rows
    fp32_input = 4 * rows * ((input_storage or width) if input_width == 4 else width)
    return fp32_input + rows * width * input_width + 4 * rows


def layer_activation_bytes(cfg: ModelConfig, pc, micro_batch_size: int, seq_length: int, moe: bool,
                           fmt: ActivationFormat, modules: frozenset = frozenset(), stream: int | None = None) -> int:
    """Bytes a decoder layer keeps; `modules`: those selectively recomputed (Megatron's names); `stream`:
    the residual stream's width (the weights' unless given)."""
    tokens = micro_batch_size * seq_length
    local = tokens // pc.tp_size if pc.sequence_parallel else tokens
    d = cfg.hidden_size
    feed_forward = _moe(cfg, pc, tokens, fmt, modules) if moe else _dense_mlp(cfg, pc, tokens, local, fmt, modules)
    stream = stream or fmt.weights
    norms = 2 * _norm(fmt, local, d, stream)
    if "layernorm" in modules and not fmt.fused_kernels and stream != 4:
        # torch's norm keeps an fp32 copy of a bf16 input; the rebuild of its released output keeps the input
        norms += 2 * local * d * stream
    return norms + _mla(cfg, pc, micro_batch_size, seq_length, fmt, modules) + feed_forward


def _mla(cfg: ModelConfig, pc, micro_batch_size: int, seq_length: int, fmt: ActivationFormat,
         modules: frozenset = frozenset()) -> int:
    tokens = micro_batch_size * seq_length
    sp = pc.sequence_parallel and pc.tp_size > 1
    local = tokens // pc.tp_size if sp else tokens
    heads = cfg.num_attention_heads // pc.tp_size
    q, c, r = cfg.q_lora_rank or 0, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    qk, v, nope = cfg.qk_head_dim, cfg.v_head_dim, cfg.qk_nope_head_dim
    g = fmt.gemm
    n = 0 if "layernorm" in modules else local * cfg.hidden_size * g  # the norm's output, both down projections' input
    if q:  # q_a's output normed; the up projection's (gathered) input
        n += _norm(fmt, local, q, g) + (tokens * q if sp else local * q) * g
    elif pc.tp_size > 1:  # q_proj's own cast of its input through the tensor-parallel region (gathered with SP)
        n += tokens * cfg.hidden_size * g if sp or g != fmt.weights else 0
    n += _norm(fmt, local, c, g, input_storage=c + r) + tokens * (c + r) * g  # kv_a's latent normed, kv_b's input
    up_outputs = (2 * tokens * heads * qk + tokens * heads * (nope + v)) * g  # q, k, the kv_b output v is a view of
    if "core_attn" in modules:  # its inputs kept for the rerun, nothing of its own
        internals, inputs_kept = 0, up_outputs
    elif not fmt.flash_attention:  # fp32 scaled q and k copies, the score matrix, a v copy (not q, k, v themselves)
        scores = micro_batch_size * heads * seq_length ** 2
        internals, inputs_kept = 4 * (2 * tokens * heads * qk + scores + tokens * heads * v), 0
    else:  # q, k, v, the fp32 log-sum-exp, and its output (o_proj's input, counted below)
        internals, inputs_kept = 4 * micro_batch_size * heads * seq_length, up_outputs
    if "mla_up_proj" in modules:  # q, k, kv released after attention, rebuilt from the latents
        inputs_kept = 0
    return n + internals + inputs_kept + tokens * heads * v * g  # + the attention output, o_proj's input


def _swiglu_elements(fmt: ActivationFormat, released_product: bool = False) -> int:
    """Per row of the intermediate width, what a SwiGLU MLP keeps besides its input: gate and up, silu(gate)
    with torch's kernel (not Triton's), and their product (the down projection's input) unless released."""
    return 2 + (0 if fmt.fused_kernels else 1) + (0 if released_product else 1)


def _dense_mlp(cfg: ModelConfig, pc, tokens: int, local: int, fmt: ActivationFormat,
               modules: frozenset = frozenset()) -> int:
    released = "layernorm" in modules  # the norm's output (not the sequence-parallel gather of it)
    if "mlp" in modules:  # only its input kept
        return 0 if released else local * cfg.hidden_size * fmt.weights
    gathered = pc.sequence_parallel and pc.tp_size > 1
    inputs = 0 if released and not gathered else tokens * cfg.hidden_size
    return (inputs + _swiglu_elements(fmt) * tokens * (cfg.intermediate_size // pc.tp_size)) * fmt.gemm


def _moe(cfg: ModelConfig, pc, tokens: int, fmt: ActivationFormat, modules: frozenset = frozenset()) -> int:
    """Bytes of an MoE block on this rank's tokens, assuming balanced routing."""
    local = tokens // pc.tp_size  # the block always works on the rank's token shard
    own_input = pc.tp_size == 1 or pc.sequence_parallel  # else the block splits the replicated sequence (a copy)
    released = "layernorm" in modules and own_input
    d, g = cfg.hidden_size, fmt.gemm
    if "moe" in modules:  # only its input kept
        return 0 if released else (local if own_input else tokens) * d * fmt.weights
    k, inter = cfg.num_experts_per_tok, cfg.moe_intermediate_size
    routed = local * k
    # the router's input (the norm's output) and its fp32 scores and weights; torch's also the weights' sums and
    # their unnormalised copy (the fused router's weights are the ones combine keeps)
    fused_router = fmt.fused_kernels and fused_routing_supported(cfg)
    router = (0 if released else local * d * fmt.weights) + 4 * local * cfg.n_routed_experts
    router += 4 * routed if fused_router else 4 * (local + 2 * routed)
    # the permuted input and output, and SwiGLU's
    experts = (2 * routed * d + _swiglu_elements(fmt, "moe_act" in modules) * routed * inter) * g
    shared = 0
    if "shared_experts" not in modules:  # SwiGLU's, and their own cast of the input if it is not in bf16 already
        own_cast = local * d if g != fmt.weights else 0
        shared = (_swiglu_elements(fmt) * local * inter * cfg.n_shared_experts + own_cast) * g
    return router + experts + shared


def _moe_index_bytes(cfg: ModelConfig, pc, tokens: int) -> int:
    """int64 index tensors of the routing and permutation, and the int32 group offsets."""
    routed = tokens // pc.tp_size * cfg.num_experts_per_tok
    return 8 * 2 * routed + 2 * 4 * cfg.n_routed_experts // pc.ep_size


def _checkpointed_experts(model, recompute) -> set[int]:
    """ids of the GroupedExperts modules that run inside checkpointed parts (full recomputation's
    checkpointed chunks, or every MoE block under selective `moe`)."""
    if recompute is None:
        return set()
    if recompute.full:
        layers = [i for stage in model.stages for chunk, checkpointed in recompute.chunks(list(stage.layers))
                  if checkpointed for i in chunk]
    elif "moe" in recompute.modules:
        layers = [i for stage in model.stages for i in stage.layers]
    else:
        return set()
    mlps = [model.layers[str(i)].mlp for i in layers]
    return {id(mlp.experts) for mlp in mlps if hasattr(mlp, "experts")}


def format_plan(plan: list[RankMemory], gpu_memory_gib: float, headroom: float = 0.9) -> str:
    rows = ["  stage  layers         params GiB  grads GiB  optim GiB  activ GiB (micro-batches)  "
            "backward GiB  bf16 copies GiB  total GiB"]
    for m in plan:
        layers = f"{m.layers[0]}-{m.layers[-1]}" if m.layers else "-"
        rows.append(f"  {m.pp_stage:<5}  {layers:<13}  {m.parameters / GiB:>10.2f}  {m.gradients / GiB:>9.2f}  "
                    f"{m.optimizer / GiB:>9.2f}  {m.activations / GiB:>9.2f} ({m.micro_batches_in_flight:g})"
                    f"{'':>12}  {m.working_set / GiB:>12.2f}  {m.weight_copies / GiB:>15.2f}  {m.total / GiB:>9.2f}")
    worst = max(m.total for m in plan)
    budget = gpu_memory_gib * headroom
    verdict = "fits" if worst / GiB <= budget else "does NOT fit"
    rows.append(f"  peak {worst / GiB:.2f} GiB per GPU: {verdict} in {gpu_memory_gib:g} GiB "
                f"(keeping {1 - headroom:.0%} for the allocator, communication buffers and the CUDA context)")
    return "\n".join(rows)
