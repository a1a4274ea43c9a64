"""The uploader thread: drains outbox/ in priority order into the destination.

State lives in SQLite (see :mod:`medsendx_edge.state`).  Order of effects for
one item: claim -> send (the destination verifies) -> record ``delivered`` ->
move to sent/.  A crash after the send but before the record re-sends once
after restart (the destination treats it as the same instance); an item
recorded as delivered is never sent again, only moved to sent/.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from medsendx_edge.config import UploadConfig
from medsendx_edge.upload.destinations import PRESENT, Destination
from medsendx_edge.errors import (DestinationFaultError, PermanentUploadError, SyntaxRefusedError,
                                  TransientUploadError)
from medsendx_edge.logs import get_logger
from medsendx_edge.metrics import DELIVERED, DELIVERED_BYTES
from medsendx_edge.anonymize.dicomio import sop_instance_uid
from medsendx_edge.upload.route import file_digest, item_priority
from medsendx_edge.spool import OUTBOX, SENT, Claimed, Spool, export_id
from medsendx_edge.stage import settle_quarantine
from medsendx_edge.state import QueueItem
from medsendx_edge.vocabulary import KeyPrefix, Outcome, StateKey, UploadState, Uplink, state_key


# The uploader thread's own rhythm (not operator settings: the link's are in UploadConfig).
RECONCILE_S = 5.0          # outbox files the database does not know yet are registered this often
COMMIT_ASK_S = 2.0         # stored items are batched into one commitment request this often
PRUNE_SENT_S = 3600.0      # sent/ retention is applied this often
LOCAL_FAULT_HOLD_S = 5.0   # a state database that cannot be written (full disk) is retried this often
IDLE_WAIT_S = 5.0          # longest sleep with nothing due (a wake event cuts it short)
RUN_ONCE_COMMIT_WAIT_S = 60.0  # run --once waits at most this long for the PACS's commitment reports


def backoff_delay(attempts: int, initial: float, maximum: float, rng: Callable[[float, float], float]) -> float:
    """Exponential backoff with full jitter, between ``initial`` and ``maximum``."""
    ceiling = min(maximum, initial * (2 ** min(attempts, 32)))
    return max(initial, rng(0.0, ceiling))


@dataclass
class UplinkState:
    down: bool = False
    consecutive_failures: int = 0   # transient failures on different items in a row
    down_attempts: int = 0          # failures since the link was declared down (drives the hold)
    last_failed_id: str | None = None
    down_since: float | None = None
    hold_until: float = 0.0
    paused_auth: bool = False


class Uploader:
    def __init__(self, spool: Spool, destination: Destination, cfg: UploadConfig,
                 stop: threading.Event | None = None, rng: Callable[[float, float], float] = random.uniform) -> None:
        self.spool = spool
        self._destination = destination
        self._retired: list[Destination] = []   # replaced by a reload: closed by this thread, between sends
        self.cfg = cfg
        self.stop = stop or threading.Event()
        self.wake = threading.Event()
        self.rng = rng
        self.uplink = UplinkState()
        self.log = get_logger(stage="upload", destination=destination.kind, host=_where(destination))
        self.heartbeat = time.monotonic()
        self.local_fault = False  # the state database could not be written (full disk)
        self._last_sync = 0.0
        self._last_commit_request = 0.0
        self._wire(destination)

    # ------------------------------------------------------------- the destination
    @property
    def destination(self) -> Destination:
        return self._destination

    @destination.setter
    def destination(self, new: Destination) -> None:
        self._destination = new
        self._wire(new)

    def _wire(self, destination: Destination) -> None:
        if self.commits(destination):
            destination.report_sink = self._on_commitment_report  # type: ignore[attr-defined]
        if hasattr(destination, "resume"):
            destination.resume = self.spool.state  # resumable uploads keep their ids in the state database

    @staticmethod
    def commits(destination: Destination) -> bool:
        return bool(getattr(destination, "commitment", False))

    def reconfigure(self, destination: Destination, cfg: UploadConfig) -> None:
        """A reload: the new destination and settings apply from the next send; the old destination is
        closed by the uploader thread (a send in flight finishes on it), and a pause is lifted."""
        old = self._destination
        self.destination = destination
        self.log = get_logger(stage="upload", destination=destination.kind, host=_where(destination))
        self.cfg = cfg
        self.uplink.hold_until = 0.0
        self.uplink.paused_auth = False
        if old is not destination:
            self._retired.append(old)
        self.wake.set()

    def _close_retired(self) -> None:
        while self._retired:
            self._retired.pop().close()

    def _beat(self) -> None:
        self.heartbeat = time.monotonic()

    # ------------------------------------------------------------- bookkeeping
    def reconcile(self) -> None:
        """Register outbox files the database does not know; finish items recorded as delivered."""
        state = self.spool.state
        for item_id in self.spool.ready(OUTBOX):
            row = state.item(item_id)
            if row is None:  # published by the route stage a moment ago, or before a crash
                path = self.spool.path(OUTBOX, item_id)
                size, digest = file_digest(path)  # what is sent (route may have re-encoded it since the facts)
                # with its instance, so a later copy of it is caught as a duplicate or a conflict
                state.enqueue(item_id, item_priority(self.spool, OUTBOX, item_id), size, digest,
                              sop_uid=state.facts(item_id)[0] or sop_instance_uid(path))
            elif row.state is UploadState.DELIVERED:
                claimed = self.spool.claim(OUTBOX, item_id)
                if claimed is not None:
                    self.spool.pass_on(claimed, SENT)
            elif row.state in (UploadState.QUARANTINED, UploadState.MISSING):
                state.set_state(item_id, UploadState.QUEUED)  # requeued by hand after a fix, or back after all
        self._last_sync = time.monotonic()

    def prune_sent(self, now: float | None = None) -> int:
        """Delivered items older than ``sent_retention_days`` leave ``sent/`` with their pictures and sidecars."""
        now = time.time() if now is None else now
        return self.spool.prune(SENT, now - self.cfg.sent_retention_days * 86400)

    # ------------------------------------------------------------- one attempt
    def step(self, now: float | None = None, row: QueueItem | None = None) -> bool:
        """Try the most urgent due item (or ``row``) once; False when nothing was due."""
        now = time.time() if now is None else now
        if row is None:
            if now < self.uplink.hold_until:
                return False
            due = self.spool.state.due(now, limit=1)
            if not due:
                return False
            row = due[0]
        item = self.spool.claim(OUTBOX, row.id)
        if item is None:  # the file is gone from the outbox: it was finished already
            if not self.spool.path(SENT, row.id).exists():
                self.spool.state.set_state(row.id, UploadState.MISSING, "outbox file missing")
            else:
                # Only a confirmed delivery moves a file to sent/: a row still queued is a record older than
                # the file (a state database restored from a backup).  Recorded as delivered, not sent again,
                # and not picked again at once (that spun the uploader on the same row).
                self.spool.state.mark_delivered(row.id, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                self.log.warning("delivery_record_restored", file_id=row.id, outcome=Outcome.PRESENT,
                                 reason="the file was in sent/ while its record said queued (a restored state "
                                        "database): recorded as delivered")
            return True
        try:
            with self.spool.in_hand.holding(OUTBOX, row.id):   # a crash here is this item's (deaths.py)
                return self._attempt(item, row, now)
        except BaseException:
            # Whatever escaped (a state database that cannot be written on a full disk, a stop): the
            # item is never left claimed while the daemon runs on; it waits in the outbox.
            if item.path.exists():
                self.spool.unclaim(item)
            self.uplink.hold_until = max(self.uplink.hold_until, now + min(self.cfg.max_backoff_s, LOCAL_FAULT_HOLD_S))
            raise

    def _attempt(self, item: Claimed, row: QueueItem, now: float) -> bool:
        log = self.log.bind(file_id=row.id)
        start = time.perf_counter()
        destination = self.destination  # a reload may swap it; this send finishes on this one
        destination.progress = self._beat
        try:
            outcome = destination.send(item.path, export_id(row.id), row.sha256, suffix=self.spool.suffix,
                                       retry=row.attempts > 0, sop_uid=row.sop_uid)
        except TransientUploadError as exc:
            self.spool.unclaim(item)
            self._transient(row.id, row.attempts, str(exc), exc.retry_after, now)
        except DestinationFaultError as exc:
            self.spool.unclaim(item)
            self._destination_fault(row, exc, now, log)
        except SyntaxRefusedError as exc:
            self._send_decoded(item, row, exc, destination, log)
        except PermanentUploadError as exc:
            forget = getattr(destination, "forget", None)
            if forget is not None:
                forget(export_id(row.id))  # a partial upload on the store is aborted, not left to rot
            self.spool.state.set_state(row.id, UploadState.QUARANTINED, str(exc))
            settle_quarantine(self.spool, item, "upload", str(exc), "PermanentUploadError", log,
                              attempts=row.attempts + 1)
        except Exception as exc:  # noqa: BLE001 - an unexpected failure: the item waits, the thread goes on
            self.spool.unclaim(item)
            delay = backoff_delay(row.attempts, self.cfg.initial_backoff_s, self.cfg.max_backoff_s, self.rng)
            self.spool.state.defer(row.id, now + delay, f"unexpected {type(exc).__name__}")
            log.error("uploader_error", error_class=type(exc).__name__, exc_info=exc)
        else:
            stored = getattr(destination, "last_sent", None) if self.commits(destination) else None
            if self._record_success(item, row, stored, now, log):
                if outcome == PRESENT:  # an earlier attempt got through: nothing sent twice
                    self.spool.state.add(StateKey.BYTES_NOT_RESENT, row.size)
                if stored is None:
                    DELIVERED.labels(destination.kind).inc()
                    DELIVERED_BYTES.labels(destination.kind).inc(row.size)
                log.info("file_stored" if stored is not None else "file_delivered",
                         outcome=Outcome.PRESENT if outcome == PRESENT else
                         Outcome.AWAITING_COMMITMENT if stored is not None else Outcome.DONE,
                         bytes=row.size, priority=row.priority.label,
                         duration_ms=round((time.perf_counter() - start) * 1000, 1))
        return True

    def _send_decoded(self, item: Claimed, row: QueueItem, exc: SyntaxRefusedError, destination: Destination,
                      log: Any) -> None:
        """The destination took the instance but not its encoding: remembered for the destination (the
        route stage stops compressing for it; said once), the file decoded losslessly in the outbox and
        sent again at once.  Not a failure: no attempt counted, nothing quarantined.  The queue row is
        rewritten before the file: a crash in between sends the encoded file again, which is refused
        again (nothing was delivered); the other order could find its own delivered copy a conflict."""
        from pydicom.uid import UID

        from medsendx_edge.upload.compress import decompressed_file, destination_key, remember_refusal

        dcfg = getattr(destination, "cfg", None)
        if dcfg is not None and remember_refusal(self.spool.state, destination_key(dcfg), exc.syntax):
            log.warning("compression_refused", reason=str(exc), syntax=UID(exc.syntax).name,
                        outcome=Outcome.RESEND)
        try:
            data = decompressed_file(item.path)
        except Exception as err:  # noqa: BLE001 - refused as it is and cannot be decoded: no way to deliver it
            reason = (f"{exc}; the file cannot be decoded to send it uncompressed ({type(err).__name__})")
            self.spool.state.set_state(row.id, UploadState.QUARANTINED, reason)
            settle_quarantine(self.spool, item, "upload", reason, "SyntaxRefusedError", log,
                              attempts=row.attempts + 1)
            return
        self.spool.state.replace_content(row.id, len(data), hashlib.sha256(data).hexdigest())
        self.spool.rewrite_claimed(item, data)
        self.spool.unclaim(item)
        self.wake.set()

    def _destination_fault(self, row: QueueItem, exc: DestinationFaultError, now: float, log: Any) -> None:
        """Credentials, a redirect, a wrong path, a certificate, a size limit: the destination is at fault,
        not this file.  The whole queue waits (one probe per max_backoff_s), nothing is quarantined, and
        it is said once."""
        self.spool.state.defer(row.id, now, str(exc))
        self.uplink.hold_until = now + self.cfg.max_backoff_s
        self.spool.state.put(state_key(KeyPrefix.LAST_ERROR, self.destination.kind), str(exc))
        if not self.uplink.paused_auth:
            self.uplink.paused_auth = True
            self.spool.state.set_uplink(Uplink.PAUSED, str(exc))
            log.error("destination_fault", reason=str(exc), delay_s=self.cfg.max_backoff_s)

    def _record_success(self, item: Claimed, row: QueueItem, stored: tuple[str, str] | None, now: float,
                        log: Any) -> bool:
        """The destination confirmed: record it (delivered, or stored and awaiting the PACS's commitment),
        then move the file (to sent/, or back to the outbox to wait).  False when the record cannot be
        written (a full disk): the item goes back (a re-send is the same instance for the PACS) and the
        uploader holds until the disk has room, instead of claiming the next one."""
        try:
            if stored is not None:
                self.spool.state.await_commitment(row.id, *stored)
            else:
                self.spool.state.mark_delivered(row.id, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        except Exception as exc:  # noqa: BLE001 - the record cannot be written
            self.spool.unclaim(item)
            self.uplink.hold_until = now + min(self.cfg.max_backoff_s, LOCAL_FAULT_HOLD_S)
            if not self.local_fault:
                self.local_fault = True
                log.error("uploader_local_fault", error_class=type(exc).__name__,
                          reason="the state database cannot be written (disk full?): uploads wait")
            return False
        if self.local_fault:
            self.local_fault = False
            log.info("uploader_local_fault_cleared")
        if stored is not None:
            self.spool.unclaim(item)
        else:
            self.spool.pass_on(item, SENT, durable=False)  # the database is the record; reconcile() redoes a lost move
            os.utime(self.spool.path(SENT, row.id))  # sent/ retention counts from delivery
        if self.uplink.down or self.uplink.paused_auth:
            self.spool.state.set_uplink(Uplink.UP)
            log.info("uplink_restored", since_s=round(now - (self.uplink.down_since or now), 1))
        self.uplink = UplinkState()
        return True

    # ------------------------------------------------------------- storage commitment
    def request_commitments(self, now: float | None = None) -> int:
        """Ask the PACS to commit to the stored items not yet asked for (or unanswered for
        ``commitment_timeout_s``); an item unanswered after ``commitment_requests`` requests is sent
        again.  Returns how many were asked for."""
        now = time.time() if now is None else now
        destination = self.destination
        if not self.commits(destination):
            return 0
        self._last_commit_request = time.monotonic()
        dcfg = destination.cfg  # type: ignore[attr-defined]
        state = self.spool.state
        ask = []
        for item_id, sop_class, sop_instance, requests in state.commitments_due(now, dcfg.commitment_timeout_s):
            if requests >= dcfg.commitment_requests:
                state.commitment_given_up(item_id, f"no storage commitment after {requests} requests", now)
                self.log.warning("commitment_unanswered", file_id=item_id, requests=requests, outcome=Outcome.RESEND)
            else:
                ask.append((item_id, sop_class, sop_instance))
        if not ask:
            return 0
        from pydicom.uid import generate_uid

        # The transaction is ours before the PACS hears of it: only reports naming it are believed.
        uid = str(generate_uid(prefix="2.25."))
        state.commitment_issuing([a[0] for a in ask], uid)
        try:
            destination.request_commitment([(c, i) for _, c, i in ask], uid)  # type: ignore[attr-defined]
        except (TransientUploadError, DestinationFaultError) as exc:
            # Not counted as a request (the PACS never heard it): asked again in 30 s, not every loop.
            state.commitment_retry_at([a[0] for a in ask], now - dcfg.commitment_timeout_s + 30.0)
            self.log.warning("commitment_request_failed", reason=str(exc), items=len(ask))
            return 0
        state.commitment_requested([a[0] for a in ask], uid, now)
        self.log.info("commitment_requested", items=len(ask))
        return len(ask)

    def _on_commitment_report(self, transaction_uid: str, committed: list[str], failed: dict[str, str]) -> None:
        """The PACS's N-EVENT-REPORT (a pynetdicom thread): committed items are delivered (``reconcile``
        moves their files to sent/), failed ones are queued to be sent again; only for the instances of
        a transaction this truck issued."""
        result = self.spool.state.commitment_result(transaction_uid, committed, failed, time.time())
        if result["ignored"]:
            self.log.warning("commitment_report_ignored", instances=len(result["ignored"]),
                             reason="not instances of a storage commitment transaction this truck is waiting for")
        for item_id in result["delivered"]:
            self.log.info("file_delivered", file_id=item_id, outcome=Outcome.DONE, commitment="confirmed")
        for item_id in result["requeued"]:
            row = self.spool.state.item(item_id)
            self.log.warning("file_requeued", file_id=item_id, outcome=Outcome.RESEND,
                             reason=row.last_error if row else None)
        self._last_sync = 0.0  # the uploader thread moves the files now
        self.wake.set()

    def wait_for_commitments(self, timeout_s: float) -> int:
        """``run --once``: request what is due and wait (at most ``timeout_s``) for the reports;
        returns how many items still await commitment."""
        deadline = time.monotonic() + timeout_s
        while not self.stop.is_set():
            if time.monotonic() - self._last_commit_request >= 1.0:
                self.request_commitments()  # the first batch, and any beyond one request's 500
            left = self.spool.state.count_state("committing")
            if not left or time.monotonic() >= deadline:
                return left
            self.wake.wait(min(0.2, max(0.0, deadline - time.monotonic())))
            self.wake.clear()
        return 0

    def _transient(self, item_id: str, attempts: int, reason: str, retry_after: float | None, now: float) -> None:
        up = self.uplink
        if up.last_failed_id != item_id:
            up.consecutive_failures += 1
        up.last_failed_id = item_id
        delay = backoff_delay(attempts, self.cfg.initial_backoff_s, self.cfg.max_backoff_s, self.rng)
        if retry_after is not None:
            delay = min(max(delay, retry_after), self.cfg.max_backoff_s)
        self.spool.state.defer(item_id, now + delay, reason)
        self.spool.state.put(state_key(KeyPrefix.LAST_ERROR, self.destination.kind), reason)
        if up.down or up.consecutive_failures >= 2:
            # Different items failing in a row: the link is down, the whole queue waits (one timer,
            # growing with every failed probe), and nothing is logged per retry.
            up.down_attempts += 1
            hold = backoff_delay(up.down_attempts, self.cfg.initial_backoff_s, self.cfg.max_backoff_s, self.rng)
            if retry_after is not None:
                hold = min(max(hold, retry_after), self.cfg.max_backoff_s)
            up.hold_until = now + hold
            if not up.down:
                up.down, up.down_since = True, now
                self.spool.state.set_uplink(Uplink.DOWN, reason, since=now)
                self.log.warning("uplink_down", reason=reason, delay_s=round(hold, 1))
        else:
            self.log.info("upload_deferred", file_id=item_id, reason=reason, delay_s=round(delay, 1))

    # ------------------------------------------------------------- loops
    def drain_once(self) -> int:
        """Attempt every queued item once, backoff or not (``run --once`` is an operator's explicit
        request), in priority order; returns how many remain queued."""
        self.reconcile()
        tried: set[str] = set()
        while not self.stop.is_set():
            pending = [r for r in self.spool.state.due(float("inf"), limit=10_000) if r.id not in tried]
            if not pending:
                break
            tried.add(pending[0].id)
            self.step(time.time(), row=pending[0])
        committing = 0
        if self.commits(self.destination):
            committing = self.wait_for_commitments(min(RUN_ONCE_COMMIT_WAIT_S, self.destination.cfg.commitment_timeout_s))  # type: ignore[attr-defined]
        self.reconcile()
        return len(self.spool.state.due(float("inf"), limit=1_000_000)) + committing

    def run(self) -> None:
        self.spool.state.clamp_next_attempts(time.time(), self.cfg.max_backoff_s)
        self.spool.state.commitment_retry_at(self.spool.state.committing_ids(), 0.0)  # a report missed while down
        self.reconcile()
        self.prune_sent()
        last_prune = time.monotonic()
        while not self.stop.is_set():
            self.heartbeat = time.monotonic()
            try:
                self._close_retired()
                if time.monotonic() - self._last_sync > RECONCILE_S:
                    self.reconcile()
                if self.commits(self.destination) and time.monotonic() - self._last_commit_request > COMMIT_ASK_S:
                    self.request_commitments()
                if time.monotonic() - last_prune > PRUNE_SENT_S:
                    self.prune_sent()
                    last_prune = time.monotonic()
                worked = self.step()
            except Exception as exc:  # noqa: BLE001 - keep the thread alive, say why
                self.log.error("uploader_error", error_class=type(exc).__name__, exc_info=exc)
                worked = False
                self.stop.wait(1.0)
            if worked:
                continue
            nxt = self.spool.state.next_due_time()
            now = time.time()
            wait = IDLE_WAIT_S if nxt is None else max(0.05, min(IDLE_WAIT_S, nxt - now))
            if self.uplink.hold_until > now:
                wait = min(IDLE_WAIT_S, max(0.05, self.uplink.hold_until - now))
            self.wake.wait(wait)
            self.wake.clear()


def _where(destination: Destination) -> str:
    """The destination's kind and host for the log (make_destination sets it; a test's stand-in may not)."""
    return str(getattr(destination, "where", destination.kind))
