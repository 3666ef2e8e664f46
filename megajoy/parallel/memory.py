"""Memory planner: what each rank of a layout holds during training.

Parameters, gradients and optimizer state are read off this rank's real modules, built on the meta
device with placeholder groups (fp32 master parameters and gradients, AdamW's two moments; with ZeRO-1
the rank's slice of fp32 master copies and moments, sliced as the distributed optimizer slices; Muon's
momentum on the rank that owns each matrix, assigned as the optimizer assigns it; with bf16 parameters,
their bf16 copies, beside whole fp32 masters unless ZeRO-1 holds the only ones).
Activations are the tensors autograd keeps for backward, counted per micro-batch from the shapes this
implementation saves (see `layer_activation_elements`), times the micro-batches the schedule keeps in
flight on the rank. Attention is counted as a fused kernel keeps it (q, k, v, output, log-sum-exp), or,
with `attention="math"` (CPU), with the full score matrix. Beside them, the bf16 copies of weights that a
step under autocast keeps once (`weight_copy_bytes`).
"""

from dataclasses import asdict, dataclass

import torch

from megajoy.config import ModelConfig
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

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.weight_copies

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def rank_model(model_cfg: ModelConfig, parallel_cfg, world: int, rank: int, seq_length: int):
    from megajoy.model.transformer import JoyAIForCausalLM

    pc = planning_context(parallel_cfg, world, rank, model_cfg, seq_length)
    with torch.device("meta"):
        return JoyAIForCausalLM(model_cfg, pc), pc


def state_bytes(model, pc, params_dtype: str = "fp32", optimizer=None, qat_modules: str | None = None,
                specs: dict | None = None, bucket_mb: float = 25.0) -> tuple[int, int, int]:
    """(parameter, gradient, optimizer) bytes of this rank, as the trainer allocates them. `optimizer`: the
    OptimizerConfig (default AdamW). Gradients are fp32. AdamW keeps two moments, and under ZeRO-1 the
    rank's fp32 slice of the weights; Muon's matrices keep one momentum on the rank that orthogonalises
    them. With params_dtype bf16 the parameters are the bf16 copies plus whole fp32 masters, or, under
    ZeRO-1, plus only the Muon matrices this rank owns (AdamW's fp32 slices count as optimizer state), and
    under QAT of `qat_modules` the bf16 fake-quantised values its weights keep in place of whole fp32
    masters (see megajoy.optim.master_weights). `specs`:
    the modules' parameter_specs, when already at hand; `bucket_mb`: ZeRO-1's bucket size, each bucket
    sharded on its own."""
    from megajoy.optim.muon import assign_owners
    from megajoy.parallel.mappings import group_rank
    from megajoy.parallel.muon import muon_entries
    from megajoy.quant.qat import quantised_weights

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
    kept = sum(p.numel() for _, p in quantised_weights(model, qat_modules)) if qat_modules else 0
    param_bytes = 2 * numel + 4 * owned_matrices + 2 * kept if bf16 else 4 * numel
    return param_bytes, 4 * numel, 12 * adam_owned + 4 * owned_matrices


def plan_memory(model_cfg: ModelConfig, parallel_cfg, world: int, micro_batch_size: int, seq_length: int,
                micro_batches_per_step: int, attention: str = "flash", bytes_per_element: int = 4,
                params_dtype: str = "fp32", optimizer=None, qat_modules: str | None = None,
                recompute=None) -> list[RankMemory]:
    """One entry per pipeline stage, for the stage's rank that holds the most: the stage's modules are
    built once, and each of its ranks' share counted from its own place (ZeRO-1 slices, Muon's owners)."""
    plan = []
    probe = planning_context(parallel_cfg, world, 0, model_cfg, seq_length)
    for stage in range(probe.size("pp")):
        model, pc = rank_model(model_cfg, parallel_cfg, world, stage * probe.layout.stage, seq_length)
        shares, specs = {}, parameter_specs(model, pc)  # the same for every rank of the stage
        for rank in range(world):
            place = planning_context(parallel_cfg, world, rank, model_cfg, seq_length)
            if place.coords["pp"] == stage:
                shares[rank] = state_bytes(model, place, params_dtype, optimizer, qat_modules, specs,
                                           parallel_cfg.ddp_bucket_size_mb)
        rank = max(shares, key=lambda r: (sum(shares[r]), -r))
        params, grads, optim = shares[rank]
        in_flight = micro_batches_in_flight(pc, micro_batches_per_step)
        per_micro = stage_activation_elements(model, pc, micro_batch_size, seq_length, attention, bytes_per_element,
                                              recompute)
        rebuilt = recomputed_chunk_bytes(model, pc, micro_batch_size, seq_length, attention, bytes_per_element,
                                         recompute)
        layers = tuple(i for s in model.stages for i in s.layers)
        activations = int(per_micro * in_flight + rebuilt)
        copies = weight_copy_bytes(model, params_dtype, bytes_per_element, qat_modules, pc.distributed_optimizer,
                                   recompute)
        plan.append(RankMemory(rank, stage, layers, params, grads, optim, activations, in_flight, copies))
    return plan


