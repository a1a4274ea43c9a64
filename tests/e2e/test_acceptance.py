"""The whole daemon under the faults a truck meets, in one run (seeded, reproducible).

``medsendx-edge run`` as a subprocess with a real config, its spool on a small tmpfs, a real Orthanc as
the destination; another process feeds the inbox slowly, in pieces, as a modality writing to a share:
phantom mammograms, pydicom's bundled files (some malformed) and PHI-laden files (a marker in every
Annex E attribute, nested sequences, private tags, free text, patient names in folder names).  Faults
while it runs: 20 SIGKILLs with restarts, a file removed and a file truncated while being written, two
destination outages (Orthanc stopped, then started again), a full disk, a reload with a bad YAML.

Invariants, each failure message with its counts: every valid input in Orthanc exactly once (QIDO-RS by
its pseudonymized SOPInstanceUID), every other input quarantined with a reason, nothing lost; no PHI
marker in Orthanc's stored bytes, the logs, the state databases or any file name; RSS flat while it
drains; near-zero CPU when idle; one ``uplink_down`` and one ``uplink_restored`` per outage.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pydicom.data
import pytest
import yaml

from conftest import make_config
from orthanc_server import OrthancServer
from phi_corpus import Markers, build_corpus
from medsendx_edge.anonymize.stage import Anonymizer
from medsendx_edge.errors import QuarantineError
from medsendx_edge.spool import PIPELINE, Spool
from medsendx_edge.triage.phantom import phantom_dataset

SEED = 20261127
CLI = [sys.executable, "-m", "medsendx_edge.cli"]
PYDICOM_FILES = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "rtplan.dcm", "test-SR.dcm",
                 "waveform_ecg.dcm", "emri_small.dcm", "MR_truncated.dcm", "no_meta.dcm", "rtplan_truncated.dcm",
                 "README.txt", "SC_rgb_jpeg.dcm", "ExplVR_BigEnd.dcm", "liver_1frame.dcm"]
FEEDER = r"""
import json, os, sys, time
plan = json.loads(open(sys.argv[1]).read())
for step in plan:
    dest = step["dest"]
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    data = open(step["src"], "rb").read()
    part = dest + ".part" if step.get("rename") else dest
    try:
        fh = open(part, "wb")
    except FileNotFoundError:   # the daemon tidied the folder, emptied longer than incomplete_grace_s ago
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        fh = open(part, "wb")
    with fh:
        cut = len(data) if step["kind"] != "remove" else len(data) // 2
        for i in range(0, cut, 65536):
            fh.write(data[i:i + 65536]); fh.flush(); time.sleep(0.01)
        if step["kind"] == "truncate":
            # cut short before it is closed: a closed file may be taken at once (the daemon does not wait
            # out stable_seconds for a closed, complete file), and one truncated after its close was once
            # taken whole, a copy of its source
            fh.truncate(len(data) // 3)
    if step["kind"] == "remove":
        time.sleep(0.1); os.unlink(part); continue
    if part != dest:
        os.rename(part, dest)
    time.sleep(step.get("pause", 0.05))
"""


def _markers_in(data: bytes, mk: Markers) -> set[str]:
    hits = {m.decode() for m in re.findall(rb"ZQX\d{5}", data)} & mk.text
    hits |= {m.decode() for m in re.findall(rb"(?<![0-9.])1887\d{4}", data)} & mk.dates
    hits |= {m.decode() for m in re.findall(rb"[0-9]+(?:\.[0-9]+)+", data)} & mk.uids
    return hits


class Daemon:
    def __init__(self, cfg_path: Path, log_path: Path) -> None:
        self.cfg_path, self.log_path = cfg_path, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*CLI, "run", "--config", str(self.cfg_path)], stdout=log, stderr=log)
        log.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def events(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "NOT_JSON", "line": line[:200]})
        return out

    def wait_event(self, name: str, after: int, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(e.get("event") == name for e in self.events()[after:]):
                return
            time.sleep(0.2)
        raise AssertionError(f"no {name} within {timeout} s")

    def rss_kb(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                return int(line.split()[1])
        return 0

    def cpu_s(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mnt)]).returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("cannot mount a tmpfs (the acceptance suite runs as root)")
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_the_daemon_under_mixed_faults(tmp_path, tmpfs, capsys, request):
    rng = random.Random(SEED)
    src = tmp_path / "src"
    src.mkdir()
    inputs: list[Path] = []
    for exam in range(3):
        for i, (view, lat) in enumerate([("CC", "R"), ("CC", "L"), ("MLO", "R"), ("MLO", "L")]):
            ds, _ = phantom_dataset(256, 208, spacing_mm=0.5, view=view, laterality=lat, density=0.2 + 0.2 * exam,
                                    seed=SEED % 1000 + 4 * exam + i, study_uid=f"1.2.826.0.1.3680043.8.498.7{exam}",
                                    patient_id=f"PID-E2E-{exam}")
            p = src / f"mg{exam}{i}.dcm"
            ds.save_as(p, enforce_file_format=True)
            inputs.append(p)
    test_files = Path(pydicom.data.__file__).parent / "test_files"
    inputs += [test_files / n for n in PYDICOM_FILES if (test_files / n).exists()]
    mk = Markers()
    inputs += build_corpus([test_files / n for n in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "test-SR.dcm")],
                           tmp_path / "phi", mk)
    # The oracle: what the anonymizer accepts, and the pseudonymized SOPInstanceUID it will have.
    secrets = tmp_path / "secrets"
    oracle_cfg = make_config(tmp_path / "oracle")
    secrets.mkdir()
    oracle = Anonymizer(oracle_cfg, durable=False)
    shutil.copyfile(oracle_cfg.anonymize.secret_file, secrets / "site.key")
    expected: dict[str, str] = {}
    for p in inputs:
        try:
            expected[str(p)] = str(oracle.prepare(p).split.dataset.SOPInstanceUID)
        except QuarantineError:
            pass
        except Exception:  # noqa: BLE001 - the daemon will quarantine it too
            pass
    orthanc = OrthancServer(tmp_path / "orthanc")
    request.addfinalizer(orthanc.stop)  # the test restarts it: whichever process runs last is stopped
    pw = secrets / "pacs.pw"
    pw.write_text(orthanc.password)
    pw.chmod(0o600)
    (secrets / "site.key").chmod(0o600)
    spool_dir = tmpfs / "spool"
    cfg = {"station_name": "E2E_TRUCK_01", "spool_dir": str(spool_dir), "min_free_mb": 1,
           "watch": {"stable_seconds": 0.3, "rescan_seconds": 1, "incomplete_grace_s": 3},
           "destination": {"kind": "dicomweb", "url": orthanc.dicomweb, "username": orthanc.user,
                           "password_file": str(pw), "timeout_s": 5},
           "upload": {"initial_backoff_s": 0.2, "max_backoff_s": 1.5},
           "anonymize": {"secret_file": str(secrets / "site.key"), "linkage_key_file": str(secrets / "link.key")},
           "log": {"format": "json", "level": "info"}, "triage": {"send_sr": False}}
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    inbox = spool_dir / "inbox"
    plan = []
    removed = src / "removed.dcm"
    shutil.copyfile(inputs[0], removed)
    truncated = src / "truncated.dcm"
    shutil.copyfile(inputs[1], truncated)
    for n, p in enumerate(inputs):
        sub = p.parent.name if "DOE_JANE" in str(p) else f"study{n % 3}"
        plan.append({"src": str(p), "dest": str(inbox / sub / f"{n:03d}_{p.name}"), "kind": "copy",
                     "rename": n % 4 == 0, "pause": rng.uniform(0.0, 0.15)})
        if n == 10:
            plan.append({"src": str(removed), "dest": str(inbox / "x" / "removed.dcm"), "kind": "remove"})
        if n == 20:
            plan.append({"src": str(truncated), "dest": str(inbox / "x" / "truncated.dcm"), "kind": "truncate"})
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    (tmp_path / "feeder.py").write_text(FEEDER)
    daemon = Daemon(cfg_path, tmp_path / "daemon.log")
    daemon.start()
    feeder = subprocess.Popen([sys.executable, str(tmp_path / "feeder.py"), str(tmp_path / "plan.json")])
    counts = {"sigkill": 0, "outages": 0, "disk_full": 0, "bad_reload": 0}
    try:
        # 1. SIGKILLs while the modality writes.
        for _ in range(20):
            time.sleep(rng.uniform(0.3, 1.0))
            daemon.kill()
            counts["sigkill"] += 1
            daemon.start()
        assert feeder.wait(120) == 0
        # 2. Two destination outages, each with new files arriving meanwhile.
        windows = []
        for k in range(2):
            mark = len(daemon.events())
            orthanc.stop()
            counts["outages"] += 1
            for j in range(2):  # two images waiting: the second failure in a row says "link down"
                extra, _ = phantom_dataset(256, 208, spacing_mm=0.5, density=0.3, seed=900 + 2 * k + j,
                                           study_uid=f"1.2.826.0.1.3680043.8.498.9{k}", patient_id=f"PID-OUT-{k}")
                p = src / f"outage{k}{j}.dcm"
                extra.save_as(p, enforce_file_format=True)
                expected[str(p)] = str(oracle.prepare(p).split.dataset.SOPInstanceUID)
                inputs.append(p)
                shutil.copyfile(p, inbox / f"outage{k}{j}.dcm")
            daemon.wait_event("uplink_down", mark)
            time.sleep(2)
            orthanc.start()
            daemon.wait_event("uplink_restored", mark)
            windows.append((mark, len(daemon.events())))
        # 3. A full disk on the spool, with a file arriving.
        filler = tmpfs / "filler.bin"
        # unbuffered: a buffered writer can keep the part of a chunk the disk refused and raise ENOSPC again
        # when the file closes (the full suite failed once at this line, with the daemon writing beside it)
        with open(filler, "wb", buffering=0) as fh:
            try:
                while True:
                    fh.write(b"\0" * (1 << 20))
            except OSError:
                pass
        counts["disk_full"] += 1
        late, _ = phantom_dataset(256, 208, spacing_mm=0.5, density=0.4, seed=950, patient_id="PID-LATE")
        p = src / "late.dcm"
        late.save_as(p, enforce_file_format=True)
        expected[str(p)] = str(oracle.prepare(p).split.dataset.SOPInstanceUID)
        inputs.append(p)
        try:
            shutil.copyfile(p, inbox / "late.dcm")
        except OSError:
            pass  # the share is full too: copied again below
        time.sleep(3)
        filler.unlink()
        if not (inbox / "late.dcm").exists() or (inbox / "late.dcm").stat().st_size != p.stat().st_size:
            shutil.copyfile(p, inbox / "late.dcm")
        # 4. A reload with a bad YAML, then the good one again.
        mark = len(daemon.events())
        cfg_path.write_text("destination: [unclosed\n")
        daemon.signal(signal.SIGHUP)
        daemon.wait_event("config_rejected", mark)
        cfg_path.write_text(yaml.safe_dump(cfg))
        daemon.signal(signal.SIGHUP)
        daemon.wait_event("config_reloaded", mark)
        counts["bad_reload"] += 1
        # 5. Drain: RSS flat, then idle.
        time.sleep(2)
        rss_start = daemon.rss_kb()
        spool = Spool(spool_dir)
        deadline = time.time() + 180
        while time.time() < deadline:
            busy = sum(len(spool.ready(q)) + len(spool.claimed(q)) for q in PIPELINE[:-1])
            left = [f for f in inbox.rglob("*") if f.is_file() and ".queue" not in f.parts]
            if busy == 0 and not left:
                break
            time.sleep(0.5)
        rss_end = daemon.rss_kb()
        time.sleep(1)
        cpu0 = daemon.cpu_s()
        time.sleep(3)
        idle_cpu = (daemon.cpu_s() - cpu0) / 3
    finally:
        if feeder.poll() is None:
            feeder.kill()
        if daemon.proc and daemon.proc.poll() is None:
            daemon.signal(signal.SIGTERM)
            daemon.proc.wait(30)
    events = daemon.events()
    with sqlite3.connect(spool_dir / "state" / "state.db") as db:   # deaths.py: how close a file came to a bar
        deaths = {kind: db.execute("SELECT COALESCE(MAX(count), 0) FROM recoveries WHERE id LIKE ? AND id NOT LIKE ?",
                                   pat).fetchone()[0]
                  for kind, pat in (("crashes", ("%", "%:interrupted")), ("interruptions", ("%:interrupted", "")))}
    with capsys.disabled():  # in CI's output too: the faults this run went through
        print(f"\nacceptance: faults {counts}; inputs {len(inputs)}, expected valid {len(expected)}; most deaths "
              f"one file was in flight at: {deaths} (bars: max_recoveries 3, max_interruptions 10)")
    # Nothing lost, exactly once.
    stored = orthanc.instance_count()
    missing = [k for k, uid in expected.items() if len(orthanc.qido_instance(uid)) != 1]
    if missing:   # what the next failure needs to be diagnosed (the test's folders are gone by then)
        where = Spool(spool_dir)
        print("\nqueues:", {q: (len(where.ready(q)), len(where.claimed(q))) for q in PIPELINE},
              "\nquarantined:", [where.reason(s, i).get("reason") for s, i in where.quarantined()],
              "\nwarnings and errors:", [e for e in events if e.get("level") in ("warning", "error", "critical")][-40:])
    assert not missing, f"{len(missing)} of {len(expected)} valid inputs not in Orthanc exactly once: {missing[:5]}"
    distinct = len(set(expected.values()))  # two inputs may be one instance (a copy with the same UID)
    assert stored == distinct, f"Orthanc holds {stored} instances for {distinct} distinct valid inputs"
    spool = Spool(spool_dir)
    quarantined = list(spool.quarantined())
    assert all(spool.reason(s, i)["reason"] for s, i in quarantined)
    fed = len(inputs) + 1  # the truncated file; the removed one never finished arriving
    # Every file fed ends delivered, recorded as a copy of one delivered (a duplicate: the same instance
    # again, never sent twice; MR_small_RLE.dcm is MR_small.dcm re-encoded) or quarantined: from the state
    # database (sent/ may have been pruned to make room during the full disk).  Two partial files may come
    # on top, each quarantined: the removed file's half (closed before its removal, so it may be taken)
    # and late.dcm's first copy onto the full disk (copied again after).  Duplicates were left out of this
    # count until a run that took one more (CI, 2026-12-06: the count fell one short of the files fed).
    states = spool.state.queue_summary()["states"]
    ends = {k: int(states.get(k, 0)) for k in ("delivered", "duplicate")}  # type: ignore[union-attr]
    others = {k: v for k, v in states.items() if k not in ("delivered", "duplicate", "quarantined")}  # type: ignore[union-attr]
    accounted = ends["delivered"] + ends["duplicate"] + len(quarantined)
    reasons = sorted(spool.reason(s, i)["reason"][:60] for s, i in quarantined)
    assert not others and accounted - fed in (0, 1, 2), (
        f"{fed} files fed: {ends['delivered']} delivered + {ends['duplicate']} duplicates + {len(quarantined)} "
        f"quarantined ({reasons}); other states {others}")
    # No PHI anywhere.
    leaks = {}
    for f in (tmp_path / "orthanc" / "storage").rglob("*"):
        if f.is_file() and (hit := _markers_in(f.read_bytes(), mk)):
            leaks[f"orthanc:{f.name}"] = hit
    log_text = daemon.log_path.read_bytes()
    if hit := _markers_in(log_text, mk):
        leaks["log"] = hit
    assert b"DOE_JANE" not in log_text and b"DOE^JANE" not in log_text
    for db in (spool_dir / "state").glob("*.db"):
        if db.name != "linkage.db" and (hit := _markers_in(db.read_bytes(), mk)):
            leaks[db.name] = hit
    for f in spool_dir.rglob("*"):
        if ".queue" not in f.parts and "inbox" not in f.parts and (hit := _markers_in(f.name.encode(), mk)):
            leaks[f"name:{f.name}"] = hit
    assert not leaks, f"PHI markers found: {leaks}"
    # Logs are JSON; one uplink_down and one uplink_restored per outage.
    assert not [e for e in events if e["event"] == "NOT_JSON"], "non-JSON lines on stderr"
    for a, b in windows:
        names = [e["event"] for e in events[a:b]]
        assert names.count("uplink_down") == 1 and names.count("uplink_restored") == 1, names
    # Resources.
    assert rss_end <= 1.5 * rss_start, f"RSS grew from {rss_start} to {rss_end} kB while draining"
    assert idle_cpu < 0.05, f"{idle_cpu * 100:.1f}% of a core when idle"
    with capsys.disabled():
        print(f"acceptance: delivered {stored} distinct instances, quarantined {len(quarantined)}, "
              f"RSS {rss_start}->{rss_end} kB, idle CPU {idle_cpu * 100:.2f}%")
