"""Optimizers. `adamw` builds a torch AdamW over named parameters, with param groups carrying
`lr_mult` (the schedule sets group lr = scheduled lr * lr_mult). Muon, which needs the rank grid to
orthogonalise sharded matrices, is assembled in `megajoy.parallel.optimizer` from `megajoy.optim.muon`."""

import torch

OPTIMIZERS = ("adamw", "muon")


def param_groups(named_params: list, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and the embedding); none on norms, biases and other 1-D tensors."""
    decay = [p for _, p in named_params if p.ndim >= 2]
    no_decay = [p for _, p in named_params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0}]
    return [g for g in groups if g["params"]]


def adamw(groups: list[dict], cfg) -> torch.optim.AdamW:
    """On GPUs the fused kernel: one pass over parameter, gradient and both moments (the multi-tensor
    default took 45% of a joyai-slice step on an H100, benchmarks/RESULTS.md)."""
    on_gpu = any(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             fused=True if on_gpu else None)


def check_optimizer(name: str) -> None:
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is not available; choose one of {list(OPTIMIZERS)}")
