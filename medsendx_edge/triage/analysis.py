"""Triage science: pixel density segmentation with K-Means, body/breast mask, metrics, priority.

Pure functions over numpy arrays and a pydicom header; no file system here.

K-Means on intensities is a 1-D problem, solved on the intensity histogram: one counting pass over
the pixels (:func:`histogram`), Lloyd iterations on the bins with cumulative sums (O(k) per
iteration, whatever the image size: :func:`kmeans_hist`), and a lookup table that labels every
pixel (:func:`label_lut`).  Labels are ordered by centroid.

The analysis (:func:`analyse`, docs/triage.md) works at a working resolution of at most ``WORK_MAX``
pixels a side, numpy only: the gate (:func:`gate`: mammograms only), tissue against air, the chest-wall
side from the pixels, the breast as the tissue connected to the chest wall row by row (labels and markers
are not), the pectoral muscle in whichever chest-wall corner holds it, the distance from the skin line,
then density as the K-Means of the thickness-corrected residual ((v - F(d)) / (F(d) - air), F the fat level
at distance d from the skin line), implants left out, and quality metrics that mean what they say.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medsendx_edge.triage import positioning
from medsendx_edge.triage.positioning import Positioning
from medsendx_edge.vocabulary import Priority

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


# --------------------------------------------------------------------------- what triage applies to
#: SOP classes triage measures density on, and their domain.
MAMMO_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1.2": "presentation",     # Digital Mammography X-Ray Image, For Presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1": "processing",     # ... For Processing (raw)
    "1.2.840.10008.5.1.4.1.1.13.1.3": "presentation",  # Breast Tomosynthesis Image
    "1.2.840.10008.5.1.4.1.1.13.1.4": "presentation",  # Breast Projection X-Ray Image, For Presentation
    "1.2.840.10008.5.1.4.1.1.13.1.5": "processing",    # Breast Projection X-Ray Image, For Processing
    "1.2.840.10008.5.1.4.1.1.1.1": "presentation",     # Digital X-Ray Image, For Presentation (DX of the breast)
    "1.2.840.10008.5.1.4.1.1.1.1.1": "processing",     # Digital X-Ray Image, For Processing
    "1.2.840.10008.5.1.4.1.1.1": "presentation",       # Computed Radiography Image (a CR mammogram: MG)
}
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
#: View modifiers (CID 4015) under which density is not measured: not the standard screening views
#: a density product reads (Quantra, Volpara refuse them).
NOT_SCREENING_MODIFIERS = ("magnification", "spot compression", "spot", "tangential", "rolled",
                           "cleavage", "axillary tail", "nipple in profile")
IMPLANT_DISPLACED = "implant displaced"


def view_modifiers(ds: Any) -> list[str]:
    """The view modifiers' meanings (View Modifier Code Sequence, at the top level or inside the View
    Code Sequence), lower case: "magnification", "spot compression", "implant displaced"..."""
    out = []
    for seq in (ds.get("ViewModifierCodeSequence"), _first(ds, "ViewCodeSequence", "ViewModifierCodeSequence")):
        for item in (seq or []) if not isinstance(seq, str) else []:
            meaning = str(getattr(item, "CodeMeaning", "") or "").strip().lower()
            if meaning:
                out.append(meaning)
    return out


@dataclass(frozen=True)
class Gate:
    """Whether density applies to this object, and how to read it."""

    applicable: bool
    reason: str = ""
    domain: str = "presentation"     # presentation (brighter = denser) | processing (linear raw signal)
    frame: int | None = None         # 0-based frame to decode (multi-frame objects)
    frame_note: str = ""
    view: str | None = None
    laterality: str | None = None
    flags: tuple[str, ...] = ()      # said with the result (a synthesised 2D view...)


def _first(ds: Any, *path: str) -> Any:
    """``ds.A[0].B[0].C`` without exceptions (functional groups, code sequences)."""
    cur = ds
    for i, kw in enumerate(path):
        cur = cur.get(kw) if hasattr(cur, "get") else None
        if cur is None or cur == "":
            return None
        if i < len(path) - 1 and not hasattr(cur, "get"):
            try:
                cur = cur[0]
            except (IndexError, TypeError, KeyError):
                return None
    return cur


_VIEW_CODES = {"cranio-caudal": "CC", "medio-lateral oblique": "MLO", "medio-lateral": "ML",
               "latero-medial": "LM", "exaggerated cranio-caudal": "XCCL"}


def header_view(ds: Any) -> tuple[str | None, str | None]:
    """(view, laterality) from the top level, else from the functional groups (tomosynthesis objects
    often carry them per frame only)."""
    view = str(ds.get("ViewPosition", "") or "").strip().upper() or None
    lat = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "") or "").strip().upper() or None
    if view is None:
        meaning = _first(ds, "ViewCodeSequence", "CodeMeaning")
        view = _VIEW_CODES.get(str(meaning or "").strip().lower())
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if lat is None:
            fl = _first(ds, groups, "FrameAnatomySequence", "FrameLaterality")
            lat = str(fl).strip().upper() or None if fl else None
    return view, (lat if lat in ("L", "R", "B") else None)


def gate(ds: Any) -> Gate:
    """Density is measured on mammograms only: MG (or DX of the breast), grey-scale, one frame (or the
    middle frame of a tomosynthesis stack, said so), presentation or raw (log-transformed)."""
    modality = str(ds.get("Modality", "") or "").strip().upper()
    part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    sop = str(ds.get("SOPClassUID", "") or "")
    if modality != "MG" and not (modality == "DX" and part == "BREAST"):
        return Gate(False, f"modality {modality or 'missing'}: density is measured on mammograms only "
                           "(MG, or DX of the breast)")
    if sop not in MAMMO_SOP_CLASSES:
        return Gate(False, f"SOP class {sop or 'missing'} is not a mammography image")
    if sop == CR_IMAGE and modality != "MG" and part != "BREAST":
        return Gate(False, "a CR image that is not a mammogram (Modality MG or BodyPartExamined BREAST)")
    qc = str(ds.get("QualityControlImage", "") or "").strip().upper()
    if qc in ("YES", "BOTH") or part == "PHANTOM":
        return Gate(False, "a quality-control (phantom) image: density and positioning apply to women only")
    modifiers = view_modifiers(ds)
    special = [m for m in modifiers if any(m.startswith(s) for s in NOT_SCREENING_MODIFIERS)]
    if special:
        return Gate(False, f"a {special[0]} view: density and positioning are read on the standard "
                           "screening views only")
    try:
        magnification = float(ds.get("EstimatedRadiographicMagnificationFactor", 1.0) or 1.0)
    except (TypeError, ValueError):
        magnification = 1.0
    if magnification >= 1.4:
        return Gate(False, f"a magnification view (factor {magnification:.1f}): density and positioning are "
                           "read on the standard screening views only")
    if str(ds.get("PhotometricInterpretation", "")).strip() not in ("MONOCHROME1", "MONOCHROME2"):
        return Gate(False, "not a grey-scale image")
    intent = str(ds.get("PresentationIntentType", "") or "").strip().upper()
    domain = "processing" if intent == "FOR PROCESSING" else "presentation" if intent else MAMMO_SOP_CLASSES[sop]
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    frame, note = None, ""
    if frames > 1:
        frame = frames // 2
        note = f"tomosynthesis: frame {frame + 1} of {frames}, decoded alone"
    view, lat = header_view(ds)
    image_type = [str(t).strip().upper() for t in (ds.get("ImageType") or [])] if not isinstance(
        ds.get("ImageType"), str) else [str(ds.get("ImageType")).upper()]
    flags: tuple[str, ...] = ()
    if any(t in ("GENERATED_2D", "SYNTHETIC", "SYNTHESIZED", "SYNTHESISED") for t in image_type):
        flags = ("synthesised 2D view (generated from tomosynthesis): density not validated on it",)
    return Gate(True, "", domain, frame, note, view, lat, flags)


# --------------------------------------------------------------------------- pixels in
@dataclass
class Pixels:
    image: np.ndarray          # 2-D integer array, brighter = denser (MONOCHROME1 inverted)
    slope: float
    intercept: float
    max_value: int             # largest storable value (saturation)
    note: str = ""
    padding: np.ndarray | None = None   # Pixel Padding Value / Range, at full resolution
    mono1: bool = False


def pixels_from_dataset(ds: Any, frame: np.ndarray | None = None, frame_note: str = "") -> Pixels:
    """Decode (pylibjpeg plugins for JPEG, JPEG-LS, JPEG 2000, RLE), pick the middle frame of a
    multi-frame object, take the luminance of colour images, invert MONOCHROME1.

    ``frame``: the one frame already decoded from the file (see :mod:`medsendx_edge.triage.stage`'s
    loader, which never decodes the frames it does not use); else decoded from ``ds``."""
    from medsendx_edge.triage.display import padding_mask

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
    padding = padding_mask(arr, ds) if spp == 1 else None
    mono1 = str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
    if mono1:
        arr = max_value - arr.astype(np.int64) if arr.dtype.kind == "i" else (max_value - arr)
        arr = np.clip(arr, 0, max_value).astype(np.uint16 if max_value < 65536 else np.int64)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope < 0:
        slope, intercept = -slope, intercept  # monotonic: magnitudes only matter for noise
    return Pixels(arr, slope, intercept, max_value, "; ".join(notes), padding, mono1)


# --------------------------------------------------------------------------- array helpers (numpy only)
def block_mean(img: np.ndarray, f: int) -> np.ndarray:
    """Mean of f x f blocks, as float32, by adding f*f strided views (no full-size float copy)."""
    if f == 1:
        return img.astype(np.float32)
    h, w = (img.shape[0] // f) * f, (img.shape[1] // f) * f
    acc = np.zeros((h // f, w // f), dtype=np.float32)
    for i in range(f):
        for j in range(f):
            acc += img[i:h:f, j:w:f]
    acc *= 1.0 / (f * f)
    return acc


def box_filter(a: np.ndarray, size: int) -> np.ndarray:
    """Mean over a size x size window (edges replicated): scipy's separable uniform filter."""
    from scipy import ndimage

    out: np.ndarray = ndimage.uniform_filter(a.astype(np.float32, copy=False), size=size, mode="nearest")
    return out


