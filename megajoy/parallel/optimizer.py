"""The optimizer a training step sees, for any layout: gradient reduction, global-norm clipping, the step,
and a layout-independent view of its state for checkpoints.

`ParallelOptimizer`: every data-parallel rank holds the whole optimizer state; gradients are summed in
buckets (dense parameters over data-parallel ranks, experts over expert-data-parallel ranks).
`DistributedOptimizer` (ZeRO-1): the parameters are laid end to end in buckets of `--ddp-bucket-size-mb`
(fp32), and each rank owns a contiguous 1/N of every bucket with fp32 master copies and optimizer state
for that slice only; gradients are reduce-scattered and parameters all-gathered back bucket by bucket, so
no step holds a flat copy of all gradients or weights at once (Megatron's buckets).
`MuonOptimizer`: Muon for the matrices (see megajoy.optim.muon), one of the above (AdamW) for the rest.

Gradients are summed, not averaged: the loss is normalised by the token count of the whole global batch.
"""

import torch
import torch.distributed as dist

from megajoy.optim import adamw, check_optimizer, param_groups
from megajoy.parallel.mappings import all_reduce_no_grad, group_size
from megajoy.parallel.params import ParamSpec, parameter_specs
from megajoy.quant.formats import kept_formats, write_from_master

STATE_KEYS = ("exp_avg", "exp_avg_sq")


class ParallelOptimizer:
    shards_master_weights = False  # whether bf16 weights may keep their fp32 masters only in this optimizer's shards

    def __init__(self, model, pc, cfg, bucket_mb: float = 25.0, named_params: list | None = None):
        self.model, self.pc, self.cfg = model, pc, cfg
        self.specs = parameter_specs(model, pc)
        if named_params is None:
            named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.named_params = named_params
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.inner = self._build_inner()

    def _build_inner(self):
        return adamw(param_groups(self.named_params, self.cfg.weight_decay), self.cfg)

    @property
    def param_groups(self):
        return self.inner.param_groups

    # ------------------------------------------------------------------ gradients
    def _reduction_group(self, spec: ParamSpec):
        return self.pc.group("edp") if spec.expert else self.pc.group("dp_cp")

    def reduce_partial_tp_grads(self) -> None:
        partial = [p for n, p in self.named_params if self.specs[n].partial_tp_grad and p.grad is not None]
        _bucketed_all_reduce(partial, self.pc.group("tp"), self.bucket_bytes)

    def reduce_embedding_copies(self) -> None:
        """The first and last pipeline stages each hold the embedding: sum their gradients. A copy that
        got no gradient (the last stage's, when MTP is off this step) counts as zero, so both join."""
        if self.pc.size("embed") > 1:
            params = [p for n, p in self.named_params if n.startswith("embed_tokens.")]
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            _bucketed_all_reduce(params, self.pc.groups["embed"], self.bucket_bytes)

    def reduce_gradients(self) -> None:
        self.reduce_partial_tp_grads()
        self.reduce_embedding_copies()
        self.reduce_data_parallel()

    def reduce_data_parallel(self) -> None:
        for expert in (False, True):
            params = [p for n, p in self.named_params if self.specs[n].expert == expert and p.grad is not None]
            group = self.pc.group("edp") if expert else self.pc.group("dp_cp")
            _bucketed_all_reduce(params, group, self.bucket_bytes)

    def _counts_here(self, spec: ParamSpec) -> bool:
        """Whether this rank contributes a (reduced, replicated) gradient to the global norm. Experts are
        distinct on every expert-parallel rank (even inside one TP group) and replicated over EDP ranks;
        dense tensors are replicated over DP ranks, and over TP ranks unless TP-sharded."""
        if spec.duplicate:
            return False
        if spec.expert:
            return self.pc.coords["edp"] == 0
        first_replica = self.pc.coords["dp"] == 0 and self.pc.coords["cp"] == 0
        return first_replica and (spec.tp_sharded or self.pc.tp_rank == 0)

    def _local_sq_norm(self) -> torch.Tensor:
        grads = [p.grad for n, p in self.named_params if p.grad is not None and self._counts_here(self.specs[n])]
        return _sum_of_squares(grads, self.pc.device)

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for _, p in self.named_params if p.grad is not None]

    def clip_gradients(self, max_norm: float) -> float:
        """Global gradient norm over every shard and rank; scale gradients down when above max_norm."""
        sq = all_reduce_no_grad(self._local_sq_norm().clone(), self.pc.group("world"))
        norm = float(sq.sqrt())
        if max_norm and norm > max_norm:
            torch._foreach_mul_(self._grads(), max_norm / (norm + 1e-6))
        return norm

    # ------------------------------------------------------------------ step
    def step(self) -> None:
        self.inner.step()

    def refresh_from_params(self) -> None:
        """Re-read the parameters after they were overwritten (a checkpoint load)."""

    def scale_master_rows(self, rows: list) -> None:
        """Multiply rows ((fp32 weight, row slice, factor), QK-clip's rescaling) of the weights this
        optimizer steps, wherever it keeps them: here, the whole tensors every rank holds."""
        from megajoy.optim.qk_clip import scale_rows_in_place

        scale_rows_in_place(rows)

    def zero_grad(self) -> None:
        for _, p in self.named_params:
            p.grad = None

    # ------------------------------------------------------------------ state
    def holds_state(self, name: str) -> bool:
        """Whether this rank keeps (and loads) optimizer state for parameter `name`."""
        return any(n == name for n, _ in self.named_params)

    def local_state(self) -> dict[str, dict]:
        """{name: {field: tensor or float}}: for AdamW {"step", "exp_avg", "exp_avg_sq"}, each tensor this
        rank's TP / EP shard (the parameter's local shape), for every parameter that has taken a step."""
        out = {}
        for name, p in self.named_params:
            state = self.inner.state.get(p, {})
            if state:
                out[name] = {"step": float(state["step"]), **{k: state[k].detach() for k in STATE_KEYS}}
        return out

    def load_local_state(self, saved: dict[str, dict], source: str) -> None:
        unknown = set(saved) - {n for n, _ in self.named_params}
        if unknown:
            raise ValueError(f"{source}: optimizer state for unknown tensor {sorted(unknown)[0]!r}")
        for name, p in self.named_params:
            if name in saved:  # absent: never stepped when saved
                entry = _adam_entry(saved[name], name, source)
                self.inner.state[p] = {"step": _adam_step(self.inner, entry["step"], p),
                                       **{k: entry[k].to(p.device, torch.float32).clone() for k in STATE_KEYS}}


