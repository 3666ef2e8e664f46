"""Activation recomputation (Megatron's `--recompute-granularity full`): chosen decoder layers keep only
their input for backward and run their forward again when backward reaches them.

`uniform`: the layers are cut into chunks of `num_layers`, each chunk checkpointed as one (only the
chunk's input kept). `block`: the first `num_layers` layers of each pipeline stage are checkpointed one by
one, the rest keep their activations (spend the memory a stage has to spare on speed).

The forward run again inside backward must not count twice what a forward counts (the router's expert
load, QK-clip's logit tracking): those read `is_recomputing()`.
"""

import contextlib
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

_recomputing = False


def is_recomputing() -> bool:
    """True while backward runs a checkpointed layer's forward again."""
    return _recomputing


@contextlib.contextmanager
def _recomputing_block(active: bool):
    global _recomputing
    outer, _recomputing = _recomputing, active or _recomputing
    try:
        yield
    finally:
        _recomputing = outer


@dataclass(frozen=True)
class Recompute:
    method: str = "uniform"  # uniform | block
    num_layers: int = 1

    @classmethod
    def of(cls, train) -> "Recompute | None":
        """From a TrainConfig's recompute_* fields; None when recomputation is off."""
        return cls(train.recompute_method, train.recompute_num_layers) if train.recompute_granularity else None

    def chunks(self, layers: list) -> list[tuple[list, bool]]:
        """The stage's layers in order, as (layers, checkpointed) runs."""
        if self.method == "uniform":
            n = self.num_layers
            return [(layers[i:i + n], True) for i in range(0, len(layers), n)]
        head = [([layer], True) for layer in layers[:self.num_layers]]
        return head + ([(layers[self.num_layers:], False)] if len(layers) > self.num_layers else [])


def run_decoder_layers(layers: list, h_BSD: torch.Tensor, seq, recompute: Recompute | None) -> torch.Tensor:
    """One stage's decoder layers on h, checkpointed as `recompute` says (None: none are)."""
    if recompute is None or not torch.is_grad_enabled():
        return _run(layers, h_BSD, seq)
    for chunk, checkpointed in recompute.chunks(layers):
        h_BSD = checkpoint(_chunk_forward(chunk, seq), h_BSD, use_reentrant=False) if checkpointed else (
            _run(chunk, h_BSD, seq))
    return h_BSD


def _run(layers: list, h_BSD: torch.Tensor, seq) -> torch.Tensor:
    for layer in layers:
        h_BSD = layer(h_BSD, seq)
    return h_BSD


def _chunk_forward(layers: list, seq):
    calls = []

    def forward(h_BSD: torch.Tensor) -> torch.Tensor:
        with _recomputing_block(bool(calls)):  # every call after the first is backward's recomputation
            calls.append(1)
            return _run(layers, h_BSD, seq)

    return forward
