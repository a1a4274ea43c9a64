"""The exam's SR against what a truck does to it (a hostile review of its first version, 2026-12-06):
a failed record, a crash between an SR's publish and its image's commit, a clock set back, a combo exam,
a view not read, a week's stop, a reload between two makes, a restart with a view still to triage.
Each of these failed on that version."""

from __future__ import annotations

import dataclasses
import errno
import os
import sqlite3
import time
from collections import Counter

import pydicom
import pytest

from conftest import make_config
from medsendx_edge import stage as stage_mod
from medsendx_edge.config import TriageConfig
from medsendx_edge.daemon import Daemon
from medsendx_edge.spool import ANONYMIZED, TRIAGED
from medsendx_edge.triage import stage as tstage
from medsendx_edge.triage.exam import EXAM_QUIET_S
from medsendx_edge.triage.phantom import phantom_dataset
from medsendx_edge.triage.report import MAMMOGRAPHY_CAD_SR

FOUR = [("R", "CC", 0.4, 6), ("L", "CC", 0.4, 7), ("R", "MLO", 0.3, 6), ("L", "MLO", 0.3, 7)]
SYNTH = ["DERIVED", "PRIMARY", "TOMOSYNTHESIS", "GENERATED_2D"]


def exam(cfg, views, study, name="", **kw):
    made = []
    for i, (lat, view, density, seed) in enumerate(views):
        ds, _ = phantom_dataset(512, 416, density=density, seed=seed, laterality=lat, view=view, study_uid=study)
        for k, v in kw.get("attrs", {}).get(f"{lat}{view}", {}).items():
            setattr(ds, k, v)
        path = cfg.inbox / f"{name}{i}{lat}{view}.dcm"
        ds.save_as(path, enforce_file_format=True)
        os.utime(path, (0, 0))
        made.append(ds)
    return made


def sent_srs(daemon):
    return sorted((pydicom.dcmread(p) for p in daemon.spool.dir("sent").glob("*.dcm")
                   if pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID == MAMMOGRAPHY_CAD_SR),
                  key=lambda sr: int(sr.InstanceNumber))


def values(sr, meaning):
    return [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeMeaning == meaning]


def comment_lines(sr):
    return values(sr, "Comment")[0].TextValue.split("\r\n")


def _daemon(tmp_path):
    cfg = make_config(tmp_path, triage=TriageConfig())
    cfg.inbox.mkdir(parents=True)
    return cfg


def _fail(*_a, **_k):
    raise sqlite3.OperationalError("disk is full")


def later():
    """A moment when the exams recorded now are quiet."""
    return time.time() + EXAM_QUIET_S + 1


def sr_publish_fails(monkeypatch, once=True):
    """The exam SRs' publish refused (a card remounted read-only): the first one only, or all; returns the
    ids of the items refused."""
    real, failed = stage_mod.publish_new, []

    def publish_new(spool, queue, new):
        if new.sidecar.get("exam_report") and not (once and failed):
            failed.append(new.id)
            raise OSError(errno.EROFS, "Read-only file system")
        return real(spool, queue, new)

    monkeypatch.setattr(stage_mod, "publish_new", publish_new)
    return failed


def refuse(monkeypatch, which, refused=None):
    """The PACS refuses for good the instances ``which(dataset)`` picks (each noted in ``refused``: the id it was
    sent under, its SOP instance UID); returns the real send, to put back."""
    from medsendx_edge.errors import PermanentUploadError
    from medsendx_edge.upload.destinations.directory import DirectoryDestination

    real = DirectoryDestination.send

    def send(self, path, item_id, *a, **k):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if which(ds):
            if refused is not None:
                refused.append((item_id, str(ds.SOPInstanceUID)))
            raise PermanentUploadError("the PACS refused the instance (a test)")
        return real(self, path, item_id, *a, **k)

    monkeypatch.setattr(DirectoryDestination, "send", send)
    return real


def refuse_mammograms(monkeypatch):
    """The PACS refuses every mammogram for good (its SRs go through)."""
    return refuse(monkeypatch, lambda ds: ds.Modality == "MG")


class Kill(BaseException):
    pass


