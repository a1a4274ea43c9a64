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
from test_triage_exam_sr import exam, sent_srs


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


def _image_uids(daemon):
    out = {}
    for path in daemon.spool.dir("sent").glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.SOPClassUID != MAMMOGRAPHY_CAD_SR:
            out.setdefault(f"{ds.ImageLaterality}{ds.ViewPosition}", []).append(str(ds.SOPInstanceUID))
    return out


def _inferred(item):
    return {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in item.ContentSequence
            if i.ValueType == "IMAGE"}


def test_an_open_exam_has_one_sr_with_each_views_reading_and_the_complete_breasts_category(tmp_path):
    """Through the daemon (run --once, the RCC, the RMLO and the LCC of one study, the LMLO missing): no SR
    while the images come; at the run's end the exam's one SR: each view's percent dense inferred from
    its image, the right breast's category (CID 6001) from the mean of its two views inferred from both,
    none for the left (one view), the missing view named; the three images its evidence; valid for
    dciodvfy and dsrdump."""
    _tools()
    cfg = make_config(tmp_path, triage=TriageConfig())
    cfg.inbox.mkdir(parents=True)
    exam(cfg, [("R", "CC", 0.45, 5), ("R", "MLO", 0.30, 5), ("L", "CC", 0.40, 5)],
          "1.2.826.0.1.3680043.8.498.77")
    daemon = Daemon(cfg)
    assert daemon.run_once() == 0
    sides = [json.loads(p.read_text()) for p in daemon.spool.dir("sent").glob("*.json")]
    images = {f"{s['laterality']}{s['view']}": s for s in sides if s.get("triage") == "done"}
    assert sorted(images) == ["LCC", "RCC", "RMLO"]
    rcc, rmlo, lcc = images["RCC"], images["RMLO"], images["LCC"]
    breast_pd = (rcc["pd"] + rmlo["pd"]) / 2
    assert rmlo["breast_pd"] == pytest.approx(breast_pd) and rmlo["category_views"] == ["RCC", "RMLO"]
    assert rmlo["category"] == birads(breast_pd) and lcc["category"] is None
    [sr] = sent_srs(daemon)                                  # one SR for the exam, not one an image
    assert sr.InstanceNumber == 1 and "PredecessorDocumentsSequence" not in sr
    uids = {k: v[0] for k, v in _image_uids(daemon).items()}
    views = {next(iter(_inferred(n))): n for n in _values(sr, "Percent Fibroglandular Tissue")}
    assert set(views) == set(uids.values())
    for name, uid in uids.items():
        value = float(views[uid].MeasuredValueSequence[0].NumericValue)
        assert value == pytest.approx(round(images[name]["pd"] * 100, 1))
        assert f"{name}: this view; {CATEGORY_CLAIM}" in [i.TextValue for i in views[uid].ContentSequence
                                                          if i.ValueType == "TEXT"]
    [coded] = _values(sr, "Breast composition")                   # the right breast's only
    assert coded.ConceptCodeSequence[0].CodeMeaning.lower().startswith(
        {"a": "almost", "b": "scattered", "c": "heterogeneously", "d": "extremely"}[rmlo["category"]])
    num = [i for i in coded.ContentSequence if i.ValueType == "NUM"][0]
    assert float(num.MeasuredValueSequence[0].NumericValue) == pytest.approx(round(breast_pd * 100, 1))
    assert _inferred(coded) == {uids["RCC"], uids["RMLO"]}
    evidence = {str(r.ReferencedSOPInstanceUID) for e in sr.CurrentRequestedProcedureEvidenceSequence
                for s in e.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
    assert evidence == set(uids.values())
    [text] = [i.TextValue for i in _values(sr, "Comment")]
    lines = text.split("\r\n")
    assert "exam: partial; 3 takes read" in lines
    assert "no reading: LMLO (not received, or not read: an image not read has its own SR saying why)" in lines
    assert all(any(line.startswith(f"{name} own priority: ") for line in lines) for name in images)
    urgent = min((s["priority"] for s in images.values()), key=["recheck", "high", "normal", "low"].index)
    assert f"exam priority: {urgent}" in lines                # what the images were queued at, the most urgent
    assert any(line.startswith("RCC positioning check ") for line in lines)
    assert "InstanceCreationDate" not in sr and sr.PatientID == pydicom.dcmread(
        next(p for p in daemon.spool.dir("sent").glob("*.dcm") if p.stat().st_size > 100_000),
        stop_before_pixels=True).PatientID
    path = next(p for p in daemon.spool.dir("sent").glob("*.dcm")
                if pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID == MAMMOGRAPHY_CAD_SR)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    assert "Error" not in out.stderr + out.stdout, out.stderr
    dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True)
    assert dump.returncode == 0 and "E:" not in dump.stderr, dump.stderr


