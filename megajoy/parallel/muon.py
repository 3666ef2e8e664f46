"""Muon over any layout: the model's matrices get Muon (megajoy.optim.muon), everything else AdamW
(the embedding, the output head, norms, biases, other 1-D tensors and, unless `muon_router`, the router),
with or without ZeRO-1.

Which matrices: every 2-D weight and each expert's gate, up and down matrices (the experts' stacked
tensors split into one matrix each). MLA's q_b_proj / kv_b_proj / o_proj are whole matrices, or one matrix
per head with `muon_per_head`. A tensor-parallel shard is orthogonalised together with its peers through
the Gram all-reduce; each matrix (or expert stack) is orthogonalised by one rank of its data-parallel
group (expert-data-parallel for experts), which alone keeps its momentum.
"""

import torch

from megajoy.optim.muon import MatrixLayout, MuonEntry, MuonMatrices, ns_flops
from megajoy.parallel.optimizer import DistributedOptimizer, ParallelOptimizer, _bucketed_all_reduce

MOMENTUM = "momentum_buffer"
_PER_HEAD = {"q_b_proj.weight": "heads_rows", "q_proj.weight": "heads_rows", "kv_b_proj.weight": "heads_rows",
             "o_proj.weight": "heads_cols"}


def is_muon_matrix(name: str, p: torch.Tensor, cfg) -> bool:
    if p.ndim < 2 or name.startswith(("embed_tokens.", "lm_head.")):
        return False
    return cfg.muon_router or not name.endswith("mlp.gate.weight")


