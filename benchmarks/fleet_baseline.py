"""The previous fleet miner (before issue 14), frozen as the baseline for benchmarks/bench_fleet_recall.py:
robust z >= 5 per raw calibration feature against the station group, no strata, no image-count-aware
threshold.  Not used by the product."""
# ruff: noqa

from __future__ import annotations

import datetime as dt
import glob
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

CALIBRATION = ("bg_c", "fat_c", "dense_c", "contrast", "noise_bg", "noise_fat", "cnr")
POPULATION = ("pd", "breast_frac", "thickness_mm", "compression_n")
EPOCH = dt.date(1970, 1, 1)


# --------------------------------------------------------------------------- input
def expand_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            for ext in ("*.parquet", "*.csv"):
                files.extend(sorted(Path(f) for f in glob.glob(str(p / "**" / ext), recursive=True)))
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such feature file or folder: {p}")
    if not files:
        raise FileNotFoundError("no feature files (*.parquet, *.csv) in the inputs")
    return files


def _days(dates: Any, recorded: Any) -> np.ndarray:
    """Day numbers from acquired_date ('YYYYMMDD'), else from the recorded time."""
    out = np.full(len(dates), np.nan)
    if dates is not None:
        s = np.asarray(dates, dtype=object)
        ok = np.array([isinstance(v, str) and len(v) >= 8 and v[:8].isdigit() for v in s])
        if ok.any():
            d = np.array([v[:4] + "-" + v[4:6] + "-" + v[6:8] for v in s[ok]], dtype="datetime64[D]")
            out[ok] = d.astype(np.int64)
    if recorded is not None:
        rec = np.asarray(recorded, dtype=np.float64)
        miss = np.isnan(out) & ~np.isnan(rec)
        out[miss] = np.floor(rec[miss] / 86400.0)
    return out


@dataclass
class FeatureTable:
    stations: np.ndarray        # station code per row (int32)
    names: list[str]            # code -> station name
    day: np.ndarray             # day number per row (float, NaN unknown)
    values: dict[str, np.ndarray]
    models: dict[str, str] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.stations.size)


def load_table(files: Sequence[Path]) -> FeatureTable:
    """Read feature files (Parquet or CSV) with pyarrow: only the needed columns."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    wanted = ["id", "station_name", "acquired_date", "recorded", "model", *CALIBRATION, *POPULATION]
    tables = []
    for f in files:
        if f.suffix == ".csv":
            t = pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(
                column_types={"acquired_date": pa.string(), "station_name": pa.string(), "model": pa.string()}))
        else:
            t = pq.read_table(f, columns=[c for c in wanted if c in pq.read_schema(f).names])
        cols = {}
        for c in wanted:
            if c in t.column_names:
                col = t[c]
                if c in ("id", "station_name", "acquired_date", "model"):
                    col = pc.cast(col, pa.string())
                else:
                    col = pc.cast(col, pa.float64())
                cols[c] = col
            else:
                typ = pa.string() if c in ("id", "station_name", "acquired_date", "model") else pa.float64()
                cols[c] = pa.nulls(t.num_rows, typ)
        tables.append(pa.table(cols))
    table = pa.concat_tables(tables)
    if table.num_rows == 0:
        raise ValueError("the feature files hold no rows")
    table = _drop_repeated_rows(table)
    enc = pc.dictionary_encode(pc.fill_null(table["station_name"], "UNKNOWN")).combine_chunks()
    names = [str(x) for x in enc.dictionary.to_pylist()]
    stations = np.asarray(enc.indices.to_numpy(zero_copy_only=False), dtype=np.int32)
    values = {c: np.asarray(table[c].to_numpy(zero_copy_only=False), dtype=np.float64)
              for c in (*CALIBRATION, *POPULATION)}
    dates = table["acquired_date"].to_numpy(zero_copy_only=False)
    day = _days(dates, table["recorded"].to_numpy(zero_copy_only=False))
    models: dict[str, str] = {}
    model_col = table["model"].to_numpy(zero_copy_only=False)
    first = np.unique(stations, return_index=True)[1]
    for code, idx in zip(np.unique(stations), first):
        m = model_col[idx]
        models[names[code]] = "" if m is None else str(m)
    return FeatureTable(stations, names, day, values, models)


def _drop_repeated_rows(table: Any) -> Any:
    """A truck that crashed after shipping a file but before recording it ships those rows again: keep
    one row per (station, row id).  Rows without an id are all kept."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = table["id"]
    if ids.null_count == len(ids):
        return table
    key = pc.binary_join_element_wise(pc.fill_null(table["station_name"], ""), pc.fill_null(ids, ""), "\x1f")
    keys = np.asarray(key.to_numpy(zero_copy_only=False), dtype=object)
    has_id = np.asarray(pc.is_valid(ids).to_numpy(zero_copy_only=False), dtype=bool)
    _, first = np.unique(keys[has_id], return_index=True)
    keep = ~has_id
    keep[np.flatnonzero(has_id)[first]] = True
    return table if keep.all() else table.filter(pa.array(keep))


