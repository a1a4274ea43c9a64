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

import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from .logs import get_logger
from .spool import TEMP_SUFFIXES, Spool


def is_candidate_name(name: str) -> bool:
    return not name.startswith(".") and not name.lower().endswith(TEMP_SUFFIXES)


@dataclass
class ScanResult:
    adopted: list[str] = field(default_factory=list)
    pending: int = 0   # files seen but not yet stable


class InboxScanner:
    def __init__(self, spool: Spool, stable_seconds: float) -> None:
        self.spool = spool
        self.stable_seconds = stable_seconds
        self._seen: dict[str, tuple[int, int]] = {}
        self.log = get_logger(stage="ingest")

    def scan(self, now: float | None = None, *, may_adopt: bool = True) -> ScanResult:
        now = time.time() if now is None else now
        result = ScanResult()
        inbox = self.spool.inbox
        seen_now: dict[str, tuple[int, int]] = {}
        for dirpath, dirnames, filenames in os.walk(inbox):
            dirnames[:] = [d for d in dirnames if is_candidate_name(d)]
            for name in filenames:
                if not is_candidate_name(name):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                sig = (st.st_size, st.st_mtime_ns)
                seen_now[path] = sig
                stable = stat.S_ISLNK(st.st_mode) or (
                    self._seen.get(path, sig) == sig and now - st.st_mtime >= self.stable_seconds)
                if not stable or not may_adopt:
                    result.pending += 1
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
        self._remove_empty_dirs(now)
        return result

    def _remove_empty_dirs(self, now: float) -> None:
        inbox = self.spool.inbox
        for dirpath, dirnames, filenames in os.walk(inbox, topdown=False):
            if dirpath == str(inbox) or not is_candidate_name(os.path.basename(dirpath)):
                continue
            if any(not is_candidate_name(Path(dirpath, d).name) for d in dirnames):
                continue
            try:
                if not os.listdir(dirpath) and now - os.stat(dirpath).st_mtime >= self.stable_seconds:
                    os.rmdir(dirpath)
            except OSError:
                continue


class _Wake(FileSystemEventHandler):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.event.set()


class Watcher:
    """A watchdog observer used only as a wake-up; restarted when it dies."""

    def __init__(self, path: Path, mode: str, wake: threading.Event) -> None:
        self.path = Path(path)
        self.mode = mode
        self.wake = wake
        self.observer: Observer | PollingObserver | None = None  # type: ignore[valid-type]
        self.restarts = 0
        self.log = get_logger(stage="ingest")

    def start(self) -> None:
        obs = PollingObserver(timeout=1.0) if self.mode == "polling" else Observer()
        obs.schedule(_Wake(self.wake), str(self.path), recursive=True)
        obs.daemon = True
        obs.start()
        self.observer = obs

    def check(self) -> bool:
        """Restart the observer if its thread died; True if it was healthy."""
        if self.observer is not None and self.observer.is_alive():
            return True
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
