"""EMA decay schedules: per-step decay and EDM-style half-life in images."""

import math

import pytest

from selfe.core.ema import EMAConfig, ema_decay_at


def test_half_life_halves_the_weight_after_that_many_images_at_any_batch():
    for batch in (8, 32, 256):
        cfg = EMAConfig(half_life_kimg=4.0, warmup=False)
        steps = 4000 // batch
        weight = math.prod(ema_decay_at(k, cfg, batch) for k in range(steps))
        assert weight == pytest.approx(0.5 ** (steps * batch / 4000), rel=1e-9)
        assert weight == pytest.approx(0.5, abs=0.02)


def test_half_life_ramp_up_follows_the_images_seen():
    cfg = EMAConfig(half_life_kimg=10.0)
    # after 100 steps of 32 images the half-life is capped at 5% of 3200 images = 160 images
    assert ema_decay_at(99, cfg, 32) == pytest.approx(0.5 ** (32 / 160))
    assert ema_decay_at(10**6, cfg, 32) == pytest.approx(0.5 ** (32 / 10_000))


def test_per_step_decay_keeps_its_warmup():
    cfg = EMAConfig(decay=0.999)
    assert ema_decay_at(0, cfg, 32) == pytest.approx(0.1)
    assert ema_decay_at(10**6, cfg, 32) == 0.999
    assert ema_decay_at(0, EMAConfig(decay=0.999, warmup=False), 32) == 0.999
    with pytest.raises(ValueError, match="half_life_kimg"):
        EMAConfig(half_life_kimg=-1).validate()
