"""A key that comes back (an image withdrawn, then requeued): the exam book's row for that key is the new
version's, unplaced until its SR is (a third review of the withdrawal, of 8be86a1, where these failed: the
row kept the older version's mark)."""
from __future__ import annotations

import os

from medsendx_edge import stage as stage_mod
from medsendx_edge.upload.destinations.directory import DirectoryDestination
from test_triage_exam_sr import FOUR, _daemon, _daemon_refusing_lmlo, _evidence, _pred, exam, later, sent_srs, sr_publish_fails



def _v3_recorded_never_published(tmp_path, monkeypatch, study):
    """v1 (the completing commit, key K1, naming LMLO); the PACS refuses LMLO: v2 by the sweep (key K2); LMLO
    requeued and delivered: the key is K1 again; the sweep records v3 (K1's row upserted: v1's mark kept) and
    its publish fails (a read-only card, a crash)."""
    cfg = _daemon(tmp_path)
    made = exam(cfg, FOUR, study)
    d, refused, real_send = _daemon_refusing_lmlo(cfg, monkeypatch)
    d.run_once()
    [(_s, lmlo)] = d.spool.quarantined()
    stage = d.triage_stage
    assert stage.sweep_reports(now=later()) == 1
    d.run_once()
    monkeypatch.setattr(DirectoryDestination, "send", real_send)
    d.spool.requeue(lmlo)
    d.run_once()
    assert [int(s.InstanceNumber) for s in sent_srs(d)] == [1, 2]
    real = stage_mod.publish_new
    failed = sr_publish_fails(monkeypatch, once=False)
    assert stage.sweep_reports(now=later()) == 0 and failed
    monkeypatch.setattr(stage_mod, "publish_new", real)
    e = stage.exams.exam_of(lmlo)
    last = stage.exams.last_report(e)
    assert last[2] == 3
    return cfg, d, made, refused, e


def test_a_recurring_keys_unpublished_version_is_made_again_in_its_place_not_named(tmp_path, monkeypatch):
    """v3 (key K1 again) recorded, never published; a retake joins: the next version must not name v3 (never
    sent).  K1's row kept v1's mark (seq) through the upsert, so ``unpublished`` (seq IS NULL) is false and v4
    names v3."""
    study = "1.2.826.0.1.3680043.8.498.901"
    cfg, d, _made, _r, e = _v3_recorded_never_published(tmp_path, monkeypatch, study)
    book = d.triage_stage.exams
    assert book.last_report(e)[5] is None, f"v3 not placed, yet its row carries a mark: seq={book.last_report(e)[5]}"


def test_a_recurring_keys_unpublished_version_then_a_retake_names_only_sent_srs(tmp_path, monkeypatch):
    study = "1.2.826.0.1.3680043.8.498.902"
    cfg, d, _made, _r, e = _v3_recorded_never_published(tmp_path, monkeypatch, study)
    exam(cfg, [("R", "CC", 0.45, 9)], study, name="retake")   # a retake joins before the next sweep
    d.run_once()
    d.triage_stage.sweep_reports(now=later())
    d.run_once()
    srs = sent_srs(d)
    sent = {str(s.SOPInstanceUID) for s in srs}
    numbers = [int(s.InstanceNumber) for s in srs]
    for s in srs[1:]:
        assert _pred(s) in sent, f"v{s.InstanceNumber} names an SR never sent (versions sent: {numbers})"
    assert numbers == list(range(1, len(srs) + 1)), numbers


def test_a_recurring_keys_unpublished_version_then_a_duplicate_still_reaches_the_pacs(tmp_path, monkeypatch):
    """v3 (with LMLO again) recorded, never published; the modality sends RCC again (a duplicate: nothing the SR
    reads changes, but it is images[-1], so the sweep's item id differs).  ``unpublished`` is false (v1's mark),
    so the sweep finds v3 "made already" and report_none marks K1's row placed: v3 is never published and the
    PACS's latest SR (v2) never names the delivered LMLO."""
    study = "1.2.826.0.1.3680043.8.498.903"
    cfg, d, made, _r, e = _v3_recorded_never_published(tmp_path, monkeypatch, study)
    made[0].save_as(cfg.inbox / "9again.dcm", enforce_file_format=True)
    os.utime(cfg.inbox / "9again.dcm", (0, 0))
    d.run_once()
    d.triage_stage.sweep_reports(now=later())
    d.run_once()
    d.triage_stage.sweep_reports(now=later())
    d.run_once()
    srs = sent_srs(d)
    lmlo_uid = d.triage_stage.exams._conn().execute(
        "SELECT sop_uid FROM exam_images WHERE exam = ? AND laterality = 'L' AND view = 'MLO'", (e,)).fetchone()[0]
    assert lmlo_uid in _evidence(srs[-1]), (
        f"LMLO delivered, the PACS's latest SR v{srs[-1].InstanceNumber} lacks it; sent "
        f"{[int(s.InstanceNumber) for s in srs]}; unreported={d.triage_stage.exams.unreported()}")


def test_a_recurring_keys_unpublished_version_is_not_said_to_be_out(tmp_path, monkeypatch):
    """report_names_withdrawn's version (``last_placed``): v3 was never found in the spool, v2 was."""
    study = "1.2.826.0.1.3680043.8.498.904"
    cfg, d, _made, _r, e = _v3_recorded_never_published(tmp_path, monkeypatch, study)
    assert d.triage_stage.exams.last_placed(e) == 2


def test_held_a_recurring_keys_unpublished_version_with_nothing_changed_is_redone(tmp_path, monkeypatch):
    """(Held on 8be86a1.) Nothing changes after the failed publish: the next sweep makes the same item again."""
    study = "1.2.826.0.1.3680043.8.498.905"
    cfg, d, _made, _r, e = _v3_recorded_never_published(tmp_path, monkeypatch, study)
    assert d.triage_stage.sweep_reports(now=later()) == 1
    d.run_once()
    srs = sent_srs(d)
    assert [int(s.InstanceNumber) for s in srs] == [1, 2, 3] and _pred(srs[2]) == str(srs[1].SOPInstanceUID)
