"""The per-image feature rows: stored on the truck with their time, exported with neither the item id
nor the ingest time (export ids, the day only), as Parquet or CSV."""

from __future__ import annotations

import csv
import time

import pyarrow.parquet as pq

from medsendx_edge.spool import export_id
from medsendx_edge.triage.features import FeatureStore, write_rows
from medsendx_edge.vocabulary import FEATURE_COLUMNS


def _store(tmp_path):
    store = FeatureStore(tmp_path / "features.db")
    store.append("01a2b3c4d5e6f7a8b9c0d1e2", {"pd": 0.31, "kvp": 28.0, "view": "CC", "laterality": "L",
                                              "implant": False, "not_a_column": "ignored"})
    store.append("11a2b3c4d5e6f7a8b9c0d1e2", {"pd": None, "view": "MLO"})
    return store


def test_rows_keep_the_columns_and_the_order(tmp_path):
    rows = _store(tmp_path).rows()
    assert [r["pd"] for r in rows] == [0.31, None]
    assert rows[0]["view"] == "CC" and rows[0]["implant"] == 0.0 and "not_a_column" not in rows[0]
    assert set(rows[0]) == {"id", "recorded", *FEATURE_COLUMNS}
    assert _store(tmp_path).rows(since=time.time() + 60) == []


def test_the_export_carries_no_item_id_and_no_ingest_time(tmp_path):
    rows = _store(tmp_path).rows()
    for out in (tmp_path / "f.parquet", tmp_path / "f.csv"):
        path = write_rows(rows, out)
        if path.suffix == ".parquet":
            table = pq.read_table(path).to_pylist()
        else:
            with open(path, newline="") as fh:
                table = list(csv.DictReader(fh))
        assert [r["id"] for r in table] == [export_id(r["id"]) for r in rows]
        assert all(r["id"] not in str(table) for r in rows)
        for exported in table:
            assert float(exported["recorded"]) % 86400 == 0           # the day, never the time
        assert str(table[0]["pd"]) == "0.31"


def test_an_older_store_gains_new_columns(tmp_path):
    import sqlite3

    with sqlite3.connect(tmp_path / "features.db") as conn:
        conn.execute("CREATE TABLE features (id TEXT PRIMARY KEY, recorded REAL, pd REAL)")
        conn.execute("INSERT INTO features VALUES ('a', 1.0, 0.4)")
    store = FeatureStore(tmp_path / "features.db")
    row = store.rows()[0]
    assert row["pd"] == 0.4 and row["view"] is None and set(row) == {"id", "recorded", *FEATURE_COLUMNS}
