"""A synthetic fleet: per-image feature rows from many trucks, with known faults.

Each station has a scanner (gain, offset, noise, contrast factor) with small calibration jitter and a
patient population (percent density, thickness).  Class centres follow the scanner, not the patients:
a denser population raises ``pd``, not ``fat_c`` or ``dense_c``.  Faults: gain or offset shift, raised
noise, lowered contrast, and a drift that starts ``drift_days`` before the end.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np

FAULTS = ("gain", "offset", "noise", "contrast")


@dataclass
class Fleet:
    rows: dict[str, np.ndarray]
    faulty: set[str] = field(default_factory=set)
    dense_population: set[str] = field(default_factory=set)
    drifting: set[str] = field(default_factory=set)


def make_fleet(n_stations: int = 40, images_per_station: int = 300, days: int = 28, seed: int = 0,
               n_faulty: int = 4, fault_size: float = 1.0, n_dense: int = 1, n_drift: int = 1,
               drift_days: int = 5) -> Fleet:
    rng = np.random.default_rng(seed)
    names = [f"MOBILE_UNIT_{i:03d}" for i in range(n_stations)]
    order = rng.permutation(n_stations)
    faulty = {names[i]: FAULTS[k % len(FAULTS)] for k, i in enumerate(order[:n_faulty])}
    dense = {names[i] for i in order[n_faulty:n_faulty + n_dense]}
    drifting = {names[i] for i in order[n_faulty + n_dense:n_faulty + n_dense + n_drift]}
    cols: dict[str, list[np.ndarray]] = {k: [] for k in (
        "station_name", "acquired_date", "model", "kvp", "exposure_mas", "thickness_mm", "compression_n", "bg_c",
        "fat_c", "dense_c", "contrast", "noise_bg", "noise_fat", "snr_fat", "cnr", "mean_breast", "pd",
        "breast_frac", "saturated_frac", "manufacturer")}
    start = dt.date(2026, 10, 1)
    for name in names:
        n = images_per_station
        gain = 1 + rng.normal(0, 0.015)
        offset = rng.normal(0, 8)
        noise = 25 * (1 + rng.normal(0, 0.04))
        cfac = 1 + rng.normal(0, 0.015)
        kind = faulty.get(name)
        if kind == "gain":
            gain *= 1 + 0.15 * fault_size
        elif kind == "offset":
            offset += 150 * fault_size
        elif kind == "noise":
            noise *= 1 + 0.6 * fault_size
        elif kind == "contrast":
            cfac *= 1 - 0.25 * fault_size
        day = rng.integers(0, days, n)
        late = day >= days - drift_days
        g = np.full(n, gain)
        if name in drifting:
            g[late] *= 1 + 0.12 * fault_size
        pd_a, pd_b = (6, 3) if name in dense else (2, 5)
        pd = rng.beta(pd_a, pd_b, n)
        thick = rng.normal(48 if name in dense else 55, 8, n)
        fat = 1300 + rng.normal(0, 15, n)
        dense_v = fat + 1000 * cfac + rng.normal(0, 20, n)
        bg = 120 + rng.normal(0, 3, n)
        fat_c = offset + g * fat
        dense_c = offset + g * dense_v
        bg_c = offset + g * bg
        nf = noise * g * (1 + rng.normal(0, 0.05, n))
        cols["station_name"].append(np.full(n, name, dtype=object))
        cols["acquired_date"].append(np.array([(start + dt.timedelta(days=int(d))).strftime("%Y%m%d") for d in day],
                                              dtype=object))
        cols["model"].append(np.full(n, "SYNTH-MAMMO 3000", dtype=object))
        cols["manufacturer"].append(np.full(n, "SYNTHETIC", dtype=object))
        cols["kvp"].append(rng.normal(29, 1, n))
        cols["exposure_mas"].append(rng.normal(120, 15, n))
        cols["thickness_mm"].append(thick)
        cols["compression_n"].append(rng.normal(110, 15, n))
        cols["bg_c"].append(bg_c)
        cols["fat_c"].append(fat_c)
        cols["dense_c"].append(dense_c)
        cols["contrast"].append(dense_c - fat_c)
        cols["noise_bg"].append(noise * g * (1 + rng.normal(0, 0.05, n)))
        cols["noise_fat"].append(nf)
        cols["snr_fat"].append((fat_c - bg_c) / nf)
        cols["cnr"].append((dense_c - fat_c) / nf)
        cols["mean_breast"].append(fat_c + pd * (dense_c - fat_c))
        cols["pd"].append(pd)
        cols["breast_frac"].append(rng.uniform(0.3, 0.6, n))
        cols["saturated_frac"].append(np.zeros(n))
    rows = {k: np.concatenate(v) for k, v in cols.items()}
    return Fleet(rows, set(faulty), dense, drifting)


def write_parquet(fleet: Fleet, path, split: int = 1) -> list:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pathlib import Path

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n = len(fleet.rows["station_name"])
    files = []
    for k, idx in enumerate(np.array_split(np.arange(n), split)):
        t = pa.table({c: v[idx] for c, v in fleet.rows.items()})
        f = path / f"features_{k:03d}.parquet"
        pq.write_table(t, f)
        files.append(f)
    return files
