"""The miner's two tests, with thresholds that come from the data rather than a fixed cut.

**Level** (is this scanner unlike its healthy peers?).  A station's level m_i is known to within its
standard error se_i = 1.2533 sigma_i / sqrt(n_i) (the median of n_i images whose spread is sigma_i, from
their IQR).  Healthy stations differ by a calibration spread tau.  Against the other healthy stations of
its group (leave-one-out: a faulty station never widens its own yardstick; "healthy" = within 4 SD of
the group's centre, found iteratively from the median and MAD), m_i - mean is compared with sqrt(tau^2 + se_i^2 + var(mean)), where tau^2 is the
inliers' variance (corrected for the truncation) minus their mean se^2, floored at ``tau_floor``.
With tau estimated from k stations the ratio follows Student's t with k - 1 degrees of freedom; the
threshold is the t quantile at ``alpha / number of tests`` (Bonferroni: ``alpha`` bounds the expected
number of healthy stations flagged in one run).

**Change** (did this scanner change during the record?).  From the daily medians of the stratum-adjusted
parameter, with variance (1.2533 sigma_i)^2 / n_day + sigma_day^2 (sigma_day: the fleet's day-to-day
extra spread, estimated from successive days so that a step does not inflate it), every split day gives
a two-sample z of the weighted means after and before; the largest |z| is the change point.  Its
p-value is Bonferroni-corrected over the splits, stations and parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

CUT = 4.0                # healthy peers: within 4 SD of their centre
TRUNCATION = 1 - 2 * CUT * float(sps.norm.pdf(CUT)) / (2 * float(sps.norm.cdf(CUT)) - 1)  # variance kept
MEDIAN_EFFICIENCY = 1.2533


@dataclass
class LevelTest:
    z: np.ndarray          # per station (NaN where not tested)
    p: np.ndarray          # two-sided p-value per test (not corrected)
    df: np.ndarray
    centre: np.ndarray     # the healthy peers' mean, per station
    tau: np.ndarray        # the healthy calibration spread, per station
    se_centre: np.ndarray


def level_test(m: np.ndarray, se: np.ndarray, groups: np.ndarray, tau_floor: float,
               suspect: np.ndarray | None = None) -> LevelTest:
    """``suspect`` stations (say, ones that changed during the record) are tested but never serve as
    anybody's healthy peers."""
    n = m.size
    out = LevelTest(*(np.full(n, np.nan) for _ in range(6)))
    for g in np.unique(groups[groups >= 0]):
        idx = np.flatnonzero((groups == g) & np.isfinite(m) & np.isfinite(se))
        if idx.size < 4:
            continue
        mg, sg = m[idx], se[idx]
        inl = _healthy(mg, tau_floor)
        if suspect is not None:
            inl &= ~suspect[idx]
        k = int(inl.sum())
        s1, s2, sse = mg[inl].sum(), (mg[inl] ** 2).sum(), (sg[inl] ** 2).sum()
        ki = np.where(inl, k - 1, k).astype(float)
        s1i = s1 - np.where(inl, mg, 0.0)
        s2i = s2 - np.where(inl, mg ** 2, 0.0)
        ssei = sse - np.where(inl, sg ** 2, 0.0)
        ok = ki >= 3
        with np.errstate(all="ignore"):
            mean = s1i / ki
            var = np.maximum(s2i - ki * mean ** 2, 0.0) / (ki - 1) / TRUNCATION
            tau2 = np.maximum(var - ssei / ki, tau_floor ** 2)
            se_c2 = (tau2 + ssei / ki) / ki
            z = (mg - mean) / np.sqrt(tau2 + sg ** 2 + se_c2)
        df = ki - 1
        sel = idx[ok]
        out.z[sel] = z[ok]
        out.df[sel] = df[ok]
        out.p[sel] = 2 * sps.t.sf(np.abs(z[ok]), df[ok])
        out.centre[sel] = mean[ok]
        out.tau[sel] = np.sqrt(tau2[ok])
        out.se_centre[sel] = np.sqrt(se_c2[ok])
    return out


def _healthy(m: np.ndarray, floor: float, cut: float = CUT, rounds: int = 10) -> np.ndarray:
    """The stations within ``cut`` SD of the healthy centre: started from the median and MAD, then
    re-estimated from the stations kept (mean, SD corrected for the truncation) until stable.  The MAD
    of 20 to 30 stations alone is too noisy a yardstick, and a cut at 3 SD drops healthy tails and
    shrinks the spread: in simulated healthy fleets it flagged 25% more stations than alpha promises; at
    4 SD the rate is alpha's (tests/test_fleet_stats.py)."""
    c = float(np.median(m))
    sd = max(1.4826 * float(np.median(np.abs(m - c))), floor)
    inl = np.abs(m - c) <= cut * sd
    for _ in range(rounds):
        if inl.sum() < 3:
            break
        c = float(m[inl].mean())
        sd = max(float(np.sqrt(m[inl].var(ddof=1) / TRUNCATION)), floor)
        again = np.abs(m - c) <= cut * sd
        if np.array_equal(again, inl):
            break
        inl = again
    return inl


