"""Shipping feature rows to the fleet (fleet/ship.py): the rows since the last shipment as one Parquet file
in the fleet outbox, no patient data, nothing shipped twice, the fleet uploader woken."""

from __future__ import annotations

import threading

import pyarrow.parquet as pq

from medsendx_edge.config import FleetConfig
from medsendx_edge.fleet.ship import FeatureShipper
from medsendx_edge.spool import OUTBOX, Spool
from medsendx_edge.state import StateDB
from medsendx_edge.triage.features import FeatureStore
from medsendx_edge.vocabulary import FEATURE_COLUMNS


def _shipping(tmp_path):
    """A truck's feature store and state, its fleet outbox, and the shipper over them (files under tmp_path)."""
    features = FeatureStore(tmp_path / "features.db")
    state = StateDB(tmp_path / "state.db")
    fleet = Spool(tmp_path / "fleet", suffix=".parquet")
    fleet.ensure_layout()
    return features, state, fleet, FeatureShipper(features, state, fleet, FleetConfig(enabled=True, interval_s=3600))


def _exam_image(exam: str, laterality: str = "L", pd: float = 0.1) -> dict:
    """A triaged CC image's sidecar, as the exam book records it."""
    return {"triage": "done", "exam": exam, "laterality": laterality, "view": "CC", "pd": pd, "metrics": {}}


def test_rows_since_the_last_shipment_go_once_as_one_file(tmp_path):
    features = FeatureStore(tmp_path / "features.db")
    state = StateDB(tmp_path / "state.db")
    fleet = Spool(tmp_path / "fleet", suffix=".parquet")
    fleet.ensure_layout()
    wake = threading.Event()
    shipper = FeatureShipper(features, state, fleet, FleetConfig(enabled=True, interval_s=3600), on_queued=wake)
    assert not shipper.due() and shipper.ship() == 0 and not wake.is_set()
    for i in range(3):
        features.append(f"id{i}", {"pd": 0.1 * i, "station_name": "T1", "metrics": {"kvp": 28}})
    assert shipper.ship() == 3 and wake.is_set()
    (item,) = fleet.ready(OUTBOX)
    table = pq.read_table(fleet.path(OUTBOX, item))
    assert table.num_rows == 3 and table.column_names == ["id", "recorded", *FEATURE_COLUMNS]
    assert shipper.ship() == 0 and len(fleet.ready(OUTBOX)) == 1   # nothing new: nothing shipped twice
    features.append("id3", {"pd": 0.5})
    assert shipper.ship() == 1 and len(fleet.ready(OUTBOX)) == 2


def test_a_wall_clock_stepped_back_loses_no_row_nor_exam_for_the_fleet(tmp_path, monkeypatch):
    """NTP steps a clock that ran an hour ahead back: the rows and exam images recorded after the step are
    shipped with the next shipment (a watermark on the time passed over them for ever), and keep their wall
    time (an exam's quiet period still counts from it)."""
    import time as real_time

    from medsendx_edge.triage import exam as exam_mod
    from medsendx_edge.triage import features as features_mod
    from medsendx_edge.triage.exam import ExamBook

    clock = [real_time.time() + 3600.0]          # an hour ahead
    for mod in (features_mod, exam_mod):
        monkeypatch.setattr(mod.time, "time", lambda: clock[0])
    features, state, fleet, shipper = _shipping(tmp_path)
    book = ExamBook(tmp_path / "exams.db")

    def image(i: int) -> None:
        side = _exam_image(f"exam{i}", pd=0.2)
        features.append(f"id{i}", {"pd": 0.2})
        book.record(f"id{i}", side)

    image(0)
    assert shipper.ship() == 1 and shipper.ship_exams(book, b"k" * 32) == 1
    clock[0] -= 3600.0                              # the step back
    image(1)
    assert shipper.ship() == 1                      # the row recorded after the step is not passed over
    assert shipper.ship_exams(book, b"k" * 32) == 1
    assert shipper.ship() == 0 and shipper.ship_exams(book, b"k" * 32) == 0   # and nothing twice
    recorded = {r["id"]: r["recorded"] for r in features.rows()}
    assert recorded["id1"] < recorded["id0"]             # the wall time as it was, not clamped
    assert len(fleet.ready(OUTBOX)) == 4


