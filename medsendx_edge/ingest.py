"""Ingest: find stable files in the inbox and adopt them into the spool.

Watchdog events are wake-up hints, not the truth: ``created`` fires when a
write starts, an inotify overflow is dropped silently, network shares send
nothing, and the observer thread can die.  So the inbox is rescanned in full
on every wake-up and every ``rescan_seconds``, the observer's health is
checked and it is restarted, and a file is taken only once it is stable: its
size and mtime unchanged between two looks and its mtime at least
``stable_seconds`` old.  Hidden files and temp names are left alone.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.events import (DirCreatedEvent, DirDeletedEvent, DirMovedEvent, EventsLostEvent, FileClosedEvent,
                             FileCreatedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler)
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from medsendx_edge.fsutil import WalkErrors, walk
from medsendx_edge.logs import get_logger
from medsendx_edge.config import WatchConfig
from medsendx_edge.spool import ADOPTING, TEMP_SUFFIXES, Spool
from medsendx_edge.vocabulary import StateKey


def is_candidate_name(name: str) -> bool:
    return not name.startswith(".") and not name.lower().endswith(TEMP_SUFFIXES)


@dataclass
class ScanResult:
    adopted: list[str] = field(default_factory=list)
    pending: int = 0        # files seen but not yet stable (or stable but visibly incomplete)
    incomplete: int = 0     # of those, stable but visibly unfinished: waiting for the writer to return
    ignored: int = 0        # hidden or temporary-looking names: never taken, but counted
    ignored_stale: int = 0  # of those, untouched for longer than ``ignored_report_s``
    unreadable_dirs: int = 0


class InboxScanner:
    """Finds stable, complete files in the inbox tree (any depth) and adopts them."""

    def __init__(self, spool: Spool, stable_seconds: float, *, incomplete_grace_s: float = 120.0,
                 ignored_report_s: float = 3600.0) -> None:
        self.spool = spool
        self.stable_seconds = stable_seconds
        self.incomplete_grace_s = incomplete_grace_s
        self.ignored_report_s = ignored_report_s
        self._seen: dict[str, tuple[int, int]] = {}
        self._reported = (0, 0)
        self.last = ScanResult()
        self.log = get_logger(stage="ingest")

    def reconfigure(self, watch: WatchConfig) -> None:
        self.stable_seconds = watch.stable_seconds
        self.incomplete_grace_s = watch.incomplete_grace_s
        self.ignored_report_s = watch.ignored_report_s

    def _incomplete(self, path: str, age_s: float) -> bool:
        """Stable but visibly unfinished (cut inside an element, an image header without its pixels,
        not even a preamble yet) while written to within ``incomplete_grace_s``: a modality that
        pauses mid-write, or closes and reopens the file to append, is given time to finish."""
        if age_s >= self.incomplete_grace_s:
            return False
        from medsendx_edge.anonymize.dicomio import incomplete_reason

        try:
            return incomplete_reason(Path(path)) is not None
        except Exception:  # noqa: BLE001 - one odd file never stops the scan of the others
            return True

    def scan(self, now: float | None = None, *, may_adopt: bool = True,
             closed: set[str] | frozenset[str] = frozenset()) -> ScanResult:
        """Adopt the stable, complete files of the inbox.  ``closed``: files the watcher saw closed after
        writing; one of them that is a complete DICOM file is taken at once (``watch.take_on_close``),
        without the ``stable_seconds`` wait; an incomplete one waits as any other."""
        now = time.time() if now is None else now
        result = ScanResult()
        inbox = self.spool.inbox
        seen_now: dict[str, tuple[int, int]] = {}
        errors = WalkErrors()
        folders: list[str] = []
        for dirpath, dirnames, filenames in walk(inbox, descend=is_candidate_name, errors=errors):
            folders.append(dirpath)
            for name in dirnames:
                if not is_candidate_name(name) and not (dirpath == str(inbox) and name == ".queue"):
                    self._count_ignored(os.path.join(dirpath, name), now, result)
            for name in filenames:
                path = os.path.join(dirpath, name)
                if not is_candidate_name(name):
                    if not name.startswith(ADOPTING):
                        self._count_ignored(path, now, result)
                    continue
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                sig = (st.st_size, st.st_mtime_ns)
                seen_now[path] = sig
                age = now - st.st_mtime
                # closed after writing and a whole image (pixels and all): no need to wait for stability.
                # A close alone proves nothing (any writable handle closed sends it), so anything else
                # (an SR, a file cut between elements, a non-DICOM file) waits as before.
                just_closed = path in closed and stat.S_ISREG(st.st_mode) and may_adopt and _whole_image(path)
                stable = stat.S_ISLNK(st.st_mode) or just_closed or (
                    self._seen.get(path, sig) == sig and age >= self.stable_seconds)
                if not stable or not may_adopt:
                    result.pending += 1
                    continue
                if stat.S_ISREG(st.st_mode) and not just_closed and self._incomplete(path, age):
                    result.pending += 1
                    result.incomplete += 1
                    continue
                try:
                    item_id = self.spool.adopt(Path(path))
                except FileNotFoundError:
                    continue  # taken away by the modality before we could: not ours
                except OSError as exc:
                    result.pending += 1
                    self.log.warning("ingest_failed", error_class=type(exc).__name__, reason=exc.strerror)
                    continue
                seen_now.pop(path, None)
                result.adopted.append(item_id)
                self.log.info("file_received", file_id=item_id, bytes=st.st_size)
        self._seen = seen_now
        result.unreadable_dirs = errors.total
        self._report(result, errors)
        self._remove_empty_dirs(folders, now)
        self.last = result
        return result

    def _count_ignored(self, path: str, now: float, result: ScanResult) -> None:
        result.ignored += 1
        try:
            if now - os.lstat(path).st_mtime >= self.ignored_report_s:
                result.ignored_stale += 1
        except OSError:
            pass

    def _report(self, result: ScanResult, errors: WalkErrors) -> None:
        """Said once per change, never per scan, and never with a name (names can hold a patient's)."""
        now = (result.ignored_stale, result.unreadable_dirs)
        if now == self._reported:
            return
        self._reported = now
        if result.ignored_stale:
            self.log.warning("inbox_files_ignored", count=result.ignored_stale,
                             reason=f"hidden or temporary names (.*, *.tmp, *.part...) untouched for "
                                    f"{self.ignored_report_s:g} s: never ingested; rename or remove them")
        if result.unreadable_dirs:
            self.log.warning("inbox_unreadable", count=result.unreadable_dirs,
                             reason=", ".join(f"{k} x{v}" for k, v in sorted(errors.counts.items())))
        try:
            self.spool.state.put(StateKey.INBOX_IGNORED, json.dumps({
                "ignored_stale": result.ignored_stale, "unreadable_dirs": result.unreadable_dirs}))
        except Exception:  # noqa: BLE001 - a report must never stop the scan (full disk)
            pass

    def _remove_empty_dirs(self, folders: list[str], now: float) -> None:
        """Empty sub-folders the modality left, deepest first (the scan listed them top-down), once untouched
        for ``incomplete_grace_s`` (at least ``stable_seconds``): a modality that writes a study's next image
        into the folder it emptied a moment ago finds it still there (after ``stable_seconds`` alone, the
        acceptance test's modality had its folder removed between its ``mkdir -p`` and its ``open``)."""
        inbox = str(self.spool.inbox)
        age = max(self.stable_seconds, self.incomplete_grace_s)
        for dirpath in reversed(folders):
            if dirpath == inbox:
                continue
            try:
                if not os.listdir(dirpath) and now - os.stat(dirpath).st_mtime >= age:
                    os.rmdir(dirpath)
            except OSError:
                continue


def _whole_image(path: str) -> bool:
    from medsendx_edge.anonymize.dicomio import complete_image

    return complete_image(Path(path))


#: What wakes the pipeline: a file or folder created, moved in, or closed after writing; a folder deleted
#: (the inbox itself among them); the kernel's queue overflowing (events lost: the full rescan finds what
#: they said).  The overflow notice adds no inotify mask bit (the kernel always sends it); deletions add
#: IN_DELETE, rare in an inbox (our own adoption renames files out: a move, already in the mask).
WAKE_EVENTS: list[type[FileSystemEvent]] = [FileCreatedEvent, DirCreatedEvent, FileMovedEvent, DirMovedEvent,
                                            FileClosedEvent, DirDeletedEvent, EventsLostEvent]


class _Wake(FileSystemEventHandler):
    """Wakes the pipeline on any event; remembers the files closed after writing (inotify close-write)."""

    MAX_CLOSED = 10_000  # a burst beyond this falls back to the stable_seconds rule

    def __init__(self, event: threading.Event) -> None:
        self.event = event
        self.lock = threading.Lock()
        self.closed: set[str] = set()

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.event.set()

    def on_closed(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._done(str(event.src_path))

    def on_moved(self, event: FileSystemEvent) -> None:
        """A file renamed into place (written under a temporary name, then renamed) is finished too."""
        if not event.is_directory:
            self._done(str(getattr(event, "dest_path", "") or ""))

    def _done(self, path: str) -> None:
        if not path:
            return
        with self.lock:
            if len(self.closed) < self.MAX_CLOSED:
                self.closed.add(path)
        self.event.set()  # again: the wake-up of on_any_event may have been taken before the path was in


def _identity(path: Path) -> tuple[int, int] | None:
    """The folder's device and inode (None when it is not there)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


MOVE_PAIRING_S = 0.02


def _prompt_moves() -> None:
    """watchdog holds each IN_MOVED_FROM for 0.5 s to pair it with its IN_MOVED_TO, and every event behind
    it waits in its queue too.  The daemon's own renames out of ``inbox/.queue`` (each file passed on to
    ``anonymized/``) are such unpaired moves: in a burst each one held the next files' close events for
    half a second (a review measured 425 ms median from a file written to its adoption, 2 ms without the
    hold).  The wake-up needs no pairing (a move into, out of or within the inbox wakes the scan either
    way), and the kernel puts a rename's two events side by side, so 20 ms still pairs them.  Shortened
    on the class, read when an observer's emitter starts (this daemon runs one observer); a watchdog
    without the class (a future version) keeps its own hold."""
    try:
        from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper
    except ImportError:
        return
    if float(getattr(InotifyMoveEventGrouper, "delay", 0.0) or 0.0) > MOVE_PAIRING_S:
        InotifyMoveEventGrouper.delay = MOVE_PAIRING_S


class Watcher:
    """A watchdog observer used only as a wake-up; restarted when it dies."""

    def __init__(self, path: Path, mode: str, wake: threading.Event) -> None:
        self.path = Path(path)
        self.mode = mode
        self.wake = wake
        self.observer: Observer | PollingObserver | None = None  # type: ignore[valid-type]
        self.handler: _Wake | None = None
        self.identity: tuple[int, int] | None = None
        self.restarts = 0
        self.log = get_logger(stage="ingest")

    def start(self) -> None:
        _prompt_moves()
        obs = PollingObserver(timeout=1.0) if self.mode == "polling" else Observer()
        self.handler = _Wake(self.wake)
        # Only the events that say a file is there or finished: 20 mammograms of 17 MB written in 64 KB
        # chunks made 352 events (modify events, coalesced by the kernel while unread), each a Python
        # event object and a wake-up of the worker for an inbox scan: 0.16 s of the watcher thread's CPU;
        # with the filter 40 events and 0.01 s.  Without them the kernel sends none (watchdog builds the
        # inotify mask from the filter); a file still growing is rescanned every stable_seconds / 2.
        obs.schedule(self.handler, str(self.path), recursive=True, event_filter=WAKE_EVENTS)
        obs.daemon = True
        obs.start()
        self.observer = obs
        self.identity = _identity(self.path)

    def take_closed(self) -> set[str]:
        """The paths closed after writing since the last call (native mode; polling sees no closes)."""
        handler = self.handler
        if handler is None:
            return set()
        with handler.lock:
            out, handler.closed = handler.closed, set()
        return out

    def check(self) -> bool:
        """Restart the observer if its thread died, or if the folder it watches went away (its emitter
        stops when the folder is deleted, while the observer's thread lives on) or was made again (a
        share remounted: another folder under the same name); True if it was healthy."""
        obs = self.observer
        if obs is not None and obs.is_alive():
            emitters_alive = all(e.is_alive() for e in getattr(obs, "emitters", ()))
            now = _identity(self.path)
            if emitters_alive and (now is None or now == self.identity):
                return True
            if now is None:
                return True     # the folder is gone: nothing to watch until it is back (rescans go on)
        self.restarts += 1
        self.log.warning("watcher_restarted", mode=self.mode, count=self.restarts)
        try:
            self.stop()
            self.start()
        except OSError as exc:
            self.log.error("watcher_failed", error_class=type(exc).__name__, reason=exc.strerror)
        self.wake.set()
        return False

    def stop(self) -> None:
        if self.observer is not None:
            try:
                self.observer.stop()
                self.observer.join(timeout=5)
            except RuntimeError:
                pass
            self.observer = None
