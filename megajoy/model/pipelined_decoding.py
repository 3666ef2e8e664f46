"""Decoding through a pipeline with its stages busy at once. The batch's rows are split into as many groups
as the pipeline has stages (one group when there are fewer rows), and the groups go round the pipeline
like a ring: at tick k stage s works on group g = (k - s) mod S, at decoding step (k - s - g) / S. A
stage's output (hidden states; the last stage's sampled tokens, which go back to the first) reaches the
next stage's rank for the next tick, when all ranks exchange what they made in one batch of point-to-point
sends and receives. So every stage steps a different group in each tick, as a pipeline schedule
overlaps micro-batches, where stepping the whole batch through the stages in turn would leave all but one
of them idle.

Rows are left-padded per group. Each (local stage, group) keeps its own latent cache. Per-row flags (row
still decoding) travel with the hidden states, and a group ends when its rows are all done (or after
max_new_tokens): the last stage marks it finished in the tokens it sends to the first, and the mark goes
round once more, each stage dropping the group as it passes it on. Expert-parallel peers (the same stage
in other pipelines) run the same ticks in lockstep, and a group ends only when it has ended in all of
them. Sampling draws from `step_uniforms`, keyed by row, so rows draw what they would in one batch on one
process.
"""

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megajoy.model.generate import (Decoded, LatentCache, all_done, left_padded, sample_step, stage_forward,
                                    step_uniforms)
from megajoy.parallel.pipeline import pipeline_peer


@dataclass
class Group:
    row_ids: torch.Tensor  # [b] its rows' sampling keys (see generate)
    ids: torch.Tensor  # [b, L] left-padded prompts
    valid: torch.Tensor  # [b, L]
    positions: torch.Tensor  # [b, L]
    decoded: Decoded  # read on the first and last stages' ranks
    caches: dict = field(default_factory=dict)  # local stage index -> LatentCache of its layers

    @property
    def size(self) -> int:
        return self.ids.shape[0]


def generate_pipelined(model, prompts, params, device, entropies, row_ids: torch.Tensor, idle: bool = False,
                       overlap: bool = True) -> list[list[int]]:
    """generate() on one rank of a pipeline; every rank of the pipeline calls it with the same prompts.
    `overlap=False` keeps the rows in one group (the stages in turn: the baseline benchmarks compare with)."""
    pc = model.pc
    stages = pc.plan
    mine = [spec for spec in stages if spec.pp_rank == pc.coords["pp"]]
    groups = _groups(model, prompts, row_ids, params, idle, entropies is not None, len(stages) if overlap else 1)
    ring = Ring(model, stages, groups, params)
    tick = 0
    while not ring.finished(mine):
        outbox = [message for spec in mine if (message := ring.work(spec, tick)) is not None]
        ring.exchange(outbox, mine, tick + 1)
        tick += 1
    return _gathered(model, groups, entropies)


def _groups(model, prompts, row_ids, params, idle, with_entropy, n_stages) -> list[Group]:
    """As many groups as `n_stages`, if every expert-parallel peer has that many rows (they step the same
    groups together); otherwise one."""
    device = row_ids.device
    rows = torch.tensor([len(prompts)], device=device)
    if model.pc.ep_size > 1:
        dist.all_reduce(rows, op=dist.ReduceOp.MIN, group=model.pc.group("ep"))
    n = n_stages if int(rows) >= n_stages else 1
    base, extra = divmod(len(prompts), n)
    groups, start = [], 0
    for g in range(n):
        rows_g = slice(start, start + base + (g < extra))
        start = rows_g.stop
        ids, valid, positions = left_padded(prompts[rows_g], device)
        groups.append(Group(row_ids[rows_g], ids, valid, positions,
                            Decoded(len(ids), params, device, idle, with_entropy)))
    return groups