def test_a_time_watermark_of_an_older_release_is_taken_over(tmp_path):
    """A truck upgraded from a release that kept the shipments' watermark as a time: what it had shipped is
    not shipped again, what it had not is."""
    from medsendx_edge.vocabulary import StateKey

    features, state, fleet, shipper = _shipping(tmp_path)
    for i in range(3):
        features.append(f"id{i}", {"pd": (0.1, 0.2, 0.3)[i]})
    shipped = {r["id"]: r["recorded"] for r in features.rows()}["id1"]
    state.put(StateKey.FLEET_LAST_SHIPPED, repr(shipped))       # the older release shipped id0 and id1
    assert shipper.ship() == 1
    (item,) = fleet.ready(OUTBOX)
    assert pq.read_table(fleet.path(OUTBOX, item)).column("pd").to_pylist() == [0.3]   # id2 alone
    assert shipper.ship() == 0


def test_a_shipment_cut_short_is_redone_with_the_same_rows_under_the_same_id(tmp_path, monkeypatch):
    """A power cut between the shipment's file and its watermark: the next run publishes nothing new for
    those rows (the file is there, under its id) and moves the watermark past them; a record begun by an
    older release (by time) is redone too."""
    import json

    import pytest

    from medsendx_edge.spool import new_id
    from medsendx_edge.vocabulary import StateKey

    features, state, fleet, shipper = _shipping(tmp_path)
    for i in range(3):
        features.append(f"id{i}", {"pd": 0.1})
    real_put = state.put

    def cut(key, value):
        if key == StateKey.FLEET_SHIPPED_SEQ:
            raise RuntimeError("power cut")
        real_put(key, value)

    monkeypatch.setattr(state, "put", cut)
    with pytest.raises(RuntimeError):
        shipper.ship()
    monkeypatch.setattr(state, "put", real_put)
    (item,) = fleet.ready(OUTBOX)
    features.append("id3", {"pd": 0.1})                  # recorded after the cut: not part of the redo
    assert shipper.ship() == 3 and fleet.ready(OUTBOX) == [item]
    assert shipper.ship() == 1 and len(fleet.ready(OUTBOX)) == 2

    # An older release's record, by time: the rows up to its time, under its id, then on by number.
    for i in range(4, 6):
        features.append(f"id{i}", {"pd": 0.1})
    until = {r["id"]: r["recorded"] for r in features.rows()}["id4"]
    old_id = new_id()
    state.put(StateKey.FLEET_SHIPPING, json.dumps([-1, until, old_id]))
    assert shipper.ship() == 5                           # id0..id4, as that release would have redone it
    assert old_id in fleet.ready(OUTBOX)
    assert shipper.ship() == 1 and shipper.ship() == 0   # id5, then nothing


def test_a_retake_after_the_clock_stepped_back_is_the_later_take(tmp_path):
    from medsendx_edge.triage.exam import ExamBook

    book = ExamBook(tmp_path / "exams.db")
    t = 2_000_000_000.0

    def side(pd: float) -> dict:
        return _exam_image("e1", laterality="R", pd=pd)

    book.record("a1", side(0.10), now=t)
    summary = book.record("a2", side(0.60), now=t - 3600 + 60)   # the retake, after a step back of an hour
    assert summary is not None and summary.breast_pd == {"R": 0.60} and summary.retakes == ["RCC"]


