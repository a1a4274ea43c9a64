"""The command line: run --once exit codes, status, requeue, check-config, segment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import age_files, run_cli, write_yaml_config
from medsendx_edge.spool import Spool
from medsendx_edge.synthetic import synthetic_mammogram
from medsendx_edge.vocabulary import FEATURE_COLUMNS


def test_run_once_exit_codes_status_and_requeue(tmp_path):
    bad_dest = tmp_path / "not-a-folder"
    bad_dest.write_text("a file where the archive folder should be")
    conf = write_yaml_config(tmp_path, destination={"kind": "directory", "path": str(bad_dest)})
    spool_inbox = tmp_path / "spool" / "inbox"
    spool_inbox.mkdir(parents=True)
    ds, _ = synthetic_mammogram(32, 24)
    ds.save_as(spool_inbox / "a.dcm", enforce_file_format=True)
    (spool_inbox / "b.txt").write_text("nope")
    age_files(spool_inbox)
    proc = run_cli("run", "--once", "--config", str(conf))
    assert proc.returncode == 3 and "1 file(s) still waiting" in proc.stderr
    status = json.loads(run_cli("status", "--json", env={"MEDSENDX_EDGE_CONFIG": str(conf)}).stdout)
    assert status["counts"]["outbox"] == 1 and status["counts"]["quarantine"] == 1
    assert status["upload_queue"]["queued_by_priority"] == {"2": 1}
    assert "directory destination" in status["upload_queue"]["last_error"]
    # issue 26: quarantined items by cause, with the command that puts them back
    (group,) = status["quarantine_by_cause"]
    assert group["count"] == 1 and group["stage"] == "anonymize" and group["example"]
    text = run_cli("status", "--config", str(conf)).stdout
    assert f"quarantine: 1 x anonymize {group['error_class']}" in text
    assert f"medsendx-edge requeue --stage anonymize --error-class {group['error_class']}" in text
    # the command it prints is exact: another class, or another stage, is not touched
    assert "nothing matched" in run_cli("requeue", "--config", str(conf), "--stage", "anonymize", "--error-class",
                                        group["error_class"] + "X").stdout
    # Fix the destination: the next run delivers and exits 0.
    bad_dest.unlink()
    assert run_cli("run", "--once", "--config", str(conf)).returncode == 0
    qid = json.loads(run_cli("status", "--json", "--config", str(conf)).stdout) and \
        next(Spool(tmp_path / "spool").quarantined())[1]
    proc = run_cli("requeue", qid, "--config", str(conf))
    assert proc.returncode == 0 and "back in incoming" in proc.stdout
    assert run_cli("requeue", "0" * 24, "--config", str(conf)).returncode == 2
    proc = run_cli("status", "--config", str(conf))
    assert proc.returncode == 0 and "sent" in proc.stdout


def test_check_config_cli(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    assert run_cli("check-config", str(repo / "config" / "medsendx-edge.yaml")).returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("upload: {initial_backoff_s: 5, max_backoff_s: 1}\n")
    proc = run_cli("check-config", str(bad))
    assert proc.returncode == 2 and "upload.max_backoff_s" in proc.stderr and "1" in proc.stderr


def _mammo_file(path: Path, **kw) -> None:
    kw.setdefault("pixel_spacing_mm", 0.5)  # 256 pixels: a 13 cm field
    ds, _ = synthetic_mammogram(256, 208, **kw)
    ds.save_as(path, enforce_file_format=True)


def test_segment_cli(tmp_path):
    f = tmp_path / "m.dcm"
    _mammo_file(f, seed=5, density=0.55, view="MLO")
    png = tmp_path / "m.png"
    proc = subprocess.run([sys.executable, "-m", "medsendx_edge.cli", "segment", str(f), "--png", str(png)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MEDSENDX_EDGE_CONFIG": ""})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    # the sidecar the daemon writes, field for field (without the spool id)
    assert set(out) == set(FEATURE_COLUMNS) | {"triage", "priority", "reasons", "labels", "metrics", "frame",
                                                "category_claim", "positioning", "instance"}
    assert out["priority"] == "high" and out["labels"] == ["background", "fat", "dense", "pectoral"]
    # one view: its percent dense, no category (a category is a breast's, from all its views: the exam book)
    assert out["category"] is None and out["pd"] >= 0.33 and out["view"] == "MLO" and out["laterality"] == "L"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_check_config_names_every_needed_file_that_is_missing(tmp_path):
    """Issue 26: check-config said OK for a password file that does not exist; the daemon found out at its
    first send."""
    conf = tmp_path / "c.yaml"
    body = (f"spool_dir: {tmp_path / 'spool'}\n"
            "destination: {kind: dicomweb, url: 'http://127.0.0.1:8042/dicom-web', username: truck, "
            f"password_file: {tmp_path / 'nope.pw'}, ca_bundle: {tmp_path / 'ca.pem'}}}\n")
    conf.write_text(body)
    proc = run_cli("check-config", str(conf))
    assert proc.returncode == 2, proc.stdout
    assert f"destination.password_file: {tmp_path / 'nope.pw'} does not exist" in proc.stderr
    assert "destination.ca_bundle" in proc.stderr
    (tmp_path / "nope.pw").write_text("s3cret\n")
    (tmp_path / "nope.pw").chmod(0o600)
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    proc = run_cli("check-config", str(conf))
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr


def test_check_config_asks_only_for_the_files_of_what_is_on(tmp_path):
    """Review: a missing fleet token with the fleet off, or a TLS key on a DICOMweb destination, was
    reported though nothing would read it."""
    conf = tmp_path / "c.yaml"
    conf.write_text(f"spool_dir: {tmp_path / 'spool'}\n"
                    f"fleet: {{enabled: false, destination: {{kind: http, url: 'http://127.0.0.1:9/f', "
                    f"token_file: {tmp_path / 'no-token'}}}}}\n"
                    f"destination: {{kind: dicomweb, url: 'http://127.0.0.1:8042/dicom-web', "
                    f"tls_key_file: {tmp_path / 'no.key'}}}\n")
    proc = run_cli("check-config", str(conf))
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr


def test_status_on_a_broken_config_reports_from_the_running_daemon(tmp_path, monkeypatch):
    """Issue 26: while the daemon ran on its old config, `status` on a broken config file exited 2 and
    monitoring went blind exactly when it mattered. It now reports the running daemon's spool, unhealthy,
    saying the file is broken."""
    from medsendx_edge.config import load_config
    from medsendx_edge.daemon import Daemon

    runtime = tmp_path / "run"
    monkeypatch.setenv("MEDSENDX_EDGE_RUNTIME_DIR", str(runtime))
    conf = write_yaml_config(tmp_path)
    daemon = Daemon(load_config(conf), config_path=conf)
    daemon.start()
    daemon.shutdown()
    assert json.loads((runtime / "daemon.json").read_text())["spool_dir"] == str(tmp_path / "spool")
    conf.write_text("upload: {initial_backoff_s: 5, max_backoff_s: 1}\n")   # an ops edit gone wrong
    env = {"MEDSENDX_EDGE_RUNTIME_DIR": str(runtime)}
    proc = run_cli("status", "--json", "--config", str(conf), env=env)
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    assert data["spool_dir"] == str(tmp_path / "spool") and "upload.max_backoff_s" in data["config_error"]
    assert data["problems"][0].startswith("the config file is broken")
    text = run_cli("status", "--config", str(conf), env=env)
    assert text.returncode == 1 and "UNHEALTHY: the config file is broken" in text.stdout
    # no record of a running daemon: the config error itself, as before
    assert run_cli("status", "--config", str(conf), env={"MEDSENDX_EDGE_RUNTIME_DIR": str(tmp_path / "none")}
                   ).returncode == 2


def test_run_once_ends_without_finalization_and_leaves_everything_durable(tmp_path):
    """``run --once`` ends with os._exit once its work is on disk (0.3 s of Python's finalization saved):
    what it recorded is all there for the next process, the SQLite write-ahead logs included, and what it
    printed is printed."""
    import sqlite3

    conf = write_yaml_config(tmp_path, destination={"kind": "directory", "path": str(tmp_path / "archive")})
    inbox = tmp_path / "spool" / "inbox"
    inbox.mkdir(parents=True)
    for i in range(3):
        synthetic_mammogram(64, 48, seed=i)[0].save_as(inbox / f"m{i}.dcm", enforce_file_format=True)
    age_files(inbox)
    proc = run_cli("run", "--once", "--config", str(conf))
    assert proc.returncode == 0, proc.stderr
    state = tmp_path / "spool" / "state" / "state.db"
    assert Path(str(state) + "-wal").exists()          # not checkpointed at exit: the next open replays it
    with sqlite3.connect(state) as db:
        delivered = db.execute("SELECT count(*) FROM queue WHERE state = 'delivered'").fetchone()[0]
    assert delivered == 3 and len(list((tmp_path / "archive").rglob("*.dcm"))) == 3
    status = json.loads(run_cli("status", "--json", "--config", str(conf)).stdout)
    assert status["counts"]["sent"] == 3 and status["counts"]["outbox"] == 0
