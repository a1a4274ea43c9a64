"""The daemon end to end: every bundled pydicom file, bad input, logs without PHI, CLI, SIGTERM."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom

from conftest import PYDICOM_TEST_FILES, age_files, all_pydicom_files, make_config, run_killed_at, write_yaml_config
from phi_corpus import Markers, build_corpus
from medsendx_edge.anonymize.stage import Anonymizer, AnonymizeStage
from medsendx_edge.daemon import Daemon
from medsendx_edge.config import DestinationConfig, TriageConfig
from medsendx_edge.spool import ANONYMIZED, INCOMING, OUTBOX, QUARANTINE, SENT, TRIAGED, Spool
from medsendx_edge.stage import Outcome, Runner
from medsendx_edge.synthetic import synthetic_mammogram


def _outcomes(spool: Spool) -> tuple[list[str], dict[str, str]]:
    sent = spool.ready(SENT)
    reasons = {item_id: spool.reason(stage, item_id)["reason"] for stage, item_id in spool.quarantined()}
    return sent, reasons


def test_every_bundled_pydicom_file_ends_delivered_or_quarantined(tmp_path):
    cfg = make_config(tmp_path)
    inbox = cfg.inbox
    shutil.copytree(PYDICOM_TEST_FILES, inbox)
    files = all_pydicom_files()
    assert len(files) == 176
    age_files(inbox)
    daemon = Daemon(cfg)
    assert daemon.run_once() == 0
    sent, reasons = _outcomes(daemon.spool)
    assert len(sent) + len(reasons) == len(files)
    assert all(reasons.values())
    assert len(sent) >= 90
    # an exact copy of an instance already delivered is recorded (sent/, state duplicate), never sent twice
    copies = daemon.spool.state.count_state("duplicate")
    assert len(list((tmp_path / "archive").iterdir())) == len(sent) - copies
    assert [p for p in inbox.rglob("*") if p.is_file() and ".queue" not in p.parts] == []
    # The archive holds anonymized, readable DICOM only.
    for p in (tmp_path / "archive").iterdir():
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        assert ds.PatientIdentityRemoved == "YES"


def test_bad_input_is_quarantined_with_a_clear_reason(tmp_path):
    cfg = make_config(tmp_path)
    inbox = cfg.inbox
    inbox.mkdir(parents=True)
    good, _ = synthetic_mammogram(32, 24)
    good.save_as(inbox / "good.dcm", enforce_file_format=True)
    (inbox / "zero.dcm").write_bytes(b"")
    (inbox / "notes.txt").write_text("not dicom at all\n")
    data = (inbox / "good.dcm").read_bytes()
    (inbox / "truncated.dcm").write_bytes(data[: len(data) - 300])
    shutil.copyfile(PYDICOM_TEST_FILES / "no_meta.dcm", inbox / "nometa.dcm")
    outside = tmp_path / "outside.dcm"
    outside.write_bytes(data)
    os.symlink(outside, inbox / "link.dcm")
    os.mkfifo(inbox / "pipe.dcm")
    age_files(inbox)
    daemon = Daemon(cfg)
    assert daemon.run_once() == 0
    sent, reasons = _outcomes(daemon.spool)
    assert len(sent) == 1
    got = sorted(reasons.values())
    expected = ["empty file", "not a DICOM Part 10 file", "not a DICOM Part 10 file", "truncated",
                "symbolic link", "not a regular file"]
    for e in expected:
        assert any(r.startswith(e) for r in got), (e, got)
    assert len(got) == len(expected)
    assert outside.read_bytes() == data  # the target of the link was never touched


def test_a_file_changing_while_read_is_retried(tmp_path, monkeypatch):
    cfg = make_config(tmp_path)
    spool = Spool(cfg.spool_dir, cfg.inbox)
    spool.ensure_layout()
    ds, _ = synthetic_mammogram(32, 24)
    src = cfg.inbox / "img.dcm"
    ds.save_as(src, enforce_file_format=True)
    item_id = spool.adopt(src)
    anonymizer = Anonymizer(cfg)
    real_write = anonymizer.write
    calls = {"n": 0}

    def write_while_modality_appends(prepared, fh):
        calls["n"] += 1
        if calls["n"] == 1:
            with open(prepared.split.path, "ab") as f:
                f.write(b"\0\0")
        real_write(prepared, fh)

    monkeypatch.setattr(anonymizer, "write", write_while_modality_appends)
    runner = Runner(AnonymizeStage(spool, anonymizer), retry_delay_s=0)
    item = spool.claim(INCOMING, item_id)
    assert runner.handle(item).outcome is Outcome.RETRY_LATER
    assert spool.ready(INCOMING) == [item_id] and spool.ready("anonymized") == []
    item = spool.claim(INCOMING, item_id)
    # The trailing zeros now make it a different file: it is read again from scratch.
    assert runner.handle(item).outcome in (Outcome.DONE, Outcome.QUARANTINE)


def test_no_patient_data_in_logs_state_or_names(tmp_path, log_lines):
    mk = Markers()
    srcs = [PYDICOM_TEST_FILES / n for n in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "test-SR.dcm",
                                                "JPEG2000.dcm")]
    build_corpus(srcs, tmp_path / "corpus", mk)
    cfg = make_config(tmp_path)
    shutil.copytree(tmp_path / "corpus", cfg.inbox)
    # Bad files with PHI in their names and bodies.
    (cfg.inbox / f"{mk.t()}_broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + mk.t().encode() * 10)
    age_files(cfg.inbox)
    daemon = Daemon(cfg)
    assert daemon.run_once() == 0
    logs = log_lines.getvalue()
    assert "file_received" in logs and "file_processed" in logs and "file_delivered" in logs
    pattern = re.compile(r"ZQX\d{5}|(?<![0-9.])1887\d{4}")
    assert pattern.findall(logs) == []
    for line in logs.splitlines():
        json.loads(line)  # JSON lines
    for dirpath, dirnames, files in os.walk(cfg.spool_dir):
        if Path(dirpath) == cfg.inbox:  # the modality's own folder names; ours start at .queue
            dirnames[:] = [d for d in dirnames if d == ".queue"]
            files = []
        for name in dirnames + files:
            assert not pattern.search(name), name
    for f in (cfg.spool_dir / "state").rglob("*"):   # the databases, fatal.log, inhand/'s notes
        if f.is_file():
            assert not pattern.findall(f.read_bytes().decode("latin-1")), f
    for stage, item_id in daemon.spool.quarantined():
        reason = (cfg.spool_dir / QUARANTINE / stage / f"{item_id}.reason.json").read_text()
        assert not pattern.findall(reason)


def test_daemon_runs_delivers_survives_bad_files_and_stops_on_sigterm(tmp_path):
    conf = write_yaml_config(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "medsendx_edge.cli", "run", "--config", str(conf)],
                            stderr=subprocess.PIPE, text=True)
    try:
        inbox = tmp_path / "spool" / "inbox"
        deadline = time.time() + 20
        while not inbox.exists() and time.time() < deadline:
            time.sleep(0.05)
        (inbox / "junk.bin").write_bytes(b"junk")
        for i in range(3):
            ds, _ = synthetic_mammogram(32, 24, seed=i)
            ds.save_as(inbox / f"img{i}.dcm", enforce_file_format=True)
        archive = tmp_path / "archive"
        while time.time() < deadline and len(list(archive.glob("*.dcm")) if archive.exists() else []) < 3:
            time.sleep(0.1)
        assert len(list(archive.glob("*.dcm"))) == 3
        assert proc.poll() is None  # still running after the junk file
        proc.send_signal(signal.SIGTERM)
        t0 = time.time()
        assert proc.wait(timeout=15) == 0
        assert time.time() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
    events = [json.loads(line)["event"] for line in proc.stderr.read().splitlines() if line.startswith("{")]
    for e in ("spool_recovered", "daemon_started", "file_received", "file_quarantined", "file_delivered",
              "signal_received", "daemon_stopped"):
        assert e in events, e


def test_a_recent_truncated_file_waits_for_the_rest(tmp_path):
    cfg = make_config(tmp_path)
    spool = Spool(cfg.spool_dir, cfg.inbox)
    spool.ensure_layout()
    ds, _ = synthetic_mammogram(64, 48)
    full = tmp_path / "full.dcm"
    ds.save_as(full, enforce_file_format=True)
    data = full.read_bytes()
    src = cfg.inbox / "paused.dcm"
    src.write_bytes(data[: len(data) // 2])  # the modality paused mid-write
    item_id = spool.adopt(src)
    runner = Runner(AnonymizeStage(spool, Anonymizer(cfg)), retry_delay_s=0)
    assert runner.handle(spool.claim(INCOMING, item_id)).outcome is Outcome.RETRY_LATER
    with open(spool.path(INCOMING, item_id), "ab") as fh:  # ... and finished writing
        fh.write(data[len(data) // 2:])
    assert runner.handle(spool.claim(INCOMING, item_id)).outcome is Outcome.DONE
    # A truncated file nobody writes to any more goes to quarantine.
    src2 = cfg.inbox / "cut.dcm"
    src2.write_bytes(data[: len(data) // 2])
    os.utime(src2, (0, 0))
    other = spool.adopt(src2)
    assert runner.handle(spool.claim(INCOMING, other)).outcome is Outcome.QUARANTINE


# --------------------------------------------------------------------------- SIGKILL at every step
def _real_child(cfg, kill_at: int) -> int:
    return run_killed_at(lambda: Daemon(cfg).run_once(), kill_at)


def test_sigkill_at_every_step_of_the_real_pipeline(tmp_path):
    """The real stages (ingest, anonymize, triage with its SR, route, upload to a directory), killed with
    SIGKILL at every file-system step of a run, then restarted: each input, and each input's SR, ends
    delivered exactly once or quarantined, nothing stays behind in a queue, no temp file is left.  The one
    SIGKILL suite (with the end-to-end run of tests/e2e, which kills the daemon during sends to Orthanc)."""
    inputs = {}
    # One image with its SR and one bad file: every step of every stage, the SR's placement included, at
    # half the cost of two images (each kill point is a run and a restart)
    for i in range(1):
        ds, _ = synthetic_mammogram(128, 104, seed=i)
        inputs[f"m{i}.dcm"] = ds
    bad = b"not DICOM at all" * 20

    def fresh(root: Path):
        cfg = make_config(root, destination=DestinationConfig(kind="directory", path=root / "archive"),
                          triage=TriageConfig(send_sr=True))
        cfg.inbox.mkdir(parents=True)
        for name, ds in inputs.items():
            ds.save_as(cfg.inbox / name, enforce_file_format=True)
        (cfg.inbox / "junk.dcm").write_bytes(bad)
        age_files(cfg.inbox)
        return cfg

    def check(cfg, label):
        archive = sorted((cfg.destination.path).iterdir()) if cfg.destination.path.exists() else []
        uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in archive]
        assert len(archive) == 2 and len(set(uids)) == 2, (label, [p.name for p in archive])  # the image, its SR
        spool = Spool(cfg.spool_dir)
        assert len(spool.ready(SENT)) == 2, label
        assert [item for _stage, item in spool.quarantined()] and len(list(spool.quarantined())) == 1, label
        for queue in (INCOMING, ANONYMIZED, TRIAGED, OUTBOX):
            assert spool.ready(queue) == [] and spool.claimed(queue) == [], (label, queue)
        leftovers = [p for p in cfg.spool_dir.rglob("*") if p.name.startswith(".tmp")]
        assert leftovers == [], (label, leftovers)

    cfg = fresh(tmp_path / "full")
    total = _real_child(cfg, 0)
    check(cfg, "no kill")
    assert total > 40
    for kill_at in range(1, total + 1):
        cfg = fresh(tmp_path / f"k{kill_at}")
        _real_child(cfg, kill_at)
        assert Daemon(cfg).run_once() == 0, kill_at  # the restart
        check(cfg, f"killed at step {kill_at} of {total}")
