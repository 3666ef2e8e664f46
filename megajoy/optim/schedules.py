"""Learning-rate schedules (warmup, then constant / linear / cosine / warmup-stable-decay) and the
global-batch-size ramp-up, both pure functions of the training position so a resumed run replays them."""

import math


def learning_rate(step: int, consumed_samples: int, opt, train) -> float:
    """LR for optimizer step `step` (0-based), which starts after `consumed_samples` samples. The schedule
    counts iterations, or samples when the run is sample-based (train.train_samples, Megatron's
    --train-samples): then the *_samples lengths apply, and an *_iters length counts full global batches."""
    if train.train_samples is None:
        return _scheduled_lr(opt, step, 1, opt.lr_warmup_iters, opt.lr_decay_iters or train.train_iters,
                             opt.lr_wsd_decay_iters)
    full = train.global_batch_size
    return _scheduled_lr(opt, consumed_samples, global_batch_size(consumed_samples, train),
                         _in_samples(opt.lr_warmup_samples, opt.lr_warmup_iters, full),
                         _in_samples(opt.lr_decay_samples, opt.lr_decay_iters, full) or train.train_samples,
                         _in_samples(opt.lr_wsd_decay_samples, opt.lr_wsd_decay_iters, full))


def _in_samples(samples: int | None, iters: int | None, global_batch: int) -> int | None:
    return samples if samples is not None else None if iters is None else iters * global_batch


def _scheduled_lr(opt, done: int, this_step: int, warmup: int, decay: int, wsd_decay: int | None) -> float:
    """The LR of a step that starts `done` units into the schedule and spans `this_step` units: linear warmup
    up to the step's end, so the first step already trains; then the decay, as Megatron's scheduler takes it
    from the step's start."""
    if done < warmup:
        return opt.lr * min(done + this_step, warmup) / warmup
    if opt.lr_decay_style == "constant":
        return opt.lr
    if opt.lr_decay_style == "WSD":
        wsd_decay = wsd_decay if wsd_decay is not None else max(1, decay // 5)
        start = decay - wsd_decay
        if done < start:
            return opt.lr
        progress = min(1.0, (done - start) / max(1, wsd_decay))
        return _decay(opt.lr, opt.min_lr, progress, opt.lr_wsd_decay_style)
    progress = min(1.0, (done - warmup) / max(1, decay - warmup))
    return _decay(opt.lr, opt.min_lr, progress, opt.lr_decay_style)


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


def iterations_for_samples(cfg, train_samples: int) -> int:
    """Steps a sample-based run takes: every step whose whole global batch (following the ramp-up) fits in
    train_samples; the remainder, less than a batch, is dropped (as Megatron drops a partial last batch)."""
    ramp_end = cfg.rampup_batch_size[2] if cfg.rampup_batch_size is not None else 0
    steps = consumed = 0
    while consumed < ramp_end and consumed + global_batch_size(consumed, cfg) <= train_samples:
        consumed += global_batch_size(consumed, cfg)
        steps += 1
    return steps + (train_samples - consumed) // cfg.global_batch_size
