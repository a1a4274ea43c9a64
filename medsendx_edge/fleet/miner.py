"""Fleet QC miner: which truck's scanner is drifting or broken, from the per-image feature rows.

Separating the scanner from the patients and from what was imaged (docs/fleet.md has the numbers):

1. Each image gives four QC parameters that track parts of the scanner (``gain``, ``offset``,
   ``contrast`` per unit of signal, ``noise`` per unit of signal; :mod:`medsendx_edge.fleet.data`), taken
   relative to the fleet's reference for the same view, thickness band, kV and target/filter.  Percent
   density and the other population features are reported, never scored: a truck whose patients are
   denser or thicker is not a broken scanner.
2. Per station and parameter: the median (its level) and its standard error from the images' spread and
   count; per day: the daily medians.
3. **Change**: the most likely change point in each station's daily series (:func:`stats.change_points`).
   A significant change makes the level *after* it the station's current level, and a change away from
   the fleet is a finding dated by its first day.
4. Stations are grouped by K-Means on their standardised levels (k = 1..4, kept only with a clear
   structure), so scanner types with different calibrations are compared with their peers.
5. **Level**: each station's current level against its group's healthy peers, with a threshold from the
   healthy spread between stations and the station's own standard error (:func:`stats.level_test`).
6. Every finding says which parameter moved, by how much against the fleet with a 95% interval, since
   when, and the likely cause in plain words.

``alpha`` bounds the expected number of healthy stations flagged per run, for each of the two tests.
"""

from __future__ import annotations

import datetime as dt
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from medsendx_edge.fleet import stats
from medsendx_edge.fleet.data import (CALIBRATION, FACTOR_NAMES, PARAMETERS, POPULATION, Aggregates, Strata,
                                      aggregate_duckdb, aggregate_numpy, expand_inputs)

EPOCH = dt.date(1970, 1, 1)
Z95 = 1.959964

#: what a moved parameter means, in the fleet manager's words: (when it went up, when it went down)
CAUSES = {
    "gain": ("gain/calibration: higher pixel values for the same tissue; check the detector's gain (flat-field) "
             "calibration and the AEC",
             "gain/calibration: lower pixel values for the same tissue; check the detector's gain (flat-field) "
             "calibration and the AEC"),
    "offset": ("offset/calibration: the dark level rose; check the detector's offset (dark) calibration and the "
               "image-processing settings",
               "offset/calibration: the dark level fell; check the detector's offset (dark) calibration and the "
               "image-processing settings"),
    "contrast": ("contrast/beam quality: more contrast between fat and gland at the same kV, filter and thickness "
                 "(a softer beam); check kV accuracy and the filter",
                 "contrast/beam quality: less contrast between fat and gland at the same kV, filter and thickness "
                 "(a harder beam); check kV accuracy, the filter and the tube output (half-value layer)"),
    "noise": ("noise/detector: more noise for the same signal; check the dose the AEC gives and the detector "
              "(ageing, defective lines)",
              "noise/detector: less noise for the same signal, likely more dose than its peers; check the AEC dose"),
}


def cause(p: str, shift: float) -> str:
    return CAUSES[p][0 if shift >= 0 else 1]


LABELS = {"gain": "gain", "offset": "offset (dark level, % of the signal)", "contrast": "contrast per signal",
          "noise": "noise per signal"}


@dataclass
class Settings:
    alpha: float = 0.1             # expected healthy stations flagged per run, per test
    tau_floor: float = 0.005       # the healthy spread between stations is at least 0.5%
    min_shift: float = 0.03        # a change must move a parameter by at least 3%
    min_images: int = 20
    max_groups: int = 4
    strata: Strata = field(default_factory=Strata)


def _pct(p: str, x: Any) -> Any:
    """A parameter difference in percent: relative for the log parameters, of the signal for the offset."""
    return 100 * np.asarray(x) if p == "offset" else 100 * np.expm1(np.asarray(x))


def _day_str(day: float | None) -> str | None:
    if day is None or not np.isfinite(day):
        return None
    return (EPOCH + dt.timedelta(days=int(day))).isoformat()


