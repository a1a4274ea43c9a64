"""Fleet QC: a synthetic fleet with known faults (recall, precision, the dense-population truck, drift),
the DuckDB out-of-core path, the CLI outputs, features made by the real triage stage, and shipping."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_config
from fleet_synth import make_fleet, write_parquet
from medsendx_edge.config import DestinationConfig, FleetConfig, replace
from medsendx_edge.daemon import Daemon
from medsendx_edge.triage.features import write_rows
from medsendx_edge.vocabulary import FEATURE_COLUMNS
from medsendx_edge.fleet.miner import Settings, aggregate_duckdb, expand_inputs, group_quantiles, mine
from medsendx_edge.spool import ANONYMIZED, Spool
from medsendx_edge.stage import Runner
from medsendx_edge.synthetic import synthetic_mammogram
from medsendx_edge.triage.stage import TriageStage


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


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_faulty_scanners_found_and_the_dense_population_left_alone(tmp_path, seed):
    fleet = make_fleet(n_stations=40, images_per_station=250, seed=seed, n_faulty=4, fault_size=0.8, n_dense=1,
                       n_drift=1)
    write_parquet(fleet, tmp_path, split=3)
    res = mine([tmp_path])
    flagged = set(res.flagged)
    faulty = fleet.faulty | fleet.drifting
    recall = len(flagged & faulty) / len(faulty)
    precision = len(flagged & faulty) / max(1, len(flagged))
    assert recall == 1.0 and precision >= 0.9, (sorted(flagged), sorted(faulty))
    (dense,) = fleet.dense_population
    st = res.report["stations"][dense]
    assert not st["flagged"]
    fleet_pd = np.median([s["medians"]["pd"] for s in res.report["stations"].values()])
    assert st["medians"]["pd"] > fleet_pd + 0.2  # a much denser population, yet not flagged


def test_drift_is_dated(tmp_path):
    fleet = make_fleet(n_stations=30, images_per_station=300, seed=9, n_faulty=0, n_dense=0, n_drift=1,
                       drift_days=4, days=28)
    write_parquet(fleet, tmp_path)
    res = mine([tmp_path])
    (drifter,) = fleet.drifting
    assert res.flagged == [drifter]
    st = res.report["stations"][drifter]
    assert st["drift"] and all(d["since"] == "2026-10-25" for d in st["drift"][:1])
    assert any("drifted" in r and "since 2026-10-25" in r for r in st["reasons"])


def test_duckdb_out_of_core_engine_agrees(tmp_path):
    fleet = make_fleet(n_stations=20, images_per_station=150, seed=3, n_faulty=2, n_drift=1)
    write_parquet(fleet, tmp_path / "pq", split=4)
    a = mine([tmp_path / "pq"], engine="numpy")
    b = mine([tmp_path / "pq"], engine="duckdb")
    assert set(a.flagged) == set(b.flagged) == (fleet.faulty | fleet.drifting)
    for name, st in a.report["stations"].items():
        other = b.report["stations"][name]
        assert other["n_images"] == st["n_images"]
        for f, v in st["medians"].items():
            assert v == pytest.approx(other["medians"][f], rel=1e-6, abs=1e-9)
    agg = aggregate_duckdb(expand_inputs([tmp_path / "pq"]))
    assert agg.counts.sum() == 20 * 150


def test_mine_cli_outputs_csv_and_parquet_inputs(tmp_path):
    fleet = make_fleet(n_stations=25, images_per_station=120, seed=5, n_faulty=2, n_drift=0)
    files = write_parquet(fleet, tmp_path / "in", split=2)
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    pacsv.write_csv(pq.read_table(files[1]), tmp_path / "in" / "truck_b.csv")
    files[1].unlink()
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "medsendx_edge.cli", "mine", str(tmp_path / "in"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert set(report["flagged_stations"]) == fleet.faulty
    for name in fleet.faulty:
        st = report["stations"][name]
        assert st["flagged"] and st["score"] >= 5 and st["reasons"]
        assert name in proc.stdout
    assert len((out / "stations.csv").read_text().strip().splitlines()) == 26
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    bad = subprocess.run([sys.executable, "-m", "medsendx_edge.cli", "mine", str(tmp_path / "nope"), "--out",
                          str(out)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no such feature file" in bad.stderr


def test_mines_features_made_by_the_real_triage_stage(tmp_path):
    """Six trucks' images through the triage stage; one scanner renders with a 30% higher gain."""
    out = tmp_path / "fleet"
    rng = np.random.default_rng(0)
    for s in range(6):
        name = f"TRUCK_{s}"
        cfg = replace(make_config(tmp_path / name), station_name=name)
        spool = Spool(cfg.spool_dir)
        spool.ensure_layout()
        for i in range(6):
            ds, _ = synthetic_mammogram(256, 208, seed=100 * s + i, density=float(rng.uniform(0.1, 0.6)),
                                        gain=1.3 if s == 4 else 1.0 + float(rng.normal(0, 0.005)),
                                        view="MLO" if i % 2 else "CC", pixel_spacing_mm=0.5)  # a 13 cm field
            ds.save_as(spool.path(ANONYMIZED, f"{s:012x}{i:012x}"), enforce_file_format=True)
        stage = TriageStage(spool, cfg)
        Runner(stage).drain()
        rows = stage.features.rows()
        assert len(rows) == 6 and {r["station_name"] for r in rows} == {name}
        write_rows(rows, out / f"{name}.parquet")
    res = mine([out], settings=Settings(min_images=5))
    assert res.flagged == ["TRUCK_4"]
    reasons = " ".join(res.report["stations"]["TRUCK_4"]["reasons"])
    assert "fat_c +" in reasons or "dense_c +" in reasons