# --------------------------------------------------------------------------- vectorised group statistics
def group_quantiles(keys: np.ndarray, values: np.ndarray, n_groups: int,
                    qs: Sequence[float] = (0.5,)) -> np.ndarray:
    """Quantiles of ``values`` per integer key (NaNs dropped): one sort, no Python loop over groups.
    Returns an array (len(qs), n_groups), NaN for empty groups."""
    ok = ~np.isnan(values)
    k, v = keys[ok], values[ok]
    order = np.lexsort((v, k))
    sk, sv = k[order], v[order]
    groups = np.arange(n_groups)
    starts = np.searchsorted(sk, groups, "left")
    ends = np.searchsorted(sk, groups, "right")
    cnt = ends - starts
    out = np.full((len(qs), n_groups), np.nan)
    has = cnt > 0
    for i, q in enumerate(qs):
        pos = starts[has] + q * (cnt[has] - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.ceil(pos).astype(np.int64)
        w = pos - lo
        out[i, has] = sv[lo] * (1 - w) + sv[hi] * w
    return out


def _nanmedian(x: np.ndarray, axis: int | None = None) -> Any:
    """``np.nanmedian`` where an all-empty column (a feature no image of a group measured, such as
    ``cnr`` on fatty breasts) is NaN without a RuntimeWarning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="All-NaN slice", category=RuntimeWarning)
        return np.nanmedian(x, axis=axis)


def _robust(x: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    med = _nanmedian(x, axis=axis)
    mad = _nanmedian(np.abs(x - np.expand_dims(med, axis)), axis=axis) * 1.4826
    return med, mad


# --------------------------------------------------------------------------- aggregates
@dataclass
class Aggregates:
    names: list[str]
    counts: np.ndarray                         # images per station
    medians: dict[str, np.ndarray]             # feature -> per station
    box: dict[str, np.ndarray]                 # feature -> (5, n_st): p5, q1, median, q3, p95
    days: np.ndarray                           # sorted day numbers present
    daily: dict[str, np.ndarray]               # feature -> (n_st, n_days) daily medians
    first_day: np.ndarray
    last_day: np.ndarray
    models: dict[str, str]
    sample: dict[str, np.ndarray]              # a per-image sample for plots and image clustering


def aggregate_numpy(t: FeatureTable, sample_size: int = 20000, seed: int = 0) -> Aggregates:
    n_st = len(t.names)
    counts = np.bincount(t.stations, minlength=n_st)
    medians, box, daily = {}, {}, {}
    feats = (*CALIBRATION, *POPULATION)
    for f in feats:
        q = group_quantiles(t.stations, t.values[f], n_st, (0.05, 0.25, 0.5, 0.75, 0.95))
        box[f] = q
        medians[f] = q[2]
    known = ~np.isnan(t.day)
    days = np.unique(t.day[known]).astype(np.int64)
    first = np.full(n_st, np.nan)
    last = np.full(n_st, np.nan)
    if days.size:
        di = np.searchsorted(days, t.day[known].astype(np.int64))
        key = t.stations[known].astype(np.int64) * days.size + di
        for f in CALIBRATION:
            daily[f] = group_quantiles(key, t.values[f][known], n_st * days.size)[0].reshape(n_st, days.size)
        dq = group_quantiles(t.stations[known], t.day[known], n_st, (0.0, 1.0))
        first, last = dq[0], dq[1]
    rng = np.random.default_rng(seed)
    idx = rng.choice(t.n, size=min(sample_size, t.n), replace=False)
    sample = {f: t.values[f][idx] for f in feats}
    sample["station"] = t.stations[idx]
    return Aggregates(t.names, counts, medians, box, days, daily, first, last, t.models, sample)


def aggregate_duckdb(files: Sequence[Path], sample_size: int = 20000) -> Aggregates:
    """The same aggregates computed by DuckDB over the files, out of core (a fleet that outgrows RAM)."""
    import duckdb

    con = duckdb.connect()
    pq = [str(f) for f in files if f.suffix != ".csv"]
    csv = [str(f) for f in files if f.suffix == ".csv"]
    parts = []

    def select(source: str) -> str:
        present = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
        exprs = []
        for c in ("id", "station_name", "acquired_date", "recorded", "model", *CALIBRATION, *POPULATION):
            typ = "VARCHAR" if c in ("id", "station_name", "acquired_date", "model") else "DOUBLE"
            exprs.append(f"TRY_CAST({c} AS {typ}) AS {c}" if c in present else f"CAST(NULL AS {typ}) AS {c}")
        return f"SELECT {', '.join(exprs)} FROM {source}"

    if pq:
        parts.append(select(f"read_parquet({pq!r}, union_by_name=true)"))
    if csv:
        parts.append(select(f"read_csv({csv!r}, union_by_name=true, all_varchar=true)"))
    con.execute("CREATE VIEW f0 AS " + " UNION ALL ".join(parts))
    # one row per (station, row id): a re-shipped file counts once (rows without an id all count)
    con.execute("""CREATE VIEW f AS SELECT * EXCLUDE (rn) FROM (SELECT *, CASE WHEN id IS NULL THEN 1 ELSE
        row_number() OVER (PARTITION BY station_name, id) END AS rn FROM f0) WHERE rn = 1""")
    con.execute("""CREATE VIEW g AS SELECT *, COALESCE(station_name, 'UNKNOWN') AS st,
        COALESCE(date_diff('day', DATE '1970-01-01', try_strptime(substr(acquired_date, 1, 8), '%Y%m%d')::DATE),
                 floor(recorded / 86400)::BIGINT) AS day FROM f""")
    feats = (*CALIBRATION, *POPULATION)
    qexpr = ", ".join(f"quantile_cont({c}, [0.05, 0.25, 0.5, 0.75, 0.95]) AS {c}" for c in feats)
    rows = con.execute(f"SELECT st, count(*), min(day), max(day), any_value(model), {qexpr} "
                       "FROM g GROUP BY st ORDER BY st").fetchall()
    names = [r[0] for r in rows]
    code = {n: i for i, n in enumerate(names)}
    n_st = len(names)
    counts = np.array([r[1] for r in rows])
    first = np.array([np.nan if r[2] is None else r[2] for r in rows], dtype=float)
    last = np.array([np.nan if r[3] is None else r[3] for r in rows], dtype=float)
    models = {r[0]: r[4] or "" for r in rows}
    box = {}
    for j, f in enumerate(feats):
        box[f] = np.array([[np.nan] * 5 if r[5 + j] is None else [np.nan if v is None else v for v in r[5 + j]]
                           for r in rows], dtype=float).T
    medians = {f: box[f][2] for f in feats}
    days = np.array([d for (d,) in con.execute("SELECT DISTINCT day FROM g WHERE day IS NOT NULL ORDER BY day")
                     .fetchall()], dtype=np.int64)
    daily = {}
    if days.size:
        mexpr = ", ".join(f"median({c})" for c in CALIBRATION)
        drows = con.execute(f"SELECT st, day, {mexpr} FROM g WHERE day IS NOT NULL GROUP BY st, day").fetchall()
        for f in CALIBRATION:
            daily[f] = np.full((n_st, days.size), np.nan)
        di = {int(d): i for i, d in enumerate(days)}
        for r in drows:
            for j, f in enumerate(CALIBRATION):
                if r[2 + j] is not None:
                    daily[f][code[r[0]], di[int(r[1])]] = r[2 + j]
    srows = con.execute(f"SELECT st, {', '.join(feats)} FROM g USING SAMPLE {int(sample_size)} ROWS").fetchall()
    sample = {f: np.array([np.nan if r[1 + j] is None else r[1 + j] for r in srows], dtype=float)
              for j, f in enumerate(feats)}
    sample["station"] = np.array([code[r[0]] for r in srows], dtype=np.int32)
    return Aggregates(names, counts, medians, box, days, daily, first, last, models, sample)


# --------------------------------------------------------------------------- scoring
@dataclass
class Settings:
    z_flag: float = 5.0
    rel_floor: float = 0.01        # the spread is at least 1% of the group median
    min_shift: float = 0.03        # and a drift must move the feature by at least 3%
    recent_days: int = 7
    min_images: int = 20
    max_groups: int = 4


def _kmeans_groups(X: np.ndarray, max_k: int, min_size: int, seed: int = 0) -> np.ndarray:
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = X.shape[0]
    best_k, best_labels, best_s = 1, np.zeros(n, dtype=int), 0.5  # k > 1 only with a clear structure
    for k in range(2, min(max_k, n - 1) + 1):
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(X)
        big = [c for c in range(k) if (labels == c).sum() >= min_size]
        if len(big) < 2:
            continue
        s = silhouette_score(X, labels)
        if s > best_s:
            best_k, best_labels, best_s = k, labels, s
    if best_k == 1:
        return best_labels
    sizes = np.bincount(best_labels, minlength=best_k)
    big = [c for c in range(best_k) if sizes[c] >= min_size]
    centres = np.array([np.median(X[best_labels == c], axis=0) for c in big])
    out = np.empty(n, dtype=int)
    for i in range(n):
        out[i] = int(np.argmin(((centres - X[i]) ** 2).sum(axis=1)))
    return out


def _day_str(day: float) -> str | None:
    if day is None or np.isnan(day):
        return None
    return (EPOCH + dt.timedelta(days=int(day))).isoformat()


@dataclass
class MineResult:
    report: dict[str, Any]
    agg: Aggregates
    groups: np.ndarray
    z: dict[str, np.ndarray]
    flagged: list[str]


def _station_groups(medians: np.ndarray, usable: np.ndarray, s: Settings) -> np.ndarray:
    """Each usable station's group (stations of one scanner type cluster apart); -1 when not scored.
    A group must be large (a fifth of the fleet, at least 5): a handful of broken scanners that look
    alike must not become a "normal" of their own."""
    med, mad = _robust(medians[usable])
    scale = np.where(mad > 0, mad, np.abs(med) * s.rel_floor + 1e-9)
    standardized = np.nan_to_num((medians - med) / scale)
    min_group = max(5, int(np.ceil(0.2 * usable.sum())))
    groups = np.full(len(medians), -1)
    if usable.sum() >= 2 * min_group:
        groups[usable] = _kmeans_groups(standardized[usable], s.max_groups, min_group)
    elif usable.any():
        groups[usable] = 0
    return groups


def _group_z(medians: np.ndarray, groups: np.ndarray,
             s: Settings) -> tuple[np.ndarray, dict[int, dict[str, float]]]:
    """Robust z of each station's feature medians against its group's, and the groups' medians."""
    z = np.full_like(medians, np.nan)
    group_medians: dict[int, dict[str, float]] = {}
    for g in np.unique(groups[groups >= 0]):
        members = groups == g
        gmed, gmad = _robust(medians[members])
        z[members] = (medians[members] - gmed) / np.maximum(gmad, np.abs(gmed) * s.rel_floor + 1e-9)
        group_medians[int(g)] = {f: float(_nanmedian(medians[members, j])) for j, f in enumerate(CALIBRATION)}
    return z, group_medians


def _drift_onset(daily: np.ndarray, base_median: float, spread: float, z_flag: float) -> int | None:
    """The first day of the unbroken run of deviating days that ends the record (days without images
    skipped), or None."""
    deviating = np.abs(daily - base_median) / spread >= z_flag / 2
    onset = None
    for day in range(len(daily) - 1, -1, -1):
        if np.isnan(daily[day]):
            continue
        if not deviating[day]:
            break
        onset = day
    return onset


def _drift(agg: Aggregates, usable: np.ndarray, s: Settings) -> tuple[dict[int, list[dict[str, Any]]], np.ndarray]:
    """Per station: the calibration features whose last ``recent_days`` moved away from the station's
    own earlier days (robust z and a minimum relative shift), with the day it began."""
    drift: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(agg.names))}
    drift_z = np.zeros(len(agg.names))
    if not agg.days.size:
        return drift, drift_z
    recent = agg.days > agg.days.max() - s.recent_days
    if not recent.any() or (~recent).sum() < 3:
        return drift, drift_z
    for f in CALIBRATION:
        daily = agg.daily[f]
        base = daily[:, ~recent]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            base_med, base_mad = _robust(base, axis=1)
        n_base = (~np.isnan(base)).sum(axis=1)
        spread = np.maximum(base_mad, np.abs(base_med) * s.rel_floor + 1e-9)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # stations without recent days: NaN
            recent_med = np.nanmedian(np.where(recent[None, :], daily, np.nan), axis=1)
        z = (recent_med - base_med) / spread
        rel = (recent_med - base_med) / np.where(np.abs(base_med) > 0, np.abs(base_med), 1)
        hit = (n_base >= 3) & (np.abs(z) >= s.z_flag) & (np.abs(rel) >= s.min_shift) & usable
        for i in map(int, np.flatnonzero(hit)):
            onset = _drift_onset(daily[i], float(base_med[i]), float(spread[i]), s.z_flag)
            drift[i].append({"feature": f, "z": round(float(z[i]), 1), "shift_pct": round(float(rel[i]) * 100, 1),
                             "since": _day_str(agg.days[onset]) if onset is not None else None})
            drift_z[i] = max(drift_z[i], abs(float(z[i])))
    return drift, drift_z


