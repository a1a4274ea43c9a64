"""Before the daemon runs: the secret files and paths it needs, waiting for an inbox share that is not
mounted yet, and the record of where its spool is (for ``status`` when the config file breaks later)."""

from __future__ import annotations

import fcntl
import gc
import os
import select
import signal
import threading
import time
from pathlib import Path
from typing import Any

from medsendx_edge.config import Config, path_problems, secret_problems
from medsendx_edge.errors import ConfigError, SpoolBusyError
from medsendx_edge.logs import get_logger
from medsendx_edge.sdnotify import notify


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


def lock_spool(spool_dir: Path) -> int:
    """One daemon a spool: an advisory ``flock`` on its ``state`` folder, released by the kernel however the
    process ends; returns the descriptor, to keep open.  Raises :class:`SpoolBusyError` naming the holder's
    pid (``state/daemon.pid``, best effort).

    A folder, not a file: a lock file made by another user (root running ``run --once`` by hand, umask 077)
    could not be opened by the service's user, which would then never start.  ``status``, ``requeue`` and the
    other commands run beside the daemon; a second ``run`` (a technician's ``run --once`` while the service
    runs) would recover the first one's files in flight as if it had died, to be processed, or sent, twice."""
    state = spool_dir / "state"
    state.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0 and os.stat(state).st_uid != 0:
        raise SpoolBusyError(f"the spool {spool_dir} belongs to another user: run this as that user "
                             "(sudo -u medsendx medsendx-edge ...), or files made as root would stop the service")
    fd = _flock(state, state)
    assert fd is not None
    try:
        (state / "daemon.pid").write_text(str(os.getpid()))
    except OSError:
        pass
    return fd


def lock_inbox(inbox: Path, spool_dir: Path) -> int | None:
    """One daemon an inbox too (its incoming queue and receptions live there: a second install, container
    and native, on one share would take the other's files in flight); None where the share's file system
    has no ``flock``."""
    return _flock(inbox, spool_dir / "state")


def _flock(folder: Path, state: Path) -> int | None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            holder = (state / "daemon.pid").read_text().strip()[:16]
        except OSError:
            holder = ""
        raise SpoolBusyError(f"another medsendx-edge run (pid {holder or '?'}) holds {folder}: one daemon a "
                             "spool and an inbox; stop it first (systemctl stop medsendx-edge)") from None
    except OSError:
        os.close(fd)
        if folder == state:
            raise
        return None
    return fd


class Signals:
    """Signals, read by the main thread in its own time: the Python handler does nothing at all.

    A Python signal handler runs between two bytecodes of the main thread, which may hold a lock just then:
    structlog's write lock (a SIGTERM during start-up hung the daemon for good, 2 starts in 40 here, and CI
    once: the handler logged "signal_received" while the main thread was logging), or an Event's condition.
    The C-level wakeup fd (:func:`signal.set_wakeup_fd`, as asyncio does it) writes each signal's number to a
    pipe, and :meth:`wait` returns them.  Main thread only."""

    def __init__(self, *signums: signal.Signals) -> None:
        self._r, self._w = os.pipe()
        for fd in (self._r, self._w):
            os.set_blocking(fd, False)
        self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._old = {sig: signal.signal(sig, _recorded) for sig in signums}

    def wait(self, timeout: float) -> list[int]:
        """The signals received since the last call, waiting up to ``timeout`` seconds for one."""
        select.select([self._r], [], [], timeout)
        try:
            return list(os.read(self._r, 4096))
        except BlockingIOError:
            return []

    def close(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._old_fd)
        os.close(self._r)
        os.close(self._w)


def _recorded(signum: int, frame: Any) -> None:
    """The wakeup fd has the signal: nothing to do here (see :class:`Signals`)."""


def wait_for_inbox(cfg: Config, poll_s: float = 5.0) -> bool:
    """The unit may start before the inbox share is mounted (a truck boots before its NAS): wait for it
    instead of failing (a failing start loop ends in systemd's start limit), telling systemd why (STATUS),
    keeping the start timeout and the watchdog fed, and ending promptly on SIGTERM.  Returns False when
    stopped while waiting."""
    errors, _warnings = path_problems(cfg)
    if not errors:
        return True
    signals = Signals(signal.SIGTERM, signal.SIGINT)
    log = get_logger()
    release_gc(log)   # the wait may take hours: not without the collector
    log.warning("waiting_for_inbox", reason="; ".join(errors))
    try:
        while errors:
            notify(f"STATUS=waiting for the inbox: {errors[0][:200]}\nEXTEND_TIMEOUT_USEC={int(3 * poll_s * 1e6)}"
                   "\nWATCHDOG=1")
            if signals.wait(poll_s):
                log.info("signal_received", reason="stopped while waiting for the inbox")
                return False
            errors, _warnings = path_problems(cfg)
        log.info("inbox_available", path=str(cfg.inbox))
        return True
    finally:
        signals.close()


