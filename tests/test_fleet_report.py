"""The fleet manager's outputs: report.json, stations.csv and a self-contained report.html whose
flagged stations, reasons and plots come from the miner's result."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from html import escape as html_escape

import numpy as np
from PIL import Image

from fleet_synth import make_fleet, write_parquet
from medsendx_edge.fleet.miner import mine
from medsendx_edge.fleet.report import summary_table, write_outputs


def test_outputs_agree_with_the_result_and_the_page_is_self_contained(tmp_path):
    fleet = make_fleet(n_stations=20, images_per_station=120, seed=3, n_faulty=2, n_dense=1, n_drift=0)
    write_parquet(fleet, tmp_path / "in")
    res = mine([tmp_path / "in"])
    paths = write_outputs(res, tmp_path / "out")
    report = json.loads(paths["json"].read_text())
    assert report["flagged_stations"] == res.flagged and set(res.flagged) >= fleet.faulty
    with open(paths["csv"], newline="") as fh:
        rows = {r["station_name"]: r for r in csv.DictReader(fh)}
    assert len(rows) == 20
    assert {n for n, r in rows.items() if r["flagged"] == "True"} == set(res.flagged)
    page = paths["html"].read_text()
    assert "http://" not in page and "https://" not in page  # nothing fetched from anywhere
    for name in res.flagged:
        assert name in page
        assert rows[name]["reasons"] and rows[name]["reasons"].split(" | ")[0][:20] in page
    images = re.findall(r"src=['\"]data:image/png;base64,([^'\"]+)", page)
    assert len(images) >= 2
    for data in images:
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        assert img.size[0] >= 300 and img.size[1] >= 200
        assert len(np.unique(np.asarray(img.convert("L")))) > 10  # a drawn plot, not a blank square
    for name in res.flagged:  # what moved, the likely cause and the parameters, in every output
        st = report["stations"][name]
        assert html_escape(st["likely_cause"]) in page and st["likely_cause"] == rows[name]["likely_cause"]
        for p, q in st["parameters"].items():
            assert float(rows[name][f"{p}_shift_pct"]) == q["shift_pct"]
    assert "healthy stations" in page and "left out" in page
    table = summary_table(res)
    assert all(name in table for name in res.flagged)
    assert all(report["stations"][n]["reasons"][0] in table for n in res.flagged)


def test_each_finding_has_a_severity_and_the_second_run_says_what_is_new(tmp_path):
    """Issue 26: `mine` gave no severity and did not mark what is new since the last report.  A planted
    fault twice the size of another reads more severe; a second run over the same fleet finds nothing new,
    a third with one more faulty station finds exactly that one new, and a run without it lists it resolved."""
    small = make_fleet(n_stations=20, images_per_station=120, seed=5, n_faulty=1, n_dense=0, n_drift=0,
                       fault_size=0.6)
    large = make_fleet(n_stations=20, images_per_station=120, seed=5, n_faulty=1, n_dense=0, n_drift=0,
                       fault_size=2.0)
    for name, fleet in (("small", small), ("large", large)):
        write_parquet(fleet, tmp_path / name)
    sev = {}
    for name in ("small", "large"):
        res = mine([tmp_path / name])
        (st,) = [res.report["stations"][n] for n in res.flagged if n in (small if name == "small" else large).faulty]
        assert st["severity"] in ("low", "medium", "high") and all("severity" in f for f in st["findings"])
        sev[name] = ("low", "medium", "high").index(st["severity"])
    assert sev["large"] >= sev["small"] and sev["large"] == 2

    def run(src):   # the command, in this process (four runs)
        import contextlib

        from medsendx_edge.cli import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["mine", str(tmp_path / src), "--out", str(tmp_path / "out")]) == 0
        return out.getvalue(), json.loads((tmp_path / "out" / "report.json").read_text())

    out, first = run("small")
    assert first["since_previous"]["previous_report"] is False and "NEW" in out
    out, again = run("small")
    assert again["since_previous"] == {"previous_report": True, "new": [], "resolved": []}
    assert "since the previous report: 0 new finding(s), 0 resolved" in out and " NEW " not in out
    two = make_fleet(n_stations=20, images_per_station=120, seed=5, n_faulty=2, n_dense=0, n_drift=0, fault_size=2.0)
    write_parquet(two, tmp_path / "two")
    _out, third = run("two")
    newly = {k.split("|")[0] for k in third["since_previous"]["new"]}
    assert newly and newly <= two.faulty
    _out, fourth = run("small")
    assert {k.split("|")[0] for k in fourth["since_previous"]["resolved"]} >= newly - small.faulty
