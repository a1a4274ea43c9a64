"""Positioning and sharpness of one mammogram, measured while the woman is still on the truck.

Landmarks (docs/triage.md, "Positioning"), found on the working image with the chest wall on the left
and, on an MLO, the pectoral muscle in the top corner:

* **nipple**: on a CC the point of the skin line farthest from the chest-wall edge; on an MLO the point
  farthest from the pectoral muscle's edge line.  *In profile* when the skin line makes a bump there
  (the nipple stands out of the contour) higher than ``NIPPLE_BUMP_MM`` over the contour around it.
* **pectoral edge** (MLO): a straight line fitted to the muscle's anterior edge, from the image edge to
  the muscle's lowest visible point.
* **posterior nipple line (PNL)**: on an MLO from the nipple perpendicular to the pectoral line (the
  line extended when the muscle stops short) or to the image's chest-wall edge, whichever comes first;
  on a CC from the nipple straight back to the chest-wall edge.  Its length in mm needs the pixel spacing: without one it is "not measured", never guessed.
* **inframammary fold** (MLO): visible when tissue (the abdomen under the fold) still runs along the
  chest-wall edge at the bottom of the exposed field.
* **motion blur**: the tissue's power spectrum (full-resolution patches) in a band of 1-2.5 cycles/mm,
  above the image's own noise floor (the spectrum near Nyquist), compared between directions.  Breast
  texture and quantum noise are about isotropic; a breast that moved during the exposure loses the
  band's signal along the motion only: the weakest direction's share of the median one is the measure.

Each check says its rule, its value, and ``pass``, ``fail`` or ``not measured``; whether a failure may
raise ``recheck`` is the configuration's (``triage.positioning_recheck``), decided on the validation
set: by default the nipple in profile (on at least one view of the breast) and the CC's nipple line
against the MLO's, both judged per breast by the exam book; the pectoral, fold and blur checks are
advisory and say so.

numpy only (no scipy on the hot path); everything works on the working image except the spectra.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medsendx_edge.triage.arrays import corner_erode

#: The nipple stands out of the skin line's smooth course by at least this much when in profile.
NIPPLE_BUMP_MM = 1.0
#: A 1 mm bump needs working pixels of a third of a millimetre at most (3 pixels): coarser, not measured.
NIPPLE_MAX_SPACING_MM = 0.34
#: The pectoral muscle must reach the PNL: a shortfall beyond this (the muscle's lowest visible point
#: above the PNL, along the muscle's edge) is a failure (EUREF / ACR: the muscle reaches the nipple level).
PECTORAL_TOLERANCE_MM = 5.0
#: CC PNL within 1 cm of the same breast's MLO PNL (ACR; EUREF).
PNL_CC_MLO_MM = 10.0
#: Tissue along the chest wall at the foot of the field at least this wide: the fold (and the abdomen) is in.
IMF_TISSUE_MM = 5.0
#: The weakest direction's band signal over the median direction's below this: motion blur (docs/triage.md).
BLUR_RATIO = 0.45
BLUR_BAND_MM = (1.0, 2.5)      # cycles/mm
MIN_BAND_SNR = 3.0              # the band's signal over the noise: in the strongest direction (a 12th in the median one)
_PATCH = 128
_MAX_PATCHES = 24
_SECTORS = 8
_yy, _xx = np.mgrid[0:_PATCH, 0:_PATCH].astype(np.float64)
_PLANE = np.stack([np.ones(_PATCH * _PATCH), _yy.ravel(), _xx.ravel()], 1)
_PLANE_PINV = np.linalg.pinv(_PLANE)
_HANN = np.outer(np.hanning(_PATCH), np.hanning(_PATCH)).ravel()

#: Check names, the words a radiographer uses for a failure, and whether software does it reliably.
CHECKS = {
    "pectoral_to_pnl": "pectoral does not reach the nipple line",
    "nipple_in_profile": "nipple not in profile",
    "imf_visible": "inframammary fold not seen",
    "motion_blur": "motion blur",
    "pnl_cc_mlo": "CC shorter than the MLO by more than 1 cm at the nipple line",
}
RULES = {
    "pectoral_to_pnl": f"MLO: the pectoral muscle reaches the posterior nipple line (within {PECTORAL_TOLERANCE_MM:g} mm)",
    "nipple_in_profile": f"the nipple stands out of the skin line by at least {NIPPLE_BUMP_MM:g} mm",
    "imf_visible": f"MLO: tissue at least {IMF_TISSUE_MM:g} mm wide along the chest wall at the foot of the field",
    "motion_blur": f"the weakest direction keeps at least {BLUR_RATIO:g} of the median direction's signal over "
                   f"noise at {BLUR_BAND_MM[0]:g}-{BLUR_BAND_MM[1]:g} cycles/mm",
    "pnl_cc_mlo": f"the CC's posterior nipple line within {PNL_CC_MLO_MM:g} mm of the same breast's MLO's",
}


@dataclass
class Check:
    name: str
    result: str                 # "pass", "fail", "not measured", "not applicable"
    value: float | None = None
    unit: str = ""
    note: str = ""              # why not measured, or what was seen

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.name, "result": self.result, "value": self.value, "unit": self.unit,
                "rule": RULES[self.name], "note": self.note or None}


@dataclass
class Positioning:
    """Landmarks in the working image's stored orientation (row, column), lengths in mm."""

    nipple: tuple[float, float] | None = None
    nipple_bump_mm: float | None = None
    pectoral_line: tuple[tuple[float, float], tuple[float, float]] | None = None
    pnl: tuple[tuple[float, float], tuple[float, float]] | None = None     # nipple -> foot
    pnl_mm: float | None = None
    pectoral_shortfall_mm: float | None = None
    imf_visible: bool | None = None
    blur_ratio: float | None = None
    blur_angle_deg: float | None = None
    blur_note: str = ""
    nipple_note: str = ""
    checks: list[Check] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        """The flat values for the sidecar's metrics, the feature rows and the rules."""
        fails = [c.name for c in self.checks if c.result == "fail"]
        return {"pnl_mm": self.pnl_mm, "pectoral_shortfall_mm": self.pectoral_shortfall_mm,
                "nipple_bump_mm": self.nipple_bump_mm,
                "imf_visible": None if self.imf_visible is None else float(self.imf_visible),
                "blur_ratio": self.blur_ratio, "positioning_failures": float(len(fails)),
                "positioning_failed": ",".join(fails) or None}

    def as_dict(self) -> dict[str, Any]:
        def pt(p: tuple[float, float] | None) -> list[float] | None:
            return None if p is None else [round(p[0], 1), round(p[1], 1)]

        return {"nipple": pt(self.nipple),
                "pectoral_line": None if self.pectoral_line is None else [pt(p) for p in self.pectoral_line],
                "pnl": None if self.pnl is None else [pt(p) for p in self.pnl],
                "pnl_mm": _r(self.pnl_mm), "pectoral_shortfall_mm": _r(self.pectoral_shortfall_mm),
                "nipple_bump_mm": _r(self.nipple_bump_mm), "imf_visible": self.imf_visible,
                "blur_ratio": _r(self.blur_ratio, 3), "blur_angle_deg": _r(self.blur_angle_deg, 0),
                "coordinates": "working image (row, column), stored orientation",
                "checks": [c.as_dict() for c in self.checks]}


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(float(x), nd)


