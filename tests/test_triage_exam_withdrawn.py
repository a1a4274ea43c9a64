"""An image quarantined after the triage recorded it is withdrawn from its exam (triage/exam.py): what a hostile
review of the first version found (2026-12-06).  Each of these failed on that version; the last is a limit,
said to the operator."""
from __future__ import annotations

import json
import os
import time

import numpy as np

from medsendx_edge.daemon import Daemon
from medsendx_edge.spool import OUTBOX, SENT
from medsendx_edge.triage.exam import EXAM_QUIET_S, ExamBook
from medsendx_edge.triage.phantom import phantom_dataset
from test_triage_exam_sr import (FOUR, _daemon, _daemon_refusing_lmlo, _evidence, _refuse_lmlo, exam, later, refuse,
                                 refuse_mammograms, sent_srs)



def test_a_requeued_image_refused_again_gets_its_withdrawal_published(tmp_path, monkeypatch):
    """LMLO refused (v1 in-commit names it, v2 by the sweep without it), requeued while the PACS still refuses:
    the sweep makes v3 with it (restored), the upload refuses it again.  The sweep's v4 (without it again) has
    the takes of v2, so the same item id as v2: it is recorded as made but never published (v2's item is in the
    spool), and the PACS's latest SR (v3) names an image it will never get."""
    cfg = _daemon(tmp_path)
    exam(cfg, FOUR, "1.2.826.0.1.3680043.8.498.701")
    d, refused, _ = _daemon_refusing_lmlo(cfg, monkeypatch)
    d.run_once()
    lmlo_uid = refused[0][1]
    [(_s, lmlo_id)] = d.spool.quarantined()
    stage = d.triage_stage
    assert stage.sweep_reports(now=later()) == 1
    d.run_once()
    assert len(sent_srs(d)) == 2
    d.spool.requeue(lmlo_id)                      # the PACS not fixed yet
    assert stage.sweep_reports(now=later()) == 1  # v3: read again
    d.run_once()                                  # v3 delivered, LMLO refused again
    assert [q for _s, q in d.spool.quarantined()] == [lmlo_id]
    srs = sent_srs(d)
    assert [int(s.InstanceNumber) for s in srs] == [1, 2, 3] and lmlo_uid in _evidence(srs[-1])
    stage.sweep_reports(now=later())              # v4: without it again
    d.run_once()
    srs = sent_srs(d)
    assert lmlo_uid not in _evidence(srs[-1]), (
        f"the PACS's latest SR (version {srs[-1].InstanceNumber}) names the refused image; versions delivered: "
        f"{[int(s.InstanceNumber) for s in srs]}")


def test_a_duplicate_copy_of_a_withdrawn_image_is_not_read_in_its_place(tmp_path, monkeypatch):
    """The modality sends LMLO twice; the route keeps the second copy as a duplicate (never sent). The PACS
    refuses the first copy: withdrawn, and the book now reads the second copy, which never reaches the PACS
    either (the route recorded it as a copy of the quarantined one): the SR names LMLO's UID all the same."""
    cfg = _daemon(tmp_path)
    made = exam(cfg, FOUR, "1.2.826.0.1.3680043.8.498.702")
    made[3].save_as(cfg.inbox / "9again.dcm", enforce_file_format=True)   # the same image sent again
    import os
    os.utime(cfg.inbox / "9again.dcm", (0, 0))
    d, refused, _ = _daemon_refusing_lmlo(cfg, monkeypatch)
    d.run_once()
    lmlo_uid = refused[0][1]
    assert len({u for _i, u in refused}) == 1
    stage = d.triage_stage
    [(_s, first_copy)] = d.spool.quarantined()
    stage.sweep_reports(now=later())
    d.run_once()
    srs = sent_srs(d)
    summary = stage.exams.summary(stage.exams.exam_of(first_copy))
    assert lmlo_uid not in _evidence(srs[-1]) and summary.withdrawn == ["LMLO"], (
        f"latest SR v{srs[-1].InstanceNumber} names the refused LMLO via its never-sent duplicate; "
        f"withdrawn={summary.withdrawn}")


def _side(lat, view, pd, sop):
    return ({"exam": "e1", "triage": "done", "laterality": lat, "view": view, "pd": pd, "metrics": {}},
            ("1.2.840.10008.5.1.4.1.1.1.2", sop, "9.9"))


