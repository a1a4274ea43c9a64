"""The analysis of one mammogram (:func:`analyse`, docs/triage.md): the steps, in order, over the modules
named for their jobs.  Pure functions over numpy arrays and a pydicom header; no file system here.

At a working resolution of at most ``pixels.WORK_MAX`` pixels a side, numpy only: tissue against air
(:mod:`.masks`), the chest-wall side from the pixels, the breast as the tissue connected to the chest wall
row by row (labels and markers are not), the pectoral muscle in whichever chest-wall corner holds it, the
distance from the skin line (:mod:`.arrays`), then density as the K-Means (:mod:`.kmeans`) of the
thickness-corrected residual ((v - F(d)) / (F(d) - air), F the fat level at distance d from the skin
line: :mod:`.density`), implants left out, quality metrics that mean what they say (:mod:`.quality`), and
the positioning landmarks (:mod:`.positioning`).  What applies is decided before, by :mod:`.gate`; the
category and the priority after, by :mod:`.categories`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medsendx_edge.triage import positioning
from medsendx_edge.triage.positioning import Positioning
from medsendx_edge.triage.arrays import coarse_interior, distance_mm, median
from medsendx_edge.triage.density import SKIN_BAND_MM, Segmentation, segment_tissue
from medsendx_edge.triage.gate import IMPLANT_DISPLACED, header_view, view_modifiers
from medsendx_edge.triage.masks import breast_mask, chest_wall_side, foreground, pectoral
from medsendx_edge.triage.pixels import working_image
from medsendx_edge.triage.quality import quality_metrics

#: Blur is measured on tissue at least this deep inside the skin line (the skin edge is a structure of its own),
#: by the coarse measure it was validated with (:func:`arrays.coarse_interior`).
BLUR_DEPTH_MM = 10.0



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
    organ_dgy = _num(ds, "OrganDose")
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
        # Organ Dose (0040,0316) is in dGy: the average glandular dose of a mammogram, here in mGy
        "organ_dose_mgy": None if organ_dgy is None else 100.0 * organ_dgy,
        "entrance_dose_mgy": _num(ds, "EntranceDoseInmGy"),
        "exposure_control_mode": _text(ds, "ExposureControlMode"),
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


def analyse(ds: Any, k: int = 3, station_name: str = "", frame: np.ndarray | None = None,
            frame_note: str = "", domain: str = "presentation") -> Analysis:
    """Masks, orientation, thickness-corrected density, quality metrics for one mammogram."""
    from medsendx_edge.triage.display import exposed_field

    px, f, small, v, pad, span = working_image(ds, frame, frame_note, domain)
    spacing = _spacing(ds)
    wspacing = spacing * f if spacing else None
    metrics: dict[str, Any] = header_values(ds, station_name)
    first_field = None if pad is None else ~pad
    fg0, air0, tissue0 = foreground(v, first_field)
    field = exposed_field(v, pad, air0 + 0.25 * (tissue0 - air0), chest_wall_side(fg0))
    if field.all() if first_field is None else np.array_equal(field, first_field):
        fg, air, tissue_c = fg0, air0, tissue0   # the same pixels in: the same split (no strip left out)
    else:
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
    blur_region = coarse_interior(breast, wsp, BLUR_DEPTH_MM)
    radius = float(min(50.0, max(10.0, (metrics["thickness_mm"] or 50.0) / 2.0)))
    pect, corner = (np.zeros_like(breast), "none")
    if not no_breast and (metrics["view"] or "").upper() not in ("CC", "XCCL", "FB"):
        pect, corner = pectoral(vw, breast, d_mm, air, wsp)
    # Tissue at background values inside the outline (a burned-out detector patch) is no fat level:
    # left out of the trend and the clusters, and measured on its own in the quality metrics.
    tissue = breast & ~pect & fgw
    if no_breast:
        seg = Segmentation(np.zeros(breast.shape, dtype=np.uint8), np.zeros_like(breast), tissue)
    else:
        seg = segment_tissue(vw, d_mm, tissue, air, k, findings)
    # The calibration metrics (fleet QC) stay in the stored values' units, whatever the display does.
    vq = small[:, ::-1] if flip else small
    if v is not small:
        fgq = fg[:, ::-1] if flip else fg
        fieldw = field[:, ::-1] if flip else field
        bgq = fieldw & ~fgq
        air = float(median(vq[bgq])) if bgq.any() else float(vq.min())
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
        breast, pect, implant, labels, d_mm, fgw, blur_region = (
            a[:, ::-1] for a in (breast, pect, implant, labels, d_mm, fgw, blur_region))
    metrics.update(quality_metrics(px, f, small, domain, fg, fgw, breast, pect, implant, labels, d_mm, radius, air,
                            seg, tissue_mean, wall, wsp if wspacing else None, field, metrics["view"]))
    metrics.update({"chest_wall": wall, "pectoral_corner": corner, "domain": domain, "k": k,
                    "pixels_note": px.note or None})
    pos = Positioning()
    if not no_breast:
        pos = positioning.landmarks(breast, pect, field, metrics["view"], wspacing, wall, corner)
        deep = ((labels == 1) | (labels == 2)) & blur_region
        pos.blur_ratio, pos.blur_angle_deg, pos.blur_note = positioning.blur(px.image, f, deep, spacing)
        positioning.assess(pos, metrics["view"])
    metrics.update(pos.metrics())
    for key, val in list(metrics.items()):
        if isinstance(val, float) and not math.isfinite(val):
            metrics[key] = None
    return Analysis(metrics, labels, v, breast, pect, implant, wall, corner, wspacing,
                    findings=findings, no_breast=no_breast, positioning=pos)
