"""Stages and the runner that drives them (Mailman's runners: dequeue, dispose, finish).

A stage is a small class with one ``process(item) -> Result``: it decides, it never moves queue files.
Its :class:`Output` says what to place: new content for the item, or the item passed on (to the stage's
output queue, or another), its companions, the new items it made (the triage SR), and the :class:`Facts`
later stages need without reading the file again.  The runner places it, in one order for every stage
(new items, companions, the item, the facts, then the stage's :meth:`Stage.placed`), and settles the
outcome: one spool verb and one log line.
"""

from __future__ import annotations

import errno
import sqlite3
import hashlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

from medsendx_edge.errors import QuarantineError, RetryLater
from medsendx_edge.logs import get_logger
from medsendx_edge.metrics import FILES, QUARANTINED, STAGE_SECONDS
from medsendx_edge.spool import Claimed, Spool, new_id
from medsendx_edge.vocabulary import Outcome

RETRY_DELAY_S = 5.0   # an item deferred (the machine in trouble, a file still being written) waits this long
SWEEP_S = 10.0        # orphaned claims (an outcome that could not be recorded) are released this often
_HASH_CHUNK = 1 << 20   # what a copied range is hashed through (see _Hashing.copied_range)

# Errors that say "the machine is in trouble", not "this file is bad": retry later.
_TRANSIENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.EAGAIN}


Writer = Callable[[IO[bytes]], object]


@dataclass
class Facts:
    """What later stages need to know of an item without reading its file again (issue 25: the header
    was parsed 5 times and the file read 4 times on its way): recorded in the state database when the
    item is placed; route and upload read them there (and read the file only when they are missing)."""

    sop_uid: str | None = None
    size: int | None = None
    sha256: str | None = None


@dataclass
class NewItem:
    """A file a stage makes beside the one it processes (the triage SR, the overlay): queued in the
    stage's output queue, its sidecar first.  Its ``id`` is derived from the item's (spool.derived_id):
    a stage redone after a crash between this publish and the item's commit replaces it, never adds a
    second copy (found by the SIGKILL suite: a second SR, a duplicate or a conflict)."""

    writer: Writer
    sidecar: dict[str, Any]
    sop_uid: str | None = None
    id: str = field(default_factory=new_id)


@dataclass
class Output:
    """Where the item goes.  ``writer``: new content for the item (the input is finished); ``data``: the
    item's file replaced by these bytes; neither: the item itself moves on.  ``to``: a queue other than
    the stage's output.  ``companions``: written beside the item before it moves (``.json``, ``.png``)."""

    writer: Writer | None = None
    data: bytes | None = None
    to: str | None = None
    companions: dict[str, Any] = field(default_factory=dict)
    new_items: list[NewItem] = field(default_factory=list)
    facts: Facts | None = None


@dataclass
class Result:
    outcome: Outcome
    reason: str | None = None
    error_class: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    output: Output | None = None
    after: Any = None   # what the stage's ``placed`` needs (never logged)

    @classmethod
    def done(cls, output: Output | None = None, after: Any = None, **info: Any) -> "Result":
        return cls(Outcome.DONE, info=info, output=output or Output(), after=after)


class Stage:
    name = "stage"
    input_queue = ""
    output_queue = ""
    lookahead = 0   # items after the current one whose :meth:`prepare` the runner starts in worker threads

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._ahead: dict[str, Future[Any]] = {}

    def prepare(self, item: Claimed) -> Any:
        """The item's own computation, which a stage with ``lookahead`` may have run ahead in a worker
        thread while the runner handled the items before it: it reads the claimed file and nothing else
        (no state, no queue), and writes nothing.  :meth:`process` takes its value with :meth:`prepared`,
        in claim order, so what depends on the order (the exam book) stays in the runner's thread."""
        return None

    def prepared(self, item: Claimed) -> Any:
        """:meth:`prepare`'s value for ``item``: computed ahead, or now; its exception is raised here,
        inside :meth:`process`, and settles the item as any other would."""
        ahead = self._ahead.pop(item.id, None)
        return ahead.result() if ahead is not None else self.prepare(item)

    def process(self, item: Claimed) -> Result:  # pragma: no cover - abstract
        raise NotImplementedError

    def placed(self, item: Claimed, result: Result) -> None:
        """After the runner placed the item (its file is in the next queue): what follows from it (the
        route stage's upload row: the file first, then the row, so the uploader never sees a row without
        its file)."""


