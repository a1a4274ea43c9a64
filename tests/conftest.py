from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pydicom.data
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from medsendx_edge.config import (AnonymizeConfig, Config, DestinationConfig, LogConfig, TriageConfig,
                                  UploadConfig, WatchConfig)
from medsendx_edge.logs import configure_logging

PYDICOM_TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def all_pydicom_files() -> list[Path]:
    """Every file pydicom bundles (176 in pydicom 3.0.2), DICOM or not."""
    out = []
    for dirpath, dirnames, filenames in os.walk(PYDICOM_TEST_FILES):
        dirnames.sort()
        out.extend(Path(dirpath) / f for f in sorted(filenames))
    return out


def make_config(tmp: Path, **over) -> Config:
    anon = over.pop("anonymize", {})
    return Config(
        station_name=over.pop("station_name", "MOBILE_CLINIC_01"),
        spool_dir=tmp / "spool",
        watch=over.pop("watch", WatchConfig(mode="native", stable_seconds=0.05, rescan_seconds=1)),
        destination=over.pop("destination", DestinationConfig(kind="directory", path=tmp / "archive")),
        upload=over.pop("upload", UploadConfig(initial_backoff_s=0.05, max_backoff_s=0.5)),
        log=LogConfig(format="json", level="debug"),
        # the Mammography CAD SR is an extra instance per mammogram: off where a test counts deliveries
        # (tests/test_triage_report.py turns it on)
        triage=over.pop("triage", TriageConfig(send_sr=False)),
        anonymize=AnonymizeConfig(secret_file=tmp / "secrets" / "site.key",
                                  linkage_key_file=tmp / "secrets" / "linkage.key", **anon),
        **over,
    )


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
def log_lines():
    """JSON log lines captured for the test (a list of raw strings)."""
    buf = io.StringIO()
    configure_logging("debug", "json", stream=buf)
    yield buf
    configure_logging("info", "json")


# --------------------------------------------------------------------------- a real PACS
from orthanc_server import DICOMWEB_PLUGIN, ORTHANC, OrthancServer  # noqa: E402


def require(*tools: str, package: str) -> None:
    """A system program the test needs: a clear skip locally, a failure in CI (where `make test`
    installs every Debian package, so a missing one is a broken set-up, not a reason to skip)."""
    missing = [t for t in tools if shutil.which(t) is None and not Path(t).exists()]
    if missing:
        msg = f"{', '.join(missing)} missing: apt-get install {package} (make test installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture
def orthanc(tmp_path):
    require(ORTHANC, DICOMWEB_PLUGIN, package="orthanc orthanc-dicomweb")
    server = OrthancServer(tmp_path / "orthanc", feed=True)   # wait_stored: Orthanc's own event, no polling
    yield server
    server.stop()


def write_password(tmp: Path, password: str) -> Path:
    p = tmp / "secrets" / "pacs-password"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(password + "\n")
    p.chmod(0o600)
    return p


# --------------------------------------------------------------------------- shared helpers
def age_files(root: Path) -> None:
    old = time.time() - 3600  # files that have sat in the inbox for an hour
    for dirpath, _d, files in os.walk(root):
        for f in files:
            os.utime(os.path.join(dirpath, f), (old, old), follow_symlinks=False)


def write_yaml_config(tmp_path: Path, **extra) -> Path:
    cfg = make_config(tmp_path)
    data = {
        "station_name": "MOBILE_CLINIC_01",
        "spool_dir": str(cfg.spool_dir),
        "watch": {"mode": "native", "stable_seconds": 0.1, "rescan_seconds": 1},
        "destination": {"kind": "directory", "path": str(tmp_path / "archive")},
        "upload": {"initial_backoff_s": 0.05, "max_backoff_s": 0.2},
        "log": {"format": "json", "level": "info"},
        "triage": {"send_sr": False},
        "anonymize": {"secret_file": str(cfg.anonymize.secret_file),
                      "linkage_key_file": str(cfg.anonymize.linkage_key_file)},
    }
    for k, v in extra.items():
        data[k] = v
    path = tmp_path / "medsendx-edge.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medsendx_edge.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def run_killed_at(work: Callable[[], object], kill_at: int) -> int:
    """Fork a child that runs ``work`` and freezes at its ``kill_at``-th file-system step (every rename,
    replace, fsync, unlink and open for writing, in any of its threads), then SIGKILL it.  With
    ``kill_at`` 0 the child runs to the end; returns the number of steps it took (0 when killed)."""
    import builtins
    import signal
    import threading

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(rfd)
        lock = threading.Lock()
        steps = [0]

        def step() -> None:
            with lock:
                steps[0] += 1
                hit = kill_at and steps[0] == kill_at
            if hit:
                os.write(wfd, b"F")
                while True:  # frozen for good: no thread of this process runs again before the SIGKILL
                    os.kill(os.getpid(), signal.SIGSTOP)

        def wrap(fn: Callable[..., object]) -> Callable[..., object]:
            def inner(*a: object, **k: object) -> object:
                step()
                return fn(*a, **k)
            return inner

        for attr in ("rename", "replace", "fsync", "unlink"):
            setattr(os, attr, wrap(getattr(os, attr)))
        real_open = builtins.open

        def counting_open(file, mode="r", *a, **k):  # type: ignore[no-untyped-def]
            if any(ch in mode for ch in "wax"):
                step()
            return real_open(file, mode, *a, **k)

        builtins.open = counting_open  # type: ignore[assignment]
        try:
            work()
            os.write(wfd, str(steps[0]).encode())
        finally:
            os._exit(0)
    os.close(wfd)
    msg = os.read(rfd, 64)
    if msg.startswith(b"F"):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(rfd)
    assert msg.startswith(b"F") or msg.isdigit(), msg
    return 0 if msg.startswith(b"F") else int(msg)



# --------------------------------------------------------------------------- a real PostgreSQL
@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server of Debian's package, its own cluster (tests/pgserver.py); yields its DSN."""
    from pgserver import PostgresServer, pg_bindir

    if pg_bindir() is None:
        require("/usr/lib/postgresql/15/bin/initdb", package="postgresql")
    server = PostgresServer()
    try:
        yield server.dsn
    finally:
        server.stop()


# --------------------------------------------------------------------------- a real browser
@pytest.fixture
def browser():
    require("chromium", "chromedriver", package="chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900",
                "--disable-gpu", "--no-proxy-server"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    yield driver
    driver.quit()
