"""``medsendx-edge apply-config NEW --config CURRENT``: the path of a configuration edited remotely.

Ops edit the YAML away from the truck and copy it over (ssh, a fleet tool); this command puts it in
place without a window where the daemon could read half a file or a file it would refuse:

1. ``NEW`` is checked as ``check-config`` checks (the schema, the secrets' files and modes, the paths):
   refused, nothing changes;
2. the current file is kept as ``CURRENT.previous`` (the rollback), then ``NEW``'s bytes replace
   ``CURRENT`` atomically (temp name, fsync, rename, fsync the folder), its mode kept (with
   ``--rollback`` the two swap: the current file becomes ``.previous``);
3. the running daemon (its runtime record: pid and config path) gets SIGHUP, and the command waits for
   the daemon to say which file it runs on (the state database: the file's SHA-256 once applied, or the
   reason it refused it).  A refusal puts the previous file back, so the next start does not fail on it.

``--rollback`` applies ``CURRENT.previous`` the same way.  Without a running daemon the file waits for
the next start.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from medsendx_edge.config import Config, load_config
from medsendx_edge.errors import ConfigError
from medsendx_edge.fsutil import atomic_write
from medsendx_edge.vocabulary import StateKey


@dataclass
class Applied:
    outcome: str            # "applied" | "rejected" | "no daemon" | "not confirmed"
    detail: str


def check(path: Path) -> Config:
    """What ``check-config`` checks; ConfigError with every problem."""
    from medsendx_edge.config import missing_file_problems, path_problems, secret_problems

    cfg = load_config(path)
    errors, _warnings = secret_problems(cfg)
    errors += missing_file_problems(cfg)
    errors += path_problems(cfg)[0]
    if errors:
        raise ConfigError("; ".join(errors))
    return cfg


def _running_daemon(current: Path) -> tuple[int, Path] | None:
    """The pid and the spool of the daemon running on ``current`` (its runtime record), else None."""
    from medsendx_edge.startup import RUNTIME_FILE, runtime_dir

    where = runtime_dir() or Path("/run/medsendx-edge")
    try:
        rec = json.loads((where / RUNTIME_FILE).read_text())
        pid = int(rec["pid"])
        if Path(str(rec.get("config") or "")).resolve() != current.resolve():
            return None
        os.kill(pid, 0)
        return pid, Path(str(rec["spool_dir"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _after(stamp: str, told: float) -> bool:
    try:
        return float(stamp) >= told   # the daemon records on this machine's clock, after the SIGHUP
    except ValueError:
        return False


def _place(current: Path, data: bytes) -> None:
    mode = current.stat().st_mode & 0o777 if current.exists() else 0o640
    atomic_write(current, lambda fh: fh.write(data))
    os.chmod(current, mode)


def apply(new: Path, current: Path, *, wait_s: float = 30.0, rollback: bool = False) -> Applied:
    previous = current.with_name(current.name + ".previous")
    source = previous if rollback else new
    if not source.exists():
        raise ConfigError(f"{source}: no such file" + (" (nothing to roll back to)" if rollback else ""))
    check(source)
    data = source.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    old = current.read_bytes() if current.exists() else None
    kept = previous.read_bytes() if previous.exists() else None
    if old is not None:
        _place(previous, old)
    _place(current, data)
    running = _running_daemon(current)
    state_db = running[1] / "state" / "state.db" if running else None
    if running is None or state_db is None or not state_db.exists():
        return Applied("no daemon", f"{current} is in place; no daemon runs on it now: it applies at the next start")
    pid = running[0]
    from medsendx_edge.state import StateDB

    # the daemon's own spool (the new file may name another one: the daemon records in the one it runs on)
    state = StateDB(state_db)
    try:
        told = time.time()
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if state.get(StateKey.CONFIG_APPLIED) == digest:
                pending = state.get(StateKey.RESTART_PENDING)
                return Applied("applied", f"the daemon (pid {pid}) runs on {current} now"
                               + (f"; these keys wait for a restart: {pending}" if pending else ""))
            digest_at, _, rest = (state.get(StateKey.CONFIG_REJECTED) or "").partition(" ")
            at, _, reason = rest.partition(" ")
            if digest_at == digest and _after(at, told):   # this reload's answer, not an older one's
                if old is not None:   # as it was: the file the daemon runs on, and the rollback
                    _place(current, old)
                    if kept is not None:
                        _place(previous, kept)
                    else:
                        previous.unlink(missing_ok=True)
                return Applied("rejected", f"the daemon (pid {pid}) refused it and runs on the previous one, put "
                                           f"back in {current}: {reason}")
            time.sleep(0.2)
        return Applied("not confirmed", f"{current} is in place and the daemon (pid {pid}) was told; it has not "
                                        f"confirmed within {wait_s:.0f} s (see its log: config_reloaded)")
    finally:
        state.close()
