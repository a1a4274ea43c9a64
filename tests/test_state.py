"""The durable state database: the upload queue's order and transitions, storage-commitment
bookkeeping, the status summary, and one connection per thread."""

from __future__ import annotations

import threading
import time

import pytest

from medsendx_edge.state import StateDB
from medsendx_edge.vocabulary import Priority, UploadState


def _db(tmp_path) -> StateDB:
    return StateDB(tmp_path / "state.db")


def test_due_orders_by_priority_then_age_and_respects_backoff(tmp_path):
    db = _db(tmp_path)
    db.enqueue("a", Priority.NORMAL, 10, "x", now=100.0)
    db.enqueue("b", Priority.RECHECK, 10, "x", now=200.0)
    db.enqueue("c", Priority.NORMAL, 10, "x", now=50.0)
    assert [r.id for r in db.due(300.0, limit=10)] == ["b", "c", "a"]
    db.defer("b", 1000.0, "link down")
    assert [r.id for r in db.due(300.0, limit=10)] == ["c", "a"]
    assert db.item("b").attempts == 1 and db.item("b").last_error == "link down"
    assert db.next_due_time() == 50.0


def test_enqueue_again_keeps_the_more_urgent_priority_and_never_revives_a_delivered_item(tmp_path):
    db = _db(tmp_path)
    db.enqueue("a", Priority.NORMAL, 10, "x")
    db.enqueue("a", Priority.HIGH, 10, "x")
    db.enqueue("a", Priority.LOW, 10, "x")
    assert db.item("a").priority == Priority.HIGH
    db.mark_delivered("a", "2026-11-27T10:00:00Z")
    db.enqueue("a", Priority.RECHECK, 10, "x")
    row = db.item("a")
    assert row.state == "delivered" and row.priority == Priority.HIGH
    assert db.get("last_success") == "2026-11-27T10:00:00Z"


def test_raise_priority_only_raises_queued_items(tmp_path):
    db = _db(tmp_path)
    for i in ("a", "b", "c"):
        db.enqueue(i, Priority.NORMAL, 10, "x")
    db.enqueue("d", Priority.RECHECK, 10, "x")
    db.mark_delivered("c", "t")
    assert db.raise_priority(["a", "b", "c", "d"], Priority.HIGH) == 2
    assert [db.item(i).priority for i in "abcd"] == [1, 1, 2, 0]


def test_clamp_brings_far_future_attempts_back_after_a_clock_jump(tmp_path):
    db = _db(tmp_path)
    db.enqueue("a", 2, 10, "x", now=0.0)
    db.defer("a", 10 ** 9, "clock jumped")
    assert db.clamp_next_attempts(1000.0, 600.0) == 1
    assert db.item("a").next_attempt <= 1600.0


def test_storage_commitment_bookkeeping(tmp_path):
    db = _db(tmp_path)
    for i, uid in (("a", "1.2.3.1"), ("b", "1.2.3.2"), ("c", "1.2.3.3")):
        db.enqueue(i, 2, 10, "x")
        db.await_commitment(i, "1.2.840.10008.5.1.4.1.1.1.2", uid)
    assert db.count_state("committing") == 3
    due = db.commitments_due(1000.0, 600.0)
    assert sorted(r[0] for r in due) == ["a", "b", "c"] and {r[3] for r in due} == {0}
    db.commitment_requested(["a", "b", "c"], "2.25.1", 1000.0)
    assert db.commitments_due(1500.0, 600.0) == []                    # asked, waiting for the report
    assert len(db.commitments_due(1601.0, 600.0)) == 3                # unanswered: due again
    assert db.commitment_result("2.25.666", ["1.2.3.1"], {}, 1650.0)["ignored"] == ["1.2.3.1"]  # not our transaction
    out = db.commitment_result("2.25.1", ["1.2.3.1", "9.9.9"], {"1.2.3.2": "storage commitment failed: 0x0112"},
                               1700.0)
    assert out == {"delivered": ["a"], "requeued": ["b"], "ignored": ["9.9.9"]}  # an unknown UID is ignored
    assert db.item("a").state == "delivered" and db.item("b").state == "queued"
    assert "0x0112" in db.item("b").last_error and db.committing_ids() == ["c"]
    db.commitment_given_up("c", "no storage commitment after 3 requests", 1800.0)
    assert db.item("c").state == "queued" and db.committing_ids() == []
    assert db.queue_summary()["states"] == {"delivered": 1, "queued": 2}


