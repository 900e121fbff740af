"""Learning-rate schedules: values worked out by hand at the points where their formula changes."""

import math

import pytest

from moekit.train.schedules import constant, inverse_sqrt, warmup_cosine, warmup_cosine_floor


def test_inverse_sqrt_warms_up_then_decays_as_inverse_sqrt():
    lr = inverse_sqrt(1e-3, 100)
    # The schedule takes the number of steps already taken: step s (counted from 1) is index s - 1.
    assert lr(0) == pytest.approx(1e-5)  # step 1 of a 100-step warm-up
    assert lr(49) == pytest.approx(5e-4)
    assert lr(99) == pytest.approx(1e-3)
    assert lr(399) == pytest.approx(5e-4)  # sqrt(100/400) = 1/2
    assert inverse_sqrt(1e-3, 1)(0) == 1e-3


def test_warmup_cosine_reaches_the_peak_then_decays_to_zero():
    lr = warmup_cosine(1.0, steps=110, warmup=10)
    assert [lr(i) for i in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr(9) == 1.0 and lr(10) == 1.0  # the end of the warm-up, then the top of the cosine
    assert lr(60) == pytest.approx(0.5)  # half-way through the 100 decay steps: cos(pi/2) = 0
    assert lr(110) == pytest.approx(0.0, abs=1e-12)


def test_warmup_cosine_floor_stops_at_its_floor():
    lr = warmup_cosine_floor(2.0, steps=30, warmup=10, floor=0.1)
    assert lr(4) == pytest.approx(2.0 * 5 / 10)
    assert lr(10) == pytest.approx(2.0)
    assert lr(20) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    assert lr(30) == lr(1000) == pytest.approx(0.2)  # the floor after the schedule's end
    assert all(math.isfinite(lr(i)) for i in range(100))


def test_constant():
    assert constant(3e-4)(0) == constant(3e-4)(10_000) == 3e-4