def _crash_in_the_completing_commit(cfg, monkeypatch, study, later, publish):
    """An exam's first three views delivered; ``later`` views anonymized and waiting for triage; the first
    of them (it completes the exam) is triaged and the process dies in its commit: after its new items are
    out (``publish``), or before anything of the commit is written."""
    exam(cfg, FOUR[:3], study)
    d1 = Daemon(cfg)
    monkeypatch.setattr(d1, "sweep_reports", lambda final=False: 0)
    d1.run_once()
    assert sent_srs(d1) == []
    for i, view in enumerate(later):
        exam(cfg, [view], study, name=f"later{i}")
    d1.scanner.scan(may_adopt=True)
    anon, triage = d1.runners[0], next(r for r in d1.runners if r.stage is d1.triage_stage)
    anon.drain()
    assert len(d1.spool.ready(ANONYMIZED)) == len(later)
    real_place = stage_mod.place

    def dying_place(spool, item, output, default_queue):
        if any(n.sidecar.get("exam_report") for n in output.new_items):
            if publish:
                for n in output.new_items:
                    stage_mod.publish_new(spool, default_queue, n)   # the new items are out ...
            raise Kill()                                              # ... and the process dies
        return real_place(spool, item, output, default_queue)

    monkeypatch.setattr(stage_mod, "place", dying_place)
    triage.lookahead = d1.triage_stage.lookahead = 0
    with pytest.raises(Kill):
        triage.run_once(limit=1)
    monkeypatch.setattr(stage_mod, "place", real_place)


def test_a_mark_that_fails_then_a_retake_keeps_the_version_chain(tmp_path, monkeypatch):
    """The exam book cannot be written when the first SR is placed (a full disk); a retake comes within the
    quiet time: its version (the sweep's, once the exam is quiet) is 2 and names version 1."""
    cfg = _daemon(tmp_path)
    study = "1.2.826.0.1.3680043.8.498.91"
    exam(cfg, FOUR, study)
    daemon = Daemon(cfg)
    stage = daemon.triage_stage
    real = stage.exams.report_placed
    monkeypatch.setattr(stage.exams, "report_placed", _fail)
    monkeypatch.setattr(daemon, "sweep_reports", lambda final=False: 0)    # daemon mode: quiet time not over
    daemon.run_once()
    monkeypatch.setattr(stage.exams, "report_placed", real)
    [first] = sent_srs(daemon)
    exam(cfg, [("L", "MLO", 0.5, 8)], study, name="retake")
    daemon.run_once()
    assert len(sent_srs(daemon)) == 1                       # a change after the first SR: the sweep's
    assert stage.sweep_reports(now=time.time() + EXAM_QUIET_S + 1) == 1
    daemon.run_once()
    first_again, second = sent_srs(daemon)
    assert first_again.SOPInstanceUID == first.SOPInstanceUID and int(second.InstanceNumber) == 2
    [before] = second.PredecessorDocumentsSequence
    assert str(before.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID) == str(first.SOPInstanceUID)


def test_the_sr_of_a_commit_cut_by_a_crash_and_a_retake_triaged_first_make_one_chain(tmp_path, monkeypatch):
    """A crash after the completing LMLO's SR is published but before its commit; at the restart a waiting
    retake is triaged first (items in flight go last): every SR delivered has its own version number."""
    cfg = _daemon(tmp_path)
    _crash_in_the_completing_commit(cfg, monkeypatch, "1.2.826.0.1.3680043.8.498.92", [("L", "MLO", 0.3, 7), ("R", "CC", 0.45, 9)], publish=True)
    d2 = Daemon(cfg)                                           # the restart
    d2.run_once()
    srs = sent_srs(d2)
    numbers = sorted(int(s.InstanceNumber) for s in srs)
    assert numbers == list(range(1, len(srs) + 1)), f"two SRs share a version number: {numbers}"
    assert all("PredecessorDocumentsSequence" in s for s in srs if int(s.InstanceNumber) > 1)


