"""Parameter metadata shared by initialisation, gradient reduction, the distributed optimizer and
checkpoints: how each tensor is sharded and whether its gradient is partial over tensor-parallel ranks.

Specs are derived from the module types (not attributes on Parameter objects, which `to_empty` and dtype
casts replace), keyed by the parameter's name, which is the same in every layout.
"""

from dataclasses import dataclass

import torch
from torch import nn

from megajoy.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megajoy.parallel.mappings import group_size


@dataclass(frozen=True)
class ParamSpec:
    global_shape: tuple
    tp_dim: int | None = None  # dimension split over tensor-parallel ranks
    expert: bool = False  # dimension 0 split over expert-parallel ranks (replicated over expert-data-parallel)
    partial_tp_grad: bool = False  # computed on a rank's own tokens: sum the gradient over TP ranks
    duplicate: bool = False  # a pipeline copy (the last stage's embedding): synced, counted once elsewhere

    @property
    def tp_sharded(self) -> bool:
        return self.tp_dim is not None


def _moe_prefixes(model: nn.Module) -> list[str]:
    from megajoy.model.moe import MoE

    return [name + "." for name, module in model.named_modules() if isinstance(module, MoE)]


def parameter_specs(model: nn.Module, pc) -> dict[str, ParamSpec]:
    from megajoy.model.moe import GroupedExperts

    tp, ep = pc.tp_size, pc.ep_size
    moe = _moe_prefixes(model)
    stages = getattr(model, "stages", ())
    embedding_copy = bool(stages) and not any(s.is_first for s in stages)
    specs = {}
    for module_name, module in model.named_modules():
        for local_name, p in module.named_parameters(recurse=False):
            name = f"{module_name}.{local_name}" if module_name else local_name
            shape = tuple(p.shape)
            in_moe = any(name.startswith(prefix) for prefix in moe)
            sharded = isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding))
            if sharded and group_size(getattr(module, "group", None)) > 1 and not (
                    isinstance(module, RowParallelLinear) and local_name == "bias"):
                dim = module.tp_dim if p.ndim > 1 else 0
                specs[name] = ParamSpec(_scaled(shape, dim, tp), tp_dim=dim,
                                        duplicate=embedding_copy and name.startswith("embed_tokens."))
            elif isinstance(module, GroupedExperts):
                specs[name] = ParamSpec(_scaled(shape, 0, ep), expert=True)
            else:
                # Replicated: on a rank's own tokens (sequence parallel, or inside an MoE block, which
                # shards tokens over TP ranks) its gradient is partial.
                specs[name] = ParamSpec(shape, partial_tp_grad=tp > 1 and (pc.sequence_parallel or in_moe),
                                        duplicate=embedding_copy and name.startswith("embed_tokens."))
    return specs


def _scaled(shape: tuple, dim: int, factor: int) -> tuple:
    return tuple(s * factor if i == dim else s for i, s in enumerate(shape))


def local_slice(full: torch.Tensor, spec: ParamSpec, pc) -> torch.Tensor:
    """This rank's shard of a full (global-shape) tensor."""
    if spec.tp_sharded:
        full = full.chunk(pc.tp_size, dim=spec.tp_dim)[pc.tp_rank]
    if spec.expert:
        full = full.chunk(pc.ep_size, dim=0)[pc.ep_rank]
    return full


def shard_index(spec: ParamSpec, pc) -> tuple[int, int]:
    """(first row, rows) of this rank's experts along dim 0 of an expert tensor."""
    rows = spec.global_shape[0] // pc.ep_size
    return pc.ep_rank * rows, rows