def test_a_store_restored_after_a_downgrade_and_rows_an_older_release_added_are_shipped(tmp_path):
    """Downgrade and upgrade again: the older release adds rows without a number (features.db) or the exam
    book is restored from its backup (numbering restarted): the shipments go on from the time watermark
    kept beside the number, nothing left behind."""
    import sqlite3

    from medsendx_edge.triage.exam import ExamBook
    from medsendx_edge.vocabulary import StateKey

    features, state, fleet, shipper = _shipping(tmp_path)
    book = ExamBook(tmp_path / "exams.db")
    for i in range(4):
        features.append(f"id{i}", {"pd": 0.1})
        book.record(f"id{i}", _exam_image(f"e{i}"), now=1000.0 + i)
    assert shipper.ship() == 4 and shipper.ship_exams(book, b"k" * 32) == 4
    assert float(state.get(StateKey.FLEET_LAST_SHIPPED)) == max(r["recorded"] for r in features.rows())
    # The older release writes two rows without seq into features.db ...
    conn = sqlite3.connect(tmp_path / "features.db")
    conn.execute("INSERT INTO features (id, recorded, pd) VALUES ('old1', 9e9, 0.2), ('old2', 9e9, 0.2)")
    conn.commit()
    conn.close()
    # ... and the exam book comes back from a backup holding the first two exams only.
    conn = sqlite3.connect(tmp_path / "exams.db")
    conn.execute("DELETE FROM exam_images WHERE id IN ('id2', 'id3')")
    conn.commit()
    conn.close()
    features, state, fleet, shipper = _shipping(tmp_path)   # the stores opened again after the downgrade
    book = ExamBook(tmp_path / "exams.db")
    assert shipper.ship() == 2                      # old1 and old2, numbered after the others
    book.record("new", _exam_image("e9"), now=2000.0)
    assert shipper.ship_exams(book, b"k" * 32) == 1   # numbered 3 in the restored book: not skipped


def test_exams_an_older_release_recorded_after_a_rollback_are_shipped_once(tmp_path):
    """The documented rollback: the older release refuses exams.db (schema 2), it is restored from the backup
    made before the upgrade, the older release records five images and ships three by time; upgraded again,
    the exam book is numbered anew and the shipments go on from the time the older release left: the two
    it had not shipped, and nothing twice."""
    import sqlite3

    from medsendx_edge.triage.exam import ExamBook
    from medsendx_edge.vocabulary import StateKey

    book = ExamBook(tmp_path / "exams.db")
    _, state, fleet, shipper = _shipping(tmp_path)
    for i in range(4):
        book.record(f"id{i}", _exam_image(f"e{i}"), now=1000.0 + i)
    assert shipper.ship_exams(book, b"k" * 32) == 4
    # The backup: the first two images, schema 1 (no seq); the older release adds five and ships three.
    conn = sqlite3.connect(tmp_path / "exams.db")
    conn.executescript("DELETE FROM exam_images WHERE id IN ('id2', 'id3'); DROP INDEX exam_images_seq; "
                       "ALTER TABLE exam_images DROP COLUMN seq; PRAGMA user_version = 1;")
    for i in range(5):
        conn.execute("INSERT INTO exam_images (id, exam, laterality, view, pd, implant, recorded) "
                     "VALUES (?, ?, 'L', 'CC', 0.1, 0, ?)", (f"o{i}", f"o{i}", 2000.0 + i))
    conn.commit()
    conn.close()
    state.put(StateKey.FLEET_EXAMS_SHIPPED, repr(2002.0))     # the older release shipped o0, o1, o2
    book = ExamBook(tmp_path / "exams.db")
    before = len(fleet.ready(OUTBOX))
    assert shipper.ship_exams(book, b"k" * 32) == 2         # o3 and o4
    assert len(fleet.ready(OUTBOX)) == before + 1
    assert shipper.ship_exams(book, b"k" * 32) == 0


def test_an_image_withdrawn_from_an_exam_ships_a_later_revision_of_it(tmp_path):
    """An exam shipped with two images, then one quarantined (withdrawn from the exam book): the record
    shipped again has fewer images but a higher revision, so the fleet server (which keeps the later of two
    records of a day by revision) takes it."""
    import json

    from medsendx_edge.triage.exam import ExamBook

    _features, _state, fleet, shipper = _shipping(tmp_path)
    book = ExamBook(tmp_path / "exams.db")
    book.record("a", _exam_image("exam1", "L", 0.6))
    book.record("b", _exam_image("exam1", "R", 0.1))

    def shipped() -> dict:
        assert shipper.ship_exams(book, b"k" * 32) == 1
        newest = max(fleet.ready(OUTBOX))
        [record] = json.loads(fleet.path(OUTBOX, newest).read_bytes())["exams"]
        return record

    first = shipped()
    assert book.withdraw(["a"]) == ["exam1"]
    second = shipped()
    assert second["revision"] > first["revision"] and second["views"] == 1 and first["views"] == 2