def weight_copy_bytes(model, params_dtype: str, bytes_per_element: int, qat_modules: str | None = None,
                      distributed_optimizer: bool = False, recompute=None) -> int:
    """bf16 copies of weights that a training step keeps from its first forward to its last backward.
    Under bf16 autocast with fp32 weights: every projection's and expert's weight cast once per step
    (autocast's cache; megajoy.kernels.backend.reuse_weight_casts for the experts, but not those of a
    checkpointed part, cast afresh where they are used), except the output head's, which the chunked
    cross-entropy (the GPU default) casts per call, and the router's, which stays fp32. With bf16 weights
    and QAT over whole fp32 masters: the quantised weights' fake-quantised values, computed once per step
    (megajoy.quant.formats.reuse_fake_quant; over ZeRO-1's shards they are the kept values, counted with
    the parameters)."""
    from megajoy.model.moe import GroupedExperts
    from megajoy.parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megajoy.quant.qat import quantised_weights

    if bytes_per_element != 2:  # no autocast
        return 0
    if params_dtype == "fp32":
        uncached = _checkpointed_experts(model, recompute)
        kinds = (ColumnParallelLinear, RowParallelLinear, GroupedExperts)
        gemms = [m for name, m in model.named_modules()
                 if isinstance(m, kinds) and name != "lm_head" and id(m) not in uncached]
        return 2 * sum(p.numel() for m in gemms for p in m.parameters(recurse=False) if p.ndim >= 2)
    if qat_modules and not distributed_optimizer:
        return 2 * sum(p.numel() for _, p in quantised_weights(model, qat_modules))
    return 0


def micro_batches_in_flight(pc, micro_batches_per_step: int) -> float:
    """Micro-batches whose activations a rank holds at its peak. 1F1B: PP - stage on stage `stage`;
    interleaved 1F1B: PP x (1 + (PP - 1) / (PP x V)) (Megatron's estimate, first rank); ZB-V: PP."""
    pp = pc.size("pp")
    if pp == 1:
        return 1.0
    stage = pc.coords["pp"]
    if pc.pipeline_schedule == "1f1b":
        return float(min(micro_batches_per_step, pp - stage))
    if pc.pipeline_schedule == "interleaved":
        virtual = len(pc.plan) // pp
        return min(micro_batches_per_step, pp * (1 + (pp - 1) / (pp * virtual)))
    return float(min(micro_batches_per_step, pp))


# ------------------------------------------------------------------------------------------ activations

def stage_activation_elements(model, pc, micro_batch_size: int, seq_length: int, attention: str,
                              bytes_per_element: int, recompute=None) -> float:
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
    elements = tokens * cfg.qk_rope_head_dim  # cos and sin, shared by the layers
    index_bytes = 8 * tokens if first else 0  # the embedding's token ids
    for stage in model.stages:
        for chunk, checkpointed in recompute.chunks(list(stage.layers)) if recompute else [(stage.layers, False)]:
            if checkpointed:
                elements += local * cfg.hidden_size  # the chunk's input
                continue
            for e, b in (_layer_bytes(cfg, pc, micro_batch_size, seq_length, i, attention, modules) for i in chunk):
                elements, index_bytes = elements + e, index_bytes + b
    if last:
        vocab = cfg.vocab_size // pc.tp_size
        elements += _norm(local, cfg.hidden_size) + tokens * cfg.hidden_size + tokens * vocab  # norm, head, softmax
        for _ in range(len(model.mtp)):
            elements += _mtp_layer_elements(cfg, pc, micro_batch_size, seq_length, attention, recompute)
            elements += tokens * cfg.hidden_size + tokens * vocab  # its head and softmax
            index_bytes += 8 * tokens
    return elements * bytes_per_element + index_bytes


