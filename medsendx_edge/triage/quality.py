"""Quality and calibration metrics, each measured where it means something, and the cut-off check.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from medsendx_edge.triage.arrays import cross_dilate, cross_open, robust_std
from medsendx_edge.triage.density import BURNOUT_RADIUS_MM, SKIN_BAND_MM, Segmentation
from medsendx_edge.triage.pixels import Pixels


def quality_metrics(px: Any, f: int, small: np.ndarray, domain: str, fg: np.ndarray, fgw: np.ndarray,
                    breast: np.ndarray, pect: np.ndarray, implant: np.ndarray, labels: np.ndarray, d_mm: np.ndarray,
                    radius: float, air: float, seg: Segmentation, tissue_mean: float | None, wall: str,
                    wsp: float | None, field: np.ndarray, view: str | None) -> dict[str, Any]:
    """Quality and calibration metrics, each measured where it means something (in the image's own
    orientation): fat noise at full thickness, background noise away from the skin, burn-out inside
    the skin line, a plateau at the top of the range, a breast cut off by the field."""
    noise_fat = _row_noise(px.image, f, (labels == 1) & (d_mm >= radius), px, domain)
    noise_bg = _row_noise(px.image, f, ~cross_dilate(breast, 3) & ~fg & field, px, domain)
    s, b0 = (px.slope, px.intercept) if domain != "processing" else (1.0, 0.0)

    def to_val(x: float) -> float:
        return float(x * s + b0)

    tissue_px = breast & ~pect & ~implant
    n_tissue = int(tissue_px.sum())
    burnout = breast & ~fgw & (d_mm >= SKIN_BAND_MM) & ~pect
    if burnout.any():
        # Burn-out is a patch, not the thin dark halo unsharp masking leaves around glands: what
        # survives an opening 4 mm across (BURNOUT_RADIUS_MM).
        burnout = cross_open(burnout, max(1, int(round(BURNOUT_RADIUS_MM / (wsp or 0.1 * f)))))
    top_plateau = small >= px.max_value - 0.5
    contrast = (seg.dense_c - seg.fat_c) * s
    nf = noise_fat * s if math.isfinite(noise_fat) else float("nan")
    clipped = float((top_plateau & tissue_px).sum() / max(1, n_tissue))
    return {
        "bg_c": to_val(air), "fat_c": to_val(seg.fat_c), "dense_c": to_val(seg.dense_c), "contrast": contrast,
        "noise_bg": noise_bg * s, "noise_fat": nf,
        "snr_fat": (seg.fat_c - air) * s / nf if nf and nf > 0 else None,
        "cnr": contrast / nf if nf and nf > 0 and math.isfinite(contrast) else None,
        "mean_breast": to_val(tissue_mean) if tissue_mean is not None else None,
        "pd": seg.pd,
        "breast_frac": float(n_tissue / breast.size),
        "body_frac": float(breast.sum() / breast.size),
        "breast_area_cm2": float(n_tissue * wsp * wsp / 100.0) if wsp else None,
        "pectoral_frac": float(pect.sum() / max(1, breast.sum())),
        "burnout_frac": float(burnout.sum() / max(1, n_tissue)),
        "clipped_frac": clipped,
        "saturated_frac": clipped,
        "cut_off": 1.0 if _cut_off(breast, field, wall == "right", view) else 0.0,
        "implant": bool(implant.any()),
    }


def _row_noise(img: np.ndarray, f: int, where_small: np.ndarray, px: Pixels, domain: str) -> float:
    """Pixel noise at full resolution: horizontal neighbour differences / sqrt(2) on sampled rows inside
    ``where_small`` (a working-resolution mask), robust standard deviation."""
    rows_small = np.flatnonzero(where_small.any(axis=1))
    if rows_small.size == 0:
        return float("nan")
    pick = rows_small[:: max(1, rows_small.size // 48)]
    lines = img[np.minimum(img.shape[0] - 1, pick * f + f // 2)].astype(np.float64)
    if domain == "processing":
        lines = 1000.0 * -np.log(np.maximum(lines, 1.0))
    width = img.shape[1] - 1                       # a difference per full-resolution column but the last
    where = np.zeros((pick.size, width), dtype=bool)
    expanded = np.repeat(where_small[pick], f, axis=1)[:, :width]
    where[:, : expanded.shape[1]] = expanded
    d = (lines[:, 1:] - lines[:, :-1])[where]      # row by row, left to right
    return robust_std(d) / math.sqrt(2.0)


def _cut_off(breast: np.ndarray, field: np.ndarray, wall_right: bool, view: str | None) -> bool:
    """Is the breast cut by the exposed field's edge somewhere else than at the chest wall?

    The far side (towards the nipple) on every view; on a CC also the top and bottom along more than
    60 % of the breast's depth (medial or lateral tissue outside the field).  On an MLO the axilla and
    the pectoral muscle at the top and the inframammary fold at the bottom normally run off the field:
    no cut there.  The field's edge is where the exposed field ends (a collimator strip or film border
    left out), not the image's."""
    rows = np.flatnonzero(field.any(axis=1))
    cols = np.flatnonzero(field.any(axis=0))
    if rows.size == 0 or cols.size == 0:
        return False
    far_col = int(cols[0]) if wall_right else int(cols[-1])
    in_rows = slice(int(rows[0]), int(rows[-1]) + 1)
    if breast[in_rows, far_col].mean() > 0.02:
        return True
    if (view or "").upper() not in ("CC", "XCCL", "XCCM", "FB"):
        return False
    depth = breast.any(axis=0).sum()
    along = max(breast[int(rows[0])].sum(), breast[int(rows[-1])].sum())
    return bool(depth and along > depth * 0.6)
