"""How the previous process on this spool ended, so that recovery blames a file only for a death it can cause.

A file in flight when the daemon died is put back in its queue; one that keeps killing the daemon must go to
quarantine, or the daemon loops on it for ever.  But a SIGKILL or a power cut lands on whatever file is in
flight, and on a truck whose power cycles (or in a test that kills the daemon every second) the first file
taken after each start can be in flight at several deaths in a row without being at fault.  Counting those
against it quarantined valid images ("crashed the daemon repeatedly").

So the death is read from what it left behind:

* ``state/fatal.log``: Python's :mod:`faulthandler` writes the tracebacks there on a fatal signal (SIGSEGV,
  SIGBUS, SIGFPE, SIGILL, SIGABRT: a decoder crashing, an abort, systemd's watchdog for a hung thread);
* ``state/exit.json``: written by ``medsendx-edge note-exit``, the unit's ``ExecStopPost=``, from the
  ``$SERVICE_RESULT`` systemd gives it: ``oom-kill`` (a file whose decoding exhausted ``MemoryMax=``),
  ``watchdog``, ``core-dump``.

Either is a death a file can cause.  A fatal record names the thread that crashed ("Current thread 0x..."),
and every worker thread notes the item it has in hand in ``state/inhand/<thread id>`` (:class:`InHand`):
the crash counts against that item alone (``max_recoveries``), the others in flight beside it in other
threads (anonymize beside triage, an upload) were interrupted, not at fault (:func:`blamed`).  Nothing left
behind (SIGKILL, a power cut, an out-of-memory kill outside systemd, as in a container) is counted apart,
with the higher bar ``max_interruptions``: such a death is usually not the file's doing, and the bar still
ends a loop on a file that is.  Both records are consumed at start, once recovery has read them; a death
during recovery leaves them for the next start.
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Mapping

from medsendx_edge.fsutil import fsync_dir, write_bytes_atomic

FATAL_LOG = "fatal.log"
FATAL_PREVIOUS = "fatal.previous.log"
EXIT_RECORD = "exit.json"
IN_HAND = "inhand"
#: systemd's ``$SERVICE_RESULT`` values a file being processed can cause (systemd.exec(5), ExecStopPost=)
FILE_FAULT_RESULTS = frozenset({"oom-kill", "watchdog", "core-dump"})
#: ... and, with ``signal`` (no core dumped), the signals a process raises itself: a Python fatal error
#: (``Py_FatalError`` turns faulthandler off before its abort: nothing in fatal.log) or a crash
FATAL_SIGNALS = frozenset({"ABRT", "SEGV", "BUS", "FPE", "ILL"})

_armed: IO[bytes] | None = None   # faulthandler keeps the file's descriptor: the file object must live on


def previous_death(state_dir: Path) -> str | None:
    """Why the previous process died, if it was of something a file can cause; None if it left no such trace.

    Only the first line of a fatal record is returned ("Fatal Python error: Segmentation fault"): the
    tracebacks below it name our code's files and functions, never data, but a log line needs no more."""
    try:
        text = (state_dir / FATAL_LOG).read_text(errors="replace")
    except FileNotFoundError:
        text = ""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if first:
        return first[:200]
    record = _exit_record(state_dir)
    if record is not None and _file_fault(record):
        return (f"systemd: {record.get('service_result')} "
                f"({record.get('exit_code', '')} {record.get('exit_status', '')})")
    return None


def _file_fault(record: Mapping[str, str]) -> bool:
    result = str(record.get("service_result", ""))
    return result in FILE_FAULT_RESULTS or (result == "signal" and str(record.get("exit_status", "")) in FATAL_SIGNALS)