def runtime_dir() -> Path | None:
    """The daemon's runtime directory: systemd's $RUNTIME_DIRECTORY, else $MEDSENDX_EDGE_RUNTIME_DIR."""
    value = os.environ.get("MEDSENDX_EDGE_RUNTIME_DIR") or os.environ.get("RUNTIME_DIRECTORY")
    return Path(value.split(":")[0]) if value else None

def record_runtime(cfg: Config, config_path: Path | None, log: Any) -> None:
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
            "spool_dir": str(cfg.spool_dir), "inbox": str(cfg.inbox), "pid": os.getpid(),
            "config": str(config_path) if config_path else None, "started": time.time()})
    except OSError as exc:   # never a reason not to run
        log.warning("runtime_record_failed", error_class=type(exc).__name__)


def one_blas_thread() -> None:
    """numpy's BLAS (OpenBLAS: the triage's small matrix products and line fits) in one thread, unless the
    operator set ``OPENBLAS_NUM_THREADS`` to another number: the daemon runs images side by side (``triage.threads``),
    and OpenBLAS's own threads spin while they wait for work.  Measured in ``benchmarks/bench_e2e.py``
    (20 mammograms, 2 cores): 1.6 s of the process's 8.0 s of CPU were those threads spinning; the
    whole run took 5.9 s instead of 6.6 s without them."""
    if os.environ.get("OPENBLAS_NUM_THREADS", "1") != "1":
        return   # the operator's choice (the CLI sets 1 before numpy loads, unless one was set)
    os.environ["OPENBLAS_NUM_THREADS"] = "1"   # a BLAS library loaded later (scipy's) reads it
    import numpy  # noqa: F401 - the BLAS library threadpoolctl limits must be loaded
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

    threadpool_limits(limits=1, user_api="blas")


# --------------------------------------------------------------------------- the collector at start
_gc_lock = threading.Lock()
_gc_held = False
_gc_held_at = 0.0

#: The longest the start may hold the collector (a warm-up that never ends must not leave it off for good).
GC_HOLD_MAX_S = 60.0


def hold_gc() -> None:
    """``run``'s start without Python's cyclic garbage collector, until :func:`release_gc`.

    The start makes about 375,000 objects that live as long as the process (the modules, pydicom's
    dictionaries, highdicom's 22 MB of DICOM tables decoded by the triage's warm-up; about 200,000 since
    only the tables' part our SRs read is decoded, triage/hdtables.py) and almost no garbage
    (about 730 unreachable objects when the warm-up ends).  With the collector on, its thresholds fired 4
    full collections and 48 middle ones on the way, each walking everything made so far: 230-380 ms of a
    20-mammogram ``run --once``, all of it holding the interpreter lock while the first files wait to be
    anonymized and triaged (benchmarks/bench_e2e.py; 10-20 ms with the start held, the run 0.2-1.0 s
    shorter in each of 6 rounds of two pairs, alternated).  ``cmd_run`` calls it first; nothing else does."""
    global _gc_held, _gc_held_at
    with _gc_lock:
        if gc.isenabled():
            gc.disable()
            _gc_held, _gc_held_at = True, time.monotonic()


def release_gc(log: Any = None) -> int | None:
    """The start is loaded: what lives now is frozen (moved out of the collector's reach for good, so a later
    full collection no longer walks the tables either) and the collector runs again; said in ``log`` as
    ``collector_resumed``.  Returns how many objects were frozen; None when :func:`hold_gc` did not hold it
    (a test's daemon, a second call).  Released by the triage's warm-up when it ends (or at once with triage
    off), by :func:`wait_for_inbox` before it waits, and by the daemon's loops through
    :func:`release_gc_if_overdue` whatever else happened."""
    global _gc_held
    with _gc_lock:
        if not _gc_held:
            return None
        _gc_held = False
        gc.freeze()
        gc.enable()
        frozen = gc.get_freeze_count()
    if log is not None:
        log.info("collector_resumed", count=frozen)
    return frozen


def gc_held() -> bool:
    return _gc_held


def release_gc_if_overdue(log: Any = None) -> int | None:
    """:func:`release_gc` once the start has held the collector :data:`GC_HOLD_MAX_S` (the daemon's loops ask
    at every pass: one comparison while nothing is held)."""
    if _gc_held and time.monotonic() - _gc_held_at > GC_HOLD_MAX_S:
        return release_gc(log)
    return None