def test_a_retake_after_the_clock_was_set_back_gets_its_version(tmp_path, monkeypatch):
    """The sweep makes an open exam's SR with the clock an hour fast; the clock is set back and a retake
    comes: the exam's records are numbered, not timed, so a later sweep makes the retake's version."""
    cfg = _daemon(tmp_path)
    study = "1.2.826.0.1.3680043.8.498.93"
    exam(cfg, [("R", "CC", 0.4, 9), ("R", "MLO", 0.3, 9)], study)
    daemon = Daemon(cfg)
    monkeypatch.setattr(daemon, "sweep_reports", lambda final=False: 0)   # daemon mode: no run --once end sweep
    daemon.run_once()
    stage = daemon.triage_stage
    fast = time.time() + 3600                                             # the clock, 1 h fast
    assert stage.sweep_reports(now=fast + EXAM_QUIET_S + 1) == 1          # v1 (partial) made and recorded
    daemon.run_once()
    # the clock set back to the right time; a retake of the RCC (the left breast still missing)
    exam(cfg, [("R", "CC", 0.45, 10)], study, name="retake")
    daemon.run_once()
    for later in (EXAM_QUIET_S + 1, 2 * 3600, 3 * 86400):                 # every later sweep, for days
        stage.sweep_reports(now=time.time() + later)
    stage.sweep_reports(final=True)                                       # run --once's end sweep too
    daemon.run_once()
    [exam_id] = {r[0] for r in stage.exams._conn().execute("SELECT exam FROM exam_images")}
    summary = stage.exams.summary(exam_id)
    last = stage.exams.last_report(summary.exam)
    assert last is not None and last[0] == summary.report_key, "the exam's current takes have no SR, ever"


def test_a_combo_exams_synthesised_views_make_one_version_more_each_named_for_what_it_is(tmp_path):
    """The four 2D views, then the modality's four synthesised 2D views: two versions (the first SR, then
    the change once the exam is quiet: run --once's end), each take named once, the synthesised ones as such."""
    cfg = _daemon(tmp_path)
    study = "1.2.826.0.1.3680043.8.498.94"
    four = [("R", "CC", 0.4, 6), ("L", "CC", 0.4, 7), ("R", "MLO", 0.3, 6), ("L", "MLO", 0.3, 7)]
    exam(cfg, four, study)
    daemon = Daemon(cfg)
    daemon.run_once()
    synth = [(lat, v, d + 0.1, s + 20) for lat, v, d, s in four]
    exam(cfg, synth, study, name="s", attrs={f"{lat}{v}": {"ImageType": SYNTH} for lat, v, _d, _s in four})
    daemon.run_once()
    srs = sent_srs(daemon)
    last = srs[-1]
    names = Counter(t.TextValue.split(":")[0] for n in values(last, "Percent Fibroglandular Tissue")
                    for t in n.ContentSequence if t.ValueType == "TEXT")
    own = Counter(line.split(" own priority")[0] for line in comment_lines(last) if " own priority" in line)
    assert len(srs) <= 2, f"{len(srs)} SR versions for one exam"
    assert all(c == 1 for c in names.values()), f"views named twice: {names}"
    assert all(c == 1 for c in own.values()) and sum(1 for n in names if "synthesised 2D" in n) == 4


def test_a_view_received_but_not_read_is_not_called_missing(tmp_path, monkeypatch):
    """The LMLO is delivered but its analysis fails: the exam's SR does not say it was not taken."""
    cfg = _daemon(tmp_path)
    exam(cfg, [("R", "CC", 0.4, 6), ("L", "CC", 0.4, 7), ("R", "MLO", 0.3, 6), ("L", "MLO", 0.3, 7)],
         "1.2.826.0.1.3680043.8.498.95")
    real = tstage.TriageStage.prepare

    def prepare(self, item):
        out, ds = real(self, item)
        if ds is not None and f"{ds.ImageLaterality}{ds.ViewPosition}" == "LMLO":
            return tstage.not_applicable("pixels could not be analysed (ValueError)", ds, status="failed"), ds
        return out, ds

    monkeypatch.setattr(tstage.TriageStage, "prepare", prepare)
    daemon = Daemon(cfg)
    daemon.run_once()
    sent = [pydicom.dcmread(p, stop_before_pixels=True) for p in daemon.spool.dir("sent").glob("*.dcm")]
    assert any(getattr(d, "ViewPosition", "") == "MLO" and getattr(d, "ImageLaterality", "") == "L" for d in sent)
    exam_srs = [s for s in sent_srs(daemon) if any(line.startswith("exam priority") for line in comment_lines(s))]
    lines = comment_lines(exam_srs[-1])
    assert "missing: LMLO" not in lines, "the SR says a delivered view is missing"
    assert any(line.startswith("no reading: LMLO (not received, or not read") for line in lines)