class InHand:
    """Which item each worker thread has in hand: ``state/inhand/<thread id, hex>`` holds ``<queue>:<id>``
    while the thread works on it.  Not fsynced: it is read after a crash of the process (the page cache
    survives that), never after a power cut (which leaves no fatal record to attribute).  About 0.1 ms an
    item a stage."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / IN_HAND
        self._held = threading.local()   # the thread's outer notes, put back when an inner one ends

    @contextmanager
    def holding(self, queue: str, item_id: str) -> Iterator[None]:
        """Best effort: a note that cannot be written (a full disk) never stops the work; a crash then names
        no item."""
        path = self.dir / f"{threading.get_ident():x}"
        stack: list[str] = self._held.__dict__.setdefault("stack", [])
        stack.append(f"{queue}:{item_id}")
        self._note(path, stack[-1])
        try:
            yield
        finally:
            stack.pop()
            try:
                if stack:
                    self._note(path, stack[-1])
                else:
                    path.unlink(missing_ok=True)
            except OSError:
                pass

    def _note(self, path: Path, key: str) -> bool:
        for _ in range(2):
            try:
                path.write_text(key)
                return True
            except FileNotFoundError:
                try:
                    self.dir.mkdir(parents=True, exist_ok=True)
                except OSError:
                    return False
            except OSError:   # a full disk: no note (an empty one, if it was made, names no item)
                return False
        return False


_CURRENT = re.compile(r"^Current thread 0x([0-9a-f]+)", re.MULTILINE)


def blamed(state_dir: Path, also: tuple[Path, ...] = ()) -> set[str]:
    """The items (``<queue>:<id>``) a death a file can cause is blamed on, from the records and the notes
    (``also``: other spools' state folders whose workers' notes count as items in hand, the fleet's):

    * a fatal record names the crashed thread and its note names an item: that item alone (a decoder's
      segfault is delivered to the thread that made it);
    * it names a thread with no item (a listener, the console, the warm-up; heap corruption caught far from
      where it was made; systemd's watchdog, which aborts through the main thread): none;
    * no thread named (an out-of-memory kill, a Python fatal error): the item in hand if it was the only
      one, else none.  Of several items in hand one may be innocent (a valid upload, retried first after
      every restart and slow on 4G, was quarantined beside a poison file).

    The items not blamed count as interrupted (``max_interruptions``)."""
    notes = _notes(state_dir)
    try:
        text = (state_dir / FATAL_LOG).read_text(errors="replace")
    except OSError:
        text = ""
    m = _CURRENT.search(text)
    if m is not None:
        crashed = notes.get(f"{int(m.group(1), 16):x}")
        return {crashed} if crashed else set()
    in_hand = len(notes) + sum(len(_notes(d)) for d in also)
    return set(notes.values()) if in_hand == 1 else set()


def _notes(state_dir: Path) -> dict[str, str]:
    """The notes left, by thread; a note that cannot be read (garbage after a power cut on a file system that
    does not order its writes) names no item: recovery never fails on one."""
    notes: dict[str, str] = {}
    try:
        paths = list((state_dir / IN_HAND).iterdir())
    except OSError:
        return notes
    for p in paths:
        try:
            key = p.read_text(errors="replace").strip()
        except OSError:
            continue
        if key:
            notes[p.name] = key
    return notes


def _exit_record(state_dir: Path) -> dict[str, str] | None:
    try:
        record = json.loads((state_dir / EXIT_RECORD).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return {k: str(v) for k, v in record.items()} if isinstance(record, dict) else None


def arm(state_dir: Path) -> bool:
    """Have this process's fatal errors written to ``state/fatal.log`` (the command ``run`` only: a test
    process keeps its own :mod:`faulthandler`).  Appended to, never truncated here: the previous process's
    record may not have been read yet; :func:`consume` empties it once recovery has.  False when the file
    cannot be written: the daemon runs, and a fatal error then leaves no record (it counts as a SIGKILL)."""
    global _armed
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        _armed = open(state_dir / FATAL_LOG, "ab", buffering=0)   # O_APPEND: writes follow a truncation
    except PermissionError:   # made by another user (root running `run` by hand): no record, not no start
        return False
    faulthandler.enable(_armed, all_threads=True)
    return True


def consume(state_dir: Path) -> None:
    """After recovery: the previous death's records are spent.  The fatal record moves to
    ``state/fatal.previous.log`` (the last crash's tracebacks, for the technician); the exit record goes.
    Durably: a power cut just after must not bring a spent record back (the recovery it served is
    committed, and the next start would count the files then in flight as crashes again)."""
    fatal = state_dir / FATAL_LOG
    try:
        data = fatal.read_bytes()
    except FileNotFoundError:
        data = b""
    if data.strip():
        write_bytes_atomic(state_dir / FATAL_PREVIOUS, data)
        try:
            fd = os.open(fatal, os.O_WRONLY)
        except PermissionError:   # another user's (root ran `run` by hand): moved aside, not emptied
            fatal.unlink()
            fsync_dir(state_dir)
        else:
            try:
                os.ftruncate(fd, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
    exit_record = state_dir / EXIT_RECORD
    if exit_record.exists():
        exit_record.unlink()
        fsync_dir(state_dir)
    clear_notes(state_dir)


def clear_notes(state_dir: Path) -> None:
    """The dead threads' notes go at start (thread ids are reused)."""
    shutil.rmtree(state_dir / IN_HAND, ignore_errors=True)


def note_exit(state_dir: Path, env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Record how systemd saw the main process end (``ExecStopPost=``: ``$SERVICE_RESULT``, ``$EXIT_CODE``,
    ``$EXIT_STATUS``); what is recorded is returned.  A record that blames a file and that no start has
    read yet is kept: the start after an out-of-memory kill may itself be stopped before its recovery (a
    start timeout, a stop while it waits for the inbox share), and that stop must not erase it."""
    record = {"service_result": env.get("SERVICE_RESULT", ""), "exit_code": env.get("EXIT_CODE", ""),
              "exit_status": env.get("EXIT_STATUS", "")}
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        unread = json.loads((state_dir / EXIT_RECORD).read_text())
    except (FileNotFoundError, ValueError):
        unread = None
    if isinstance(unread, dict) and _file_fault(unread) and not _file_fault(record):
        return {k: str(v) for k, v in unread.items()}
    write_bytes_atomic(state_dir / EXIT_RECORD, json.dumps(record).encode())
    return record
