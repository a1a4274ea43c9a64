"""A synthetic fleet: per-image feature rows from many trucks, with known faults.

Each station has a scanner (gain, offset, noise, contrast factor, with small healthy calibration jitter)
and a patient population (percent density, compressed thickness).  Every image is acquired the way a
mammography unit's automatic exposure control (AEC) does it, so its features depend legitimately on what
was imaged:

* view: CC or MLO (an MLO is about 4 mm thicker and holds the pectoral muscle: a little less contrast);
* compressed thickness: the AEC picks the kV (26 kV at 40 mm, one more per 6 mm) and the filter
  (W/Rh below 60 mm, W/Ag above): a harder beam and more scatter give less subject contrast;
* the signal behind fat falls a little with thickness and the relative noise rises (the AEC compensates
  only in part);
* implants (about 3% of views) and FOR PROCESSING copies (some stations ship both) have features that
  mean something else and must be left out.

Class centres follow the scanner, not the patients: a denser population raises ``pd``, not the centres;
a thicker population lowers the contrast through the kV and the filter, which a fair miner compares with
the same kV, filter, view and thickness elsewhere.

Faults (sizes at ``fault_size`` 1): ``gain`` +15%, ``offset`` +150, ``noise`` x1.6, ``contrast``
(beam quality) -25%; the composite ones of a fleet built outside the project: ``ageing`` (detector
ageing: gain -10%, noise +15%) and ``beam`` (kV/filter drift: offset +60, contrast -11%, noise +12%); a
drift is a gain rise of 12% over the last ``drift_days`` days.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FAULTS = ("gain", "offset", "noise", "contrast")
COMPOSITE = ("ageing", "beam")
#: the healthy calibration jitter between stations (one standard deviation)
JITTER = {"gain": 0.015, "offset": 8.0, "noise": 0.04, "contrast": 0.015}


@dataclass
class Fleet:
    rows: dict[str, np.ndarray]
    faulty: set[str] = field(default_factory=set)
    dense_population: set[str] = field(default_factory=set)
    drifting: set[str] = field(default_factory=set)
    thick_population: set[str] = field(default_factory=set)
    kinds: dict[str, str] = field(default_factory=dict)     # faulty station -> fault kind
    legacy: set[str] = field(default_factory=set)           # rows without view, kV, thickness, intent
    scanners: dict[str, dict[str, float]] = field(default_factory=dict)  # the truth: gain, offset, noise...

    @property
    def different_populations(self) -> set[str]:
        return self.dense_population | self.thick_population


def _scanner(rng: np.random.Generator, kind: str | None, size: float) -> dict[str, float]:
    s = {"gain": 1 + rng.normal(0, JITTER["gain"]), "offset": rng.normal(0, JITTER["offset"]),
         "noise": 25 * (1 + rng.normal(0, JITTER["noise"])), "contrast": 1 + rng.normal(0, JITTER["contrast"])}
    if kind == "gain":
        s["gain"] *= 1 + 0.15 * size
    elif kind == "offset":
        s["offset"] += 150 * size
    elif kind == "noise":
        s["noise"] *= 1 + 0.6 * size
    elif kind == "contrast":
        s["contrast"] *= 1 - 0.25 * size
    elif kind == "ageing":
        s["gain"] *= 1 - 0.10 * size
        s["noise"] *= 1 + 0.15 * size
    elif kind == "beam":
        s["offset"] += 60 * size
        s["contrast"] *= 1 - 0.11 * size
        s["noise"] *= 1 + 0.12 * size
    return s


def _acquire(rng: np.random.Generator, n: int, thickness_mean: float) -> dict[str, np.ndarray]:
    """What the AEC does with each woman: view, thickness, kV, filter, and the physics factors."""
    mlo = rng.random(n) < 0.5
    thick = np.clip(rng.normal(thickness_mean, 9, n) + 4 * mlo, 20, 100)
    kvp = np.clip(np.round(26 + (thick - 40) / 6), 24, 35)
    silver = thick >= 60
    return {
        "view": np.where(mlo, "MLO", "CC").astype(object),
        "thickness_mm": thick, "kvp": kvp,
        "filter": np.where(silver, "SILVER", "RHODIUM").astype(object),
        "contrast": (np.exp(-0.045 * (kvp - 28)) * np.where(silver, 0.94, 1.0) * np.where(mlo, 0.97, 1.0)
                     * np.exp(-0.004 * (thick - 55))),
        "signal": (1 - 0.002 * (thick - 55)) * np.where(mlo, 1.01, 1.0),
        "noise": 1 + 0.005 * (thick - 55),
    }


def make_fleet(n_stations: int = 40, images_per_station: int = 300, days: int = 28, seed: int = 0,
               n_faulty: int = 4, fault_size: float = 1.0, n_dense: int = 1, n_drift: int = 1,
               drift_days: int = 5, n_thick: int = 0, n_processing: int = 0, n_legacy: int = 0,
               faults: tuple[str, ...] = FAULTS, drift_kind: str = "gain", drift_size: float = 0.12) -> Fleet:
    """``n_faulty`` stations get the ``faults`` in turn; ``n_dense`` a much denser population (percent
    density Beta(6,3), thinner breasts); ``n_thick`` a population with thicker breasts (mean 66 mm
    instead of 55: higher kV, more silver filter); ``n_processing`` also ship a FOR PROCESSING copy of a
    third of their images; ``n_legacy`` run an older version whose rows have no view, kV, filter,
    thickness, intent or implant columns.  ``n_drift`` stations change during the record: over the last
    ``drift_days`` days their ``drift_kind`` ("gain", "noise" or "contrast") moves by ``drift_size`` x
    ``fault_size`` (gain and noise up, contrast down)."""
    rng = np.random.default_rng(seed)
    names = [f"MOBILE_UNIT_{i:03d}" for i in range(n_stations)]
    order = [names[i] for i in rng.permutation(n_stations)]
    kinds = {name: faults[k % len(faults)] for k, name in enumerate(order[:n_faulty])}
    taken = n_faulty
    groups = {}
    for label, count in (("dense", n_dense), ("drift", n_drift), ("thick", n_thick), ("processing", n_processing),
                         ("legacy", n_legacy)):
        groups[label] = set(order[taken:taken + count])
        taken += count
    cols: dict[str, list[np.ndarray]] = {k: [] for k in (
        "station_name", "acquired_date", "model", "manufacturer", "kvp", "exposure_mas", "thickness_mm",
        "compression_n", "bg_c", "fat_c", "dense_c", "contrast", "noise_bg", "noise_fat", "snr_fat", "cnr",
        "mean_breast", "pd", "breast_frac", "saturated_frac", "view", "laterality", "presentation_intent",
        "implant", "anode", "filter")}
    start = dt.date(2026, 10, 1)

    def emit(name: str, sc: dict[str, float], n: int, dense: bool, thick_mean: float, drifting: bool,
             processing: bool) -> None:
        day = rng.integers(0, days, n)
        g = np.full(n, sc["gain"])
        late = day >= days - drift_days
        step = np.where(drifting & late, drift_size * fault_size, 0.0)
        if drift_kind == "gain":
            g *= 1 + step
        acq = _acquire(rng, n, thick_mean)
        implant = rng.random(n) < 0.03
        pd = rng.beta(6, 3, n) if dense else rng.beta(2, 5, n)
        bg = 120 + rng.normal(0, 3, n)
        fat = bg + 1180 * acq["signal"] + rng.normal(0, 15, n)
        cfac = sc["contrast"] * acq["contrast"] * np.where(implant, 0.5, 1.0)
        if drift_kind == "contrast":
            cfac = cfac * (1 - step)
        dense_v = fat + 1000 * cfac + rng.normal(0, 20, n)
        noise = sc["noise"] * acq["noise"] * (1 + (step if drift_kind == "noise" else 0.0))
        offset = sc["offset"]
        if processing:  # raw detector values: another scale altogether
            bg, fat, dense_v, noise, offset = bg * 40, fat * 3.1, fat * 3.1 + 260 * cfac, noise * 2.4, 0.0
        bg_c, fat_c, dense_c = offset + g * bg, offset + g * fat, offset + g * dense_v
        nf = noise * g * (1 + rng.normal(0, 0.05, n))
        cols["station_name"].append(np.full(n, name, dtype=object))
        cols["acquired_date"].append(np.array([(start + dt.timedelta(days=int(d))).strftime("%Y%m%d") for d in day],
                                              dtype=object))
        cols["model"].append(np.full(n, "SYNTH-MAMMO 3000", dtype=object))
        cols["manufacturer"].append(np.full(n, "SYNTHETIC", dtype=object))
        cols["kvp"].append(acq["kvp"])
        cols["exposure_mas"].append(rng.normal(120, 15, n) * np.exp(0.02 * (acq["thickness_mm"] - 55)))
        cols["thickness_mm"].append(acq["thickness_mm"])
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
        cols["view"].append(acq["view"])
        cols["laterality"].append(np.where(rng.random(n) < 0.5, "L", "R").astype(object))
        cols["presentation_intent"].append(np.full(n, "FOR PROCESSING" if processing else "FOR PRESENTATION",
                                                   dtype=object))
        cols["implant"].append(implant.astype(float))
        cols["anode"].append(np.full(n, "TUNGSTEN", dtype=object))
        cols["filter"].append(acq["filter"])
        if name in groups["legacy"]:
            for c in ("view", "laterality", "presentation_intent", "anode", "filter"):
                cols[c][-1] = np.full(n, None, dtype=object)
            for c in ("kvp", "thickness_mm", "implant"):
                cols[c][-1] = np.full(n, np.nan)

    scanners = {}
    for name in names:
        sc = scanners[name] = _scanner(rng, kinds.get(name), fault_size)
        dense = name in groups["dense"]
        thick_mean = 48.0 if dense else 66.0 if name in groups["thick"] else 55.0
        emit(name, sc, images_per_station, dense, thick_mean, name in groups["drift"], False)
        if name in groups["processing"]:
            emit(name, sc, images_per_station // 3, dense, thick_mean, False, True)
    rows = {k: np.concatenate(v) for k, v in cols.items()}
    return Fleet(rows, set(kinds), groups["dense"], groups["drift"], groups["thick"], kinds, groups["legacy"],
                 scanners)


def oracle_misses(fleet: Fleet, z_critical: float) -> dict[str, int]:
    """Faulty stations that even a detector knowing the healthy spread exactly (JITTER) would miss: the
    fault plus the unit's own jitter sits within ``z_critical`` healthy SDs of a healthy unit on every
    parameter the fault moves.  (Images per station are ignored: their error is far smaller.)"""
    missed: dict[str, int] = {}
    for name, kind in fleet.kinds.items():
        z = _z(fleet.scanners[name])
        moved = {"ageing": ("gain", "noise"), "beam": ("offset", "contrast", "noise")}.get(kind, (kind,))
        if all(abs(z[p]) < z_critical for p in moved):
            missed[kind] = missed.get(kind, 0) + 1
    return missed


def _z(sc: dict[str, float]) -> dict[str, float]:
    """A scanner's parameters in healthy standard deviations from the nominal scanner (JITTER)."""
    return {"gain": float(np.log(sc["gain"]) / JITTER["gain"]), "offset": sc["offset"] / JITTER["offset"],
            "noise": float(np.log(sc["noise"] / 25) / JITTER["noise"]),
            "contrast": float(np.log(sc["contrast"]) / JITTER["contrast"])}