def test_an_open_exam_swept_after_a_weeks_stop_still_gets_its_sr(tmp_path, monkeypatch):
    cfg = _daemon(tmp_path)
    exam(cfg, [("R", "CC", 0.4, 9), ("R", "MLO", 0.3, 9)], "1.2.826.0.1.3680043.8.498.96")
    daemon = Daemon(cfg)
    monkeypatch.setattr(daemon, "sweep_reports", lambda final=False: 0)   # the daemon stops before the sweep
    daemon.run_once()
    stage = daemon.triage_stage
    later = time.time() + 8 * 86400
    made = stage.sweep_reports(now=later) + stage.sweep_reports(final=True, now=later)
    assert made == 1, "the open exam's SR is never made"


def test_a_reload_between_two_makes_of_an_sr_quarantines_nothing(tmp_path, monkeypatch):
    """The first SR is placed but not marked (a full disk); a reload changes the station name; the sweep
    finds the SR made and makes no other under its UID: nothing is quarantined as a conflict."""
    cfg = _daemon(tmp_path)
    exam(cfg, FOUR, "1.2.826.0.1.3680043.8.498.98")
    daemon = Daemon(cfg)
    stage = daemon.triage_stage
    real = stage.exams.report_placed
    monkeypatch.setattr(stage.exams, "report_placed", _fail)
    monkeypatch.setattr(daemon, "sweep_reports", lambda final=False: 0)
    daemon.run_once()
    monkeypatch.setattr(stage.exams, "report_placed", real)
    stage.reconfigure(dataclasses.replace(cfg, station_name="MOBILE_CLINIC_02"))   # a reload
    stage.sweep_reports(now=time.time() + EXAM_QUIET_S + 1)
    daemon.run_once()
    quarantined = list(daemon.spool.quarantined())
    assert quarantined == []
    assert len(sent_srs(daemon)) == 1


def test_the_sweep_waits_while_views_wait_before_the_triage(tmp_path):
    """After a long stop an exam's last view may still wait in anonymized/: the sweep does not call the
    exam quiet until the pipeline has caught up (nor while the disk is low)."""
    cfg = _daemon(tmp_path)
    study = "1.2.826.0.1.3680043.8.498.97"
    exam(cfg, [("L", "MLO", 0.3, 7)], study)
    daemon = Daemon(cfg)
    daemon.scanner.scan(may_adopt=True)
    daemon.runners[0].drain()
    assert daemon.spool.ready(ANONYMIZED) and not daemon._caught_up()
    daemon.process_pipeline()
    assert not daemon.spool.ready(ANONYMIZED) and daemon._caught_up()
    daemon._scan_pending = 1                    # a file in the inbox that can never be taken in holds nothing
    assert daemon._caught_up()
    daemon.disk.low = True
    assert not daemon._caught_up()


def test_an_sr_that_cannot_be_built_holds_back_no_mammogram_and_the_sweep_makes_it_later(tmp_path, monkeypatch):
    """Building the exam's SR fails in the commit of the image that completes the exam: the four images are
    delivered all the same (none quarantined), and the sweep makes the SR once it can be built."""
    from medsendx_edge.triage import report

    cfg = _daemon(tmp_path)
    exam(cfg, FOUR, "1.2.826.0.1.3680043.8.498.99")
    daemon = Daemon(cfg)
    real = report.exam_cad_sr
    monkeypatch.setattr(report, "exam_cad_sr", lambda *a, **k: (_ for _ in ()).throw(KeyError("broken")))
    assert daemon.run_once() == 0
    assert list(daemon.spool.quarantined()) == [] and sent_srs(daemon) == []
    assert len(list(daemon.spool.dir("sent").glob("*.dcm"))) == 4
    monkeypatch.setattr(report, "exam_cad_sr", real)
    assert daemon.triage_stage.sweep_reports(final=True) == 1
    assert daemon.run_once() == 0
    [sr] = sent_srs(daemon)
    assert len(values(sr, "Percent Fibroglandular Tissue")) == 4 and int(sr.InstanceNumber) == 1


