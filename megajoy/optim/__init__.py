"""Optimizers behind one interface: `build_optimizer(model, cfg)` returns a torch optimizer whose param
groups carry `lr_mult` (the schedule sets group lr = scheduled lr * lr_mult)."""

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and the embedding); none on norms, biases and other 1-D tensors."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0}]
    return [g for g in groups if g["params"]]


def _adamw(model: nn.Module, cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


OPTIMIZERS = {"adamw": _adamw}


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {cfg.optimizer!r} is not available; choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[cfg.optimizer](model, cfg)
