"""The miner's tests: their false-flag rate is what ``alpha`` promises (simulated healthy fleets), a
faulty station does not widen its own yardstick, a change point lands on its day, and the day-to-day
spread is estimated without being inflated by a step."""

from __future__ import annotations

import numpy as np
import pytest

from medsendx_edge.fleet import stats


def _flags(rng, n_fleets, n_st, tau, se, alpha, shift=0.0):
    """Fleets of healthy stations (calibration spread tau, standard error se each); station 0 shifted."""
    flags = np.zeros(n_st)
    for _ in range(n_fleets):
        m = rng.normal(0, tau, n_st) + rng.normal(0, 1, n_st) * se
        m[0] += shift
        t = stats.level_test(m, se, np.zeros(n_st, dtype=int), tau_floor=1e-6)
        flags += t.p * n_st < alpha  # Bonferroni over the fleet
    return flags / n_fleets


def test_the_level_test_keeps_the_false_flag_rate_alpha_promises():
    rng = np.random.default_rng(0)
    se = rng.uniform(0.001, 0.01, 30)  # stations with few and many images
    rate = _flags(rng, 3000, 30, 0.015, se, alpha=0.2).sum()
    assert 0.12 < rate < 0.24  # healthy stations flagged per fleet: alpha (0.2), not far above or below


def test_a_station_is_judged_against_its_peers_without_itself():
    rng = np.random.default_rng(1)
    m = rng.normal(0, 0.01, 25)
    m[0] = 0.028  # about 3 SD: a member of the healthy set, but it must not widen its own yardstick
    t = stats.level_test(m, np.full(25, 1e-6), np.zeros(25, dtype=int), tau_floor=1e-9)
    peers = np.delete(m, 0)
    expected = (m[0] - peers.mean()) / (peers.std(ddof=1) * np.sqrt(1 + 1 / 24))
    assert t.z[0] == pytest.approx(expected * np.sqrt(stats.TRUNCATION), rel=1e-3)
    assert t.df[0] == 23
    with_itself = (m[0] - m.mean()) / m.std(ddof=1)
    assert t.z[0] > with_itself * 1.1


def test_a_six_sd_shift_is_flagged_nearly_always():
    rng = np.random.default_rng(2)
    rates = _flags(rng, 400, 30, 0.015, np.full(30, 0.002), alpha=0.1, shift=6 * 0.015)
    assert rates[0] > 0.9 and rates[1:].sum() < 0.15


def test_the_image_count_sets_what_is_significant():
    """The same 2% shift: flagged where the spread between stations is tiny and the station has many images,
    not where it has few."""
    rng = np.random.default_rng(3)
    m = rng.normal(0, 0.002, 30)
    m[0] = 0.02
    many = stats.level_test(m, np.full(30, 0.0005), np.zeros(30, dtype=int), tau_floor=1e-6)
    few = stats.level_test(m, np.where(np.arange(30) == 0, 0.02, 0.0005), np.zeros(30, dtype=int), tau_floor=1e-6)
    assert many.p[0] * 30 < 0.01 and few.p[0] * 30 > 0.1


def _series(rng, n_st=20, days=28, per_day=10, step_at=None, step=0.0, day_sd=0.0):
    sigma = np.full(n_st, 0.02)
    n = rng.poisson(per_day, (n_st, days)).astype(np.int64)
    daily = rng.normal(0, 1, (n_st, days)) * 1.2533 * 0.02 / np.sqrt(np.maximum(n, 1))
    daily += rng.normal(0, day_sd, (n_st, days))
    if step_at is not None:
        daily[0, step_at:] += step
    daily[n == 0] = np.nan
    return daily, n, sigma


def test_a_change_point_lands_on_its_day():
    rng = np.random.default_rng(4)
    daily, n, sigma = _series(rng, step_at=24, step=0.04)
    ct = stats.change_points(daily, n, sigma, 0.0)
    assert ct.split[0] == 23  # the last day before the change
    assert ct.z[0] > 6 and abs(ct.after[0] - ct.before[0] - 0.04) < 0.01
    p = stats.normal_p(ct.z) * ct.n_splits * 20
    assert (p[1:] > 0.05).all()


def test_the_day_to_day_spread_is_found_and_a_step_does_not_inflate_it():
    rng = np.random.default_rng(5)
    daily, n, sigma = _series(rng, day_sd=0.004)
    est = stats.day_spread(daily, n, sigma, np.arange(20))
    assert 0.003 < np.sqrt(est) < 0.005
    quiet, n, sigma = _series(rng, step_at=14, step=0.05)
    assert np.sqrt(stats.day_spread(quiet, n, sigma, np.arange(20))) < 0.003  # not the step's 0.05