def oracle_outliers(fleet: Fleet, z_critical: float) -> dict[str, dict[str, float]]:
    """Stations with no planted fault whose scanner's own jitter lies ``z_critical`` healthy SDs or more from
    the nominal scanner: station -> {parameter: its z} for each such parameter.  A detector knowing every
    scanner's true parameters flags them too (the draw made an outlying scanner); a population station
    flagged on exactly those parameters, in the same direction, is flagged for its scanner, not for its
    patients."""
    bad = fleet.faulty | fleet.drifting
    out: dict[str, dict[str, float]] = {}
    for name, sc in fleet.scanners.items():
        far = {p: z for p, z in _z(sc).items() if abs(z) >= z_critical}
        if name not in bad and far:
            out[name] = far
    return out


def flagged_for_its_scanner(findings: list[dict], outlying: dict[str, float]) -> bool:
    """Every parameter the miner flagged (``report["stations"][name]["findings"]``) is a level finding on one
    the scanner itself is out on (``oracle_outliers``' entry for it), with the same sign (a change over time
    is never the scanner's draw)."""
    return bool(findings) and all(f.get("test", "level") == "level" and f["parameter"] in outlying
                                  and (f["z"] > 0) == (outlying[f["parameter"]] > 0) for f in findings)


def write_parquet(fleet: Fleet, path: str | Path, split: int = 1) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

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
