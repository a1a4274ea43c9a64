"""Durable state in SQLite (WAL, synchronous=FULL): recovery counts and the upload queue.

Nothing here holds patient data: ids are generated, errors are our own words.
One connection per thread.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from medsendx_edge.errors import StateVersionError
from medsendx_edge.vocabulary import KeyPrefix, Priority, StateKey, UploadState, Uplink, state_key

SCHEMA = """
CREATE TABLE IF NOT EXISTS recoveries (id TEXT PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS queue (
    id TEXT PRIMARY KEY,
    priority INTEGER NOT NULL DEFAULT 2,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    first_seen REAL NOT NULL,
    next_attempt REAL NOT NULL,
    last_error TEXT,
    state TEXT NOT NULL DEFAULT 'queued',
    delivered_at REAL
);
CREATE INDEX IF NOT EXISTS queue_order ON queue (state, priority, first_seen);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT);
-- what the stages learnt of an item on its way (its instance, the size and hash of the file as written),
-- so route and upload need not read the file again; moved into its queue row when it is queued
CREATE TABLE IF NOT EXISTS facts (
    id TEXT PRIMARY KEY,
    sop_uid TEXT,
    size INTEGER,
    sha256 TEXT,
    recorded REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS commitments (
    id TEXT PRIMARY KEY,
    sop_class TEXT NOT NULL,
    sop_instance TEXT NOT NULL,
    transaction_uid TEXT,
    requested_at REAL,
    requests INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS commitments_by_instance ON commitments (sop_instance);
-- every transaction asked for an item while it waits (a late report for an earlier one still counts)
CREATE TABLE IF NOT EXISTS commitment_issued (
    transaction_uid TEXT NOT NULL,
    id TEXT NOT NULL,
    PRIMARY KEY (transaction_uid, id)
);
CREATE TABLE IF NOT EXISTS multipart (
    id TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    upload_id TEXT NOT NULL,
    part_size INTEGER NOT NULL,
    created REAL NOT NULL
);
"""

def _statements(script: str) -> list[str]:
    """A script's SQL statements, one by one (each ends its line; ``--`` comments between them)."""
    out, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending.strip())
            pending = ""
    if pending.strip() and not all(not ln.strip() or ln.strip().startswith("--") for ln in pending.splitlines()):
        raise ValueError("an incomplete SQL statement at the end of the script")
    return out


@dataclass(frozen=True)
class QueueItem:
    id: str
    priority: Priority
    size: int
    sha256: str
    attempts: int
    first_seen: float
    next_attempt: float
    last_error: str | None
    state: UploadState
    sop_uid: str | None = None

    @classmethod
    def from_row(cls, row: tuple[object, ...]) -> "QueueItem":
        """A ``queue`` row, its words typed (an unknown priority reads normal, never fails a read)."""
        r = list(row)
        try:
            r[1] = Priority(int(r[1]))  # type: ignore[call-overload]
        except ValueError:
            r[1] = Priority.NORMAL
        r[8] = UploadState(str(r[8]))
        return cls(*r)  # type: ignore[arg-type]


class SQLiteFile:
    """One SQLite connection per thread on a file: WAL, ``synchronous=FULL`` (or NORMAL when not
    ``durable``), autocommit unless a transaction is opened explicitly."""

    def __init__(self, path: Path, *, durable: bool = True) -> None:
        self.path = Path(path)
        self.durable = durable
        self._local = threading.local()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL" if self.durable else "PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction (SQLite's DDL is transactional too: a power cut leaves all of it or none).  Inside
        another ``tx`` of this thread's, a savepoint in it: written with the outer one's commit, undone alone
        if it raises (a file's set-up in one commit, its migrations in it).  A transaction this object did not
        open is never joined: BEGIN refuses it, as it always did."""
        conn = self._conn()
        depth = getattr(self._local, "depth", 0)
        if depth:
            name = f"tx{depth}"
            conn.execute(f"SAVEPOINT {name}")
            self._local.depth = depth + 1
            try:
                yield conn
            except BaseException:
                conn.execute(f"ROLLBACK TO {name}")
                conn.execute(f"RELEASE {name}")
                raise
            finally:
                self._local.depth = depth
            conn.execute(f"RELEASE {name}")
            return
        conn.execute("BEGIN IMMEDIATE")
        self._local.depth = 1
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:   # the body's failure, or a COMMIT that failed (busy, I/O): never left open
                conn.execute("ROLLBACK")
            raise
        finally:
            self._local.depth = 0

    def schema_from(self, understood: int, what: str) -> int:
        """The file's schema version (``PRAGMA user_version``; 0: written before versions were recorded),
        for the caller to migrate from; a file written by a newer release is refused, with what to do,
        before anything reads or alters it.  The caller records ``understood`` once migrated."""
        found = int(self._conn().execute("PRAGMA user_version").fetchone()[0])
        if found > understood:
            raise StateVersionError(
                f"{what} {self.path} has schema {found}, written by a newer MedSendX Edge (this release "
                f"understands up to {understood}): run the newer release again, or restore this file alone "
                "from the backup made before the upgrade (install --wheel makes one; medsendx-edge backup before "
                "a new container image: docs/install.md)")
        return found

    def schema_is(self, version: int) -> None:
        """Records the schema version (written only when it changes: a write at every start is a commit)."""
        conn = self._conn()
        if int(conn.execute("PRAGMA user_version").fetchone()[0]) != int(version):
            conn.execute(f"PRAGMA user_version = {int(version)}")


def number_unnumbered(store: SQLiteFile, table: str) -> int:
    """Rows of ``table`` without a ``seq`` (written by a release before it, after a downgrade) numbered after
    the others, in the order they were inserted; in one transaction.  Returns how many."""
    if store._conn().execute(f"SELECT 1 FROM {table} WHERE seq IS NULL LIMIT 1").fetchone() is None:
        return 0
    with store.tx() as conn:
        base = int(conn.execute(f"SELECT coalesce(max(seq), 0) FROM {table}").fetchone()[0])
        rowids = [r[0] for r in conn.execute(f"SELECT rowid FROM {table} WHERE seq IS NULL ORDER BY rowid")]
        conn.executemany(f"UPDATE {table} SET seq = ? WHERE rowid = ?",
                         [(base + i + 1, rowid) for i, rowid in enumerate(rowids)])
    return len(rowids)


def shipped_upto(conn: sqlite3.Connection, table: str, recorded: float) -> int:
    """The ``seq`` before the first row of ``table`` recorded after ``recorded`` (all of it when none is)."""
    row = conn.execute(f"SELECT coalesce((SELECT min(seq) FROM {table} WHERE recorded > ?) - 1, "
                       f"(SELECT max(seq) FROM {table}), 0)", (recorded,)).fetchone()
    return int(row[0] or 0)


#: The schema this release writes (``PRAGMA user_version`` of state.db, linkage.db and exams.db); a
#: release that changes a table bumps its number and migrates from every earlier one.
STATE_SCHEMA = 1
LINKAGE_SCHEMA = 1
EXAMS_SCHEMA = 2   # 2: exam_images.seq, the order of records (the fleet's watermark)


class StateDB(SQLiteFile):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        with self.tx() as conn:   # one commit, not one a statement (a fresh spool's set-up: 15 fsyncs)
            self.schema_from(STATE_SCHEMA, "the state database")
            for statement in _statements(SCHEMA):   # executescript would commit first
                conn.execute(statement)
            columns = {r[1] for r in conn.execute("PRAGMA table_info(queue)")}
            if "sop_uid" not in columns:  # a database from before instances were recorded
                conn.execute("ALTER TABLE queue ADD COLUMN sop_uid TEXT")
            conn.execute("CREATE INDEX IF NOT EXISTS queue_by_instance ON queue (sop_uid)")
            self.schema_is(STATE_SCHEMA)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ------------------------------------------------------------ recoveries
    def bump_recoveries(self, item_id: str) -> int:
        with self.tx() as db:
            db.execute("INSERT INTO recoveries (id, count) VALUES (?, 1) "
                       "ON CONFLICT(id) DO UPDATE SET count = count + 1", (item_id,))
            return int(db.execute("SELECT count FROM recoveries WHERE id = ?", (item_id,)).fetchone()[0])

    def recoveries(self, key: str) -> int:
        """How many recoveries found ``key`` in flight (0: never): ``<item id>:<stage>`` after deaths a file can
        cause, ``<item id>:<stage>:interrupted`` after deaths that left no trace."""
        row = self._conn().execute("SELECT count FROM recoveries WHERE id = ?", (key,)).fetchone()
        return 0 if row is None else int(row[0])

    def recovered_in(self, stage: str) -> set[str]:
        """The ids of items some recovery found in flight in ``stage`` (after a crash or an interruption)."""
        rows = self._conn().execute("SELECT id FROM recoveries WHERE id LIKE ? OR id LIKE ?",
                                    (f"%:{stage}", f"%:{stage}:interrupted")).fetchall()
        return {str(r[0]).split(":", 1)[0] for r in rows}

    def forget_recoveries(self, item_ids: list[str]) -> None:
        """The recovery counts of items gone for good (pruned from sent/): the table stays the size of what
        is on the truck."""
        if item_ids:
            with self.tx() as db:
                db.executemany("DELETE FROM recoveries WHERE id = ? OR id LIKE ?",
                               [(i, f"{i}:%") for i in item_ids])

    def reset_recoveries(self, item_id: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM recoveries WHERE id = ? OR id LIKE ?", (item_id, f"{item_id}:%"))

    # ------------------------------------------------------------ kv
    def get(self, key: StateKey | str) -> str | None:
        """A value of the key-value table: a :class:`StateKey`, or ``state_key(prefix, suffix)``."""
        row = self._conn().execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: StateKey | str, value: str | None) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO kv (key, value) VALUES (?, ?) "
                       "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def add(self, key: StateKey, amount: int) -> int:
        """A counter in the key-value table (bytes not re-sent...); returns the new total."""
        with self.tx() as db:
            db.execute("INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                       "value = CAST(CAST(value AS INTEGER) + ? AS TEXT)", (key, str(amount), amount))
            row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return int(row[0])

    # ------------------------------------------------------------ upload queue
    def enqueue(self, item_id: str, priority: Priority, size: int, sha256: str, now: float | None = None,
                sop_uid: str | None = None) -> None:
        now = time.time() if now is None else now
        with self.tx() as db:
            db.execute(
                "INSERT INTO queue (id, priority, size, sha256, first_seen, next_attempt, sop_uid) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET priority = CASE WHEN state = 'queued' "
                "THEN MIN(priority, excluded.priority) ELSE priority END, "
                # the instance is recorded whatever the state: a row registered without it (by the uploader's
                # reconcile, or before an upgrade) and delivered since must still hold later copies back
                "sop_uid = COALESCE(sop_uid, excluded.sop_uid)",
                (item_id, int(priority), size, sha256, now, now, sop_uid),
            )
            db.execute("DELETE FROM facts WHERE id = ?", (item_id,))

    def replace_content(self, item_id: str, size: int, sha256: str) -> None:
        """A queued item's file was rewritten (decoded for a destination that refused its encoding): the
        row describes what is sent."""
        with self.tx() as db:
            db.execute("UPDATE queue SET size = ?, sha256 = ? WHERE id = ?", (size, sha256, item_id))

    # ------------------------------------------------------------ facts
    def record_facts(self, item_id: str, sop_uid: str | None, size: int | None, sha256: str | None) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO facts (id, sop_uid, size, sha256, recorded) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT(id) DO UPDATE SET sop_uid = COALESCE(excluded.sop_uid, sop_uid), "
                       "size = excluded.size, sha256 = excluded.sha256, recorded = excluded.recorded",
                       (item_id, sop_uid, size, sha256, time.time()))

    def facts(self, item_id: str) -> tuple[str | None, int | None, str | None]:
        """(SOP Instance UID, size, SHA-256) recorded for the item, each None when not known."""
        row = self._conn().execute("SELECT sop_uid, size, sha256 FROM facts WHERE id = ?", (item_id,)).fetchone()
        return (None, None, None) if row is None else (row[0], row[1], row[2])

    def forget_facts_of(self, item_id: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM facts WHERE id = ?", (item_id,))

    def forget_facts(self, before: float) -> int:
        """Facts of items that never reached the queue (quarantined on the way) are kept a while, then go."""
        with self.tx() as db:
            return db.execute("DELETE FROM facts WHERE recorded < ?", (before,)).rowcount

    def instance_holder(self, sop_uid: str, item_id: str) -> tuple[str, str] | None:
        """(id, sha256) of another item that is SOP Instance ``sop_uid`` and is queued, awaiting its
        commitment, delivered or quarantined (a requeue by hand would send it after this one); None when
        there is none."""
        row = self._conn().execute(
            "SELECT id, sha256 FROM queue WHERE sop_uid = ? AND id != ? AND state IN "
            "('queued', 'committing', 'delivered', 'quarantined') ORDER BY first_seen LIMIT 1",
            (sop_uid, item_id)).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def record_duplicate(self, item_id: str, size: int, sha256: str, sop_uid: str, of_id: str,
                         encoding: bool = False) -> None:
        """A copy of item ``of_id`` (the same instance: the same bytes, or with ``encoding`` the same
        elements and pixel values in another transfer syntax): recorded, never sent."""
        now = time.time()
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO queue (id, priority, size, sha256, first_seen, next_attempt, state, "
                       "last_error, sop_uid) VALUES (?, ?, ?, ?, ?, ?, 'duplicate', ?, ?)",
                       (item_id, int(Priority.NORMAL), size, sha256, now, now,
                        f"the same image as item {of_id} in another encoding: not sent twice" if encoding else
                        f"an identical copy of item {of_id}: not sent twice", sop_uid))
            db.execute("DELETE FROM facts WHERE id = ?", (item_id,))

    def item(self, item_id: str) -> QueueItem | None:
        row = self._conn().execute(
            "SELECT id, priority, size, sha256, attempts, first_seen, next_attempt, last_error, state, sop_uid "
            "FROM queue WHERE id = ?", (item_id,)).fetchone()
        return None if row is None else QueueItem.from_row(row)

    def due(self, now: float, limit: int = 1) -> list[QueueItem]:
        rows = self._conn().execute(
            "SELECT id, priority, size, sha256, attempts, first_seen, next_attempt, last_error, state, sop_uid "
            "FROM queue WHERE state = 'queued' AND next_attempt <= ? "
            "ORDER BY priority, first_seen LIMIT ?", (now, limit)).fetchall()
        return [QueueItem.from_row(r) for r in rows]

    def next_due_time(self) -> float | None:
        row = self._conn().execute("SELECT MIN(next_attempt) FROM queue WHERE state = 'queued'").fetchone()
        return None if row[0] is None else float(row[0])

    def defer(self, item_id: str, next_attempt: float, error: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE queue SET attempts = attempts + 1, next_attempt = ?, last_error = ? WHERE id = ?",
                       (next_attempt, error, item_id))

    # ------------------------------------------------------------ resumable uploads
    # An object store's multipart upload id, kept from its creation: a send after a cut, a crash or a
    # restart resumes it instead of starting again (the store says which parts it holds).
    def multipart_get(self, item_id: str) -> tuple[str, str, int] | None:
        row = self._conn().execute("SELECT key, upload_id, part_size FROM multipart WHERE id = ?",
                                   (item_id,)).fetchone()
        return None if row is None else (str(row[0]), str(row[1]), int(row[2]))

    def multipart_put(self, item_id: str, key: str, upload_id: str, part_size: int) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO multipart (id, key, upload_id, part_size, created) "
                       "VALUES (?, ?, ?, ?, ?)", (item_id, key, upload_id, part_size, time.time()))

    def multipart_done(self, item_id: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM multipart WHERE id = ?", (item_id,))

    def mark_interrupted(self, item_id: str) -> None:
        """An upload in flight when the daemon stopped (power cut, SIGKILL): one attempt more."""
        with self.tx() as db:
            db.execute("UPDATE queue SET attempts = attempts + 1, last_error = 'interrupted by a restart' "
                       "WHERE id = ? AND state = 'queued'", (item_id,))

    def set_state(self, item_id: str, state: UploadState, error: str | None = None) -> None:
        with self.tx() as db:
            if state is UploadState.DELIVERED:
                db.execute("UPDATE queue SET state = ?, delivered_at = ?, attempts = attempts + 1 WHERE id = ?",
                           (state.value, time.time(), item_id))
            else:
                db.execute("UPDATE queue SET state = ?, last_error = COALESCE(?, last_error) WHERE id = ?",
                           (state.value, error, item_id))

    def last_delivery(self) -> float | None:
        """When the image queue last had an item confirmed delivered (epoch seconds; a committed one
        counts when committed), or None."""
        row = self._conn().execute("SELECT MAX(delivered_at) FROM queue WHERE state = 'delivered'").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def mark_delivered(self, item_id: str, when: str) -> None:
        """Record a confirmed delivery and the last success time in one transaction."""
        with self.tx() as db:
            db.execute("UPDATE queue SET state = 'delivered', delivered_at = ?, attempts = attempts + 1 "
                       "WHERE id = ?", (time.time(), item_id))
            db.execute("INSERT INTO kv (key, value) VALUES ('last_success', ?) "
                       "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (when,))

    # ------------------------------------------------------------ storage commitment
    # An item the PACS stored (C-STORE success) waits in state 'committing', its file still in the
    # outbox, until the PACS commits to it (N-EVENT-REPORT): then 'delivered'; a failure re-queues it.
    # The UIDs are the anonymized instance's, generated on the truck: no patient data.
    def await_commitment(self, item_id: str, sop_class: str, sop_instance: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE queue SET state = 'committing', attempts = attempts + 1 WHERE id = ?", (item_id,))
            db.execute("INSERT INTO commitments (id, sop_class, sop_instance) VALUES (?, ?, ?) "
                       "ON CONFLICT(id) DO UPDATE SET sop_class = excluded.sop_class, "
                       "sop_instance = excluded.sop_instance, transaction_uid = NULL, requested_at = NULL, "
                       "requests = 0", (item_id, sop_class, sop_instance))

    def commitments_due(self, now: float, timeout_s: float, limit: int = 500) -> list[tuple[str, str, str, int]]:
        """(id, SOP class, SOP instance, requests so far) never requested, or unanswered for ``timeout_s``."""
        return self._conn().execute(
            "SELECT c.id, c.sop_class, c.sop_instance, c.requests FROM commitments c JOIN queue q ON q.id = c.id "
            "WHERE q.state = 'committing' AND (c.requested_at IS NULL OR c.requested_at < ?) "
            "ORDER BY c.requested_at IS NOT NULL, c.requested_at LIMIT ?", (now - timeout_s, limit)).fetchall()

    def commitment_issuing(self, ids: list[str], transaction_uid: str) -> None:
        """The transaction about to be asked for (not yet counted as a request)."""
        with self.tx() as db:
            db.executemany("UPDATE commitments SET transaction_uid = ? WHERE id = ?", [(transaction_uid, i) for i in ids])
            db.executemany("INSERT OR IGNORE INTO commitment_issued (transaction_uid, id) VALUES (?, ?)",
                           [(transaction_uid, i) for i in ids])

    def commitment_requested(self, ids: list[str], transaction_uid: str, now: float) -> None:
        with self.tx() as db:
            db.executemany("UPDATE commitments SET transaction_uid = ?, requested_at = ?, requests = requests + 1 "
                           "WHERE id = ?", [(transaction_uid, now, i) for i in ids])
            db.executemany("INSERT OR IGNORE INTO commitment_issued (transaction_uid, id) VALUES (?, ?)",
                           [(transaction_uid, i) for i in ids])

    def committing_ids(self) -> list[str]:
        return [r[0] for r in self._conn().execute("SELECT id FROM commitments")]

    def commitment_retry_at(self, ids: list[str], requested_at: float) -> None:
        with self.tx() as db:
            db.executemany("UPDATE commitments SET requested_at = ? WHERE id = ?", [(requested_at, i) for i in ids])

    def commitment_result(self, transaction_uid: str, committed: list[str], failed: dict[str, str],
                          now: float) -> dict[str, list[str]]:
        """Apply a report (SOP instance UIDs) for ``transaction_uid``: committed items become delivered,
        failed ones go back to the queue with the reason.  Returns the item ids of each, and under
        "ignored" the UIDs that are not in that transaction (a transaction we never issued, an instance
        it did not name, an item no longer waiting): a report proves nothing about those."""
        out: dict[str, list[str]] = {"delivered": [], "requeued": [], "ignored": []}
        with self.tx() as db:
            for uid, reason in [(u, None) for u in committed] + list(failed.items()):
                row = db.execute("SELECT c.id FROM commitments c JOIN queue q ON q.id = c.id "
                                 "JOIN commitment_issued i ON i.id = c.id AND i.transaction_uid = ? "
                                 "WHERE c.sop_instance = ? AND q.state = 'committing'",
                                 (transaction_uid, uid)).fetchone()
                if row is None:
                    out["ignored"].append(uid)
                    continue
                if reason is None:
                    db.execute("UPDATE queue SET state = 'delivered', delivered_at = ? WHERE id = ?", (now, row[0]))
                    out["delivered"].append(row[0])
                else:
                    db.execute("UPDATE queue SET state = 'queued', next_attempt = ?, last_error = ? WHERE id = ?",
                               (now, reason, row[0]))
                    out["requeued"].append(row[0])
                db.execute("DELETE FROM commitments WHERE id = ?", (row[0],))
                db.execute("DELETE FROM commitment_issued WHERE id = ?", (row[0],))
            if out["delivered"]:
                db.execute("INSERT INTO kv (key, value) VALUES ('last_success', ?) "
                           "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                           (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),))
        return out

    def count_state(self, state: str) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM queue WHERE state = ?", (state,)).fetchone()[0])

    def commitment_given_up(self, item_id: str, reason: str, now: float) -> None:
        """No answer after every request: the item is sent again (the same instance for the PACS)."""
        with self.tx() as db:
            db.execute("UPDATE queue SET state = 'queued', next_attempt = ?, last_error = ? "
                       "WHERE id = ? AND state = 'committing'", (now, reason, item_id))
            db.execute("DELETE FROM commitments WHERE id = ?", (item_id,))
            db.execute("DELETE FROM commitment_issued WHERE id = ?", (item_id,))

    def raise_priority(self, ids: list[str], priority: Priority) -> int:
        """Make queued items at least as urgent as ``priority`` (an exam's priority reaching its images
        already in the queue); never lowers one."""
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        with self.tx() as db:
            cur = db.execute(f"UPDATE queue SET priority = ? WHERE state = 'queued' AND priority > ? "
                             f"AND id IN ({marks})", (int(priority), int(priority), *ids))
            return cur.rowcount

    def clamp_next_attempts(self, now: float, max_backoff_s: float) -> int:
        """A stored next attempt further than ``max_backoff_s`` away is pulled in (clock jumps)."""
        with self.tx() as db:
            cur = db.execute("UPDATE queue SET next_attempt = ? WHERE state = 'queued' AND next_attempt > ?",
                             (now + max_backoff_s, now + max_backoff_s))
            return cur.rowcount

    def set_uplink(self, status: Uplink, reason: str | None = None, since: float | None = None) -> None:
        """What the uploader knows of its link: the status, the reason of a pause, when it went down."""
        with self.tx() as db:
            for key, value in ((StateKey.UPLINK, status.value), (StateKey.UPLINK_REASON, reason),
                               (StateKey.UPLINK_DOWN_SINCE, None if since is None else repr(since))):
                db.execute("INSERT INTO kv (key, value) VALUES (?, ?) "
                           "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key.value, value))

    def uplink(self) -> tuple[Uplink, str | None, float | None]:
        """(status, the reason of a pause, when it went down: epoch seconds) as the uploader recorded them;
        a database from before the typed key held "paused: <reason>" in one value."""
        raw = self.get(StateKey.UPLINK) or Uplink.UP.value
        reason = self.get(StateKey.UPLINK_REASON)
        if raw.startswith(Uplink.PAUSED.value + ":"):
            raw, reason = Uplink.PAUSED.value, raw.split(":", 1)[1].strip()
        try:
            status = Uplink(raw)
        except ValueError:
            status = Uplink.UP
        try:
            since = float(self.get(StateKey.UPLINK_DOWN_SINCE) or "")
        except ValueError:
            since = None
        return status, reason, since

    def _uplink_text(self) -> str:
        """For display: "up", "down since <UTC time>", or "paused: <reason>"."""
        status, reason, since = self.uplink()
        if status is Uplink.DOWN and since is not None:
            return f"down since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(since))}"
        if status is Uplink.PAUSED:
            return f"paused: {reason}" if reason else "paused"
        return status.value

    def rechecks_since(self, since: float, limit: int = 500) -> list[str]:
        """Ids flagged recheck since ``since``, newest first (the console sorts open ones first itself)."""
        return [r[0] for r in self._conn().execute(
            "SELECT id FROM queue WHERE priority = 0 AND first_seen > ? ORDER BY first_seen DESC LIMIT ?",
            (since, limit))]

    def queue_summary(self) -> dict[str, object]:
        conn = self._conn()
        by_prio = {str(p): n for p, n in conn.execute(
            "SELECT priority, COUNT(*) FROM queue WHERE state = 'queued' GROUP BY priority")}
        oldest = conn.execute("SELECT MIN(first_seen) FROM queue WHERE state = 'queued'").fetchone()[0]
        states = {s: n for s, n in conn.execute("SELECT state, COUNT(*) FROM queue GROUP BY state")}
        last_err = conn.execute("SELECT last_error FROM queue WHERE state = 'queued' AND last_error IS NOT NULL "
                                "ORDER BY next_attempt DESC LIMIT 1").fetchone()
        rechecks = [r[0] for r in conn.execute(
            "SELECT id FROM queue WHERE priority = 0 AND first_seen > ? ORDER BY first_seen DESC LIMIT 20",
            (time.time() - 86400,))]
        now = time.time()
        left = conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM queue WHERE state = 'queued'").fetchone()
        window = 600.0
        sent = conn.execute("SELECT COALESCE(SUM(size), 0), MIN(delivered_at) FROM queue WHERE state = 'delivered' "
                            "AND delivered_at > ?", (now - window,)).fetchone()
        goodput = float(sent[0]) / window if sent[0] else 0.0
        return {
            "backlog": {"items": int(left[0]), "bytes": int(left[1]),
                        "goodput_bps_10min": round(goodput, 1),
                        "drain_s": round(left[1] / goodput, 1) if goodput > 0 and left[1] else (0.0 if not left[1] else None),
                        "bytes_not_resent": int(self.get(StateKey.BYTES_NOT_RESENT) or 0)},
            "recheck_last_24h": rechecks,
            "queued_by_priority": by_prio,
            "states": states,
            "oldest_age_s": None if oldest is None else round(time.time() - oldest, 1),
            "last_error": None if last_err is None else last_err[0],
            "last_success": self.get(StateKey.LAST_SUCCESS),
            "uplink": self._uplink_text(),
            "uplink_status": self.uplink()[0].value,
            "last_error_by_destination": {k.split(":", 1)[1]: v for k, v in conn.execute(
                "SELECT key, value FROM kv WHERE key LIKE ?", (state_key(KeyPrefix.LAST_ERROR, "%"),))},
        }