class _Hashing:
    """A writer's file with the bytes counted and hashed on the way (a seek makes the hash unknown)."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh, self.size, self.h, self.valid = fh, 0, hashlib.sha256(), True

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        self.h.update(mv)
        self.size += mv.nbytes
        return self._fh.write(mv)

    def seek(self, *args: Any) -> int:
        pos = self._fh.seek(*args)
        if pos != self.size:   # anywhere but the end of what was hashed: the hash no longer follows
            self.valid = False
        return pos

    def fileno(self) -> int:
        """None: a writer that copies by file descriptor (copy_file_range) would bypass the hash; it
        falls back to writing through :meth:`write` (anonymize/dicomio.py's copy asks for
        :meth:`kernel_copy_fd` instead, and reports what it copied)."""
        raise OSError("no file descriptor: writes are hashed on the way")

    def kernel_copy_fd(self) -> int:
        return self._fh.fileno()

    def copied_range(self, src_fd: int, offset: int, count: int) -> None:
        """The kernel copied ``count`` bytes of ``src_fd`` from ``offset`` to the end of this file: hash them
        from the source (the page cache), in order, through one reused buffer of 1 MiB.  Each read used to
        make a fresh 4 MiB bytes object, new pages from the kernel every time; a reused buffer is hashed
        while it is still in the cache.  The anonymize stage alone over benchmarks/bench_e2e.py's 20
        phantom mammograms: 0.64-0.67 s of CPU against 0.77-0.79 s."""
        buf = memoryview(bytearray(min(count, _HASH_CHUNK)))
        while count > 0:
            n = os.preadv(src_fd, [buf[:min(count, _HASH_CHUNK)]], offset)
            if not n:
                self.valid = False
                return
            self.h.update(buf[:n])
            self.size += n
            offset += n
            count -= n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def place(spool: Spool, item: Claimed, output: Output, default_queue: str) -> Facts | None:
    """Put a processed item where its output says, in the one commit order: new items (sidecar, then
    file), the item's companions, then the item itself (the commit point: before it, the item is redone
    whole; after it, it is done).  Returns the item's facts with the size and hash of what was written."""
    queue = output.to or default_queue
    # Facts of an earlier attempt go before anything is published: a later stage that meets the new file
    # before its facts (or after a failed record) reads the file itself, never stale facts.  A state
    # database that cannot be written stops the placement here (retried later), before any move.
    for new in output.new_items:
        spool.state.forget_facts_of(new.id)
    if output.facts is not None:
        spool.state.forget_facts_of(item.id)
    for new in output.new_items:
        publish_new(spool, queue, new)
    for ext, value in output.companions.items():
        # beside the item, to travel with it; beside its new content when there is new content
        spool.publish_companion(queue if output.writer is not None else item.queue, item.id, ext, value)
    facts = output.facts
    if output.writer is not None:
        hashed: list[_Hashing] = []

        def write(fh: IO[bytes], w: Writer = output.writer) -> None:
            hashed.append(_Hashing(fh))
            w(hashed[-1])  # type: ignore[arg-type]

        spool.publish(queue, item.id, write)
        spool.finish(item)
        if facts is not None and hashed and hashed[0].valid:
            facts.size, facts.sha256 = hashed[0].size, hashed[0].h.hexdigest()
    elif output.data is not None:
        spool.pass_on_replaced(item, queue, output.data)
        if facts is not None:
            facts.size, facts.sha256 = len(output.data), hashlib.sha256(output.data).hexdigest()
    else:
        spool.pass_on(item, queue)
    if facts is not None:
        record_facts(spool, item.id, facts)
    return facts


def publish_new(spool: Spool, queue: str, new: NewItem) -> None:
    """A new item into ``queue``: its sidecar, then its file (hashed on the way), then its facts."""
    spool.publish_companion(queue, new.id, ".json", new.sidecar)
    hashing: list[_Hashing] = []

    def write_new(fh: IO[bytes], w: Writer = new.writer) -> None:
        hashing.append(_Hashing(fh))
        w(hashing[-1])  # type: ignore[arg-type]

    spool.publish(queue, new.id, write_new)
    record_facts(spool, new.id, Facts(new.sop_uid, hashing[0].size, hashing[0].h.hexdigest()
                                      if hashing[0].valid else None))


def record_facts(spool: Spool, item_id: str, facts: Facts) -> None:
    """Into the state database; never a reason to fail a placed item (later stages then read the file)."""
    try:
        spool.state.record_facts(item_id, facts.sop_uid, facts.size, facts.sha256)
    except sqlite3.Error:
        pass


