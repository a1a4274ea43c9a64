"""The tissue map for images that are not mammograms (issue 30): the product's original "segmented
visualization, air against soft tissue against bone, to aid rapid review" of the radiographs and CT a
mobile unit also takes.

A three-class K-Means (:mod:`.kmeans`, exact on the histogram) on the modality's own values: Hounsfield
units for CT (after the rescale, outside the field of view left out), the display pipeline for radiographs
(CR, DX: Modality LUT, VOI LUT or window, MONOCHROME1 turned over so that brighter is denser, padding left
out).  Classes ordered by centre: air, soft tissue, bone.

It is a visual aid, not a measurement: it never sets a priority, never raises a recheck, never enters the
density features, and it says "not applicable" for what it cannot map (no pixels, colour, MR, ultrasound,
a stack that is not a CT slice, an unknown photometric interpretation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medsendx_edge.triage.arrays import block_mean
from medsendx_edge.triage.kmeans import histogram, kmeans_hist, label_lut

CLAIM = "visual aid, not a measurement"
CLASSES = ("air", "soft tissue", "bone")
#: A projection radiograph sums the attenuation along each ray: a thick body region (a mediastinum, an
#: abdomen) is as bright as a thin bone, and the lungs read as air.  Its top class says so.
RADIOGRAPH_CLASSES = ("air (lungs included)", "soft tissue", "dense: bone or thick soft tissue")
MODALITIES = {"CR": "radiograph", "DX": "radiograph", "CT": "CT"}
WORK_MAX = 768          # the map is made at most this many pixels a side (block means)
CT_MIN_HU, CT_MAX_HU = -1024, 3071   # outside: padding or the region outside the reconstruction circle
#: CT: a voxel is bone above this (cortical bone 500-1900 HU, cancellous 200-500 HU; contrast-filled
#: vessels and calcifications also reach it): the check the tests make of the bone class.
BONE_HU = 150.0


@dataclass
class TissueMap:
    labels: np.ndarray            # uint8 at working resolution: 0 outside, 1 air, 2 soft tissue, 3 bone
    display: np.ndarray           # the grey image shown beside it (uint8)
    centres: list[float]          # class centres in the values clustered (HU for CT)
    units: str                    # "HU" or "stored values"
    fractions: dict[str, float]   # class -> share of the mapped area
    areas_cm2: dict[str, float] | None
    classes: tuple[str, ...] = CLASSES
    note: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """For the sidecar: the classes, their share and area, their centres; and what this is."""
        return {"claim": CLAIM, "classes": list(self.classes), "units": self.units,
                "centres": [round(c, 1) for c in self.centres],
                "fractions": {k: round(v, 4) for k, v in self.fractions.items()},
                "areas_cm2": None if self.areas_cm2 is None else {k: round(v, 1) for k, v in self.areas_cm2.items()},
                "note": self.note or None}


def _int(ds: Any, kw: str, default: int) -> int | None:
    try:
        value = ds.get(kw, default)
        return default if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _breast(ds: Any) -> bool:
    """A breast image (whatever its modality): density applies to it, or nothing does, never a bone map."""
    if str(ds.get("BodyPartExamined", "") or "").strip().upper() == "BREAST":
        return True
    for item in ds.get("AnatomicRegionSequence") or []:
        if "breast" in str(getattr(item, "CodeMeaning", "") or "").lower():
            return True
    return str(ds.get("ViewPosition", "") or "").strip().upper() in ("CC", "MLO", "XCCL", "XCCM", "FB", "SIO")


def applies(ds: Any) -> str | None:
    """None when a tissue map can be made of ``ds``, else why not (plain words).  Never raises."""
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality not in MODALITIES:
        return f"no tissue map for modality {modality or 'missing'} (radiographs and CT only)"
    if _breast(ds):
        return "no tissue map for a breast image (density is measured on the standard mammographic views)"
    if str(ds.get("PhotometricInterpretation", "")).strip() not in ("MONOCHROME1", "MONOCHROME2"):
        return "no tissue map for a colour or unknown photometric interpretation"
    if _int(ds, "SamplesPerPixel", 1) != 1:
        return "no tissue map for a colour image"
    frames = _int(ds, "NumberOfFrames", 1)
    if frames is None or frames > 1:
        return "no tissue map for a multi-frame object (one CT slice or one radiograph per file)"
    if not (_int(ds, "Rows", 0) and _int(ds, "Columns", 0)):
        return "no pixel data"
    return None


def _spacing(ds: Any) -> float | None:
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        v = ds.get(kw)
        try:
            if v is not None and float(v[0]) > 0:
                return float(v[0])
        except (TypeError, ValueError, IndexError):
            continue
    return None


#: Collimation: the unexposed border of a radiograph is a flat plateau at the top of the range (no
#: photons: the densest value the detector gives), connected to an edge of the image.
COLLIMATION_TOP = 0.05      # within this fraction of the range of the maximum
COLLIMATION_FLAT = 0.01     # local spread (5x5 standard deviation) within this fraction of the range
COLLIMATION_MIN = 0.01      # a region this small (of the image) is no collimation
PENUMBRA = 0.05             # and its edge, this fraction of the image's side wide, is left out with it


def collimation(values: np.ndarray) -> np.ndarray:
    """The unexposed (collimated) area of a radiograph, brighter-is-denser values: True there.  Left
    in, it is the brightest, largest "class" and pushes bone into soft tissue (a CR of a leg: the
    collimated quarter of each side read as "dense", the tibia as soft tissue)."""
    from medsendx_edge.triage.arrays import box_filter, cross_dilate, label

    lo, hi = (float(q) for q in np.percentile(values, (0.5, 100.0)))
    span = max(hi - lo, 1e-6)
    v = values.astype(np.float64)
    mean = box_filter(v, 5)
    sd = np.sqrt(np.maximum(box_filter(v * v, 5) - mean * mean, 0.0))
    plateau = (v >= hi - COLLIMATION_TOP * span) & (sd <= COLLIMATION_FLAT * span)
    labels, n = label(plateau)
    if n == 0:
        return np.zeros(values.shape, dtype=bool)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = [k for k in border if k and sizes[k] >= COLLIMATION_MIN * values.size]
    found = np.isin(labels, keep)
    if found.any():
        # the blade's penumbra: a ramp from the plateau down to the exposed field, a few millimetres wide
        found = cross_dilate(found, max(1, int(PENUMBRA * min(values.shape))))
    return found


def tissue_map(ds: Any, frame: np.ndarray | None = None) -> TissueMap:
    """The three-class map of one radiograph or CT slice (``frame``: its pixels, already decoded)."""
    from medsendx_edge.triage.display import display_transfer, padding_mask

    arr = ds.pixel_array if frame is None else frame
    arr = np.asarray(arr)
    modality = str(ds.get("Modality", "")).strip().upper()
    pad = padding_mask(arr, ds)
    f = max(1, -(-max(arr.shape) // WORK_MAX))
    note = ""
    if modality == "CT":
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        values = block_mean(arr, f) * slope + intercept
        inside = (values >= CT_MIN_HU) & (values <= CT_MAX_HU)
        units = "HU"
        shown = np.clip((values + 160.0) / 400.0, 0.0, 1.0)   # a soft-tissue window (40/400) to look at
    else:
        # The stored values through the Modality LUT only, MONOCHROME1 turned over (brighter is denser).
        # Not the VOI window: it is for the eye, and it clips (a chest's mediastinum and abdomen saturate
        # to the top of the window and would all read "bone").
        small = block_mean(arr, f).astype(np.float64)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        values = small * slope + intercept
        if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
            values = float(values.max()) + float(values.min()) - values
            note = "MONOCHROME1 turned over"
        inside = ~collimation(values)
        if not inside.all():
            note = "; ".join(n for n in (note, f"unexposed (collimated) border left out: "
                                                 f"{(~inside).mean() * 100:.0f}% of the image") if n)
        units = "stored values"
        transfer = display_transfer(ds)   # the picture on the left as the modality means it to be seen
        eye = transfer(small) if transfer is not None else values
        lo, hi = np.percentile(eye, (0.5, 99.5))
        shown = np.clip((eye - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    if pad is not None and pad.any():
        inside &= ~(block_mean(pad.view(np.uint8), f) > 0.25)
    # K-Means on integers: HU as they are; display values on a 12-bit scale of their own range
    vals = values[inside]
    if vals.size < 100:
        raise ValueError("too few pixels inside the field of view to map")
    if units == "HU":
        q = np.rint(values).astype(np.int64)
        scale, base = 1.0, 0.0
    else:
        base = float(vals.min())
        scale = max(float(vals.max()) - base, 1e-6) / 4095.0
        q = np.rint((values - base) / scale).astype(np.int64)
    # Bisecting K-Means: air against the body first, then soft tissue against bone within the body.  One
    # three-way K-Means spends a class on the fat and partial-volume values between air and soft tissue
    # (a head CT: air -947, "soft" -309, "bone" +193 HU, three quarters of that "bone" soft tissue),
    # because bone is few pixels; two splits follow the physics (air | body, then soft tissue | bone).
    counts, offset = histogram(q[inside])
    if np.count_nonzero(counts) < 3:
        raise ValueError("fewer than three distinct values: nothing to map")
    body_from = int(kmeans_hist(counts, 2).thresholds[0]) + 1          # bins from here on are body
    body = counts.copy()
    body[:body_from] = 0
    bone_from = int(kmeans_hist(body, 2).thresholds[0]) + 1 if np.count_nonzero(body) >= 2 else counts.size
    edges = np.array([body_from - 0.5, bone_from - 0.5])
    lut = label_lut(counts.size, edges)
    idx = np.clip(q - offset, 0, counts.size - 1)
    labels = (lut.take(idx) + 1).astype(np.uint8)
    labels[~inside] = 0
    x = np.arange(counts.size, dtype=np.float64)
    centres = []
    for lo_bin, hi_bin in ((0, body_from), (body_from, bone_from), (bone_from, counts.size)):
        c = counts[lo_bin:hi_bin]
        centre = float((c * x[lo_bin:hi_bin]).sum() / c.sum()) if c.sum() else float("nan")
        centres.append((centre + offset) * scale + base)
    n_inside = int(inside.sum())
    names = CLASSES if modality == "CT" else RADIOGRAPH_CLASSES
    fractions = {name: float((labels == k + 1).sum()) / n_inside for k, name in enumerate(names)}
    sp = _spacing(ds)
    areas = None if sp is None else {name: fr * n_inside * (sp * f) ** 2 / 100.0 for name, fr in fractions.items()}
    return TissueMap(labels, (shown * 255).astype(np.uint8), centres, units, fractions, areas, names, note,
                     {"modality": modality, "block": f})


#: Colours of the classes in the picture (RGBA): air left clear, soft tissue rose, bone pale blue.
COLOURS = {1: (0, 0, 0, 0), 2: (230, 120, 150, 110), 3: (150, 210, 255, 170)}


def render_png(tm: TissueMap, max_px: int = 768) -> bytes:
    """The image and its tissue map side by side, with the legend, the class areas and the claim."""
    from PIL import Image, ImageDraw

    from medsendx_edge.triage.picture import _font

    h, w = tm.display.shape
    scale = min(1.0, max_px / max(h, w))
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    left = Image.fromarray(tm.display, mode="L").resize(size, Image.Resampling.BILINEAR).convert("RGBA")
    labels = np.asarray(Image.fromarray(tm.labels, mode="L").resize(size, Image.Resampling.NEAREST))
    lut = np.zeros((256, 4), dtype=np.uint8)
    for code, rgba in COLOURS.items():
        lut[code] = rgba
    right = Image.alpha_composite(left, Image.fromarray(lut[labels], mode="RGBA"))
    fsize = max(12, size[1] // 40)
    font = _font(fsize)
    lines = [f"tissue map ({tm.meta.get('modality', '')}): {CLAIM}"]
    for k, name in enumerate(tm.classes):
        area = f", {tm.areas_cm2[name]:.0f} cm2" if tm.areas_cm2 else ""
        lines.append(f"{name}: {tm.fractions[name] * 100:.0f}% of the field{area} "
                     f"(centre {tm.centres[k]:.0f} {tm.units})")
    legend_h = (fsize + 6) * len(lines) + 12
    canvas = Image.new("RGBA", (size[0] * 2 + 6, size[1] + legend_h), (16, 16, 16, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (size[0] + 6, 0))
    draw = ImageDraw.Draw(canvas)
    y = size[1] + 6
    text_colours = [(255, 220, 120, 255), (200, 200, 200, 255), (*COLOURS[2][:3], 255), (*COLOURS[3][:3], 255)]
    for i, line in enumerate(lines):
        draw.text((6, y), line, fill=text_colours[min(i, 3)], font=font)
        y += fsize + 6
    from medsendx_edge.triage.picture import png_bytes

    return png_bytes(np.asarray(canvas.convert("RGB")))   # as the mammogram picture
