"""The fleet miner's data: vectorised group quantiles, the additive like-with-like model (factor effects
learnt within stations, sparse levels borrowing from their neighbours), the rows left out, rows without
the newer columns, and the two engines (numpy, DuckDB) giving the same aggregates."""

from __future__ import annotations

import numpy as np
import pytest

from fleet_synth import make_fleet, write_parquet
from medsendx_edge.fleet.data import (FACTORS, PARAMETERS, Cells, Strata, aggregate_duckdb, aggregate_numpy,
                                      expand_inputs, fit_effects, group_quantiles)


def test_group_quantiles_match_numpy():
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 7, 5000)
    vals = rng.normal(size=5000)
    vals[::50] = np.nan
    q = group_quantiles(keys, vals, 8, (0.25, 0.5, 0.75))
    for g in range(7):
        v = vals[(keys == g) & ~np.isnan(vals)]
        assert np.allclose(q[:, g], np.quantile(v, [0.25, 0.5, 0.75]))
    assert np.isnan(q[:, 7]).all()


def _cells(rng, n_st=12, station_effect=None):
    """Every station x stratum x kV x filter cell, with known additive effects; station 0 sees only the
    thick strata (a population of its own) and has a large calibration offset."""
    strata = np.arange(6)
    kvs = np.arange(25, 31)
    tfs = np.arange(2)
    eff = {"stratum": rng.normal(0, 0.05, 6), "kv": -0.03 * (kvs - 28), "tf": np.array([0.0, -0.06])}
    st_eff = station_effect if station_effect is not None else rng.normal(0, 0.02, n_st)
    rows = []
    for s in range(n_st):
        for a in (strata[3:] if s == 0 else strata):
            for b, kv in enumerate(kvs):
                for c in tfs:
                    y = st_eff[s] + eff["stratum"][a] + eff["kv"][b] + eff["tf"][c]
                    rows.append((s, a, kv, c, int(rng.integers(3, 30)), y))
    r = np.array(rows, dtype=float)
    codes = {"stratum": r[:, 1].astype(int), "kv": r[:, 2].astype(int), "tf": r[:, 3].astype(int)}
    count = {p: r[:, 4].astype(int) for p in PARAMETERS}
    median = {p: r[:, 5] for p in PARAMETERS}
    family = {"stratum": np.zeros(len(r)), "kv": np.zeros(len(r))}
    order = {"stratum": r[:, 1].astype(float), "kv": r[:, 2].astype(float)}
    return Cells(r[:, 0].astype(int), codes, count, median, family, order), eff, st_eff


def test_the_additive_model_learns_effects_within_stations():
    cells, truth, st_eff = _cells(np.random.default_rng(3))
    effects, used = fit_effects(cells, 12, Strata(min_stations=3, min_rows=10))
    fitted = {f: effects["gain"][f] for f in FACTORS}
    for f in FACTORS:  # effects are zero-mean over the images: compare differences between levels
        assert np.allclose(np.diff(fitted[f]), np.diff(truth[f]), atol=1e-9), f
    # station 0 (thick women only, offset calibration) leaves its own level in the residual, whole
    adj = sum(fitted[f][np.unique(cells.codes[f], return_inverse=True)[1]] for f in FACTORS)
    resid = cells.median["gain"] - adj
    per_station = [np.average(resid[cells.station == s], weights=cells.count["gain"][cells.station == s])
                   for s in range(12)]
    assert np.allclose(np.array(per_station) - per_station[1], st_eff - st_eff[1], atol=1e-9)
    assert used["all images"] == cells.count["gain"].sum()


def test_a_level_seen_at_too_few_stations_borrows_its_neighbours_effect():
    cells, truth, _ = _cells(np.random.default_rng(4))
    # stratum 5 (the thickest band) seen at only two stations: too few for an effect of its own
    few = (cells.codes["stratum"] == 5) & (cells.station > 1)
    keep = ~few
    sub = Cells(cells.station[keep], {f: c[keep] for f, c in cells.codes.items()},
                {p: c[keep] for p, c in cells.count.items()}, {p: c[keep] for p, c in cells.median.items()},
                {f: c[keep] for f, c in cells.family.items()}, {f: c[keep] for f, c in cells.order.items()})
    effects, _ = fit_effects(sub, 12, Strata(min_stations=5, min_rows=10))
    assert effects["gain"]["stratum"][5] == effects["gain"]["stratum"][4]  # the next band's effect, not 0


def test_rows_left_out_and_rows_without_the_newer_columns(tmp_path):
    fleet = make_fleet(n_stations=12, images_per_station=150, seed=4, n_faulty=0, n_dense=0, n_drift=0,
                       n_processing=1, n_legacy=1)
    write_parquet(fleet, tmp_path)
    agg = aggregate_numpy(expand_inputs([tmp_path]))
    (proc,) = [i for i, n in enumerate(agg.names) if agg.left_out["for_processing"][i]]
    assert agg.left_out["for_processing"][proc] == 50
    presented = fleet.rows["presentation_intent"] != "FOR PROCESSING"  # a processing copy counts as that
    implants = int(np.nansum(fleet.rows["implant"][presented]))
    assert agg.left_out["implant"].sum() == implants
    assert agg.counts.sum() == 12 * 150 - implants
    (legacy,) = fleet.legacy
    i = agg.names.index(legacy)
    assert agg.counts[i] == 150 and np.isfinite(agg.level["gain"][1, i])  # kept, compared with the average image
    assert agg.strata_used["view and thickness band"] == agg.strata_used["all images"] - 150


def test_both_engines_give_the_same_aggregates_with_nan_and_infinity(tmp_path):
    fleet = make_fleet(n_stations=15, images_per_station=120, seed=6, n_faulty=2, n_drift=1, n_thick=1,
                       n_processing=1, n_legacy=1)
    fleet.rows["fat_c"][::97] = np.inf
    fleet.rows["noise_bg"][::89] = np.nan
    fleet.rows["kvp"][::83] = np.nan
    write_parquet(fleet, tmp_path / "pq", split=3)
    files = expand_inputs([tmp_path / "pq"])
    a, b = aggregate_numpy(files), aggregate_duckdb(files)
    order = [b.names.index(n) for n in a.names]
    assert np.array_equal(a.counts, b.counts[order])
    for k in a.left_out:
        assert np.array_equal(a.left_out[k], b.left_out[k][order])
    for p in PARAMETERS:
        assert np.allclose(a.level[p], b.level[p][:, order], rtol=0, atol=1e-9, equal_nan=True), p
        assert np.array_equal(a.n[p], b.n[p][order])
        assert np.allclose(a.daily[p], b.daily[p][order], rtol=0, atol=1e-9, equal_nan=True), p
        assert np.array_equal(a.daily_n[p], b.daily_n[p][order])
    for f in a.box:
        assert np.allclose(a.box[f], b.box[f][:, order], rtol=1e-9, equal_nan=True), f
    assert a.strata_used == b.strata_used
    assert a.constants == pytest.approx(b.constants, rel=1e-12)
    assert np.array_equal(a.days, b.days)
