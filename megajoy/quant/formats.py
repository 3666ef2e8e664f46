"""Weight-only quantisation formats for quantisation-aware training, each with its exact rules:

  int4   symmetric, one fp32 scale per group of `group` (64 or 32) along the input dimension:
         scale = max|w| / 7.5, q = clamp(round_half_even(w / scale), -8, 7)  (compressed-tensors' int4,
         the layout of the released JoyAI-Flash INT4 checkpoint and of vLLM / SGLang's pack-quantized)
  q8_0   ggml's block of 32: d = max|w| / 127, q = round_half_away(w / d), stored d in fp16
  q4_0   ggml's block of 32: m = the signed value of largest magnitude, d = m / -8,
         q = clamp(trunc(w / d + 8.5), 0, 15) - 8, stored d in fp16

Quantisation runs in fp32 in the same order of operations as ggml (gguf-py's numpy port), so
`dequantize(quantize(w))` is bit-identical to what a GGUF file of that type holds. Fake-quant passes the
gradient straight through (the straight-through estimator).
"""

import contextlib
from dataclasses import dataclass

import torch

from megajoy.config import QAT_FORMATS
from megajoy.kernels.backend import WeightCache, autocast_dtype, cast_as_autocast


@dataclass(frozen=True)
class WeightFormat:
    name: str
    group: int

    @classmethod
    def of(cls, name: str, group: int = 64) -> "WeightFormat":
        if name not in QAT_FORMATS:
            raise ValueError(f"quantisation format {name!r} must be one of {QAT_FORMATS}")
        if name != "int4":
            group = 32  # ggml's block size
        if group not in (32, 64):
            raise ValueError(f"int4 group size {group} must be 32 or 64")
        return cls(name, group)

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes int8 [..., n], scales [..., n / group]); int4 scales fp32, ggml scales fp16."""
        if w.shape[-1] % self.group:
            raise ValueError(f"input dimension {w.shape[-1]} is not a multiple of the {self.name} group {self.group}")
        blocks = w.detach().float().unflatten(-1, (-1, self.group))
        codes, scales = {"int4": _int4, "q8_0": _q8_0, "q4_0": _q4_0}[self.name](blocks)
        return codes.flatten(-2), scales.squeeze(-1)

    def dequantize(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        blocks = codes.float().unflatten(-1, (-1, self.group))
        return (blocks * scales.float().unsqueeze(-1)).flatten(-2)

    def round_trip(self, w: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """dequantize(quantize(w)), in `dtype` (default w's), without a gradient."""
        codes, scales = self.quantize(w)
        return self.dequantize(codes, scales).to(dtype or w.dtype)

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        """dequantize(quantize(w)) in w's dtype, with the gradient passed straight through."""
        return _StraightThrough.apply(w, self)


def _int4(blocks):
    scales = blocks.abs().amax(dim=-1, keepdim=True) / 7.5
    scales = torch.where(scales == 0, torch.finfo(torch.float32).eps, scales)
    codes = torch.clamp(torch.round(blocks / scales), -8, 7)
    return codes.to(torch.int8), scales


def _round_half_away(x):
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def _q8_0(blocks):
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    codes = _round_half_away(blocks * inverse)
    return codes.to(torch.int8), d.half()


def _q4_0(blocks):
    peak = blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True))
    d = peak / -8
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    codes = torch.clamp(torch.trunc(blocks * inverse + 8.5), 0, 15) - 8
    return codes.to(torch.int8), d.half()


_fake_quants = WeightCache()  # inside reuse_fake_quant(): (format, dtype) of a weight -> its fake-quant
_reuse_cast = True


@contextlib.contextmanager
def reuse_fake_quant(cast: bool = True):
    """For a block in which the weights do not change (one step's micro-batches, a rollout): each weight is
    fake-quantised once and reused. With `cast`, the kept tensor is in the dtype autocast gives a matmul
    operand, so it is the very tensor the GEMMs save for backward: no memory beyond what one micro-batch
    holds anyway (and less under pipeline parallelism, whose micro-batches in flight share it). Without
    `cast` (a low-precision GEMM back-end rounds the weight itself) it stays in the weight's dtype."""
    global _reuse_cast
    with _fake_quants.block() as owner:
        if owner:  # nested: the outer block's setting holds
            _reuse_cast = cast
        yield


def reuse_fake_quant_for(quant) -> contextlib.AbstractContextManager:
    """reuse_fake_quant() for a job's QuantConfig: uncast when an FP8 back-end rounds the weight itself."""
    return reuse_fake_quant(cast=quant.fp8 == "off")


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, fmt: WeightFormat):
        if not _fake_quants.active():
            return _fake_quantised(w, fmt)
        cast = _reuse_cast

        def make():
            q = _fake_quantised(w, fmt)
            return cast_as_autocast(q) if cast else q

        kept = _fake_quants.get(w, (fmt, autocast_dtype(w) if cast else None), make)
        return kept.view_as(kept)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _fake_quantised(w: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    # A bf16 copy over an fp32 master (megajoy.optim.master_weights) is quantised from its master: the
    # grid values trained against are those the checkpoint's weights give. Where ZeRO-1 keeps the masters
    # only in shards, the values were computed from the fp32 weights when they were last gathered.
    master = getattr(w, "fp32_master", w)
    if master is not None:
        return fmt.round_trip(master, w.dtype)
    kept = getattr(w, "kept_fake_quant", {}).get(fmt)
    if kept is None:
        raise RuntimeError(f"fake quantisation ({fmt.name}) of a {tuple(w.shape)} bf16 weight: ZeRO-1 keeps its fp32 "
                           "master only in shards and kept no values in this format (MasterWeights.keep_fake_quant)")
    return kept.view_as(kept)  # a new tensor for autograd to mark as the output, not the kept one itself


def kept_formats(weight: torch.Tensor) -> list[WeightFormat]:
    """The formats whose fake-quantised values a low-precision weight keeps (see MasterWeights.keep_fake_quant)."""
    return list(getattr(weight, "kept_fake_quant", {}))


@torch.no_grad()
def write_from_master(weight: torch.Tensor, master: torch.Tensor) -> None:
    """A low-precision weight, and the fake-quantised values it keeps, from its whole fp32 master."""
    weight.copy_(master)
    for fmt in kept_formats(weight):
        keep_fake_quant(weight, fmt, fmt.round_trip(master, weight.dtype))


@torch.no_grad()
def keep_fake_quant(weight: torch.Tensor, fmt: WeightFormat, values: torch.Tensor) -> None:
    """Store `values` (the fake-quantised fp32 master) as the weight's kept values in `fmt`, in the weight's
    dtype; in place of the previous step's (no new allocation per step)."""
    kept = weight.kept_fake_quant.get(fmt)
    if kept is None:
        weight.kept_fake_quant[fmt] = values.to(weight.dtype, copy=True)
    else:
        kept.copy_(values)
