"""Stages and the runner that drives them (Mailman's runners, rq's burst mode).

A stage is a small class with one ``process(item) -> Result``; the stage places
its own output (``self.spool.publish`` + ``finish``, or ``forward``).  The
runner claims, calls, and turns the outcome into a spool verb and one log line.
"""

from __future__ import annotations

import errno
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from medsendx_edge.errors import QuarantineError, RetryLater
from medsendx_edge.logs import get_logger
from medsendx_edge.metrics import FILES, QUARANTINED, STAGE_SECONDS
from medsendx_edge.spool import Claimed, Spool
from medsendx_edge.vocabulary import Outcome

RETRY_DELAY_S = 5.0   # an item deferred (the machine in trouble, a file still being written) waits this long
SWEEP_S = 10.0        # orphaned claims (an outcome that could not be recorded) are released this often

# Errors that say "the machine is in trouble", not "this file is bad": retry later.
_TRANSIENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.EAGAIN}


@dataclass
class Result:
    outcome: Outcome
    reason: str | None = None
    error_class: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def done(cls, **info: Any) -> "Result":
        return cls(Outcome.DONE, info=info)


class Stage:
    name = "stage"
    input_queue = ""
    output_queue = ""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def process(self, item: Claimed) -> Result:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, item: Claimed) -> None:
        self.spool.pass_on(item, self.output_queue)


class Runner:
    """Drives one stage over its input queue."""

    def __init__(self, stage: Stage, *, retry_delay_s: float = RETRY_DELAY_S, stop: threading.Event | None = None) -> None:
        self.stage = stage
        self.spool = stage.spool
        self.retry_delay_s = retry_delay_s
        self.stop = stop or threading.Event()
        self._not_before: dict[str, float] = {}
        self._last_sweep = 0.0
        self.log = get_logger(stage=stage.name)

    def pending(self) -> int:
        return len(self.spool.ready(self.stage.input_queue))

    def run_once(self, limit: int | None = None) -> int:
        """Process the items now in the input queue once (at most ``limit``); returns how many."""
        handled = 0
        now = time.monotonic()
        if now - self._last_sweep >= SWEEP_S:
            self._last_sweep = now
            self.sweep_orphans()
        for item_id in self.spool.ready(self.stage.input_queue):
            if self.stop.is_set() or (limit is not None and handled >= limit):
                break
            if self._not_before.get(item_id, 0.0) > now:
                continue
            item = self.spool.claim(self.stage.input_queue, item_id)
            if item is None:
                continue
            self.handle(item)
            handled += 1
        return handled

    def sweep_orphans(self) -> int:
        """Put back items this runner claimed but could not settle (the outcome itself failed: a full
        disk refusing the quarantine record): between two items nothing of ours is in flight, so every
        claim left in the input queue is an orphan.  A full disk then resumes by itself."""
        n = 0
        for item_id in self.spool.claimed(self.stage.input_queue):
            item = Claimed(self.stage.input_queue, item_id,
                           self.spool.dir(self.stage.input_queue) / f"{item_id}{self.spool.suffix}.work")
            try:
                self.spool.unclaim(item)
                n += 1
            except OSError:
                continue
        if n:
            self.log.info("claims_released", count=n)
        return n

    def drain(self, max_rounds: int = 1000) -> int:
        total = 0
        for _ in range(max_rounds):
            n = self.run_once()
            total += n
            if n == 0:
                break
        return total

    def handle(self, item: Claimed) -> Result:
        start = time.perf_counter()
        log = self.log.bind(file_id=item.id)
        try:
            result = self.stage.process(item)
        except QuarantineError as exc:
            result = Result(Outcome.QUARANTINE, exc.reason, exc.error_class)
        except RetryLater as exc:
            result = Result(Outcome.RETRY_LATER, str(exc), type(exc).__name__)
        except sqlite3.OperationalError as exc:
            # "database or disk is full", "disk I/O error", "database is locked": the machine, not the file.
            result = Result(Outcome.RETRY_LATER, f"state database unavailable ({_sqlite_reason(exc)})",
                            "OperationalError")
        except OSError as exc:
            if exc.errno in _TRANSIENT_ERRNOS:
                result = Result(Outcome.RETRY_LATER, f"system error {errno.errorcode.get(exc.errno or 0, '?')}",
                                "OSError")
            else:
                log.error("stage_error", error_class=type(exc).__name__, exc_info=exc)
                result = Result(Outcome.QUARANTINE,
                                f"unexpected {type(exc).__name__} "
                                f"({errno.errorcode.get(exc.errno or 0, 'no errno')}) in stage {self.stage.name}",
                                type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - a bad file must never stop the daemon
            log.error("stage_error", error_class=type(exc).__name__, exc_info=exc)
            result = Result(Outcome.QUARANTINE, f"unexpected {type(exc).__name__} in stage {self.stage.name}",
                            type(exc).__name__)
        ms = round((time.perf_counter() - start) * 1000, 1)
        try:
            self._settle(item, result, log, ms)
        except (OSError, sqlite3.OperationalError) as exc:
            # The outcome could not be written (full disk): the item waits, claimed, until
            # sweep_orphans puts it back; the daemon goes on.
            self._not_before[item.id] = time.monotonic() + self.retry_delay_s
            log.warning("file_deferred", outcome=Outcome.RETRY_LATER, error_class=type(exc).__name__,
                        reason="the outcome could not be recorded (disk full?)", duration_ms=ms)
            result = Result(Outcome.RETRY_LATER, "outcome not recorded", type(exc).__name__)
        return result

    def _settle(self, item: Claimed, result: Result, log: Any, ms: float) -> None:
        FILES.labels(self.stage.name, result.outcome.value).inc()
        STAGE_SECONDS.labels(self.stage.name).observe(ms / 1000.0)
        if result.outcome is Outcome.QUARANTINE:
            QUARANTINED.labels(self.stage.name, result.error_class or "Error").inc()
            self._not_before.pop(item.id, None)
            if item.path.exists() or item.path.is_symlink():
                self.spool.quarantine(item, self.stage.name, result.reason or "unknown",
                                      result.error_class or "Error")
            log.warning("file_quarantined", outcome=result.outcome, reason=result.reason,
                        error_class=result.error_class, duration_ms=ms)
        elif result.outcome is Outcome.RETRY_LATER:
            if item.path.exists():
                self.spool.unclaim(item)
            self._not_before[item.id] = time.monotonic() + self.retry_delay_s
            log.info("file_deferred", outcome=result.outcome, reason=result.reason, duration_ms=ms)
        else:
            self._not_before.pop(item.id, None)
            log.info("file_processed", outcome=result.outcome, duration_ms=ms, **result.info)


def _sqlite_reason(exc: sqlite3.OperationalError) -> str:
    text = str(exc).lower()
    for known in ("disk is full", "disk i/o error", "database is locked", "readonly"):
        if known in text:
            return known
    return "operational error"