def test_daemon_ships_feature_rows_without_patient_data(tmp_path):
    cfg = make_config(tmp_path)
    cfg = replace(cfg, fleet=FleetConfig(enabled=True, interval_s=3600, format="parquet",
                                         destination=DestinationConfig(kind="directory", path=tmp_path / "fleet")))
    cfg.inbox.mkdir(parents=True)
    for i in range(3):
        synthetic_mammogram(128, 104, seed=i, patient_name="DOE^JANE", patient_id=f"PID-{i}")[0].save_as(
            cfg.inbox / f"m{i}.dcm", enforce_file_format=True)
        os.utime(cfg.inbox / f"m{i}.dcm", (0, 0))
    d = Daemon(cfg)
    assert d.run_once() == 0
    shipped = list((tmp_path / "fleet").glob("*.parquet"))
    assert len(shipped) == 1
    import pyarrow.parquet as pq

    t = pq.read_table(shipped[0])
    assert t.num_rows == 3 and t.column_names == ["id", "recorded", *FEATURE_COLUMNS]
    raw = shipped[0].read_bytes()
    assert b"DOE" not in raw and b"PID-" not in raw
    assert d.ship_features() == 0  # nothing new since the last shipment
    # export-features on demand
    conf = tmp_path / "c.yaml"
    import yaml

    conf.write_text(yaml.safe_dump({"spool_dir": str(cfg.spool_dir)}))
    for ext in ("parquet", "csv"):
        p = subprocess.run([sys.executable, "-m", "medsendx_edge.cli", "export-features", "--out",
                            str(tmp_path / f"x.{ext}"), "--config", str(conf)], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0 and "3 feature row(s)" in p.stdout
    assert mine([tmp_path / "x.csv"], settings=Settings(min_images=1)).report["n_images"] == 3


def test_a_reshipped_file_counts_once(tmp_path):
    """A crash between queueing a features file and recording it ships the same rows twice."""
    import pyarrow.parquet as pq

    fleet = make_fleet(n_stations=12, images_per_station=60, seed=2, n_faulty=1, n_drift=0, n_dense=0)
    n = len(fleet.rows["station_name"])
    fleet.rows["id"] = np.array([f"{i:024x}" for i in range(n)], dtype=object)
    (f,) = write_parquet(fleet, tmp_path / "in")
    pq.write_table(pq.read_table(f), tmp_path / "in" / "again.parquet")
    for engine in ("numpy", "duckdb"):
        res = mine([tmp_path / "in"], engine=engine)
        assert res.report["n_images"] == n and res.flagged == sorted(fleet.faulty)