def _edge_profile(breast: np.ndarray) -> np.ndarray:
    """Per row, the skin line's column (chest wall on the left): the last breast column, -1 where none."""
    has = breast.any(axis=1)
    last = breast.shape[1] - 1 - np.argmax(breast[:, ::-1], axis=1)
    return np.where(has, last, -1).astype(np.float64)


def _pectoral_line(pect: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, float]] | None:
    """The muscle's anterior edge as a line: a point on it, its unit direction (downwards), and the
    muscle's lowest visible edge point; None when too little muscle is seen to fit one."""
    rows = np.flatnonzero(pect.any(axis=1))
    if rows.size < 8:
        return None
    edge = _edge_profile(pect[rows])
    keep = edge >= 0
    r, c = rows[keep].astype(np.float64), edge[keep]
    # Drop the rows where the edge leaves the fit by more than 3 MADs (the muscle's lower tip rounds off).
    for _ in range(2):
        b, a = np.polyfit(r, c, 1)
        resid = c - (a + b * r)
        mad = float(np.median(np.abs(resid - np.median(resid)))) or 1.0
        ok = np.abs(resid) <= 3.0 * 1.4826 * mad + 1.0
        if ok.all() or ok.sum() < 8:
            break
        r, c = r[ok], c[ok]
    b, a = np.polyfit(r, c, 1)
    p0 = np.array([float(rows[0]), a + b * float(rows[0])])
    u = np.array([1.0, b]) / math.hypot(1.0, b)
    low = float(rows[-1])
    return p0, u, (low, float(_edge_profile(pect[int(low):int(low) + 1])[0]))