def test_queue_summary_backlog_goodput_and_drain_time(tmp_path):
    db = _db(tmp_path)
    now = time.time()
    db.enqueue("sent", 2, 6_000_000, "x", now=now - 100)
    db.mark_delivered("sent", "t")
    db.enqueue("left", 2, 3_000_000, "x", now=now - 50)
    backlog = db.queue_summary()["backlog"]
    assert backlog["items"] == 1 and backlog["bytes"] == 3_000_000
    assert backlog["goodput_bps_10min"] == 10_000.0          # 6 MB over the 10-minute window
    assert backlog["drain_s"] == 300.0


def test_one_connection_per_thread(tmp_path):
    db = _db(tmp_path)
    errors = []

    def writer(n):
        try:
            for i in range(50):
                db.enqueue(f"{n}-{i}", 2, 1, "x")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(db.due(float("inf"), limit=1000)) == 200


def test_an_instance_registered_without_its_uid_still_holds_later_copies_back(tmp_path):
    """Finding 3 of issue 23, as a review found it still open: a row the uploader registered without its
    SOP Instance UID (or from before the column) and delivered since took the route's UID nowhere, so a
    later copy with other content was sent and lost.  A quarantined first copy holds copies back too."""
    db = StateDB(tmp_path / "state.db")
    db.enqueue("a", Priority.NORMAL, 10, "h1")            # registered by reconcile, no UID
    db.mark_delivered("a", "2026-01-01T00:00:00Z")
    db.enqueue("a", Priority.HIGH, 10, "h1", sop_uid="1.2.3")   # the route's enqueue comes late
    assert db.instance_holder("1.2.3", "b") == ("a", "h1")
    assert db.item("a").state == "delivered" and db.item("a").priority == Priority.NORMAL
    db.enqueue("c", Priority.NORMAL, 10, "h2", sop_uid="1.2.4")
    db.set_state("c", UploadState.QUARANTINED, "refused by the PACS")
    assert db.instance_holder("1.2.4", "d") == ("c", "h2")


def test_a_late_report_for_an_earlier_transaction_of_the_item_still_counts(tmp_path):
    """Finding 4 of issue 23: a slow PACS answers the first transaction after the truck asked again; the
    first report is genuine (we issued it for this item) and delivers; one for another item does not."""
    db = _db(tmp_path)
    for i, uid in (("a", "1.2.3.1"), ("b", "1.2.3.2")):
        db.enqueue(i, 2, 10, "x")
        db.await_commitment(i, "1.2.840.10008.5.1.4.1.1.1.2", uid)
    db.commitment_issuing(["a"], "2.25.1")
    db.commitment_requested(["a"], "2.25.1", 1000.0)
    db.commitment_issuing(["b"], "2.25.9")
    db.commitment_requested(["b"], "2.25.9", 1000.0)
    db.commitment_issuing(["a"], "2.25.2")                 # timed out: asked again
    db.commitment_requested(["a"], "2.25.2", 1700.0)
    assert db.commitment_result("2.25.9", ["1.2.3.1"], {}, 1750.0)["ignored"] == ["1.2.3.1"]
    assert db.commitment_result("2.25.1", ["1.2.3.1"], {}, 1800.0)["delivered"] == ["a"]
    assert db.item("a").state == "delivered" and db.item("b").state == "committing"


def test_the_uplink_is_typed_and_a_database_from_before_still_reads(tmp_path):
    """Issue 25: the uplink was a string parsed with ``startswith`` ("paused: <reason>")."""
    from medsendx_edge.vocabulary import StateKey, Uplink

    db = StateDB(tmp_path / "state.db")
    assert db.uplink() == (Uplink.UP, None, None)
    db.set_uplink(Uplink.DOWN, "connection refused", since=1700000000.0)
    assert db.uplink() == (Uplink.DOWN, "connection refused", 1700000000.0)
    assert db.queue_summary()["uplink"] == "down since 2023-11-14T22:13:20Z"
    db.set_uplink(Uplink.PAUSED, "HTTP 401: credentials refused")
    assert db.queue_summary()["uplink"] == "paused: HTTP 401: credentials refused"
    db.set_uplink(Uplink.UP)
    db.put(StateKey.UPLINK, "paused: HTTP 403")  # as an older version wrote it
    db.put(StateKey.UPLINK_REASON, None)
    assert db.uplink() == (Uplink.PAUSED, "HTTP 403", None)
    db.put(StateKey.UPLINK, "something else")  # never fails a status
    assert db.uplink()[0] is Uplink.UP


