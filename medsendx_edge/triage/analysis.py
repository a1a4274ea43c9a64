"""Triage science: pixel density segmentation with K-Means, body/breast mask, metrics, priority.

Pure functions over numpy arrays and a pydicom header; no file system here.

K-Means on intensities is a 1-D problem, solved on the intensity histogram: one counting pass over
the pixels (:func:`histogram`), Lloyd iterations on the bins with cumulative sums (O(k) per
iteration, whatever the image size: :func:`kmeans_hist`), and a lookup table that labels every
pixel (:func:`label_lut`).  Labels are ordered by centroid.

The metrics pipeline (:func:`analyse`) finds the body (breast) first, at a working resolution of at
most ``WORK_MAX`` pixels a side: background and air from a 2-class split, the largest connected
component (burned-in labels and markers are separate components), holes filled; on mammography
MLO views the pectoral muscle (the bright triangle in the chest-wall corner, fitted with a
straight edge) is taken out.  Fat and dense tissue are then the (k-1)-class K-Means of the
tissue pixels at full resolution, so air, markers and muscle cannot pull the centres.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from medsendx_edge.triage.features import FEATURE_COLUMNS  # noqa: F401 - re-exported

WORK_MAX = 1024
_CHUNK_ROWS = 512



# --------------------------------------------------------------------------- 1-D K-Means
def histogram(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Counts per integer value (one pass, in row chunks to bound memory) and the offset of bin 0."""
    if values.size == 0:
        return np.zeros(1, dtype=np.int64), 0
    flat = values.reshape(values.shape[0], -1) if values.ndim > 1 else values.reshape(1, -1)
    if values.dtype in (np.uint8, np.uint16):
        # Small unsigned types: count over the whole range, no min/max passes, no offset to subtract.
        full = np.zeros(1 << (8 * values.dtype.itemsize), dtype=np.int64)
        for start in range(0, flat.shape[0], _CHUNK_ROWS):
            full += np.bincount(flat[start:start + _CHUNK_ROWS].ravel(), minlength=full.size)
        top = int(np.flatnonzero(full)[-1])
        return full[: top + 1], 0
    lo, hi = int(values.min()), int(values.max())
    counts = np.zeros(hi - lo + 1, dtype=np.int64)
    for start in range(0, flat.shape[0], _CHUNK_ROWS):
        chunk = flat[start:start + _CHUNK_ROWS]
        if lo != 0 or chunk.dtype.kind == "i":
            chunk = chunk.astype(np.int64) - lo
        counts += np.bincount(chunk.ravel(), minlength=counts.size)
    return counts, lo


@dataclass(frozen=True)
class Clusters:
    """A 1-D K-Means result on a histogram, in bin units (add the histogram offset for values)."""

    centres: np.ndarray      # k centres, ascending
    thresholds: np.ndarray   # k-1 boundaries: bin b belongs to cluster sum(b > thresholds)
    counts: np.ndarray       # pixels per cluster
    iterations: int