class DistributedOptimizer(ParallelOptimizer):
    """ZeRO-1 over the data-parallel group (dense tensors) and the expert-data-parallel group (experts)."""

    shards_master_weights = True
    released = False  # whether the fp32 shards are the only masters (release_full_weights)

    def _build_inner(self):
        self.buffers = [_ShardedBuffer(bucket, self.pc.group("edp" if expert else "dp_cp"), self.pc.device)
                        for expert in (False, True)
                        for bucket in buckets([(n, p) for n, p in self.named_params if self.specs[n].expert == expert],
                                              self.bucket_bytes)]
        decay = [piece for b in self.buffers for piece in b.pieces if piece.ndim_of_param >= 2]
        no_decay = [piece for b in self.buffers for piece in b.pieces if piece.ndim_of_param < 2]
        groups = [{"params": [x.master for x in decay], "weight_decay": self.cfg.weight_decay, "lr_mult": 1.0},
                  {"params": [x.master for x in no_decay], "weight_decay": 0.0, "lr_mult": 1.0}]
        return adamw([g for g in groups if g["params"]], self.cfg)

    def reduce_data_parallel(self) -> None:
        for buffer in self.buffers:
            buffer.reduce_scatter_grads()

    def _local_sq_norm(self) -> torch.Tensor:
        grads = []
        for buffer in self.buffers:
            for piece in buffer.pieces:
                spec = self.specs[piece.name]
                # shards are disjoint over (E)DP
                owned = not spec.duplicate and (spec.expert or spec.tp_sharded or self.pc.tp_rank == 0)
                if piece.master.grad is not None and owned:
                    grads.append(piece.master.grad)
        return _sum_of_squares(grads, self.pc.device)

    def _grads(self) -> list[torch.Tensor]:
        return [piece.master.grad for b in self.buffers for piece in b.pieces if piece.master.grad is not None]

    def step(self) -> None:
        self.inner.step()
        for buffer in self.buffers:
            buffer.gather_params()

    # ------------------------------------------------------------------ bf16 weights over the shards
    def release_full_weights(self, copies: dict) -> None:
        """Under bf16 weights (megajoy.optim.master_weights): this rank's fp32 shards become the only
        masters (Megatron's layout). The whole fp32 tensors keep their shapes and gradients but give up
        their storage; `step` writes the gathered weights into their low-precision `copies` instead."""
        self.released = True
        for buffer in self.buffers:
            buffer.targets = [copies[p] for _, p in buffer.named]
            buffer.gather_params()
            for _, p in buffer.named:
                p.data = torch.empty((), dtype=p.dtype, device=p.device).expand(p.shape)

    def gather_weights(self) -> None:
        """The low-precision weights (and the fake-quantised values they keep) again from the shards, as a
        step writes them: after the set of kept formats changed."""
        for buffer in self.buffers:
            buffer.gather_params()

    @torch.no_grad()
    def scale_master_rows(self, rows: list) -> None:
        """The rows scaled in this rank's shards too; once the shards are the only masters, the touched
        buffers' weights are then gathered into their copies (as a step does)."""
        touched = [b for b in self.buffers if any(w in b.params for w, _, _ in rows)]
        for weight, span, factor in rows:
            width = weight[0].numel()
            lo, hi = span.start * width, span.stop * width
            for x in (x for b in touched for x in b.pieces if x.param is weight):
                a, b = max(lo, x.param_start), min(hi, x.param_end)
                if a < b:
                    x.master.data[a - x.param_start:b - x.param_start].mul_(factor)
        if not self.released:
            super().scale_master_rows(rows)  # every rank's whole fp32 tensors as well
            return
        for buffer in touched:
            buffer.gather_params()

    def materialize_full_weights(self) -> None:
        """Whole fp32 tensors again, gathered from the shards (for checkpoints)."""
        for buffer in self.buffers:
            if not buffer.named:
                continue
            full = buffer.gathered_masters()
            for (_, p), start in zip(buffer.named, buffer.offsets):  # views of one gathered buffer
                p.data = full[start:start + p.numel()].view(p.shape)

    def local_state(self) -> dict[str, dict]:
        out = {}
        for buffer in self.buffers:
            for key in STATE_KEYS + ("step",):
                for name, local in buffer.gather_state(self.inner, key).items():
                    out.setdefault(name, {})[key] = float(local.reshape(-1)[0]) if key == "step" else local
        # A parameter never stepped (no gradient yet) has no state, as in a single process.
        return {n: e for n, e in out.items() if e["step"] > 0}

    def refresh_from_params(self) -> None:
        with torch.no_grad():
            for buffer in self.buffers:
                for piece in buffer.pieces:
                    flat = piece.param.detach().reshape(-1)[piece.param_start:piece.param_end]
                    piece.master.copy_(flat.to(piece.master.dtype))

    def zero_grad(self) -> None:
        super().zero_grad()
        for buffer in self.buffers:
            for piece in buffer.pieces:
                piece.master.grad = None

    def load_local_state(self, saved: dict[str, dict], source: str) -> None:
        unknown = set(saved) - {n for n, _ in self.named_params}
        if unknown:
            raise ValueError(f"{source}: optimizer state for unknown tensor {sorted(unknown)[0]!r}")
        for buffer in self.buffers:
            for piece in buffer.pieces:
                if piece.name not in saved:
                    continue  # never stepped when saved
                entry = _adam_entry(saved[piece.name], piece.name, source)
                state = {"step": _adam_step(self.inner, entry["step"], piece.master)}
                for key in STATE_KEYS:
                    flat = entry[key].reshape(-1)[piece.param_start:piece.param_end]
                    state[key] = flat.to(piece.master.device, torch.float32).clone()
                self.inner.state[piece.master] = state


