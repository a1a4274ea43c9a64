"""The fleet miner's data: feature files in, per-station and per-day aggregates out (numpy or DuckDB).

What is aggregated is not the raw features but four **QC parameters** per image, each tracking one part
of the scanner and each compared like with like:

* ``gain``     ln(fat_c - bg_c): the signal the detector gives for the same tissue;
* ``offset``   (bg_c - K (fat_c - bg_c)) / S: the dark level, gain-free, as a fraction of the fleet's
  signal S (K = the fleet's median bg_c / S);
* ``contrast`` ln((dense_c - fat_c) / (fat_c - bg_c)): subject contrast per unit of signal (beam quality);
* ``noise``    mean of ln(noise_fat) and ln(noise_bg), minus ln(fat_c - bg_c): noise per unit of signal.

Like with like: only FOR PRESENTATION images without implants are used (rows without those columns are
kept), and each image's parameters are adjusted for what legitimately changes them: the **stratum** (view
x compressed-thickness band of 5 mm), the **kV** and the **target/filter**.  The adjustment is an additive
model fitted on the cells (station x stratum x kV x target/filter: their image count and median) by
backfitting with a **station effect**: each factor's effect is learnt from the differences *within*
stations, so a truck whose women are thicker (or a faulty scanner) cannot teach the miner its own
effect; it is compared with the fleet's images of the same view, thickness, kV and filter.  A level seen
at fewer than ``min_stations`` stations or ``min_rows`` images takes the effect of the nearest supported
level of its family (the next thickness band of the same view, the next kV); an unknown level (rows from
an older version) gets no effect: those images are compared with the fleet's average image.

Both engines build the same cell table (numpy from pyarrow columns; DuckDB over the files, out of core),
fit the same model on it (:func:`fit_effects`), and take the same residual quantiles.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

CALIBRATION = ("bg_c", "fat_c", "dense_c", "contrast", "noise_bg", "noise_fat", "cnr")
POPULATION = ("pd", "breast_frac", "thickness_mm", "compression_n")
PARAMETERS = ("gain", "offset", "contrast", "noise")
TEXT = ("id", "station_name", "acquired_date", "model", "view", "presentation_intent", "anode", "filter")
NUMBERS = ("recorded", "kvp", "implant", *CALIBRATION, *POPULATION)
#: view codes pooled into the projection that shapes the image
VIEW_CLASS = {"CC": "CC", "XCCL": "CC", "XCCM": "CC", "FB": "CC", "MLO": "MLO", "LMO": "MLO", "SIO": "MLO",
              "ML": "LAT", "LM": "LAT"}
#: the fallback chain of strata, finest first
FACTORS = ("stratum", "kv", "tf")
FACTOR_NAMES = {"stratum": "view and thickness band", "kv": "kV", "tf": "target/filter"}


# --------------------------------------------------------------------------- input
def expand_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            # Files only: a Parquet dataset is a folder named like a file (rows.parquet/part-0.parquet).
            found = [Path(f) for ext in ("*.parquet", "*.csv")
                     for f in sorted(glob.glob(str(p / "**" / ext), recursive=True)) if Path(f).is_file()]
            parted = [f for f in found if any(part.startswith("station_name=")
                                              for part in f.relative_to(p).parts[:-1])]
            if parted:
                # Hive partitioning by station_name keeps that column in the folder names only: read file by
                # file it would be lost and the fleet mined as one station.  (The fleet service's
                # station=/day= folders hold files that carry station_name themselves: read as they are.)
                raise ValueError(f"{p} is a partitioned dataset ({parted[0].relative_to(p).parts[0]}/...): its "
                                 "columns live in the folder names; export one file per shipment instead")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such feature file or folder: {p}")
    if not files:
        raise FileNotFoundError("no feature files (*.parquet, *.csv) in the inputs")
    return files


@dataclass
class Strata:
    band_mm: float = 5.0       # compressed-thickness band width
    min_stations: int = 5      # a factor level gets its own effect when seen at this many stations
    min_rows: int = 20         # and this many images


# --------------------------------------------------------------------------- vectorised group statistics
def group_quantiles(keys: np.ndarray, values: np.ndarray, n_groups: int,
                    qs: Sequence[float] = (0.5,)) -> np.ndarray:
    """Quantiles of ``values`` per integer key (NaNs dropped): one sort, no Python loop over groups.
    Returns an array (len(qs), n_groups), NaN for empty groups.  Linear interpolation, as DuckDB's
    ``quantile_cont``."""
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


def _count(keys: np.ndarray, values: np.ndarray, n_groups: int) -> np.ndarray:
    return np.bincount(keys, weights=~np.isnan(values), minlength=n_groups).astype(np.int64)


# --------------------------------------------------------------------------- aggregates
@dataclass
class Aggregates:
    names: list[str]
    models: dict[str, str]
    counts: np.ndarray                         # images used per station
    left_out: dict[str, np.ndarray]            # reason -> images left out per station
    box: dict[str, np.ndarray]                 # raw feature -> (5, n_st): p5, q1, median, q3, p95
    level: dict[str, np.ndarray]               # parameter -> (3, n_st): q1, median, q3 of the residual
    n: dict[str, np.ndarray]                   # parameter -> images with a value, per station
    days: np.ndarray                           # sorted day numbers present
    daily: dict[str, np.ndarray]               # parameter -> (n_st, n_days) daily medians of the residual
    daily_n: dict[str, np.ndarray]             # parameter -> (n_st, n_days) images per day
    first_day: np.ndarray
    last_day: np.ndarray
    constants: dict[str, float]                # K and S of the offset parameter
    strata_used: dict[str, int]                # factor -> images adjusted for it (the rest: pooled)

    @property
    def medians(self) -> dict[str, np.ndarray]:
        return {f: q[2] for f, q in self.box.items()}


def _codes(values: Any, normalise: Any = None) -> np.ndarray:
    """Integer codes of a pyarrow string column (missing -> one code of its own)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = pc.utf8_upper(pc.utf8_trim_whitespace(pc.fill_null(pc.cast(values, pa.string()), "?")))
    enc = pc.dictionary_encode(col).combine_chunks()
    words = [str(w) for w in enc.dictionary.to_pylist()]
    if normalise is not None:
        words = [normalise(w) for w in words]
    _, remap = np.unique(np.array(words, dtype=object), return_inverse=True)
    return np.asarray(remap, dtype=np.int64)[np.asarray(enc.indices.to_numpy(zero_copy_only=False), dtype=np.int64)]


