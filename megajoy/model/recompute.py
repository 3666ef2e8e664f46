"""Activation recomputation, with Megatron's flags.

`full` (`--recompute-granularity full`): chosen decoder layers keep only their input for backward and run
their forward again when backward reaches them. `uniform`: the layers are cut into chunks of
`num_layers`, each chunk checkpointed as one (only the chunk's input kept). `block`: the first
`num_layers` layers of each pipeline stage are checkpointed one by one, the rest keep their activations
(spend the memory a stage has to spare on speed).

`selective` (`--recompute-granularity selective --recompute-modules ...`): parts of every decoder layer
(the MTP layer's too). `core_attn`, `mlp` (the dense MLP), `moe` (the whole MoE block) and
`shared_experts` are checkpointed: they keep their inputs and run again in backward. `layernorm`,
`mla_up_proj` and `moe_act` produce tensors their consumer keeps anyway (a GEMM keeps its input for the
weight gradient), so checkpointing them alone would save nothing: their outputs are released once the
consumer has run and refilled, by running the producer again, when the consumer's gradient arrives
(`run_discarding`, Megatron's output-discarding checkpoint).

The forward run again inside backward must not count twice what a forward counts (the router's expert
load, QK-clip's logit tracking): those read `is_recomputing()`.
"""

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from megajoy.kernels.backend import uncached_weight_casts

_recomputing = False  # backward is running a checkpointed part's forward again
_checkpointed = False  # inside a checkpointed part's forward (the first run or the rerun)


def is_recomputing() -> bool:
    """True while backward runs a checkpointed layer's forward again."""
    return _recomputing


@contextlib.contextmanager
def _in_checkpointed_part(rerun: bool):
    global _recomputing, _checkpointed
    outer = _recomputing, _checkpointed
    _recomputing, _checkpointed = rerun or _recomputing, True
    try:
        with uncached_weight_casts():
            yield
    finally:
        _recomputing, _checkpointed = outer


DEFAULT_MODULES = ("core_attn",)  # Megatron's default for --recompute-modules


@dataclass(frozen=True)
class Recompute:
    method: str = "uniform"  # full granularity: uniform | block
    num_layers: int = 1
    modules: tuple[str, ...] = ()  # selective granularity: these parts of every layer (full when empty)

    @classmethod
    def of(cls, train) -> "Recompute | None":
        """From a TrainConfig's recompute_* fields; None when recomputation is off."""
        if train.recompute_granularity == "selective":
            return cls(modules=tuple(train.recompute_modules or DEFAULT_MODULES))
        return cls(train.recompute_method, train.recompute_num_layers) if train.recompute_granularity else None

    @property
    def full(self) -> bool:
        return not self.modules

    def chunks(self, layers: list) -> list[tuple[list, bool]]:
        """The stage's layers in order, as (layers, checkpointed) runs (none checkpointed whole when
        selective)."""
        if not self.full:
            return [(layers, False)]
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
        h_BSD = checkpointed_call(lambda h, chunk=chunk: _run(chunk, h, seq), h_BSD) if checkpointed else (
            _run(chunk, h_BSD, seq))
    return h_BSD


def _run(layers: list, h_BSD: torch.Tensor, seq) -> torch.Tensor:
    for layer in layers:
        h_BSD = layer(h_BSD, seq)
    return h_BSD


def checkpointed_call(fn: Callable, *args):
    """fn(*args), keeping only the arguments for backward, which runs fn again (with grad off, a plain call)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    calls = []

    def forward(*inputs):
        with _in_checkpointed_part(rerun=bool(calls)):  # every call after the first is backward's
            calls.append(1)
            return fn(*inputs)

    return checkpoint(forward, *args, use_reentrant=False)


@torch._disable_dynamo  # eager between compiled graphs (storage resizing, tensor hooks); imports dynamo when first run
def run_discarding(producer: Callable, consumer: Callable, *inputs: torch.Tensor):
    """consumer(producer(*inputs)), with the producer's outputs (a tensor or a tuple) released once the
    consumer has run, and refilled with producer(*inputs) again, under the forward's autocast state, when
    the gradient of the consumer's output arrives (before the consumer's backward reads them).

    The refill writes into the released storage itself, so every tensor autograd saved on it sees the
    values again and no version counter moves. The producer keeps its own graph: it must save no more
    than its inputs for backward (a norm, SwiGLU, a projection), and run no collective."""
    produced = producer(*inputs)
    result = consumer(produced)
    # Inside a checkpointed part (`moe` around `moe_act`) nothing is kept to release.
    if _checkpointed or not (torch.is_grad_enabled() and isinstance(result, torch.Tensor) and result.requires_grad):
        return result
    tensors = produced if isinstance(produced, tuple) else (produced,)
    kept = {t.untyped_storage().data_ptr() for t in (*inputs, result) if isinstance(t, torch.Tensor)}
    released = {}  # storage address -> (storage, its bytes, indices of the produced tensors on it)
    for i, t in enumerate(tensors):  # never an input passed through (a view, an identity cast), nor the result
        address = t.untyped_storage().data_ptr()
        if address not in kept:
            released.setdefault(address, (t.untyped_storage(), t.untyped_storage().nbytes(), []))[2].append(i)
    if released:
        for storage, _, _ in released.values():
            storage.resize_(0)
        result.register_hook(_refill(tensors, list(released.values()), producer, inputs))
    return result


def _refill(tensors: tuple, released: list, producer: Callable, inputs: tuple):
    """The gradient hook that refills the released storages (once)."""
    layouts = [(t.dtype, t.device, t.storage_offset(), t.shape, t.stride()) for t in tensors]
    device = tensors[0].device.type
    autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
    done = []

    def hook(grad):
        if done:
            return
        done.append(1)
        with torch.no_grad(), torch.autocast(device, dtype=autocast[1], enabled=autocast[0]):
            again = producer(*inputs)
        again = again if isinstance(again, tuple) else (again,)
        for storage, nbytes, indices in released:
            storage.resize_(nbytes)
            for i in indices:  # through a new tensor on the storage: the saved tensors' version counters stay
                dtype, device_, offset, shape, stride = layouts[i]
                torch.empty(0, dtype=dtype, device=device_).set_(storage, offset, shape, stride).copy_(again[i])

    return hook
