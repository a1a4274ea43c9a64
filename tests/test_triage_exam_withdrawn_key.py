"""The exam SR's key (ExamSummary.report_key) with images withdrawn: a second review of the withdrawal
(2026-12-06)."""
from __future__ import annotations

import hashlib

from medsendx_edge.triage.exam import ExamBook


def _side(lat, view, pd, instance=None):
    return {"exam": "e1", "triage": "done", "laterality": lat, "view": view, "pd": pd, "metrics": {},
            "instance": instance}


def _book(tmp_path, name, takes):
    book = ExamBook(tmp_path / name)
    for i, (lat, view, pd, inst) in enumerate(takes):
        book.record(str(i), _side(lat, view, pd, inst), now=0, sop=("1.2.840.10008.5.1.4.1.1.1.2", f"1.2.3.{i}", "9.9"))
    return book


FOUR = [("R", "CC", 0.4, "a"), ("L", "CC", 0.4, "b"), ("R", "MLO", 0.3, "c"), ("L", "MLO", 0.3, "d")]


def test_an_ordinary_exam_keeps_the_key_of_the_release_before(tmp_path):
    """No image withdrawn, no blank retake: the key (and so the SR's instance UID, which hashes it) is
    d26dbd5's, sha256 of the sorted latest ids.  (A blank retake's exam does not: its measured take, counted
    for density, is in the key, so that the take's withdrawal changes it; docs/triage.md.)"""
    book = _book(tmp_path, "a.db", FOUR + [("L", "MLO", 0.31, "e")])   # a retake
    s = book.summary("e1")
    assert s.report_key == hashlib.sha256(",".join(sorted(s.latest)).encode()).hexdigest()[:16]


def _recurs(book, item):
    before = book.summary("e1").report_key
    book.withdraw([item])
    during = book.summary("e1").report_key
    book.restore([item])
    after = book.summary("e1").report_key
    return before, during, after


def test_the_measured_take_behind_a_blank_retake_withdrawn_changes_the_key_and_restored_brings_it_back(tmp_path):
    """What the SR reads changes twice, so the key does; that it comes back is the sweep's to handle (its
    item is named by the key and the version: tests/test_triage_exam_withdrawn.py)."""
    book = _book(tmp_path, "b.db", FOUR + [("L", "MLO", None, "e")])
    before, during, after = _recurs(book, "3")       # the measured LMLO, refused then requeued
    assert during != before and after == before


def test_a_superseded_take_withdrawn_and_restored_changes_nothing(tmp_path):
    book = _book(tmp_path, "c.db", FOUR + [("L", "MLO", 0.31, "e")])   # an LMLO retake: the first take is not read
    assert _recurs(book, "3") == (book.summary("e1").report_key,) * 3


def test_a_later_duplicate_copy_withdrawn_changes_nothing_the_sr_reads_nor_its_key(tmp_path):
    """The route quarantines a resend of an instance with other content (InstanceConflict): that copy is
    never read (a duplicate), yet its withdrawal changes the key, so the sweep makes a new SR version with
    the same content; and its requeue brings the earlier key back."""
    book = _book(tmp_path, "d.db", FOUR + [("L", "MLO", 0.3, "d")])
    s = book.summary("e1")
    assert s.duplicate_ids == {"4"}
    before, during, after = _recurs(book, "4")
    assert during == before, "a never-read duplicate withdrawn: a new key, so a new (identical) SR version"