def _reasons(i: int, z_row: dict[str, float | None], medians: np.ndarray, group_median: dict[str, float],
             drift: list[dict[str, Any]], s: Settings) -> list[str]:
    """Why a station is flagged, in the fleet manager's words."""
    reasons = []
    for j, f in enumerate(CALIBRATION):
        z = z_row[f]
        if z is not None and abs(z) >= s.z_flag:
            ref = group_median.get(f) or 0.0
            pct = (medians[i, j] - ref) / abs(ref) * 100 if ref else float("nan")
            reasons.append(f"{f} {pct:+.1f}% vs its group's median (robust z {z:+.1f})")
    for d in drift:
        reasons.append(f"{d['feature']} drifted {d['shift_pct']:+.1f}% in the last {s.recent_days} days"
                       + (f", since {d['since']}" if d["since"] else "") + f" (robust z {d['z']:+.1f})")
    return reasons


def score(agg: Aggregates, s: Settings | None = None) -> MineResult:
    """Flag the stations whose scanner stands out from its group, or drifted from its own past, on
    calibration features only (the population's features, such as percent density, are reported,
    never scored: a truck whose patients differ is not a broken scanner)."""
    s = s or Settings()
    medians = np.column_stack([agg.medians[f] for f in CALIBRATION])
    usable = (agg.counts >= s.min_images) & ~np.isnan(medians).all(axis=1)
    groups = _station_groups(medians, usable, s)
    z, group_medians = _group_z(medians, groups, s)
    drift, drift_z = _drift(agg, usable, s)
    rare_share = _image_cluster_rarity(agg)  # per-image clustering: share of images in fleet-rare clusters
    stations: dict[str, Any] = {}
    flagged = []
    for i, name in enumerate(agg.names):
        z_row = {f: (None if np.isnan(z[i, j]) else round(float(z[i, j]), 2)) for j, f in enumerate(CALIBRATION)}
        level = max([abs(v) for v in z_row.values() if v is not None] or [0.0])
        reasons = (_reasons(i, z_row, medians, group_medians.get(int(groups[i]), {}), drift[i], s)
                   if usable[i] else [])
        is_flagged = bool(usable[i] and reasons)
        if is_flagged:
            flagged.append(name)
        stations[name] = {
            "score": round(max(level, float(drift_z[i])) if usable[i] else 0.0, 2), "flagged": is_flagged,
            "reasons": reasons, "group": int(groups[i]), "n_images": int(agg.counts[i]),
            "model": agg.models.get(name, ""),
            "first_date": _day_str(agg.first_day[i]), "last_date": _day_str(agg.last_day[i]),
            "medians": {f: (None if np.isnan(agg.medians[f][i]) else round(float(agg.medians[f][i]), 3))
                        for f in (*CALIBRATION, *POPULATION)},
            "z": z_row, "drift": drift[i], "rare_image_share": round(float(rare_share[i]), 3),
            "note": None if usable[i] else f"fewer than {s.min_images} images: not scored",
        }
    flagged.sort(key=lambda n: -stations[n]["score"])
    report = {
        "flagged_stations": flagged,
        "stations": stations,
        "n_images": int(agg.counts.sum()), "n_stations": len(agg.names),
        "groups": {str(g): {"stations": int((groups == g).sum()), "medians": m} for g, m in group_medians.items()},
        "method": {"calibration_features": list(CALIBRATION), "population_features_not_scored": list(POPULATION),
                   "z_flag": s.z_flag, "rel_floor": s.rel_floor, "min_shift": s.min_shift,
                   "recent_days": s.recent_days, "min_images": s.min_images},
    }
    return MineResult(report, agg, groups, {f: z[:, j] for j, f in enumerate(CALIBRATION)}, flagged)


def _image_cluster_rarity(agg: Aggregates, k: int = 6) -> np.ndarray:
    from sklearn.cluster import KMeans

    X = np.column_stack([agg.sample[f] for f in CALIBRATION])
    ok = ~np.isnan(X).any(axis=1)
    n_st = len(agg.names)
    if ok.sum() < 10 * k:
        return np.zeros(n_st)
    X = X[ok]
    med, mad = _robust(X)
    X = (X - med) / np.where(mad > 0, mad, 1)
    labels = KMeans(n_clusters=k, n_init=3, random_state=0).fit_predict(X)
    share = np.bincount(labels, minlength=k) / labels.size
    rare = share[labels] < 0.5 / k
    st = agg.sample["station"][ok]
    tot = np.bincount(st, minlength=n_st)
    rare_n = np.bincount(st, weights=rare, minlength=n_st)
    return np.where(tot > 0, rare_n / np.maximum(tot, 1), 0.0)


def mine(inputs: Sequence[str | os.PathLike[str]], engine: str = "numpy",
         settings: Settings | None = None) -> MineResult:
    files = expand_inputs(inputs)
    agg = aggregate_duckdb(files) if engine == "duckdb" else aggregate_numpy(load_table(files))
    return score(agg, settings)
