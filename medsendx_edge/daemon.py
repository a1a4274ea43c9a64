"""Wires the spool, the stage worker, the watcher, the uploader thread, signals and systemd.  The jobs it
hosts live in their own modules: the checks before a start and the runtime record (startup.py), the disk
guard (diskguard.py), feature shipping (fleet/ship.py), the stage graph (pipeline.py); each component takes
a reload through its ``reconfigure``.

Main thread: recovery, then ``READY=1``; every second it checks the watcher, a pending reload (SIGHUP,
or the YAML file changing with ``config_watch``), ships fleet features when due, and sends
``WATCHDOG=1`` only while every worker thread has checked in within ``heartbeat_stale_s``.  The
pipeline thread checks the disk guard before each inbox scan; the uploader thread sends; the triage
stage runs in a pool thread beside anonymize and route; the C-STORE listener has its own threads.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medsendx_edge import __version__, deaths, pipeline
from medsendx_edge.anonymize.stage import Anonymizer, AnonymizeStage
from medsendx_edge.config import Config, load_config
from medsendx_edge.config import _check as validate
from medsendx_edge.config_reference import keeping, needing_restart
from medsendx_edge.upload.destinations import make_destination
from medsendx_edge.errors import ConfigError
from medsendx_edge.health import status_data
from medsendx_edge.ingest import InboxScanner, Watcher
from medsendx_edge.logs import configure_logging, get_logger
from medsendx_edge.upload.route import RouteStage
from medsendx_edge.sdnotify import notify
from medsendx_edge.spool import ANONYMIZED, INCOMING, TRIAGED, Spool
from medsendx_edge.stage import Runner
from medsendx_edge.triage.exam import ExamBook
from medsendx_edge.triage.pictures import PICTURES, PictureDesk
from medsendx_edge.triage.stage import TriageStage, skipped_sidecar
from medsendx_edge.upload.uploader import Uploader
from medsendx_edge.diskguard import DiskGuard
from medsendx_edge.fleet.ship import FeatureShipper
from medsendx_edge.startup import (Signals, check_paths, check_secrets, one_blas_thread, record_runtime, release_gc,
                                   release_gc_if_overdue)
from medsendx_edge.vocabulary import StateKey

HEARTBEAT_STALE_S = 60.0  # a worker thread silent this long stops the systemd watchdog pings
MAX_IDLE_WAIT_S = 5.0     # the pipeline thread's longest sleep between inbox looks (events cut it short)
REPORT_SWEEP_S = 30.0     # quiet exams with a view missing get their SR this often (triage/stage.py: sweep_reports)


class _Wake(threading.Event):
    """The pipeline thread's wake-up (an inbox event, a C-STORE, a reload, a stop), which also ends the
    wait of a pipeline pass in progress (``also``), so a file landing in the inbox while the first files
    are triaged is adopted at once, not at the pass's next half-second look."""

    also: threading.Event | None = None

    def set(self) -> None:
        super().set()
        also = self.also
        if also is not None:
            also.set()


