"""Fleet miner at scale: 1,000,000 feature rows from 200 stations (Parquet, 10 files).

Each measurement runs in its own process, so peak memory (max RSS) is clean:
* load floor: read the same files with pyarrow (the columns the miner uses) and nothing else;
* mine: ``medsendx-edge mine`` (numpy engine) including report.json, stations.csv and report.html;
* mine --engine duckdb: the out-of-core path.

    python benchmarks/bench_fleet.py [--rows 1000000] [--stations 200]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

FLOOR = """
import sys, pyarrow.parquet as pq, glob
cols = ["station_name", "acquired_date", "model", "view", "presentation_intent", "anode", "filter", "kvp",
        "implant", "bg_c", "fat_c", "dense_c", "contrast", "noise_bg", "noise_fat", "cnr", "pd", "breast_frac",
        "thickness_mm", "compression_n"]
t = [pq.read_table(f, columns=cols) for f in sorted(glob.glob(sys.argv[1] + "/*.parquet"))]
print(sum(x.num_rows for x in t))
"""


def run(cmd: list[str]) -> tuple[float, float, str]:
    """Wall time and peak RSS (MB) of a child process."""
    t0 = time.perf_counter()
    wrapper = [sys.executable, "-c",
               "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
               "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(p.returncode)", *cmd]
    proc = subprocess.run(wrapper, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    rss_kb = int(proc.stderr.strip().split("MAXRSS")[-1])
    return dt, rss_kb / 1024, proc.stdout


def main() -> int:
    from fleet_synth import make_fleet, write_parquet

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--stations", type=int, default=200)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        t0 = time.perf_counter()
        fleet = make_fleet(n_stations=args.stations, images_per_station=args.rows // args.stations, days=60,
                           seed=1, n_faulty=8, n_drift=2, n_dense=3, n_thick=3, n_processing=3, n_legacy=2)
        write_parquet(fleet, work / "in", split=10)
        gen = time.perf_counter() - t0
        (work / "floor.py").write_text(FLOOR)
        floor_s, floor_mb, _ = run([sys.executable, str(work / "floor.py"), str(work / "in")])
        mine_s, mine_mb, out = run([sys.executable, "-m", "medsendx_edge.cli", "mine", str(work / "in"),
                                    "--out", str(work / "out")])
        duck_s, duck_mb, _ = run([sys.executable, "-m", "medsendx_edge.cli", "mine", str(work / "in"),
                                  "--out", str(work / "out-duck"), "--engine", "duckdb"])
        report = json.loads((work / "out" / "report.json").read_text())
        truth = fleet.faulty | fleet.drifting
        flagged = set(report["flagged_stations"])
        res = {"rows": args.rows, "stations": args.stations, "generate_s": gen,
               "load_floor": {"s": floor_s, "peak_mb": floor_mb},
               "mine_numpy": {"s": mine_s, "peak_mb": mine_mb},
               "mine_duckdb": {"s": duck_s, "peak_mb": duck_mb},
               "recall": len(flagged & truth) / len(truth), "precision": len(flagged & truth) / max(1, len(flagged)),
               "dense_population_flagged": sorted(flagged & fleet.different_populations)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.rows} rows, {args.stations} stations (whole processes, peak RSS)")
    print(f"  load floor (pyarrow)   {res['load_floor']['s']:6.2f} s  {res['load_floor']['peak_mb']:7.0f} MB")
    print(f"  mine (numpy)           {res['mine_numpy']['s']:6.2f} s  {res['mine_numpy']['peak_mb']:7.0f} MB"
          f"   = {res['mine_numpy']['s'] / res['load_floor']['s']:.1f}x the floor (target < 20 s, < 1024 MB)")
    print(f"  mine (duckdb)          {res['mine_duckdb']['s']:6.2f} s  {res['mine_duckdb']['peak_mb']:7.0f} MB")
    print(f"  recall {res['recall']:.2f}, precision {res['precision']:.2f}, dense or thick populations flagged: "
          f"{res['dense_population_flagged'] or 'none'}")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "fleet.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