def test_a_complete_exam_has_its_sr_with_its_last_view_a_duplicate_none_and_a_retake_a_new_version(tmp_path):
    """Four views: the fourth's triage makes the exam's SR (the views all in: no sweep needed). The
    modality resends the RCC: a duplicate, not sent twice, no SR. A retake of the LMLO: a second version
    of the exam's SR (Instance Number 2), naming the first as its predecessor, reading the retake."""
    cfg = make_config(tmp_path, triage=TriageConfig())
    cfg.inbox.mkdir(parents=True)
    study = "1.2.826.0.1.3680043.8.498.78"
    four = [("R", "CC", 0.4, 6), ("L", "CC", 0.4, 7), ("R", "MLO", 0.3, 6), ("L", "MLO", 0.3, 7)]
    rcc = exam(cfg, four, study)[0]
    daemon = Daemon(cfg)
    assert daemon.triage_stage.sweep_reports(final=True) == 0      # nothing recorded yet
    assert daemon.run_once() == 0
    [first] = sent_srs(daemon)
    assert len(_values(first, "Percent Fibroglandular Tissue")) == 4 and len(_values(first, "Breast composition")) == 2
    assert "exam: the truck's views all in; 4 takes read" in _values(first, "Comment")[0].TextValue.split("\r\n")
    rcc.save_as(cfg.inbox / "again.dcm", enforce_file_format=True)   # the same image, sent again
    os.utime(cfg.inbox / "again.dcm", (0, 0))
    assert daemon.run_once() == 0
    assert len(sent_srs(daemon)) == 1 and list(daemon.spool.quarantined()) == []
    exam(cfg, [("L", "MLO", 0.5, 8)], study, name="retake")
    assert daemon.run_once() == 0
    first_again, second = sent_srs(daemon)
    assert first_again.SOPInstanceUID == first.SOPInstanceUID and second.SOPInstanceUID != first.SOPInstanceUID
    assert second.InstanceNumber == 2 and second.SeriesInstanceUID == first.SeriesInstanceUID
    [before] = second.PredecessorDocumentsSequence
    assert str(before.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID) == str(first.SOPInstanceUID)
    lmlo = set(_image_uids(daemon)["LMLO"])
    read_first = {next(iter(_inferred(n))) for n in _values(first, "Percent Fibroglandular Tissue")}
    read = {next(iter(_inferred(n))) for n in _values(second, "Percent Fibroglandular Tissue")}
    assert len(lmlo) == 2 and len(read) == 4 and len(read & lmlo) == 1 and read & lmlo != read_first & lmlo
    assert list(daemon.spool.quarantined()) == []


def test_a_quiet_open_exams_sr_comes_from_the_sweep_once_and_a_crash_before_its_mark_sends_it_once(tmp_path, monkeypatch):
    """The daemon's sweep: an exam with a view missing has no SR until it has been quiet for EXAM_QUIET_S;
    then one, published into triaged/ like a stage's new item, and not again.  A mark that fails after the
    publish (a crash between the two) leaves the exam to the next sweep, which finds the item in the spool
    and marks it: not published twice."""
    import sqlite3
    import time

    from medsendx_edge.spool import TRIAGED
    from medsendx_edge.triage.exam import EXAM_QUIET_S

    cfg = make_config(tmp_path, triage=TriageConfig())
    cfg.inbox.mkdir(parents=True)
    exam(cfg, [("R", "CC", 0.4, 9), ("R", "MLO", 0.3, 9)], "1.2.826.0.1.3680043.8.498.79")
    daemon = Daemon(cfg)
    monkeypatch.setattr(daemon, "sweep_reports", lambda final=False: 0)   # run --once's own end sweep: off here
    daemon.run_once()
    stage = daemon.triage_stage
    assert not sent_srs(daemon) and not daemon.spool.ready(TRIAGED)
    now = time.time()
    assert stage.sweep_reports(now=now + 60) == 0                        # not quiet yet
    real = stage.exams.report_placed
    monkeypatch.setattr(stage.exams, "report_placed",
                        lambda *a, **k: (_ for _ in ()).throw(sqlite3.OperationalError("disk is full")))
    assert stage.sweep_reports(now=now + EXAM_QUIET_S + 1) == 1        # published, not marked
    [made] = daemon.spool.ready(TRIAGED)
    body = daemon.spool.path(TRIAGED, made).read_bytes()
    monkeypatch.setattr(stage.exams, "report_placed", real)
    assert stage.sweep_reports(now=now + EXAM_QUIET_S + 2) == 0        # found in the spool: marked, not made again
    assert daemon.spool.ready(TRIAGED) == [made] and daemon.spool.path(TRIAGED, made).read_bytes() == body
    assert stage.exams.unreported() == []                                # marked: not looked at again
    assert daemon.run_once() == 0
    [sr] = sent_srs(daemon)
    assert len(_values(sr, "Percent Fibroglandular Tissue")) == 2 and len(_values(sr, "Breast composition")) == 1
    lines = _values(sr, "Comment")[0].TextValue.split("\r\n")
    assert {line.split(" (")[0] for line in lines if line.startswith("no reading:")} == {"no reading: LCC", "no reading: LMLO"}