class Runner:
    """Drives one stage over its input queue."""

    def __init__(self, stage: Stage, *, retry_delay_s: float = RETRY_DELAY_S, stop: threading.Event | None = None) -> None:
        self.stage = stage
        self.spool = stage.spool
        self.retry_delay_s = retry_delay_s
        self.stop = stop or threading.Event()
        self._not_before: dict[str, float] = {}
        self._last_sweep = 0.0
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self.log = get_logger(stage=stage.name)

    def pending(self) -> int:
        return len(self.spool.ready(self.stage.input_queue))

    def run_once(self, limit: int | None = None, after_each: Callable[[], object] | None = None) -> int:
        """Process the items now in the input queue once (at most ``limit``); returns how many.

        A stage with ``lookahead`` n has the :meth:`Stage.prepare` of up to n + 1 claimed items running
        in worker threads while this thread handles them one by one, in claim order; every item claimed
        is handled before this returns (a stop waits for the ones in flight).  ``after_each``: called once
        each item is settled (the daemon's pipeline routes it then, not after the whole batch)."""

        def handle(item: Claimed) -> None:
            self.handle(item)
            if after_each is not None:
                after_each()

        handled = 0
        now = time.monotonic()
        if now - self._last_sweep >= SWEEP_S:
            self._last_sweep = now
            self.sweep_orphans()
        pool = self._workers()
        window: deque[Claimed] = deque()
        ready = self.spool.ready(self.stage.input_queue)
        recovered = self.spool.state.recovered_in(self.stage.name) if ready else set()
        # Items found in flight at a death go after the others: a kill or a power cut that came while the first
        # file of each start was in hand would otherwise find that same file in hand every time.
        for item_id in [i for i in ready if i not in recovered] + [i for i in ready if i in recovered]:
            if self.stop.is_set() or (limit is not None and handled >= limit):
                break
            if self._not_before.get(item_id, 0.0) > now:
                continue
            alone = pool is not None and item_id in recovered
            if alone:
                # In flight when the daemon died before: handled alone, nothing else claimed or prepared
                # beside it (the window drained before it is claimed), so that a crash it causes again is
                # counted against it, and a crash of another against that one (two claims at once were both
                # counted, and a healthy image skipped triage with the poison one).
                while window:
                    handle(window.popleft())
            item = self.spool.claim(self.stage.input_queue, item_id)
            if item is None:
                continue
            handled += 1
            if pool is None or alone:
                handle(item)
                continue
            self.stage._ahead[item.id] = pool.submit(self._prepare, item)
            window.append(item)
            if len(window) > self.stage.lookahead:
                handle(window.popleft())
        while window:
            handle(window.popleft())
        return handled

    def _prepare(self, item: Claimed) -> Any:
        """The stage's lookahead work on ``item`` in a worker thread, noted as that thread's item in hand."""
        with self.spool.in_hand.holding(item.queue, item.id):
            return self.stage.prepare(item)

    def _workers(self) -> ThreadPoolExecutor | None:
        """The worker threads for the stage's lookahead (made again when a reload changed it)."""
        want = self.stage.lookahead + 1 if self.stage.lookahead > 0 else 0
        if self._pool is not None and self._pool_size != want:
            self._pool.shutdown(wait=True)
            self._pool = None
        if want and self._pool is None:
            self._pool = ThreadPoolExecutor(want, thread_name_prefix=f"{self.stage.name}-ahead")
            self._pool_size = want
        return self._pool

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
        with self.spool.in_hand.holding(item.queue, item.id):   # a crash here is this item's (deaths.py)
            return self._handle(item)

    def _handle(self, item: Claimed) -> Result:
        start = time.perf_counter()
        log = self.log.bind(file_id=item.id)
        try:
            result = self.stage.process(item)
            if result.outcome is Outcome.DONE and result.output is not None:
                place(self.spool, item, result.output, self.stage.output_queue)
                self._after(item, result, log)
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

    def _after(self, item: Claimed, result: Result, log: Any) -> None:
        """The stage's follow-up once its item is placed.  The item has moved on: whatever fails now cannot
        quarantine or requeue it (it is no longer here); it is logged, and the next stage's own recovery
        finishes the job (the uploader registers an outbox file that has no queue row)."""
        try:
            self.stage.placed(item, result)
        except Exception as exc:  # noqa: BLE001 - the item is placed; the follow-up is redone downstream
            log.error("stage_error", error_class=type(exc).__name__, reason="after the item was placed", exc_info=exc)

    def _settle(self, item: Claimed, result: Result, log: Any, ms: float) -> None:
        FILES.labels(self.stage.name, result.outcome.value).inc()
        STAGE_SECONDS.labels(self.stage.name).observe(ms / 1000.0)
        if result.outcome is Outcome.QUARANTINE:
            self._not_before.pop(item.id, None)
            settle_quarantine(self.spool, item, self.stage.name, result.reason or "unknown",
                              result.error_class or "Error", log, duration_ms=ms)
        elif result.outcome is Outcome.RETRY_LATER:
            if item.path.exists():
                self.spool.unclaim(item)
            self._not_before[item.id] = time.monotonic() + self.retry_delay_s
            log.info("file_deferred", outcome=result.outcome, reason=result.reason, duration_ms=ms)
        else:
            self._not_before.pop(item.id, None)
            log.info("file_processed", outcome=result.outcome, duration_ms=ms, **result.info)


def settle_quarantine(spool: Spool, item: Claimed, stage: str, reason: str, error_class: str, log: Any,
                      **fields: Any) -> None:
    """The one quarantine path of every runner and of the uploader: the item parked with its reason, the
    counter, one log line."""
    QUARANTINED.labels(stage, error_class).inc()
    if item.path.exists() or item.path.is_symlink():
        spool.quarantine(item, stage, reason, error_class, attempts=fields.pop("attempts", 1))
    log.warning("file_quarantined", outcome=Outcome.QUARANTINE, reason=reason, error_class=error_class, **fields)


def _sqlite_reason(exc: sqlite3.OperationalError) -> str:
    text = str(exc).lower()
    for known in ("disk is full", "disk i/o error", "database is locked", "readonly"):
        if known in text:
            return known
    return "operational error"
