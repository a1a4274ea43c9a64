"""Dose QC (issue 27): an injected over-dose unit is flagged (against its peers at the same thickness and
over the EUREF acceptable levels), a truck whose women are thicker is not, files from before dose was
recorded are read as no dose, and the header's Organ Dose (dGy) becomes the feature row's mGy."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medsendx_edge.cli import main
from medsendx_edge.fleet import dose


def _unit(rng, station: str, n: int, thick_mean: float, factor: float, model: str = "Selenia Dimensions") -> dict:
    # patients' dose against thickness as AEC systems give it: a steep rise, log-normal scatter (Dance's
    # conversion factors fall with thickness while the exposure rises faster; the product rises ~2 %/mm)
    t = np.clip(rng.normal(thick_mean, 11.0, n), 18, 95)
    agd = 0.55 * np.exp(0.022 * t) * (1 + 0.002 * (t - 50) ** 2 / 50) * rng.lognormal(0, 0.14, n) * factor
    return {"station_name": [station] * n, "model": [model] * n, "thickness_mm": t.tolist(),
            "organ_dose_mgy": agd.tolist(), "acquired_date": ["20261201"] * n}


def _fleet(tmp_path, rng):
    units = [_unit(rng, f"TRUCK_{i:02d}", 300, 55.0, 1.0) for i in range(6)]
    units.append(_unit(rng, "TRUCK_OVER", 300, 55.0, 1.6))       # the unit that over-doses
    units.append(_unit(rng, "TRUCK_THICK", 300, 71.0, 1.0))      # healthy, its women thicker
    files = []
    for i, u in enumerate(units):
        path = tmp_path / f"u{i}.parquet"
        pq.write_table(pa.table(u), path)
        files.append(path)
    old = tmp_path / "old.parquet"   # a file from before dose was recorded
    pq.write_table(pa.table({"station_name": ["TRUCK_00"] * 5, "thickness_mm": [50.0] * 5}), old)
    return files + [old]


def test_an_over_dose_unit_is_flagged_and_thicker_women_are_not(tmp_path):
    rng = np.random.default_rng(7)
    files = _fleet(tmp_path, rng)
    data = dose.load(files)
    assert data["dose"].size == 8 * 300
    res = dose.dose_qc(data)
    assert res["flagged"] == ["TRUCK_OVER"], {u: e["findings"] for u, e in res["units"].items() if e["findings"]}
    over = res["units"]["TRUCK_OVER"]
    assert 45 <= over["dose_vs_peers_pct"] <= 75 and over["over_euref"]
    assert any("against its peers" in f for f in over["findings"]) and any("EUREF" in f for f in over["findings"])
    thick = res["units"]["TRUCK_THICK"]
    assert abs(thick["dose_vs_peers_pct"]) < 10 and not thick["over_euref"]
    # a plain median per unit, not conditioned on thickness, would have blamed the thicker truck's unit
    plain = {u: np.median(data["dose"][data["station"] == u]) for u in set(data["station"].tolist())}
    assert plain["TRUCK_THICK"] / np.median([plain[f"TRUCK_{i:02d}"] for i in range(6)]) > 1.3
    dose.plot(data, res, tmp_path / "dose.png")
    assert (tmp_path / "dose.png").stat().st_size > 10_000


def test_the_euref_table_interpolates_and_holds_at_its_ends():
    assert dose.euref_acceptable(21) == pytest.approx(1.0)
    assert dose.euref_acceptable(60) == pytest.approx(3.0)
    assert 2.0 < dose.euref_acceptable(50) < 2.5
    assert dose.euref_acceptable(10) == pytest.approx(1.0) and dose.euref_acceptable(120) == pytest.approx(6.5)


def test_mine_reports_dose_with_its_plot(tmp_path, capsys):
    rng = np.random.default_rng(11)
    (tmp_path / "in").mkdir()
    files = _fleet(tmp_path / "in", rng)
    assert main(["mine", *map(str, files), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["dose"]["flagged"] == ["TRUCK_OVER"]
    assert "dose: TRUCK_OVER" in capsys.readouterr().out
    html = (tmp_path / "out" / "report.html").read_text()
    assert "average glandular dose against thickness" in html and "data:image/png;base64" in html


def test_the_header_dose_becomes_the_feature_row(tmp_path):
    from medsendx_edge.triage.analysis import header_values
    from medsendx_edge.triage.phantom import phantom_dataset

    ds, _ = phantom_dataset(256, 208, spacing_mm=0.5, seed=1)
    ds.OrganDose = "0.0152"            # dGy
    ds.EntranceDoseInmGy = "5.3"
    ds.ExposureControlMode = "AUTOMATIC"
    row = header_values(ds, "T")
    assert row["organ_dose_mgy"] == pytest.approx(1.52) and row["entrance_dose_mgy"] == pytest.approx(5.3)
    assert row["exposure_control_mode"] == "AUTOMATIC"
