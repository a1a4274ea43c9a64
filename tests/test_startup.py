"""Before the daemon runs (startup.py): secret files refused or warned about, the runtime record that
``status`` falls back on, and the wait for an inbox share that is not mounted yet."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

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


@pytest.fixture
def held_gc():
    """The collector as ``run`` holds it at its first line (startup.hold_gc), and the process's collector as it
    was afterwards, whatever the test did: on, nothing frozen, nothing held."""
    import gc

    from medsendx_edge import startup

    assert gc.isenabled() and not startup.gc_held()
    startup.hold_gc()
    try:
        yield startup
    finally:
        startup._gc_held = False
        gc.unfreeze()
        gc.enable()


def test_the_start_is_held_from_the_collector_then_frozen_and_released_once(held_gc, log_lines):
    """startup.hold_gc / release_gc: the collector off for the start, then what the start made frozen (out of
    every later collection's walk) and the collector on again, once, said in the log; a collector someone
    else turned off, or never held (a test's daemon), is left as it is."""
    import gc

    before = gc.get_freeze_count()
    assert not gc.isenabled() and held_gc.gc_held()
    frozen = held_gc.release_gc(get_logger())
    assert gc.isenabled() and frozen is not None and frozen > before and not held_gc.gc_held()
    assert held_gc.release_gc(get_logger()) is None and gc.isenabled()
    said = [json.loads(x) for x in log_lines.getvalue().splitlines()]
    assert [e["count"] for e in said if e["event"] == "collector_resumed"] == [frozen]
    gc.disable()
    try:
        held_gc.hold_gc()
        assert held_gc.release_gc() is None and not gc.isenabled()
    finally:
        gc.enable()


def test_a_daemon_waiting_for_its_inbox_share_waits_with_the_collector(tmp_path, held_gc, log_lines):
    """``run`` before the modality's share is mounted may wait for hours: the collector is given back first (the
    share's folder there but not mounted, a review's case, as well as no folder at all)."""
    import gc

    from medsendx_edge.config import replace as cfg_replace

    cfg = cfg_replace(make_config(tmp_path, inbox_dir=tmp_path / "share" / "inbox"), inbox_require_mount=True)
    cfg.inbox.mkdir(parents=True)   # the mount point's empty folder: not mounted
    seen = []

    def watch() -> None:   # once the wait has begun (its SIGTERM handler is in place by then): look, then stop it
        deadline = time.monotonic() + 60
        while held_gc.gc_held() and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(gc.isenabled())
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert wait_for_inbox(cfg, poll_s=0.05) is False   # stopped while waiting
    finally:
        watcher.join()
    assert seen == [True] and not held_gc.gc_held()
    events = [json.loads(x)["event"] for x in log_lines.getvalue().splitlines()]
    assert events.index("collector_resumed") < events.index("waiting_for_inbox")


def test_a_warm_up_that_never_ends_holds_the_collector_no_longer_than_the_bound(tmp_path, held_gc, monkeypatch):
    """The warm-up gives the collector back when it ends; one that never ends (an import stuck on a dead file
    system) must not leave it off for the daemon's life: its loops give it back after GC_HOLD_MAX_S."""
    import gc

    from medsendx_edge.daemon import Daemon

    d = Daemon(make_config(tmp_path))
    d.tick()
    assert not gc.isenabled(), "given back before the bound"
    monkeypatch.setattr(held_gc, "_gc_held_at", held_gc._gc_held_at - held_gc.GC_HOLD_MAX_S - 1)
    d.tick()
    assert gc.isenabled() and not held_gc.gc_held()
    held_gc.hold_gc()
    monkeypatch.setattr(held_gc, "_gc_held_at", held_gc._gc_held_at - held_gc.GC_HOLD_MAX_S - 1)
    assert d.process_pipeline() == 0 and gc.isenabled(), "the pipeline's loop gives it back too"


@pytest.mark.parametrize("triage,sr", [(True, False), (False, False), (True, True)])
def test_run_once_resumes_the_collector_after_its_start(tmp_path, triage, sr):
    """``run --once`` holds the collector through its imports and the triage's warm-up, then resumes it with
    the start's objects frozen (its log says how many), once, with triage on or off; with the SR on, the
    warm-up says the SR reads highdicom's table extract (triage/hdtables.py)."""
    from conftest import age_files, run_cli, write_yaml_config
    from medsendx_edge.synthetic import synthetic_mammogram

    conf = write_yaml_config(tmp_path, triage={"enabled": triage, "send_sr": sr})
    inbox = tmp_path / "spool" / "inbox"
    inbox.mkdir(parents=True)
    ds, _ = synthetic_mammogram(64, 48)
    ds.save_as(inbox / "a.dcm", enforce_file_format=True)
    age_files(inbox)
    proc = run_cli("run", "--once", "--config", str(conf))
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    names = [e.get("event") for e in events]
    resumed = [e for e in events if e.get("event") == "collector_resumed"]
    assert len(resumed) == 1 and resumed[0]["count"] > 50_000
    # after the start's recovery, not at the imports; with triage on, at the warm-up's end
    assert names.index("spool_recovered") < names.index("collector_resumed")
    if triage:
        assert names.index("collector_resumed") < names.index("triage_warmed")
        warmed = events[names.index("triage_warmed")]
        assert warmed.get("tables") == ("extract" if sr else None), warmed
    delivered = [i for i, e in enumerate(events) if e.get("event") == "file_delivered"]
    assert delivered, "the file was not delivered"
