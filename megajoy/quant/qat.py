"""Quantisation-aware training: the chosen projections see fake-quantised weights in the forward pass
(high-precision master weights, straight-through gradients), from a chosen step on.

Which projections (`--qat-modules`): `routed-experts` (default; the released JoyAI-Flash INT4 model
quantises only these), `experts` (routed and shared), `linear` (every projection but the embedding and
the output head). Groups run along each weight's input dimension, which must split into whole groups on
every rank (a tensor-parallel shard of a row-parallel weight holds part of that dimension).
"""

from torch import nn

from megajoy.config import QAT_MODULES
from megajoy.model.moe import GroupedExperts
from megajoy.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megajoy.parallel.mappings import group_size
from megajoy.quant.fp8 import TILE
from megajoy.quant.formats import WeightFormat


def qat_targets(model: nn.Module, which: str) -> list[tuple[str, nn.Module]]:
    if which not in QAT_MODULES:
        raise ValueError(f"--qat-modules {which!r} must be one of {QAT_MODULES}")
    out = []
    for name, module in model.named_modules():
        if isinstance(module, GroupedExperts):
            out.append((name, module))
        elif isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and name != "lm_head":
            if which == "linear" or (which == "experts" and ".shared_experts." in f"{name}."):
                out.append((name, module))
    return out


def quantised_weights(model: nn.Module, which: str) -> list[tuple[str, nn.Parameter]]:
    """The weights the targets fake-quantise (every matrix of theirs; biases stay as they are)."""
    return [(f"{name}.{pname}", p) for name, module in qat_targets(model, which)
            for pname, p in module.named_parameters(recurse=False) if p.ndim >= 2]


def check_groups(model: nn.Module, fmt: WeightFormat, which: str) -> None:
    """Every quantised weight's (local) input dimension must be whole groups: a group never straddles a
    tensor-parallel shard boundary."""
    for name, p in quantised_weights(model, which):
        if p.shape[-1] % fmt.group:
            raise ValueError(f"{name}: input dimension {p.shape[-1]} on this rank is not a multiple of "
                             f"the {fmt.name} group {fmt.group}; change the group or the tensor-parallel size")


def set_qat(model: nn.Module, fmt: WeightFormat | None, which: str = "routed-experts") -> int:
    """Switch fake-quant on (a format) or off (None) for the targets; returns how many modules."""
    targets = qat_targets(model, which)
    if fmt is not None:
        check_groups(model, fmt, which)
    for _, module in targets:
        module.weight_quant = fmt.fake_quant if fmt is not None else None
    return len(targets)


def set_fp8(model: nn.Module, matmul) -> int:
    """FP8 GEMMs (an Fp8Matmul, or None for off) for every projection but the embedding and output head."""
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, (ColumnParallelLinear, RowParallelLinear, GroupedExperts)) and name != "lm_head"]
    if matmul is not None and matmul.blockwise:
        check_blockwise_shards(targets)
    for _, module in targets:
        module.matmul = matmul
    return len(targets)


def check_blockwise_shards(targets: list[tuple[str, nn.Module]]) -> None:
    """A blockwise FP8 tile (128 x 128 of a weight, 1 x 128 of the activation or gradient along the split
    features) must lie on one tensor-parallel rank, or the scales would depend on the layout."""
    for name, module in targets:
        if group_size(getattr(module, "group", None)) > 1 and module.weight.shape[module.tp_dim] % TILE:
            side = "output" if module.tp_dim == 0 else "input"
            raise ValueError(f"{name}.weight: {module.weight.shape[module.tp_dim]} {side} features on this rank "
                             f"are not whole {TILE}-wide FP8 blocks; use --fp8 tensorwise or a smaller "
                             "tensor-parallel size")
