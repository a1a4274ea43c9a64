"""Soak: the daemon (``medsendx-edge run``) for a long while against a loopback Orthanc, at a truck's pace
and at full speed, with restarts.  Not in CI.

Every phase drops phantom mammograms into the inbox (4 views an exam); the daemon runs as a subprocess;
every ``--restart-every`` seconds it is stopped with SIGKILL and started again.  Reported: files per hour,
drop-to-delivered latency (p50, p95, from the drop time to the instance's arrival in Orthanc, by
QIDO-RS), RSS and open file descriptors over time, restarts survived, and whether everything arrived
exactly once.

    python benchmarks/soak.py --minutes 30 [--truck-pace-s 20] [--restart-every 300]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from orthanc_server import OrthancServer  # noqa: E402

from medsendx_edge.anonymize.profile import Context  # noqa: E402
from medsendx_edge.config import AnonymizeConfig  # noqa: E402
from medsendx_edge.triage.phantom import phantom_dataset  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--truck-pace-s", type=float, default=20.0, help="seconds between images at a truck's pace")
    ap.add_argument("--restart-every", type=float, default=300.0)
    ap.add_argument("--size", type=int, nargs=2, default=(2560, 2048))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="medsendx-soak-"))
    orthanc = OrthancServer(tmp / "orthanc")
    secret = tmp / "site.key"
    secret.write_text(os.urandom(32).hex())
    secret.chmod(0o600)
    pw = tmp / "pw"
    pw.write_text(orthanc.password)
    pw.chmod(0o600)
    cfg = {"spool_dir": str(tmp / "spool"), "watch": {"stable_seconds": 0.5, "rescan_seconds": 5},
           "destination": {"kind": "dicomweb", "url": orthanc.dicomweb, "username": orthanc.user,
                           "password_file": str(pw)},
           "upload": {"initial_backoff_s": 0.5, "max_backoff_s": 10, "sent_retention_days": 0.0001},
           "anonymize": {"secret_file": str(secret), "linkage_key_file": str(tmp / "link.key")}}
    cfg_path = tmp / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    ctx = Context.create(secret.read_text().strip().encode(), AnonymizeConfig(), "X")
    log = open(tmp / "daemon.log", "ab")
    cmd = [sys.executable, "-m", "medsendx_edge.cli", "run", "--config", str(cfg_path)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    dropped: dict[str, float] = {}  # pseudonymized SOP UID -> drop time
    arrived: dict[str, float] = {}
    samples: list[tuple[float, int, int]] = []
    restarts = 0
    stop = threading.Event()
    inbox = tmp / "spool" / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    rows, cols = args.size

    def watch_orthanc() -> None:
        while not stop.is_set():
            for uid in [u for u in dropped if u not in arrived]:
                if orthanc.qido_instance(uid):
                    arrived[uid] = time.time()
            time.sleep(0.5)

    threading.Thread(target=watch_orthanc, daemon=True).start()
    t_end = time.time() + args.minutes * 60
    phase_full = time.time() + args.minutes * 60 / 2  # first half at a truck's pace, then full speed
    last_restart = time.time()
    n = 0
    while time.time() < t_end:
        view, lat = [("CC", "R"), ("CC", "L"), ("MLO", "R"), ("MLO", "L")][n % 4]
        ds, _ = phantom_dataset(rows, cols, spacing_mm=0.1, view=view, laterality=lat, density=0.1 + (n % 7) / 10,
                                seed=n, study_uid=f"1.2.826.0.1.3680043.8.498.{1000 + n // 4}", patient_id=f"P{n // 4}")
        uid = ctx.uid(str(ds.SOPInstanceUID))
        part = inbox / f"img{n}.dcm.part"
        ds.save_as(part, enforce_file_format=True)
        os.rename(part, inbox / f"img{n}.dcm")
        dropped[uid] = time.time()
        n += 1
        if time.time() - last_restart >= args.restart_every:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc = subprocess.Popen(cmd, stdout=log, stderr=log)
            restarts += 1
            last_restart = time.time()
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            rss = int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])
            fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
            samples.append((time.time(), rss, fds))
        except (OSError, StopIteration):
            pass
        time.sleep(args.truck_pace_s if time.time() < phase_full else 0.0)
    deadline = time.time() + 300
    while time.time() < deadline and len(arrived) < len(dropped):
        time.sleep(1)
    stop.set()
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    stored = orthanc.instance_count()
    orthanc.stop()
    lat = sorted(arrived[u] - dropped[u] for u in arrived)
    hours = args.minutes / 60
    rss = [s[1] for s in samples]
    fds = [s[2] for s in samples]
    result = {
        "minutes": args.minutes, "dropped": len(dropped), "arrived": len(arrived), "orthanc_instances": stored,
        "files_per_hour": len(arrived) / hours, "latency_p50_s": statistics.median(lat) if lat else None,
        "latency_p95_s": lat[int(0.95 * (len(lat) - 1))] if lat else None, "restarts": restarts,
        "rss_kb_first_last_max": [rss[0], rss[-1], max(rss)] if rss else None,
        "fds_first_last_max": [fds[0], fds[-1], max(fds)] if fds else None,
    }
    print(json.dumps(result, indent=2))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "soak.json").write_text(json.dumps({**result, "samples": samples}))
    return 0 if len(arrived) == len(dropped) == stored else 1


if __name__ == "__main__":
    sys.exit(main())
