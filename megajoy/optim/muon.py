"""Muon: momentum, orthogonalised by a quintic Newton-Schulz iteration, for the model's matrices.

Per matrix M (after torch.optim.Muon, Keller Jordan's recipe, and Moonlight's scaling):
    buf <- mu buf + (1 - mu) g;   u = (1 - mu) g + mu buf (Nesterov) or buf
    O = NS(u);   M <- M (1 - lr wd) - lr * scale(m, n) * O,   scale = 0.2 sqrt(max(m, n)) ("match_rms_adamw")
NS normalises X by its Frobenius norm, then repeats X <- a X + (b A + c A^2) X with A = X X^T over the
smaller side. Since p(X X^T) X = X p(X^T X), the iteration can run on the Gram matrix of either side;
for a tensor-parallel shard it runs on the Gram of the unsharded side, summed over the shard's group
once per iteration (rows split: G = Y^T Y; columns split: G = Y Y^T), so the full matrix is never
gathered. Batches of matrices of one shape (experts, heads) go through one batched iteration.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megajoy.parallel.optimizer import buckets
from megajoy.quant.formats import keep_fake_quant, kept_formats, write_from_master

COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g_BMN: torch.Tensor, steps: int = 5, coefficients=COEFFICIENTS, eps: float = 1e-7,
                  dtype: torch.dtype = torch.float32, sharded: str | None = None, group=None) -> torch.Tensor:
    """Orthogonalise each matrix of a batch [B, m, n] (this rank's rows or columns of each when `sharded`
    is "rows" or "cols" over `group`). Returns `dtype`."""
    a, b, c = coefficients
    x = g_BMN.to(dtype)
    right = sharded == "rows" or (sharded is None and x.shape[-2] > x.shape[-1])
    sq = x.float().pow(2).sum(dim=(-2, -1), keepdim=True)
    if sharded is not None:
        dist.all_reduce(sq, group=group)
    x = x / sq.sqrt().clamp(min=eps).to(dtype)
    for _ in range(steps):
        gram = x.mT @ x if right else x @ x.mT
        if sharded is not None:  # the ranks' partial Grams summed in fp32, not in the iteration's bf16
            gram = gram.float()
            dist.all_reduce(gram, group=group)
            gram = gram.to(dtype)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, x, poly, beta=a) if right else torch.baddbmm(x, poly, x, beta=a)
    return x


def ns_flops(m: int, n: int, steps: int = 5) -> int:
    """Multiply-adds x 2 of `steps` iterations on the smaller Gram of an m x n matrix."""
    small, large = min(m, n), max(m, n)
    return steps * (4 * small * small * large + 2 * small ** 3)


def update_scale(m: int, n: int, kind: str) -> float:
    if kind == "match_rms_adamw":
        return 0.2 * max(m, n) ** 0.5
    if kind == "original":
        return max(1.0, m / n) ** 0.5
    if kind == "none":
        return 1.0
    raise ValueError(f"muon scaling {kind!r} must be match_rms_adamw, original or none")


@dataclass
class MatrixLayout:
    """How one parameter's local tensor splits into the matrices Muon orthogonalises."""

    kind: str  # "matrix", "stack" (leading batch dim), "gate_up" (experts' fused gate / up), "heads_rows", "heads_cols"
    heads: int = 1
    sharded: str | None = None  # "rows" / "cols": the matrix is split over TP ranks along that side
    global_shape: tuple = ()  # one full matrix's (m, n), for the update scale

    def to_matrices(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "matrix":
            return t.unsqueeze(0)
        if self.kind == "stack":
            return t
        if self.kind == "gate_up":  # [E, 2I, H] -> [2E, I, H]: gate and up are separate matrices
            return t.unflatten(1, (2, -1)).flatten(0, 1)
        if self.kind == "heads_rows":  # [heads * r, n] -> [heads, r, n]
            return t.unflatten(0, (self.heads, -1))
        return t.unflatten(1, (self.heads, -1)).transpose(0, 1)  # heads_cols: [m, heads * r] -> [heads, m, r]

    def from_matrices(self, m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.kind == "heads_cols":
            m = m.transpose(0, 1)
        return m.reshape(like.shape)


@dataclass
class MuonEntry:
    name: str
    param: torch.nn.Parameter
    layout: MatrixLayout
    dp_group: object  # ranks holding replicas of this tensor; one of them orthogonalises it
    dp_ranks: list  # global ranks of that group, in group order
    tp_group: object  # ranks holding the other shards of the same matrices (when sharded)
    owner: int = 0  # index in dp_ranks
    flops: int = 0


def assign_owners(entries: list[MuonEntry]) -> None:
    """Spread each data-parallel group's matrices over its ranks, largest Newton-Schulz cost first onto
    the least loaded rank (deterministic, so every rank computes the same assignment)."""
    by_group: dict[tuple, list[MuonEntry]] = {}
    for e in entries:
        by_group.setdefault(tuple(e.dp_ranks), []).append(e)
    for ranks, members in by_group.items():
        load = [0] * len(ranks)
        for e in sorted(members, key=lambda e: (-e.flops, e.name)):
            e.owner = min(range(len(ranks)), key=lambda r: (load[r], r))
            load[e.owner] += e.flops


class MuonMatrices:
    """The Muon half of an optimizer: momentum and Newton-Schulz on the owning rank of each matrix, the
    orthogonalised update broadcast to the other replicas, the same parameter update everywhere.

    Under bf16 weights with ZeRO-1 (`release`), a matrix's fp32 master lives on its owner only: the owner
    applies the update and broadcasts the new bf16 weights (half the bytes of an fp32 update)."""

    def __init__(self, entries: list[MuonEntry], cfg, rank: int, ns_dtype: torch.dtype, bucket_mb: float = 25.0):
        self.entries, self.cfg, self.rank, self.ns_dtype = entries, cfg, rank, ns_dtype
        self.bucket_bytes = int(bucket_mb * 2**20)
        assign_owners(entries)
        self.group = {"params": [e.param for e in entries], "lr": cfg.lr, "lr_mult": 1.0, "optimizer": "muon"}
        self.momentum: dict[str, torch.Tensor] = {}
        self.orthogonalised: list[str] = []  # matrices this rank ran Newton-Schulz on in the last step
        self.copies: dict[str, torch.Tensor] | None = None  # name -> bf16 weight, once the masters are released
        self.copies_dtype = torch.bfloat16

    def owns(self, e: MuonEntry) -> bool:
        return e.dp_ranks[e.owner] == self.rank

    @torch.no_grad()
    def step(self) -> None:
        active = [e for e in self.entries if e.param.grad is not None]
        self.orthogonalised = sorted(e.name for e in active if self.owns(e))
        if self.copies is None:  # every replica applies the owner's update to its whole fp32 weight
            for e, update in self._from_owners(active, self._orthogonalised_update, torch.float32):
                self._apply(e, update)
                del update  # before the next matrix's update is computed
            return
        for e in active:  # the owners step their fp32 masters and send the new bf16 weights
            if self.owns(e):
                self._apply(e, self._orthogonalised_update(e))
        self._refresh_copies(active)

    def _apply(self, e: MuonEntry, update: torch.Tensor) -> None:
        lr, wd = self.group["lr"], self.cfg.weight_decay
        m, n = e.layout.global_shape
        e.param.mul_(1 - lr * wd)
        e.param.add_(update.to(e.param.dtype), alpha=-lr * update_scale(m, n, self.cfg.muon_scale))

    def _orthogonalised_update(self, e: MuonEntry) -> torch.Tensor:
        mu, g = self.cfg.muon_momentum, e.param.grad
        buf = self.momentum.setdefault(e.name, torch.zeros_like(g, dtype=torch.float32))
        buf.lerp_(g.float(), 1 - mu)
        u = g.float().lerp(buf, mu) if self.cfg.muon_nesterov else buf
        o = newton_schulz(e.layout.to_matrices(u), self.cfg.muon_ns_steps, tuple(self.cfg.muon_ns_coefficients),
                          dtype=self.ns_dtype, sharded=e.layout.sharded, group=e.tp_group)
        return e.layout.from_matrices(o.float(), g)

    def _from_owners(self, entries: list[MuonEntry], value, dtype: torch.dtype):
        """Yield (entry, value(entry)) on every replica, `value` called on each matrix's owner only. A
        matrix without replicas is computed when its turn comes. The others go in buckets of one owner's
        matrices, one broadcast each, in the same order on every rank; each owner computes all its buckets
        first, so the ranks compute at once. Consume each pair before the next: a received bucket lives
        only until then."""
        by_owner = {}
        for e in entries:
            if len(e.dp_ranks) == 1:
                yield e, value(e)
            else:
                by_owner.setdefault((tuple(e.dp_ranks), e.owner), []).append(e)
        sends = [(ranks[owner], [e for e, _ in bucket]) for (ranks, owner), members in sorted(by_owner.items())
                 for bucket in buckets([(e, e.param) for e in members], self.bucket_bytes)]
        filled = {i: self._filled(bucket, value, dtype) for i, (src, bucket) in enumerate(sends) if src == self.rank}
        for i, (src, bucket) in enumerate(sends):
            sizes = [e.param.numel() for e in bucket]
            flat = filled.pop(i, None)
            if flat is None:
                flat = torch.empty(sum(sizes), dtype=dtype, device=bucket[0].param.device)
            dist.broadcast(flat, src=src, group=bucket[0].dp_group)
            for e, piece in zip(bucket, flat.split(sizes)):
                yield e, piece.view(e.param.shape)
            del flat, piece  # before the next bucket is allocated

    @staticmethod
    def _filled(bucket: list[MuonEntry], value, dtype: torch.dtype) -> torch.Tensor:
        flat = torch.empty(sum(e.param.numel() for e in bucket), dtype=dtype, device=bucket[0].param.device)
        for e, piece in zip(bucket, flat.split([e.param.numel() for e in bucket])):
            piece.copy_(value(e).reshape(-1))
        return flat

    # ------------------------------------------------------------------ bf16 weights over owned masters
    def release(self, copies: dict) -> None:
        """Make the owners' fp32 tensors the only masters: every rank refreshes its low-precision `copies`
        ({master: copy}) from the whole fp32 weights it holds now, then non-owners give up that storage."""
        self.copies = {e.name: copies[e.param] for e in self.entries}
        self.copies_dtype = next((c.dtype for c in self.copies.values()), self.copies_dtype)
        for e in self.entries:
            write_from_master(self.copies[e.name], e.param)
        for e in self.entries:
            if not self.owns(e):
                e.param.data = torch.empty((), dtype=e.param.dtype, device=e.param.device).expand(e.param.shape)

    @torch.no_grad()
    def scale_rows(self, rows: list) -> None:
        """Multiply rows ((master, row slice, factor)) of the matrices' fp32 weights: on every replica, or,
        once the owners hold the only masters, on the owners, which then broadcast the new copies."""
        touched = [e for e in self.entries if any(w is e.param for w, _, _ in rows)]
        for weight, span, factor in rows:
            if self.copies is None or any(e.param is weight and self.owns(e) for e in touched):
                weight[span].mul_(factor)
        if self.copies is not None:
            self._refresh_copies(touched)

    def materialize(self) -> None:
        """Whole fp32 matrices on every replica again, broadcast by their owners."""
        for e, full in self._from_owners(self.entries, lambda e: e.param.detach(), torch.float32):
            if not self.owns(e):
                e.param.data = full

    def refresh_copies(self) -> None:
        """Every copy (and the values it keeps) from its owner's master again, once the masters are released."""
        if self.copies is not None:
            self._refresh_copies(self.entries)

    @torch.no_grad()
    def _refresh_copies(self, entries: list[MuonEntry]) -> None:
        """Each matrix's low-precision copy, and the fake-quantised values it keeps, from its owner's fp32
        master (one broadcast of each, in the copy's dtype)."""
        for e, weight in self._from_owners(entries, lambda e: e.param, self.copies_dtype):
            self.copies[e.name].copy_(weight)
        formats = {fmt: None for e in entries for fmt in kept_formats(self.copies[e.name])}  # ordered, once each
        for fmt in formats:
            members = [e for e in entries if fmt in kept_formats(self.copies[e.name])]
            values = self._from_owners(members, lambda e: fmt.round_trip(e.param, self.copies_dtype), self.copies_dtype)
            for e, value in values:
                keep_fake_quant(self.copies[e.name], fmt, value)