def _number_code(x: np.ndarray, step: float) -> np.ndarray:
    """floor(x / step) as an integer code, -1 where unknown."""
    out = np.full(x.shape, -1, dtype=np.int64)
    ok = np.isfinite(x)
    out[ok] = np.floor(x[ok] / step).astype(np.int64)
    return out


def _row_parameters(v: dict[str, np.ndarray], K: float, S: float) -> dict[str, np.ndarray]:
    with np.errstate(all="ignore"):
        sig = v["fat_c"] - v["bg_c"]
        ok = sig > 0
        lsig = np.where(ok, np.log(np.where(ok, sig, 1.0)), np.nan)
        contrast = v["contrast"]
        nf, nb = v["noise_fat"], v["noise_bg"]
        return {
            "gain": lsig,
            "offset": np.where(ok, (v["bg_c"] - K * sig) / S, np.nan),
            "contrast": np.where(ok & (contrast > 0), np.log(np.where(contrast > 0, contrast, 1.0)) - lsig, np.nan),
            "noise": np.where(ok & (nf > 0) & (nb > 0),
                              0.5 * (np.log(np.where(nf > 0, nf, 1.0)) + np.log(np.where(nb > 0, nb, 1.0))) - lsig,
                              np.nan),
        }


def _read(files: Sequence[Path]) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    tables = []
    for f in files:
        if f.suffix == ".csv":
            t = pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in TEXT}))
        else:
            t = pq.read_table(f, columns=[c for c in (*TEXT, *NUMBERS) if c in pq.read_schema(f).names])
        cols = {}
        for c in (*TEXT, *NUMBERS):
            typ = pa.string() if c in TEXT else pa.float64()
            cols[c] = pc.cast(t[c], typ) if c in t.column_names else pa.nulls(t.num_rows, typ)
        tables.append(pa.table(cols))
    table = pa.concat_tables(tables)
    if table.num_rows == 0:
        raise ValueError("the feature files hold no rows")
    return _drop_repeated_rows(table)


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