def _mtp_layer_elements(cfg, pc, micro_batch_size: int, seq_length: int, attention: str, recompute) -> int:
    """An MTP depth: enorm, hnorm (on the head's saved input), the concatenation, its decoder layer and final
    norm; under full recomputation only the next tokens' embedding (its other input is the head's)."""
    h = cfg.hidden_size
    tokens = micro_batch_size * seq_length
    local = tokens // pc.tp_size if pc.sequence_parallel else tokens
    if recompute is not None and recompute.full:
        return local * h
    layer = layer_activation_elements(cfg, pc, micro_batch_size, seq_length, False, attention, _selected(recompute))
    return _norm(local, h) + local * h + local + 2 * local * h + layer + _norm(local, h)


def recomputed_chunk_bytes(model, pc, micro_batch_size: int, seq_length: int, attention: str,
                           bytes_per_element: int, recompute) -> float:
    """What backward rebuilds at once: the largest checkpointed chunk's (or MTP layer's) activations (full),
    or the most one layer gets back (selective: its recomputed parts, then its released outputs)."""
    if recompute is None:
        return 0.0

    def layer_bytes(i, modules=frozenset()):
        elements, index_bytes = _layer_bytes(model.cfg, pc, micro_batch_size, seq_length, i, attention, modules)
        return elements * bytes_per_element + index_bytes

    if recompute.full:
        sizes = [sum(layer_bytes(i) for i in chunk) for stage in model.stages
                 for chunk, checkpointed in recompute.chunks(list(stage.layers)) if checkpointed]
    else:
        sizes = [layer_bytes(i) - layer_bytes(i, _selected(recompute)) for stage in model.stages for i in stage.layers]
    if len(model.mtp):  # an MTP layer gets back what recomputation took from it
        mtp = [_mtp_layer_elements(model.cfg, pc, micro_batch_size, seq_length, attention, r) for r in (None, recompute)]
        sizes.append((mtp[0] - mtp[1]) * bytes_per_element)
    return float(max(sizes, default=0))


def _selected(recompute) -> frozenset:
    return frozenset(recompute.modules) if recompute is not None else frozenset()


def _layer_bytes(cfg, pc, micro_batch_size: int, seq_length: int, i: int, attention: str,
                 modules: frozenset = frozenset()) -> tuple[int, int]:
    """(float elements, index bytes) a decoder layer keeps for backward."""
    moe = cfg.is_moe_layer(i)
    index_bytes = _moe_index_bytes(cfg, pc, micro_batch_size * seq_length) if moe and "moe" not in modules else 0
    return layer_activation_elements(cfg, pc, micro_batch_size, seq_length, moe, attention, modules), index_bytes


def _norm(rows: int, width: int) -> int:
    """RMSNorm keeps its input and normalised output, and one statistic per row."""
    return 2 * rows * width + rows


def layer_activation_elements(cfg: ModelConfig, pc, micro_batch_size: int, seq_length: int, moe: bool,
                              attention: str, modules: frozenset = frozenset()) -> int:
    """Float elements a decoder layer keeps; `modules`: those selectively recomputed (Megatron's names)."""
    tokens = micro_batch_size * seq_length
    local = tokens // pc.tp_size if pc.sequence_parallel else tokens
    d = cfg.hidden_size
    feed_forward = _moe(cfg, pc, tokens, modules) if moe else _dense_mlp(cfg, pc, tokens, local, modules)
    return 2 * _norm(local, d) + _mla(cfg, pc, micro_batch_size, seq_length, attention, modules) + feed_forward