def kmeans_hist(counts: np.ndarray, k: int = 3, max_iter: int = 300) -> Clusters:
    """Lloyd's algorithm on a histogram (exact for 1-D data), initialised at the quantiles."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.size
    x = np.arange(n, dtype=np.float64)
    cs = np.concatenate(([0.0], np.cumsum(counts)))
    cxs = np.concatenate(([0.0], np.cumsum(counts * x)))
    total = cs[-1]
    if total == 0 or k < 1:
        raise ValueError("empty histogram")
    k = max(1, min(k, int(np.count_nonzero(counts))))
    targets = (np.arange(k) + 0.5) / k * total
    centres = np.searchsorted(cs[1:], targets).astype(np.float64)
    centres = np.unique(centres)
    while centres.size < k:  # ties: spread over the occupied bins
        occupied = np.flatnonzero(counts)
        centres = np.unique(np.concatenate([centres, occupied[np.linspace(0, occupied.size - 1, k).astype(int)]]))[:k]
    it = 0
    for it in range(1, max_iter + 1):
        bounds = (centres[:-1] + centres[1:]) / 2.0
        edges = np.concatenate(([0], np.floor(bounds).astype(np.int64) + 1, [n]))
        edges = np.clip(edges, 0, n)
        s = cs[edges[1:]] - cs[edges[:-1]]
        sx = cxs[edges[1:]] - cxs[edges[:-1]]
        new = np.where(s > 0, sx / np.maximum(s, 1e-300), centres)
        if np.allclose(new, centres, rtol=0, atol=1e-9):
            centres = new
            break
        centres = new
    thresholds = (centres[:-1] + centres[1:]) / 2.0
    edges = np.concatenate(([0], np.floor(thresholds).astype(np.int64) + 1, [n]))
    edges = np.clip(edges, 0, n)
    cluster_counts = cs[edges[1:]] - cs[edges[:-1]]
    return Clusters(centres, thresholds, cluster_counts, it)


def label_lut(n_bins: int, thresholds: np.ndarray) -> np.ndarray:
    """Lookup table bin -> label (0..k-1, ordered by centroid)."""
    return np.searchsorted(thresholds, np.arange(n_bins, dtype=np.float64), side="left").astype(np.uint8)


def apply_lut(img: np.ndarray, lut: np.ndarray, offset: int) -> np.ndarray:
    out = np.empty(img.shape, dtype=np.uint8)
    for start in range(0, img.shape[0], _CHUNK_ROWS):
        chunk = img[start:start + _CHUNK_ROWS]
        idx = chunk - offset if offset else chunk
        out[start:start + _CHUNK_ROWS] = lut.take(idx, mode="clip")
    return out


def segment(img: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Whole-image K-Means on pixel density: (labels uint8 ordered by centroid, centres in pixel units)."""
    counts, offset = histogram(img)
    cl = kmeans_hist(counts, k)
    return apply_lut(img, label_lut(counts.size, cl.thresholds), offset), cl.centres + offset


# --------------------------------------------------------------------------- pixels in
@dataclass
class Pixels:
    image: np.ndarray          # 2-D integer array, brighter = denser (MONOCHROME1 inverted)
    slope: float
    intercept: float
    max_value: int             # largest storable value (saturation)
    note: str = ""


def pixels_from_dataset(ds: Any, frame: np.ndarray | None = None, frame_note: str = "") -> Pixels:
    """Decode (pylibjpeg plugins for JPEG, JPEG-LS, JPEG 2000, RLE), pick the middle frame of a
    multi-frame object, take the luminance of colour images, invert MONOCHROME1.

    ``frame``: the one frame already decoded from the file (see :mod:`medsendx_edge.triage.stage`'s
    loader, which never decodes the frames it does not use); else decoded from ``ds``."""
    notes = [frame_note] if frame_note else []
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if frame is not None:
        arr = frame
    else:
        arr = ds.pixel_array
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            arr = arr[frames // 2]
            notes.append(f"multi-frame: middle frame {frames // 2 + 1} of {frames}")
    if spp > 1 or arr.ndim == 3:
        rgb = arr.astype(np.float32)
        arr = np.rint(0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]).astype(np.int64)
        notes.append("colour: luminance")
    if arr.dtype.kind == "f":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scale = 4095.0 / (hi - lo) if hi > lo else 1.0
        arr = np.rint((arr - lo) * scale).astype(np.uint16)
        notes.append("float pixels quantised to 12 bits")
    bits = int(ds.get("BitsStored", 8 * arr.dtype.itemsize) or 8)
    max_value = (1 << bits) - 1 if arr.dtype.kind == "u" else int(arr.max())
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        arr = max_value - arr.astype(np.int64) if arr.dtype.kind == "i" else (max_value - arr)
        arr = np.clip(arr, 0, max_value).astype(np.uint16 if max_value < 65536 else np.int64)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope < 0:
        slope, intercept = -slope, intercept  # monotonic: magnitudes only matter for noise
    return Pixels(arr, slope, intercept, max_value, "; ".join(notes))


