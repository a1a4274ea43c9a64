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
    shipped with the next shipment (a watermark that goes by time passed over them for ever before)."""
    import time as real_time

    from medsendx_edge.triage import exam as exam_mod
    from medsendx_edge.triage import features as features_mod
    from medsendx_edge.triage.exam import ExamBook

    clock = [real_time.time() + 3600.0]          # an hour ahead
    for mod in (features_mod, exam_mod):
        monkeypatch.setattr(mod.time, "time", lambda: clock[0])
    features = FeatureStore(tmp_path / "features.db")
    book = ExamBook(tmp_path / "exams.db")
    state = StateDB(tmp_path / "state.db")
    fleet = Spool(tmp_path / "fleet", suffix=".parquet")
    fleet.ensure_layout()
    shipper = FeatureShipper(features, state, fleet, FleetConfig(enabled=True, interval_s=3600))

    def image(i: int) -> None:
        side = {"triage": "done", "exam": f"exam{i}", "laterality": "L", "view": "CC", "pd": 0.2, "metrics": {}}
        features.append(f"id{i}", {"pd": 0.2})
        book.record(f"id{i}", side)

    image(0)
    assert shipper.ship() == 1 and shipper.ship_exams(book, b"k" * 32) == 1
    clock[0] -= 3600.0                              # the step back
    image(1)
    assert shipper.ship() == 1                      # the row recorded after the step is not passed over
    assert shipper.ship_exams(book, b"k" * 32) == 1
    assert shipper.ship() == 0 and shipper.ship_exams(book, b"k" * 32) == 0   # and nothing twice
    rows = features.rows()
    assert rows[1]["recorded"] > rows[0]["recorded"]
