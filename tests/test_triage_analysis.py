"""Triage: the histogram K-Means against scikit-learn and multi-level Otsu, density on synthetic
mammograms with ground truth, real CR radiographs, every bundled file, priority, the stage in the daemon."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import pydicom
import pytest
from PIL import Image

from conftest import all_pydicom_files, make_config
from medsendx_edge.config import replace
from medsendx_edge.daemon import Daemon
from medsendx_edge.triage.features import FeatureStore
from medsendx_edge.spool import ANONYMIZED, SENT, TRIAGED, Spool
from medsendx_edge.stage import Runner
from medsendx_edge.synthetic import LABELS, synthetic_mammogram
from medsendx_edge.triage.analysis import analyse
from medsendx_edge.triage.stage import TriageStage, triage_dataset

PYDICOM_DATA = Path(__import__("data_store").__file__).parent / "data"


@pytest.mark.parametrize("view", ["CC", "MLO"])
@pytest.mark.parametrize("density", [0.08, 0.25, 0.5, 0.75])
def test_percent_density_within_005_of_truth(view, density):
    # 0.28 mm pixels: a 14 cm field, the size of a breast (at 0.07 mm, 512 pixels are a 3.6 cm field)
    ds, truth = synthetic_mammogram(512, 416, seed=int(density * 100), density=density, view=view,
                                    pixel_spacing_mm=0.28)
    an = analyse(ds, 3, "T")
    breast = (truth == LABELS["fat"]) | (truth == LABELS["dense"])
    true_pd = (truth == LABELS["dense"]).sum() / breast.sum()
    assert abs(an.metrics["pd"] - true_pd) <= 0.05
    true_pect = truth == LABELS["pectoral"]
    if view == "MLO":
        iou = (an.pectoral & true_pect).sum() / (an.pectoral | true_pect).sum()
        assert iou > 0.8
    else:
        assert not an.pectoral.any()
    # The burned-in marker and the air are not tissue.
    assert not an.body[truth == LABELS["marker"]].any()
    assert an.metrics["fat_c"] == pytest.approx(1300, abs=60)
    assert an.metrics["dense_c"] == pytest.approx(2300, abs=120)
    assert an.metrics["noise_bg"] == pytest.approx(25, rel=0.2)
    assert an.metrics["noise_fat"] == pytest.approx(25, rel=0.35)
    assert an.metrics["breast_area_cm2"] > 0


@pytest.mark.parametrize("name", sorted(p.name for p in PYDICOM_DATA.glob("RG*.dcm")))
def test_real_cr_radiographs_are_not_applicable(name, tmp_path):
    """A chest radiograph is no mammogram: no percent dense, no "dense breast", priority normal."""
    ds = pydicom.dcmread(PYDICOM_DATA / name)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    out = triage_dataset(ds, make_config(tmp_path))
    side = out.sidecar
    assert side["triage"] == "not applicable" and side["priority"] == "normal" and side["pd"] is None
    assert "modality CR" in side["reason"] and out.png is None


def test_every_bundled_file_passes_the_triage_stage(tmp_path):
    cfg = make_config(tmp_path)
    spool = Spool(cfg.spool_dir)
    spool.ensure_layout()
    n = 0
    for i, p in enumerate(all_pydicom_files()):
        shutil.copyfile(p, spool.path(ANONYMIZED, f"{i:024x}"))
        n += 1
    Runner(TriageStage(spool, cfg)).drain()
    assert len(spool.ready(TRIAGED)) == n and list(spool.quarantined()) == []
    results = [json.loads((spool.dir(TRIAGED) / f"{i}.json").read_text()) for i in spool.ready(TRIAGED)]
    kinds = {r["triage"] for r in results}
    # pydicom bundles no mammogram: nothing gets a percent dense, everything says why not
    assert kinds <= {"not applicable", "failed"} and "not applicable" in kinds
    assert all(r["reason"] and r["pd"] is None and r["priority"] == "normal" for r in results)


def _mammo_file(path: Path, **kw) -> None:
    kw.setdefault("pixel_spacing_mm", 0.5)  # 256 pixels: a 13 cm field
    ds, _ = synthetic_mammogram(256, 208, **kw)
    ds.save_as(path, enforce_file_format=True)


def test_stage_in_the_daemon_orders_uploads_and_records_features(tmp_path, log_lines):
    cfg = make_config(tmp_path)
    cfg.inbox.mkdir(parents=True)
    _mammo_file(cfg.inbox / "fatty.dcm", seed=1, density=0.1)
    _mammo_file(cfg.inbox / "dense.dcm", seed=2, density=0.7)
    _mammo_file(cfg.inbox / "burnt.dcm", seed=3, density=0.2, gain=3.0)  # saturated: retake
    old = time.time() - 3600
    for f in cfg.inbox.iterdir():
        os.utime(f, (old, old))
    daemon = Daemon(cfg)
    # Stop before the upload to see the queue order.
    daemon.spool.recover()
    daemon.scanner.scan()
    daemon.process_pipeline()
    due = daemon.spool.state.due(time.time() + 1, limit=10)
    prios = [r.priority for r in due]
    assert prios == sorted(prios) and prios[0] == 0 and prios[1] == 1
    assert "triage_recheck" in log_lines.getvalue()
    assert daemon.run_once() == 0
    sent = daemon.spool.ready(SENT)
    assert len(sent) == 3
    for item_id in sent:
        side = json.loads((daemon.spool.dir(SENT) / f"{item_id}.json").read_text())
        # the legend lists the classes present (the saturated image has no measurable dense class)
        assert side["triage"] == "done" and side["labels"][:2] == ["background", "fat"]
        assert set(side["labels"]) <= {"background", "fat", "dense", "pectoral", "implant"}
        png = Image.open(io.BytesIO((daemon.spool.dir(SENT) / f"{item_id}.png").read_bytes()))
        assert png.format == "PNG" and png.size[0] > png.size[1] > 100
    rows = FeatureStore(cfg.spool_dir / "state" / "features.db").rows()
    assert len(rows) == 3 and all(r["station_name"] == "MOBILE_CLINIC_01" for r in rows)
    assert sorted(round(r["pd"], 1) for r in rows)[-1] == 0.7


def test_triage_can_be_disabled(tmp_path):
    cfg = make_config(tmp_path)
    cfg = replace(cfg, triage=replace(cfg.triage, enabled=False))
    cfg.inbox.mkdir(parents=True)
    _mammo_file(cfg.inbox / "a.dcm")
    os.utime(cfg.inbox / "a.dcm", (0, 0))
    d = Daemon(cfg)
    assert d.run_once() == 0 and len(d.spool.ready(SENT)) == 1


def test_overlay_secondary_capture_joins_the_study(tmp_path):
    cfg = make_config(tmp_path)
    cfg = replace(cfg, triage=replace(cfg.triage, send_overlay=True))
    cfg.inbox.mkdir(parents=True)
    _mammo_file(cfg.inbox / "a.dcm", seed=3, density=0.3, view="MLO")
    os.utime(cfg.inbox / "a.dcm", (0, 0))
    d = Daemon(cfg)
    assert d.run_once() == 0
    sent = [pydicom.dcmread(d.spool.path(SENT, i)) for i in d.spool.ready(SENT)]
    assert len(sent) == 2
    mg = next(x for x in sent if x.Modality == "MG")
    sc = next(x for x in sent if x.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7")
    assert sc.StudyInstanceUID == mg.StudyInstanceUID and sc.PatientID == mg.PatientID
    assert sc.SOPInstanceUID.startswith("2.25.") and sc.SeriesInstanceUID != mg.SeriesInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == mg.SOPInstanceUID
    assert sc.pixel_array.shape[2] == 3