def test_withdrawing_the_measured_take_behind_a_blank_retake_changes_the_srs_key(tmp_path):
    """A blank retake of RMLO (no density) does not supersede the measured RMLO for the breast's density:
    the SR names the measured take in the breast's evidence.  That take withdrawn (refused by the PACS), the
    breast loses its category and the SR its reference, but the report key (``latest``) is unchanged, so the
    sweep finds the SR "made already" and the version out keeps naming the refused image."""
    book = ExamBook(tmp_path / "exams.db")
    for item, (lat, view, pd) in {"1": ("R", "CC", 0.4), "2": ("R", "MLO", 0.3), "3": ("R", "MLO", None)}.items():
        side, sop = _side(lat, view, pd, f"1.2.3.{item}")
        book.record(item, side, now=0, sop=sop)
    before = book.summary("e1")
    assert "1.2.3.2" in {r[1] for r in before.breast_refs["R"]}
    book.withdraw(["2"])
    after = book.summary("e1")
    assert "1.2.3.2" not in {r[1] for refs in after.breast_refs.values() for r in refs}
    assert after.report_key != before.report_key, "the SR's content changed, its key did not: no new version"


def test_an_image_withdrawn_while_the_sweep_builds_the_sr_is_swept_again(tmp_path, monkeypatch):
    """The sweep reads the exam (RCC in it), builds its SR (tens of ms of highdicom); meanwhile the uploader
    thread quarantines RCC (the PACS refuses it): the withdrawal takes the next record number.  The sweep then
    reads the exam's last record number *after* the build and marks the SR placed up to it, the withdrawal
    included: the exam is never unreported again and the SR naming RCC stays the latest."""
    from medsendx_edge.spool import OUTBOX

    cfg = _daemon(tmp_path)
    exam(cfg, FOUR[:3], "1.2.826.0.1.3680043.8.498.704")     # LMLO never comes: the sweep's SR
    d = Daemon(cfg)
    d.recover()
    d.scanner.scan(may_adopt=True)
    d.process_pipeline()                                      # all in the outbox, nothing uploaded yet
    stage = d.triage_stage
    [rcc] = [r[0] for r in stage.exams._conn().execute(
        "SELECT id FROM exam_images WHERE laterality = 'R' AND view = 'CC'")]
    assert rcc in d.spool.ready(OUTBOX)
    real, raced = stage._exam_sr, []

    def racing(summary, version, previous):
        built = real(summary, version, previous)
        if not raced:   # the uploader thread, meanwhile: the PACS refuses RCC for good
            raced.append(1)
            item = d.spool.claim(OUTBOX, rcc)
            d.spool.quarantine(item, "upload", "refused (a test)", "PermanentUploadError")
        return built

    monkeypatch.setattr(stage, "_exam_sr", racing)
    assert stage.sweep_reports(now=later()) == 1             # v1, naming RCC
    assert raced and stage.exams.summary(stage.exams.exam_of(rcc)).withdrawn == ["RCC"]
    monkeypatch.setattr(stage, "_exam_sr", real)
    assert stage.sweep_reports(now=later()) == 1, "the withdrawal during the build is never swept"


def test_an_exam_all_of_whose_images_are_refused_says_its_sr_out_names_them(tmp_path, monkeypatch, log_lines):
    """Every image of the exam refused by the PACS for good (after the in-commit SR named all four): an SR
    needs evidence, so no version can replace it.  The sweep says so to the operator (the SR out names
    images the PACS does not have) and marks the exam, once: the next sweeps do not make or say it again."""
    import json

    cfg = _daemon(tmp_path)
    exam(cfg, FOUR, "1.2.826.0.1.3680043.8.498.705")
    refuse_mammograms(monkeypatch)
    d = Daemon(cfg)
    monkeypatch.setattr(d, "sweep_reports", lambda final=False: 0)
    d.run_once()
    assert len(list(d.spool.quarantined())) == 4 and len(sent_srs(d)) == 1
    stage = d.triage_stage
    assert stage.sweep_reports(now=later()) == 0 and stage.sweep_reports(now=later()) == 0
    said = [json.loads(line) for line in log_lines.getvalue().splitlines() if "report_names_withdrawn" in line]
    assert len(said) == 1 and said[0]["version"] == 1 and said[0]["count"] == 4
    assert stage.exams.unreported() == []