def _kmeans_groups(X: np.ndarray, max_k: int, min_size: int, seed: int = 0) -> np.ndarray:
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = X.shape[0]
    best_k, best_labels, best_s = 1, np.zeros(n, dtype=int), 0.5  # k > 1 only with a clear structure
    for k in range(2, min(max_k, n - 1) + 1):
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(X)
        big = [c for c in range(k) if (labels == c).sum() >= min_size]
        if len(big) < 2:
            continue
        s = silhouette_score(X, labels)
        if s > best_s:
            best_k, best_labels, best_s = k, labels, s
    if best_k == 1:
        return best_labels
    sizes = np.bincount(best_labels, minlength=best_k)
    big = [c for c in range(best_k) if sizes[c] >= min_size]
    centres = np.array([np.median(X[best_labels == c], axis=0) for c in big])
    return np.asarray(np.argmin(((X[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2), axis=1), dtype=int)


def _station_groups(levels: np.ndarray, usable: np.ndarray, s: Settings) -> np.ndarray:
    """Each usable station's group (scanner types that cluster apart); -1 when not scored.  A group must
    be large (a fifth of the fleet, at least 5): a handful of broken scanners that look alike must not
    become a "normal" of their own."""
    groups = np.full(len(levels), -1)
    if not usable.any():
        return groups
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(levels[usable], axis=0)
        mad = 1.4826 * np.nanmedian(np.abs(levels[usable] - med), axis=0)
    scale = np.maximum(np.nan_to_num(mad), s.tau_floor)
    standardized = np.nan_to_num((levels - med) / scale)
    min_group = max(5, int(np.ceil(0.2 * usable.sum())))
    if usable.sum() >= 2 * min_group:
        groups[usable] = _kmeans_groups(standardized[usable], s.max_groups, min_group)
    else:
        groups[usable] = 0
    return groups


@dataclass
class MineResult:
    report: dict[str, Any]
    agg: Aggregates
    groups: np.ndarray
    flagged: list[str]
    shift: dict[str, np.ndarray] = field(default_factory=dict)      # % vs the fleet, current level
    interval: dict[str, np.ndarray] = field(default_factory=dict)   # (2, n_st) 95% interval of the shift
    band: dict[str, np.ndarray] = field(default_factory=dict)       # healthy half-width (%) per station
    change_day: dict[str, np.ndarray] = field(default_factory=dict)  # significant change: first day after
    centre: dict[str, np.ndarray] = field(default_factory=dict)     # the peers' level (residual units)
    z: dict[str, np.ndarray] = field(default_factory=dict)


def _likely_cause(moved: dict[str, float], leaning: dict[str, float]) -> str:
    """One sentence from the parameters that moved (flagged, strongest last) and those that lean the same
    way (|z| >= 2: not enough alone, but telling beside a flagged one)."""
    both = {**leaning, **moved}
    if moved.get("gain", 0) < 0 and both.get("noise", 0) > 0 or moved.get("noise", 0) > 0 and both.get("gain", 0) < 0:
        return ("likely detector ageing: less signal and more noise for the same exposure; plan detector "
                "service and check the dose")
    if moved.get("contrast", 0) < 0 and (both.get("noise", 0) > 0 or "offset" in both):
        return ("likely beam quality (kV or filter) drift: less contrast with more noise or a moved dark level; "
                "check kV accuracy, the filter and the half-value layer")
    first = list(moved)[-1]  # the strongest finding
    return cause(first, moved[first])


def _sigma(agg: Aggregates, p: str) -> np.ndarray:
    q1, _, q3 = agg.level[p]
    return np.asarray((q3 - q1) / 1.349)


def _changes(agg: Aggregates, usable: np.ndarray, alpha_test: float, s: Settings) -> tuple[
        dict[str, np.ndarray], dict[str, np.ndarray], dict[str, stats.ChangeTest], dict[str, np.ndarray],
        dict[str, np.ndarray]]:
    """Per parameter: each station's current level and its standard error (after a significant change,
    the level since), the change test, its corrected p-values (NaN: no significant change) and the
    first day after the change."""
    n_st = len(agg.names)
    level_now: dict[str, np.ndarray] = {}
    se_now: dict[str, np.ndarray] = {}
    change: dict[str, stats.ChangeTest] = {}
    change_p: dict[str, np.ndarray] = {}
    change_day: dict[str, np.ndarray] = {}
    for p in PARAMETERS:
        sigma = _sigma(agg, p)
        with np.errstate(all="ignore"):
            se = stats.MEDIAN_EFFICIENCY * sigma / np.sqrt(agg.n[p])
        m = agg.level[p][1].copy()
        day = np.full(n_st, np.nan)
        if agg.days.size >= 4:
            sd2 = stats.day_spread(agg.daily[p], agg.daily_n[p], sigma, np.flatnonzero(usable))
            ct = stats.change_points(agg.daily[p], agg.daily_n[p], sigma, sd2)
            padj = np.minimum(1.0, stats.normal_p(ct.z) * np.maximum(ct.n_splits, 1))
            sig = usable & (ct.split >= 0) & (padj < alpha_test) & (np.abs(ct.after - ct.before) >= s.min_shift)
            m = np.where(sig, ct.after, m)
            se = np.where(sig, np.sqrt(ct.var_after), se)
            for k in np.flatnonzero(sig):
                later = np.flatnonzero(np.isfinite(agg.daily[p][k]) & (np.arange(agg.days.size) > ct.split[k]))
                day[k] = agg.days[later[0]]
            change[p], change_p[p] = ct, np.where(sig, padj, np.nan)
        level_now[p], se_now[p], change_day[p] = m, se, day
    return level_now, se_now, change, change_p, change_day


def score(agg: Aggregates, s: Settings | None = None) -> MineResult:
    """Flag the stations whose scanner stands out from its healthy peers now, or changed away from the
    fleet during the record, on the QC parameters only."""
    s = s or Settings()
    n_st = len(agg.names)
    usable = (agg.counts >= s.min_images) & (agg.n["gain"] >= s.min_images)
    n_tests = max(1, int(usable.sum()) * len(PARAMETERS))
    alpha_test = s.alpha / n_tests
    level_now, se_now, change, change_p, change_day = _changes(agg, usable, alpha_test, s)
    levels = np.column_stack([level_now[p] for p in PARAMETERS])
    groups = _station_groups(levels, usable, s)
    changed = np.zeros(n_st, dtype=bool)  # a station that changed is no one's healthy peer
    for p in PARAMETERS:
        changed |= np.isfinite(change_day[p])
    tests = {p: stats.level_test(level_now[p], np.where(usable, se_now[p], np.nan),
                                 np.where(usable, groups, -1), s.tau_floor, changed) for p in PARAMETERS}
    res = MineResult({}, agg, groups, [], change_day=change_day)
    stations: dict[str, Any] = {}
    detectable: dict[str, Any] = {}
    for p in PARAMETERS:
        t = tests[p]
        shift = level_now[p] - t.centre
        half = Z95 * np.sqrt(se_now[p] ** 2 + t.se_centre ** 2)
        crit = np.array([stats.t_critical(alpha_test, d) if np.isfinite(d) else np.nan for d in t.df])
        res.shift[p] = _pct(p, shift)
        res.interval[p] = np.vstack([_pct(p, shift - half), _pct(p, shift + half)])
        se_typical = np.nanmedian(se_now[p][usable]) if np.isfinite(se_now[p][usable]).any() else 0.0
        band = crit * np.sqrt(t.tau ** 2 + se_typical ** 2)
        res.band[p] = np.abs(_pct(p, band))
        res.centre[p] = t.centre
        res.z[p] = t.z
        detectable[p] = _detectable(p, t, crit, se_now[p], usable, change.get(p), s.alpha)
    for i, name in enumerate(agg.names):
        stations[name] = _station_entry(i, name, agg, res, tests, change, change_p, usable, alpha_test, s)
        if stations[name]["flagged"]:
            res.flagged.append(name)
    res.flagged.sort(key=lambda n: -stations[n]["score"])
    compared = sum(np.isfinite(tests["gain"].z))
    res.report = {
        "flagged_stations": res.flagged,
        "note": (None if compared >= 5 else
                 f"only {compared} station(s) could be compared with peers (at least 5 with {s.min_images} usable "
                 "images are needed): no station is judged against its peers; changes over time are still tested"),
        "stations": stations,
        "n_images": int(agg.counts.sum()), "n_stations": n_st,
        "left_out": {k: int(v.sum()) for k, v in agg.left_out.items()},
        "compared_within": {k: v for k, v in agg.strata_used.items()},
        "groups": {str(g): int((groups == g).sum()) for g in np.unique(groups[groups >= 0])},
        "detectable_shift_pct": detectable,
        "method": {"parameters": list(PARAMETERS), "population_features_not_scored": list(POPULATION),
                   "alpha": s.alpha, "tests_per_run": n_tests, "alpha_per_test": alpha_test,
                   "tau_floor": s.tau_floor, "min_shift": s.min_shift, "min_images": s.min_images,
                   "adjusted_for": list(FACTOR_NAMES.values()), "thickness_band_mm": s.strata.band_mm,
                   "min_stations_per_level": s.strata.min_stations},
    }
    return res


def _detectable(p: str, t: stats.LevelTest, crit: np.ndarray, se: np.ndarray, usable: np.ndarray,
                ct: stats.ChangeTest | None, alpha: float) -> dict[str, float | None]:
    """The smallest shift this fleet can flag with 90% power: against the peers (limited by the healthy
    spread between stations) and within one station over time, at its most likely change day (limited
    by its images per day)."""
    z90 = 1.2816
    ok = usable & np.isfinite(t.tau) & np.isfinite(crit)
    level = (float(np.median((crit[ok] + z90) * np.sqrt(t.tau[ok] ** 2 + se[ok] ** 2))) if ok.any() else None)
    change = None
    if ct is not None:
        sd = np.sqrt(ct.var_before + ct.var_after)
        okc = usable & np.isfinite(sd) & (ct.n_splits > 0)
        if okc.any():
            tests = max(1, int(okc.sum())) * len(PARAMETERS) * float(np.median(ct.n_splits[okc]))
            zc = float(stats.normal_critical(alpha / tests))
            change = float(np.median((zc + z90) * sd[okc]))
    return {"against_peers": _round(abs(float(_pct(p, level))) if level is not None else None),
            "over_time": _round(abs(float(_pct(p, change))) if change is not None else None)}


def _station_entry(i: int, name: str, agg: Aggregates, res: MineResult, tests: dict[str, stats.LevelTest],
                   change: dict[str, stats.ChangeTest], change_p: dict[str, np.ndarray], usable: np.ndarray,
                   alpha_test: float, s: Settings) -> dict[str, Any]:
    findings: list[dict[str, Any]] = []
    params: dict[str, Any] = {}
    first = _day_str(agg.first_day[i])
    for p in PARAMETERS:
        t = tests[p]
        z = t.z[i]
        p_adj = min(1.0, float(t.p[i]) * s.alpha / alpha_test) if np.isfinite(t.p[i]) else None
        since = _day_str(res.change_day[p][i])
        shift_i = res.shift[p][i]
        params[p] = {"shift_pct": _round(res.shift[p][i]), "interval_pct": [_round(x) for x in res.interval[p][:, i]],
                     "z": _round(z, 2), "healthy_band_pct": _round(res.band[p][i]), "n_images": int(agg.n[p][i]),
                     "changed_since": since}
        if not usable[i]:
            continue
        if p_adj is not None and p_adj < s.alpha:
            findings.append({"parameter": p, "test": "level", "shift_pct": params[p]["shift_pct"],
                             "interval_pct": params[p]["interval_pct"], "z": _round(z, 1),
                             "p_adjusted": float(f"{p_adj:.3g}"), "healthy_band_pct": params[p]["healthy_band_pct"],
                             "since": since, "cause": cause(p, float(shift_i))})
        if p in change and np.isfinite(change_p[p][i]):
            ct = change[p]
            centre = t.centre[i]
            # a repair or recalibration brings a deviating station back: at least halfway to its peers
            repaired = np.isfinite(centre) and abs(ct.after[i] - centre) < 0.5 * abs(ct.before[i] - centre)
            away = not repaired
            step = ct.after[i] - ct.before[i]
            half = Z95 * np.sqrt(ct.var_after[i] + ct.var_before[i])
            entry = {"parameter": p, "test": "change", "shift_pct": _round(_pct(p, step)),
                     "interval_pct": [_round(_pct(p, step - half)), _round(_pct(p, step + half))],
                     "z": _round(ct.z[i], 1), "p_adjusted": float(f"{change_p[p][i]:.3g}"), "since": since,
                     "away_from_fleet": bool(away), "cause": cause(p, float(step))}
            if away:
                findings.append(entry)
            else:
                params[p]["repaired"] = entry
    for f in findings:
        f["severity"] = severity(f, params[f["parameter"]]["healthy_band_pct"])
    moved = {f["parameter"]: f["shift_pct"] for f in sorted(findings, key=lambda f: abs(f["z"] or 0))}
    leaning = {p: q["shift_pct"] for p, q in params.items() if q["z"] is not None and abs(q["z"]) >= 2}
    flagged = bool(findings)
    return {
        "flagged": flagged,
        "severity": max((f["severity"] for f in findings), key=SEVERITIES.index) if findings else None,
        "score": round(max([abs(f["z"] or 0.0) for f in findings] or [0.0]), 2),
        "likely_cause": _likely_cause(moved, leaning) if flagged else None,
        "reasons": [_reason(f, first) for f in findings],
        "findings": findings,
        "parameters": params,
        "group": int(res.groups[i]), "n_images": int(agg.counts[i]),
        "left_out": {k: int(v[i]) for k, v in agg.left_out.items()},
        "model": agg.models.get(name, ""),
        "first_date": first, "last_date": _day_str(agg.last_day[i]),
        "medians": {f: _round(agg.medians[f][i], 3) for f in (*CALIBRATION, *POPULATION)},
        "note": _note(i, agg, usable, tests, s),
    }


def _note(i: int, agg: Aggregates, usable: np.ndarray, tests: dict[str, stats.LevelTest],
          s: Settings) -> str | None:
    """Why a station is not (fully) judged: "not applicable" in words, never a confident number."""
    if usable[i]:
        if not any(np.isfinite(tests[p].z[i]) for p in PARAMETERS):
            return ("too few comparable stations with enough images (at least 5 are needed): not compared with "
                    "peers; only changes over time are tested")
        return None
    if agg.counts[i] == 0 and agg.left_out["for_processing"][i]:
        return "only FOR PROCESSING images: not scored (the miner compares FOR PRESENTATION images)"
    if agg.counts[i] >= s.min_images:
        return ("too few images with a measurable signal (fat brighter than the background, noise measured): "
                "not scored; inverted or raw images?")
    return f"fewer than {s.min_images} usable images: not scored"


#: How far a finding is outside what healthy stations do: its shift against the healthy band of the
#: parameter (healthy stations lie within the band): within 1.5 bands "low" (watch it), within 3
#: "medium" (plan a service visit), beyond "high" (check the unit before the next woman: a gain or a
#: noise that far off means an image quality or dose problem now).
SEVERITIES = ("low", "medium", "high")


def severity(finding: dict[str, Any], band_pct: float | None) -> str:
    shift = abs(finding.get("shift_pct") or 0.0)
    band = max(abs(band_pct or 0.0), 0.1)
    ratio = shift / band
    return "high" if ratio >= 3.0 else "medium" if ratio >= 1.5 else "low"


def _finding_key(station: str, f: dict[str, Any]) -> str:
    return f"{station}|{f['parameter']}|{f['test']}"


def compare_with(report: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """Mark what is new since the previous report (each finding's ``new``, the station's ``new``) and list
    what was flagged then and is not now (resolved).  No previous report: everything is new."""
    before = {_finding_key(name, f) for name, st in ((previous or {}).get("stations") or {}).items()
              for f in st.get("findings") or []}
    now: set[str] = set()
    new_findings = []
    for name, st in report["stations"].items():
        for f in st["findings"]:
            key = _finding_key(name, f)
            now.add(key)
            f["new"] = key not in before
            if f["new"]:
                new_findings.append(key)
        st["new"] = any(f["new"] for f in st["findings"])
    summary = {"previous_report": previous is not None, "new": sorted(new_findings),
               "resolved": sorted(before - now)}
    report["since_previous"] = summary
    return summary


def _round(x: Any, nd: int = 1) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), nd)


def _reason(f: dict[str, Any], first: str | None) -> str:
    lo, hi = f["interval_pct"]
    unit = "% of the signal" if f["parameter"] == "offset" else "%"
    if f["test"] == "level":
        when = f"since {f['since']}" if f["since"] else f"throughout the record (since before {first})"
        return (f"{f['parameter']} {f['shift_pct']:+.1f}{unit} against its peers (95% interval {lo:+.1f} to "
                f"{hi:+.1f}; healthy stations within ±{f['healthy_band_pct']:.1f}), {when}")
    return (f"{f['parameter']} changed {f['shift_pct']:+.1f}{unit} since {f['since']} (95% interval {lo:+.1f} to "
            f"{hi:+.1f}; z {f['z']:+.1f})")


def mine(inputs: Sequence[str | os.PathLike[str]], engine: str = "numpy",
         settings: Settings | None = None) -> MineResult:
    s = settings or Settings()
    files = expand_inputs(inputs)
    agg = aggregate_duckdb(files, s.strata) if engine == "duckdb" else aggregate_numpy(files, s.strata)
    return score(agg, s)