def test_an_implant_displaced_view_with_a_sliver_of_implant_carries_the_breasts_category():
    from medsendx_edge.triage.exam import ExamSummary
    from medsendx_edge.triage.stage import _breast_category

    summary = ExamSummary("e", breast_pd={"R": 0.4}, breast_category={"R": "c"},
                          breast_views={"R": ["RCC ID", "RMLO ID"]}, breast_refs={"R": [("1.2", "3.4", "5.6")]})
    displaced = {"laterality": "R", "metrics": {"implant": True, "implant_displaced": True}}
    _breast_category(displaced, summary)
    assert displaced["category"] == "c" and displaced["category_views"] == ["RCC ID", "RMLO ID"]
    implant_view = {"laterality": "R", "metrics": {"implant": True}}
    _breast_category(implant_view, summary)
    assert "category" not in implant_view


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
    SR's 15 ms) is the oracle.  For a view's SR and a failed triage's (an exam's: the test below), both
    ways write the same bytes; an image the tree
    names but the evidence lacks is refused by both."""
    from highdicom.sr import ImageContentItem
    from pydicom.sr.codedict import codes

    from medsendx_edge.triage import report

    ds, ctx = _anonymized()
    side = triage_dataset(ds, Config(), ds.pixel_array).sidecar
    other = (str(ds.SOPClassUID), ctx.uid("another view"), ctx.uid("another series"))
    failed = not_applicable("pixels could not be analysed (ValueError)", ds, status="failed").sidecar
    real = report._document

    def encoded(sr):
        out = io.BytesIO()
        sr.save_as(out, enforce_file_format=True)
        return out.getvalue()

    made = []
    for sidecar in (side, failed):
        fast = encoded(mammography_cad_sr(ds, sidecar, ctx.uid, "TRUCK01"))
        monkeypatch.setattr(report, "_document", lambda *a, **k: real(*a, standard=True, **k))
        own = encoded(mammography_cad_sr(ds, sidecar, ctx.uid, "TRUCK01"))
        monkeypatch.setattr(report, "_document", real)
        assert fast == own, sidecar.get("category")
        made.append(fast)
    assert other[1].encode() not in made[0]
    stray = report._root()
    stray.ContentSequence = [ImageContentItem(codes.DCM.SourceImageForImageProcessingOperation,
                                              str(ds.SOPClassUID), other[1], relationship_type="CONTAINS")]
    kwargs = dict(evidence=[ds], series_instance_uid=ctx.uid("s"), series_number=1, sop_instance_uid=ctx.uid("i"),
                  sop_class_uid=MAMMOGRAPHY_CAD_SR, instance_number=1)
    for standard in (False, True):
        with pytest.raises(ValueError):
            report._document(stray, [other[1]], standard=standard, **kwargs)


def test_the_exam_sr_built_around_an_empty_root_is_byte_for_byte_highdicoms_own(tmp_path, monkeypatch):
    """The exam's SR (two views of the right breast, its category, a predecessor) through report._document
    and through highdicom's own constructor: the same bytes."""
    import json as _json

    from medsendx_edge.triage import report
    from medsendx_edge.triage.exam import ExamBook
    from medsendx_edge.triage.report import exam_cad_sr, report_header, view_report
    from medsendx_edge.triage.stage import exam_key

    ctx = Context.create(b"k" * 32, AnonymizeConfig(), "TRUCK01")
    book = ExamBook(tmp_path / "exams.db")
    views = []
    for view, seed in (("CC", 3), ("MLO", 4)):
        ds, _ = phantom_dataset(512, 416, density=0.4, seed=seed, laterality="R", view=view,
                                study_uid="1.2.826.0.1.3680043.8.498.80")
        anonymize_dataset(ds, ctx)
        side = {"id": view, **triage_dataset(ds, Config(), ds.pixel_array).sidecar, "exam": exam_key(ds)}
        sop = (str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID))
        summary = book.record(view, side, sop=sop, report=view_report(side), header=report_header(ds))
        views.append({**_json.loads(view_report(side)), "sop": sop})
    assert summary is not None and summary.breast_category.get("R")
    header = pydicom.Dataset.from_json(book.report_inputs(summary.exam)[0])
    real = report._document

    def encoded():
        out = io.BytesIO()
        exam_cad_sr(header, views, summary, ctx.uid, "TRUCK01", 2, ctx.uid("an earlier version")).save_as(
            out, enforce_file_format=True)
        return out.getvalue()

    fast = encoded()
    monkeypatch.setattr(report, "_document", lambda *a, **k: real(*a, standard=True, **k))
    assert encoded() == fast
