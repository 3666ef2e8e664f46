"""Pipeline parallelism: which decoder layers each (virtual) stage holds, which rank runs it, and the
stage modules and schedules of `torch.distributed.pipelining` that drive them.

Stages: the first embeds, the last applies the final norm, the output head, the MTP module (which needs
the embedding too: the last stage keeps a copy whose gradient is all-reduced with the first stage's, as
Megatron's embedding group does) and the loss. Placement: 1F1B puts stage s on rank s; interleaved 1F1B
puts stage s on rank s mod PP (V chunks per rank); zero-bubble uses ZB-V, whose V shape puts stages s
and 2 PP - 1 - s on rank s, so the first and last stages share rank 0 and one embedding.
"""

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import nn

from megajoy.data.packing import Batch, stack
from megajoy.model.recompute import run_decoder_layers

SCHEDULES = ("1f1b", "interleaved", "zero-bubble")
CACHED_SCHEDULES = 4  # built schedules kept, one per micro-batch shape (each holds its receive buffers)


@dataclass(frozen=True)
class StageSpec:
    index: int
    pp_rank: int
    layers: tuple[int, ...]
    is_first: bool
    is_last: bool


def plan_stages(num_layers: int, pp: int, virtual: int | None, schedule: str,
                layout: list[int] | None = None) -> tuple[StageSpec, ...]:
    """Every stage of the pipeline, in order. Errors name the numbers that do not fit."""
    virtual = _virtual_stages(pp, virtual, schedule)
    n = pp * virtual
    if layout is None and num_layers < n:
        raise ValueError(f"num_hidden_layers={num_layers} is fewer than the {n} pipeline stages (PP x virtual "
                         f"stages); give --pp-layout with empty stages to run it anyway")
    counts = list(layout) if layout is not None else _even_split(num_layers, n)
    if len(counts) != n:
        raise ValueError(f"--pp-layout has {len(counts)} entries but PP x virtual stages = {pp} x {virtual} = {n}")
    if sum(counts) != num_layers or min(counts) < 0:
        raise ValueError(f"--pp-layout {counts} must be non-negative and sum to num_hidden_layers={num_layers}")
    stages, first_layer = [], 0
    for s, count in enumerate(counts):
        rank = (s if s < pp else 2 * pp - 1 - s) if schedule == "zero-bubble" else s % pp
        stages.append(StageSpec(s, rank, tuple(range(first_layer, first_layer + count)), s == 0, s == n - 1))
        first_layer += count
    _check_every_rank_holds_weights(stages, pp, counts)
    return tuple(stages)


def _check_every_rank_holds_weights(stages: list, pp: int, counts: list[int]) -> None:
    """Empty stages are fine beside others on the same rank (or with the embedding or head); a rank whose
    stages are all empty would hold no weights and idle in every step."""
    idle = [r for r in range(pp) if not any(s.layers or s.is_first or s.is_last for s in stages if s.pp_rank == r)]
    if idle:
        raise ValueError(f"--pp-layout {counts} leaves pipeline rank(s) {idle} without any layer, embedding or "
                         f"head; give every rank a layer (fewer pipeline ranks, or virtual stages beside its empty "
                         f"ones)")


def _virtual_stages(pp: int, virtual: int | None, schedule: str) -> int:
    if pp == 1:
        if virtual not in (None, 1):
            raise ValueError(f"--virtual-pipeline-stages {virtual} needs --pp > 1")
        return 1
    if schedule == "1f1b":
        if virtual not in (None, 1):
            raise ValueError(f"--pp-schedule 1f1b runs one stage per rank; use interleaved for {virtual} virtual stages")
        return 1
    if schedule == "interleaved":
        virtual = virtual or 2
        if virtual < 2:
            raise ValueError("--pp-schedule interleaved needs --virtual-pipeline-stages >= 2")
        return virtual
    if virtual not in (None, 2):
        raise ValueError(f"--pp-schedule zero-bubble (ZB-V) places exactly 2 stages per rank, not {virtual}")
    return 2


def _even_split(num_layers: int, stages: int) -> list[int]:
    base, extra = divmod(num_layers, stages)
    # The first and last stages also embed / run the head: give the extra layers to the middle ones.
    order = sorted(range(stages), key=lambda s: (s in (0, stages - 1), s))
    counts = [base] * stages
    for s in order[:extra]:
        counts[s] += 1
    return counts


