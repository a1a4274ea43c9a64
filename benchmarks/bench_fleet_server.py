"""The fleet service under a fleet's load (issue 27): 1,000 simulated trucks, each heartbeating every 60 s and
sending a day's feature rows (one Parquet file of 160 images) and its exam summaries (40 exams), against
the service as it would be deployed: gunicorn (4 worker processes of 8 threads) in front of the app, a
real PostgreSQL (fsync on) and the feature files on disk, all on this 2-core machine with the load
generator.

Open loop: every request has its time in a schedule (heartbeats every 60 s per truck, phases spread;
the day's uploads spread uniformly over the window), sent by 64 client threads when due, so a slow
server shows as latency, not as a politely slower client.  5 % of the uploads are sent twice (a truck
that lost the answer): they must answer 200 "already" and add nothing.

Reported: requests per second, p50 / p99 latency per kind, the service's CPU (gunicorn's processes and
PostgreSQL's, of the 2 cores) and memory, and the database's counts against what was sent (nothing lost,
nothing twice).

    python benchmarks/bench_fleet_server.py [--trucks 1000] [--seconds 120]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import queue
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from orthanc_server import free_port, wait_listening  # noqa: E402
from pgserver import PostgresServer  # noqa: E402

from medsendx_edge.fleet.server import FleetDB  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])   # utime, stime
        except OSError:
            pass
    return total / TICK


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid, *map(int, out)]


def features_body(station: str, rng: random.Random) -> bytes:
    n = 160
    table = pa.table({"station_name": [station] * n, "acquired_date": ["20261204"] * n,
                      "model": ["Selenia Dimensions"] * n, "kvp": [rng.uniform(26, 32) for _ in range(n)],
                      "thickness_mm": [rng.gauss(55, 12) for _ in range(n)],
                      "organ_dose_mgy": [rng.lognormvariate(0.5, 0.3) for _ in range(n)],
                      "pd": [rng.uniform(0.02, 0.8) for _ in range(n)], "snr_fat": [rng.gauss(40, 5) for _ in range(n)]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def exams_body(station: str, rng: random.Random) -> bytes:
    return json.dumps({"kind": "exams", "exams": [
        {"exam": f"{station}-{i:03d}", "category": rng.choice("abcd"), "priority": rng.choice(["normal", "high"]),
         "reasons": [], "updated": "2026-12-04T12:00:00+00:00"} for i in range(40)]}).encode()


def heartbeat_body(sent_at: float, rng: random.Random) -> bytes:
    return json.dumps({"kind": "heartbeat", "sent_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(sent_at)),
                       "status": {"version": "0.1.0", "healthy": True, "backlog": rng.randint(0, 40), "uplink": "up",
                                  "disk_free_mb": 50000.0, "rechecks_today": rng.randint(0, 3)}}).encode()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trucks", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    rng = random.Random(1)
    pg = PostgresServer(fsync=True)
    tmp = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    gunicorn = None
    try:
        db = FleetDB(pg.dsn)
        db.migrate()
        t0 = time.perf_counter()
        tokens = {f"TRUCK_{i:04d}": db.add_truck(f"TRUCK_{i:04d}") for i in range(args.trucks)}
        print(f"{args.trucks} trucks registered in {time.perf_counter() - t0:.1f} s")
        pw = tmp / "pw"
        pw.write_text("operator")
        port = free_port()
        env = {**os.environ, "MEDSENDX_FLEET_DSN": pg.dsn, "MEDSENDX_FLEET_STORAGE": str(tmp / "features"),
               "MEDSENDX_FLEET_PASSWORD_FILE": str(pw)}
        gunicorn = subprocess.Popen([str(Path(sys.executable).parent / "gunicorn"), "-w", str(args.workers), "-k",
                                     "gthread", "--threads", "8", "-b", f"127.0.0.1:{port}", "--log-level", "warning",
                                     "medsendx_edge.fleet.server:wsgi_app()"], env=env)
        wait_listening(port)
        base = f"http://127.0.0.1:{port}/api/v1/uploads/"
        # the schedule: (due, kind, station, upload id, body)
        schedule = []
        for station in tokens:
            phase = rng.uniform(0, 60)
            t = phase
            k = 0
            while t < args.seconds:
                schedule.append((t, "heartbeat", station, f"hb-{k}", None))
                t += 60.0
                k += 1
            schedule.append((rng.uniform(0, args.seconds), "features", station, "features-20261204",
                             features_body(station, rng)))
            schedule.append((rng.uniform(0, args.seconds), "exams", station, "exams-20261204",
                             exams_body(station, rng)))
        resend = [s for s in schedule if rng.random() < 0.05]
        schedule += [(min(args.seconds, s[0] + rng.uniform(1, 10)), s[1] + "-again", *s[2:]) for s in resend]
        schedule.sort(key=lambda s: s[0])
        work: queue.Queue = queue.Queue()
        results: list[tuple[str, float, int]] = []
        lock = threading.Lock()
        start = time.monotonic() + 1.0
        bodies: dict[tuple[str, str], bytes] = {}

        def client() -> None:
            session = requests.Session()
            while True:
                item = work.get()
                if item is None:
                    return
                due, kind, station, upload_id, body = item
                key = (station, upload_id)
                if body is None:
                    with lock:
                        body = bodies.get(key) or heartbeat_body(time.time(), rng)
                        bodies[key] = body
                wait = start + due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                t = time.perf_counter()
                r = session.put(base + upload_id, data=body, headers={"Authorization": f"Bearer {tokens[station]}"},
                                timeout=60)
                with lock:
                    results.append((kind, time.perf_counter() - t, r.status_code))

        threads = [threading.Thread(target=client, daemon=True) for _ in range(64)]
        for th in threads:
            th.start()
        pids = children(gunicorn.pid) + pg.pids()
        cpu0, t_start = cpu_s(pids), time.monotonic()
        peak_rss = 0.0
        for item in schedule:
            work.put(item)
        for _ in threads:
            work.put(None)
        while any(th.is_alive() for th in threads):
            peak_rss = max(peak_rss, rss_mb(children(gunicorn.pid) + pg.pids()))
            time.sleep(1.0)
        elapsed = time.monotonic() - t_start
        cpu = cpu_s(children(gunicorn.pid) + pg.pids()) - cpu0
        by_kind: dict[str, list[float]] = {}
        codes: dict[str, dict[int, int]] = {}
        for kind, lat, code in results:
            by_kind.setdefault(kind, []).append(lat)
            codes.setdefault(kind, {}).setdefault(code, 0)
            codes[kind][code] += 1
        print(f"{len(results)} requests in {elapsed:.0f} s ({len(results) / elapsed:.1f} per second), "
              f"{args.workers} gunicorn workers x 8 threads, PostgreSQL with fsync")
        for kind in sorted(by_kind):
            lat = sorted(by_kind[kind])
            p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
            print(f"  {kind:16s} {len(lat):6d}  p50 {statistics.median(lat) * 1000:7.1f} ms  p99 {p99 * 1000:7.1f} ms"
                  f"  statuses {codes[kind]}")
        print(f"  service CPU {cpu:.1f} s over {elapsed:.0f} s = {cpu / elapsed * 100:.0f} % of one core "
              f"({cpu / elapsed / 2 * 100:.0f} % of the 2); peak RSS {peak_rss:.0f} MB (gunicorn + PostgreSQL)")
        with db.connect() as conn:
            n_hb = conn.execute("SELECT count(*) FROM heartbeats").fetchone()[0]
            n_up = dict(conn.execute("SELECT kind, count(*) FROM uploads GROUP BY kind").fetchall())
            n_ex = conn.execute("SELECT count(*) FROM exams").fetchone()[0]
        sent_hb = sum(1 for s in schedule if s[1] == "heartbeat")
        files = len(list((tmp / "features").rglob("*.parquet")))
        print(f"  stored: heartbeats {n_hb} of {sent_hb} sent, uploads {n_up}, exams {n_ex} of "
              f"{args.trucks * 40}, feature files {files} of {args.trucks}; re-sends answered "
              f"{ {k: v for k, v in codes.items() if k.endswith('-again')} }")
        ok = n_hb == sent_hb and n_ex == args.trucks * 40 and files == args.trucks and \
            n_up.get("features") == args.trucks and n_up.get("exams") == args.trucks
        print("  nothing lost, nothing twice" if ok else "  MISMATCH: something lost or doubled")
        return 0 if ok else 1
    finally:
        if gunicorn is not None:
            gunicorn.terminate()
            gunicorn.wait(30)
        pg.stop()


if __name__ == "__main__":
    sys.exit(main())
