"""Shipping feature rows to the fleet: every ``fleet.interval_s`` the rows triage recorded since the last
shipment become one file (Parquet or CSV, no patient data) in the fleet spool's outbox, sent by its own
uploader."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

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
        self.log = get_logger()

    def reconfigure(self, cfg: FleetConfig) -> None:
        self.cfg = cfg

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.cfg.interval_s

    def ship(self) -> int:
        """Queue the feature rows recorded since the last shipment as one file; returns rows."""
        self._last = time.monotonic()
        since = float(self.state.get(StateKey.FLEET_LAST_SHIPPED) or -1)
        rows = self.features.rows(since=since)
        if not rows:
            return 0
        item_id = new_id()
        # Through the spool (temp name, fsync, rename, fsync folder), the only writer of queue files.
        with tempfile.TemporaryDirectory(prefix=".staging-", dir=self.fleet_spool.root) as tmp:
            staged = write_rows(rows, Path(tmp) / f"rows{self.fleet_spool.suffix}")
            self.fleet_spool.publish_file(OUTBOX, item_id, staged)
        self.state.put(StateKey.FLEET_LAST_SHIPPED, repr(max(float(r["recorded"]) for r in rows)))
        self.log.info("features_queued", file_id=item_id, count=len(rows))
        if self.on_queued is not None:
            self.on_queued.set()
        return len(rows)
