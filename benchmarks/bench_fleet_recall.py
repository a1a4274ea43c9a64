"""Fleet QC sensitivity: recall and precision of the miner's flags against fault size and images per
station, over many seeds of the synthetic fleet (tests/fleet_synth.py).

The main fleet: 30 stations; 4 faulty scanners (gain, offset, noise, contrast in turn), one drifting, one
with a much denser population and one with a much thicker population (both must never be flagged), one
that also ships FOR PROCESSING copies and one on an older version without view, kV, filter or thickness.
The composite fleet reproduces the one built outside the project: 20 trucks, two faulty (detector
ageing: gain -10%, noise +15%; kV/filter drift: offset +60, contrast -11%, noise +12%).

    python benchmarks/bench_fleet_recall.py [--seeds 20] [--sizes 0.3 0.5 0.8 1.0] [--images 50 200 500]
                                            [--alphas 0.2] [--engine numpy] [--baseline]

"different population flagged" counts every flag of a station with a much denser or thicker population;
"... not for its own scanner" leaves out the ones flagged only on parameters, in the direction, on which
an oracle that knows every scanner's true parameters flags the scanner itself (fleet_synth.oracle_outliers:
the healthy jitter drew a scanner 3.2 SDs out or more), the bar of issue 14: no truck flagged for its women.

``--baseline`` also scores each fleet with the previous miner (robust z >= 5 per raw feature, no
strata), read from git at the commit before issue 14 (needs the repository's history).  Prints markdown tables (the ones in docs/fleet.md) and
writes benchmarks/results/fleet_recall.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from fleet_synth import (COMPOSITE, flagged_for_its_scanner, make_fleet, oracle_misses, oracle_outliers,  # noqa: E402
                         write_parquet)
from scipy.stats import norm  # noqa: E402

from medsendx_edge.fleet.data import aggregate_duckdb, aggregate_numpy, expand_inputs  # noqa: E402
from medsendx_edge.fleet.miner import Settings, score  # noqa: E402


BASELINE = "489412b"  # the last commit with the previous miner


def baseline_miner() -> types.ModuleType:
    """The previous miner, loaded from git (not copied into the tree)."""
    src = subprocess.run(["git", "-C", str(HERE.parent), "show", f"{BASELINE}:medsendx_edge/fleet/miner.py"],
                         capture_output=True, text=True, check=True).stdout
    mod = types.ModuleType("fleet_baseline")
    sys.modules["fleet_baseline"] = mod  # dataclasses look their module up
    exec(compile(src, "fleet_baseline.py", "exec"), mod.__dict__)
    return mod


def _tally(t: dict[str, Any], fleet: Any, flagged: set[str], report: dict[str, Any] | None = None,
           outliers: dict[str, dict[str, float]] | None = None) -> None:
    """``outliers``: healthy stations whose own scanner an oracle flags (fleet_synth.oracle_outliers).  A
    population station flagged on exactly its scanner's outlying parameters, in their direction, is counted
    under ``populations`` (every flag of one) but not under ``populations_for_patients`` (the bar: a truck
    flagged for its women, not for its scanner)."""
    bad = fleet.faulty | fleet.drifting
    t["hits"] += len(flagged & bad)
    t["truth"] += len(bad)
    t["flagged"] += len(flagged)
    populations = flagged & fleet.different_populations
    t["populations"] += len(populations)
    for name in populations:
        findings = ((report or {}).get("stations", {}).get(name) or {}).get("findings") or []
        if not flagged_for_its_scanner(findings, (outliers or {}).get(name, {})):
            t["populations_for_patients"] += 1
    t["fleets_with_false_flag"] += bool(flagged - bad)
    for name in bad - flagged:
        kind = fleet.kinds.get(name, "drift")
        t["missed"][kind] = t["missed"].get(kind, 0) + 1


def _new() -> dict[str, Any]:
    return {"hits": 0, "truth": 0, "flagged": 0, "populations": 0, "populations_for_patients": 0,
            "fleets_with_false_flag": 0, "missed": {},
            "oracle_missed": {}}


def run(scenarios: list[tuple[str, dict[str, Any]]], seeds: int, alphas: list[float], engine: str,
        baseline: bool) -> list[dict[str, Any]]:
    out = []
    old = baseline_miner() if baseline else None
    for label, kw in scenarios:
        tallies = {a: _new() for a in alphas}
        base = _new()
        for seed in range(seeds):
            fleet = make_fleet(seed=seed, **kw)
            with tempfile.TemporaryDirectory() as tmp:
                write_parquet(fleet, tmp)
                files = expand_inputs([tmp])
                agg = aggregate_duckdb(files) if engine == "duckdb" else aggregate_numpy(files)
                for a in alphas:
                    res = score(agg, Settings(alpha=a))
                    zc = norm.isf(res.report["method"]["alpha_per_test"] / 2)
                    _tally(tallies[a], fleet, set(res.flagged), res.report, oracle_outliers(fleet, zc))
                    for kind, k in oracle_misses(fleet, zc).items():
                        tallies[a]["oracle_missed"][kind] = tallies[a]["oracle_missed"].get(kind, 0) + k
                if baseline:
                    _tally(base, fleet, set(old.mine([tmp]).flagged))
        for a, t in tallies.items():
            out.append({"scenario": label, "alpha": a, **t})
        if baseline:
            out.append({"scenario": label, "alpha": "baseline", **base})
    return out


def _row(r: dict[str, Any], seeds: int) -> str:
    recall = r["hits"] / max(1, r["truth"])
    precision = r["hits"] / max(1, r["flagged"])
    missed = ", ".join(f"{k} {v}" for k, v in sorted(r["missed"].items())) or "none"
    oracle = ", ".join(f"{k} {v}" for k, v in sorted(r["oracle_missed"].items())) or "none"
    return (f"| {r['scenario']} | {r['alpha']} | {recall:.3f} | {precision:.3f} | {r['fleets_with_false_flag']} of "
            f"{seeds} | {r['populations']} of {seeds} | "
            f"{r['populations_for_patients'] if r['alpha'] != 'baseline' else ''} | {missed} | "
            f"{oracle if r['alpha'] != 'baseline' else ''} |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.3, 0.5, 0.8, 1.0])
    ap.add_argument("--images", type=int, nargs="+", default=[50, 200, 500])
    ap.add_argument("--alphas", type=float, nargs="+", default=[Settings().alpha])
    ap.add_argument("--stations", type=int, default=30)
    ap.add_argument("--engine", default="numpy", choices=("numpy", "duckdb"))
    ap.add_argument("--baseline", action="store_true")
    ap.add_argument("--skip-composite", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    scenarios = []
    for size in args.sizes:
        for n in args.images:
            scenarios.append((f"size {size:g}, {n} images", dict(
                n_stations=args.stations, images_per_station=n, n_faulty=4, fault_size=size, n_dense=1, n_drift=1,
                n_thick=1, n_processing=1, n_legacy=1)))
    if not args.skip_composite:
        for n in args.images:
            scenarios.append((f"composite, {n} images", dict(
                n_stations=20, images_per_station=n, n_faulty=2, fault_size=1.0, n_dense=1, n_drift=0, n_thick=1,
                faults=COMPOSITE)))
    rows = run(scenarios, args.seeds, args.alphas, args.engine, args.baseline)
    print(f"{args.seeds} seeds per row; engine {args.engine}\n")
    print("| fleet | alpha | recall | precision | fleets with a false flag | different population flagged "
          "| ... not for its own scanner | missed (by fault) | an oracle misses |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(_row(r, args.seeds))
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "fleet_recall.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