class Ring:
    """The per-tick work of this rank's stages and the messages between them."""

    def __init__(self, model, stages, groups: list[Group], params):
        self.model, self.stages, self.groups, self.params = model, stages, groups, params
        self.inbox: dict[tuple[int, int], tuple] = {}  # (stage, group) -> its input for this tick
        self.ended: set[tuple[int, int]] = set()  # (stage, group) pairs this rank has dropped
        self.dtype = next(model.parameters()).dtype  # the residual stream's
        self.device = groups[0].ids.device

    def finished(self, mine) -> bool:
        return all((spec.index, g) in self.ended for spec in mine for g in range(len(self.groups)))

    def due(self, spec, tick: int) -> tuple[int, int] | None:
        """(group, step) stage `spec` works on at `tick`, if any."""
        n_stages = len(self.stages)
        g = (tick - spec.index) % n_stages
        step = (tick - spec.index - g) // n_stages
        if g >= len(self.groups) or step < 0 or (spec.index, g) in self.ended:
            return None
        return g, step

    # ------------------------------------------------------------------ one stage's work
    def work(self, spec, tick: int):
        """Run what `spec` is due at `tick`; returns (next stage, group, tensors) to send on, or None."""
        due = self.due(spec, tick)
        if due is None:
            return None
        g, step = due
        group = self.groups[g]
        if spec.is_first:
            x, ended = self._first_stage_input(group, g, step)
            decoding = ~group.decoded.done
        else:
            x, flags = self.inbox.pop((spec.index, g))
            decoding, ended = flags[:-1].bool(), bool(flags[-1])
        if ended:  # pass the end on, then drop the group
            self.ended.add((spec.index, g))
            placeholder = torch.zeros(group.size, 1, self.model.cfg.hidden_size, dtype=self.dtype, device=self.device)
            return None if spec.is_last else (spec.index + 1, g, self._hidden_message(placeholder, decoding, True))
        positions, valid = ((group.positions, group.valid) if step == 0
                            else (group.positions[:, -1:] + step, decoding[:, None]))
        cache = self._cache(group, spec)
        mask = cache.step_mask(valid)
        out = stage_forward(self.model, spec, x, self.model.sequence_info(positions, None), cache, mask,
                            last_only=step == 0)
        cache.advance(x.shape[1])
        if not spec.is_last:
            return spec.index + 1, g, self._hidden_message(out, decoding, False)
        return 0, g, (self._tokens_message(out, group, step),)

    def _first_stage_input(self, group: Group, g: int, step: int):
        if step == 0:
            return group.ids, False
        (packed,) = self.inbox.pop((0, g))
        tokens, ended = self._read_tokens(group, packed)
        return tokens[:, None], ended

    def _read_tokens(self, group: Group, packed: torch.Tensor):
        """The last stage's message: the sampled tokens (recorded here), and whether the group has ended."""
        tokens, entropy = packed[0].long(), packed[1].float()
        group.decoded.add(tokens, entropy if group.decoded.entropies is not None else None)
        return tokens, bool(packed[2, 0])

    def _tokens_message(self, out, group: Group, step: int) -> torch.Tensor:
        """Sample the group's next tokens; [3, b] float64 (exact for token ids and fp32 entropies): the
        tokens, their entropies and whether the group has ended (every row done, in every expert-parallel
        peer, or the last step)."""
        decoded = group.decoded
        tokens, entropy = sample_step(out.logits[:, -1], self.params, step_uniforms(self.params, step, group.row_ids),
                                      decoded.entropies is not None)
        if not self._first_stage_is_here():  # the first stage's rank records them as it reads them
            decoded.add(tokens, entropy)
        ended = step == self.params.max_new_tokens - 1 or all_done(decoded.done_after(tokens), self.model)
        packed = torch.zeros(3, group.size, dtype=torch.float64, device=self.device)
        packed[0], packed[2] = tokens, float(ended)
        if entropy is not None:
            packed[1] = entropy
        return packed

    def _first_stage_is_here(self) -> bool:
        return self.stages[0].pp_rank == self.stages[-1].pp_rank

    def _hidden_message(self, hidden: torch.Tensor, decoding: torch.Tensor, ended: bool):
        flags = torch.cat((decoding.long(), torch.tensor([int(ended)], device=decoding.device)))
        return hidden.contiguous(), flags

    def _cache(self, group: Group, spec) -> LatentCache:
        if spec.index not in group.caches:
            layers = [self.model.layers[str(i)].self_attn for i in spec.layers]
            group.caches[spec.index] = LatentCache(layers, group.size, group.ids.shape[1] + self.params.max_new_tokens,
                                                   self.device, self.dtype)
        return group.caches[spec.index]

    # ------------------------------------------------------------------ messages
    def exchange(self, outbox: list, mine, next_tick: int) -> None:
        """Deliver this tick's messages: to a stage on this rank directly, to others in one batch of
        point-to-point sends, with the receives of every message this rank's stages are due next tick."""
        my_rank, ops = self.model.pc.coords["pp"], []
        # Both sides post a pair's messages in the order of the stages they go to (point-to-point messages
        # between two ranks match in order): the receiver below walks its stages in that order.
        for dest, g, message in sorted(outbox, key=lambda item: item[0]):
            rank = self.stages[dest].pp_rank
            if rank == my_rank:
                self.inbox[(dest, g)] = message
            else:
                ops += [dist.P2POp(dist.isend, t, pipeline_peer(self.model.pc, rank), self.model.pc.groups["pp"])
                        for t in message]
        for spec in mine:
            due = self.due(spec, next_tick)
            source = self.stages[spec.index - 1]  # the last stage, for the first
            if due is None or (spec.is_first and due[1] == 0) or source.pp_rank == my_rank:
                continue
            message = self._empty_message(spec, *due)
            self.inbox[(spec.index, due[0])] = message
            ops += [dist.P2POp(dist.irecv, t, pipeline_peer(self.model.pc, source.pp_rank), self.model.pc.groups["pp"])
                    for t in message]
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()

    def _empty_message(self, spec, g: int, step: int):
        group = self.groups[g]
        if spec.is_first:
            return (torch.empty(3, group.size, dtype=torch.float64, device=self.device),)
        length = group.ids.shape[1] if step == 0 else 1
        hidden = torch.empty(group.size, length, self.model.cfg.hidden_size, dtype=self.dtype, device=self.device)
        return hidden, torch.empty(group.size + 1, dtype=torch.long, device=self.device)


def _gathered(model, groups: list[Group], entropies) -> list[list[int]]:
    """Every row's tokens (and entropies), in the batch's order, on every rank of the pipeline: from the
    first stage's rank, which recorded them all."""
    pc = model.pc
    first = pc.plan[0].pp_rank
    box = [None]
    if pc.coords["pp"] == first:
        box[0] = ([t for g in groups for t in g.decoded.tokens],
                  [e for g in groups for e in g.decoded.entropies] if entropies is not None else None)
    dist.broadcast_object_list(box, src=pipeline_peer(pc, first), group=pc.groups["pp"])
    tokens, found = box[0]
    if entropies is not None:
        entropies[:] = found
    return tokens