# --------------------------------------------------------------------------- masks
def downsample(img: np.ndarray, max_side: int = WORK_MAX) -> tuple[np.ndarray, int]:
    f = max(1, math.ceil(max(img.shape) / max_side))
    if f == 1:
        return img.astype(np.float32), 1
    h, w = (img.shape[0] // f) * f, (img.shape[1] // f) * f
    small = img[:h, :w].reshape(h // f, f, w // f, f).astype(np.float32).mean(axis=(1, 3))
    return small, f


def collimation_mask(small: np.ndarray, max_value: int) -> np.ndarray:
    """Unexposed, collimated areas: flat regions at the top of the range (after MONOCHROME1
    inversion they are the brightest), when they cover more than 2% of the image."""
    top = small >= max_value - 0.02 * max(1.0, float(max_value))
    if top.mean() < 0.02:
        return np.zeros_like(top)
    return ndimage.binary_opening(top, iterations=2)


def body_mask(small: np.ndarray, exclude: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Largest bright connected component, holes filled; returns (mask, threshold)."""
    vals = small if exclude is None or not exclude.any() else small[~exclude]
    q = np.rint(vals).astype(np.int64)
    counts, offset = histogram(q)
    cl = kmeans_hist(counts, 2)
    thr = cl.thresholds[0] + offset
    fg = small > thr
    if exclude is not None:
        fg &= ~exclude
    fg = ndimage.binary_opening(fg, iterations=1)
    lab, n = ndimage.label(fg)
    if n == 0:
        return np.zeros_like(fg), float(thr)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    mask = lab == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(mask), float(thr)


def chest_wall_on_right(mask: np.ndarray) -> bool:
    w = mask.shape[1]
    band = max(1, w // 10)
    return int(mask[:, -band:].sum()) > int(mask[:, :band].sum())


def pectoral_mask(small: np.ndarray, body: np.ndarray) -> np.ndarray:
    """The pectoral muscle on an MLO view, chest wall on the left: the bright region in the top
    corner, bounded by a straight line fitted to its edge.  Empty if nothing plausible is found.

    The muscle's level P is the median of the corner; the fat level F the lower of a 2-class
    split of the body.  Along each row from the chest wall the edge is where the (smoothed)
    intensity first falls under P - (P - F) / 4: dense tissue, darker than muscle, stops it too,
    and the robust line fit through the row edges discards rows where tissue touches the muscle.
    """
    h, w = small.shape
    empty = np.zeros_like(body)
    ch, cw = max(2, h // 20), max(2, w // 20)
    wall = np.flatnonzero(body[:, :cw].mean(axis=1) > 0.9)  # rows where the body meets the chest wall
    if wall.size == 0:
        return empty
    r0 = int(wall[0])
    corner = small[r0:r0 + ch, :cw][body[r0:r0 + ch, :cw]]
    if corner.size < 0.5 * ch * cw:
        return empty
    level_p = float(np.median(corner))
    vals = small[body]
    counts, offset = histogram(np.rint(vals).astype(np.int64))
    level_f = float(kmeans_hist(counts, 2).centres[0] + offset)
    if level_p - level_f <= 0:
        return empty
    thr = level_p - (level_p - level_f) / 4.0
    smooth = ndimage.uniform_filter(small, size=5)
    below = (smooth < thr) | ~body
    rows: list[int] = []
    edges: list[int] = []
    for r in range(r0, int(h * 0.8)):
        hits = np.flatnonzero(below[r, : int(w * 0.7)])
        c = hits[0] if hits.size else int(w * 0.7)
        if c == 0:
            if len(rows) >= 5:
                break  # below the muscle
            continue  # the top rows, smoothed into the background
        rows.append(r)
        edges.append(c)
    if len(rows) < 5:
        return empty
    rr_, ee = np.asarray(rows, dtype=np.float64), np.asarray(edges, dtype=np.float64)
    keep = np.ones(rr_.size, dtype=bool)
    b = a = 0.0
    for _ in range(3):
        if keep.sum() < 5:
            return empty
        b, a = np.polyfit(rr_[keep], ee[keep], 1)
        resid = ee - (a + b * rr_)
        mad = float(np.median(np.abs(resid[keep]))) + 0.5
        keep = np.abs(resid) <= 3.0 * 1.4826 * mad
    if b >= 0 or a <= 0:
        return empty
    rr, cc = np.mgrid[0:h, 0:w]
    pect = (cc < a + b * rr) & body
    frac = pect.sum() / max(1, body.sum())
    if not 0.01 <= frac <= 0.5:
        return empty
    return pect


# --------------------------------------------------------------------------- metrics
def _robust_std(x: np.ndarray) -> float:
    if x.size < 10:
        return float("nan")
    if x.size > 1_000_000:
        x = x[:: x.size // 1_000_000 + 1]
    med = np.median(x)
    return float(1.4826 * np.median(np.abs(x - med)))


def _upsample(mask: np.ndarray, f: int, shape: tuple[int, int]) -> np.ndarray:
    if f == 1:
        return mask[: shape[0], : shape[1]]
    rows = np.minimum(np.arange(shape[0]) // f, mask.shape[0] - 1)
    cols = np.minimum(np.arange(shape[1]) // f, mask.shape[1] - 1)
    return mask[rows[:, None], cols[None, :]]


@dataclass
class Analysis:
    metrics: dict[str, Any]
    labels_small: np.ndarray        # 0 background, 1..k-1 tissue classes, 255 pectoral
    small: np.ndarray               # working-resolution image
    body: np.ndarray
    pectoral: np.ndarray
    flipped: bool
    label_names: list[str] = field(default_factory=list)


def label_names(k: int) -> list[str]:
    tissue = k - 1
    if tissue == 1:
        return ["background", "tissue"]
    if tissue == 2:
        return ["background", "fat", "dense"]
    return ["background", "fat"] + [f"tissue_{i}" for i in range(2, tissue)] + ["dense"]


def _num(ds: Any, kw: str) -> float | None:
    v = ds.get(kw)
    if v is None or v == "":
        return None
    try:
        return float(v[0] if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else v)
    except (TypeError, ValueError):
        return None


def _text(ds: Any, kw: str) -> str | None:
    v = ds.get(kw)
    return None if v in (None, "") else str(v)


def header_values(ds: Any, station_name: str) -> dict[str, Any]:
    mas = _num(ds, "Exposure")
    uas = _num(ds, "ExposureInuAs")
    if uas is not None:
        mas = uas / 1000.0
    date = _text(ds, "AcquisitionDate") or _text(ds, "ContentDate") or _text(ds, "StudyDate")
    return {
        "station_name": station_name,
        "acquired_date": date if date and date != "19000101" else None,
        "manufacturer": _text(ds, "Manufacturer"),
        "model": _text(ds, "ManufacturerModelName"),
        "kvp": _num(ds, "KVP"),
        "exposure_mas": mas,
        "exposure_time_ms": _num(ds, "ExposureTime"),
        "thickness_mm": _num(ds, "BodyPartThickness"),
        "compression_n": _num(ds, "CompressionForce"),
        "anode": _text(ds, "AnodeTargetMaterial"),
        "filter": _text(ds, "FilterMaterial"),
        "view": _text(ds, "ViewPosition"),
        "laterality": _text(ds, "ImageLaterality") or _text(ds, "Laterality"),
        "presentation_intent": _text(ds, "PresentationIntentType"),
        "modality": _text(ds, "Modality"),
    }


def analyse(ds: Any, k: int = 3, station_name: str = "", frame: np.ndarray | None = None,
            frame_note: str = "") -> Analysis:
    """Metrics for one image: masks, clusters, density, noise, acquisition values."""
    px = pixels_from_dataset(ds, frame, frame_note)
    img = px.image
    small, f = downsample(img)
    collimated = collimation_mask(small, px.max_value)
    body, _thr = body_mask(small, collimated)
    flipped = chest_wall_on_right(body)
    if flipped:
        small, body = small[:, ::-1], body[:, ::-1]
    modality = str(ds.get("Modality", "") or "")
    view = str(ds.get("ViewPosition", "") or "").upper()
    pect = pectoral_mask(small, body) if modality == "MG" and "MLO" in view else np.zeros_like(body)
    tissue_small = body & ~pect
    if flipped:  # back to the image's own orientation for the full-resolution work
        small, body, pect, tissue_small = (a[:, ::-1] for a in (small, body, pect, tissue_small))
    tissue_full = _upsample(tissue_small, f, img.shape)
    body_full = _upsample(body, f, img.shape)
    tissue_px = img[tissue_full]
    if tissue_px.size < 100:
        raise ValueError("no body or breast found in the image")
    counts, offset = histogram(tissue_px)
    cl = kmeans_hist(counts, max(2, k - 1))
    centres = cl.centres + offset
    fat_c, dense_c = float(centres[0]), float(centres[-1])
    pd = float(cl.counts[-1] / cl.counts.sum())
    # Background: outside a dilated body, without other bright components (labels, markers).
    bg_small = ~ndimage.binary_dilation(body, iterations=3) & (small <= _thr) & ~collimated
    bg_small = ndimage.binary_erosion(bg_small, iterations=2)
    bg_px = img[_upsample(bg_small, f, img.shape)]
    bg_c = float(np.median(bg_px)) if bg_px.size else float("nan")
    noise_bg = _robust_std(bg_px.astype(np.float64)) if bg_px.size else float("nan")
    # Noise in flat fat: residual of a 3x3 mean, on fat pixels well inside the fat class.
    fat_thr = cl.thresholds[0] + offset
    flat = ndimage.binary_erosion(tissue_small & (small < fat_thr), iterations=2)
    flat_full = _upsample(flat, f, img.shape)
    if flat_full.any():
        rows = np.flatnonzero(flat_full.any(axis=1))
        cols = np.flatnonzero(flat_full.any(axis=0))
        crop = img[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1].astype(np.float32)
        resid = crop - ndimage.uniform_filter(crop, size=3)
        noise_fat = _robust_std(resid[flat_full[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]]) * math.sqrt(9 / 8)
    else:
        noise_fat = float("nan")
    s, b0 = px.slope, px.intercept
    to_val = lambda v: v * s + b0  # noqa: E731
    body_count = int(body_full.sum())
    body_px_max = img[body_full]
    spacing = ds.get("ImagerPixelSpacing") or ds.get("PixelSpacing")
    area_cm2 = None
    if spacing:
        try:
            area_cm2 = float(tissue_full.sum()) * float(spacing[0]) * float(spacing[1]) / 100.0
        except (TypeError, ValueError, IndexError):
            area_cm2 = None
    contrast = (dense_c - fat_c) * s
    nf = noise_fat * s
    metrics: dict[str, Any] = header_values(ds, station_name)
    metrics.update({
        "bg_c": to_val(bg_c), "fat_c": to_val(fat_c), "dense_c": to_val(dense_c), "contrast": contrast,
        "noise_bg": noise_bg * s, "noise_fat": nf,
        "snr_fat": (fat_c - bg_c) * s / nf if nf and nf > 0 else None,
        "cnr": contrast / nf if nf and nf > 0 else None,
        "mean_breast": to_val(float((counts * (np.arange(counts.size) + offset)).sum() / counts.sum())),
        "pd": pd,
        "breast_frac": float(tissue_full.sum() / img.size),
        "body_frac": float(body_count / img.size),
        "breast_area_cm2": area_cm2,
        "pectoral_frac": float(pect.sum() / max(1, body.sum())),
        "saturated_frac": float(np.count_nonzero(body_px_max >= px.max_value) / max(1, body_count)),
        "clipped_frac": float(np.count_nonzero(body_px_max <= 0) / max(1, body_count)),
        "collimated_frac": float(collimated.mean()),
        "k": k,
        "centres": [to_val(float(c)) for c in centres],
        "pixels_note": px.note or None,
    })
    for key, v in list(metrics.items()):
        if isinstance(v, float) and not math.isfinite(v):
            metrics[key] = None
    lut = label_lut(counts.size, cl.thresholds)
    q = np.clip(np.rint(small).astype(np.int64) - offset, 0, counts.size - 1)
    labels = (lut[q] + 1).astype(np.uint8)
    labels[~tissue_small] = 0
    labels[pect] = 255
    return Analysis(metrics, labels, small, body, pect, flipped, label_names(k))


# --------------------------------------------------------------------------- priority
PRIORITY_ORDER = ("recheck", "high", "normal", "low")
_OPS = {
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, "==": lambda a, b: a == b,
}


def priority(metrics: dict[str, Any], rules: Any) -> tuple[str, list[str]]:
    """The most urgent priority among the rules that match, and why; ``normal`` if none."""
    best = "normal"
    reasons = []
    for rule in rules:
        value = metrics.get(rule.metric)
        if value is None or not isinstance(value, (int, float)):
            continue
        if _OPS[rule.op](value, rule.value):
            reasons.append(rule.reason or f"{rule.metric} {rule.op} {rule.value}")
            if PRIORITY_ORDER.index(rule.priority) < PRIORITY_ORDER.index(best):
                best = rule.priority
    return best, reasons
