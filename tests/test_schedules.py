"""Learning-rate schedules and the batch-size ramp-up against hand-computed values."""

import math
from types import SimpleNamespace

import pytest

from megajoy.config import OptimizerConfig, TrainConfig
from megajoy.optim.schedules import global_batch_size, iterations_for_samples, learning_rate, total_samples


def opt(**kw):
    base = dict(lr=1.0, min_lr=0.1, lr_warmup_iters=10, lr_decay_style="WSD", lr_wsd_decay_style="linear",
                lr_wsd_decay_iters=20, lr_decay_iters=None)
    return SimpleNamespace(**{**base, **kw})


def lr_at(step, cfg, train_iters):
    """An iteration-based run's LR at `step`."""
    return learning_rate(step, 0, cfg, SimpleNamespace(train_samples=None, train_iters=train_iters))


def test_warmup_is_linear_from_one_step():
    assert lr_at(0, opt(), 100) == pytest.approx(0.1)
    assert lr_at(4, opt(), 100) == pytest.approx(0.5)
    assert lr_at(9, opt(), 100) == pytest.approx(1.0)


@pytest.mark.parametrize("style, at_90", [("linear", 0.55), ("cosine", 0.55), ("1-sqrt", 0.1 + 0.9 * (1 - math.sqrt(0.5)))])
def test_wsd_stable_then_decay(style, at_90):
    cfg = opt(lr_wsd_decay_style=style)
    assert lr_at(50, cfg, 100) == 1.0 and lr_at(80, cfg, 100) == 1.0
    assert lr_at(90, cfg, 100) == pytest.approx(at_90)
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)
    if style == "cosine":
        assert lr_at(85, cfg, 100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_wsd_decay_defaults_to_a_fifth():
    cfg = opt(lr_wsd_decay_iters=None)
    assert lr_at(79, cfg, 100) == 1.0 and lr_at(90, cfg, 100) == pytest.approx(0.55)


def test_cosine_and_linear_over_the_whole_run():
    assert lr_at(55, opt(lr_decay_style="cosine"), 100) == pytest.approx(0.55)
    assert lr_at(55, opt(lr_decay_style="linear"), 100) == pytest.approx(0.55)
    assert lr_at(32.5, opt(lr_decay_style="linear"), 100) == pytest.approx(0.775)
    assert lr_at(70, opt(lr_decay_style="constant"), 100) == 1.0


def test_rampup_follows_megatron():
    cfg = SimpleNamespace(global_batch_size=6, rampup_batch_size=[2, 2, 16])
    sizes, consumed = [], 0
    for _ in range(8):
        sizes.append(global_batch_size(consumed, cfg))
        consumed += sizes[-1]
    assert sizes == [2, 2, 2, 2, 4, 4, 6, 6]
    assert total_samples(cfg, 8) == 28
    assert global_batch_size(10**9, SimpleNamespace(global_batch_size=6, rampup_batch_size=None)) == 6


def test_rampup_equals_megatron_cores_calculator_at_every_consumed_count():
    """Every batch size of a sweep of ramps equals megatron-core's RampupBatchsizeNumMicroBatchesCalculator.
    Before, a floor division of floats put some increments one sample late (batch 7, ramp 1 1 10: 3 at 5
    samples where Megatron has 4)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

    checked = 0
    for gbs, start, increment, samples in [(7, 1, 1, 10), (12, 2, 2, 100), (30, 3, 3, 77), (64, 4, 6, 1000)]:
        megatron = RampupBatchsizeNumMicroBatchesCalculator(gbs, 1, 1, False, 0, start, increment, samples)
        cfg = SimpleNamespace(global_batch_size=gbs, rampup_batch_size=[start, increment, samples])
        for consumed in range(samples + 3):
            megatron.update(consumed, False)
            assert global_batch_size(consumed, cfg) == megatron.get_current_global_batch_size(), (cfg, consumed)
            checked += 1
    assert checked == 10 + 100 + 77 + 1000 + 4 * 3


def megatron_lr(num_steps, cfg, warmup, decay, wsd_decay):
    """megatron-core's OptimizerParamScheduler (init_lr 0) at `num_steps`, the units it has stepped through."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    scheduler = OptimizerParamScheduler(
        SimpleNamespace(param_groups=[{}]), init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=decay, lr_decay_style=cfg.lr_decay_style, start_wd=0.1, end_wd=0.1, wd_incr_steps=decay,
        wd_incr_style="constant", wsd_decay_steps=wsd_decay,
        lr_wsd_decay_style={"1-sqrt": "minus_sqrt"}.get(cfg.lr_wsd_decay_style, cfg.lr_wsd_decay_style))
    scheduler.num_steps = num_steps
    return scheduler.get_lr({})


