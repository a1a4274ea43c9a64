"""Density: the fat level against the distance from the skin line (the thickness correction), implants,
and the K-Means of the thickness-corrected residual into fat and dense tissue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from medsendx_edge.triage.arrays import (box_filter, cross_close, cross_dilate, cross_open, fill_holes, isotonic,
                                         label, percentile, window_median, windows)
from medsendx_edge.triage.kmeans import kmeans_hist


# --------------------------------------------------------------------------- density
SKIN_BAND_MM = 3.0        # skin and subcutaneous fat: breast area, never dense
FAT_PERCENTILE = 0.05     # the fat level at a distance from the skin line: the 5th percentile there
SPIKE_MM = 9.0            # ... its spikes removed (a running median over 9 mm) before the monotone fit
AHEAD_MM = 15.0           # ... each level no higher than the lowest in the next 15 mm inwards (gland runs),
AHEAD_SHARE = 0.25        # ... among the bands holding at least a quarter of its pixels
IMPLANT_R = 1.2           # residual above any fat/gland mix (gland/fat attenuation 1.76: r <= 0.76): silicone, metal
MIN_SEPARATION_R = 0.10   # below this, fat and "dense" centres are one class: no dense tissue


def fat_trend(v: np.ndarray, d_mm: np.ndarray, tissue: np.ndarray, bin_mm: float = 1.0,
              air: float | None = None) -> np.ndarray:
    """The fat level as a function of the distance from the skin line, per pixel, measured from the
    image itself (no edge model).

    Towards the skin line a compressed breast thins to nothing, over a width that differs from breast
    to breast and does not follow the compressed thickness (14 to 32 mm, power-law or rounded), and
    a vendor's periphery equalisation undoes part of it: fat there is darker than fat inside.  Per
    1 mm distance band the fat level is a low quantile of the tissue there (fat is the lower envelope
    of the fat/gland mixtures: its 5th percentile), and the curve is the weighted isotonic
    (non-decreasing inwards) regression of those levels after a running median over 9 mm and a running
    minimum over the next 15 mm, each band weighted by its pixels: a band or two of gland that happen
    to fill their distance bands are a spike the median removes (an isotonic fit would carry it inwards
    for ever); a wider run of them (a dense core filling every band for 10 mm, fat again beyond it) is
    an upward step the fat deeper in takes back, while a level that keeps falling inwards (scatter in
    a large breast) is lowered only by what it falls over 15 mm.  Beyond the deepest band with enough
    pixels the level is held."""

    curve = fat_curve(v, d_mm, tissue, bin_mm, air)
    out: np.ndarray = curve[band_index(d_mm, bin_mm, curve.size)].astype(np.float32)
    return out


def band_index(d_mm: np.ndarray, bin_mm: float, nb: int) -> np.ndarray:
    """The distance band of each pixel (the deepest band takes everything beyond it)."""
    out: np.ndarray = np.minimum((d_mm / bin_mm).astype(np.int64), nb - 1)
    return out


def fat_curve(v: np.ndarray, d_mm: np.ndarray, tissue: np.ndarray, bin_mm: float = 1.0,
              air: float | None = None) -> np.ndarray:
    """:func:`fat_trend`'s level per distance band (non-decreasing inwards), before it is given to the
    pixels (:func:`band_index`)."""
    level, n = band_level(v, d_mm, tissue, FAT_PERCENTILE, bin_mm)
    if n.sum() == 0:
        return np.zeros(level.size, dtype=np.float64)
    ok = n >= 30
    if not ok.any():
        return np.full(level.size, float(np.percentile(v[tissue], 5)), dtype=np.float64)
    centres = np.arange(level.size, dtype=np.float64)
    pos, lev, cnt = centres[ok] * bin_mm, level[ok], n[ok]
    # A band or two where gland fills the whole distance band (its 5th percentile is gland) is a spike
    # in the envelope; a plain isotonic fit would carry it inwards for ever: a running median over
    # SPIKE_MM first.  In millimetres, not bands (a band with too few pixels is left out, so the bands
    # present need not be consecutive); the window shrinks at the ends rather than repeating the last
    # band (which then passed through unfiltered).
    lo = np.searchsorted(pos, pos - SPIKE_MM / 2.0, side="left")
    hi = np.searchsorted(pos, pos + SPIKE_MM / 2.0, side="right")
    smooth = window_median(lev, lo, hi)
    # A run of bands that gland fills (a dense core 10 mm across) is an upward step that the isotonic
    # fit would pool with the fat beyond it and carry inwards: each level is first held to the lowest
    # of the next AHEAD_MM, so the fat found deeper in takes the step back.  Only bands holding a
    # quarter of its pixels or more may lower a band: a sparse band (the last millimetres at the chest
    # wall, a dark line along it) would otherwise set the level for everything before it.
    end = np.searchsorted(pos, pos + AHEAD_MM, side="right")
    lowest_ahead = _lowest_ahead(smooth, cnt, end)
    fitted = isotonic(lowest_ahead, cnt.astype(np.float64))
    curve: np.ndarray = np.interp(centres, centres[ok], fitted)   # held beyond the deepest band with enough pixels
    # The dense-core rule (:func:`_dense_core_knee`) looks for its knee on the level before the
    # lowest-ahead step, whose flat stretches would make knees of their own (a fatty breast whose fat
    # brightens towards the wall, dark rings between: its rise near the wall was held as gland, 0.31 for
    # 0.03); from that knee the level is no higher than the knee's.
    air_level = float(v[tissue].min()) if air is None else air
    plain = np.interp(centres, centres[ok], isotonic(smooth, cnt.astype(np.float64)))
    knee = _dense_core_knee(plain, bin_mm, air_level)
    if knee is None:
        return curve
    out: np.ndarray = curve.copy()
    out[knee:] = np.minimum(curve[knee:], plain[knee])
    return out


def _lowest_ahead(level: np.ndarray, cnt: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Per band i, the lowest ``level`` over bands i to ``end[i]`` (excluded) among those holding at least
    AHEAD_SHARE of band i's pixels (band i itself always does)."""
    ahead, inside = windows(np.arange(end.size), end, end.size)
    out: np.ndarray = np.where(inside & (cnt[ahead] >= AHEAD_SHARE * cnt[:, None]), level[ahead], np.inf).min(axis=1)
    return out


