"""Learning-rate schedules (warmup, then constant / linear / cosine / warmup-stable-decay) and the
global-batch-size ramp-up, both pure functions of the training position so a resumed run replays them."""

import math


def learning_rate(step: int, cfg, train_iters: int) -> float:
    """LR for optimizer step `step` (0-based): linear warmup over lr_warmup_iters, then the decay style."""
    if step < cfg.lr_warmup_iters:
        return cfg.lr * (step + 1) / cfg.lr_warmup_iters
    decay_iters = cfg.lr_decay_iters or train_iters
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    if cfg.lr_decay_style == "WSD":
        wsd_iters = cfg.lr_wsd_decay_iters if cfg.lr_wsd_decay_iters is not None else max(1, decay_iters // 5)
        start = decay_iters - wsd_iters
        if step < start:
            return cfg.lr
        progress = min(1.0, (step - start) / max(1, wsd_iters))
        return _decay(cfg.lr, cfg.min_lr, progress, cfg.lr_wsd_decay_style)
    progress = min(1.0, (step - cfg.lr_warmup_iters) / max(1, decay_iters - cfg.lr_warmup_iters))
    return _decay(cfg.lr, cfg.min_lr, progress, cfg.lr_decay_style)


def _decay(lr: float, min_lr: float, progress: float, style: str) -> float:
    if style == "linear":
        factor = 1.0 - progress
    elif style == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif style == "1-sqrt":
        factor = 1.0 - math.sqrt(progress)
    else:
        raise ValueError(f"unknown decay style {style!r}")
    return min_lr + (lr - min_lr) * factor


def global_batch_size(consumed_samples: int, cfg) -> int:
    """Megatron's --rampup-batch-size START INCREMENT SAMPLES: the batch grows by INCREMENT in equal
    steps over the first SAMPLES samples, then stays at global_batch_size."""
    if cfg.rampup_batch_size is None:
        return cfg.global_batch_size
    start, increment, ramp_samples = cfg.rampup_batch_size
    increments = (cfg.global_batch_size - start) // increment
    if increments == 0 or consumed_samples >= ramp_samples:
        return cfg.global_batch_size
    samples_per_increment = ramp_samples / increments
    # int(a / b) as Megatron computes it: a // b rounds differently where a / b is within an ulp of an integer
    return min(cfg.global_batch_size, start + int(consumed_samples / samples_per_increment) * increment)


def batch_sizes(cfg) -> list[int]:
    """Every global batch size a run steps with: the ramp-up's, then global_batch_size."""
    if cfg.rampup_batch_size is None:
        return [cfg.global_batch_size]
    start, increment, _ = cfg.rampup_batch_size
    return list(range(start, cfg.global_batch_size, increment)) + [cfg.global_batch_size]


def total_samples(cfg, train_iters: int) -> int:
    """Samples consumed by train_iters steps, following the ramp-up."""
    consumed = 0
    for _ in range(train_iters):
        consumed += global_batch_size(consumed, cfg)
    return consumed
