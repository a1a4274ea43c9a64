"""How early the miner catches a scanner that breaks while it is watched: days from the onset of a fault
to the first run that flags the station, over many seeds of the synthetic fleet (tests/fleet_synth.py:
30 stations, one of them breaking on day 21, plus the dense and thick populations, FOR PROCESSING copies
and a legacy truck that must not be flagged).

For each k = 1..7, the fleet is mined with the record ending k days after the onset, as the nightly run
would see it.  Faults: a 12% noise rise, a 10% contrast loss and a 5% gain rise (each below what the
comparison with other stations can tell from healthy calibration differences in this fleet).

    python benchmarks/bench_fleet_onset.py [--seeds 20] [--images 200 500]

Prints the markdown table in docs/fleet.md and writes benchmarks/results/fleet_onset.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from fleet_synth import make_fleet, write_parquet  # noqa: E402

from medsendx_edge.fleet.miner import mine  # noqa: E402

FAULTS = (("noise", 0.12, "noise +12%"), ("contrast", 0.10, "contrast -10%"), ("gain", 0.05, "gain +5%"))
ONSET = 21


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--images", type=int, nargs="+", default=[200, 500], help="images per station in 28 days")
    ap.add_argument("--max-days", type=int, default=7)
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = []
    for kind, size, label in FAULTS:
        for per28 in args.images:
            days_to_flag: list[int | None] = []
            false_flags = runs = 0
            for seed in range(args.seeds):
                found = None
                for k in range(1, args.max_days + 1):
                    total = ONSET + k
                    fleet = make_fleet(n_stations=30, images_per_station=per28 * total // 28, days=total, seed=seed,
                                       n_faulty=0, n_dense=1, n_drift=1, drift_days=k, drift_kind=kind,
                                       drift_size=size, n_thick=1, n_processing=1, n_legacy=1)
                    with tempfile.TemporaryDirectory() as tmp:
                        write_parquet(fleet, tmp)
                        flagged = set(mine([tmp]).flagged)
                    runs += 1
                    false_flags += len(flagged - fleet.drifting)
                    if found is None and flagged & fleet.drifting:
                        found = k
                        break
                days_to_flag.append(found)
            caught = sorted(d for d in days_to_flag if d is not None)
            rows.append({"fault": label, "images_per_28_days": per28, "seeds": args.seeds,
                         "caught": len(caught), "median_days": caught[len(caught) // 2] if caught else None,
                         "max_days": caught[-1] if caught else None, "false_flags": false_flags, "runs": runs})
    print(f"{args.seeds} seeds; the record ends 1..{args.max_days} days after the onset (day {ONSET})\n")
    print("| fault | images / station / 28 days | caught within "
          f"{args.max_days} days | median days to flag | worst | false flags (runs) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['fault']} | {r['images_per_28_days']} | {r['caught']} of {r['seeds']} | {r['median_days']} | "
              f"{r['max_days']} | {r['false_flags']} ({r['runs']}) |")
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "fleet_onset.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