def _floats(table: Any, c: str) -> np.ndarray:
    """A numeric column; NaN and infinities are "unknown" (NaN), as in the DuckDB engine."""
    x = np.asarray(table[c].to_numpy(zero_copy_only=False), dtype=np.float64)
    return np.where(np.isfinite(x), x, np.nan)


def _day_numbers(table: Any) -> np.ndarray:
    """Day numbers from acquired_date ('YYYYMMDD...'), else from the recorded time (seconds)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    stamp = pc.strptime(pc.utf8_slice_codeunits(table["acquired_date"], 0, 8), format="%Y%m%d", unit="s",
                        error_is_null=True)
    day = np.asarray(pc.cast(stamp, pa.int64()).to_numpy(zero_copy_only=False), dtype=np.float64) / 86400.0
    rec = np.floor(_floats(table, "recorded") / 86400.0)
    return np.where(np.isnan(day), rec, day)


def aggregate_numpy(files: Sequence[Path], strata: Strata | None = None) -> Aggregates:
    """Read the files with pyarrow (only the needed columns) and aggregate in vectorised numpy."""
    import pyarrow.compute as pc

    st_cfg = strata or Strata()
    table = _read(files)
    enc = pc.dictionary_encode(pc.fill_null(table["station_name"], "UNKNOWN")).combine_chunks()
    names = [str(x) for x in enc.dictionary.to_pylist()]
    station_all = np.asarray(enc.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
    n_st = len(names)
    intent = np.asarray(pc.equal(pc.utf8_upper(pc.utf8_trim_whitespace(table["presentation_intent"])),
                                 "FOR PROCESSING").to_numpy(zero_copy_only=False), dtype=object)
    processing = intent == True  # noqa: E712 (None stays out)
    implant = np.nan_to_num(_floats(table, "implant")) > 0.5
    left_out = {"for_processing": np.bincount(station_all[processing], minlength=n_st),
                "implant": np.bincount(station_all[implant & ~processing], minlength=n_st)}
    keep = ~(processing | implant)
    station = station_all[keep]
    raw = {c: _floats(table, c)[keep] for c in (*CALIBRATION, *POPULATION)}
    day = _day_numbers(table)[keep]
    by_station = table.group_by("station_name").aggregate([("model", "min")]).to_pydict()
    models = {("UNKNOWN" if s is None else s): m or "" for s, m in zip(by_station["station_name"],
                                                                       by_station["model_min"])}
    counts = np.bincount(station, minlength=n_st)
    box = {c: group_quantiles(station, raw[c], n_st, (0.05, 0.25, 0.5, 0.75, 0.95)) for c in raw}

    sig = raw["fat_c"] - raw["bg_c"]
    valid = sig > 0
    S = float(np.median(sig[valid])) if valid.any() else 1.0
    K = float(np.median(raw["bg_c"][valid])) / S if valid.any() else 0.0
    params = _row_parameters(raw, K, S)

    def keep_codes(col: str, normalise: Any = None) -> np.ndarray:
        return np.asarray(_codes(table[col], normalise)[keep])

    view = keep_codes("view", lambda w: VIEW_CLASS.get(w, w))
    band = _number_code(_floats(table, "thickness_mm")[keep], st_cfg.band_mm)
    codes = {"stratum": view * (int(band.max(initial=0)) + 2) + band + 1,
             "kv": _number_code(_floats(table, "kvp")[keep] + 0.5, 1.0),
             "tf": _codes(pc.binary_join_element_wise(pc.fill_null(table["anode"], "?"),
                                                      pc.fill_null(table["filter"], "?"), "/"))[keep]}
    cell, cell_of_row = np.unique(_combine([station, *(codes[f] for f in FACTORS)]), return_inverse=True)
    first_row = np.zeros(cell.size, dtype=np.int64)
    first_row[cell_of_row[::-1]] = np.arange(station.size)[::-1]
    cells = Cells(station[first_row], {f: codes[f][first_row] for f in FACTORS},
                  {p: _count(cell_of_row, params[p], cell.size) for p in PARAMETERS},
                  {p: group_quantiles(cell_of_row, params[p], cell.size)[0] for p in PARAMETERS},
                  *_ordinals(view[first_row], band[first_row], codes["kv"][first_row]))
    effects, used = fit_effects(cells, n_st, st_cfg)
    dense = {f: cell_codes(cells, f) for f in FACTORS}
    resid = {p: params[p] - sum(effects[p][f][dense[f]] for f in FACTORS)[cell_of_row] for p in PARAMETERS}
    level, n = {}, {}
    for p in PARAMETERS:
        level[p] = group_quantiles(station, resid[p], n_st, (0.25, 0.5, 0.75))
        n[p] = _count(station, resid[p], n_st)
    known = ~np.isnan(day)
    days = np.unique(day[known]).astype(np.int64)
    daily, daily_n = {}, {}
    first = np.full(n_st, np.nan)
    last = np.full(n_st, np.nan)
    if days.size:
        di = np.searchsorted(days, day[known].astype(np.int64))
        key = station[known] * days.size + di
        for p in PARAMETERS:
            daily[p] = group_quantiles(key, resid[p][known], n_st * days.size)[0].reshape(n_st, days.size)
            daily_n[p] = _count(key, resid[p][known], n_st * days.size).reshape(n_st, days.size)
        dq = group_quantiles(station[known], day[known], n_st, (0.0, 1.0))
        first, last = dq[0], dq[1]
    return Aggregates(names, models, counts, left_out, box, level, n, days, daily, daily_n, first, last,
                      {"K": K, "S": S}, used)


def _combine(columns: list[np.ndarray]) -> np.ndarray:
    """One int64 key from several small non-negative-able integer codes (mixed radix)."""
    key = np.zeros(columns[0].shape, dtype=np.int64)
    for c in columns:
        c = c - int(c.min(initial=0))
        key = key * (int(c.max(initial=0)) + 1) + c
    return key


def _ordinals(view: np.ndarray, band: np.ndarray, kv: np.ndarray) -> tuple[dict[str, np.ndarray], ...]:
    """Families and positions of the ordinal factors, per cell: a band within its view; the kV."""
    family = {"stratum": np.unique(view, return_inverse=True)[1].astype(float), "kv": np.zeros(kv.size)}
    order = {"stratum": np.where(band >= 0, band, np.nan).astype(float),
             "kv": np.where(kv >= 0, kv, np.nan).astype(float)}
    return family, order


@dataclass
class Cells:
    """Images grouped by station x stratum x kV x target/filter: the additive model's data."""
    station: np.ndarray
    codes: dict[str, np.ndarray]     # factor -> level code per cell (any integers)
    count: dict[str, np.ndarray]     # parameter -> images with a value per cell
    median: dict[str, np.ndarray]    # parameter -> median per cell
    family: dict[str, np.ndarray]    # ordinal factor -> the family its level belongs to (the view of a band)
    order: dict[str, np.ndarray]     # ordinal factor -> the level's position (band, kV); NaN when unknown


