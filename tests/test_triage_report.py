"""The triage result as a DICOM Mammography CAD SR (TID 4000, highdicom): valid for dciodvfy, readable by
dcmtk's dsrdump, the sidecar's numbers, no time of its own, and stored by Orthanc in the image's study."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess

import pydicom
import pytest

from conftest import make_config, require
from medsendx_edge.anonymize.profile import Context, anonymize_dataset
from medsendx_edge.config import AnonymizeConfig, Config, DestinationConfig, TriageConfig
from medsendx_edge.daemon import Daemon
from medsendx_edge.triage.categories import CATEGORY_CLAIM, birads
from medsendx_edge.triage.phantom import phantom_dataset
from medsendx_edge.triage.report import MAMMOGRAPHY_CAD_SR, mammography_cad_sr
from medsendx_edge.triage.stage import not_applicable, triage_dataset


def _anonymized(density: float = 0.4, seed: int = 3):
    ds, _ = phantom_dataset(512, 416, density=density, seed=seed)
    ctx = Context.create(b"k" * 32, AnonymizeConfig(), "TRUCK01")
    anonymize_dataset(ds, ctx)
    return ds, ctx


def _values(sr, meaning):
    return [item for item in sr.ContentSequence
            if item.ConceptNameCodeSequence[0].CodeMeaning == meaning]


def _tools():
    require(shutil.which("dciodvfy") or "/usr/bin/dciodvfy", package="dicom3tools")
    require(shutil.which("dsrdump") or "/usr/bin/dsrdump", package="dcmtk")


def test_the_sr_holds_the_sidecar_numbers_and_passes_dciodvfy_and_dsrdump(tmp_path):
    _tools()
    ds, ctx = _anonymized()
    side = triage_dataset(ds, Config(), ds.pixel_array).sidecar
    sr = mammography_cad_sr(ds, side, ctx.uid, "TRUCK01")
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == MAMMOGRAPHY_CAD_SR and back.StudyInstanceUID == ds.StudyInstanceUID
    assert back.PatientID == ds.PatientID and back.VerificationFlag == "UNVERIFIED"
    assert not _values(back, "Breast composition")                # one view: its percent dense, no category
    [pct] = _values(back, "Percent Fibroglandular Tissue")
    assert float(pct.MeasuredValueSequence[0].NumericValue) == pytest.approx(side["pd"] * 100, abs=0.05)
    texts = [i.TextValue for i in pct.ContentSequence if i.ValueType == "TEXT"]
    assert f"this view; {CATEGORY_CLAIM}" in texts and side["category"] is None
    [summary_text] = [i.TextValue for i in _values(back, "Comment")]       # one comment, a line each
    comments = summary_text.split("\r\n")
    assert f"triage priority: {side['priority']}" in comments
    assert all(f"reason: {r}" in comments for r in side["reasons"])
    # issue 24: every positioning check of the image, with its result and rule, and the nipple line
    checks = side["positioning"]["checks"]
    assert checks and all(any(t.startswith(f"positioning check {c['check']}: {c['result']}") for t in comments)
                          for c in checks)
    assert f"posterior nipple line: {side['positioning']['pnl_mm']:.0f} mm" in comments
    # no time of its own: the day it was made would date the exam
    assert "InstanceCreationDate" not in back and back.ContentDate == (ds.get("ContentDate") or "19000101")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    assert "Error" not in out.stderr + out.stdout, out.stderr
    dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True)
    assert dump.returncode == 0 and "E:" not in dump.stderr, dump.stderr
    assert "Percent Fibroglandular Tissue" in dump.stdout and f'"{round(side["pd"] * 100, 1)}"' in dump.stdout
    # the same source gives the same instance (a re-run is stored once)
    assert mammography_cad_sr(ds, side, ctx.uid, "TRUCK01").SOPInstanceUID == back.SOPInstanceUID


def test_a_category_is_the_breasts_from_all_its_views_in_the_sr_of_the_view_that_completes_it(tmp_path):
    """Through the daemon: the RCC's SR has its percent dense and no category; the RMLO completes the right
    breast, and its SR holds the breast's category (CID 6001) with the mean of both views, inferred from
    both images (both in the evidence); valid for dciodvfy and dsrdump.  The left breast, with one view,
    has no category anywhere."""
    _tools()
    cfg = make_config(tmp_path, triage=TriageConfig())
    cfg.inbox.mkdir(parents=True)
    study = "1.2.826.0.1.3680043.8.498.77"
    for name, lat, view, density in (("a", "R", "CC", 0.45), ("b", "R", "MLO", 0.30), ("c", "L", "CC", 0.40)):
        ds, _ = phantom_dataset(512, 416, density=density, seed=5, laterality=lat, view=view, study_uid=study)
        ds.save_as(cfg.inbox / f"{name}.dcm", enforce_file_format=True)
        os.utime(cfg.inbox / f"{name}.dcm", (0, 0))
    daemon = Daemon(cfg)
    assert daemon.run_once() == 0
    sides = [json.loads(p.read_text()) for p in daemon.spool.dir("sent").glob("*.json")]
    images = {f"{s['laterality']}{s['view']}": s for s in sides if s.get("triage") == "done"}
    assert sorted(images) == ["LCC", "RCC", "RMLO"]
    rcc, rmlo, lcc = images["RCC"], images["RMLO"], images["LCC"]
    breast_pd = (rcc["pd"] + rmlo["pd"]) / 2
    assert rmlo["breast_pd"] == pytest.approx(breast_pd) and rmlo["category_views"] == ["RCC", "RMLO"]
    assert rmlo["category"] == birads(breast_pd) and rmlo["category_claim"] == CATEGORY_CLAIM
    assert lcc["category"] is None and rcc["category"] is None     # one view: a percent dense, no category
    srs = {}
    for path in daemon.spool.dir("sent").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        if ds.SOPClassUID == MAMMOGRAPHY_CAD_SR:   # keyed by the view its own percent dense is inferred from
            [view_pd] = _values(ds, "Percent Fibroglandular Tissue")
            [source] = [i for i in view_pd.ContentSequence if i.ValueType == "IMAGE"]
            srs[str(source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)] = path
    uids = {}
    for path in daemon.spool.dir("sent").glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.SOPClassUID != MAMMOGRAPHY_CAD_SR:
            uids[f"{ds.ImageLaterality}{ds.ViewPosition}"] = str(ds.SOPInstanceUID)
    sr_rmlo = pydicom.dcmread(srs[uids["RMLO"]])
    coded = _values(sr_rmlo, "Breast composition")
    assert len(coded) == 1 and coded[0].ValueType == "CODE"
    assert coded[0].ConceptCodeSequence[0].CodeMeaning.lower().startswith(
        {"a": "almost", "b": "scattered", "c": "heterogeneously", "d": "extremely"}[rmlo["category"]])
    num = [i for i in coded[0].ContentSequence if i.ValueType == "NUM"][0]
    assert float(num.MeasuredValueSequence[0].NumericValue) == pytest.approx(round(breast_pd * 100, 1))
    inferred = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in coded[0].ContentSequence
                if i.ValueType == "IMAGE"}
    assert inferred == {uids["RCC"], uids["RMLO"]}
    evidence = {str(r.ReferencedSOPInstanceUID) for e in sr_rmlo.CurrentRequestedProcedureEvidenceSequence
                for s in e.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
    assert evidence == {uids["RCC"], uids["RMLO"]}
    for view in ("RCC", "LCC"):
        assert not _values(pydicom.dcmread(srs[uids[view]]), "Breast composition")
    out = subprocess.run(["dciodvfy", str(srs[uids["RMLO"]])], capture_output=True, text=True)
    assert "Error" not in out.stderr + out.stdout, out.stderr
    dump = subprocess.run(["dsrdump", str(srs[uids["RMLO"]])], capture_output=True, text=True)
    assert dump.returncode == 0 and "E:" not in dump.stderr, dump.stderr


def test_an_image_sent_again_after_its_breast_is_complete_brings_no_second_sr(tmp_path):
    """The modality resends the RCC after the RMLO completed the breast: the copy is a duplicate (not sent
    twice), and it makes no SR (one made now would carry the breast's category under the first SR's
    instance UID: a conflict, quarantined)."""
    cfg = make_config(tmp_path, triage=TriageConfig())
    cfg.inbox.mkdir(parents=True)
    study = "1.2.826.0.1.3680043.8.498.78"
    rcc, _ = phantom_dataset(512, 416, density=0.4, seed=6, laterality="R", view="CC", study_uid=study)
    rmlo, _ = phantom_dataset(512, 416, density=0.3, seed=6, laterality="R", view="MLO", study_uid=study)
    daemon = Daemon(cfg)
    for name, ds in (("a", rcc), ("b", rmlo), ("c", rcc)):
        ds.save_as(cfg.inbox / f"{name}.dcm", enforce_file_format=True)
        os.utime(cfg.inbox / f"{name}.dcm", (0, 0))
        assert daemon.run_once() == 0
    assert list(daemon.spool.quarantined()) == []
    srs = [p for p in daemon.spool.dir("sent").glob("*.dcm")
           if pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID == MAMMOGRAPHY_CAD_SR]
    assert len(srs) == 2
    sides = [json.loads(p.read_text()) for p in daemon.spool.dir("sent").glob("*.json")]
    again = [x for x in sides if x.get("triage") == "done" and x["exam_summary"]["duplicates"]]
    assert len(again) == 1 and again[0]["category"] == again[0]["exam_summary"]["breast_category"]["R"]


def test_an_implant_displaced_view_with_a_sliver_of_implant_carries_the_breasts_category():
    from medsendx_edge.triage.exam import ExamSummary
    from medsendx_edge.triage.stage import _breast_category

    summary = ExamSummary("e", breast_pd={"R": 0.4}, breast_category={"R": "c"},
                          breast_views={"R": ["RCC ID", "RMLO ID"]}, breast_refs={"R": [("1.2", "3.4", "5.6")]})
    displaced = {"laterality": "R", "metrics": {"implant": True, "implant_displaced": True}}
    assert _breast_category(displaced, summary) == [("1.2", "3.4", "5.6")] and displaced["category"] == "c"
    implant_view = {"laterality": "R", "metrics": {"implant": True}}
    assert _breast_category(implant_view, summary) == [] and "category" not in implant_view


def test_a_result_without_a_density_says_why(tmp_path):
    _tools()
    ds, ctx = _anonymized()
    side = not_applicable("a magnification view (factor 1.8): density and positioning are read on the "
                          "standard screening views only", ds).sidecar
    sr = mammography_cad_sr(ds, side, ctx.uid)
    assert not _values(sr, "Breast composition") and not _values(sr, "Percent Fibroglandular Tissue")
    summary = _values(sr, "CAD Processing and Findings Summary")[0]
    assert summary.ConceptCodeSequence[0].CodeValue == "111245"   # no algorithms succeeded
    failed = _values(sr, "Failed Analyses")[0]
    assert "magnification view" in failed.ContentSequence[0].TextValue
    path = tmp_path / "na.dcm"
    sr.save_as(path, enforce_file_format=True)
    dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True)
    assert dump.returncode == 0 and "E:" not in dump.stderr


def test_the_sr_reaches_orthanc_with_the_study(tmp_path, orthanc):
    from conftest import write_password

    cfg = make_config(tmp_path, triage=TriageConfig(), destination=DestinationConfig(
        kind="dicomweb", path=None, url=orthanc.dicomweb, username=orthanc.user,
        password_file=write_password(tmp_path, orthanc.password)))
    cfg.inbox.mkdir(parents=True)
    ds, _ = phantom_dataset(512, 416, density=0.4, seed=4)
    ds.save_as(cfg.inbox / "m.dcm", enforce_file_format=True)
    os.utime(cfg.inbox / "m.dcm", (0, 0))
    daemon = Daemon(cfg)
    assert daemon.run_once() == 0
    studies = orthanc.get("/studies").json()
    assert len(studies) == 1                                      # the SR is in the image's study
    instances = orthanc.get(f"/studies/{studies[0]}/instances").json()
    classes = {orthanc.get(f"/instances/{i['ID']}/metadata/SopClassUid").text: i["ID"] for i in instances}
    assert MAMMOGRAPHY_CAD_SR in classes and len(instances) == 2
    stored = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{classes[MAMMOGRAPHY_CAD_SR]}/file").content))
    sent = [p for p in daemon.spool.dir("sent").glob("*.json")]
    image_side = [json.loads(p.read_text()) for p in sent if json.loads(p.read_text()).get("triage") == "done"][0]
    [pct] = _values(stored, "Percent Fibroglandular Tissue")
    assert float(pct.MeasuredValueSequence[0].NumericValue) == pytest.approx(image_side["pd"] * 100, abs=0.05)


def test_the_pseudonym_warning_filter_stays_in_front_and_is_not_added_twice():
    """highdicom's "single-component name" warning is silenced for our pseudonym; the filter is put back
    in front when something else went there, and not added again when it is already first (adding a
    filter re-arms every once-only warning of the process)."""
    import warnings

    from medsendx_edge.triage.report import _quiet_pseudonym_warning

    with warnings.catch_warnings():
        _quiet_pseudonym_warning()
        first = warnings.filters[0]
        _quiet_pseudonym_warning()
        assert warnings.filters[0] is first                 # not added again
        warnings.simplefilter("always", UserWarning)        # something in front of it
        _quiet_pseudonym_warning()
        assert warnings.filters[0][1].pattern.startswith("The string")
        with warnings.catch_warnings(record=True) as seen:
            warnings.warn_explicit("The string \"MSX1\" is unlikely to represent the intended person name",
                                   UserWarning, "base.py", 1, module="highdicom.base")
        assert not seen


def test_the_sr_built_around_an_empty_root_is_byte_for_byte_highdicoms_own(monkeypatch):
    """The SR document is made around an empty root and then given the content tree (report._document):
    highdicom's own constructor (a deep copy of the tree, parsed back, walked for its images: 11 of the
    SR's 15 ms) is the oracle.  For a view's SR, a breast's (its category inferred from two views, one
    of them another image's) and a failed triage's, both ways write the same bytes; an image the tree
    names but the evidence lacks is refused by both."""
    from highdicom.sr import ImageContentItem
    from pydicom.sr.codedict import codes

    from medsendx_edge.triage import report

    ds, ctx = _anonymized()
    side = triage_dataset(ds, Config(), ds.pixel_array).sidecar
    other = (str(ds.SOPClassUID), ctx.uid("another view"), ctx.uid("another series"))
    refs = [(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)), other]
    breast = {**side, "category": "c", "breast_pd": 0.41, "category_views": ["RCC", "RMLO"]}
    failed = not_applicable("pixels could not be analysed (ValueError)", ds, status="failed").sidecar
    real = report._document

    def encoded(sr):
        out = io.BytesIO()
        sr.save_as(out, enforce_file_format=True)
        return out.getvalue()

    made = []
    for sidecar, breast_refs in ((side, None), (breast, refs), (failed, None)):
        fast = encoded(mammography_cad_sr(ds, sidecar, ctx.uid, "TRUCK01", breast_refs))
        monkeypatch.setattr(report, "_document", lambda *a, **k: real(*a, standard=True, **k))
        own = encoded(mammography_cad_sr(ds, sidecar, ctx.uid, "TRUCK01", breast_refs))
        monkeypatch.setattr(report, "_document", real)
        assert fast == own, sidecar.get("category")
        made.append(fast)
    # the breast's SR names the other view (content and evidence), the view's does not
    assert made[1].count(other[1].encode()) >= 2 and other[1].encode() not in made[0]
    stray = report._root()
    stray.ContentSequence = [ImageContentItem(codes.DCM.SourceImageForImageProcessingOperation,
                                              str(ds.SOPClassUID), other[1], relationship_type="CONTAINS")]
    kwargs = dict(evidence=[ds], series_instance_uid=ctx.uid("s"), series_number=1, sop_instance_uid=ctx.uid("i"),
                  sop_class_uid=MAMMOGRAPHY_CAD_SR, instance_number=1)
    for standard in (False, True):
        with pytest.raises(ValueError):
            report._document(stray, [other[1]], standard=standard, **kwargs)