def matrix_layout(name: str, spec, pc, cfg, num_heads: int) -> MatrixLayout:
    if spec.expert:
        _, m, n = spec.global_shape
        if name.endswith("gate_up_proj"):
            return MatrixLayout("gate_up", global_shape=(m // 2, n))
        return MatrixLayout("stack", global_shape=(m, n))
    suffix = ".".join(name.split(".")[-2:])
    if cfg.muon_per_head and ".self_attn." in name and suffix in _PER_HEAD:
        heads = num_heads // pc.tp_size
        m, n = spec.global_shape
        if _PER_HEAD[suffix] == "heads_rows":
            return MatrixLayout("heads_rows", heads, global_shape=(m // (heads * pc.tp_size), n))
        return MatrixLayout("heads_cols", heads, global_shape=(m, n // (heads * pc.tp_size)))
    sharded = None
    if spec.tp_sharded and pc.tp_size > 1:
        sharded = "rows" if spec.tp_dim == 0 else "cols"
    return MatrixLayout("matrix", sharded=sharded, global_shape=tuple(spec.global_shape))


def muon_entries(named_params: list, specs: dict, pc, cfg, num_heads: int) -> list[MuonEntry]:
    """The Muon matrices among `named_params`, with their replica groups (owners not yet assigned); on a
    planning context too, where the memory planner assigns owners from them."""
    entries = []
    replicas = {kind: next(r for r in pc.layout.group_ranks(kind) if pc.rank in r) for kind in ("edp", "dp_cp")}
    for name, p in named_params:
        if not is_muon_matrix(name, p, cfg):
            continue
        spec = specs[name]
        layout = matrix_layout(name, spec, pc, cfg, num_heads)
        kind = "edp" if spec.expert else "dp_cp"
        ranks = replicas[kind]
        local = layout.to_matrices(torch.empty(p.shape, device="meta"))
        entries.append(MuonEntry(name, p, layout, pc.group(kind), ranks, pc.group("tp") if layout.sharded else None,
                                 flops=local.shape[0] * ns_flops(local.shape[1], local.shape[2], cfg.muon_ns_steps)))
    return entries


class MuonOptimizer(ParallelOptimizer):
    def __init__(self, model, pc, cfg, distributed: bool, bucket_mb: float = 25.0):
        self.distributed = distributed
        super().__init__(model, pc, cfg, bucket_mb)

    def _build_inner(self):
        cfg, pc = self.cfg, self.pc
        matrices = [(n, p) for n, p in self.named_params if is_muon_matrix(n, p, cfg)]
        others = [(n, p) for n, p in self.named_params if not is_muon_matrix(n, p, cfg)]
        adam_cls = DistributedOptimizer if self.distributed else ParallelOptimizer
        self.adam = adam_cls(self.model, pc, cfg, self.bucket_bytes / 2**20, named_params=others)
        self.matrix_params = matrices
        entries = muon_entries(matrices, self.specs, pc, cfg, self.model.cfg.num_attention_heads)
        dtype = cfg.muon_ns_dtype
        ns_dtype = (torch.bfloat16 if pc.device.type == "cuda" else torch.float32) if dtype == "auto" else (
            torch.bfloat16 if dtype == "bf16" else torch.float32)
        self.muon = MuonMatrices(entries, cfg, pc.rank, ns_dtype, self.bucket_bytes / 2**20)
        return None

    @property
    def param_groups(self):
        return self.adam.param_groups + [self.muon.group]

    def reduce_data_parallel(self) -> None:
        self.adam.reduce_data_parallel()
        for expert in (False, True):
            params = [p for n, p in self.matrix_params if self.specs[n].expert == expert and p.grad is not None]
            _bucketed_all_reduce(params, self.pc.group("edp" if expert else "dp_cp"), self.bucket_bytes)

    def _local_sq_norm(self) -> torch.Tensor:
        from megajoy.parallel.optimizer import _sum_of_squares

        grads = [p.grad for n, p in self.matrix_params if p.grad is not None and self._counts_here(self.specs[n])]
        return self.adam._local_sq_norm() + _sum_of_squares(grads, self.pc.device)

    def _grads(self) -> list[torch.Tensor]:
        return self.adam._grads() + [p.grad for _, p in self.matrix_params if p.grad is not None]

    def step(self) -> None:
        self.adam.step()
        self.muon.step()

    def zero_grad(self) -> None:
        self.adam.zero_grad()
        for _, p in self.matrix_params:
            p.grad = None

    def refresh_from_params(self) -> None:
        self.adam.refresh_from_params()

    # ------------------------------------------------------------------ bf16 weights (ZeRO-1)
    @property
    def shards_master_weights(self) -> bool:
        return self.distributed

    def release_full_weights(self, copies: dict) -> None:
        """AdamW's tensors keep their fp32 shards (DistributedOptimizer), each Muon matrix its owner's
        whole fp32 tensor, as the only masters (see megajoy.optim.master_weights)."""
        self.adam.release_full_weights(copies)
        self.muon.release(copies)

    def materialize_full_weights(self) -> None:
        self.adam.materialize_full_weights()
        self.muon.materialize()

    def gather_weights(self) -> None:
        self.adam.gather_weights()
        self.muon.refresh_copies()

    def scale_master_rows(self, rows: list) -> None:
        matrices = {e.param for e in self.muon.entries}
        self.adam.scale_master_rows([r for r in rows if r[0] not in matrices])
        self.muon.scale_rows([r for r in rows if r[0] in matrices])

    def holds_state(self, name: str) -> bool:
        entry = next((e for e in self.muon.entries if e.name == name), None)
        return self.muon.owns(entry) if entry is not None else self.adam.holds_state(name)

    def local_state(self) -> dict[str, dict]:
        return {**self.adam.local_state(), **{n: {MOMENTUM: buf} for n, buf in self.muon.momentum.items()}}

    def load_local_state(self, saved: dict[str, dict], source: str) -> None:
        matrices = {e.name for e in self.muon.entries}
        for name, entry in saved.items():
            if name in matrices:
                if MOMENTUM not in entry:
                    raise ValueError(f"{source}: the saved state of {name!r} is not Muon's (no {MOMENTUM})")
                param = dict(self.matrix_params)[name]
                self.muon.momentum[name] = entry[MOMENTUM].to(param.device, torch.float32).clone()
        self.adam.load_local_state({n: e for n, e in saved.items() if n not in matrices}, source)