def t_critical(alpha_per_test: float, df: float) -> float:
    return float(sps.t.isf(alpha_per_test / 2, df))


def day_spread(daily: np.ndarray, daily_n: np.ndarray, sigma: np.ndarray, rows: np.ndarray) -> float:
    """The fleet's day-to-day extra variance of a parameter beyond what the image count explains, from
    successive observed days of the given stations: the sigma_day^2 for which the median of
    d^2 / (v_j + v_j+1 + 2 sigma_day^2) is the chi-square(1) median, 0.455.  A step between two days
    is one pair among many, so it barely moves the median."""
    ratios_d2: list[np.ndarray] = []
    ratios_v: list[np.ndarray] = []
    for i in rows:
        seen = np.flatnonzero(np.isfinite(daily[i]) & (daily_n[i] > 0))
        if seen.size < 3 or not np.isfinite(sigma[i]) or sigma[i] <= 0:
            continue
        vals = daily[i, seen]
        v = (MEDIAN_EFFICIENCY * sigma[i]) ** 2 / daily_n[i, seen]
        ratios_d2.append(np.diff(vals) ** 2)
        ratios_v.append(v[1:] + v[:-1])
    if not ratios_d2:
        return 0.0
    d2, v = np.concatenate(ratios_d2), np.concatenate(ratios_v)
    chi_median = 0.4549
    if np.median(d2 / v) <= chi_median:
        return 0.0
    lo, hi = 0.0, float(np.max(d2))
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.median(d2 / (v + 2 * mid)) > chi_median:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass
class ChangeTest:
    split: np.ndarray        # index of the last day before the change (-1: none tested)
    z: np.ndarray
    n_splits: np.ndarray     # splits tried (for the Bonferroni correction)
    before: np.ndarray       # weighted mean level before and after the change
    after: np.ndarray
    var_before: np.ndarray
    var_after: np.ndarray


def change_points(daily: np.ndarray, daily_n: np.ndarray, sigma: np.ndarray, sigma_day2: float,
                  min_days: int = 2, min_rows: int = 10) -> ChangeTest:
    """The most likely single change point of each station's daily series, vectorised over stations."""
    n_st, n_days = daily.shape
    seen = np.isfinite(daily) & (daily_n > 0) & np.isfinite(sigma)[:, None] & (sigma[:, None] > 0)
    with np.errstate(all="ignore"):
        v = (MEDIAN_EFFICIENCY * sigma[:, None]) ** 2 / np.where(seen, daily_n, 1) + sigma_day2
        w = np.where(seen, 1.0 / v, 0.0)
    wm = np.where(seen, w * np.nan_to_num(daily), 0.0)
    cw, cwm = np.cumsum(w, axis=1), np.cumsum(wm, axis=1)
    cdays, crows = np.cumsum(seen, axis=1), np.cumsum(np.where(seen, daily_n, 0), axis=1)
    tw, twm, tdays, trows = cw[:, -1:], cwm[:, -1:], cdays[:, -1:], crows[:, -1:]
    with np.errstate(all="ignore"):
        wb, wa = cw, tw - cw
        mb, ma = cwm / wb, (twm - cwm) / wa
        z = (ma - mb) / np.sqrt(1 / wb + 1 / wa)
    valid = ((cdays >= min_days) & (tdays - cdays >= min_days) & (crows >= min_rows) & (trows - crows >= min_rows)
             & seen)  # a split right after an observed day: each split counted once
    z = np.where(valid, z, 0.0)
    split = np.argmax(np.abs(z), axis=1)
    rows = np.arange(n_st)
    none = ~valid.any(axis=1)
    with np.errstate(all="ignore"):  # stations without a valid split: NaN
        return ChangeTest(np.where(none, -1, split), np.where(none, np.nan, z[rows, split]), valid.sum(axis=1),
                          mb[rows, split], ma[rows, split], 1 / wb[rows, split], 1 / wa[rows, split])


def normal_p(z: np.ndarray) -> np.ndarray:
    return np.asarray(2 * sps.norm.sf(np.abs(z)))


def normal_critical(alpha_per_test: float) -> float:
    """The two-sided normal threshold at ``alpha_per_test``."""
    return float(sps.norm.isf(alpha_per_test / 2))
