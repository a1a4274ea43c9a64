"""Fleet QC sensitivity: recall and precision of the miner's flags against fault size and images per
station, over many seeds of the synthetic fleet (tests/fleet_synth.py: 30 stations, 4 faulty scanners of
each kind in turn, one drifting, one with a much denser population that must never be flagged).

    python benchmarks/bench_fleet_recall.py [--seeds 20] [--sizes 0.3 0.5 0.8 1.0] [--images 50 200 500]

Prints a markdown table (the one in docs/fleet.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from fleet_synth import make_fleet, write_parquet  # noqa: E402

from medsendx_edge.fleet.miner import mine  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.3, 0.5, 0.8, 1.0])
    ap.add_argument("--images", type=int, nargs="+", default=[50, 200, 500])
    ap.add_argument("--stations", type=int, default=30)
    args = ap.parse_args()
    t0 = time.perf_counter()
    print(f"{args.stations} stations, 4 faulty + 1 drifting + 1 dense population, {args.seeds} seeds each\n")
    print("| fault size | images / station | recall | precision | dense population flagged |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        for n in args.images:
            hits = truth = flagged = dense_flags = 0
            for seed in range(args.seeds):
                fleet = make_fleet(n_stations=args.stations, images_per_station=n, seed=seed, n_faulty=4,
                                   fault_size=size, n_dense=1, n_drift=1)
                with tempfile.TemporaryDirectory() as tmp:
                    write_parquet(fleet, tmp)
                    res = mine([tmp])
                bad = fleet.faulty | fleet.drifting
                got = set(res.flagged)
                hits += len(got & bad)
                truth += len(bad)
                flagged += len(got)
                dense_flags += len(got & fleet.dense_population)
            print(f"| {size:g} | {n} | {hits / truth:.2f} | {hits / max(1, flagged):.2f} | "
                  f"{dense_flags} of {args.seeds} |")
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
