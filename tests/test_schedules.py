"""Learning-rate schedules and the batch-size ramp-up against hand-computed values."""

import math
from types import SimpleNamespace

import pytest

from megajoy.optim.schedules import global_batch_size, learning_rate, total_samples


def opt(**kw):
    base = dict(lr=1.0, min_lr=0.1, lr_warmup_iters=10, lr_decay_style="WSD", lr_wsd_decay_style="linear",
                lr_wsd_decay_iters=20, lr_decay_iters=None)
    return SimpleNamespace(**{**base, **kw})


def test_warmup_is_linear_from_one_step():
    assert learning_rate(0, opt(), 100) == pytest.approx(0.1)
    assert learning_rate(4, opt(), 100) == pytest.approx(0.5)
    assert learning_rate(9, opt(), 100) == pytest.approx(1.0)


@pytest.mark.parametrize("style, at_90", [("linear", 0.55), ("cosine", 0.55), ("1-sqrt", 0.1 + 0.9 * (1 - math.sqrt(0.5)))])
def test_wsd_stable_then_decay(style, at_90):
    cfg = opt(lr_wsd_decay_style=style)
    assert learning_rate(50, cfg, 100) == 1.0 and learning_rate(80, cfg, 100) == 1.0
    assert learning_rate(90, cfg, 100) == pytest.approx(at_90)
    assert learning_rate(100, cfg, 100) == pytest.approx(0.1)
    if style == "cosine":
        assert learning_rate(85, cfg, 100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_wsd_decay_defaults_to_a_fifth():
    cfg = opt(lr_wsd_decay_iters=None)
    assert learning_rate(79, cfg, 100) == 1.0 and learning_rate(90, cfg, 100) == pytest.approx(0.55)


def test_cosine_and_linear_over_the_whole_run():
    assert learning_rate(55, opt(lr_decay_style="cosine"), 100) == pytest.approx(0.55)
    assert learning_rate(55, opt(lr_decay_style="linear"), 100) == pytest.approx(0.55)
    assert learning_rate(32.5, opt(lr_decay_style="linear"), 100) == pytest.approx(0.775)
    assert learning_rate(70, opt(lr_decay_style="constant"), 100) == 1.0


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
