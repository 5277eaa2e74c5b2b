"""Gradual pruning schedules: Zhu & Gupta's cubic ramp, linear, constant."""
from __future__ import annotations

import pytest

import prunekit as pk


def zhu_gupta(t: int, s_i: float, s_f: float, t0: int, n: int, dt: int) -> float:
    """s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 at the pruning steps t = t0 + k dt."""
    return s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3


def test_cubic_values_at_known_steps():
    s = pk.cubic_schedule(0.8, begin=10, end=50, every=10)
    assert [s(t) for t in (0, 9)] == [0.0, 0.0]            # dense before begin
    assert s(10) == 0.0                                     # s_i at t0
    assert s(20) == pytest.approx(0.8 * (1 - 0.75 ** 3))    # 0.4625
    assert s(25) == s(20)                                   # held between updates
    assert s(30) == pytest.approx(0.7)
    assert s(40) == pytest.approx(0.8 * (1 - 0.25 ** 3))
    assert s(50) == 0.8 and s(10_000) == 0.8


@pytest.mark.parametrize("s_i,s_f,t0,n,dt", [(0.0, 0.9, 0, 10, 1), (0.2, 0.5, 7, 4, 25), (0.5, 0.5, 3, 2, 2)])
def test_cubic_matches_the_paper_formula_at_every_update(s_i, s_f, t0, n, dt):
    s = pk.cubic_schedule(s_f, s_i, begin=t0, end=t0 + n * dt, every=dt)
    for k in range(n + 1):
        t = t0 + k * dt
        assert s.is_update(t)
        assert s(t) == pytest.approx(zhu_gupta(t, s_i, s_f, t0, n, dt), abs=1e-12)
        if k < n:
            assert all(not s.is_update(u) and s(u) == s(t) for u in range(t + 1, t + dt))
    assert not s.is_update(t0 + (n + 1) * dt)
    assert t0 == 0 or not s.is_update(t0 - 1)


@pytest.mark.parametrize("make", [pk.cubic_schedule, pk.linear_schedule])
def test_monotone_and_hits_final(make):
    s = make(0.75, 0.1, begin=5, end=105, every=20)
    values = [s(t) for t in range(5, 200)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[0] == pytest.approx(0.1) and s(105) == 0.75 and values[-1] == 0.75


def test_linear_steps_are_equal():
    s = pk.linear_schedule(0.6, begin=0, end=30, every=10)
    assert [s(t) for t in (0, 10, 20, 30)] == pytest.approx([0.0, 0.2, 0.4, 0.6])


def test_cubic_prunes_faster_early_than_linear():
    cubic, linear = pk.cubic_schedule(0.8, end=100, every=10), pk.linear_schedule(0.8, end=100, every=10)
    assert all(cubic(t) > linear(t) for t in range(10, 100, 10))


def test_constant():
    s = pk.constant_schedule(0.5, begin=4)
    assert [s(t) for t in (0, 3, 4, 1000)] == [0.0, 0.0, 0.5, 0.5]
    assert s.is_constant and s.is_update(4) and not s.is_update(5)
    every = pk.constant_schedule(0.5, begin=0, every=3, end=9)
    assert [t for t in range(12) if every.is_update(t)] == [0, 3, 6, 9]


@pytest.mark.parametrize("kwargs", [dict(final=1.0), dict(final=0.5, initial=-0.1), dict(final=0.5, begin=10, end=5),
                                    dict(final=0.5, end=10, every=3), dict(final=0.5, every=0),
                                    dict(final=0.5, begin=-1)])
def test_invalid_schedules(kwargs):
    with pytest.raises(ValueError):
        pk.cubic_schedule(**{"end": 10, "every": 1, **kwargs})
