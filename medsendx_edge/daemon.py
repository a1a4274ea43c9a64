"""Wires the spool, the stage worker, the watcher, the uploader thread, signals and systemd.

Main thread: recovery, then ``READY=1``; every second it checks the watcher, a pending reload (SIGHUP,
or the YAML file changing with ``config_watch``), ships fleet features when due, and sends
``WATCHDOG=1`` only while every worker thread has checked in within ``heartbeat_stale_s``.  The
pipeline thread checks the disk guard before each inbox scan; the uploader thread sends; the triage
stage runs in a pool thread beside anonymize and route; the C-STORE listener has its own threads.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

from medsendx_edge import __version__, pipeline
from medsendx_edge.anonymize.stage import Anonymizer, AnonymizeStage
from medsendx_edge.config import Config, load_config, path_problems, secret_problems
from medsendx_edge.config_reference import needing_restart
from medsendx_edge.upload.destinations import make_destination
from medsendx_edge.errors import ConfigError
from medsendx_edge.ingest import InboxScanner, Watcher
from medsendx_edge.logs import configure_logging, get_logger
from medsendx_edge.upload.route import RouteStage
from medsendx_edge.sdnotify import notify
from medsendx_edge.spool import TRIAGED, Spool
from medsendx_edge.stage import Runner
from medsendx_edge.triage.exam import ExamBook
from medsendx_edge.triage.stage import TriageStage, skipped_sidecar
from medsendx_edge.upload.uploader import Uploader
from medsendx_edge.vocabulary import StateKey

#: Settings that only a restart applies (the others apply live on reload).


HEARTBEAT_STALE_S = 60.0  # a worker thread silent this long stops the systemd watchdog pings
MAX_IDLE_WAIT_S = 5.0     # the pipeline thread's longest sleep between inbox looks (events cut it short)


def check_secrets(cfg: Config, log: Any) -> None:
    """Refuse unusable secret files (ConfigError); warn once about loose permissions."""
    errors, warnings = secret_problems(cfg)
    for warning in warnings:
        log.warning("secret_file_permissions", key=warning.split(":", 1)[0], reason=warning)
    if errors:
        raise ConfigError("; ".join(errors))


def check_paths(cfg: Config, log: Any) -> None:
    """At start only (a reload never fails on a share that is away for a minute): refuse an inbox that
    does not exist or is not mounted; warn about a destination share that is not mounted."""
    errors, warnings = path_problems(cfg)
    for warning in warnings:
        log.warning("destination_not_mounted", key=warning.split(":", 1)[0], reason=warning)
    if errors:
        raise ConfigError("; ".join(errors))


RUNTIME_FILE = "daemon.json"


def wait_for_inbox(cfg: Config, poll_s: float = 5.0) -> bool:
    """The unit may start before the inbox share is mounted (a truck boots before its NAS): wait for it
    instead of failing (a failing start loop ends in systemd's start limit), telling systemd why (STATUS),
    keeping the start timeout and the watchdog fed, and ending promptly on SIGTERM.  Returns False when
    stopped while waiting."""
    errors, _warnings = path_problems(cfg)
    if not errors:
        return True
    stop = threading.Event()
    old = {sig: signal.signal(sig, lambda _s, _f: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    log = get_logger()
    log.warning("waiting_for_inbox", reason="; ".join(errors))
    try:
        while errors:
            notify(f"STATUS=waiting for the inbox: {errors[0][:200]}\nEXTEND_TIMEOUT_USEC={int(3 * poll_s * 1e6)}"
                   "\nWATCHDOG=1")
            if stop.wait(poll_s):
                log.info("signal_received", reason="stopped while waiting for the inbox")
                return False
            errors, _warnings = path_problems(cfg)
        log.info("inbox_available", path=str(cfg.inbox))
        return True
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def runtime_dir() -> Path | None:
    """The daemon's runtime directory: systemd's $RUNTIME_DIRECTORY, else $MEDSENDX_EDGE_RUNTIME_DIR."""
    value = os.environ.get("MEDSENDX_EDGE_RUNTIME_DIR") or os.environ.get("RUNTIME_DIRECTORY")
    return Path(value.split(":")[0]) if value else None


class Daemon:
    def __init__(self, cfg: Config, config_path: str | os.PathLike[str] | None = None) -> None:
        check_secrets(cfg, get_logger())
        check_paths(cfg, get_logger())
        self.cfg = cfg
        self.config_path = Path(config_path) if config_path else None
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.reload_requested = threading.Event()
        self.heartbeat_stale_s = HEARTBEAT_STALE_S
        # The stage graph, declared once (pipeline.py): the runners, and what recovery does with a file
        # that keeps crashing a stage (triage is skipped, never blocks an upload; elsewhere quarantine).
        specs = pipeline.graph(cfg.triage.enabled)
        self.spool = Spool(cfg.spool_dir, cfg.inbox, max_recoveries=cfg.max_recoveries,
                           skip_on_crash_loop=pipeline.skip_map(specs), on_skip=skipped_sidecar,
                           stage_of_queue=pipeline.stage_of_queue(specs))
        self.spool.ensure_layout()
        self.anonymize_stage = AnonymizeStage(self.spool, Anonymizer(cfg))
        self.triage_stage = TriageStage(self.spool, cfg, uid=self.anonymize_stage.anonymizer.ctx.uid)
        self.scanner = InboxScanner(self.spool, cfg.watch.stable_seconds,
                                    incomplete_grace_s=cfg.watch.incomplete_grace_s,
                                    ignored_report_s=cfg.watch.ignored_report_s)
        self.watcher = Watcher(self.spool.inbox, cfg.watch.mode, self.wake)
        self.uploader = Uploader(self.spool, make_destination(cfg.destination, cfg.upload.bandwidth_limit_bps),
                                 cfg.upload, stop=self.stop_event)
        self._build_runners()
        self._triage_pool: Any = None
        self.fleet_spool: Spool | None = None
        self.fleet_uploader: Uploader | None = None
        if cfg.fleet.enabled:
            self.fleet_spool = Spool(cfg.spool_dir / "fleet", suffix=f".{cfg.fleet.format}")
            self.fleet_spool.ensure_layout()
            self.fleet_uploader = Uploader(self.fleet_spool, make_destination(cfg.fleet.destination),
                                           cfg.upload, stop=self.stop_event)
        self._last_ship = time.monotonic()
        self.listener = None
        self.metrics_server: Any = None
        self.console: Any = None
        if cfg.dicom_listener.enabled:
            from medsendx_edge.dicom_listener import StoreSCP

            self.listener = StoreSCP(self.spool, cfg.dicom_listener,
                                     may_accept=lambda: not self.disk_low, on_stored=self.wake.set)
        self.worker_heartbeat = time.monotonic()
        self.threads: list[threading.Thread] = []
        self.disk_low = False
        self._config_mtime = self._mtime()
        self.log = get_logger()

    def _build_runners(self) -> None:
        """The runners of the declared graph (the uploader is its own thread); the spool's crash-loop map
        follows it (a reload that turns triage off or on changes both)."""
        specs = pipeline.graph(self.cfg.triage.enabled)
        problems = pipeline.problems(specs)
        if problems:  # a declaration error, never a user's: caught by tests/test_pipeline.py
            raise RuntimeError("; ".join(problems))
        self.spool.skip_on_crash_loop = pipeline.skip_map(specs)
        self.spool.stage_of_queue = pipeline.stage_of_queue(specs)
        stages: list[Any] = []
        for spec in specs:
            if spec.name == "anonymize":
                stages.append(self.anonymize_stage)
            elif spec.name == "triage":
                stages.append(self.triage_stage)
            elif spec.name == "route":
                stages.append(RouteStage(self.spool, input_queue=spec.input,
                                         exam_priority=self.triage_stage.exam_priority if spec.input == TRIAGED
                                         else None, compression=self.cfg.destination.compression))
        self.runners = [Runner(s, stop=self.stop_event) for s in stages]

    # ------------------------------------------------------------ pieces
    def _record_runtime(self) -> None:
        """Where this daemon's spool is, in its runtime directory (systemd's RuntimeDirectory, or
        MEDSENDX_EDGE_RUNTIME_DIR): ``status`` reports from it when the config file has been broken since
        (monitoring does not go blind exactly when it matters).  Paths only, no patient data."""
        from medsendx_edge.spool import write_json_atomic

        where = runtime_dir()
        if where is None:
            return
        try:
            where.mkdir(parents=True, exist_ok=True)
            write_json_atomic(where / RUNTIME_FILE, {
                "spool_dir": str(self.cfg.spool_dir), "inbox": str(self.cfg.inbox), "pid": os.getpid(),
                "config": str(self.config_path) if self.config_path else None, "started": time.time()})
        except OSError as exc:   # never a reason not to run
            self.log.warning("runtime_record_failed", error_class=type(exc).__name__)

    @property
    def exams(self) -> ExamBook:
        return self.triage_stage.exams

    @property
    def anonymizer(self) -> Anonymizer:
        return self.anonymize_stage.anonymizer

    def recover(self) -> dict[str, int]:
        stats = self.spool.recover()
        # facts of items that never reached the upload queue (quarantined on the way): kept a month
        self.spool.state.forget_facts(time.time() - 30 * 86400)
        self.log.info("spool_recovered", counts=stats)
        return stats

    def process_pipeline(self, batch: int = 4) -> int:
        """Run every stage over what is waiting now, a few items per stage in turn, so the first
        files reach the outbox (and a retake warning the technician) without waiting for the batch.

        Triage (numpy and zlib, which release the GIL) runs in a second thread beside anonymize and
        route: one file is triaged while the next is anonymized and a third uploads.  Each runner
        stays in one thread; the spool's claims keep any two from taking the same file."""
        from concurrent.futures import ThreadPoolExecutor

        if self._triage_pool is None:
            self._triage_pool = ThreadPoolExecutor(1, thread_name_prefix="triage")
        handled = 0
        while not self.stop_event.is_set():
            self.worker_heartbeat = time.monotonic()
            n = 0
            side = [r for r in self.runners if r.stage is self.triage_stage]
            future = self._triage_pool.submit(side[0].run_once, batch) if side else None
            for runner in self.runners:
                if runner not in side:
                    n += runner.run_once(limit=batch)
            self.uploader.wake.set()  # routed items go now, not after the triage batch
            if future is not None:
                n += future.result()
            if n == 0:
                break
            handled += n
            self.uploader.wake.set()
        return handled

    def _stop_triage_pool(self) -> None:
        if self._triage_pool is not None:
            self._triage_pool.shutdown(wait=True)
            self._triage_pool = None

    def free_mb(self) -> float:
        return shutil.disk_usage(self.spool.root).free / 1e6

    def check_disk(self) -> bool:
        """The disk guard: True while there is room to take files from the inbox."""
        free = self.free_mb()
        if free < self.cfg.min_free_mb:
            if not self.disk_low:
                removed = self.uploader.prune_sent(now=float("inf"))  # delivered copies go first
                free = self.free_mb()
                if free >= self.cfg.min_free_mb:
                    self.log.info("sent_pruned_for_space", removed=removed, free_mb=round(free, 1))
                    return True
                self.disk_low = True
                self.log.warning("disk_low", free_mb=round(free, 1), min_free_mb=self.cfg.min_free_mb,
                                 removed=removed)
            return False
        if self.disk_low:
            self.disk_low = False
            self.log.info("disk_ok", free_mb=round(free, 1), min_free_mb=self.cfg.min_free_mb)
        return True

    def scan_inbox(self) -> int:
        """Adopt stable inbox files unless the disk is low (they stay safe on the share)."""
        return self.scanner.scan(may_adopt=self.check_disk()).pending

    def _worker(self) -> None:
        last_rescan = 0.0
        pending = 0
        while not self.stop_event.is_set():
            self.worker_heartbeat = time.monotonic()
            cfg = self.cfg
            try:
                now = time.monotonic()
                if self.wake.is_set() or pending or now - last_rescan >= cfg.watch.rescan_seconds:
                    self.wake.clear()
                    pending = self.scan_inbox()
                    last_rescan = now
                    if self.listener is not None:
                        self.listener.sweep_scratch()
                self.process_pipeline()
            except Exception as exc:  # noqa: BLE001 - the worker must survive anything a file does
                self.log.error("worker_error", error_class=type(exc).__name__, exc_info=exc)
                self.stop_event.wait(1.0)
            stable = cfg.watch.stable_seconds
            timeout = max(0.2, min(stable / 2 if pending else cfg.watch.rescan_seconds, MAX_IDLE_WAIT_S))
            self.wake.wait(timeout)

    def ship_features(self) -> int:
        """Queue the feature rows recorded since the last shipment as one file for the fleet; returns rows."""
        from medsendx_edge.triage.features import write_rows
        from medsendx_edge.spool import OUTBOX, new_id

        if self.fleet_spool is None or self.fleet_uploader is None:
            return 0
        state = self.spool.state
        since = float(state.get(StateKey.FLEET_LAST_SHIPPED) or -1)
        rows = self.triage_stage.features.rows(since=since)
        if not rows:
            return 0
        item_id = new_id()
        # Through the spool (temp name, fsync, rename, fsync folder), the only writer of queue files.
        import tempfile

        with tempfile.TemporaryDirectory(prefix=".staging-", dir=self.fleet_spool.root) as tmp:
            staged = write_rows(rows, Path(tmp) / f"rows{self.fleet_spool.suffix}")
            self.fleet_spool.publish_file(OUTBOX, item_id, staged)
        state.put(StateKey.FLEET_LAST_SHIPPED, repr(max(float(r["recorded"]) for r in rows)))
        self.log.info("features_queued", file_id=item_id, count=len(rows))
        self.fleet_uploader.wake.set()
        return len(rows)

    def healthy(self) -> bool:
        now = time.monotonic()
        alive = bool(self.threads) and all(t.is_alive() for t in self.threads)
        beats = [self.worker_heartbeat, self.uploader.heartbeat]
        if self.fleet_uploader is not None:
            beats.append(self.fleet_uploader.heartbeat)
        return alive and all(now - b < self.heartbeat_stale_s for b in beats)

    def status_line(self) -> str:
        c = self.spool.counts()
        up = "down" if self.uploader.uplink.down else "up"
        disk = " disk=LOW" if self.disk_low else ""
        return (f"incoming={c['incoming']} anonymized={c['anonymized']} triaged={c['triaged']} outbox={c['outbox']} "
                f"sent={c['sent']} quarantine={c['quarantine']} uplink={up}{disk}")

    # ------------------------------------------------------------ reload
    def _mtime(self) -> float | None:
        try:
            return self.config_path.stat().st_mtime if self.config_path else None
        except OSError:
            return None

    def reload(self) -> bool:
        """Load and validate the config file; swap only if it is valid. Returns True if swapped."""
        notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            if self.config_path is None:
                raise ConfigError("<none>: the daemon was started without a config file")
            new = load_config(self.config_path)
            check_secrets(new, self.log)
            new_destination = make_destination(new.destination, new.upload.bandwidth_limit_bps)
            new_fleet_destination = make_destination(new.fleet.destination) if self.fleet_uploader else None
            new_anonymizer = Anonymizer(new)
        except Exception as exc:  # noqa: BLE001 - a reload can never stop the daemon: it keeps the old config
            msg = str(exc) if isinstance(exc, ConfigError) else f"the new config could not be applied ({type(exc).__name__})"
            self.log.error("config_rejected", key=msg.split(":", 1)[0], reason=msg)
            notify("READY=1\nSTATUS=config rejected, running on the previous one: " + msg[:200])
            return False
        restart = needing_restart(self.cfg, new)
        old = self.cfg
        self.cfg = new
        configure_logging(new.log.level, new.log.format)
        self.log = get_logger()
        self.uploader.reconfigure(new_destination, new.upload)
        if self.fleet_uploader is not None and new_fleet_destination is not None:
            self.fleet_uploader.reconfigure(new_fleet_destination, new.upload)
        self.anonymize_stage.anonymizer = new_anonymizer
        self.triage_stage.cfg = new
        self.triage_stage.uid = new_anonymizer.ctx.uid
        self.scanner.stable_seconds = new.watch.stable_seconds
        self.scanner.incomplete_grace_s = new.watch.incomplete_grace_s
        self.scanner.ignored_report_s = new.watch.ignored_report_s
        if new.triage.enabled != old.triage.enabled:
            self._build_runners()
        for runner in self.runners:
            if isinstance(runner.stage, RouteStage):
                runner.stage.compression = new.destination.compression
        if new.watch.mode != old.watch.mode:
            self.watcher.stop()
            self.watcher = Watcher(self.spool.inbox, new.watch.mode, self.wake)
            self.watcher.start()
        self.log.info("config_reloaded", config=str(self.config_path), key=",".join(restart) or None)
        if restart:
            self.log.warning("restart_required", key=",".join(restart))
        notify("READY=1\nSTATUS=" + self.status_line())
        self.uploader.wake.set()
        self.wake.set()
        return True

    # ------------------------------------------------------------ modes
    def start(self) -> None:
        self.recover()
        self._record_runtime()
        self.watcher.start()
        if self.listener is not None:
            self.listener.start()
        if self.cfg.metrics.enabled:
            from medsendx_edge import metrics

            self.metrics_server = metrics.serve(self, self.cfg.metrics.bind, self.cfg.metrics.port)
            self.log.info("metrics_listening", key=f"{self.cfg.metrics.bind}:{self.metrics_server.server_port}")
        if self.cfg.console.enabled:
            import secrets

            from medsendx_edge.anonymize.linkage import ensure_secret_file
            from medsendx_edge.console import Console

            ccfg = self.cfg.console
            token = ensure_secret_file(ccfg.token_file, lambda: secrets.token_urlsafe(24).encode(),
                                       "console.token_file").decode()
            self.console = Console(self, ccfg.bind, ccfg.port, token)
            self.console.start()
            self.log.info("console_listening", key=f"{ccfg.bind}:{self.console.port}")
        self.threads = [threading.Thread(target=self._worker, name="pipeline", daemon=True),
                        threading.Thread(target=self.uploader.run, name="uploader", daemon=True)]
        if self.fleet_uploader is not None:
            self.threads.append(threading.Thread(target=self.fleet_uploader.run, name="fleet-uploader", daemon=True))
        for t in self.threads:
            t.start()
        self.wake.set()
        self.log.info("daemon_started", version=__version__, station_name=self.cfg.station_name,
                      destination=self.cfg.destination.kind, mode=self.cfg.watch.mode, pid=os.getpid())
        notify("READY=1\nSTATUS=" + self.status_line())

    def tick(self) -> bool:
        """One pass of the main loop; True when the watchdog was pinged."""
        if self.reload_requested.is_set():
            self.reload_requested.clear()
            self.reload()
        if self.cfg.config_watch:
            mtime = self._mtime()
            if mtime != self._config_mtime:
                self._config_mtime = mtime
                self.reload()
        self.watcher.check()
        if self.fleet_spool is not None and time.monotonic() - self._last_ship >= self.cfg.fleet.interval_s:
            self._last_ship = time.monotonic()
            try:
                self.ship_features()
            except OSError as exc:
                self.log.warning("features_not_queued", error_class=type(exc).__name__, reason=exc.strerror)
        if self.healthy():
            notify("WATCHDOG=1\nSTATUS=" + self.status_line())
            return True
        stalled = [t.name for t in self.threads if not t.is_alive()]
        now = time.monotonic()
        if now - self.worker_heartbeat >= self.heartbeat_stale_s:
            stalled.append("pipeline")
        if now - self.uploader.heartbeat >= self.heartbeat_stale_s:
            stalled.append("uploader")
        self.log.error("worker_stalled", workers=sorted(set(stalled)))
        return False

    def shutdown(self) -> None:
        notify("STOPPING=1")
        if self.listener is not None:
            self.listener.stop()  # no new images: the modality keeps them until we are back
        self.stop_event.set()
        self.wake.set()
        self.uploader.wake.set()
        # A send in flight on a slow link is cut now (it is retried after the restart): SIGTERM is prompt.
        self.uploader.destination.abort()
        if self.fleet_uploader is not None:
            self.fleet_uploader.destination.abort()
        for t in self.threads:
            t.join(timeout=30)
        self._stop_triage_pool()
        self.watcher.stop()
        self.uploader.destination.close()
        if self.fleet_uploader is not None:
            self.fleet_uploader.destination.close()
        if self.console is not None:
            self.console.stop()
            self.console = None
        if self.metrics_server is not None:
            from medsendx_edge import metrics

            metrics.stop(self.metrics_server)
            self.metrics_server = None
        self.log.info("daemon_stopped")

    def run_forever(self) -> int:
        def on_stop(signum: int, frame: Any) -> None:
            self.log.info("signal_received", signal=signal.Signals(signum).name)
            self.stop_event.set()
            self.wake.set()

        def on_hup(signum: int, frame: Any) -> None:
            self.reload_requested.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        self.start()
        interval = 1.0
        watchdog_usec = os.environ.get("WATCHDOG_USEC")
        if watchdog_usec and watchdog_usec.isdigit():
            interval = min(interval, int(watchdog_usec) / 2e6)
        try:
            while not self.stop_event.wait(interval):
                self.tick()
        finally:
            self.shutdown()
        return 0

    def _upload_alongside(self, pipeline_done: threading.Event) -> None:
        """``run --once``'s uploader: sends each item as soon as the route stage queues it, while the
        pipeline works on the next files (the link never waits for the CPU, nor the CPU for the link);
        every item once, whatever its backoff, as ``drain_once`` does."""
        tried: set[str] = set()
        state = self.spool.state
        try:
            while not self.stop_event.is_set():
                rows = [r for r in state.due(float("inf"), limit=64) if r.id not in tried]
                if not rows:
                    if pipeline_done.is_set():
                        return
                    self.uploader.wake.wait(0.05)
                    self.uploader.wake.clear()
                    continue
                tried.add(rows[0].id)
                self.uploader.step(time.time(), row=rows[0])
        except Exception as exc:  # noqa: BLE001 - drain_once after the pipeline picks up what is left
            self.log.error("uploader_error", error_class=type(exc).__name__, exc_info=exc)
        finally:
            self.uploader.destination.close()  # this thread's keep-alive connection

    def run_once(self, progress: Any = None) -> int:
        """Everything now in the inbox through every stage and the outbox; returns items still waiting.

        The upload runs in its own thread beside the pipeline, as in the daemon."""
        self.recover()
        waiting_incomplete = 0
        pipeline_done = threading.Event()
        uploading = threading.Thread(target=self._upload_alongside, args=(pipeline_done,), name="uploader",
                                     daemon=True)
        uploading.start()
        try:
            while not self.stop_event.is_set():
                self.worker_heartbeat = time.monotonic()
                may_adopt = self.check_disk()
                scan = self.scanner.scan(may_adopt=may_adopt)
                self.process_pipeline()
                if progress:
                    progress(self)
                if not may_adopt or (scan.pending - scan.incomplete == 0 and not scan.adopted):
                    waiting_incomplete = scan.incomplete  # a writer may come back: counted, not waited for
                    break
                time.sleep(min(0.5, max(0.05, self.cfg.watch.stable_seconds / 4)))
            self.process_pipeline()
        finally:
            pipeline_done.set()
            self.uploader.wake.set()
            uploading.join()
        self._stop_triage_pool()
        waiting = self.uploader.drain_once()
        waiting += sum(r.pending() for r in self.runners)
        if self.fleet_uploader is not None:
            self.ship_features()
            waiting += self.fleet_uploader.drain_once()
        if self.disk_low:
            waiting += self.scanner.scan(may_adopt=False).pending
        else:
            waiting += waiting_incomplete
        if progress:
            progress(self)
        self.uploader.destination.close()
        return waiting