class _Piece:
    """The part [param_start, param_end) of one flattened parameter that falls in this rank's shard."""

    def __init__(self, name, param, param_start, param_end, shard_start, master):
        self.name, self.param, self.ndim_of_param = name, param, param.ndim
        self.param_start, self.param_end, self.shard_start = param_start, param_end, shard_start
        self.master = master


class _ShardedBuffer:
    """Parameters laid end to end, padded to a multiple of the group size; this rank owns one contiguous
    slice, held as fp32 master pieces."""

    def __init__(self, named, group, device):
        self.named, self.group, self.device = named, group, device
        self.n, self.rank = group_size(group), (dist.get_rank(group) if group is not None else 0)
        self.offsets, total = [], 0
        for _, p in named:
            self.offsets.append(total)
            total += p.numel()
        self.shard, self.total_padded = shard_size(total, self.n), shard_size(total, self.n) * self.n
        self.targets = [p for _, p in named]  # where gathered weights are written
        self.params = {p for _, p in named}
        lo, hi = self.rank * self.shard, (self.rank + 1) * self.shard
        self.pieces = []
        for (name, p), start in zip(named, self.offsets):
            a, b = max(lo, start), min(hi, start + p.numel())
            if a < b:
                flat = p.detach().reshape(-1)[a - start:b - start].to(device, torch.float32).clone()
                self.pieces.append(_Piece(name, p, a - start, b - start, a - lo, torch.nn.Parameter(flat)))

    def _flat(self, tensors) -> torch.Tensor:
        flat = torch.cat([t.reshape(-1).float() for t in tensors]) if tensors else torch.zeros(0)
        return torch.nn.functional.pad(flat, (0, self.total_padded - flat.numel()))

    def reduce_scatter_grads(self) -> None:
        if not self.named:
            return
        # A parameter without a gradient (e.g. the MTP module before it is switched on) is skipped by the
        # optimizer, as in a single process; that is the same on every rank, so only its slot is zeroed.
        unused = {name for name, p in self.named if p.grad is None}
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in self.named]
        flat = self._flat(grads)
        shard = flat.new_empty(self.shard)
        if self.n > 1:
            (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(shard, flat, group=self.group)
        else:
            shard.copy_(flat)
        for piece in self.pieces:
            piece.master.grad = (None if piece.name in unused else
                                 shard[piece.shard_start:piece.shard_start + piece.param_end - piece.param_start])
        for _, p in self.named:
            p.grad = None

    def _all_gather_flat(self, shard: torch.Tensor) -> torch.Tensor:
        if self.n == 1:
            return shard
        full = shard.new_empty(self.total_padded)
        (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(full, shard, group=self.group)
        return full

    def _shard_of(self, tensors_by_piece, dtype=torch.float32) -> torch.Tensor:
        shard = torch.zeros(self.shard, device=self.device, dtype=dtype)  # also on a rank that owns only padding
        for piece, t in zip(self.pieces, tensors_by_piece):
            shard[piece.shard_start:piece.shard_start + t.numel()] = t
        return shard

    def gathered_masters(self) -> torch.Tensor:
        """Every rank's fp32 master pieces laid end to end (all parameters, padded), on every rank."""
        return self._all_gather_flat(self._shard_of([x.master.detach() for x in self.pieces]))

    def gather_params(self) -> None:
        if not self.named:
            return
        # Rounded to the weights' own precision before the gather, not after: bf16 copies take half the
        # bytes on the wire and in the gathered buffer, and round to the same values. A bucket with weights
        # that keep fake-quantised values gathers fp32: they are quantised from the fp32 masters.
        dtypes = {t.dtype for t in self.targets}
        quantised = any(kept_formats(t) for t in self.targets)
        dtype = dtypes.pop() if len(dtypes) == 1 and not quantised else torch.float32
        full = self._all_gather_flat(self._shard_of([x.master.detach() for x in self.pieces], dtype))
        with torch.no_grad():
            for target, start in zip(self.targets, self.offsets):
                write_from_master(target, full[start:start + target.numel()].view_as(target))

    def gather_state(self, optimizer, key: str) -> dict[str, torch.Tensor]:
        """This rank's local (TP/EP-sharded) view of one optimizer-state tensor for each parameter."""
        if not self.named:
            return {}
        def value(piece):
            state = optimizer.state.get(piece.master)
            if not state:
                return torch.zeros_like(piece.master)
            if key == "step":  # a scalar per piece: spread it over the piece so it gathers like the rest
                return torch.full_like(piece.master, float(state["step"]))
            return state[key]

        values = [value(x) for x in self.pieces]
        full = self._all_gather_flat(self._shard_of(values))
        return {name: full[start:start + p.numel()].view_as(p).clone()
                for (name, p), start in zip(self.named, self.offsets)}


def _adam_step(optimizer: torch.optim.Optimizer, step: float, param: torch.Tensor) -> torch.Tensor:
    """AdamW's step count as torch keeps it: on the parameter's device for the fused (or capturable)
    kernels, which read it there (a CPU scalar handed to the CUDA kernel is a host pointer); a CPU scalar
    otherwise."""
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    return torch.tensor(step, dtype=torch.float32, device=param.device if on_device else "cpu")


def _adam_entry(entry: dict, name: str, source: str) -> dict:
    missing = [k for k in ("step",) + STATE_KEYS if k not in entry]
    if missing:
        raise ValueError(f"{source}: the optimizer state of {name!r} has no {missing[0]!r}; it was saved by a "
                         f"different optimizer ({sorted(entry)})")
    return entry


def buckets(named: list, bucket_bytes: int) -> list[list]:
    """Consecutive runs of (name, parameter) holding at most `bucket_bytes` in fp32 (a larger one alone):
    what the gradient all-reduce sums, and ZeRO-1 shards, reduce-scatters and gathers, as one."""
    out, size = [], 0
    for name, p in named:
        if not out or size + 4 * p.numel() > bucket_bytes:
            out.append([])
            size = 0
        out[-1].append((name, p))
        size += 4 * p.numel()
    return out


def shard_size(total: int, ranks: int) -> int:
    """Elements each rank owns when `total` are laid end to end and padded to a multiple of `ranks`."""
    return -(-total // ranks) if total else 0


def owned_elements(sizes: list[int], ranks: int, rank: int) -> int:
    """How many real (non-padding) elements of tensors of `sizes`, laid end to end, `rank` owns."""
    total = sum(sizes)
    shard = shard_size(total, ranks)
    return max(0, min(total, (rank + 1) * shard) - rank * shard)


def _sum_of_squares(tensors: list[torch.Tensor], device) -> torch.Tensor:
    """Sum of squared elements, from per-tensor fp32 norms accumulated in fp64."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64, device=device)
    norms = torch.stack(torch._foreach_norm(tensors)).double()
    return norms.pow(2).sum()


def _bucketed_all_reduce(params: list, group, bucket_bytes: int) -> None:
    """Sum gradients over `group`, a few flattened buckets at a time."""
    if group_size(group) == 1:
        return
    for bucket in buckets([(None, p) for p in params], bucket_bytes):
        _all_reduce_bucket([p for _, p in bucket], group)


def _all_reduce_bucket(params: list, group) -> None:
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def build_parallel_optimizer(model, pc, cfg, distributed: bool, bucket_mb: float = 25.0) -> ParallelOptimizer:
    check_optimizer(cfg.optimizer)
    if cfg.optimizer == "muon":
        from megajoy.parallel.muon import MuonOptimizer

        return MuonOptimizer(model, pc, cfg, distributed, bucket_mb)
    cls = DistributedOptimizer if distributed else ParallelOptimizer
    return cls(model, pc, cfg, bucket_mb)
