"""Which implementation a hot path runs.

Every op in megajoy.kernels has a plain-torch reference. The fast paths (Triton kernels, FlexAttention,
the chunked head + cross-entropy) run where they pay: on CUDA tensors, outside torch.compile (whose
Inductor fuses the same element-wise and reduction work itself). `configure(backend=...)` chooses:

  auto    fast paths on CUDA when Triton is installed, the torch reference elsewhere (default)
  torch   the torch reference everywhere
  triton  the Triton kernels everywhere; on CPU tensors this needs TRITON_INTERPRET=1 (Triton's
          interpreter), which is how the kernels are tested without a GPU

The expert GEMMs' dtype casts under autocast (megajoy.kernels.grouped_gemm, megajoy.model.moe) are not
a fast path: they are what autocast does to F.linear, applied where autocast cannot see, and hold under
every back-end.
"""

import contextlib
import dataclasses
import functools
import importlib.util
import os
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "torch", "triton")


@dataclass
class KernelSettings:
    backend: str = "auto"
    # Tokens per chunk of the fused output-projection + cross-entropy (the full logits are never held).
    # None: 4096 on CUDA and off on CPU; 0: off.
    cross_entropy_chunk: int | None = None


settings = KernelSettings()
GPU_CROSS_ENTROPY_CHUNK = 4096  # the fused head's chunk on CUDA unless set


def configure(backend: str | None = None, cross_entropy_chunk: int | None = -1) -> None:
    """Set the kernel back-end and/or the cross-entropy chunk (-1 leaves it unchanged)."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"kernel backend {backend!r} must be one of {', '.join(BACKENDS)}")
        if backend == "triton" and not triton_available():
            raise RuntimeError("kernel backend 'triton' was requested but Triton is not installed "
                               "(pip install triton)")
        settings.backend = backend
    if cross_entropy_chunk != -1:
        if cross_entropy_chunk is not None and cross_entropy_chunk < 0:
            raise ValueError(f"cross_entropy_chunk={cross_entropy_chunk} must be >= 0 (0: off) or None (auto)")
        settings.cross_entropy_chunk = cross_entropy_chunk


@contextlib.contextmanager
def kernel_settings(backend: str | None = None, cross_entropy_chunk: int | None = -1):
    """Run a block with other settings (arguments as `configure`), then restore all of them."""
    previous = dataclasses.replace(settings)
    configure(backend=backend, cross_entropy_chunk=cross_entropy_chunk)
    try:
        yield
    finally:
        settings.backend, settings.cross_entropy_chunk = previous.backend, previous.cross_entropy_chunk


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on `t` takes its Triton kernel."""
    if settings.backend == "torch" or torch.compiler.is_compiling():
        return False
    if settings.backend == "triton":
        if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("kernel backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                               "Triton is imported")
        return True
    return t.is_cuda and triton_available()


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast gives matmuls on `t`'s device, or None when autocast is off there."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class WeightCache:
    """Values derived from weights (a cast, a fake quantisation), each made once per block in which the
    weights do not change and reused there; made afresh outside a block, and while compiling (a compiled
    graph keeps no tensors across calls, and asking is_compiling first keeps it from guarding on the cache).
    The weight is kept beside its value, so that its id is not reused meanwhile. Nested blocks share the
    outer one's values; inside `bypassed()` values are made afresh, as outside a block."""

    def __init__(self):
        self._values: dict | None = None
        self._bypassed = 0

    @contextlib.contextmanager
    def block(self):
        """Yields whether this block owns the cache (False when nested in another)."""
        if self._values is not None:
            yield False
            return
        self._values = {}
        try:
            yield True
        finally:
            self._values = None

    @contextlib.contextmanager
    def bypassed(self):
        self._bypassed += 1
        try:
            yield
        finally:
            self._bypassed -= 1

    def active(self) -> bool:
        return not torch.compiler.is_compiling() and self._values is not None and not self._bypassed

    def get(self, weight: torch.Tensor, key: tuple, make):
        if not self.active():
            return make()
        full_key = (id(weight), *key)
        if full_key not in self._values:
            self._values[full_key] = (weight, make())
        return self._values[full_key][1]


_weight_casts = WeightCache()


def reuse_weight_casts():
    """For a block in which the weights do not change (an autocast region of a training step, of an
    evaluation): each weight cast_as_autocast casts is cast once and the copy reused, as autocast caches
    its own casts of leaf tensors. The experts' weights, which torch._grouped_mm takes outside autocast,
    were otherwise cast again for every micro-batch, and each copy kept until that micro-batch's backward
    (one per micro-batch in flight under pipeline parallelism)."""
    return _weight_casts.block()


@contextlib.contextmanager
def bf16_autocast(device_type: str):
    """bf16 autocast for a block in which the weights do not change, each weight cast once (the trainer's
    --bf16 compute, also that of evaluation and decoding)."""
    with torch.autocast(device_type, dtype=torch.bfloat16), reuse_weight_casts():
        yield


def uncached_weight_casts():
    """Casts afresh inside, as if outside reuse_weight_casts(): for a checkpointed part of the model,
    whose forward keeps none of its casts (the rerun in backward makes its own, one part at a time); a
    cache would keep every checkpointed part's copies for the whole step."""
    return _weight_casts.bypassed()


def cast_as_autocast(t: torch.Tensor) -> torch.Tensor:
    """`t` in the dtype autocast would give a matmul operand (unchanged when autocast is off): for the
    ops autocast does not know, such as torch._grouped_mm. A weight is cast once per reuse_weight_casts()
    block."""
    dtype = autocast_dtype(t)
    if dtype is None or dtype == t.dtype:
        return t
    if not (t.is_leaf and t.requires_grad):  # not a weight
        return t.to(dtype)
    return _weight_casts.get(t, (dtype, torch.is_grad_enabled()), lambda: t.to(dtype))


def cast_for_readers(t: torch.Tensor, readers: int) -> tuple[torch.Tensor, ...]:
    """`t` for `readers` GEMMs that all read it, each its own alias of one autocast copy. Autocast casts
    per GEMM, so each GEMM kept its own copy for backward; these share one, and their gradients still
    add in t's dtype (fp32), as the separate casts' did: the same numbers to the bit."""
    dtype = autocast_dtype(t)
    if dtype is None or dtype == t.dtype:
        return (t,) * readers
    if not t.requires_grad:
        return (t.to(dtype),) * readers
    return _SharedCast.apply(t, dtype, readers)


class _SharedCast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, dtype, readers):
        ctx.source_dtype = t.dtype
        copy = t.to(dtype)
        return tuple(copy.view_as(copy) for _ in range(readers))

    @staticmethod
    def backward(ctx, *grads):
        grads = [g.to(ctx.source_dtype) for g in grads if g is not None]
        return (functools.reduce(torch.add, grads) if grads else None), None, None


def use_fused_cuda_path(t: torch.Tensor) -> bool:
    """Fast paths written in torch itself (FlexAttention): CUDA, unless 'torch'."""
    return settings.backend != "torch" and t.is_cuda


def cross_entropy_chunk(t: torch.Tensor) -> int:
    """Tokens per chunk for the fused head + cross-entropy on `t`'s device; 0 means unfused."""
    if settings.backend == "torch":
        return 0
    if settings.cross_entropy_chunk is None:
        return GPU_CROSS_ENTROPY_CHUNK if t.is_cuda else 0
    return settings.cross_entropy_chunk