# --------------------------------------------------------------------------- schema versions (issue 28)
def test_a_database_from_a_newer_release_is_refused_with_what_to_do(tmp_path):
    """A rollback to an older release must not misread (or strip) what a newer one wrote."""
    import sqlite3

    from medsendx_edge.errors import StateVersionError
    from medsendx_edge.state import STATE_SCHEMA

    path = tmp_path / "state.db"
    StateDB(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == STATE_SCHEMA
    conn.execute(f"PRAGMA user_version = {STATE_SCHEMA + 1}")
    conn.execute("CREATE TABLE from_the_future (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StateVersionError) as err:
        StateDB(path)
    assert "newer MedSendX Edge" in str(err.value) and "restore" in str(err.value)
    conn = sqlite3.connect(path)   # untouched
    assert conn.execute("PRAGMA user_version").fetchone()[0] == STATE_SCHEMA + 1
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'from_the_future'").fetchone()


def test_a_database_from_before_versions_is_migrated_and_stamped(tmp_path):
    """A state database of a release that recorded no version (no sop_uid column yet) is migrated."""
    import sqlite3

    from medsendx_edge.state import STATE_SCHEMA

    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE queue (id TEXT PRIMARY KEY, priority INTEGER NOT NULL DEFAULT 2, size INTEGER "
                       "NOT NULL, sha256 TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, first_seen REAL NOT NULL,"
                       " next_attempt REAL NOT NULL, last_error TEXT, state TEXT NOT NULL DEFAULT 'queued', "
                       "delivered_at REAL); INSERT INTO queue (id, size, sha256, first_seen, next_attempt) "
                       "VALUES ('a', 3, 'h', 0, 0);")
    conn.commit()
    conn.close()
    db = StateDB(path)
    assert db.item("a").sop_uid is None and db.item("a").size == 3
    assert db._conn().execute("PRAGMA user_version").fetchone()[0] == STATE_SCHEMA


def test_a_file_is_set_up_in_one_commit_and_a_tx_inside_a_tx_is_a_savepoint(tmp_path):
    """A fresh state database is set up in one commit (it was one a statement), a reopened one writes
    nothing; a ``tx`` inside another is undone alone when it raises, written with the outer one's commit
    otherwise; a transaction ``tx`` did not open is refused, as before."""
    import sqlite3

    path = tmp_path / "state.db"
    traced: list[str] = []
    real_connect = sqlite3.connect

    def tracing(*args, **kwargs):
        conn = real_connect(*args, **kwargs)
        conn.set_trace_callback(lambda sql: traced.append(" ".join(sql.split())))
        return conn

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sqlite3, "connect", tracing)
        StateDB(path).close()
        begin, commit = traced.index("BEGIN IMMEDIATE"), traced.index("COMMIT")
        assert traced.count("COMMIT") == 1
        writes = [i for i, sql in enumerate(traced) if sql.startswith(("CREATE", "ALTER", "PRAGMA user_version ="))]
        assert writes and all(begin < i < commit for i in writes), traced   # every one in the one commit
        traced.clear()
        StateDB(path).close()
        assert not [sql for sql in traced if sql.startswith(("ALTER", "PRAGMA user_version =", "INSERT", "UPDATE"))]

    db = StateDB(path)
    with db.tx() as conn:
        conn.execute("INSERT INTO kv (key, value) VALUES ('outer', '1')")
        with pytest.raises(RuntimeError):
            with db.tx() as inner:
                inner.execute("INSERT INTO kv (key, value) VALUES ('inner-undone', '1')")
                raise RuntimeError("the inner block fails")
        with db.tx() as inner:
            inner.execute("INSERT INTO kv (key, value) VALUES ('inner-kept', '1')")
    keys = {r[0] for r in sqlite3.connect(path).execute("SELECT key FROM kv")}
    assert keys == {"outer", "inner-kept"}
    conn = db._conn()
    conn.execute("BEGIN")   # not this object's tx: never joined
    with pytest.raises(sqlite3.OperationalError):
        with db.tx():
            pass
    conn.execute("ROLLBACK")
    with db.tx() as again:   # and the object's own bookkeeping is clean after the refusal
        again.execute("INSERT INTO kv (key, value) VALUES ('after', '1')")
    assert not conn.in_transaction
