"""Shipping to the fleet: every ``fleet.interval_s`` the feature rows triage recorded since the last shipment
become one file (Parquet or CSV, no patient data), and every ``fleet.heartbeat_s`` the truck's status a
JSON heartbeat, in the fleet spool's outbox, sent by its own uploader (the fleet service:
fleet/server.py)."""

from __future__ import annotations

import hashlib
import hmac
import json
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medsendx_edge import __version__

from medsendx_edge.config import FleetConfig
from medsendx_edge.logs import get_logger
from medsendx_edge.spool import OUTBOX, Spool, new_id
from medsendx_edge.state import StateDB
from medsendx_edge.triage.features import FeatureStore, write_rows
from medsendx_edge.vocabulary import StateKey


class FeatureShipper:
    def __init__(self, features: FeatureStore, state: StateDB, fleet_spool: Spool, cfg: FleetConfig,
                 on_queued: threading.Event | None = None) -> None:
        self.features, self.state, self.fleet_spool, self.cfg = features, state, fleet_spool, cfg
        self.on_queued = on_queued   # e.g. the fleet uploader's wake event
        self._last = time.monotonic()
        self._last_beat = -float("inf")
        self.log = get_logger()

    def reconfigure(self, cfg: FleetConfig) -> None:
        self.cfg = cfg

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.cfg.interval_s

    def beat_due(self) -> bool:
        """Heartbeats go to a fleet service (an http destination); a folder of feature files for the miner
        gets none (they would be JSON among its Parquet files)."""
        return self.cfg.destination.kind == "http" and time.monotonic() - self._last_beat >= self.cfg.heartbeat_s

    def ship_exams(self, book: Any, secret: bytes) -> int:
        """Queue the summaries of the exams that changed since the last ones sent (the exam book); returns
        how many."""
        after = self._watermark(StateKey.FLEET_EXAMS_SHIPPED_SEQ, StateKey.FLEET_EXAMS_SHIPPED,
                                StateKey.FLEET_EXAMS_SHIPPED_MINE, book)
        changed = book.updated_after(after)
        if not changed:
            return 0
        doc = {"kind": "exams", "exams": [exam_summary(book.summary(e).as_dict(), t, secret, n) for e, t, n in changed]}
        item_id = new_id()
        self.fleet_spool.publish(OUTBOX, item_id, lambda fh: fh.write(json.dumps(doc).encode()))
        self.state.put(StateKey.FLEET_EXAMS_SHIPPED_SEQ, str(max(n for _e, _t, n in changed)))
        self._keep_legacy(StateKey.FLEET_EXAMS_SHIPPED, StateKey.FLEET_EXAMS_SHIPPED_MINE,
                          max(t for _e, t, _n in changed))
        self.log.info("exams_queued", file_id=item_id, count=len(changed))
        if self.on_queued is not None:
            self.on_queued.set()
        return len(changed)

    def beat(self, status: dict[str, Any]) -> str:
        """Queue a heartbeat: ``status`` reduced to what the fleet needs (counts, no item ids, no patient
        data), with the time it was taken; returns its id."""
        self._last_beat = time.monotonic()
        doc = {"kind": "heartbeat", "sent_at": datetime.now(timezone.utc).isoformat(), "status": heartbeat(status)}
        item_id = new_id()
        self.fleet_spool.publish(OUTBOX, item_id, lambda fh: fh.write(json.dumps(doc).encode()))
        self.log.info("heartbeat_queued", file_id=item_id)
        if self.on_queued is not None:
            self.on_queued.set()
        return item_id

    def _watermark(self, key: str, legacy: str, mine: str, store: Any) -> int:
        """The number of the last record shipped.  From the time watermark kept beside it when this release
        did not write that time last (the first run after an upgrade; a downgrade ran since, which shipped
        by time, and may have had the store restored from a backup, its numbering restarted), or when the
        number is past the store's last (restored by hand): what that time had shipped."""
        value, old = self.state.get(key), self.state.get(legacy)
        if value is not None and old == self.state.get(mine) and int(value) <= store.last_seq():
            return int(value)
        return 0 if old is None else int(store.shipped_upto(float(old)))

    def _keep_legacy(self, key: str, mine: str, until: float) -> None:
        """The time watermark a release before seq reads (a downgrade ships from it, not from the start), and
        this release's copy of it (a downgrade that moved it is seen)."""
        old = self.state.get(key)
        value = repr(max(until, float(old)) if old is not None else until)
        self.state.put(key, value)
        self.state.put(mine, value)

    def ship(self) -> int:
        """Queue the feature rows recorded since the last shipment as one file; returns rows."""
        self._last = time.monotonic()
        legacy = self.state.get(StateKey.FLEET_SHIPPING)
        begun = self.state.get(StateKey.FLEET_SHIPPING_SEQ)
        if legacy:
            # A shipment a crash cut short (between its file and its watermark): the same rows under the same
            # id, so the fleet gets them once (a copy already in the outbox or delivered is that one again).
            # This one was begun by a release before seq: its rows by time.
            record = json.loads(legacy)
            if isinstance(record, dict):   # the one development build that wrote the seq record here
                (after, upto), item_id = record["seq"], record["id"]
                rows, _ = self.features.rows_after(after, upto)
                until = max((float(r["recorded"]) for r in rows), default=0.0)
            else:
                since, until, item_id = record
                rows = self.features.rows(since=since, until=until)
                upto = self.features.shipped_upto(until)
        elif begun:
            record = json.loads(begun)
            (after, upto), until, item_id = record["seq"], record["until"], record["id"]
            rows, _ = self.features.rows_after(after, upto)
        else:
            after = self._watermark(StateKey.FLEET_SHIPPED_SEQ, StateKey.FLEET_LAST_SHIPPED,
                                    StateKey.FLEET_LAST_SHIPPED_MINE, self.features)
            rows, upto = self.features.rows_after(after)
            if not rows:
                return 0
            until, item_id = max(float(r["recorded"]) for r in rows), new_id()
            self.state.put(StateKey.FLEET_SHIPPING_SEQ, json.dumps({"seq": [after, upto], "until": until,
                                                                   "id": item_id}))
        begun = legacy or begun
        # A redo whose file was published before the crash leaves it as it is: the uploader may have queued
        # it with its hash already, and rows re-recorded since (a redone triage) would make other bytes.
        outbox = self.fleet_spool.path(OUTBOX, item_id)
        published = bool(begun) and (self.fleet_spool.state.item(item_id) is not None or outbox.exists()
                                     or outbox.with_name(outbox.name + ".work").exists()
                                     or self.fleet_spool.exists_after(OUTBOX, item_id))
        if not published:
            # Through the spool (temp name, fsync, rename, fsync folder), the only writer of queue files.
            with tempfile.TemporaryDirectory(prefix=".staging-", dir=self.fleet_spool.root) as tmp:
                staged = write_rows(rows, Path(tmp) / f"rows{self.fleet_spool.suffix}")
                self.fleet_spool.publish_file(OUTBOX, item_id, staged)
        self.state.put(StateKey.FLEET_SHIPPED_SEQ, str(upto))
        self._keep_legacy(StateKey.FLEET_LAST_SHIPPED, StateKey.FLEET_LAST_SHIPPED_MINE, until)
        self.state.put(StateKey.FLEET_SHIPPING_SEQ, None)
        self.state.put(StateKey.FLEET_SHIPPING, None)
        self.log.info("features_queued", file_id=item_id, count=len(rows))
        if self.on_queued is not None:
            self.on_queued.set()
        return len(rows)