def _mla(cfg: ModelConfig, pc, micro_batch_size: int, seq_length: int, attention: str,
         modules: frozenset = frozenset()) -> int:
    tokens = micro_batch_size * seq_length
    sp = pc.sequence_parallel and pc.tp_size > 1
    local = tokens // pc.tp_size if sp else tokens
    heads = cfg.num_attention_heads // pc.tp_size
    q, c, r = cfg.q_lora_rank or 0, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    qk, v, nope = cfg.qk_head_dim, cfg.v_head_dim, cfg.qk_nope_head_dim
    n = 0 if "layernorm" in modules else local * cfg.hidden_size  # the norm's output, both down projections' input
    if q:  # q_a output, its norm's statistics and output; the up projection's (gathered) input
        n += 2 * local * q + local + (tokens * q if sp else local * q)
    else:
        n += tokens * cfg.hidden_size if sp else 0
    n += local * (c + r) + local * c + local + tokens * (c + r)  # kv_a output, its norm, kv_b's input
    up_outputs = 2 * tokens * heads * qk + tokens * heads * (nope + v)  # q, k, the kv_b output v is a view of
    if "core_attn" in modules:  # its inputs kept for the rerun, nothing of its own
        internals, inputs_kept = 0, up_outputs
    elif attention == "math":  # scaled q and k copies, the score matrix, a v copy (not q, k, v themselves)
        scores = micro_batch_size * heads * seq_length ** 2
        internals, inputs_kept = 2 * tokens * heads * qk + scores + tokens * heads * v, 0
    else:  # q, k, v and the log-sum-exp
        internals, inputs_kept = micro_batch_size * heads * seq_length, up_outputs
    if "mla_up_proj" in modules:  # q, k, kv released after attention, rebuilt from the latents
        inputs_kept = 0
    return n + internals + inputs_kept + tokens * heads * v  # + the attention output, o_proj's input


def _dense_mlp(cfg: ModelConfig, pc, tokens: int, local: int, modules: frozenset = frozenset()) -> int:
    released = "layernorm" in modules  # the norm's output (not the sequence-parallel gather of it)
    if "mlp" in modules:  # only its input kept
        return 0 if released else local * cfg.hidden_size
    gathered = pc.sequence_parallel and pc.tp_size > 1
    return (0 if released and not gathered else tokens * cfg.hidden_size) + 4 * tokens * (
        cfg.intermediate_size // pc.tp_size)


def _moe(cfg: ModelConfig, pc, tokens: int, modules: frozenset = frozenset()) -> int:
    """Float elements of an MoE block on this rank's tokens, assuming balanced routing."""
    local = tokens // pc.tp_size  # the block always works on the rank's token shard
    own_input = pc.tp_size == 1 or pc.sequence_parallel  # else the block splits the replicated sequence (a copy)
    released = "layernorm" in modules and own_input
    if "moe" in modules:  # only its input kept
        return 0 if released else (local if own_input else tokens) * cfg.hidden_size
    d, k, inter = cfg.hidden_size, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    routed = local * k
    # input, scores, sums, weights
    router = (0 if released else local * d) + local * cfg.n_routed_experts + local + 2 * routed
    # permuted in / out, gate-up, silu, product
    experts = 2 * routed * d + 2 * routed * inter + routed * inter + (0 if "moe_act" in modules else routed * inter)
    shared = 0 if "shared_experts" in modules else 4 * local * inter * cfg.n_shared_experts
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
            "bf16 copies GiB  total GiB"]
    for m in plan:
        layers = f"{m.layers[0]}-{m.layers[-1]}" if m.layers else "-"
        rows.append(f"  {m.pp_stage:<5}  {layers:<13}  {m.parameters / GiB:>10.2f}  {m.gradients / GiB:>9.2f}  "
                    f"{m.optimizer / GiB:>9.2f}  {m.activations / GiB:>9.2f} ({m.micro_batches_in_flight:g})"
                    f"{'':>12}  {m.weight_copies / GiB:>15.2f}  {m.total / GiB:>9.2f}")
    worst = max(m.total for m in plan)
    budget = gpu_memory_gib * headroom
    verdict = "fits" if worst / GiB <= budget else "does NOT fit"
    rows.append(f"  peak {worst / GiB:.2f} GiB per GPU: {verdict} in {gpu_memory_gib:g} GiB "
                f"(keeping {1 - headroom:.0%} for the allocator, communication buffers and the CUDA context)")
    return "\n".join(rows)