def check_micro_batches(n: int, pp: int, schedule: str, what: str) -> None:
    """The schedules' limits on a step's `n` micro-batches per rank (from `what`): at least PP; interleaved runs
    them in max(1, n // PP) equal rounds (torch's ScheduleInterleaved1F1B refuses other counts)."""
    per_rank = f"{what} / (micro_batch_size x DP) = {n}"
    if n < pp:
        raise ValueError(f"pipeline parallelism needs at least PP={pp} micro-batches per step and rank; {per_rank}")
    rounds = max(1, n // pp)
    if schedule == "interleaved" and n % rounds:
        raise ValueError(f"--pp-schedule interleaved runs a step's micro-batches in {rounds} equal rounds of about "
                         f"PP={pp}: {per_rank} micro-batches per rank is no multiple of {rounds} (use a multiple of "
                         f"{pp}, or fewer than {2 * pp})")


def single_stage(num_layers: int) -> tuple[StageSpec, ...]:
    return (StageSpec(0, 0, tuple(range(num_layers)), True, True),)


class StageModule(nn.Module):
    """One stage's forward for `PipelineStage`: registers exactly the modules this stage runs (shared with
    the rank's model, so names and parameters are the model's). The last stage returns the step's loss
    contribution from `objective(CausalLMOutput, Batch)`, set by the trainer before each schedule run."""

    def __init__(self, model: nn.Module, spec: StageSpec):
        super().__init__()
        self.spec = spec
        object.__setattr__(self, "model", model)  # a reference, not a submodule
        parts = {f"layer{i}": model.layers[str(i)] for i in spec.layers}
        if spec.is_first or (spec.is_last and model.embed_tokens is not None):
            parts["embed"] = model.embed_tokens
        if spec.is_last:
            parts.update(norm=model.norm, head=model.lm_head, mtp=model.mtp)
        self.parts = nn.ModuleDict(parts)
        self.objective = None
        self.compute_mtp = False

    def forward(self, x, **fields):
        model, batch = self.model, Batch(**fields)
        seq = model.sequence_info(batch.position_ids, batch.document_ids, batch.padding_mask)
        h = model.embed(x) if self.spec.is_first else x
        h = run_decoder_layers([model.layers[str(i)] for i in self.spec.layers], h, seq, model.recompute)
        if not self.spec.is_last:
            return h
        out = model.finish(h, batch.input_ids, batch.labels, batch.loss_mask, seq, compute_mtp=self.compute_mtp,
                           return_logits=False)
        return self.objective(out, batch).reshape(1)  # 1-element, so the schedule can merge outputs in eval()


def build_schedule(stage_modules: list[StageModule], pc, schedule: str, n_microbatches: int,
                   micro_shape: tuple[int, int], hidden: int, device: torch.device, dtype: torch.dtype,
                   on_weight_grads=None):
    """A schedule over this rank's stages. Shapes are given up front (static mode): without them the
    stages would run an extra forward on the first call to infer them, and the last stage's objective
    and the routers' load counters would see that call as a real micro-batch."""
    from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B,
                                              ScheduleZBVZeroBubble)

    n_stages = pc.plan[-1].index + 1
    group = pc.groups["pp"]
    batch, seq = micro_shape
    local_seq = seq // pc.tp_size if pc.sequence_parallel else seq
    # requires_grad marks the activations whose gradients travel back between stages.
    hidden_states = torch.empty(batch, local_seq, hidden, device=device, dtype=dtype, requires_grad=True)
    tokens = torch.empty(batch, seq, dtype=torch.long, device=device)
    loss = torch.empty(1, device=device)
    stages = [PipelineStage(m, m.spec.index, n_stages, device, group=group,
                            input_args=tokens if m.spec.is_first else hidden_states,
                            output_args=loss if m.spec.is_last else hidden_states) for m in stage_modules]
    if schedule == "zero-bubble":
        for stage in stages:
            _call_after_weight_passes(stage, on_weight_grads)
    cls = {"1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B, "zero-bubble": ScheduleZBVZeroBubble}[schedule]
    # The last stage's output already is the loss term, normalised by the whole step's token count.
    kwargs = dict(n_microbatches=n_microbatches, loss_fn=lambda output, target: output.sum(), scale_grads=False)
    return cls(stages[0], **kwargs) if schedule == "1f1b" else cls(stages, **kwargs)


def _call_after_weight_passes(stage, callback) -> None:
    """Zero-bubble schedules compute weight gradients in a separate pass that adds them into `.grad`
    itself, outside autograd's accumulation (and its hooks): `callback` (if any) runs after each such pass.
    The pass keeps the chunk's graph until it ends (see `_weight_pass_keeps_graph`)."""
    weight_pass = stage.backward_weight_one_chunk

    def backward_weight_one_chunk(*args, **kwargs):
        with _weight_pass_keeps_graph():
            weight_pass(*args, **kwargs)
        if callback is not None:
            callback()

    stage.backward_weight_one_chunk = backward_weight_one_chunk


@contextlib.contextmanager
def _weight_pass_keeps_graph():
    """torch's weight pass runs one autograd.grad per group of parameters, each freeing the graph it walks.
    A weight used at two places of which one feeds the other (the embedding at MTP depths 1 and 2) is reached
    from the later use through the layers in between, whose graph another group still needs: "backward
    through the graph a second time". Retained, the graph is freed once the pass drops the chunk's state."""
    from torch.distributed.pipelining import stage as stage_module

    weight_grads = stage_module.stage_backward_weight
    stage_module.stage_backward_weight = functools.partial(weight_grads, retain_graph=True)
    try:
        yield
    finally:
        stage_module.stage_backward_weight = weight_grads


def pipeline_peer(pc, pp_rank: int) -> int:
    """The global rank of this rank's counterpart (same TP, CP and DP coordinates) at pipeline rank `pp_rank`."""
    c = pc.coords
    return pc.layout.rank_of(c["tp"], c["cp"], c["dp"], pp_rank)


class PipelineRunner:
    """Runs a step's micro-batches through this rank's stages with the chosen schedule; returns the
    objective's metrics (summed over micro-batches), which only the last stage computes, on every rank."""

    def __init__(self, model, pc):
        self.model, self.pc = model, pc
        self.modules = [StageModule(model, spec) for spec in model.stages]
        self.holds_first = any(m.spec.is_first for m in self.modules)
        self.last_rank = pipeline_peer(pc, pc.last_stage_pp_rank)
        self.schedules: dict[int, object] = {}
        self.on_weight_grads = None  # called after each separate weight-gradient pass (zero-bubble)

    def _schedule(self, n_microbatches: int, micro_shape: tuple[int, int]):
        key = (n_microbatches, micro_shape)
        if key not in self.schedules:
            if len(self.schedules) == CACHED_SCHEDULES:  # RL's rows change length with every rollout
                self.schedules.pop(next(iter(self.schedules)))
            self.schedules[key] = build_schedule(self.modules, self.pc, self.pc.pipeline_schedule, n_microbatches,
                                                 micro_shape, self.model.cfg.hidden_size, self.pc.device,
                                                 self._residual_dtype(), self.on_weight_grads)
        return self.schedules[key]

    def run(self, batches: list, objective, compute_mtp: bool, backward: bool) -> dict[str, torch.Tensor]:
        parts: list[dict] = []

        def last_stage_objective(out, batch):
            loss, metrics = objective(out, batch)
            parts.append(metrics)
            return loss

        for module in self.modules:
            module.objective, module.compute_mtp = last_stage_objective, compute_mtp
        inputs = stack(batches).to(self.pc.device).tensors()
        if backward:
            args = (inputs["input_ids"],) if self.holds_first else ()
            target = torch.zeros(inputs["input_ids"].shape[0], device=self.pc.device)
            schedule = self._schedule(len(batches), tuple(batches[0].input_ids.shape))
            schedule.step(*args, target=target, losses=[], return_outputs=False, **inputs)
        else:
            self._forward_only(inputs, len(batches))
        summed = {k: sum(p[k].detach().float() for p in parts) for k in (parts[0] if parts else {})}
        return self._from_last_stage(summed)

    def _forward_only(self, inputs: dict, n_microbatches: int) -> None:
        """Validation: every micro-batch through the stages in order, with plain send / recv between
        ranks. Ours rather than `schedule.eval`, because ZB-V's runtime asserts when a forward-only pass
        reaches the V's turn on the last rank (it hands that activation over through a backward slot);
        this one serves every schedule, and validation needs no overlap."""
        import torch.distributed as dist

        my_rank, stages, group = self.pc.coords["pp"], self.pc.plan, self.pc.groups["pp"]
        modules = {m.spec.index: m for m in self.modules}
        chunks = {k: v.chunk(n_microbatches) for k, v in inputs.items()}
        for mb in range(n_microbatches):
            kwargs = {k: v[mb] for k, v in chunks.items()}
            x = kwargs["input_ids"]
            for spec in stages:
                nxt = stages[spec.index + 1] if not spec.is_last else None
                if spec.pp_rank == my_rank:
                    x = modules[spec.index](x, **kwargs)
                    if nxt is not None and nxt.pp_rank != my_rank:
                        dist.send(x.contiguous(), pipeline_peer(self.pc, nxt.pp_rank), group=group)
                elif nxt is not None and nxt.pp_rank == my_rank:
                    x = self._hidden_buffer(kwargs["input_ids"])
                    dist.recv(x, pipeline_peer(self.pc, spec.pp_rank), group=group)

    def _hidden_buffer(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, seq = input_ids.shape
        local_seq = seq // self.pc.tp_size if self.pc.sequence_parallel else seq
        return torch.empty(batch, local_seq, self.model.cfg.hidden_size, device=self.pc.device,
                           dtype=self._residual_dtype())

    def _residual_dtype(self) -> torch.dtype:
        """What travels between stages: the weights' dtype (bf16 under --params-dtype bf16, where the
        embedding's output is bf16; fp32 otherwise, autocast or not)."""
        return next(self.model.parameters()).dtype

    def _from_last_stage(self, metrics: dict) -> dict:
        import torch.distributed as dist

        box = [{k: v.item() for k, v in metrics.items()}]
        dist.broadcast_object_list(box, src=self.last_rank, group=self.pc.groups["pp"])
        return {k: torch.tensor(v, device=self.pc.device) for k, v in box[0].items()}