class Daemon:
    def __init__(self, cfg: Config, config_path: str | os.PathLike[str] | None = None) -> None:
        check_secrets(cfg, get_logger())
        check_paths(cfg, get_logger())
        one_blas_thread()
        self.cfg = cfg
        self.started_cfg = cfg   # what a restart would change: `status` says so until then
        self.config_path = Path(config_path) if config_path else None
        self.stop_event = threading.Event()
        self._wake = _Wake()
        self.wake: threading.Event = self._wake
        self._last_scan, self._scan_pending = 0.0, 0   # feed_inbox's: when it last looked, what was not stable
        self.reload_requested = threading.Event()
        self.heartbeat_stale_s = HEARTBEAT_STALE_S
        # The stage graph, declared once (pipeline.py): the runners, and what recovery does with a file
        # that keeps crashing a stage (triage is skipped, never blocks an upload; elsewhere quarantine).
        specs = pipeline.graph(cfg.triage.enabled)
        self.spool = Spool(cfg.spool_dir, cfg.inbox, max_recoveries=cfg.max_recoveries,
                           max_interruptions=cfg.max_interruptions, skip_on_crash_loop=pipeline.skip_map(specs),
                           on_skip=skipped_sidecar, stage_of_queue=pipeline.stage_of_queue(specs))
        self.spool.ensure_layout()
        self.anonymize_stage = AnonymizeStage(self.spool, Anonymizer(cfg))
        self.triage_stage = TriageStage(self.spool, cfg, uid=self.anonymize_stage.anonymizer.ctx.uid)
        # the pictures that can wait, drawn while the triage is idle (started with the daemon, or a run --once)
        self.pictures = PictureDesk(self.spool.place_picture, holding=self.spool.in_hand.holding)
        self.triage_stage.pictures = self.pictures
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
        self.shipper: FeatureShipper | None = None
        if cfg.fleet.enabled:
            self.fleet_spool = Spool(cfg.spool_dir / "fleet", suffix=f".{cfg.fleet.format}")
            self.fleet_spool.ensure_layout()
            self.fleet_uploader = Uploader(self.fleet_spool, make_destination(cfg.fleet.destination),
                                           cfg.upload, stop=self.stop_event)
            self.shipper = FeatureShipper(self.triage_stage.features, self.spool.state, self.fleet_spool,
                                          cfg.fleet, on_queued=self.fleet_uploader.wake)
        self.listener = None
        self.metrics_server: Any = None
        self.console: Any = None
        if cfg.dicom_listener.enabled:
            from medsendx_edge.dicom_listener import StoreSCP

            self.listener = StoreSCP(self.spool, cfg.dicom_listener,
                                     may_accept=lambda: not self.disk_low, on_stored=self.wake.set)
        self.worker_heartbeat = time.monotonic()
        self._last_report_sweep = 0.0   # the first pass sweeps: exams that went quiet while the daemon was down
        self.threads: list[threading.Thread] = []
        self.disk = DiskGuard(self.spool.root, lambda: self.uploader.prune_sent(now=float("inf")))
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
                                         else None, destination=self.cfg.destination))
        self.runners = [Runner(s, stop=self.stop_event) for s in stages]

    # ------------------------------------------------------------ pieces
    @property
    def exams(self) -> ExamBook:
        return self.triage_stage.exams

    def _caught_up(self) -> bool:
        """Nothing waits before the triage (the anonymize and triage queues; the disk has room): an exam's views
        still on their way are read before the sweep calls the exam quiet (after a long stop, a full disk).
        The inbox is not looked at: a file there that can never be taken in would hold the sweep for good."""
        if self.disk_low:
            return False
        return not any(self.spool.ready(q) for q in (INCOMING, ANONYMIZED))

    def sweep_reports(self, final: bool = False) -> int:
        """The SRs of exams that will not complete (the triage stage's sweep), when the triage runs."""
        if not any(r.stage is self.triage_stage for r in self.runners):
            return 0
        try:
            return self.triage_stage.sweep_reports(final=final)
        except Exception as exc:  # noqa: BLE001 - an SR that cannot be made now is made at the next sweep
            self.log.error("report_sweep_failed", error_class=type(exc).__name__, exc_info=exc)
            return 0

    def who(self, item_id: str) -> dict[str, str]:
        """What the truck's own screen may say of the woman an image is of, so the radiographer knows whom
        to call back: when it was taken (the modality's clock) and, only where the operator enabled
        ``console.show_accession``, the accession number.  Read from the encrypted linkage table; shown
        by the console only, never logged, never sent."""
        row = self.spool.state.item(item_id)
        uid = (row.sop_uid if row is not None else None) or self.spool.state.facts(item_id)[0]
        if not uid:
            return {}
        try:
            recs = self.anonymizer.linkage.lookup(uid)
        except Exception:  # noqa: BLE001 - a key that cannot decrypt: the alert goes out without it
            return {}
        if not recs:
            return {}
        out = {"taken": str(recs[0].get("original_time") or "")}
        if self.cfg.console.show_accession:
            out["accession"] = str(recs[0].get("original_accession") or "")
        return {k: v for k, v in out.items() if v}

    @property
    def anonymizer(self) -> Anonymizer:
        return self.anonymize_stage.anonymizer

    def recover(self) -> dict[str, int]:
        state_dir = self.spool.root / "state"
        died_of = deaths.previous_death(state_dir)
        if died_of:
            self.log.warning("previous_run_crashed", reason=died_of)
        fleet_state = (self.fleet_spool.root / "state",) if self.fleet_spool is not None else ()
        blamed = deaths.blamed(state_dir, also=fleet_state) if died_of else None
        stats = self.spool.recover(file_fault=died_of is not None, blamed=blamed)
        for key in blamed or ():
            queue, _, item_id = key.partition(":")
            if queue == PICTURES:   # the death came while the desk drew this image's picture: counted, not a loop
                self.triage_stage.picture_failed(item_id, f"the daemon died drawing it ({died_of})")
        if self.fleet_spool is not None:   # its uploads in flight back in its outbox (they were left claimed)
            fleet = self.fleet_spool.recover(file_fault=False)
            stats.update({f"fleet_{k}": v for k, v in fleet.items() if v})
            deaths.clear_notes(self.fleet_spool.root / "state")
        deaths.consume(state_dir)
        self.spool.state.put(StateKey.RESTART_PENDING, None)   # a start applies every key
        self._record_config()
        # facts of items that never reached the upload queue (quarantined on the way): kept a month
        self.spool.state.forget_facts(time.time() - 30 * 86400)
        if any(r.stage is self.triage_stage for r in self.runners):
            try:   # images quarantined while the last run's listener could not tell the exam book
                self.triage_stage.reconcile()
            except sqlite3.Error as exc:
                self.log.warning("exam_book_not_reconciled", error_class=type(exc).__name__)
        self.log.info("spool_recovered", counts=stats)
        return stats

    def process_pipeline(self, batch: int = 4, feed: Callable[[], object] | None = None) -> int:
        """Run every stage over what is waiting now, a few items per stage in turn, so the first
        files reach the outbox (and a retake warning the technician) without waiting for the batch.

        Triage (numpy and zlib, which release the GIL) runs in a second thread beside anonymize and
        route, each side going on as long as it has work: one file is triaged while the next is
        anonymized and a third uploads, with no meeting point between batches (a round that waited
        for the slower side left a core idle at the end of every round).  Each runner stays in one
        thread; the spool's claims keep any two from taking the same file.  ``feed``: called between
        batches, to adopt files that reached the inbox meanwhile (the daemon's :meth:`feed_inbox`)."""
        handled = 0
        while not self.stop_event.is_set():
            self.worker_heartbeat = time.monotonic()
            release_gc_if_overdue(self.log)   # (startup.hold_gc)
            runners = self.runners   # one snapshot a pass: a reload swaps the list, the next pass takes it
            side = next((r for r in runners if r.stage is self.triage_stage), None)
            if side is None:
                if feed is not None:
                    feed()
                n = sum(runner.run_once(limit=batch) for runner in runners)
                self.uploader.wake.set()
            else:
                n = self._overlapped(runners, side, batch, feed)
            if n == 0 and self.runners is runners:   # a pass cut short by a reload proves nothing
                break
            handled += n
        return handled

    def _overlapped(self, runners: list[Runner], side: Runner, batch: int,
                    feed: Callable[[], object] | None = None) -> int:
        """One pass of the pipeline with the triage runner in its own thread: it goes on while the
        stages before it feed it, the stages after it go on while it produces, until both are done.

        A pass ends early (the next one starts the side again) when files reach the stages before
        triage after the side had run dry (a C-STORE burst), or when a reload swapped the runners.  An
        error or an interrupt in this thread stops the side after its current batch; while this thread
        waits for the side, the side's own check-in keeps the heartbeat."""
        from concurrent.futures import ThreadPoolExecutor
        from concurrent.futures import TimeoutError as FutureTimeout

        if self._triage_pool is None:
            self._triage_pool = ThreadPoolExecutor(1, thread_name_prefix="triage")
        at = runners.index(side)
        before, after = runners[:at], runners[at + 1:]
        fed, upstream_done, produced, side_done, abort = (threading.Event() for _ in range(5))
        side_beat = [time.monotonic()]   # the side's own check-in: a triage stuck on one file is a hung worker

        def triage_side() -> int:
            n = 0
            self.pictures.busy(True)   # the pictures that can wait are drawn while this side waits, not beside it
            try:
                while not self.stop_event.is_set() and not abort.is_set():
                    side_beat[0] = time.monotonic()
                    fed.clear()
                    # each triaged image wakes the main loop to route it (not the end of the side's batch)
                    k = side.run_once(limit=batch, after_each=produced.set)
                    n += k
                    if k:
                        produced.set()
                        continue
                    if upstream_done.is_set():
                        k = side.run_once(limit=batch, after_each=produced.set)   # what the last of the feeding placed
                        n += k
                        produced.set()
                        if k == 0:
                            break
                        continue
                    self.pictures.busy(False)
                    fed.wait(0.5)
                    self.pictures.busy(True)
            finally:   # an error too ends the side: the main loop must not wait for it
                self.pictures.busy(False)
                side_done.set()
                produced.set()
            return n

        def beat() -> None:
            self.worker_heartbeat = min(time.monotonic(), float("inf") if side_done.is_set() else side_beat[0])

        future = self._triage_pool.submit(triage_side)
        handled = 0
        if feed is not None:
            self._wake.also = produced   # an inbox event ends the main loop's wait below: it feeds at once
        try:
            while not self.stop_event.is_set() and self.runners is runners:
                beat()
                produced.clear()
                if feed is not None:
                    feed()   # files copied in meanwhile join now, not after this pass's last triage
                n = 0
                for _ in range(batch):
                    # One item at a time before the triage, and what the triage placed meanwhile routed
                    # between them: a triaged image waited for the whole batch (0.2-0.4 s, 4 anonymizations
                    # under load) before its route, and the uploads after it, began.
                    k = sum(runner.run_once(limit=1) for runner in before)
                    n += k
                    if k:
                        fed.set()
                    routed = sum(runner.run_once(limit=batch) for runner in after)
                    if routed:
                        self.uploader.wake.set()
                    handled += routed
                    if not k:
                        break
                handled += n
                if n and side_done.is_set():
                    break   # fed after the side ran dry: the next pass starts it again
                if n == 0:
                    upstream_done.set()
                fed.set()
                m = sum(runner.run_once(limit=batch) for runner in after)
                if m:
                    self.uploader.wake.set()   # routed items go now, not after the triage side
                handled += m
                if n == 0 and m == 0:
                    if side_done.is_set():
                        last = sum(runner.run_once(limit=batch) for runner in after)
                        handled += last
                        if last == 0:
                            break
                        self.uploader.wake.set()
                        continue
                    produced.wait(0.5)
        except BaseException:
            abort.set()   # the side finishes the batch in hand, takes no more
            raise
        finally:
            self._wake.also = None
            if self.runners is not runners:
                abort.set()   # a reload swapped the runners: the next pass runs the new ones
            upstream_done.set()
            fed.set()
            while True:
                try:
                    handled += int(future.result(timeout=0.5))
                    break
                except FutureTimeout:
                    beat()
        self.uploader.wake.set()
        return handled

    def _stop_triage_pool(self) -> None:
        if self._triage_pool is not None:
            self._triage_pool.shutdown(wait=True)
            self._triage_pool = None

    @property
    def disk_low(self) -> bool:
        return self.disk.low

    def check_disk(self) -> bool:
        """The disk guard (diskguard.py): True while there is room to take files from the inbox."""
        return self.disk.check(self.cfg.min_free_mb)

    def scan_inbox(self) -> int:
        """Adopt stable inbox files unless the disk is low (they stay safe on the share)."""
        closed = self.watcher.take_closed()   # drained always: turned on later, it must not see old closes
        if not self.cfg.watch.take_on_close:
            closed = set()
        return self.scanner.scan(may_adopt=self.check_disk(), closed=closed).pending

    def feed_inbox(self) -> int:
        """Adopt the inbox's stable files when there is reason to look: a watcher event or a C-STORE (the
        ``wake`` event), files seen last time that were not stable yet (after half the stability time, at most
        ``MAX_IDLE_WAIT_S``, as the worker's own wait), or
        the rescan interval.  Returns how many files wait to become stable.  The pipeline thread calls it
        between its stages' batches too, so a burst on the share flows in while the first files are
        triaged (the second of 20 mammograms copied at once waited for the first one's whole triage,
        0.25 s with the inbox full: benchmarks/bench_e2e.py's running daemon)."""
        now = time.monotonic()
        watch = self.cfg.watch
        if not (self.wake.is_set() or now - self._last_scan >= watch.rescan_seconds
                or (self._scan_pending and now - self._last_scan >= min(watch.stable_seconds / 2, MAX_IDLE_WAIT_S))):
            return self._scan_pending
        self.wake.clear()
        self._scan_pending = self.scan_inbox()
        self._last_scan = now
        if self.listener is not None:
            self.listener.sweep_scratch()
        return self._scan_pending

    def _worker(self) -> None:
        while not self.stop_event.is_set():
            self.worker_heartbeat = time.monotonic()
            cfg = self.cfg
            try:
                self.feed_inbox()
                self.process_pipeline(feed=self.feed_inbox)
                if time.monotonic() - self._last_report_sweep >= REPORT_SWEEP_S and self._caught_up():
                    self._last_report_sweep = time.monotonic()
                    if self.sweep_reports():
                        self.process_pipeline()     # the SRs made on to the outbox now
            except Exception as exc:  # noqa: BLE001 - the worker must survive anything a file does
                self.log.error("worker_error", error_class=type(exc).__name__, exc_info=exc)
                self.stop_event.wait(1.0)
            pending = self._scan_pending   # files seen that were not stable yet, at the last look
            stable = cfg.watch.stable_seconds
            timeout = max(0.2, min(stable / 2 if pending else cfg.watch.rescan_seconds, MAX_IDLE_WAIT_S))
            self.wake.wait(timeout)

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
            loaded = load_config(self.config_path)
            # the keys that need a restart stay as started until then (the spool the daemon runs on above all:
            # a new spool_dir must not get linkage records while the old spool is still the one in use)
            new = keeping(loaded, self.cfg, needing_restart(self.cfg, loaded))
            validate(new)   # the mix of running and new keys must hold together too (two listeners on one port)
            check_secrets(new, self.log)
            new_destination = make_destination(new.destination, new.upload.bandwidth_limit_bps)
            new_fleet_destination = make_destination(new.fleet.destination) if self.fleet_uploader else None
            new_anonymizer = Anonymizer(new)
        except Exception as exc:  # noqa: BLE001 - a reload can never stop the daemon: it keeps the old config
            msg = str(exc) if isinstance(exc, ConfigError) else f"the new config could not be applied ({type(exc).__name__})"
            self.log.error("config_rejected", key=msg.split(":", 1)[0], reason=msg)
            self._record_config(rejected=msg)
            notify("READY=1\nSTATUS=config rejected, running on the previous one: " + msg[:200])
            return False
        restart = needing_restart(self.cfg, loaded)
        # pending until a restart: against the config the daemon started with, not the last reload (a
        # second reload that changes something else must not clear what the first one left pending)
        pending = needing_restart(self.started_cfg, loaded)
        old = self.cfg
        self.cfg = new
        configure_logging(new.log.level, new.log.format, new.log.stream)
        self.log = get_logger()
        self.uploader.reconfigure(new_destination, new.upload)
        if self.fleet_uploader is not None and new_fleet_destination is not None:
            self.fleet_uploader.reconfigure(new_fleet_destination, new.upload)
        self.anonymize_stage.reconfigure(new_anonymizer)
        self.triage_stage.reconfigure(new, new_anonymizer.ctx.uid)
        self.scanner.reconfigure(new.watch)
        if self.shipper is not None:
            self.shipper.reconfigure(new.fleet)
        if new.triage.enabled != old.triage.enabled:
            self._build_runners()
        for runner in self.runners:
            if isinstance(runner.stage, RouteStage):
                runner.stage.reconfigure(new.destination)
        if new.watch.mode != old.watch.mode:
            self.watcher.stop()
            self.watcher = Watcher(self.spool.inbox, new.watch.mode, self.wake)
            self.watcher.start()
        self.log.info("config_reloaded", config=str(self.config_path), key=",".join(restart) or None)
        if restart:
            self.log.warning("restart_required", key=",".join(restart))
        self.spool.state.put(StateKey.RESTART_PENDING, ", ".join(pending) or None)  # for `status`
        self._record_config()
        notify("READY=1\nSTATUS=" + self.status_line())
        self.uploader.wake.set()
        self.wake.set()
        return True

    def _record_config(self, rejected: str | None = None) -> None:
        """Which config file this daemon runs on (its SHA-256), or which one a reload refused and why:
        ``apply-config`` waits for one or the other (docs/install.md, Changing the configuration)."""
        if self.config_path is None:
            return
        try:
            digest = hashlib.sha256(self.config_path.read_bytes()).hexdigest()
            if rejected is None:
                self.spool.state.put(StateKey.CONFIG_APPLIED, digest)
            else:
                self.spool.state.put(StateKey.CONFIG_REJECTED, f"{digest} {time.time():.3f} {rejected}")
        except (OSError, sqlite3.OperationalError) as exc:  # a record for the operator, never a reason to stop
            self.log.warning("config_record_failed", error_class=type(exc).__name__)

    # ------------------------------------------------------------ modes
    def warm_up(self) -> threading.Thread | None:
        """Triage's imports and tables loaded in a thread beside the first files (triage/stage.py:warm_up);
        then the start is loaded, and the collector ``run`` held back since its first line runs again
        (startup.hold_gc), with what the start made frozen."""
        if not self.cfg.triage.enabled:
            release_gc(self.log)
            return None

        def run() -> None:
            start = time.perf_counter()
            try:
                from medsendx_edge.triage.stage import warm_up

                tables = warm_up(self.cfg.triage.send_sr)
            except Exception as exc:  # noqa: BLE001 - only the first image's time is at stake
                self.log.warning("warm_up_failed", error_class=type(exc).__name__)
                return
            finally:
                release_gc(self.log)
            self.log.info("triage_warmed", duration_ms=round((time.perf_counter() - start) * 1000, 1),
                          **({"tables": tables} if tables else {}))

        thread = threading.Thread(target=run, name="warm-up", daemon=True)
        thread.start()
        return thread

    def _start_pictures(self) -> None:
        if self.cfg.triage.enabled:
            self.pictures.start()
            self.triage_stage.missing_pictures()

    def start(self) -> None:
        self.recover()
        self.warm_up()
        self._start_pictures()
        record_runtime(self.cfg, self.config_path, self.log)
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
        release_gc_if_overdue(self.log)   # (startup.hold_gc)
        if self.reload_requested.is_set():
            self.reload_requested.clear()
            self.reload()
        if self.cfg.config_watch:
            mtime = self._mtime()
            if mtime != self._config_mtime:
                self._config_mtime = mtime
                self.reload()
        self.watcher.check()
        if self.shipper is not None and self.shipper.due():
            try:
                self.shipper.ship()
            except OSError as exc:
                self.log.warning("features_not_queued", error_class=type(exc).__name__, reason=exc.strerror)
            except Exception as exc:  # noqa: BLE001 - the fleet's rows never stop the daemon (a bad state value)
                self.log.error("features_not_queued", error_class=type(exc).__name__, exc_info=exc)
        if self.shipper is not None and self.shipper.beat_due():
            try:
                self.shipper.beat(status_data(self.cfg, self.spool))
                self.shipper.ship_exams(self.exams, self.anonymize_stage.anonymizer.ctx.secret)
            except (OSError, sqlite3.OperationalError) as exc:
                self.log.warning("heartbeat_not_queued", error_class=type(exc).__name__)
            except Exception as exc:  # noqa: BLE001 - nor its heartbeat
                self.log.error("heartbeat_not_queued", error_class=type(exc).__name__, exc_info=exc)
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
        self.pictures.stop(timeout=20)   # what waits is drawn now; a stop cut short leaves it to the next start
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
        # The handlers only record (startup.Signals): the main loop acts, between two ticks.
        signals = Signals(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        try:
            self.start()
            interval = 1.0
            watchdog_usec = os.environ.get("WATCHDOG_USEC")
            if watchdog_usec and watchdog_usec.isdigit():
                interval = min(interval, int(watchdog_usec) / 2e6)
            try:
                while not self.stop_event.is_set():
                    for signum in signals.wait(interval):
                        if signum == signal.SIGHUP:
                            self.reload_requested.set()
                        elif signum in (signal.SIGTERM, signal.SIGINT):
                            self.log.info("signal_received", signal=signal.Signals(signum).name)
                            self.stop_event.set()
                            self.wake.set()
                    if not self.stop_event.is_set():
                        self.tick()
            finally:
                self.shutdown()
        finally:
            signals.close()
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
        self.warm_up()
        self._start_pictures()
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
            if self._caught_up() and self.sweep_reports(final=True):   # no view is coming in this run
                self.process_pipeline()
        finally:
            pipeline_done.set()
            self.uploader.wake.set()
            uploading.join()
            self.pictures.stop(timeout=None)   # every picture drawn before the run returns
        self._stop_triage_pool()
        waiting = self.uploader.drain_once()
        waiting += sum(r.pending() for r in self.runners)
        if self.shipper is not None and self.fleet_uploader is not None:
            self.shipper.ship()
            if self.shipper.beat_due():
                self.shipper.beat(status_data(self.cfg, self.spool))
                self.shipper.ship_exams(self.exams, self.anonymize_stage.anonymizer.ctx.secret)
            waiting += self.fleet_uploader.drain_once()
        if self.disk_low:
            waiting += self.scanner.scan(may_adopt=False).pending
        else:
            waiting += waiting_incomplete
        if progress:
            progress(self)
        self.uploader.destination.close()
        return waiting
