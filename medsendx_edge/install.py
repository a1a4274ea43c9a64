"""``medsendx-edge install``: a truck without containers, in one idempotent command (docs/install.md).

Run from the venv the package is installed in (``/opt/medsendx-edge/bin/medsendx-edge install``):

* the service user (a system user, made when missing), the state folder with its ``secrets/`` (0700) and
  the configuration folder;
* a configuration file when there is none (absolute paths under the state folder; never overwritten);
* the systemd unit, written for this venv, this configuration and this user;
* with ``--wheel``: an upgrade (or a rollback) of this venv to that wheel.  First a backup of the spool's
  databases (state, linkage, exams: SQLite's online backup, consistent while the daemon runs) into
  ``<state>/backups/<installed version>-<UTC time>/``; then pip; then the new release's ``check-config``
  on the configuration.  The site secret, the linkage key, the spool and the configuration are never
  touched: the pseudonyms stay the same and every queued file goes on where it was.  The new release
  migrates the databases when it starts; an older release refuses a database a newer one migrated
  (:class:`~medsendx_edge.errors.StateVersionError`), and this backup is what a rollback restores.
"""

from __future__ import annotations

import os
import pwd
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path

import yaml

from medsendx_edge.errors import MedSendXError

DATABASES = ("state/state.db", "state/linkage.db", "state/exams.db")


class InstallError(MedSendXError):
    """The install cannot go on (a step failed): the message says which and why."""


@dataclass
class Installed:
    version: str
    previous: str | None
    done: list[str] = field(default_factory=list)
    backup: Path | None = None


def installed_version(prefix: Path) -> str | None:
    """The version of medsendx-edge in the venv at ``prefix`` (None when it has none)."""
    python = prefix / "bin" / "python"
    if not python.exists():
        return None
    out = subprocess.run([str(python), "-c", "from importlib import metadata; print(metadata.version('medsendx-edge'))"],
                         capture_output=True, text=True)
    return out.stdout.strip() or None if out.returncode == 0 else None


def default_config(state_dir: Path) -> dict[str, object]:
    return {"spool_dir": str(state_dir / "spool"),
            "destination": {"kind": "directory", "path": str(state_dir / "archive")},
            "anonymize": {"secret_file": str(state_dir / "secrets" / "site-secret.key"),
                          "linkage_key_file": str(state_dir / "secrets" / "linkage.key")},
            "log": {"format": "json"}}


def unit_text(prefix: Path, config: Path, state_dir: Path, user: str) -> str:
    """The shipped unit, for this venv, configuration, state folder and user."""
    text = resources.files("medsendx_edge.data").joinpath("medsendx-edge.service").read_text()
    text = text.replace("/opt/medsendx-edge/bin/medsendx-edge", str(prefix / "bin" / "medsendx-edge"))
    text = text.replace("/etc/medsendx-edge/medsendx-edge.yaml", str(config))
    text = text.replace("/var/lib/medsendx-edge", str(state_dir))
    text = text.replace("User=medsendx", f"User={user}").replace("Group=medsendx", f"Group={user}")
    return text


def backup_databases(spool: Path, dest: Path) -> list[str]:
    """SQLite's online backup of each of the spool's databases into ``dest`` (consistent while they are in
    use); returns the names copied."""
    copied = []
    for rel in DATABASES:
        src = spool / rel
        if not src.exists():
            continue
        dest.mkdir(parents=True, exist_ok=True, mode=0o700)
        with sqlite3.connect(src) as a, sqlite3.connect(dest / src.name) as b:
            a.backup(b)
        os.chmod(dest / src.name, 0o600)
        copied.append(rel)
    return copied


def _ensure_user(user: str, home: Path, done: list[str]) -> tuple[int, int]:
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        if os.geteuid() != 0:
            raise InstallError(f"the user {user} does not exist and only root can make it") from None
        subprocess.run(["useradd", "--system", "--home-dir", str(home), "--shell", "/usr/sbin/nologin", user],
                       check=True)
        pw = pwd.getpwnam(user)
        done.append(f"made the system user {user}")
    return pw.pw_uid, pw.pw_gid


def _dir(path: Path, mode: int, uid: int, gid: int, done: list[str]) -> None:
    if not path.is_dir():
        path.mkdir(parents=True, mode=mode)
        done.append(f"made {path}")
    os.chmod(path, mode)
    if os.geteuid() == 0:
        os.chown(path, uid, gid)


def install(*, prefix: Path, user: str, config_dir: Path, state_dir: Path, unit_dir: Path | None,
            wheel: Path | None = None, find_links: tuple[Path, ...] = (), no_index: bool = False) -> Installed:
    done: list[str] = []
    previous = installed_version(prefix)
    uid, gid = _ensure_user(user, state_dir, done)
    _dir(state_dir, 0o750, uid, gid, done)
    _dir(state_dir / "secrets", 0o700, uid, gid, done)
    config_dir.mkdir(parents=True, exist_ok=True)
    config = config_dir / "medsendx-edge.yaml"
    if not config.exists():
        config.write_text("# written by medsendx-edge install: edit, then medsendx-edge check-config this file\n"
                          + yaml.safe_dump(default_config(state_dir), sort_keys=False))
        os.chmod(config, 0o640)
        if os.geteuid() == 0:
            os.chown(config, 0, gid)
        done.append(f"wrote {config}")
    backup = None
    if wheel is not None:
        spool = Path(str((yaml.safe_load(config.read_text()) or {}).get("spool_dir") or state_dir / "spool"))
        if not spool.is_absolute():
            spool = (config_dir / spool).resolve()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        backup = state_dir / "backups" / f"{previous or 'none'}-{stamp}"
        copied = backup_databases(spool, backup)
        if copied:
            done.append(f"backed up {', '.join(copied)} to {backup}")
        else:
            backup = None
        if not (prefix / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(prefix)], check=True)
        cmd = [str(prefix / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               *(["--no-index"] if no_index else []), *(f"--find-links={d}" for d in find_links), str(wheel)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise InstallError(f"pip could not install {wheel.name}: {run.stderr.strip()[-800:]}")
        done.append(f"installed {wheel.name} into {prefix}")
        check = subprocess.run([str(prefix / "bin" / "medsendx-edge"), "check-config", str(config)],
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise InstallError(f"the installed release refuses {config}: {check.stderr.strip()}")
    if unit_dir is not None:
        unit = unit_dir / "medsendx-edge.service"
        text = unit_text(prefix, config, state_dir, user)
        if not unit.exists() or unit.read_text() != text:
            unit_dir.mkdir(parents=True, exist_ok=True)
            unit.write_text(text)
            done.append(f"wrote {unit} (systemctl daemon-reload, then systemctl enable --now medsendx-edge)")
    version = installed_version(prefix) or metadata.version("medsendx-edge")
    return Installed(version, previous, done, backup)