def isotonic(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least-squares non-decreasing fit of ``y`` (pool adjacent violators).  Written here rather
    than imported: scipy.optimize costs 0.49 s and scikit-learn 0.92 s to import, per ``segment``
    process, against a 0.5 s read + bincount floor; the fit itself is over a hundred points."""
    means: list[float] = []
    weights: list[float] = []
    sizes: list[int] = []
    for value, weight in zip(y.tolist(), w.tolist()):
        means.append(value)
        weights.append(weight)
        sizes.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            wsum = weights[-2] + weights[-1]
            means[-2] = (means[-2] * weights[-2] + means[-1] * weights[-1]) / wsum if wsum > 0 else means[-1]
            weights[-2] = wsum
            sizes[-2] += sizes[-1]
            del means[-1], weights[-1], sizes[-1]
    return np.repeat(np.asarray(means, dtype=np.float64), sizes)


def distance_mm(mask: np.ndarray, spacing_mm: float, max_side: int = 192) -> np.ndarray:
    """Distance to the mask's outline in mm (the skin line), on a coarse grid by peeling (alternating
    4- and 8-neighbour erosions: an octagonal metric), then upsampled.  Image borders count as inside
    (the chest wall and an axilla running off the image are not skin)."""
    h, w = int(mask.shape[0]), int(mask.shape[1])
    c = max(1, math.ceil(max(h, w) / max_side))
    m = mask[::c, ::c]
    gh, gw = int(m.shape[0]), int(m.shape[1])
    dist = np.zeros((gh, gw), dtype=np.float32)
    cur = m.copy()
    for it in range(4 * max_side):
        if not cur.any():
            break
        dist += cur
        p = np.pad(cur, 1, mode="edge")
        nxt = cur & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        if it % 2:
            nxt &= p[:-2, :-2] & p[:-2, 2:] & p[2:, :-2] & p[2:, 2:]
        cur = nxt
    rows = np.minimum(np.arange(h) // c, gh - 1)
    cols = np.minimum(np.arange(w) // c, gw - 1)
    out: np.ndarray = dist[rows[:, None], cols[None, :]] * np.float32(c * spacing_mm)
    return out


def _robust_std(x: np.ndarray) -> float:
    if x.size < 10:
        return float("nan")
    if x.size > 250_000:
        x = x[:: x.size // 250_000 + 1]
    med = np.median(x)
    return float(1.4826 * np.median(np.abs(x - med)))


# --------------------------------------------------------------------------- masks and orientation
def foreground(v: np.ndarray, field: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
    """Tissue against air inside the exposed field: a 2-class split of the histogram, the threshold a
    quarter of the way from the air class to the tissue class (the thin periphery stays in).
    Returns (mask, air, tissue)."""
    inside = v if field is None or field.all() else v[field]
    q = np.rint(inside).astype(np.int64)
    counts, offset = histogram(q)
    cl = kmeans_hist(counts, 2)
    air, tissue = float(cl.centres[0] + offset), float(cl.centres[-1] + offset)
    # Air is a narrow peak; fat under a steep tone curve can sit close to it (a few percent of the
    # range): the threshold is the lower of a quarter of the way to the tissue class and air plus
    # 8 of air's standard deviations (at least 4 % of the way), so dark fat stays tissue.
    below = inside[inside <= float(cl.thresholds[0] + offset)] if cl.thresholds.size else inside
    sd_air = _robust_std(below.ravel()) if below.size >= 10 else float("nan")
    if below.size >= 100:
        # Under a tone curve that keeps fat dark and muscle bright, the two classes are air with fat
        # against muscle and gland: the dark class's brighter part (fat) is then 15 % of the field or
        # more and near the bright class's share, and air is the darker of its own two, a narrow peak
        # standing clear (ten of its standard deviations).  On the real films that part is 5-7 % of the
        # field, far below the tissue class's 14-30 %: unchanged.
        qb = np.rint(below).astype(np.int64)
        cb, ob = histogram(qb)
        sub = kmeans_hist(cb, 2)
        if sub.thresholds.size:
            dark = below[below <= float(sub.thresholds[0] + ob)]
            sd_dark = _robust_std(dark.ravel()) if dark.size >= 10 else float("nan")
            gap = float(sub.centres[-1] - sub.centres[0])
            upper = (below.size - dark.size) / inside.size        # the dark class's brighter part
            tissue_share = 1.0 - below.size / inside.size
            # A black strip at the border (a collimator blade the modality wrote as 0, no padding value)
            # is a narrow dark peak too, but a small part of the dark class: air is most of it.
            if (upper >= 0.15 and upper > 0.8 * tissue_share and dark.size >= 0.3 * below.size
                    and math.isfinite(sd_dark) and gap > 10.0 * max(sd_dark, 1.0)):
                air, sd_air = float(sub.centres[0] + ob), sd_dark
    thr = air + 0.25 * (tissue - air)
    if math.isfinite(sd_air):
        thr = min(thr, air + max(8.0 * sd_air, 0.04 * (tissue - air)))
    fg = v > thr
    return (fg if field is None else fg & field), air, tissue


def chest_wall_side(fg: np.ndarray) -> str:
    band = max(2, fg.shape[1] // 20)
    return "right" if fg[:, -band:].mean() > fg[:, :band].mean() else "left"


def breast_mask(fg: np.ndarray, spacing_mm: float | None = None) -> np.ndarray:
    """The breast on a chest-wall-left view: the tissue connected to the chest wall (labels, markers,
    and thin lines such as a paddle's edge are not), with holes inside the outline filled (a burned-out
    patch, or fat darkened by a vendor's unsharp masking next to bright gland, is still breast).

    Connected, not per row: a single dark pixel between the wall and the rest of a row (the undershoot
    of unsharp masking, retromammary fat) must not cut the row off (measured on the independent
    phantom family: up to half of a breast lost that way)."""
    from scipy import ndimage

    h, w = fg.shape
    if not fg[:, 0].any():
        return np.zeros_like(fg)
    r = max(1, int(round(1.0 / spacing_mm))) if spacing_mm else max(1, w // 400)
    size = min(2 * r + 1, max(1, min(h, w) // 25))   # never more than a few percent of a small image
    # an opening by a square 2 mm across (separable min and max filters): a thinner line does not connect
    core = ndimage.maximum_filter(ndimage.minimum_filter(fg, size=size), size=size)
    labels, n = ndimage.label(core)
    touching = np.bincount(labels[:, 0], minlength=n + 1)
    touching[0] = 0
    if touching.max() == 0:      # all of the tissue at the wall thinner than the opening: take it as is
        labels, n = ndimage.label(fg)
        touching = np.bincount(labels[:, 0], minlength=n + 1)
        touching[0] = 0
    # components that meet the wall over at least 1 % of its height, or the one that meets it most
    keep = np.flatnonzero((touching >= max(1, h // 100)) | (touching == touching.max()))
    attached = np.isin(labels, keep)
    grown = ndimage.maximum_filter(attached, size=size) & fg   # the opening's loss at the outline
    out: np.ndarray = ndimage.binary_fill_holes(grown | attached)
    return out


def pectoral_mask(small: np.ndarray, body: np.ndarray) -> np.ndarray:
    """The pectoral muscle in the top chest-wall corner (chest wall on the left): the bright region
    bounded by a straight line fitted to its edge.  Empty if nothing plausible is found.

    The muscle's level P is the median of the corner; the fat level F the lower of a 2-class
    split of the body.  Along each row from the chest wall the edge is where the (smoothed)
    intensity first falls under P - (P - F) / 4: dense tissue, darker than muscle, stops it too,
    and the robust line fit through the row edges discards rows where tissue touches the muscle.
    """
    h, w = small.shape
    empty = np.zeros_like(body)
    ch, cw = max(2, h // 20), max(2, w // 20)
    wall = np.flatnonzero(body[:, :cw].mean(axis=1) > 0.9)
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
    smooth = box_filter(small, 5)
    below = (smooth < thr) | ~body
    r1 = int(h * 0.8)
    limit = int(w * 0.7)
    sub = below[r0:r1, :limit]
    hit = sub.any(axis=1)
    first = np.where(hit, np.argmax(sub, axis=1), limit)
    rows: list[int] = []
    edges: list[int] = []
    for i, c in enumerate(first.tolist()):
        if c == 0:
            if len(rows) >= 5:
                break  # below the muscle
            continue
        rows.append(r0 + i)
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
    rr = np.arange(h, dtype=np.float64)[:, None]
    cc = np.arange(w, dtype=np.float64)[None, :]
    pect = (cc < a + b * rr) & body
    frac = pect.sum() / max(1, body.sum())
    if not 0.01 <= frac <= 0.5:
        return empty
    # A muscle is brighter than the tissue beside it: a wedge of fat-level pixels is no muscle.
    beside = body & ~pect & (cc < a + b * rr + w * 0.1)
    if beside.any() and float(np.median(small[pect])) <= float(np.median(small[beside])):
        return empty
    out: np.ndarray = pect
    return out


PECTORAL_FIT_MM = 0.45    # the muscle's edge, followed row by row, lies this close to one smooth curve
PECTORAL_FOLLOWED = 0.75  # over this much of its length


def track_pectoral(small: np.ndarray, body: np.ndarray, spacing_mm: float) -> np.ndarray:
    """The pectoral muscle in the top chest-wall corner (chest wall on the left), followed along the
    edge it makes: from the top of the breast, row by row, the strongest bright-to-dark step within a
    few millimetres of the previous row's, until the edge reaches the chest wall or fades.  The edge
    points are smoothed by a robust quadratic (a muscle's edge is straight, convex or concave), so the
    boundary is a curve from the chest-wall corner; the muscle is what lies between it and the wall.
    Empty when no such edge is found, or when what it bounds is not brighter than the tissue beside."""
    h, w = small.shape
    empty = np.zeros_like(body)
    rows_in = np.flatnonzero(body[:, 0])
    if rows_in.size < 10:
        return empty
    r0 = int(rows_in[0])
    g = max(2, int(round(1.5 / spacing_mm)))             # the step is measured over +-1.5 mm
    s = box_filter(small, max(3, 2 * g + 1))
    step = np.zeros_like(s)
    step[:, g:w - g] = s[:, :w - 2 * g] - s[:, 2 * g:]   # bright on the wall side, dark inwards
    step[~body] = 0
    limit = int(w * 0.7)
    top_rows = range(r0, min(h, r0 + max(3, int(3.0 / spacing_mm))))
    starts = [int(np.argmax(step[r, g:limit])) + g for r in top_rows]
    c = int(np.median(starts))
    strength0 = float(np.median([step[r, c] for r in top_rows]))
    if c <= g or strength0 <= 0:
        return empty
    span = max(1, int(round(2.0 / spacing_mm)))          # the edge moves at most 2 mm a row... per 2 rows
    pts_r, pts_c = [], []
    for r in range(r0, int(h * 0.85)):
        lo, hi = max(1, c - span), min(limit, c + span + 1)
        if hi <= lo:
            break
        seg = step[r, lo:hi]
        k = int(np.argmax(seg))
        if seg[k] < 0.25 * strength0:
            if c <= g + 1:
                break                                     # reached the chest wall
            c = max(0, c - 1)                             # a faint stretch: keep heading for the wall
            continue
        c = lo + k
        pts_r.append(r)
        pts_c.append(c)
        if c <= g:
            break
    if len(pts_r) < max(5, int(5.0 / spacing_mm)):
        return empty
    rr_, cc_ = np.asarray(pts_r, dtype=np.float64), np.asarray(pts_c, dtype=np.float64)
    keep = np.ones(rr_.size, dtype=bool)
    coef = np.zeros(3)
    for _ in range(3):
        if keep.sum() < 5:
            return empty
        coef = np.polyfit(rr_[keep], cc_[keep], 2)
        resid = cc_ - np.polyval(coef, rr_)
        mad = float(np.median(np.abs(resid[keep]))) + 0.5
        keep = np.abs(resid) <= 3.0 * 1.4826 * mad
    fit_mm = float(np.median(np.abs(resid[keep]))) * spacing_mm
    followed = keep.sum() / max(1, int(rr_.max()) - r0 + 1)
    if fit_mm > PECTORAL_FIT_MM or followed < PECTORAL_FOLLOWED:
        return empty   # no one smooth edge: gland boundaries, not a muscle
    rows = np.arange(h, dtype=np.float64)
    edge = np.polyval(coef, rows)
    last = int(rr_[keep].max())
    edge[rows < r0] = 0
    # below the last tracked row the curve goes on to the wall, never back out
    beyond = rows > last
    edge[beyond] = np.minimum(edge[beyond], np.interp(rows[beyond], [last, last + max(1, last - r0) * 0.25],
                                                      [edge[last], 0.0]))
    edge = np.clip(edge, 0, w)
    pect = (np.arange(w)[None, :] < edge[:, None]) & body
    frac = pect.sum() / max(1, body.sum())
    if not 0.01 <= frac <= 0.5:
        return empty
    beside = body & ~pect & (np.arange(w)[None, :] < edge[:, None] + w * 0.1) & (edge[:, None] > 0)
    if beside.any() and float(np.median(small[pect])) <= float(np.median(small[beside])):
        return empty
    out: np.ndarray = pect
    return out


def find_pectoral(small: np.ndarray, body: np.ndarray) -> tuple[np.ndarray, str]:
    """The pectoral muscle in whichever chest-wall corner holds it (a vertically flipped MLO has it
    at the bottom): (mask, "top" | "bottom" | "none")."""
    top = pectoral_mask(small, body)
    bottom = pectoral_mask(small[::-1], body[::-1])[::-1]
    if top.any() and bottom.any():
        return (top, "top") if small[top].mean() >= small[bottom].mean() else (bottom, "bottom")
    if top.any():
        return top, "top"
    if bottom.any():
        return bottom, "bottom"
    return top, "none"


# --------------------------------------------------------------------------- density
SKIN_BAND_MM = 3.0        # skin and subcutaneous fat: breast area, never dense
FAT_PERCENTILE = 0.05     # the fat level at a distance from the skin line: the 5th percentile there
SPIKE_MM = 6.0            # ... its spikes up to this wide removed (a running median) before the monotone fit
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
    (non-decreasing inwards) regression of those levels after a running median over 6 mm, each band
    weighted by its pixels: a band or two of gland that happen to fill their distance bands are a
    spike the median removes (an isotonic fit would carry it inwards for ever), a wider one pulls the
    curve up only as far as the bands around it allow.  Beyond the deepest band with enough pixels the
    level is held."""

    level, n, idx = band_level(v, d_mm, tissue, FAT_PERCENTILE, bin_mm)
    if n.sum() == 0:
        return np.zeros(v.shape, dtype=np.float32)
    ok = n >= 30
    if not ok.any():
        return np.full(v.shape, float(np.percentile(v[tissue], 5)), dtype=np.float32)
    centres = np.arange(level.size, dtype=np.float64)
    # A band or two where gland fills the whole distance band (its 5th percentile is gland) is a spike
    # in the envelope; a plain isotonic fit would carry it inwards for ever: a running median first.
    half = max(1, int(round(SPIKE_MM / 2.0 / bin_mm)))
    padded = np.pad(level[ok], half, mode="edge")
    smooth = np.median(np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1), axis=1)
    fitted = isotonic(smooth, n[ok].astype(np.float64))
    curve = np.interp(centres, centres[ok], fitted)   # held beyond the deepest band with enough pixels
    curve = _hold_after_the_edge(curve, bin_mm, air_level=float(v[tissue].min()) if air is None else air)
    out: np.ndarray = curve[idx].astype(np.float32)
    return out


def band_level(v: np.ndarray, d_mm: np.ndarray, tissue: np.ndarray, q: float,
               bin_mm: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per ``bin_mm`` band of distance from the skin line, the ``q`` quantile of the tissue's values
    there (one 2-D histogram of about 4000 levels, whatever the value range), the pixel count per band,
    and each pixel's band index."""
    depth = float(d_mm[tissue].max()) if tissue.any() else bin_mm
    nb = max(2, int(math.ceil(depth / bin_mm)) + 1)
    idx = np.minimum((d_mm / bin_mm).astype(np.int64), nb - 1)
    vals = v[tissue]
    if vals.size == 0:
        return np.zeros(nb), np.zeros(nb, dtype=np.int64), idx
    b = idx[tissue]
    lo = float(vals.min())
    scale = max(1.0, float(vals.max() - lo) / 4000.0)
    vq = np.rint((vals - lo) / scale).astype(np.int64)
    nv = int(vq.max()) + 1
    hist = np.bincount(b * nv + vq, minlength=nb * nv).reshape(nb, nv)
    cum = hist.cumsum(axis=1)
    n = cum[:, -1]
    level = np.argmax(cum >= np.maximum(1, q * n)[:, None], axis=1)
    return level.astype(np.float64) * scale + lo, n, idx


EDGE_KNEE = 0.15          # the edge has flattened where the fat level rises this slowly (of its steepest)
FLAT_PER_MM = 0.005       # a rise this slow (of the fat signal a millimetre) is flat whatever the edge did
KNEE_RUN_MM = 5.0         # ... and stays that flat over this many millimetres
SECOND_RISE = 0.15        # a rise after it, of this fraction of the fat signal, is gland, not thickness


def _hold_after_the_edge(curve: np.ndarray, bin_mm: float, air_level: float) -> np.ndarray:
    """The fat level rises with the thickness, steeply near the skin and ever more slowly until the
    compressed region, where it stops (whatever the edge's profile, its slope only falls).  Where the
    lower envelope flattens (the knee: a slope under 15 % of its steepest) and later rises again by
    more than 15 % of the fat signal, that second rise is a band of gland filling the distance bands
    (a dense core), not thickness: the level is held at the knee's from there."""
    k = max(1, int(round(5.0 / bin_mm)))
    padded = np.pad(curve, k, mode="edge")
    slope = (padded[2 * k:] - padded[:-2 * k]) / (2 * k * bin_mm)
    start = int(math.ceil(SKIN_BAND_MM / bin_mm))
    if curve.size <= start + 2 * k:
        return curve
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
        return curve
    knee = start + int(hits[0])
    signal = max(1e-6, float(curve[knee]) - air_level)
    if float(curve[-1] - curve[knee]) <= SECOND_RISE * signal:
        return curve
    out = curve.copy()
    out[knee:] = curve[knee]
    return out


BURNOUT_RADIUS_MM = 2.0   # burn-out is a patch at least 4 mm across (unsharp-mask halos are thinner)
IMPLANT_MIN_AREA = 0.04   # of the breast: an implant is large
IMPLANT_LEVEL = 0.80      # its values in the top fifth between the fat level and the breast's maximum
IMPLANT_FLAT = 0.010      # and flat: the spread of its 7-pixel means over 15 pixels, per unit of that range
IMPLANT_SOLID = 0.80      # and a solid shape: this much of its filled outline


def find_implant(v: np.ndarray, tissue: np.ndarray, d_mm: np.ndarray) -> np.ndarray:
    """An implant, or an empty mask: a large (4 % of the breast or more), homogeneous, textureless,
    solid region near the top of the breast's range.  The brightest dense tissue is not one: gland
    and ducts have texture at the scale of millimetres (measured on 8 real films: median spread 0.013
    to 0.19 of the range; a silicone implant 0.007), and a mass is a few percent of the breast at most."""
    from scipy import ndimage

    empty = np.zeros_like(tissue)
    inner = tissue & (d_mm >= SKIN_BAND_MM)
    if inner.sum() < 400:
        return empty
    vals = v[inner]
    fat, top = (float(q) for q in np.percentile(vals[:: max(1, vals.size // 250_000)], [5, 99.9]))
    if top <= fat:
        return empty
    if float((vals >= fat + IMPLANT_LEVEL * (top - fat)).mean()) < 0.5 * IMPLANT_MIN_AREA:
        return empty   # too little of the breast near its maximum to hold one (most images: no filtering)
    mean = box_filter(v, 7).astype(np.float64)
    m2 = box_filter(mean, 15).astype(np.float64)
    spread = np.sqrt(np.maximum(box_filter(mean ** 2, 15) - m2 ** 2, 0.0)) / (top - fat)
    cand = tissue & (mean >= fat + IMPLANT_LEVEL * (top - fat)) & (spread <= IMPLANT_FLAT)
    cand = ndimage.binary_opening(cand, iterations=2)
    labels, n = ndimage.label(cand)
    if n == 0:
        return empty
    sizes = np.bincount(labels.ravel())[1:]
    region = labels == int(np.argmax(sizes)) + 1
    if region.sum() < IMPLANT_MIN_AREA * tissue.sum():
        return empty
    filled = ndimage.binary_fill_holes(ndimage.binary_closing(region, iterations=3))
    if region.sum() < IMPLANT_SOLID * filled.sum():
        return empty
    # The implant's rim (its edge thins to the compressed tissue around it) goes with it: left in, it
    # would be the brightest "dense" class of the clustering.
    rim_level = fat + 0.5 * (top - fat)
    for _ in range(12):
        grown = ndimage.binary_dilation(filled) & tissue & (mean >= rim_level)
        if not (grown & ~filled).any():
            break
        filled = filled | grown
    out: np.ndarray = filled & tissue
    return out


# --------------------------------------------------------------------------- the analysis
@dataclass
class Analysis:
    metrics: dict[str, Any]
    labels_small: np.ndarray        # 0 background, 1 fat, 2 dense, 254 implant, 255 pectoral
    small: np.ndarray               # working-resolution image (as stored: for the picture)
    breast: np.ndarray              # breast outline (pectoral and implant inside it)
    pectoral: np.ndarray
    implant: np.ndarray
    chest_wall: str
    pectoral_corner: str
    spacing_mm: float | None        # of the working image
    findings: list[str] = field(default_factory=list)   # implant, orientation disagreements...
    no_breast: bool = False
    positioning: Positioning = field(default_factory=Positioning)

    @property
    def body(self) -> np.ndarray:
        return self.breast


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
    view, lat = header_view(ds)
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
        "view": view,
        "laterality": lat,
        "implant_displaced": IMPLANT_DISPLACED in view_modifiers(ds),
        "presentation_intent": _text(ds, "PresentationIntentType"),
        "modality": _text(ds, "Modality"),
    }


def _spacing(ds: Any) -> float | None:
    """The pixel spacing at the breast in mm: Pixel Spacing where the modality calibrated it, else
    Imager Pixel Spacing (at the detector) over the estimated magnification factor where given."""
    try:
        calibrated = ds.get("PixelSpacing")
        if calibrated:
            return float(calibrated[0])
        spacing = ds.get("ImagerPixelSpacing")
        if not spacing:
            return None
        magnification = float(ds.get("EstimatedRadiographicMagnificationFactor", 1.0) or 1.0)
        return float(spacing[0]) / (magnification if 1.0 <= magnification < 1.4 else 1.0)
    except (TypeError, ValueError, IndexError):
        return None


def _expected_wall(ds: Any, lat: str | None) -> str | None:
    """Where the header puts the chest wall: PatientOrientation's row direction (A: towards the
    nipple, so the wall is on the left), else the laterality's usual storage (L left, R right)."""
    po = ds.get("PatientOrientation")
    try:
        first = str(po[0]).strip().upper() if po else ""
    except (TypeError, IndexError):
        first = ""
    if first.startswith("A"):
        return "left"
    if first.startswith("P"):
        return "right"
    return {"L": "left", "R": "right"}.get(lat or "")


@dataclass
class _Segmentation:
    """The tissue classes of one breast, in the working image's (chest wall left) orientation."""

    labels: np.ndarray            # 0 outside, 1 fat, 2 dense (254 implant and 255 pectoral added later)
    implant: np.ndarray
    tissue: np.ndarray            # breast tissue at foreground values (burn-out left out)
    pd: float | None = None
    fat_c: float = float("nan")   # mean working value of the clustered fat and of the dense class
    dense_c: float = float("nan")


def _working_image(ds: Any, frame: np.ndarray | None, frame_note: str,
                   domain: str) -> tuple[Any, int, np.ndarray, np.ndarray, np.ndarray | None, float]:
    """The pixels, the block factor, the block-averaged image, the values clustered and the padding
    at the working resolution.  Presentation values go through the display pipeline (Modality LUT,
    VOI LUT or window, MONOCHROME1: :mod:`medsendx_edge.triage.display`), the image the radiologist
    sees; a raw detector signal (linear in photons, air brightest) is read as -log of it, the
    attenuation line integral the presentation image is made from (milli-log units)."""
    from medsendx_edge.triage.display import display_transfer

    px = pixels_from_dataset(ds, frame, frame_note)
    f = max(1, math.ceil(max(px.image.shape) / WORK_MAX))
    small = block_mean(px.image, f)
    pad = None
    if px.padding is not None and px.padding.any():
        pad = block_mean(px.padding.view(np.uint8), f) > 0.25
    if domain == "processing":
        top = float(np.percentile(small, 99.5))
        v = 1000.0 * (np.log(max(top, 1.0)) - np.log(np.maximum(small, 1.0)))
        return px, f, small, v, pad, float(v.max() - v.min())
    transfer = display_transfer(ds)
    if transfer is None:
        return px, f, small, small, pad, float(px.max_value)
    stored = (px.max_value - small) if px.mono1 else small
    px.note = "; ".join(n for n in (px.note, f"display: {transfer.note}") if n)
    return px, f, small, transfer(stored), pad, float(transfer.table.max() - transfer.table.min())


def _pectoral(vw: np.ndarray, breast: np.ndarray, d_mm: np.ndarray,
              air: float, spacing: float) -> tuple[np.ndarray, str]:
    """The pectoral muscle, followed along its edge on the image first (:func:`track_pectoral`, either
    corner), then looked for on the thickness-corrected residual (there a full-thickness muscle stands
    clear of any gland, even in an 80 % dense breast, whatever the periphery does), then on the image."""
    top = track_pectoral(vw, breast, spacing)
    if top.any():
        return top, "top"   # where an MLO has it; a vertically flipped one is looked for below
    bottom = track_pectoral(vw[::-1], breast[::-1], spacing)[::-1]
    if bottom.any():
        return bottom, "bottom"
    trend0 = fat_trend(vw, d_mm, breast, air=air)
    resid0 = (vw - trend0) / np.maximum(trend0 - air, 0.05 * max(1.0, float(trend0.max()) - air))
    pect, corner = find_pectoral(np.clip(resid0, -1.0, 3.0) * 1000.0, breast)
    if corner == "none":
        pect, corner = find_pectoral(vw, breast)
    return pect, corner


#: Blur is measured on tissue at least this deep inside the skin line (the skin edge is a structure of its own).
BLUR_DEPTH_MM = 10.0
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
    out: np.ndarray = np.where(over, GLAND_R + np.log1p(np.where(over, resid - GLAND_R, 0.0)), resid)
    return out


def _segment(vw: np.ndarray, d_mm: np.ndarray, tissue: np.ndarray, air: float, k: int,
             findings: list[str]) -> _Segmentation:
    """Thickness-corrected K-Means: the fat level's trend with the distance to the skin line is taken
    out, implants (far above any gland) set aside, and the residual of the tissue deeper than the skin
    band clustered into k-1 classes; dense is the top one."""
    seg = _Segmentation(np.zeros(tissue.shape, dtype=np.uint8), np.zeros_like(tissue), tissue.copy())
    if tissue.sum() < 100:
        return seg
    trend = fat_trend(vw, d_mm, tissue, air=air)
    resid = (vw - trend) / np.maximum(trend - air, 0.05 * max(1.0, float(trend.max()) - air))
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
    r = _soften(resid[inner])
    lo, hi = (float(x) for x in np.percentile(r[:: max(1, r.size // 250_000)], [0.1, 99.9]))
    scale = max(hi - lo, 1e-6) / 1500.0
    rq = np.clip(np.rint((r - lo) / scale).astype(np.int64), 0, 1500)
    cl = kmeans_hist(np.bincount(rq, minlength=1501), max(2, k - 1))
    centres_r = cl.centres * scale + lo
    if centres_r[-1] - centres_r[0] < MIN_SEPARATION_R:
        thr_r = float("inf") if centres_r.mean() < 0.5 * IMPLANT_R else -float("inf")
    else:
        thr_r = float(cl.thresholds[-1]) * scale + lo
    dense = np.zeros_like(inner)
    dense[inner] = r > thr_r
    seg.pd = float(dense.sum() / max(1, seg.tissue.sum()))
    seg.labels[seg.tissue & ~dense] = 1
    seg.labels[dense] = 2
    fat_in = inner & ~dense  # the clustered fat (the skin band is left out of the centre)
    seg.fat_c = float(vw[fat_in].mean()) if fat_in.any() else float("nan")
    seg.dense_c = float(vw[dense].mean()) if dense.any() else float("nan")
    return seg


def analyse(ds: Any, k: int = 3, station_name: str = "", frame: np.ndarray | None = None,
            frame_note: str = "", domain: str = "presentation") -> Analysis:
    """Masks, orientation, thickness-corrected density, quality metrics for one mammogram."""
    from medsendx_edge.triage.display import exposed_field

    px, f, small, v, pad, span = _working_image(ds, frame, frame_note, domain)
    spacing = _spacing(ds)
    wspacing = spacing * f if spacing else None
    metrics: dict[str, Any] = header_values(ds, station_name)
    fg0, air0, tissue0 = foreground(v, None if pad is None else ~pad)
    field = exposed_field(v, pad, air0 + 0.25 * (tissue0 - air0), chest_wall_side(fg0))
    fg, air, tissue_c = foreground(v, field)
    # Orientation from the pixels; the work is done with the chest wall on the left.
    wall = chest_wall_side(fg)
    findings: list[str] = []
    expected = _expected_wall(ds, metrics["laterality"])
    if expected and expected != wall:
        findings.append(f"orientation: the pixels put the chest wall on the {wall}, the header on the {expected}")
    flip = wall == "right"
    vw = v[:, ::-1] if flip else v
    fgw = fg[:, ::-1] if flip else fg
    breast = breast_mask(fgw, wspacing)
    contrast_rel = (tissue_c - air) / max(1.0, span)
    no_breast = breast.mean() < 0.01 or contrast_rel < 0.03
    wsp = wspacing or 0.1 * f
    d_mm = distance_mm(breast, wsp)
    radius = float(min(50.0, max(10.0, (metrics["thickness_mm"] or 50.0) / 2.0)))
    pect, corner = (np.zeros_like(breast), "none")
    if not no_breast and (metrics["view"] or "").upper() not in ("CC", "XCCL", "FB"):
        pect, corner = _pectoral(vw, breast, d_mm, air, wsp)
    # Tissue at background values inside the outline (a burned-out detector patch) is no fat level:
    # left out of the trend and the clusters, and measured on its own in the quality metrics.
    tissue = breast & ~pect & fgw
    if no_breast:
        seg = _Segmentation(np.zeros(breast.shape, dtype=np.uint8), np.zeros_like(breast), tissue)
    else:
        seg = _segment(vw, d_mm, tissue, air, k, findings)
    # The calibration metrics (fleet QC) stay in the stored values' units, whatever the display does.
    vq = small[:, ::-1] if flip else small
    if v is not small:
        fgq = fg[:, ::-1] if flip else fg
        fieldw = field[:, ::-1] if flip else field
        bgq = fieldw & ~fgq
        air = float(np.median(vq[bgq])) if bgq.any() else float(vq.min())
        fat_in = (seg.labels == 1) & (d_mm >= SKIN_BAND_MM)  # the clustered fat, as _segment takes it
        seg.fat_c = float(vq[fat_in].mean()) if fat_in.any() else float("nan")
        dense_in = seg.labels == 2
        seg.dense_c = float(vq[dense_in].mean()) if dense_in.any() else float("nan")
    labels = seg.labels
    labels[seg.implant] = 254
    labels[pect] = 255
    tissue_mean = float(vq[seg.tissue].mean()) if not no_breast and seg.tissue.any() else None
    implant = seg.implant
    if flip:
        breast, pect, implant, labels, d_mm, fgw = (a[:, ::-1] for a in (breast, pect, implant, labels, d_mm, fgw))
    metrics.update(_quality(px, f, small, domain, fg, fgw, breast, pect, implant, labels, d_mm, radius, air,
                            seg, tissue_mean, wall, wsp if wspacing else None, field, metrics["view"]))
    metrics.update({"chest_wall": wall, "pectoral_corner": corner, "domain": domain, "k": k,
                    "pixels_note": px.note or None})
    pos = Positioning()
    if not no_breast:
        pos = positioning.landmarks(breast, pect, field, metrics["view"], wspacing, wall, corner)
        deep = ((labels == 1) | (labels == 2)) & (d_mm >= BLUR_DEPTH_MM)
        pos.blur_ratio, pos.blur_angle_deg, pos.blur_note = positioning.blur(px.image, f, deep, spacing)
        positioning.assess(pos, metrics["view"])
    metrics.update(pos.metrics())
    for key, val in list(metrics.items()):
        if isinstance(val, float) and not math.isfinite(val):
            metrics[key] = None
    return Analysis(metrics, labels, v, breast, pect, implant, wall, corner, wspacing,
                    findings=findings, no_breast=no_breast, positioning=pos)


def _quality(px: Any, f: int, small: np.ndarray, domain: str, fg: np.ndarray, fgw: np.ndarray,
             breast: np.ndarray, pect: np.ndarray, implant: np.ndarray, labels: np.ndarray, d_mm: np.ndarray,
             radius: float, air: float, seg: _Segmentation, tissue_mean: float | None, wall: str,
             wsp: float | None, field: np.ndarray, view: str | None) -> dict[str, Any]:
    """Quality and calibration metrics, each measured where it means something (in the image's own
    orientation): fat noise at full thickness, background noise away from the skin, burn-out inside
    the skin line, a plateau at the top of the range, a breast cut off by the field."""
    noise_fat = _row_noise(px.image, f, (labels == 1) & (d_mm >= radius), px, domain)
    noise_bg = _row_noise(px.image, f, ~_grow(breast, 3) & ~fg & field, px, domain)
    s, b0 = (px.slope, px.intercept) if domain != "processing" else (1.0, 0.0)

    def to_val(x: float) -> float:
        return float(x * s + b0)

    tissue_px = breast & ~pect & ~implant
    n_tissue = int(tissue_px.sum())
    burnout = breast & ~fgw & (d_mm >= SKIN_BAND_MM) & ~pect
    if burnout.any():
        # Burn-out is a patch, not the thin dark halo unsharp masking leaves around glands: what
        # survives an opening 4 mm across (BURNOUT_RADIUS_MM).
        from scipy import ndimage

        burnout = ndimage.binary_opening(burnout, iterations=max(1, int(round(BURNOUT_RADIUS_MM / (wsp or 0.1 * f)))))
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


def _grow(mask: np.ndarray, n: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(n):
        p = np.pad(out, 1)
        out = out | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return out


def _row_noise(img: np.ndarray, f: int, where_small: np.ndarray, px: Pixels, domain: str) -> float:
    """Pixel noise at full resolution: horizontal neighbour differences / sqrt(2) on sampled rows inside
    ``where_small`` (a working-resolution mask), robust standard deviation."""
    rows_small = np.flatnonzero(where_small.any(axis=1))
    if rows_small.size == 0:
        return float("nan")
    pick = rows_small[:: max(1, rows_small.size // 48)]
    diffs = []
    for rs in pick.tolist():
        r = min(img.shape[0] - 1, rs * f + f // 2)
        line = img[r].astype(np.float64)
        if domain == "processing":
            line = 1000.0 * -np.log(np.maximum(line, 1.0))
        cols = np.flatnonzero(where_small[rs])
        full = (cols[:, None] * f + np.arange(f)[None, :]).ravel()
        full = full[full < img.shape[1] - 1]
        diffs.append(line[full + 1] - line[full])
    d = np.concatenate(diffs) if diffs else np.empty(0)
    return _robust_std(d) / math.sqrt(2.0)


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


#: What a category is, said wherever one is shown (sidecar, console, picture, SR, docs).
CATEGORY_CLAIM = "automated area-based density estimate, not a BI-RADS assessment"
#: Where categories b, c and d begin: the midpoints between the median area densities radiologists'
#: BI-RADS categories had in 200 screening exams (a 6.0 %, b 14.8 %, c 51.2 %, d 78.4 %; Acad Radiol
#: 2006;13(9):1143-9).  The 4th edition's quartiles (25/50/75 %) were dropped by the 5th edition.
CATEGORY_THRESHOLDS = (0.104, 0.330, 0.648)


def birads(pd: float | None, thresholds: tuple[float, ...] = CATEGORY_THRESHOLDS) -> str | None:
    """Density category a-d from the automated area density (boundaries calibrated to readers'
    medians: :data:`CATEGORY_THRESHOLDS`); an estimate, not a BI-RADS assessment."""
    if pd is None:
        return None
    return "abcd"[min(3, sum(pd >= t for t in thresholds))]


# --------------------------------------------------------------------------- priority
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
            if Priority.of(rule.priority) < Priority.of(best):
                best = rule.priority
    return best, reasons
