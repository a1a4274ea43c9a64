"""What triage applies to: the gate (mammograms only, the screening views, the frame to read, the
domain), from the header alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any



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
    """Density is measured on mammograms only: MG (or DX or CR of the breast), grey-scale, one frame (or the
    middle frame of a tomosynthesis stack, said so), presentation or raw (log-transformed)."""
    modality = str(ds.get("Modality", "") or "").strip().upper()
    part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    sop = str(ds.get("SOPClassUID", "") or "")
    if modality != "MG" and not (modality in ("DX", "CR") and part == "BREAST"):
        return Gate(False, f"modality {modality or 'missing'}: density is measured on mammograms only "
                           "(MG, or DX or CR of the breast)")
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