def cell_codes(cells: Cells, f: str) -> np.ndarray:
    """Dense codes 0..L-1 of a factor's levels, the index into its effect array."""
    return np.unique(cells.codes[f], return_inverse=True)[1]


def _nearest_supported(f: str, cells: Cells, dense: np.ndarray, n_levels: int, supported: np.ndarray) -> np.ndarray:
    """For each level: itself when supported, else the nearest supported level of the same family (an
    ordinal factor), else -1."""
    target = np.where(supported, np.arange(n_levels), -1)
    if f not in cells.order:
        return target
    family = np.zeros(n_levels)
    order = np.full(n_levels, np.nan)
    family[dense] = cells.family[f]
    order[dense] = cells.order[f]
    for lv in np.flatnonzero(~supported & np.isfinite(order)):
        cand = np.flatnonzero(supported & (family == family[lv]) & np.isfinite(order))
        if cand.size:
            target[lv] = cand[np.argmin(np.abs(order[cand] - order[lv]))]
    return target


def fit_effects(cells: Cells, n_st: int, cfg: Strata,
                iterations: int = 50) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, int]]:
    """Per parameter, the additive effect of each factor level (zero-mean over the fleet's images),
    fitted with a station effect by weighted backfitting on the cell medians.  Levels with too little
    support (fewer than ``min_stations`` stations or ``min_rows`` images) take the effect of the nearest
    supported level of their family (the next thickness band of the same view, the next kV); unknown
    levels keep effect 0 (the fleet's average image) and their cells are left out of the fit."""
    dense = {f: cell_codes(cells, f) for f in FACTORS}
    n_levels = {f: int(dense[f].max(initial=-1)) + 1 for f in FACTORS}
    effects: dict[str, dict[str, np.ndarray]] = {}
    used: dict[str, int] = {}
    for p in PARAMETERS:
        w = cells.count[p].astype(float)
        y = cells.median[p]
        ok = (w > 0) & np.isfinite(y)
        supported = {}
        for f in FACTORS:
            rows = np.bincount(dense[f][ok], weights=w[ok], minlength=n_levels[f])
            pairs = np.unique(dense[f][ok] * n_st + cells.station[ok])
            stations = np.bincount(pairs // n_st, minlength=n_levels[f])
            supported[f] = (rows >= cfg.min_rows) & (stations >= cfg.min_stations)
        target = {f: _nearest_supported(f, cells, dense[f], n_levels[f], supported[f]) for f in FACTORS}
        fit = ok.copy()
        for f in FACTORS:
            fit &= supported[f][dense[f]]
        eff = {f: np.zeros(n_levels[f]) for f in FACTORS}
        st_eff = np.zeros(n_st)
        wf, yf = w[fit], y[fit]
        idx = {f: dense[f][fit] for f in FACTORS}
        sti = cells.station[fit]
        if wf.size:
            wsum_st = np.bincount(sti, weights=wf, minlength=n_st)
            wsum = {f: np.bincount(idx[f], weights=wf, minlength=n_levels[f]) for f in FACTORS}
            for _ in range(iterations):
                before = st_eff.copy()
                other = sum(eff[f][idx[f]] for f in FACTORS)
                st_eff = np.bincount(sti, weights=wf * (yf - other), minlength=n_st) / np.maximum(wsum_st, 1e-300)
                for f in FACTORS:
                    rest = st_eff[sti] + sum(eff[g][idx[g]] for g in FACTORS if g != f)
                    e = np.bincount(idx[f], weights=wf * (yf - rest), minlength=n_levels[f])
                    eff[f] = np.where(wsum[f] > 0, e / np.maximum(wsum[f], 1e-300), 0.0)
                    mean = float((eff[f][idx[f]] * wf).sum() / wf.sum())
                    eff[f] = np.where(supported[f], eff[f] - mean, 0.0)
                if np.nanmax(np.abs(st_eff - before), initial=0.0) < 1e-12:
                    break
        effects[p] = {f: np.where(target[f] >= 0, eff[f][np.maximum(target[f], 0)], 0.0) for f in FACTORS}
        if p == "gain":
            for f in FACTORS:
                used[FACTOR_NAMES[f]] = int(w[ok & (target[f][dense[f]] >= 0)].sum())
            used["all images"] = int(w[ok].sum())
    return effects, used


# --------------------------------------------------------------------------- DuckDB engine
def _sql_views(con: Any, files: Sequence[Path], band: float) -> None:
    pq = [str(f) for f in files if f.suffix != ".csv"]
    csv = [str(f) for f in files if f.suffix == ".csv"]

    def select(source: str) -> str:
        present = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
        exprs = []
        for c in (*TEXT, *NUMBERS):
            if c not in present:
                exprs.append(f"CAST(NULL AS {'VARCHAR' if c in TEXT else 'DOUBLE'}) AS {c}")
            elif c in TEXT:
                exprs.append(f"TRY_CAST({c} AS VARCHAR) AS {c}")
            else:  # NaN and infinities are "unknown", as in numpy
                exprs.append(f"CASE WHEN isfinite(TRY_CAST({c} AS DOUBLE)) THEN TRY_CAST({c} AS DOUBLE) END AS {c}")
        return f"SELECT {', '.join(exprs)} FROM {source}"

    parts = []
    if pq:
        parts.append(select(f"read_parquet({pq!r}, union_by_name=true)"))
    if csv:
        parts.append(select(f"read_csv({csv!r}, union_by_name=true, all_varchar=true)"))
    con.execute("CREATE VIEW f0 AS " + " UNION ALL ".join(parts))
    # one row per (station, row id): a re-shipped file counts once (rows without an id all count)
    con.execute("""CREATE VIEW f AS SELECT * EXCLUDE (rn) FROM (SELECT *, CASE WHEN id IS NULL THEN 1 ELSE
        row_number() OVER (PARTITION BY station_name, id) END AS rn FROM f0) WHERE rn = 1""")
    view_case = " ".join(f"WHEN '{k}' THEN '{v}'" for k, v in VIEW_CLASS.items())
    con.execute(f"""CREATE TABLE g AS SELECT *, COALESCE(station_name, 'UNKNOWN') AS st,
        COALESCE(date_diff('day', DATE '1970-01-01', try_strptime(substr(acquired_date, 1, 8), '%Y%m%d')::DATE),
                 floor(recorded / 86400)::BIGINT) AS day,
        COALESCE(upper(trim(presentation_intent)) = 'FOR PROCESSING', false) AS processing,
        COALESCE(implant > 0.5, false) AS has_implant,
        CASE upper(trim(COALESCE(view, '?'))) {view_case} ELSE upper(trim(COALESCE(view, '?'))) END AS view_c,
        COALESCE(floor(thickness_mm / {band!r})::BIGINT, -1) AS band,
        COALESCE(floor(kvp + 0.5)::BIGINT, -1) AS kv,
        upper(trim(COALESCE(anode, '?') || '/' || COALESCE(filter, '?'))) AS tf
        FROM f""")


def aggregate_duckdb(files: Sequence[Path], strata: Strata | None = None) -> Aggregates:
    """The same aggregates computed by DuckDB over the files, out of core (a fleet that outgrows RAM)."""
    import duckdb

    cfg = strata or Strata()
    con = duckdb.connect()
    _sql_views(con, files, cfg.band_mm)
    feats = (*CALIBRATION, *POPULATION)
    qexpr = ", ".join(f"quantile_cont({c}, [0.05, 0.25, 0.5, 0.75, 0.95])" for c in feats)
    rows = con.execute(f"""SELECT st, count(*) FILTER (WHERE NOT processing AND NOT has_implant),
        count(*) FILTER (WHERE processing), count(*) FILTER (WHERE has_implant AND NOT processing),
        min(day) FILTER (WHERE NOT processing AND NOT has_implant),
        max(day) FILTER (WHERE NOT processing AND NOT has_implant), min(model) FROM g
        GROUP BY st ORDER BY st""").fetchall()
    names = [r[0] for r in rows]
    code = {n: i for i, n in enumerate(names)}
    n_st = len(names)
    if not n_st:
        raise ValueError("the feature files hold no rows")
    counts = np.array([r[1] for r in rows], dtype=np.int64)
    left_out = {"for_processing": np.array([r[2] for r in rows]), "implant": np.array([r[3] for r in rows])}
    first = np.array([np.nan if r[4] is None else r[4] for r in rows], dtype=float)
    last = np.array([np.nan if r[5] is None else r[5] for r in rows], dtype=float)
    con.execute("CREATE VIEW k AS SELECT * FROM g WHERE NOT processing AND NOT has_implant")
    box = {}
    brows = dict((r[0], r[1:]) for r in con.execute(f"SELECT st, {qexpr} FROM k GROUP BY st").fetchall())
    for j, f in enumerate(feats):
        box[f] = np.full((5, n_st), np.nan)
        for name, vals in brows.items():
            if vals[j] is not None:
                box[f][:, code[name]] = [np.nan if v is None else v for v in vals[j]]
    S, bg = con.execute("SELECT quantile_cont(fat_c - bg_c, 0.5), quantile_cont(bg_c, 0.5) FROM k "
                        "WHERE fat_c - bg_c > 0").fetchone() or (None, None)
    S = float(S) if S is not None else 1.0
    K = float(bg) / S if bg is not None else 0.0
    con.execute(f"""CREATE TABLE p AS SELECT st, day, view_c, band, kv, tf,
        CASE WHEN sig > 0 THEN ln(sig) END AS gain,
        CASE WHEN sig > 0 THEN (bg_c - {K!r} * sig) / {S!r} END AS "offset",
        CASE WHEN sig > 0 AND contrast > 0 THEN ln(contrast) - ln(sig) END AS contrast,
        CASE WHEN sig > 0 AND noise_fat > 0 AND noise_bg > 0 THEN 0.5 * (ln(noise_fat) + ln(noise_bg)) - ln(sig)
        END AS noise FROM (SELECT *, fat_c - bg_c AS sig FROM k)""")
    q = {p: f'"{p}"' for p in PARAMETERS}
    aggs = ", ".join(f"count({q[p]}), quantile_cont({q[p]}, 0.5)" for p in PARAMETERS)
    crows = con.execute(f"""SELECT st, view_c || ':' || band::VARCHAR AS stratum, kv, tf, view_c, band, {aggs}
        FROM p GROUP BY st, view_c, band, kv, tf""").fetchall()
    labels = {f: np.array([r[1 + j] for r in crows], dtype=object) for j, f in enumerate(FACTORS)}
    cells = Cells(np.array([code[r[0]] for r in crows], dtype=np.int64),
                  {f: np.unique(labels[f], return_inverse=True)[1] for f in FACTORS},
                  {p: np.array([r[6 + 2 * j] for r in crows], dtype=np.int64) for j, p in enumerate(PARAMETERS)},
                  {p: np.array([np.nan if r[7 + 2 * j] is None else r[7 + 2 * j] for r in crows], dtype=float)
                   for j, p in enumerate(PARAMETERS)},
                  *_ordinals(np.array([r[4] for r in crows], dtype=object), np.array([r[5] for r in crows], dtype=np.int64),
                             np.array([r[2] for r in crows], dtype=np.int64)))
    effects, used = fit_effects(cells, n_st, cfg)
    import pyarrow as pa

    joins = []
    for f in FACTORS:
        levels = np.unique(labels[f]) if labels[f].size else np.array([], dtype=object)
        con.register(f"eff_{f}", pa.table({"level": pa.array(list(levels)),
                                           **{f"e_{p}": pa.array(effects[p][f][:levels.size]) for p in PARAMETERS}}))
        key = {"stratum": "p.view_c || ':' || p.band::VARCHAR", "kv": "p.kv", "tf": "p.tf"}[f]
        joins.append(f"JOIN eff_{f} ON eff_{f}.level = {key}")
    resid = ", ".join(f"p.{q[p]} - ({' + '.join(f'eff_{f}.e_{p}' for f in FACTORS)}) AS {q[p]}" for p in PARAMETERS)
    con.execute(f"CREATE TABLE r AS SELECT p.st, p.day, {resid} FROM p {' '.join(joins)}")
    level, n = {}, {}
    lexpr = ", ".join(f"quantile_cont({q[p]}, [0.25, 0.5, 0.75]), count({q[p]})" for p in PARAMETERS)
    for p in PARAMETERS:
        level[p] = np.full((3, n_st), np.nan)
        n[p] = np.zeros(n_st, dtype=np.int64)
    for r in con.execute(f"SELECT st, {lexpr} FROM r GROUP BY st").fetchall():
        i = code[r[0]]
        for j, p in enumerate(PARAMETERS):
            if r[1 + 2 * j] is not None:
                level[p][:, i] = [np.nan if v is None else v for v in r[1 + 2 * j]]
            n[p][i] = r[2 + 2 * j]
    days = np.array([d for (d,) in con.execute("SELECT DISTINCT day FROM r WHERE day IS NOT NULL ORDER BY day")
                     .fetchall()], dtype=np.int64)
    daily, daily_n = {}, {}
    if days.size:
        di = {int(d): i for i, d in enumerate(days)}
        for p in PARAMETERS:
            daily[p] = np.full((n_st, days.size), np.nan)
            daily_n[p] = np.zeros((n_st, days.size), dtype=np.int64)
        dexpr = ", ".join(f"quantile_cont({q[p]}, 0.5), count({q[p]})" for p in PARAMETERS)
        for r in con.execute(f"SELECT st, day, {dexpr} FROM r WHERE day IS NOT NULL GROUP BY st, day").fetchall():
            i, d = code[r[0]], di[int(r[1])]
            for j, p in enumerate(PARAMETERS):
                if r[2 + 2 * j] is not None:
                    daily[p][i, d] = r[2 + 2 * j]
                daily_n[p][i, d] = r[3 + 2 * j]
    models = {r[0]: r[6] or "" for r in rows}
    return Aggregates(names, models, counts, left_out, box, level, n, days, daily, daily_n, first, last,
                      {"K": K, "S": S}, used)