def _nipple_bump(d: np.ndarray, row: int, spacing: float) -> float | None:
    """How far the skin line stands out at ``row`` over its course 7-30 mm on either side (a quadratic
    through both sides models the contour's own curvature): the nipple in profile makes a bump, a smooth
    contour none.  ``d``: per row, the skin line's distance from the chest wall or the pectoral line in
    pixels (NaN where there is no breast)."""
    near, far = int(round(7.0 / spacing)), int(round(30.0 / spacing))
    above = np.arange(max(0, row - far), max(0, row - near))
    below = np.arange(min(d.size, row + near + 1), min(d.size, row + far + 1))
    above, below = above[np.isfinite(d[above])], below[np.isfinite(d[below])]
    if above.size < 3 or below.size < 3:
        return None
    rr = np.concatenate([above, below]).astype(np.float64)
    coef = np.polyfit(rr - row, d[rr.astype(int)], 2)
    base = float(np.polyval(coef, 0.0))
    lo, hi = max(0, row - near // 2), min(d.size, row + near // 2 + 1)
    return (float(np.nanmax(d[lo:hi])) - base) * spacing


def _nipple_row(d: np.ndarray, spacing: float) -> int:
    """The nipple's row: the skin line's most prominent bump (8-12 mm wide, its tip a local maximum) among
    the rows within 15 mm of its farthest point; the farthest point itself when no bump stands out by 1 mm (a nipple not in
    profile, or a smooth apex).  A bump's prominence is the row's distance over the mean of 6-12 mm on
    either side, less the share the contour's own curvature gives there (measured at 15-30 mm: for a
    parabola the sag grows with the offset squared, 84/525 of the wide window's at the narrow one)."""
    valid = np.isfinite(d)
    dv = np.where(valid, d, 0.0)
    top = float(dv[valid].max())
    apex = int(np.median(np.flatnonzero(valid & (dv >= top - max(1.0, 1.0 / spacing)))))
    cs = np.concatenate([[0.0], np.cumsum(dv)])
    cn = np.concatenate([[0], np.cumsum(valid)])
    r = np.arange(d.size)

    def sag(lo_mm: float, hi_mm: float) -> tuple[np.ndarray, np.ndarray]:
        k0, k1 = max(1, int(round(lo_mm / spacing))), max(2, int(round(hi_mm / spacing)))

        def mean(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            a, b = np.clip(a, 0, d.size), np.clip(b, 0, d.size)
            n = cn[b] - cn[a]
            return (cs[b] - cs[a]) / np.maximum(n, 1), n >= 0.5 * (k1 - k0)

        above, ok_a = mean(r - k1, r - k0)
        below, ok_b = mean(r + k0 + 1, r + k1 + 1)
        return dv - 0.5 * (above + below), ok_a & ok_b

    narrow, ok_n = sag(6.0, 12.0)
    wide, ok_w = sag(15.0, 30.0)
    bump = (narrow - (84.0 / 525.0) * wide) * spacing
    # A bump's tip is the contour's farthest point within 4 mm (where the skin line drops steeply into
    # the fold, the sag is large and no tip): a running maximum over 8 mm.
    k = max(1, int(round(4.0 / spacing)))
    padded = np.pad(np.where(valid, dv, -np.inf), k, mode="constant", constant_values=-np.inf)
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * k + 1)
    tip = dv >= windows.max(axis=1)
    cand = valid & ok_n & ok_w & tip & (dv >= top - 15.0 / spacing)
    if not cand.any():
        return apex
    best = int(np.flatnonzero(cand)[np.argmax(bump[cand])])
    return best if bump[best] >= 1.0 else apex


def landmarks(breast: np.ndarray, pect: np.ndarray, field_mask: np.ndarray, view: str | None,
              spacing: float | None, chest_wall: str, corner: str) -> Positioning:
    """Nipple, pectoral line, PNL and IMF of one image (masks in stored orientation, working resolution)."""
    out = Positioning()
    v = (view or "").upper()
    is_mlo = v in ("MLO", "ML", "LM", "LMO", "SIO")
    is_cc = v in ("CC", "XCCL", "XCCM", "FB")
    if not (is_mlo or is_cc) or not breast.any():
        return out
    flip_c = chest_wall == "right"
    flip_r = corner == "bottom"
    h, w = breast.shape

    def to_work(a: np.ndarray) -> np.ndarray:
        a = a[:, ::-1] if flip_c else a
        return a[::-1] if flip_r else a

    def to_stored(p: tuple[float, float] | np.ndarray) -> tuple[float, float]:
        r, c = float(p[0]), float(p[1])
        return (h - 1 - r if flip_r else r, w - 1 - c if flip_c else c)

    bw, pw, fw = to_work(breast), to_work(pect), to_work(field_mask)
    profile = _edge_profile(bw)
    rows = np.flatnonzero(profile >= 0)
    sp = spacing or 1.0
    line = _pectoral_line(pw) if is_mlo and pw.any() else None
    # The nipple: on the skin line, farthest from the chest wall (CC) or the pectoral line (MLO), or the
    # bump near there (the nipple in profile is a bump, not always the farthest point on an MLO).
    d = np.full(profile.size, np.nan)
    if line is not None:
        p0, u, low = line
        nrm = np.array([-u[1], u[0]])              # points away from the muscle (towards the nipple)
        if nrm[1] < 0:
            nrm = -nrm
        d[rows] = (rows - p0[0]) * nrm[0] + (profile[rows] - p0[1]) * nrm[1]
    else:
        d[rows] = profile[rows]
    nrow = _nipple_row(d, sp)
    nipple = np.array([float(nrow), float(profile[nrow])])
    out.nipple = to_stored(nipple)
    if not spacing:
        out.nipple_note = "no pixel spacing"
    elif spacing > NIPPLE_MAX_SPACING_MM:
        out.nipple_note = f"working pixels of {spacing:.2f} mm are too coarse for a {NIPPLE_BUMP_MM:g} mm bump"
    else:
        out.nipple_bump_mm = _nipple_bump(d, nrow, spacing)
        if out.nipple_bump_mm is None:
            out.nipple_note = "skin line too short around the nipple"
    if line is not None:
        p0, u, low = line
        t_foot = float(np.dot(nipple - p0, u))
        foot = p0 + t_foot * u
        if foot[1] < 0 <= nipple[1] and nipple[1] > foot[1]:
            # The PNL ends at the pectoral line or the image's chest-wall edge, whichever comes first.
            foot = nipple + (nipple[1] / (nipple[1] - foot[1])) * (foot - nipple)
        t_low = float(np.dot(np.array(low) - p0, u))
        out.pectoral_line = (to_stored(p0), to_stored(p0 + t_low * u))
        out.pnl = (to_stored(nipple), to_stored(foot))
        if spacing:
            out.pnl_mm = float(np.linalg.norm(nipple - foot)) * spacing
            out.pectoral_shortfall_mm = (t_foot - t_low) * spacing
    elif is_cc:
        wall_cols = np.flatnonzero(bw[nrow])
        wall = float(wall_cols[0]) if wall_cols.size else 0.0
        foot = np.array([float(nrow), wall])
        out.pnl = (to_stored(nipple), to_stored(foot))
        if spacing:
            out.pnl_mm = (nipple[1] - wall) * spacing
    if is_mlo and corner != "none":
        # The foot of the field is the end away from the muscle (without a muscle found, unknown).
        frows = np.flatnonzero(fw.any(axis=1))
        if frows.size and spacing:
            bottom = int(frows[-1])
            span = max(1, int(round(3.0 / spacing)))
            foot_rows = bw[max(0, bottom - span): bottom + 1]
            # Tissue reaching the field's foot along the chest wall: the abdomen under the fold is in.
            width = float(np.median(_edge_profile(foot_rows) + 1)) * spacing if foot_rows.any() else 0.0
            out.imf_visible = width >= IMF_TISSUE_MM
    return out


def _power(stack: np.ndarray) -> np.ndarray:
    """The mean power spectrum of real patches (n, P, P), all P x P frequencies: the real FFT's half
    (half the work of the complex one), the other half by the Hermitian symmetry P(-k) = P(k)."""
    half = np.fft.rfft2(stack)
    ph = (half.real ** 2 + half.imag ** 2).mean(axis=0)          # (P, P // 2 + 1)
    p = stack.shape[-1]
    full = np.empty((p, p), dtype=ph.dtype)
    full[:, : p // 2 + 1] = ph
    # columns P//2+1 .. P-1 are the conjugates of columns P-1-(...) at negated rows
    cols = np.arange(p // 2 + 1, p)
    full[:, cols] = ph[(-np.arange(p)) % p][:, p - cols]
    return full


def blur(image: np.ndarray, f: int, tissue_small: np.ndarray, spacing: float | None) -> tuple[float | None, float | None, str]:
    """Motion blur from the tissue's spectrum at full resolution: (ratio, weakest direction in degrees, note).

    Patches of 128 pixels wholly inside ``tissue_small`` (working resolution, the skin band, pectoral
    and implant left out); each detrended and Hann-windowed; the power averaged.  The noise floor is the
    spectrum's median near Nyquist; the signal is the band's power above it, per orientation sector
    (8 sectors over 180 degrees); the ratio is the weakest sector's over the median one's."""
    if not spacing:
        return None, None, "no pixel spacing"
    lo_c, hi_c = BLUR_BAND_MM
    if hi_c * spacing > 0.42:
        return None, None, "pixels too coarse for the blur band"
    step = max(1, _PATCH // f)
    # Working-resolution boxes wholly inside the tissue (their top-left corners, in row order): an
    # erosion of the mask by the box, anchored at its corner, where the box fits in the image.
    hs, ws = tissue_small.shape
    if hs <= step or ws <= step:
        return None, None, "too little tissue"
    inside = corner_erode(tissue_small, step)[: hs - step + 1, : ws - step + 1]
    flat = np.flatnonzero(inside)
    if flat.size == 0:
        return None, None, "too little tissue away from the skin line"
    flat = flat[:: max(1, len(flat) // (_MAX_PATCHES * 4))]
    ok = np.stack(np.divmod(flat, inside.shape[1]), axis=1)
    ok = ok[np.random.default_rng(0).permutation(len(ok))[:_MAX_PATCHES]]
    patches = [image[int(r0) * f:int(r0) * f + _PATCH, int(c0) * f:int(c0) * f + _PATCH] for r0, c0 in ok]
    patches = [p for p in patches if p.shape == (_PATCH, _PATCH)]
    if len(patches) < 4:
        return None, None, "too little tissue away from the skin line"
    stack = np.stack(patches).astype(np.float64).reshape(len(patches), -1)
    # Each patch less its best plane (one projection for all), Hann-windowed, its power averaged.
    stack -= (stack @ _PLANE_PINV.T) @ _PLANE.T
    stack *= _HANN
    power = _power(stack.reshape(-1, _PATCH, _PATCH))
    fy = np.fft.fftfreq(_PATCH)[:, None]
    fx = np.fft.fftfreq(_PATCH)[None, :]
    fr = np.hypot(fy, fx)
    nyq = (fr >= 0.42) & (fr <= 0.5)
    high = (fr >= lo_c * spacing) & (fr <= hi_c * spacing)
    angle = np.degrees(np.arctan2(fy, fx)) % 180.0 + np.zeros_like(fr)
    sector = np.minimum((angle / (180.0 / _SECTORS)).astype(int), _SECTORS - 1)
    # Per direction, the band's signal over that direction's own noise (the spectrum near Nyquist, where
    # the structure is gone).  Motion blurs the breast, not the detector's noise: the band loses its
    # signal along the motion while the noise stays.  A detector or film digitiser that resolves less
    # in one direction takes its noise down with its signal there, and an oriented texture changes the
    # band in every frequency direction but the one it runs along only a little: neither looks like motion.
    shape = np.empty(_SECTORS)
    for s in range(_SECTORS):
        noise = float(np.median(power[nyq & (sector == s)]))
        shape[s] = (float(np.mean(power[high & (sector == s)])) - noise) / max(noise, 1e-12)
    if float(shape.max()) < MIN_BAND_SNR or float(np.median(shape)) < MIN_BAND_SNR / 12.0:
        # The texture must stand clear of the noise somewhere (across the motion it keeps it): else the
        # ratio is the noise's.
        return None, None, "too little texture above the noise at 1-2.5 cycles/mm"
    shape = np.maximum(shape, 0.0)
    weakest = int(np.argmin(shape))
    # Against the median direction, not the strongest: a detector that resolves less in one direction
    # loses its noise near Nyquist faster than its signal in the band, and that direction stands out
    # high (an outlier the median ignores); motion makes one direction stand out low.
    ratio = float(shape[weakest] / max(float(np.median(shape)), 1e-12))
    # The spectrum's weak direction is the motion's (a frequency direction: the blur runs along it).
    return ratio, (weakest + 0.5) * 180.0 / _SECTORS, ""


def assess(pos: Positioning, view: str | None) -> None:
    """The per-image checks from the landmarks (the CC-MLO PNL check is the exam's)."""
    v = (view or "").upper()
    is_mlo = v in ("MLO", "ML", "LM", "LMO", "SIO")
    if pos.nipple is None:
        return
    if is_mlo:
        if pos.pectoral_line is None:
            pos.checks.append(Check("pectoral_to_pnl", "not measured", note="pectoral muscle not found"))
        elif pos.pectoral_shortfall_mm is None:
            pos.checks.append(Check("pectoral_to_pnl", "not measured", note="no pixel spacing"))
        else:
            short = pos.pectoral_shortfall_mm
            pos.checks.append(Check("pectoral_to_pnl", "fail" if short > PECTORAL_TOLERANCE_MM else "pass",
                                    round(short, 1), "mm above the PNL"))
    if pos.nipple_bump_mm is None:
        pos.checks.append(Check("nipple_in_profile", "not measured", note=pos.nipple_note))
    else:
        pos.checks.append(Check("nipple_in_profile", "pass" if pos.nipple_bump_mm >= NIPPLE_BUMP_MM else "fail",
                                round(pos.nipple_bump_mm, 1), "mm"))
    if is_mlo:
        pos.checks.append(Check("imf_visible", "not measured", note="no pixel spacing, or no muscle to tell the "
                                "foot of the field") if pos.imf_visible is None
                          else Check("imf_visible", "pass" if pos.imf_visible else "fail"))
    if pos.blur_ratio is None:
        pos.checks.append(Check("motion_blur", "not measured", note=pos.blur_note))
    else:
        pos.checks.append(Check("motion_blur", "fail" if pos.blur_ratio < BLUR_RATIO else "pass",
                                round(pos.blur_ratio, 3), "ratio"))


def message(check: str, where: str) -> str:
    """The words on the console and the picture: "pectoral does not reach the nipple line on LMLO"."""
    return f"{CHECKS[check]} on {where}" if where else CHECKS[check]
