"""Dose QC over the fleet's feature rows (issue 27): average glandular dose against compressed thickness per
unit, a unit whose dose at a given thickness leaves its peers, and a unit over the European acceptable
levels.

The dose is what the modality reports per image: Organ Dose (0040,0316, in dGy in the header, in mGy
here), the average glandular dose for a mammogram; Entrance Dose in mGy (0040,8302) is kept beside it.
The rows hold no operator identity: a unit is a station (a truck's mammography unit), never a person.

* **Against its peers, at the same thickness.** Dose rises steeply with thickness (AEC), so a truck whose
  women are thicker has higher doses with a healthy unit.  The fleet's dose-thickness curve is the median
  log dose in 5 mm thickness bins, joined linearly; each image's residual is its log dose against the
  curve at its own thickness.  Peers are the units of the same model when the model has at least three
  units in the fleet, else the whole fleet.  A unit is flagged when its median residual is at least
  ``excess`` (25 %) above its peers' and a one-sided Mann-Whitney test of its residuals against theirs
  gives p below ``alpha`` over the number of units (Bonferroni), with at least ``min_images`` images.
* **Against the European levels.** The European guidelines (4th edition, 2006, chapter 2a: the limiting
  values of average glandular dose for PMMA thicknesses of 20 to 70 mm) give the acceptable and
  achievable average glandular dose for the standard breast modelled by PMMA: equivalent breast thickness 21, 32, 45, 53, 60, 75, 90 mm: acceptable 1.0, 1.5, 2.0, 2.5, 3.0,
  4.5, 6.5 mGy (achievable 0.6, 1.0, 1.6, 2.0, 2.4, 3.6, 5.1).  Per unit, in each 10 mm band of compressed
  thickness with at least ``min_band`` images, the median dose is compared with the acceptable level at
  the band's median thickness (interpolated, log-linear); over it is a finding.  These are limits for the
  standard breast; comparing patients' medians per thickness band with them is the screening programmes'
  practice, not a measurement of the unit (a physicist's PMMA test is).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

EUREF_THICKNESS_MM = (21.0, 32.0, 45.0, 53.0, 60.0, 75.0, 90.0)
EUREF_ACCEPTABLE_MGY = (1.0, 1.5, 2.0, 2.5, 3.0, 4.5, 6.5)
EUREF_ACHIEVABLE_MGY = (0.6, 1.0, 1.6, 2.0, 2.4, 3.6, 5.1)


@dataclass(frozen=True)
class DoseSettings:
    excess: float = 0.25        # a unit's median dose this far above its peers' at the same thickness
    alpha: float = 0.01         # family-wise, over the units
    min_images: int = 50        # a unit needs this many dosed images to be judged against peers
    min_band: int = 20          # and this many in a thickness band to be judged against EUREF
    bin_mm: float = 5.0


def euref_acceptable(thickness_mm: float) -> float:
    """The acceptable AGD (mGy) at an equivalent breast thickness, log-linear between the table's points
    (held at the ends)."""
    t = min(max(thickness_mm, EUREF_THICKNESS_MM[0]), EUREF_THICKNESS_MM[-1])
    return float(np.exp(np.interp(t, EUREF_THICKNESS_MM, np.log(EUREF_ACCEPTABLE_MGY))))


def load(files: Sequence[Path]) -> dict[str, np.ndarray]:
    """station, model, thickness and dose of every image with both, read by DuckDB over the feature files
    (files from before dose was recorded read as no dose)."""
    import duckdb

    con = duckdb.connect()
    parquet = [str(f) for f in files if f.suffix == ".parquet"]
    csv = [str(f) for f in files if f.suffix == ".csv"]
    parts = []
    if parquet:
        parts.append(f"SELECT * FROM read_parquet({parquet!r}, union_by_name = true)")
    if csv:
        parts.append(f"SELECT * FROM read_csv_auto({csv!r}, union_by_name = true, all_varchar = true)")
    con.execute("CREATE VIEW rows AS " + " UNION ALL BY NAME ".join(parts))
    cols = {r[0] for r in con.execute("DESCRIBE rows").fetchall()}
    if "organ_dose_mgy" not in cols or "thickness_mm" not in cols:
        return {"station": np.array([], dtype=object), "model": np.array([], dtype=object),
                "thickness": np.array([]), "dose": np.array([])}
    model = "coalesce(CAST(model AS VARCHAR), '')" if "model" in cols else "''"
    got = con.execute(f"""SELECT CAST(station_name AS VARCHAR), {model}, CAST(thickness_mm AS DOUBLE),
        CAST(organ_dose_mgy AS DOUBLE) FROM rows
        WHERE TRY_CAST(organ_dose_mgy AS DOUBLE) > 0 AND TRY_CAST(thickness_mm AS DOUBLE) BETWEEN 5 AND 150
          AND station_name IS NOT NULL""").fetchall()
    return {"station": np.array([g[0] for g in got], dtype=object), "model": np.array([g[1] for g in got], dtype=object),
            "thickness": np.array([g[2] for g in got], dtype=float), "dose": np.array([g[3] for g in got], dtype=float)}


def _curve(thickness: np.ndarray, logdose: np.ndarray, bin_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """The median log dose per thickness bin (bins with at least 10 images), for linear interpolation."""
    bins = np.floor(thickness / bin_mm).astype(int)
    centres, levels = [], []
    for b in np.unique(bins):
        sel = bins == b
        if sel.sum() >= 10:
            centres.append(float(np.median(thickness[sel])))
            levels.append(float(np.median(logdose[sel])))
    return np.array(centres), np.array(levels)


def dose_qc(data: dict[str, np.ndarray], s: DoseSettings | None = None) -> dict[str, Any]:
    from scipy.stats import mannwhitneyu

    s = s or DoseSettings()
    station, model, thick, dose = data["station"], data["model"], data["thickness"], data["dose"]
    out: dict[str, Any] = {"n_images": int(dose.size), "units": {}, "flagged": [], "method": {
        "excess_pct": round(100 * s.excess), "alpha": s.alpha, "min_images": s.min_images, "min_band": s.min_band,
        "euref": {"thickness_mm": EUREF_THICKNESS_MM, "acceptable_mgy": EUREF_ACCEPTABLE_MGY,
                  "achievable_mgy": EUREF_ACHIEVABLE_MGY,
                  "source": "European guidelines for quality assurance in breast cancer screening and diagnosis, "
                            "4th ed. (2006), chapter 2a: limiting AGD for PMMA 20-70 mm"}}}
    if dose.size == 0:
        out["note"] = "no image carries a dose (Organ Dose) and a thickness: nothing to judge"
        return out
    logd = np.log(dose)
    units = sorted(set(station.tolist()))
    models = {m: len(set(station[model == m].tolist())) for m in set(model.tolist())}
    resid = np.full(dose.size, np.nan)
    for m in set(model.tolist()):
        group = model == m if models[m] >= 3 and m else np.ones(dose.size, dtype=bool)
        centres, levels = _curve(thick[group], logd[group], s.bin_mm)
        if centres.size < 2:
            continue
        sel = (model == m)
        resid[sel] = logd[sel] - np.interp(thick[sel], centres, levels)
    tests = max(1, len(units))
    for u in units:
        mine = (station == u) & np.isfinite(resid)
        m = str(model[station == u][0]) if (station == u).any() else ""
        peers_mask = ((model == m) if models.get(m, 0) >= 3 and m else np.ones(dose.size, dtype=bool)) & \
            (station != u) & np.isfinite(resid)
        entry: dict[str, Any] = {"n_images": int((station == u).sum()), "model": m or None, "findings": []}
        if mine.sum() >= s.min_images and peers_mask.sum() >= s.min_images:
            shift = float(np.median(resid[mine]) - np.median(resid[peers_mask]))
            p = float(mannwhitneyu(resid[mine], resid[peers_mask], alternative="greater").pvalue)
            entry["dose_vs_peers_pct"] = round(100 * (math.exp(shift) - 1), 1)
            entry["p"] = p
            if shift >= math.log1p(s.excess) and p < s.alpha / tests:
                entry["findings"].append(
                    f"dose {entry['dose_vs_peers_pct']:+.0f}% against its peers at the same thickness "
                    f"({int(mine.sum())} images)")
        else:
            entry["dose_vs_peers_pct"] = None
        over: list[dict[str, Any]] = []
        for lo in range(10, 150, 10):
            band = (station == u) & (thick >= lo) & (thick < lo + 10)
            if band.sum() < s.min_band:
                continue
            t, d = float(np.median(thick[band])), float(np.median(dose[band]))
            limit = euref_acceptable(t)
            if d > limit:
                over.append({"band_mm": [lo, lo + 10], "n": int(band.sum()), "median_mgy": round(d, 2),
                             "acceptable_mgy": round(limit, 2)})
                entry["findings"].append(f"median dose {d:.2f} mGy at {lo}-{lo + 10} mm over the EUREF acceptable "
                                         f"{limit:.2f} mGy ({int(band.sum())} images)")
        entry["over_euref"] = over
        out["units"][u] = entry
        if entry["findings"]:
            out["flagged"].append(u)
    return out


def plot(data: dict[str, np.ndarray], result: dict[str, Any], path: Path) -> Path:
    """Average glandular dose against compressed thickness, a panel per flagged unit against the fleet,
    with the EUREF acceptable and achievable curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flagged = result.get("flagged") or []
    panels = max(1, len(flagged))
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), squeeze=False)
    t = np.linspace(EUREF_THICKNESS_MM[0], EUREF_THICKNESS_MM[-1], 100)
    for ax, unit in zip(axes[0], flagged or [None]):
        others = data["station"] != unit
        ax.scatter(data["thickness"][others], data["dose"][others], s=3, c="#999999", alpha=0.35, label="the fleet")
        if unit is not None:
            mine = data["station"] == unit
            ax.scatter(data["thickness"][mine], data["dose"][mine], s=5, c="#c00000", alpha=0.6, label=unit)
        ax.plot(t, [euref_acceptable(x) for x in t], "k-", lw=1.5, label="EUREF acceptable")
        ax.plot(t, np.exp(np.interp(t, EUREF_THICKNESS_MM, np.log(EUREF_ACHIEVABLE_MGY))), "k--", lw=1,
                label="EUREF achievable")
        ax.set_xlabel("compressed thickness (mm)")
        ax.set_ylabel("average glandular dose (mGy)")
        findings = result["units"][unit]["findings"] if unit else []
        ax.set_title(f"{unit}\n" + textwrap.shorten(findings[0], 62) + (f" (+{len(findings) - 1} more)"
                     if len(findings) > 1 else "") if unit else "no unit flagged", fontsize=9)
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