def test_a_version_recorded_but_never_published_is_made_again_in_its_place(tmp_path, monkeypatch):
    """(A second review.) Version 1 is recorded, then its publish fails (a card remounted read-only: the
    completing mammogram is quarantined with the reason): the sweep makes version 1 again, under its number;
    the exam is not left without an SR."""
    cfg = _daemon(tmp_path)
    study = "1.2.826.0.1.3680043.8.498.201"
    exam(cfg, [("R", "CC", 0.4, 6), ("L", "CC", 0.4, 7), ("R", "MLO", 0.3, 6), ("L", "MLO", 0.3, 7)], study)
    d = Daemon(cfg)
    failed = sr_publish_fails(monkeypatch)
    d.run_once()                       # ends with sweep_reports(final=True)
    assert failed, "the exam SR was attempted"
    quarantined = list(d.spool.quarantined())
    assert len(quarantined) == 1       # the completing mammogram: its publish failed (a read-only card)
    # the sweep ran (run --once's final sweep) and again now: still no SR
    d.triage_stage.sweep_reports(final=True)
    d.run_once()
    assert len(sent_srs(d)) == 1 and int(sent_srs(d)[0].InstanceNumber) == 1


def test_a_version_lost_in_a_power_cut_is_never_named_by_the_next(tmp_path, monkeypatch):
    """(A second review.) Version 1 is recorded, then the power goes before anything of its image's commit
    is written; at the restart a waiting retake is triaged first: the SRs delivered are numbered from 1
    without a gap, and each predecessor named was delivered."""
    cfg = _daemon(tmp_path)
    _crash_in_the_completing_commit(cfg, monkeypatch, "1.2.826.0.1.3680043.8.498.202", [("L", "MLO", 0.3, 7), ("R", "CC", 0.45, 9)], publish=False)
    d2 = Daemon(cfg)
    d2.run_once()                                          # ends with the final sweep
    srs = sent_srs(d2)
    sent_uids = {str(s.SOPInstanceUID) for s in srs}
    for s in srs:
        for pred in s.get("PredecessorDocumentsSequence", []):
            uid = str(pred.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            assert uid in sent_uids, f"version {s.InstanceNumber} names {uid}, never sent"
    assert sorted(int(s.InstanceNumber) for s in srs) == list(range(1, len(srs) + 1))


def test_an_exam_recorded_while_srs_were_on_keeps_its_sr_after_they_were_off_a_while(tmp_path, monkeypatch):
    """(A second review.) An open exam recorded with SRs on; SRs turned off, a sweep runs, turned on again:
    the exam still gets its SR.  What an image changes while SRs are off gets none."""
    cfg = _daemon(tmp_path)
    exam(cfg, [("R", "CC", 0.4, 6), ("R", "MLO", 0.3, 6)], "1.2.826.0.1.3680043.8.498.206")  # open exam, SRs on
    d = Daemon(cfg)
    monkeypatch.setattr(d, "sweep_reports", lambda final=False: 0)    # daemon mode: not quiet yet
    d.run_once()
    assert sent_srs(d) == []
    stage = d.triage_stage
    off = dataclasses.replace(cfg, triage=dataclasses.replace(cfg.triage, send_sr=False))
    stage.reconfigure(off)                      # the operator turns SRs off for a while ...
    stage.sweep_reports()                       # ... the worker's sweep runs meanwhile (holds everything)
    stage.reconfigure(cfg)                      # ... and back on
    assert stage.sweep_reports(now=time.time() + 3600) == 1, "the exam recorded while SRs were on gets no SR"
    exam(cfg, [("L", "CC", 0.4, 7)], "1.2.826.0.1.3680043.8.498.206", name="off")
    stage.reconfigure(off)
    d.run_once()                                # an image joins while SRs are off
    stage.reconfigure(cfg)
    assert stage.sweep_reports(now=time.time() + 3600) == 0


# (A third review.) SRs turned off for a while; a copy of an image already received comes meanwhile (or any redo whose takes
# are those of the last SR): the 'none to make' mark overwrites the exam book's row of the delivered version 1.
# SRs on again, a retake: the sweep makes a second, different 'version 1' with no predecessor.
def test_off_mark_on_a_duplicate_erases_version_1(tmp_path, monkeypatch):
    cfg = _daemon(tmp_path)
    study = "1.2.826.0.1.3680043.8.498.301"
    made = exam(cfg, FOUR, study)
    d = Daemon(cfg)
    d.run_once()
    [v1] = sent_srs(d)
    assert int(v1.InstanceNumber) == 1
    stage = d.triage_stage
    off = dataclasses.replace(cfg, triage=dataclasses.replace(cfg.triage, send_sr=False))
    stage.reconfigure(off)
    made[0].save_as(cfg.inbox / "dup.dcm", enforce_file_format=True)     # the RCC sent again by the modality
    d.run_once()
    stage.reconfigure(cfg)
    exam(cfg, [("L", "MLO", 0.5, 8)], study, name="retake")
    d.run_once()
    stage.sweep_reports(now=time.time() + EXAM_QUIET_S + 1)
    d.run_once()
    srs = sent_srs(d)
    numbers = [int(s.InstanceNumber) for s in srs]
    assert len(srs) == 2
    assert numbers == [1, 2], f"two different SRs delivered as version {numbers}"


# (A third review.) The sweep makes an exam's SR but cannot mark it (a full disk, as in test 7 of the suite); a reload changes
# the station name; the next sweep makes the same item again (same id: the redo branch), with another instance
# UID, records that UID, but does not publish it (the item is in the spool already).  The next version names a
# predecessor that was never delivered.
def _pred(sr):
    return str(sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
               .ReferencedSOPInstanceUID)


def test_a_sweep_remake_after_a_reload_records_an_instance_never_sent(tmp_path, monkeypatch):
    cfg = _daemon(tmp_path)
    study = "1.2.826.0.1.3680043.8.498.302"
    exam(cfg, [("R", "CC", 0.4, 6), ("R", "MLO", 0.3, 6)], study)       # an open exam (the left breast to come)
    d = Daemon(cfg)
    monkeypatch.setattr(d, "sweep_reports", lambda final=False: 0)      # daemon mode: not quiet yet
    d.run_once()
    stage = d.triage_stage
    real = stage.exams.report_placed
    monkeypatch.setattr(stage.exams, "report_placed", _fail)            # a full disk at the mark
    assert stage.sweep_reports(now=time.time() + EXAM_QUIET_S + 1) == 1  # v1 published, not marked
    monkeypatch.setattr(stage.exams, "report_placed", real)
    d.run_once()
    [v1] = sent_srs(d)
    stage.reconfigure(dataclasses.replace(cfg, station_name="MOBILE_CLINIC_02"))   # a reload
    stage.sweep_reports(now=time.time() + EXAM_QUIET_S + 1)             # finds v1 made, marks it
    d.run_once()
    exam(cfg, [("L", "CC", 0.4, 7), ("L", "MLO", 0.3, 7)], study, name="late")     # the left breast
    d.run_once()
    stage.sweep_reports(now=time.time() + EXAM_QUIET_S + 1)
    d.run_once()
    srs = sent_srs(d)
    assert [int(s.InstanceNumber) for s in srs] == [1, 2]
    sent = {str(s.SOPInstanceUID) for s in srs}
    assert _pred(srs[1]) in sent, f"version 2 names {_pred(srs[1])}, never sent (v1 sent: {v1.SOPInstanceUID})"


# (A third review.) A crash after the completing image's SR is published but before its commit (test 2 of the suite); the
# daemon restarts under a changed configuration (a new station name: any restart reads the file again, an
# upgrade changes the software version the UID is made of) and the route stage takes the SR out first.  The
# image's redo makes the SR again under the same item id with another instance UID.
def test_the_redo_of_a_commit_after_a_restart_with_another_config(tmp_path, monkeypatch):
    cfg = _daemon(tmp_path)
    study = "1.2.826.0.1.3680043.8.498.303"
    _crash_in_the_completing_commit(cfg, monkeypatch, study, FOUR[3:], publish=True)
    cfg2 = dataclasses.replace(cfg, station_name="MOBILE_CLINIC_02")
    d2 = Daemon(cfg2)
    d2.recover()
    route = next(r for r in d2.runners if r.stage.input_queue == TRIAGED)
    route.drain()                                            # the SR on its way first
    d2.uploader.drain_once()
    d2.run_once()
    exam(cfg, [("L", "MLO", 0.5, 8)], study, name="retake")
    d2.run_once()
    d2.triage_stage.sweep_reports(now=time.time() + EXAM_QUIET_S + 1)
    d2.run_once()
    srs = sent_srs(d2)
    sent = {str(s.SOPInstanceUID) for s in srs}
    v2 = srs[-1]
    pred = str(v2.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    assert pred in sent, f"version {v2.InstanceNumber} names {pred}, never sent"
    assert list(d2.spool.quarantined()) == []


# (A third review.) Version 1's mark fails (a full disk, as in test 1 of the suite); while the route stage holds that SR
# (claimed: <id>.dcm.work in triaged/, its upload row not yet written), the triage thread reads a retake of the
# exam: ``_in_spool`` does not see a claimed item in triaged/, so version 1 is taken for unpublished and made
# again, with other content, under number 1: two different version 1s are delivered.
def test_a_version_held_by_the_route_stage_is_not_made_again(tmp_path, monkeypatch):
    cfg = _daemon(tmp_path)
    study = "1.2.826.0.1.3680043.8.498.304"
    exam(cfg, FOUR, study)
    d = Daemon(cfg)
    stage = d.triage_stage
    anon, triage = d.runners[0], next(r for r in d.runners if r.stage is stage)
    real = stage.exams.report_placed
    monkeypatch.setattr(stage.exams, "report_placed", _fail)
    d.scanner.scan(may_adopt=True)
    anon.drain()
    triage.drain()
    monkeypatch.setattr(stage.exams, "report_placed", real)
    [exam_id] = {r[0] for r in stage.exams._conn().execute("SELECT exam FROM exam_images")}
    maker = stage.exams.last_report(exam_id)[4]
    held = d.spool.claim(TRIAGED, maker)                 # the route runner (worker thread) has it in hand
    assert held is not None
    exam(cfg, [("L", "MLO", 0.5, 8)], study, name="retake")
    d.scanner.scan(may_adopt=True)
    anon.drain()
    triage.drain()                                        # the triage thread, meanwhile
    d.spool.unclaim(held)
    d.run_once()
    stage.sweep_reports(now=time.time() + EXAM_QUIET_S + 1)
    d.run_once()
    numbers = [int(s.InstanceNumber) for s in sent_srs(d)]
    assert numbers == list(range(1, len(numbers) + 1)), f"two different SRs share a number: {numbers}"


# (A third review.) An open exam (the left breast not taken) is recorded while the truck's clock is a day fast; the clock is
# then put right (NTP once the uplink is back).  The sweep's quiet test is still the wall clock against each
# record's time: neither the daemon's sweeps for the next hours nor run --once's end sweep (quiet 0) make the
# exam's SR: its delivered images have none until the wall clock passes the record's time.
def test_an_open_exam_recorded_with_a_fast_clock_gets_its_sr(tmp_path, monkeypatch):
    cfg = _daemon(tmp_path)
    exam(cfg, [("R", "CC", 0.4, 9), ("R", "MLO", 0.3, 9)], "1.2.826.0.1.3680043.8.498.305")
    d = Daemon(cfg)
    monkeypatch.setattr(d, "sweep_reports", lambda final=False: 0)
    stage = d.triage_stage
    real_record = stage.exams.record
    monkeypatch.setattr(stage.exams, "record",
                        lambda *a, **k: real_record(*a, **{**k, "now": time.time() + 86400}))   # a day fast
    d.run_once()
    monkeypatch.setattr(stage.exams, "record", real_record)                                  # put right
    made = 0
    for later in (EXAM_QUIET_S + 1, 3600, 6 * 3600):
        made += stage.sweep_reports(now=time.time() + later)
    made += stage.sweep_reports(final=True)            # run --once's end: "all of them"
    assert made == 1, "the open exam's delivered images get no SR while the clock is behind their records"


# An image recorded by the triage and then quarantined (the PACS refuses it for good, a placement that fails for
# good) never reaches the PACS: the exam's SR read it all the same, and named it in its evidence.
def _evidence(sr):
    return {str(ref.ReferencedSOPInstanceUID) for ev in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
            for series in ev.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}


def _refuse_lmlo(monkeypatch, refused):
    return refuse(monkeypatch, lambda ds: f"{getattr(ds, 'ImageLaterality', '')}{getattr(ds, 'ViewPosition', '')}" == "LMLO",
                  refused)


def _daemon_refusing_lmlo(cfg, monkeypatch):
    """A daemon whose destination refuses LMLO for good, its sweep held (daemon mode: the exam not quiet yet):
    (the daemon, the refusals as (export id, SOP instance UID), the real send)."""
    d = Daemon(cfg)
    refused: list[tuple[str, str]] = []
    real_send = _refuse_lmlo(monkeypatch, refused)
    monkeypatch.setattr(d, "sweep_reports", lambda final=False: 0)
    return d, refused, real_send


def test_an_image_quarantined_at_upload_is_withdrawn_from_the_exams_sr_and_back_once_requeued(tmp_path, monkeypatch):
    from medsendx_edge.upload.destinations.directory import DirectoryDestination

    cfg = _daemon(tmp_path)
    study = "1.2.826.0.1.3680043.8.498.401"
    exam(cfg, FOUR, study)
    d, refused, real_send = _daemon_refusing_lmlo(cfg, monkeypatch)
    d.run_once()
    [(_export_id, lmlo_uid)] = refused
    [(_stage, lmlo_id)] = d.spool.quarantined()
    [v1] = sent_srs(d)
    assert lmlo_uid in _evidence(v1)                  # made in the completing commit, before the refusal
    stage = d.triage_stage
    summary = stage.exams.summary(stage.exams.exam_of(lmlo_id))
    assert summary.withdrawn == ["LMLO"] and summary.missing == [] and lmlo_id not in summary.latest
    # once quiet, the sweep makes version 2 without it, saying why
    assert stage.sweep_reports(now=time.time() + EXAM_QUIET_S + 1) == 1
    d.run_once()
    v1, v2 = sent_srs(d)
    assert int(v2.InstanceNumber) == 2 and lmlo_uid not in _evidence(v2)
    assert "no reading: LMLO (taken, but held on the truck in quarantine: not sent)" in comment_lines(v2)
    assert _pred(v2) == str(v1.SOPInstanceUID)
    # the cause fixed, the image requeued (the daemon's own console): read again, version 3 names it
    monkeypatch.setattr(DirectoryDestination, "send", real_send)
    d.spool.requeue(lmlo_id)
    assert lmlo_id in stage.exams.summary(stage.exams.exam_of(lmlo_id)).latest
    d.run_once()
    assert stage.sweep_reports(now=time.time() + EXAM_QUIET_S + 1) == 1
    d.run_once()
    v3 = sent_srs(d)[-1]
    assert int(v3.InstanceNumber) == 3 and lmlo_uid in _evidence(v3) and _pred(v3) == str(v2.SOPInstanceUID)
    assert not any(line.startswith("no reading") for line in comment_lines(v3))


def test_a_quarantine_the_exam_book_missed_is_caught_up_at_start_and_a_command_line_requeue_at_the_sweep(
        tmp_path, monkeypatch):
    """The exam book cannot be told of the quarantine (locked, full: the listener fails): the next start
    withdraws the image.  A requeue by ``medsendx-edge requeue`` (another process, no listener): the sweep
    restores it.  An image deleted from quarantine stays withdrawn."""
    from medsendx_edge.spool import Spool

    cfg = _daemon(tmp_path)
    exam(cfg, FOUR, "1.2.826.0.1.3680043.8.498.402")
    d, refused, _ = _daemon_refusing_lmlo(cfg, monkeypatch)
    monkeypatch.setattr(d.triage_stage.exams, "withdraw", _fail)
    d.run_once()
    [(_stage, lmlo_id)] = d.spool.quarantined()
    book = d.triage_stage.exams
    assert lmlo_id in book.summary(book.exam_of(lmlo_id)).latest    # not told
    d2 = Daemon(cfg)
    d2.recover()                                                    # a start
    book = d2.triage_stage.exams
    assert book.summary(book.exam_of(lmlo_id)).withdrawn == ["LMLO"]
    Spool(cfg.spool_dir, cfg.inbox).requeue(lmlo_id)                # the command line's spool: no listener
    assert book.summary(book.exam_of(lmlo_id)).withdrawn == ["LMLO"]
    d2.triage_stage.sweep_reports()
    assert lmlo_id in book.summary(book.exam_of(lmlo_id)).latest
    # quarantined again, then deleted from quarantine by hand: it never reaches the PACS, stays withdrawn
    d2.run_once()
    assert [q for _s, q in d2.spool.quarantined()] == [lmlo_id]
    for path in d2.spool.quarantine_dir("upload").glob(lmlo_id + "*"):
        path.unlink()
    d2.triage_stage.sweep_reports()
    assert book.summary(book.exam_of(lmlo_id)).withdrawn == ["LMLO"]