def band_level(v: np.ndarray, d_mm: np.ndarray, tissue: np.ndarray, q: float,
               bin_mm: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Per ``bin_mm`` band of distance from the skin line, the ``q`` quantile of the tissue's values
    there (one 2-D histogram of about 4000 levels, whatever the value range) and the pixel count per
    band."""
    d_in = d_mm[tissue]
    depth = float(d_in.max()) if d_in.size else bin_mm
    nb = max(2, int(math.ceil(depth / bin_mm)) + 1)
    vals = v[tissue]
    if vals.size == 0:
        return np.zeros(nb), np.zeros(nb, dtype=np.int64)
    b = band_index(d_in, bin_mm, nb)
    lo = float(vals.min())
    scale = max(1.0, float(vals.max() - lo) / 4000.0)
    vq = np.rint((vals - lo) / scale).astype(np.int64)
    nv = int(vq.max()) + 1
    hist = np.bincount(b * nv + vq, minlength=nb * nv).reshape(nb, nv)
    cum = hist.cumsum(axis=1)
    n = cum[:, -1]
    level = np.argmax(cum >= np.maximum(1, q * n)[:, None], axis=1)
    return level.astype(np.float64) * scale + lo, n


EDGE_KNEE = 0.15          # the edge has flattened where the fat level rises this slowly (of its steepest)
FLAT_PER_MM = 0.005       # a rise this slow (of the fat signal a millimetre) is flat whatever the edge did
KNEE_RUN_MM = 5.0         # ... and stays that flat over this many millimetres
SECOND_RISE = 0.15        # a rise after it, of this fraction of the fat signal, is gland, not thickness


def _dense_core_knee(curve: np.ndarray, bin_mm: float, air_level: float) -> int | None:
    """The fat level rises with the thickness, steeply near the skin and ever more slowly until the
    compressed region, where it stops (whatever the edge's profile, its slope only falls).  Where the
    lower envelope flattens (the knee: a slope under 15 % of its steepest) and later rises again by
    more than 15 % of the fat signal, that second rise is a band of gland filling the distance bands
    (a dense core), not thickness: the level is to be held at the knee's from there.  The knee's band,
    or None."""
    k = max(1, int(round(5.0 / bin_mm)))
    padded = np.pad(curve, k, mode="edge")
    slope = (padded[2 * k:] - padded[:-2 * k]) / (2 * k * bin_mm)
    start = int(math.ceil(SKIN_BAND_MM / bin_mm))
    if curve.size <= start + 2 * k:
        return None
    steepest = float(slope[start:start + int(10.0 / bin_mm) + 1].max())
    signal0 = max(1e-6, float(curve[start]) - air_level)
    # flat: under 15 % of the steepest rise, or under 0.5 % of the fat signal a millimetre (an
    # equalised edge is flat at once)
    flat = slope[start:] <= max(EDGE_KNEE * max(steepest, 0.0), FLAT_PER_MM * signal0)
    run = max(1, int(round(KNEE_RUN_MM / bin_mm)))
    # the knee: the first distance from which the level stays flat for KNEE_RUN_MM (one flat step of
    # the isotonic fit inside a gradual edge is not the end of the edge)
    stays = np.convolve(flat.astype(np.int64), np.ones(run, dtype=np.int64), mode="full")[run - 1:] == run
    hits = np.flatnonzero(stays[: max(0, flat.size - run + 1)])
    if hits.size == 0:
        return None
    knee = start + int(hits[0])
    signal = max(1e-6, float(curve[knee]) - air_level)
    return None if float(curve[-1] - curve[knee]) <= SECOND_RISE * signal else knee


BURNOUT_RADIUS_MM = 2.0   # burn-out is a patch at least 4 mm across (unsharp-mask halos are thinner)
IMPLANT_MIN_AREA = 0.04   # of the breast: an implant is large
IMPLANT_LEVEL = 0.80      # its values in the top fifth between the fat level and the breast's maximum
IMPLANT_FLAT = 0.010      # and flat: the spread of its 7-pixel means over 15 pixels, per unit of that range
IMPLANT_SOLID = 0.80      # and a solid shape: this much of its filled outline


def flat_screen(mean_w: np.ndarray, bright_w: np.ndarray, scale: float) -> float:
    """About how many of the bright pixels are flat (spread over 15 pixels at most IMPLANT_FLAT of
    ``scale``), counted at half resolution (2x2 block means, a 7-pixel window: 14 of the 15 pixels), a
    quarter of the cost.  Not a bound: its window is a part of the full one, so a texture repeating
    every 15 pixels can read less flat in it (a review's worst: 0.68 of the exact count; on 72 images of
    the three sets it counted 1.1-5 times as many).  The implant check stops on it only under half the
    implant's area, i.e. where it would have to count under half the flat pixels of a real implant
    (tests/test_triage_density.py holds the textures).  inf when the window is too small to screen."""
    h2, w2 = mean_w.shape[0] // 2, mean_w.shape[1] // 2
    if h2 < 8 or w2 < 8:
        return math.inf
    q = mean_w[:2 * h2, :2 * w2]
    half = 0.25 * (q[0::2, 0::2] + q[1::2, 0::2] + q[0::2, 1::2] + q[1::2, 1::2])
    m2 = box_filter(half, 7).astype(np.float64)
    spread = np.sqrt(np.maximum(box_filter(half ** 2, 7) - m2 ** 2, 0.0)) / scale
    return 4.0 * float((bright_w[:2 * h2:2, :2 * w2:2] & (spread <= IMPLANT_FLAT)).sum())


def find_implant(v: np.ndarray, tissue: np.ndarray, d_mm: np.ndarray) -> np.ndarray:
    """An implant, or an empty mask: a large (4 % of the breast or more), homogeneous, textureless,
    solid region near the top of the breast's range.  The brightest dense tissue is not one: gland
    and ducts have texture at the scale of millimetres (measured on 8 real films: median spread 0.013
    to 0.19 of the range; a silicone implant 0.007), and a mass is a few percent of the breast at most."""
    empty = np.zeros_like(tissue)
    inner = tissue & (d_mm >= SKIN_BAND_MM)
    if inner.sum() < 400:
        return empty
    vals = v[inner]
    fat, top = (float(q) for q in percentile(vals[:: max(1, vals.size // 250_000)], [5, 99.9]))
    if top <= fat:
        return empty
    if float((vals >= fat + IMPLANT_LEVEL * (top - fat)).mean()) < 0.5 * IMPLANT_MIN_AREA:
        return empty   # too little of the breast near its maximum to hold one (most images: no filtering)
    mean = box_filter(v, 7).astype(np.float64)
    bright = tissue & (mean >= fat + IMPLANT_LEVEL * (top - fat))
    need = IMPLANT_MIN_AREA * tissue.sum()
    if bright.sum() < need:
        return empty   # the implant is part of this: too little of it (exact, before the texture)
    # The texture and the opening only where it can be: the bright part's bounding box, with the
    # 15-pixel window's margin (the values over the whole image, up to the last bits of the box filter's
    # sums; most of the image is not bright).
    rows, cols = np.flatnonzero(bright.any(axis=1)), np.flatnonzero(bright.any(axis=0))
    win = (slice(max(0, int(rows[0]) - 8), int(rows[-1]) + 9), slice(max(0, int(cols[0]) - 8), int(cols[-1]) + 9))
    mean_w = mean[win]
    # A screen first, at half resolution: where it finds under half the implant's area, there is none.
    if flat_screen(mean_w, bright[win], top - fat) < 0.5 * need:
        return empty
    m2 = box_filter(mean_w, 15).astype(np.float64)
    spread = np.sqrt(np.maximum(box_filter(mean_w ** 2, 15) - m2 ** 2, 0.0)) / (top - fat)
    flat = bright[win] & (spread <= IMPLANT_FLAT)
    if flat.sum() < need:
        return empty   # bright but textured: gland (the opening below only takes away)
    cand = np.zeros_like(tissue)
    cand[win] = cross_open(flat, 2)
    labels, n = label(cand)
    if n == 0:
        return empty
    sizes = np.bincount(labels.ravel())[1:]
    region = labels == int(np.argmax(sizes)) + 1
    if region.sum() < need:
        return empty
    filled = fill_holes(cross_close(region, 3))
    if region.sum() < IMPLANT_SOLID * filled.sum():
        return empty
    # The implant's rim (its edge thins to the compressed tissue around it) goes with it: left in, it
    # would be the brightest "dense" class of the clustering.
    rim_level = fat + 0.5 * (top - fat)
    for _ in range(12):
        grown = cross_dilate(filled) & tissue & (mean >= rim_level)
        if not (grown & ~filled).any():
            break
        filled = filled | grown
    out: np.ndarray = filled & tissue
    return out



@dataclass
class Segmentation:
    """The tissue classes of one breast, in the working image's (chest wall left) orientation."""

    labels: np.ndarray            # 0 outside, 1 fat, 2 dense (254 implant and 255 pectoral added later)
    implant: np.ndarray
    tissue: np.ndarray            # breast tissue at foreground values (burn-out left out)
    pd: float | None = None
    fat_c: float = float("nan")   # mean working value of the clustered fat and of the dense class
    dense_c: float = float("nan")



DEPTH_ZONES_MM = (3.0, 8.0, 15.0, 25.0, 40.0)   # the dense split per zone of depth from the skin line (mm),
ZONE_ETA = 0.75           # ... used where the zone is two-class: its split's eta above a flat histogram's 0.75
ZONE_SEPARATION = 0.5     # ... its class centres at least half as far apart as the breast's
ZONE_MIN_SHARE = 0.03     # ... each class at least 3 % of the zone
ZONE_MIN_PIXELS = 500


def _eta(hist: np.ndarray, t: int) -> float:
    """Otsu's separability of a histogram split after bin ``t``: the between-class share of its variance
    (1 for two spikes, 0.75 for a flat histogram, 0.64 for one Gaussian)."""
    x = np.arange(hist.size, dtype=np.float64)
    total = float(hist.sum())
    w = hist / max(total, 1.0)
    mu = float((w * x).sum())
    var = float((w * (x - mu) ** 2).sum())
    w0 = float(w[: t + 1].sum())
    w1 = 1.0 - w0
    if var <= 0.0 or w0 <= 0.0 or w1 <= 0.0:
        return 0.0
    m0 = float((w[: t + 1] * x[: t + 1]).sum()) / w0
    m1 = float((w[t + 1:] * x[t + 1:]).sum()) / w1
    return w0 * w1 * (m1 - m0) ** 2 / var


def depth_thresholds(rq: np.ndarray, band: np.ndarray, cl: Any, scale: float, lo: float, thr_r: float,
                     classes: int) -> np.ndarray | float:
    """The dense threshold on the residual per pixel: the breast's own split, or where a zone of depth
    from the skin line is itself clearly two-class, that zone's split, interpolated between the zones.

    Under a vendor's tone curve the gland of the thin periphery sits near the curve's toe and reads a
    residual of about 1 where the core's reads 2.5 (the independent family's case 5, extremely dense:
    three populations, fat near 0 and the two glands, and the breast's two-class split fell between the
    glands: 0.58 for 0.85).  A zone's own K-Means is used only where it splits two populations, not one
    (Otsu's eta of the split above 0.75, a flat histogram's; a fatty zone of fat and strands splits at
    0.64-0.70 on the real films, and its split would be fat from fat), with centres at least half as far
    apart as the breast's and each class 3 % of the zone or more; elsewhere the zones between take the
    interpolation and those beyond the last the nearest one's."""
    if not np.isfinite(thr_r) or not DEPTH_ZONES_MM or rq.size == 0:
        return thr_r
    gap = float(cl.centres[-1] - cl.centres[0])
    # One pass over the pixels: the residual's histogram per 1 mm band of depth (``band``: the fat
    # curve's), summed into the zones; the thresholds are placed per band and gathered back.
    nb = int(rq.max()) + 1
    n_bands = int(band.max()) + 1
    per_band = np.bincount(band * nb + rq, minlength=n_bands * nb).reshape(n_bands, nb)
    centres = np.arange(n_bands) + 0.5                      # mm: the bands are 1 mm (``band_index``)
    zone_of = np.searchsorted(np.asarray(DEPTH_ZONES_MM), centres, side="right") - 1
    mids: list[float] = []
    thrs: list[float] = []
    for z in range(len(DEPTH_ZONES_MM)):
        rows = zone_of == z
        hist = per_band[rows].sum(axis=0)
        n = int(hist.sum())
        if n < ZONE_MIN_PIXELS:
            continue
        zc = kmeans_hist(hist, classes)
        if zc.thresholds.size == 0:
            continue   # the zone in one bin (flat, saturated): one class, nothing to split
        t = int(zc.thresholds[-1])
        upper = float(hist[t + 1:].sum()) / n
        if (float(zc.centres[-1] - zc.centres[0]) < ZONE_SEPARATION * gap
                or not ZONE_MIN_SHARE <= upper <= 1.0 - ZONE_MIN_SHARE or _eta(hist, t) < ZONE_ETA):
            continue
        counts = per_band[rows].sum(axis=1)
        mids.append(float((centres[rows] * counts).sum() / n))    # the zone's mean depth
        thrs.append(float(zc.thresholds[-1]) * scale + lo)
    if not mids:
        return thr_r
    out: np.ndarray = np.interp(centres, mids, thrs)[band]
    return out


GLAND_R = 0.76            # gland over fat in an attenuation image, as a fraction of the fat signal: at most


def _soften(resid: np.ndarray) -> np.ndarray:
    """Residuals beyond what gland can give in an attenuation image (GLAND_R) compressed by a log.

    In an attenuation (log) image the residual over fat, as a fraction of the fat signal above air,
    is the gland's share of the path times the gland/fat contrast: the same at every thickness and
    at most 0.76.  A vendor's tone curve breaks that: in the middle of its range gland reads ten times
    the fat signal, near its toe (the thin periphery) barely above fat (measured on the independent
    family); on a linear scale the middle's gland pulls the dense class so high that the periphery's
    gland falls into fat.  What a tone curve stretched past the physical maximum is compressed back;
    an attenuation image is unchanged."""
    over = resid > GLAND_R
    out: np.ndarray = resid.copy()
    out[over] = GLAND_R + np.log1p(resid[over] - GLAND_R)
    return out


def segment_tissue(vw: np.ndarray, d_mm: np.ndarray, tissue: np.ndarray, air: float, k: int,
                   findings: list[str]) -> Segmentation:
    """Thickness-corrected K-Means: the fat level's trend with the distance to the skin line is taken
    out, implants (far above any gland) set aside, and the residual of the tissue deeper than the skin
    band clustered into k-1 classes; dense is the top one."""
    seg = Segmentation(np.zeros(tissue.shape, dtype=np.uint8), np.zeros_like(tissue), tissue.copy())
    if tissue.sum() < 100:
        return seg
    curve = fat_curve(vw, d_mm, tissue, air=air)
    # the level's top over the whole image (the curve never falls inwards: the deepest pixel's band)
    top = float(curve[band_index(np.asarray([d_mm.max()]), 1.0, curve.size)[0]].astype(np.float32))
    implant = find_implant(vw, tissue, d_mm)
    if implant.any():
        seg.implant = implant
        findings.append("implant: density not comparable")
    seg.tissue = tissue & ~seg.implant
    inner = seg.tissue & (d_mm >= SKIN_BAND_MM)
    if inner.sum() < 100:
        # All of it within the skin band (a field of a few millimetres): nothing to measure.
        findings.append("no tissue deeper than the skin band: density not measured")
        return seg
    # The residual's histogram over its own range (1500 bins from its 0.1th to its 99.9th percentile):
    # under a vendor's tone curve fat sits near air, (trend - air) is small and gland reads ten times
    # the fat signal; a fixed range would clip fat's bright tail and the gland into one bin.
    band = band_index(d_mm[inner], 1.0, curve.size)
    trend = curve[band].astype(np.float32)
    r = _soften((vw[inner] - trend) / np.maximum(trend - air, 0.05 * max(1.0, top - air)))
    lo, hi = (float(x) for x in percentile(r[:: max(1, r.size // 250_000)], [0.1, 99.9]))
    scale = max(hi - lo, 1e-6) / 1500.0
    rq = np.clip(np.rint((r - lo) / scale).astype(np.int64), 0, 1500)
    cl = kmeans_hist(np.bincount(rq, minlength=1501), max(2, k - 1))
    centres_r = cl.centres * scale + lo
    if centres_r[-1] - centres_r[0] < MIN_SEPARATION_R:
        thr_r = float("inf") if centres_r.mean() < 0.5 * IMPLANT_R else -float("inf")
    else:
        thr_r = float(cl.thresholds[-1]) * scale + lo
    dense = np.zeros_like(inner)
    dense[inner] = r > depth_thresholds(rq, band, cl, scale, lo, thr_r, max(2, k - 1))
    seg.pd = float(dense.sum() / max(1, seg.tissue.sum()))
    seg.labels[seg.tissue & ~dense] = 1
    seg.labels[dense] = 2
    fat_in = inner & ~dense  # the clustered fat (the skin band is left out of the centre)
    seg.fat_c = float(vw[fat_in].mean()) if fat_in.any() else float("nan")
    seg.dense_c = float(vw[dense].mean()) if dense.any() else float("nan")
    return seg