def test_a_requeue_cut_by_a_crash_before_its_reason_is_removed_restores_the_image(tmp_path, monkeypatch):
    """``Spool.requeue`` moves the file back to its queue, then removes the ``.reason.json``, then tells the
    listeners.  A crash between the move and the unlink leaves the file in the outbox (it is delivered) and a
    stale reason: reconcile takes the reason for the truth (``quarantined()`` lists reasons), so the image is
    withdrawn at every start and never restored although it is in a queue (``holds``)."""
    import os

    from medsendx_edge.spool import OUTBOX

    cfg = _daemon(tmp_path)
    exam(cfg, FOUR, "1.2.826.0.1.3680043.8.498.706")
    d = Daemon(cfg)
    _refuse_lmlo(monkeypatch, [])
    monkeypatch.setattr(d, "sweep_reports", lambda final=False: 0)
    d.run_once()
    [(stage_name, lmlo)] = d.spool.quarantined()
    qdir = d.spool.quarantine_dir(stage_name)
    os.replace(qdir / f"{lmlo}.dcm", d.spool.dir(OUTBOX) / f"{lmlo}.dcm")   # requeue's move ... and the crash
    d2 = Daemon(cfg)
    d2.recover()
    d2.triage_stage.sweep_reports()
    assert d2.spool.holds(lmlo)
    book = d2.triage_stage.exams
    assert lmlo in book.summary(book.exam_of(lmlo)).latest, "in the outbox, on its way to the PACS, still withdrawn"


# A second review (of 76b33a8's fixes).


def test_a_measured_take_behind_a_blank_retake_refused_then_requeued_reaches_the_pacs_latest_sr(tmp_path, monkeypatch):
    """LMLO measured, then a blank LMLO retake (the breast still graded from the measured one).  The sweep's
    v2 (key {..., +LMLO}) is out; the PACS refuses the measured LMLO: v3 without it (no category for L);
    requeued and delivered: the key is v2's again, so is the sweep's item id: v4 is recorded, never published,
    and the PACS's latest SR stays v3, without the left breast's category."""
    cfg = _daemon(tmp_path)
    study = "1.2.826.0.1.3680043.8.498.811"
    exam(cfg, FOUR, study)
    ds, _ = phantom_dataset(512, 416, density=0.3, seed=7, laterality="L", view="MLO", study_uid=study)
    ds.PixelData = np.random.default_rng(0).normal(2000, 20, size=(512, 416)).clip(0, 4095).astype(np.uint16).tobytes()
    ds.save_as(cfg.inbox / "4LMLO.dcm", enforce_file_format=True)
    os.utime(cfg.inbox / "4LMLO.dcm", (0, 0))
    d = Daemon(cfg)
    monkeypatch.setattr(d, "sweep_reports", lambda final=False: 0)
    d.recover()
    d.scanner.scan(may_adopt=True)
    d.process_pipeline()                                 # triaged and routed, nothing uploaded yet
    stage = d.triage_stage
    book = stage.exams
    [lmlo] = [r[0] for r in book._conn().execute(
        "SELECT id FROM exam_images WHERE laterality = 'L' AND view = 'MLO' AND pd IS NOT NULL")]
    e = book.exam_of(lmlo)
    assert book.summary(e).breast_category.get("L")
    assert stage.sweep_reports(now=later()) == 1        # v2: the blank retake joined
    anon_lmlo = book._conn().execute("SELECT sop_uid FROM exam_images WHERE id = ?", (lmlo,)).fetchone()[0]
    real_send = refuse(monkeypatch, lambda ds: str(ds.SOPInstanceUID) == anon_lmlo)
    d.run_once()
    assert [q for _s, q in d.spool.quarantined()] == [lmlo]
    assert stage.sweep_reports(now=later()) == 1        # v3: without it
    d.run_once()
    assert [int(s.InstanceNumber) for s in sent_srs(d)] == [1, 2, 3]
    from medsendx_edge.upload.destinations.directory import DirectoryDestination

    monkeypatch.setattr(DirectoryDestination, "send", real_send)   # the PACS fixed
    d.spool.requeue(lmlo)
    d.run_once()
    stage.sweep_reports(now=later())                    # v4: with it again
    d.run_once()
    srs = sent_srs(d)
    assert anon_lmlo in _evidence(srs[-1]), (
        f"the PACS's latest SR (v{srs[-1].InstanceNumber}) lacks the delivered LMLO; delivered "
        f"{[int(s.InstanceNumber) for s in srs]}, the book's latest v{book.last_report(e)[2]}")