@pytest.mark.parametrize("style", ["cosine", "linear", "WSD", "constant"])
def test_sample_based_schedule_is_megatrons_in_samples(style):
    """Under --train-samples with a batch ramp-up, every step's LR equals megatron-core's scheduler stepped in
    samples (Megatron requires sample-based training with a ramp-up): from the step's first sample in the
    decay, from its last in the warmup (megajoy's warmup starts one step ahead, so the first step trains)."""
    train = TrainConfig(global_batch_size=8, micro_batch_size=2, rampup_batch_size=[2, 2, 48], train_samples=300)
    cfg = OptimizerConfig(lr=1.0, min_lr=0.1, lr_decay_style=style, lr_wsd_decay_style="1-sqrt",
                          lr_warmup_samples=20, lr_decay_samples=280, lr_wsd_decay_samples=100)
    consumed, seen = 0, set()
    for step in range(train.train_iters):
        batch = global_batch_size(consumed, train)
        in_warmup = consumed < 20
        expected = megatron_lr(min(consumed + batch, 20) if in_warmup else consumed, cfg, 20, 280, 100)
        assert learning_rate(step, consumed, cfg, train) == pytest.approx(expected, abs=1e-12), (step, consumed)
        seen.add((in_warmup, expected == cfg.lr, expected == cfg.min_lr))
        consumed += batch
    assert consumed == 298 and train.train_iters == 46  # ramp 2 x 8, 4 x 4, 6 x 3 (50 samples), then 31 x 8
    assert len(seen) >= (2 if style == "constant" else 3)  # warmup, full LR or decay, and the floor were reached


def test_sample_lengths_default_to_full_global_batches():
    """A sample-based run's *_iters lengths count global_batch_size samples each; lr_decay defaults to
    train_samples (Megatron's --lr-decay-samples default)."""
    train = TrainConfig(global_batch_size=4, micro_batch_size=4, rampup_batch_size=[1, 1, 12], train_samples=100)
    cfg = OptimizerConfig(lr=1.0, min_lr=0.0, lr_decay_style="linear", lr_warmup_iters=2)
    assert learning_rate(0, 0, cfg, train) == pytest.approx(1 / 8)  # batch 1 of a warmup of 2 x 4 samples
    assert learning_rate(9, 60, cfg, train) == pytest.approx(1 - (60 - 8) / (100 - 8))


def test_iterations_for_samples_counts_whole_batches():
    for gbs, ramp, samples in [(6, [2, 2, 16], 30), (6, [2, 2, 16], 27), (8, None, 100), (7, [1, 1, 10], 1000),
                               (12, [2, 2, 100], 101), (5, None, 4)]:
        cfg = SimpleNamespace(global_batch_size=gbs, rampup_batch_size=ramp)
        steps = 0
        while total_samples(cfg, steps + 1) <= samples:
            steps += 1
        assert iterations_for_samples(cfg, samples) == steps, (gbs, ramp, samples)


def test_train_samples_sets_train_iters_and_refuses_too_few():
    assert TrainConfig(global_batch_size=6, micro_batch_size=2, rampup_batch_size=[2, 2, 16],
                       train_samples=30).train_iters == 8  # 2+2+2+2+4+4+6+6 = 28; one more batch of 6 overflows
    with pytest.raises(ValueError, match="train_samples=1 holds no whole global batch"):
        TrainConfig(global_batch_size=6, micro_batch_size=2, rampup_batch_size=[2, 2, 16], train_samples=1)


def test_sample_lengths_need_a_sample_based_run():
    from megajoy.config import JobConfig

    with pytest.raises(ValueError, match="lr_decay_samples count samples: they need a sample-based run"):
        JobConfig(optimizer=OptimizerConfig(lr_decay_samples=10))
    job = JobConfig(optimizer=OptimizerConfig(lr_decay_samples=10), train=TrainConfig(train_samples=80))
    assert job.train.train_iters == 10