def exam_summary(summary: dict[str, Any], updated: float, secret: bytes, revision: int | None = None) -> dict[str, Any]:
    """What of an exam goes to the fleet: a pseudonym of its own (a keyed hash with the site secret: the
    truck's exam key is a hash of the study UID the PACS holds, so the PACS could compute that one and join
    the fleet's record to the woman's study; docs/privacy.md), the day, the record's revision (the exam
    book's last record number for it, which grows with every change, a quarantined image withdrawn too;
    else its number of images, which a withdrawal lowers), category, priority, status, and reasons in our
    words (no image ids, no patient data, no breast size)."""
    pseudonym = hmac.new(secret, f"fleet-exam:{summary['exam']}".encode(), hashlib.sha256).hexdigest()[:16]
    return {"exam": pseudonym, "category": summary.get("category"), "priority": summary.get("priority"),
            "status": summary.get("status"), "views": len(summary.get("views") or []),
            "revision": int(revision if revision is not None else summary.get("images") or 0),
            "reasons": [str(r)[:300] for r in summary.get("reasons") or []][:20],
            "updated": datetime.fromtimestamp(updated // 86400 * 86400, timezone.utc).isoformat()}


def heartbeat(status: dict[str, Any]) -> dict[str, Any]:
    """What of ``status --json`` goes to the fleet: numbers and our own words, never an item id."""
    queue = status.get("upload_queue") or {}
    backlog = queue.get("backlog") or {}
    return {"version": __version__, "healthy": bool(status.get("healthy")),
            "problems": [str(p)[:300] for p in status.get("problems") or []][:10],
            "backlog": int(backlog.get("items") or 0), "backlog_bytes": int(backlog.get("bytes") or 0),
            "drain_s": backlog.get("drain_s"), "uplink": queue.get("uplink_status") or queue.get("uplink"),
            "disk_free_mb": status.get("free_mb"), "rechecks_today": len(queue.get("recheck_last_24h") or []),
            "quarantined_last_hour": status.get("quarantined_last_hour"), "counts": status.get("counts") or {}}