def test_a_resend_quarantined_as_a_conflict_makes_no_new_sr_version(tmp_path, monkeypatch):
    """The modality sends LMLO again under the same SOP Instance UID with other pixels: the triage reads it
    as a duplicate (never read), the route quarantines it (InstanceConflict).  Nothing the SR reads changed,
    yet the withdrawal's '-id#1' changes the key: the sweep makes v2, the same content as v1."""
    cfg = _daemon(tmp_path)
    study = "1.2.826.0.1.3680043.8.498.812"
    made = exam(cfg, FOUR, study)
    again, _ = phantom_dataset(512, 416, density=0.3, seed=99, laterality="L", view="MLO", study_uid=study)
    again.SOPInstanceUID = made[3].SOPInstanceUID
    again.file_meta.MediaStorageSOPInstanceUID = made[3].SOPInstanceUID
    again.SeriesInstanceUID = made[3].SeriesInstanceUID
    again.save_as(cfg.inbox / "9again.dcm", enforce_file_format=True)
    os.utime(cfg.inbox / "9again.dcm", (0, 0))
    d = Daemon(cfg)
    monkeypatch.setattr(d, "sweep_reports", lambda final=False: 0)
    d.run_once()
    stage = d.triage_stage
    [(_s, copy)] = d.spool.quarantined()
    assert d.spool.reason(_s, copy)["error_class"] == "InstanceConflict"
    e = stage.exams.exam_of(copy)
    assert copy in stage.exams.summary(e).duplicate_ids or copy not in stage.exams.summary(e).images
    assert len(sent_srs(d)) == 1
    made_now = stage.sweep_reports(now=later())
    d.run_once()
    assert made_now == 0 and len(sent_srs(d)) == 1, (
        f"a never-read copy quarantined: {[int(s.InstanceNumber) for s in sent_srs(d)]} versions delivered")

def test_a_stale_reason_withdraws_the_image_once_its_delivered_copy_is_pruned_from_sent(tmp_path, monkeypatch):
    """The requeue cut by a crash between its move and the reason's unlink (test_triage_exam_withdrawn's last
    case): the image is delivered, the stale reason stays in quarantine/.  Once sent/ is pruned (retention,
    the disk guard) ``holds`` is false and reconcile withdraws an image the PACS holds: the sweep's next SR
    drops it and says it is held on the truck."""
    cfg = _daemon(tmp_path)
    exam(cfg, FOUR, "1.2.826.0.1.3680043.8.498.821")
    d = Daemon(cfg)
    real = _refuse_lmlo(monkeypatch, [])
    monkeypatch.setattr(d, "sweep_reports", lambda final=False: 0)
    d.run_once()
    [(stage_name, lmlo)] = d.spool.quarantined()
    qdir = d.spool.quarantine_dir(stage_name)
    os.replace(qdir / f"{lmlo}.dcm", d.spool.dir(OUTBOX) / f"{lmlo}.dcm")   # requeue's move ... and the crash
    from medsendx_edge.upload.destinations.directory import DirectoryDestination
    monkeypatch.setattr(DirectoryDestination, "send", real)                 # the PACS fixed
    d2 = Daemon(cfg)
    monkeypatch.setattr(d2, "sweep_reports", lambda final=False: 0)
    d2.run_once()
    assert (d2.spool.dir(SENT) / f"{lmlo}.dcm").exists()                    # delivered
    book = d2.triage_stage.exams
    assert lmlo in book.summary(book.exam_of(lmlo)).latest
    d2.spool.prune(SENT, float("inf"))                                       # retention / disk guard
    d2.triage_stage.reconcile()
    assert lmlo in book.summary(book.exam_of(lmlo)).latest, "delivered to the PACS, withdrawn by a stale reason"

def test_every_image_withdrawn_names_the_version_the_pacs_has_not_one_never_published(tmp_path, monkeypatch, log_lines):
    """v1 is out (the completing commit) naming the four; the sweep recorded v2 and was cut before its publish
    (report_made, then a crash); meanwhile the PACS refused all four.  The warning says version 2 (never
    published) names them; the SR the PACS holds is v1 (and when nothing was ever published it says an SR
    out names them when none is out)."""
    cfg = _daemon(tmp_path)
    exam(cfg, FOUR, "1.2.826.0.1.3680043.8.498.831")
    refuse_mammograms(monkeypatch)
    d = Daemon(cfg)
    monkeypatch.setattr(d, "sweep_reports", lambda final=False: 0)
    d.run_once()
    [v1] = sent_srs(d)
    stage = d.triage_stage
    [(_s, one)] = list(d.spool.quarantined())[:1]
    e = stage.exams.exam_of(one)
    # a sweep's v2, recorded before its publish, and the crash
    stage.exams.report_made(e, "k2", "2.25.1", 2, str(v1.SOPInstanceUID), "an-item-never-published")
    stage.sweep_reports(now=time.time() + EXAM_QUIET_S + 1)
    said = [json.loads(line) for line in log_lines.getvalue().splitlines() if "report_names_withdrawn" in line]
    assert len(said) == 1 and said[0]["version"] == 1, said
