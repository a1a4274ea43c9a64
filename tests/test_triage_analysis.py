"""Triage: the histogram K-Means against scikit-learn and multi-level Otsu, density on synthetic
mammograms with ground truth, real CR radiographs, every bundled file, priority, the stage in the daemon."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from conftest import all_pydicom_files, make_config
from medsendx_edge.config import TriageRule, replace
from medsendx_edge.daemon import Daemon
from medsendx_edge.triage.features import FeatureStore
from medsendx_edge.spool import ANONYMIZED, SENT, TRIAGED, Spool
from medsendx_edge.stage import Runner
from medsendx_edge.synthetic import LABELS, synthetic_mammogram
from medsendx_edge.triage.analysis import analyse, gate, histogram, kmeans_hist, priority, segment
from medsendx_edge.triage.phantom import phantom_dataset
from medsendx_edge.triage.stage import TriageStage, triage_dataset

PYDICOM_DATA = Path(__import__("data_store").__file__).parent / "data"


def _sse(counts: np.ndarray, thresholds: list[float]) -> float:
    x = np.arange(counts.size, dtype=np.float64)
    edges = [0] + [int(np.floor(t)) + 1 for t in thresholds] + [counts.size]
    total = 0.0
    for a, b in zip(edges[:-1], edges[1:]):
        c, v = counts[a:b], x[a:b]
        if c.sum():
            m = (c * v).sum() / c.sum()
            total += (c * (v - m) ** 2).sum()
    return total


def _otsu3(counts: np.ndarray) -> tuple[float, tuple[int, int]]:
    """Exhaustive two-threshold search (multi-level Otsu): minimum within-class sum of squares."""
    x = np.arange(counts.size, dtype=np.float64)
    c0 = np.concatenate(([0.0], np.cumsum(counts)))
    c1 = np.concatenate(([0.0], np.cumsum(counts * x)))
    c2 = np.concatenate(([0.0], np.cumsum(counts * x * x)))

    def sse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        n = c0[b] - c0[a]
        s = c1[b] - c1[a]
        return np.where(n > 0, (c2[b] - c2[a]) - s * s / np.maximum(n, 1e-300), 0.0)

    n = counts.size
    best, arg = np.inf, (0, 0)
    for t1 in range(1, n - 1):
        t2 = np.arange(t1 + 1, n)
        total = sse(np.array([0]), np.array([t1])) + sse(np.full(t2.size, t1), t2) + sse(t2, np.full(t2.size, n))
        i = int(np.argmin(total))
        if total[i] < best:
            best, arg = float(total[i]), (t1, int(t2[i]))
    return best, arg


def test_histogram_kmeans_matches_multilevel_otsu_and_sklearn():
    from sklearn.cluster import KMeans

    ds, _ = synthetic_mammogram(256, 208, seed=4, density=0.35, noise_sigma=60)
    img = ds.pixel_array
    counts, offset = histogram(img)
    assert counts.sum() == img.size
    cl = kmeans_hist(counts, 3)
    assert np.all(np.diff(cl.centres) > 0)  # ordered by centroid
    # Coarser bins keep the exhaustive search fast; the optimum must match ours within a bin.
    coarse = np.add.reduceat(counts, np.arange(0, counts.size, 16))
    best, (t1, t2) = _otsu3(coarse)
    ours = kmeans_hist(coarse, 3)
    assert _sse(coarse, list(ours.thresholds)) <= best * (1 + 1e-9)
    occupied = np.flatnonzero(coarse)
    otsu_labels = (occupied >= t1).astype(int) + (occupied >= t2)
    our_labels = np.searchsorted(ours.thresholds, occupied, side="left")
    assert (otsu_labels == our_labels).all()  # the same partition of the occupied bins
    sk = KMeans(n_clusters=3, n_init=4, random_state=0).fit(img[::2, ::2].reshape(-1, 1).astype(np.float64))
    sk_centres = np.sort(sk.cluster_centers_.ravel())
    assert np.allclose(cl.centres + offset, sk_centres, atol=0.01 * (img.max() - img.min()))
    labels, centres = segment(img, 3)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1, 2}
    assert np.all(np.diff(centres) > 0)
    sk_labels = np.argsort(np.argsort(sk.cluster_centers_.ravel()))[sk.predict(img.reshape(-1, 1).astype(np.float64))]
    assert (sk_labels.reshape(img.shape) == labels).mean() > 0.995


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


def test_whole_image_kmeans_would_overstate_density_on_mlo():
    """Why the mask comes first: the pectoral muscle lands in the dense class."""
    ds, truth = synthetic_mammogram(512, 416, seed=7, density=0.1, view="MLO", pixel_spacing_mm=0.28)
    labels, _ = segment(ds.pixel_array, 3)
    tissue = (truth > 0) & (truth < LABELS["marker"])
    naive_pd = (labels[tissue] == 2).mean()
    true_pd = (truth == LABELS["dense"]).sum() / ((truth == 1) | (truth == 2)).sum()
    assert naive_pd - true_pd > 0.05
    assert abs(analyse(ds, 3).metrics["pd"] - true_pd) < 0.02


@pytest.mark.parametrize("name", sorted(p.name for p in PYDICOM_DATA.glob("RG*.dcm")))
def test_real_cr_radiographs_are_not_applicable(name, tmp_path):
    """A chest radiograph is no mammogram: no percent dense, no "dense breast", priority normal."""
    ds = pydicom.dcmread(PYDICOM_DATA / name)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    out = triage_dataset(ds, make_config(tmp_path))
    side = out.sidecar
    assert side["triage"] == "not applicable" and side["priority"] == "normal" and side["pd"] is None
    assert "modality CR" in side["reason"] and out.png is None


def test_priority_rules():
    rules = (TriageRule("saturated_frac", ">", 0.02, "recheck"), TriageRule("pd", ">=", 0.5, "high"))
    assert priority({"pd": 0.6, "saturated_frac": 0.0}, rules)[0] == "high"
    assert priority({"pd": 0.6, "saturated_frac": 0.1}, rules)[0] == "recheck"
    assert priority({"pd": 0.2, "saturated_frac": None}, rules) == ("normal", [])


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


def test_isotonic_fit_matches_scipy():
    from scipy.optimize import isotonic_regression

    from medsendx_edge.triage.analysis import isotonic

    rng = np.random.default_rng(4)
    y = np.cumsum(rng.normal(0.2, 1.0, 120))
    w = rng.integers(1, 500, 120).astype(float)
    assert np.allclose(isotonic(y, w), isotonic_regression(y, weights=w, increasing=True).x)


@pytest.mark.parametrize("border", [0.08, 0.11, 0.14])
def test_a_black_border_strip_is_not_taken_for_air(border):
    """Review of issue 24: a collimator strip written as 0 (no padding value) over 8-14 % of the width was
    taken for air by the dark-fat rule of the foreground, and all the real air became breast."""
    for seed, density in ((1, 0.05), (4, 0.15), (2, 0.30)):
        ds, truth = phantom_dataset(1024, 832, spacing_mm=0.2, view="CC", density=density, seed=seed)
        arr = ds.pixel_array.copy()
        arr[:, int(832 * (1 - border)):] = 0
        an = analyse(ds, 3, "T", arr, domain=gate(ds).domain)
        assert abs(an.metrics["pd"] - truth.pd) <= 0.05, (border, density, an.metrics["pd"])
