"""Wires the spool, the stage worker, the watcher, the uploader thread, signals and systemd."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from .anonymize_stage import Anonymizer, AnonymizeStage
from .config import Config
from .destinations import make_destination
from .ingest import InboxScanner, Watcher
from .logs import get_logger
from .route_stage import RouteStage
from .sdnotify import notify
from .spool import ANONYMIZED, TRIAGED, Spool
from .stage import Runner
from .triage_stage import TriageStage
from .uploader import Uploader
from . import __version__

HEARTBEAT_STALE_S = 60.0


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        # A crash loop in triage must not block the upload: such a file skips triage instead.
        self.spool = Spool(cfg.spool_dir, cfg.inbox, max_recoveries=cfg.max_recoveries,
                           skip_on_crash_loop={ANONYMIZED: TRIAGED} if cfg.triage.enabled else None)
        self.spool.ensure_layout()
        self.anonymizer = Anonymizer(cfg)
        stages = [AnonymizeStage(self.spool, self.anonymizer)]
        if cfg.triage.enabled:
            stages += [TriageStage(self.spool, cfg, uid=self.anonymizer.ctx.uid), RouteStage(self.spool, input_queue=TRIAGED)]
        else:
            stages += [RouteStage(self.spool, input_queue=ANONYMIZED)]
        self.runners = [Runner(s, stop=self.stop_event) for s in stages]
        self.scanner = InboxScanner(self.spool, cfg.watch.stable_seconds)
        self.watcher = Watcher(self.spool.inbox, cfg.watch.mode, self.wake)
        self.uploader = Uploader(self.spool, make_destination(cfg.destination, cfg.upload.bandwidth_limit_bps),
                                 cfg.upload, stop=self.stop_event)
        self.worker_heartbeat = time.monotonic()
        self.threads: list[threading.Thread] = []
        self.log = get_logger()

    # ------------------------------------------------------------ pieces
    def recover(self) -> dict[str, int]:
        stats = self.spool.recover()
        self.log.info("spool_recovered", counts=stats)
        return stats

    def process_pipeline(self, batch: int = 4) -> int:
        """Run every stage over what is waiting now, a few items per stage in turn, so the first
        files reach the outbox (and a retake warning the technician) without waiting for the batch."""
        handled = 0
        while not self.stop_event.is_set():
            n = 0
            for runner in self.runners:
                n += runner.run_once(limit=batch)
            if n == 0:
                break
            handled += n
            self.uploader.wake.set()
        return handled

    def _worker(self) -> None:
        last_rescan = 0.0
        stable = self.cfg.watch.stable_seconds
        pending = 0
        while not self.stop_event.is_set():
            self.worker_heartbeat = time.monotonic()
            try:
                now = time.monotonic()
                if self.wake.is_set() or pending or now - last_rescan >= self.cfg.watch.rescan_seconds:
                    self.wake.clear()
                    pending = self.scanner.scan().pending
                    last_rescan = now
                self.process_pipeline()
            except Exception as exc:  # noqa: BLE001 - the worker must survive anything a file does
                self.log.error("worker_error", error_class=type(exc).__name__, exc_info=exc)
                self.stop_event.wait(1.0)
            timeout = max(0.2, min(stable / 2 if pending else self.cfg.watch.rescan_seconds, 5.0))
            self.wake.wait(timeout)

    def healthy(self) -> bool:
        now = time.monotonic()
        alive = all(t.is_alive() for t in self.threads)
        fresh = now - self.worker_heartbeat < HEARTBEAT_STALE_S and now - self.uploader.heartbeat < HEARTBEAT_STALE_S
        return alive and fresh

    def status_line(self) -> str:
        c = self.spool.counts()
        up = "down" if self.uploader.uplink.down else "up"
        return (f"inbox={c['incoming']} anonymized={c['anonymized']} triaged={c['triaged']} outbox={c['outbox']} "
                f"sent={c['sent']} quarantine={c['quarantine']} uplink={up}")

    # ------------------------------------------------------------ modes
    def start(self) -> None:
        self.recover()
        self.watcher.start()
        self.threads = [threading.Thread(target=self._worker, name="pipeline", daemon=True),
                        threading.Thread(target=self.uploader.run, name="uploader", daemon=True)]
        for t in self.threads:
            t.start()
        self.wake.set()
        self.log.info("daemon_started", version=__version__, station_name=self.cfg.station_name,
                      destination=self.cfg.destination.kind, mode=self.cfg.watch.mode)
        notify("READY=1\nSTATUS=" + self.status_line())

    def shutdown(self) -> None:
        notify("STOPPING=1")
        self.stop_event.set()
        self.wake.set()
        self.uploader.wake.set()
        for t in self.threads:
            t.join(timeout=30)
        self.watcher.stop()
        self.uploader.destination.close()
        self.log.info("daemon_stopped")

    def run_forever(self) -> int:
        def on_signal(signum: int, frame: Any) -> None:
            self.log.info("signal_received", signal=signal.Signals(signum).name)
            self.stop_event.set()
            self.wake.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        try:
            while not self.stop_event.wait(1.0):
                self.watcher.check()
                if self.healthy():
                    notify("WATCHDOG=1\nSTATUS=" + self.status_line())
                else:
                    self.log.error("worker_stalled", workers=[t.name for t in self.threads if t.is_alive()])
        finally:
            self.shutdown()
        return 0

    def run_once(self, progress: Any = None) -> int:
        """Everything now in the inbox through every stage and the outbox; returns items still waiting."""
        self.recover()
        while not self.stop_event.is_set():
            scan = self.scanner.scan()
            self.process_pipeline()
            if progress:
                progress(self)
            if scan.pending == 0 and not scan.adopted:
                break
            time.sleep(min(0.5, max(0.05, self.cfg.watch.stable_seconds / 4)))
        self.process_pipeline()
        waiting = self.uploader.drain_once()
        waiting += sum(r.pending() for r in self.runners)
        if progress:
            progress(self)
        self.uploader.destination.close()
        return waiting
