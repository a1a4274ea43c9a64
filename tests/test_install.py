"""Install, upgrade and rollback on a clean venv (issue 28): release N installed from its wheel, its spool
filled mid-pipeline, upgraded to N+1 (a release whose state database has a newer schema), every file
delivered once with the same pseudonyms and a readable linkage table; then a rollback to N refused with
what to do, and N running again on the backup the upgrade made.

The releases are wheels built from this tree: N as it is, N+1 a copy with its version and state schema
bumped and a migration added (what a real next release would do).  Their dependencies come from a
wheelhouse pip builds from the package index (as `make image` does); the test venv's own packages are
never used, so a dependency the package forgets to declare fails here."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml

from medsendx_edge.synthetic import synthetic_mammogram

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(900)


def _wheel(src: Path, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(src)],
                   check=True, capture_output=True)
    return next(out.glob("medsendx_edge-*.whl"))


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    work = tmp_path_factory.mktemp("releases")
    house = work / "wheelhouse"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(house), str(REPO)],
                   check=True, capture_output=True, timeout=600)
    for w in house.glob("medsendx_edge-*.whl"):
        w.unlink()
    n = _wheel(REPO, work / "n")
    # N+1: the same code, its version and state schema one step on, with the migration a release would add
    nxt = work / "src-next"
    shutil.copytree(REPO, nxt, ignore=shutil.ignore_patterns(".venv", ".git", "var", "dist", "build", "*.egg-info",
                                                             "__pycache__", "tests", "benchmarks", "docs"))
    toml = (nxt / "pyproject.toml").read_text()
    (nxt / "pyproject.toml").write_text(toml.replace('version = "0.1.0"', 'version = "0.1.1"', 1))
    state = (nxt / "medsendx_edge" / "state.py").read_text()
    state = state.replace("STATE_SCHEMA = 1\n", "STATE_SCHEMA = 2\n", 1)
    state = state.replace('''        conn.execute("CREATE INDEX IF NOT EXISTS queue_by_instance ON queue (sop_uid)")
''', '''        conn.execute("CREATE INDEX IF NOT EXISTS queue_by_instance ON queue (sop_uid)")
        if "route_note" not in {r[1] for r in conn.execute("PRAGMA table_info(queue)")}:   # schema 1 -> 2
            conn.execute("ALTER TABLE queue ADD COLUMN route_note TEXT")
''', 1)
    assert "route_note" in state
    (nxt / "medsendx_edge" / "state.py").write_text(state)
    return house, n, _wheel(nxt, work / "next")


def _run(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": ""}, cwd="/")
    if check:
        assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def _drop(inbox: Path, name: str, seed: int) -> pydicom.Dataset:
    ds, _ = synthetic_mammogram(256, 208, patient_name="DOE^JANE", patient_id="PID-UPGRADE", seed=seed)
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.4242"
    ds.save_as(inbox / name, enforce_file_format=True)
    os.utime(inbox / name, (0, 0))
    return ds


def test_install_upgrade_keeps_everything_and_a_rollback_is_refused_then_restored(tmp_path, releases):
    house, n_whl, next_whl = releases
    prefix, conf, state, units = tmp_path / "opt", tmp_path / "etc", tmp_path / "var", tmp_path / "units"
    _run(sys.executable, "-m", "venv", prefix)
    _run(prefix / "bin" / "pip", "install", "--quiet", "--no-index", "--find-links", house, n_whl, timeout=600)
    edge = prefix / "bin" / "medsendx-edge"
    lay_out = ["install", "--user", "root", "--config-dir", conf, "--state-dir", state, "--unit-dir", units]
    first = _run(edge, *lay_out)
    assert "wrote" in first.stdout and "medsendx-edge 0.1.0" in first.stdout
    assert "nothing to do" in _run(edge, *lay_out).stdout                         # idempotent
    unit = (units / "medsendx-edge.service").read_text()
    assert f"ExecStart={edge} run --config {conf / 'medsendx-edge.yaml'}" in unit and "User=root" in unit
    assert oct((state / "secrets").stat().st_mode & 0o777) == "0o700"

    # release N runs; its destination is down, so the images wait in the outbox (mid-pipeline)
    cfg_path = conf / "medsendx-edge.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["watch"] = {"stable_seconds": 0.05}
    cfg["destination"] = {"kind": "dicomweb", "url": "http://127.0.0.1:9/dicom-web", "timeout_s": 2}
    cfg_path.write_text(yaml.safe_dump(cfg))
    inbox = Path(cfg["spool_dir"]) / "inbox"
    inbox.mkdir(parents=True)
    originals = [_drop(inbox, "a.dcm", 1), _drop(inbox, "b.dcm", 2)]
    _run(edge, "run", "--once", "--config", cfg_path, check=False)
    outbox = Path(cfg["spool_dir"]) / "outbox"
    queued = [pydicom.dcmread(p) for p in outbox.glob("*.dcm")]
    assert len(queued) >= 2
    pseudonym = {str(d.PatientID) for d in queued}
    assert len(pseudonym) == 1 and "PID-UPGRADE" not in pseudonym
    originals.append(_drop(inbox, "c.dcm", 3))                                   # not yet taken in

    # the upgrade: the databases backed up, the new release installed and checked
    up = _run(edge, *lay_out, "--wheel", next_whl, "--no-index", "--find-links", house)
    assert "0.1.0 -> 0.1.1" in up.stdout and "backed up state/state.db" in up.stdout
    backup = next((state / "backups").glob("0.1.0-*"))
    assert {p.name for p in backup.iterdir()} >= {"state.db", "linkage.db"}

    # N+1 delivers everything, once, under the same pseudonym; the linkage table still reads
    archive = tmp_path / "archive"
    cfg["destination"] = {"kind": "directory", "path": str(archive)}
    cfg_path.write_text(yaml.safe_dump(cfg))
    _run(edge, "run", "--once", "--config", cfg_path)
    got = [pydicom.dcmread(p) for p in archive.rglob("*") if p.is_file()]
    images = [d for d in got if d.Modality == "MG"]
    assert len(images) == 3 and len({d.SOPInstanceUID for d in got}) == len(got)
    assert {str(d.PatientID) for d in got} == pseudonym
    who = _run(edge, "reidentify", "--config", cfg_path, pseudonym.pop())
    assert "PID-UPGRADE" in who.stdout
    db = sqlite3.connect(Path(cfg["spool_dir"]) / "state" / "state.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    assert "route_note" in {r[1] for r in db.execute("PRAGMA table_info(queue)")}
    db.close()

    # the rollback: N refuses the database N+1 migrated, and says what to do; the backup brings it back
    _run(edge, *lay_out, "--wheel", n_whl, "--no-index", "--find-links", house)
    refused = _run(edge, "status", "--json", "--config", cfg_path, check=False)
    assert refused.returncode != 0 and "newer MedSendX Edge" in refused.stderr and "backup" in refused.stderr
    for db_file in backup.iterdir():
        shutil.copyfile(db_file, Path(cfg["spool_dir"]) / "state" / db_file.name)
        for wal in ("-wal", "-shm"):
            (Path(cfg["spool_dir"]) / "state" / f"{db_file.name}{wal}").unlink(missing_ok=True)
    status = _run(edge, "status", "--json", "--config", cfg_path, check=False)
    assert "newer MedSendX Edge" not in status.stderr
    assert json.loads(status.stdout)["spool_dir"] == cfg["spool_dir"]


def test_backup_copies_the_spools_databases_beside_it(tmp_path):
    """`medsendx-edge backup` (before a new container image starts on the volume): SQLite's online copy
    of each database, readable, mode 0600, beside the spool."""
    from conftest import make_config
    from medsendx_edge.cli import main
    from medsendx_edge.daemon import Daemon

    cfg = make_config(tmp_path)
    Daemon(cfg).spool.state.put("last_success", "x")   # a state database exists
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump({"spool_dir": str(cfg.spool_dir), "anonymize": {
        "secret_file": str(cfg.anonymize.secret_file), "linkage_key_file": str(cfg.anonymize.linkage_key_file)}}))
    assert main(["backup", "--config", str(conf)]) == 0
    copy = next((cfg.spool_dir.parent / "backups").iterdir()) / "state.db"
    assert oct(copy.stat().st_mode & 0o777) == "0o600"
    assert sqlite3.connect(copy).execute("SELECT value FROM kv WHERE key = 'last_success'").fetchone() == ("x",)
