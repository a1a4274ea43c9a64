"""Before the daemon runs (startup.py): secret files refused or warned about, the runtime record that
``status`` falls back on, and the wait for an inbox share that is not mounted yet."""

from __future__ import annotations

import json
import threading

import pytest

from conftest import make_config, write_password
from medsendx_edge.config import DestinationConfig, replace
from medsendx_edge.errors import ConfigError
from medsendx_edge.logs import get_logger
from medsendx_edge.startup import RUNTIME_FILE, check_secrets, record_runtime, wait_for_inbox


def test_a_secret_open_to_every_user_is_refused_and_a_group_readable_one_warned_about(tmp_path, log_lines):
    pw = write_password(tmp_path, "s3cret")
    cfg = replace(make_config(tmp_path), destination=DestinationConfig(
        kind="dicomweb", path=None, url="http://127.0.0.1:9/x", password_file=pw))
    pw.chmod(0o604)
    with pytest.raises(ConfigError, match="destination.password_file: .* open to every user"):
        check_secrets(cfg, get_logger())
    pw.chmod(0o640)
    check_secrets(cfg, get_logger())
    line = next(json.loads(x) for x in log_lines.getvalue().splitlines() if "secret_file_permissions" in x)
    assert line["key"] == "destination.password_file" and "s3cret" not in log_lines.getvalue()


def test_the_runtime_record_holds_paths_only(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSENDX_EDGE_RUNTIME_DIR", str(tmp_path / "run"))
    cfg = make_config(tmp_path)
    record_runtime(cfg, tmp_path / "medsendx-edge.yaml", get_logger())
    rec = json.loads((tmp_path / "run" / RUNTIME_FILE).read_text())
    assert rec["spool_dir"] == str(cfg.spool_dir) and rec["config"].endswith("medsendx-edge.yaml")
    assert set(rec) == {"spool_dir", "inbox", "pid", "config", "started"}


def test_run_waits_for_the_inbox_and_starts_when_it_appears(tmp_path, log_lines):
    cfg = make_config(tmp_path, inbox_dir=tmp_path / "share" / "inbox")   # the modality's share, not mounted yet
    assert not cfg.inbox.exists()
    appeared = threading.Timer(0.3, lambda: cfg.inbox.mkdir(parents=True))
    appeared.start()
    try:
        assert wait_for_inbox(cfg, poll_s=0.05) is True
    finally:
        appeared.cancel()
    events = [json.loads(x)["event"] for x in log_lines.getvalue().splitlines()]
    assert events.count("waiting_for_inbox") == 1 and events[-1] == "inbox_available"


def test_the_start_is_held_from_the_collector_then_frozen_and_released_once():
    """startup.hold_gc / release_gc: the collector off for the start, then what the start made frozen (out of
    every later collection's walk) and the collector on again, once; a collector someone else turned off, or
    never held (a test's daemon), is left as it is."""
    import gc

    from medsendx_edge import startup

    assert gc.isenabled()
    before = gc.get_freeze_count()
    try:
        startup.hold_gc()
        assert not gc.isenabled()
        frozen = startup.release_gc()
        assert gc.isenabled() and frozen is not None and frozen > before
        assert startup.release_gc() is None and gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()
    gc.disable()
    try:
        startup.hold_gc()
        assert startup.release_gc() is None and not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize("triage", [True, False])
def test_run_once_resumes_the_collector_after_its_start(tmp_path, triage):
    """``run --once`` holds the collector through its imports and the triage's warm-up, then resumes it with
    the start's objects frozen (its log says how many), once, with triage on or off."""
    from conftest import age_files, run_cli, write_yaml_config
    from medsendx_edge.synthetic import synthetic_mammogram

    conf = write_yaml_config(tmp_path, triage={"enabled": triage, "send_sr": False})
    inbox = tmp_path / "spool" / "inbox"
    inbox.mkdir(parents=True)
    ds, _ = synthetic_mammogram(64, 48)
    ds.save_as(inbox / "a.dcm", enforce_file_format=True)
    age_files(inbox)
    proc = run_cli("run", "--once", "--config", str(conf))
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    resumed = [e for e in events if e.get("event") == "collector_resumed"]
    assert len(resumed) == 1 and resumed[0]["count"] > 50_000
    delivered = [i for i, e in enumerate(events) if e.get("event") == "file_delivered"]
    assert delivered, "the file was not delivered"
