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

Either is a death a file can cause, counted against the files in flight (``max_recoveries``).  Nothing left
behind (SIGKILL, a power cut, an out-of-memory kill outside systemd, as in a container) is counted apart,
with the higher bar ``max_interruptions``: such a death is usually not the file's doing, and the bar still
ends a loop on a file that is.  Both records are consumed at start, once recovery has read them; a death
during recovery leaves them for the next start.
"""

from __future__ import annotations

import faulthandler
import json
import os
from pathlib import Path
from typing import IO, Mapping

from medsendx_edge.fsutil import write_bytes_atomic

FATAL_LOG = "fatal.log"
FATAL_PREVIOUS = "fatal.previous.log"
EXIT_RECORD = "exit.json"
#: systemd's ``$SERVICE_RESULT`` values a file being processed can cause (systemd.exec(5), ExecStopPost=)
FILE_FAULT_RESULTS = frozenset({"oom-kill", "watchdog", "core-dump"})

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
    try:
        record = json.loads((state_dir / EXIT_RECORD).read_text())
    except (FileNotFoundError, ValueError):
        return None
    result = str(record.get("service_result", "")) if isinstance(record, dict) else ""
    if result in FILE_FAULT_RESULTS:
        return f"systemd: {result} ({record.get('exit_code', '')} {record.get('exit_status', '')})".strip()
    return None


def arm(state_dir: Path) -> None:
    """Have this process's fatal errors written to ``state/fatal.log`` (the command ``run`` only: a test
    process keeps its own :mod:`faulthandler`).  Appended to, never truncated here: the previous process's
    record may not have been read yet; :func:`consume` empties it once recovery has."""
    global _armed
    state_dir.mkdir(parents=True, exist_ok=True)
    _armed = open(state_dir / FATAL_LOG, "ab", buffering=0)   # O_APPEND: writes follow a truncation
    faulthandler.enable(_armed, all_threads=True)


def consume(state_dir: Path) -> None:
    """After recovery: the previous death's records are spent.  The fatal record moves to
    ``state/fatal.previous.log`` (the last crash's tracebacks, for the technician); the exit record goes."""
    fatal = state_dir / FATAL_LOG
    try:
        data = fatal.read_bytes()
    except FileNotFoundError:
        data = b""
    if data.strip():
        write_bytes_atomic(state_dir / FATAL_PREVIOUS, data)
        os.truncate(fatal, 0)
    (state_dir / EXIT_RECORD).unlink(missing_ok=True)


def note_exit(state_dir: Path, env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Record how systemd saw the main process end (``ExecStopPost=``: ``$SERVICE_RESULT``, ``$EXIT_CODE``,
    ``$EXIT_STATUS``); what is recorded is returned."""
    record = {"service_result": env.get("SERVICE_RESULT", ""), "exit_code": env.get("EXIT_CODE", ""),
              "exit_status": env.get("EXIT_STATUS", "")}
    state_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(state_dir / EXIT_RECORD, json.dumps(record).encode())
    return record
