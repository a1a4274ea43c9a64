"""A physics-based mammography phantom: X-ray attenuation through a compressed breast, not flat blobs.

No real mammogram ships anywhere, so the triage is validated on these.  Each pixel's line integral
``L = sum(mu_i * t_i)`` (Beer-Lambert) is built from tissue thicknesses:

* **Compressed thickness with a rounded edge**: ``T0`` (BodyPartThickness) in the compressed region,
  falling to zero at the skin line over ``R = T0 / 2`` as a half circle (the uncompressed periphery).
* **Skin**: a 1.5 mm shell (top and bottom layers everywhere, and the tangent rim at the skin line).
* **Fat and fibroglandular tissue**: inside the skin, glandular thickness ``t_g = g * T_inner`` in the
  dense regions (``g`` 0.3-0.7, a smooth field), fat elsewhere, with a subcutaneous fat layer free of
  gland; fat carries a 2 % anatomical texture.  The dense regions are set to cover exactly the requested
  fraction of the breast area: the ground truth percent dense (area based, like LIBRA's).
* **Pectoral muscle** on MLO views (a wedge in the top chest-wall corner), a **nipple** in profile, an
  optional silicone **implant**, a burned-in **label**, the compression **paddle edge**.
* **Exposure**: the heel effect (15 % less fluence towards the nipple side), Poisson photon noise at
  ``photons`` per pixel unattenuated.

Linear attenuation coefficients at ~20 keV (Johns & Yaffe 1987; Hammerstein et al. 1979), in 1/mm:
fat 0.0456, fibroglandular 0.0802, skin 0.0802, muscle 0.0850, silicone 0.16.

Outputs: a FOR PRESENTATION image (log of the flat-field-corrected signal, scaled to 12 bits, with a
configurable amount of **peripheral equalisation** ``edge_eq`` as vendors apply), or a raw FOR PROCESSING
image (the detector signal, linear in photons, 14 bits).  Any orientation: laterality, and a vertical flip.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from dataclasses import dataclass, field

import hashlib

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

MU = {"fat": 0.0456, "gland": 0.0802, "skin": 0.0802, "muscle": 0.0850, "silicone": 0.16}  # 1/mm
SKIN_MM = 1.5
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"


@dataclass
class Truth:
    pd: float                      # dense area / breast area (pectoral and implant left out)
    breast: np.ndarray             # bool, full resolution: breast inside the skin line (with nipple)
    dense: np.ndarray              # bool
    pectoral: np.ndarray           # bool
    implant: np.ndarray            # bool
    chest_wall: str                # "left" or "right" side of the stored image
    pectoral_corner: str           # "top", "bottom" or "none"
    params: dict[str, object] = field(default_factory=dict)


def _smooth(rng: np.random.Generator, rows: int, cols: int, cell: int) -> np.ndarray:
    """A smooth random field (bicubic upsampling of white noise), unit variance roughly."""
    from PIL import Image

    small = rng.standard_normal((max(2, rows // cell), max(2, cols // cell))).astype(np.float32)
    img = Image.fromarray(small, mode="F").resize((cols, rows), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def _semicircle(d: np.ndarray, radius: float) -> np.ndarray:
    """Height of a half-circle edge profile of radius ``radius`` at depth ``d`` from its edge."""
    u = np.clip(d, 0.0, radius)
    out: np.ndarray = 2.0 * np.sqrt(np.maximum(radius ** 2 - (radius - u) ** 2, 0.0))
    return out


def render(rows: int = 1024, cols: int = 832, *, spacing_mm: float = 0.28, density: float = 0.25,
           view: str = "CC", laterality: str = "L", flip_vertical: bool = False, thickness_mm: float = 50.0,
           photons: float = 4000.0, edge_eq: float = 0.0, implant: bool = False, raw: bool = False,
           seed: int = 0, label: bool = True, heel: float = 0.15, size: float | None = None) -> tuple[np.ndarray, Truth]:
    """Pixels (uint16) and the ground truth of one phantom view."""
    from scipy import ndimage  # the generator is not on the daemon's path: scipy's EDT is fine here

    rng = np.random.default_rng(seed)
    view = view.upper()
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    # Breast outline (chest wall at x = 0 while building; flipped at the end): a half ellipse, longer
    # and with the axilla towards the top on MLO views.
    # One breast has one size in both views (``size``: 0.9-1.05, else drawn per view); the CC's depth
    # (its posterior nipple line) a few millimetres short of the MLO's, as on a well-positioned exam.
    u_depth, u_half = rng.uniform(0.9, 1.05), rng.uniform(0.9, 1.05)
    if size is not None:
        u_depth = u_half = size
    depth = cols * 0.78 * u_depth
    half_h = rows * (0.40 if view == "CC" else 0.46) * u_half
    cy = rows * (0.50 if view == "CC" else 0.56)
    outline = ((x / depth) ** 2 + ((y - cy) / half_h) ** 2) <= 1.0
    if view == "MLO":
        outline |= (x < cols * 0.22) & (y < cy) & (y > 0)  # the axillary tail up to the top edge
    # Nipple in profile at the apex: a small half disc beyond the outline.
    nip_r = 5.0 / spacing_mm
    apex_x = depth
    nipple = ((x - apex_x) ** 2 + (y - cy) ** 2 <= nip_r ** 2) & ~outline
    body = outline | nipple
    d_mm = ndimage.distance_transform_edt(body) * spacing_mm  # distance to the skin line
    d_mm = d_mm.astype(np.float32)
    # the chest wall is not a skin line: distance measured as if the breast continued beyond x = 0
    mirror = np.concatenate([body[:, ::-1], body], axis=1)
    d_mm = (ndimage.distance_transform_edt(mirror)[:, cols:] * spacing_mm).astype(np.float32)
    radius = thickness_mm / 2.0
    total = _semicircle(d_mm, radius) * body
    inner = _semicircle(d_mm - SKIN_MM, radius - SKIN_MM) * body
    skin = total - inner
    total[nipple] = np.minimum(total[nipple], 8.0)
    inner[nipple] = 0.0
    skin[nipple] = total[nipple]
    # Pectoral muscle (MLO): a wedge in the top chest-wall corner.
    pect = np.zeros((rows, cols), dtype=bool)
    if view == "MLO":
        pw, ph = cols * rng.uniform(0.22, 0.30), rows * rng.uniform(0.38, 0.50)
        pect = ((x / pw + y / ph) < 1.0) & outline
    # Implant: a silicone ellipse behind the glands.
    impl = np.zeros((rows, cols), dtype=bool)
    if implant:
        impl = ((x - depth * 0.38) / (depth * 0.30)) ** 2 + ((y - cy) / (half_h * 0.55)) ** 2 <= 1.0
        impl &= outline & ~pect
    # Dense regions: a smooth field biased to the centre, away from the skin (subcutaneous fat) and
    # thresholded to cover exactly `density` of the breast area (pectoral and implant left out).
    area = body & ~pect & ~impl
    centre = 1.0 - np.sqrt(((x - depth * 0.35) / depth) ** 2 + ((y - cy) / half_h) ** 2)
    score = _smooth(rng, rows, cols, max(6, int(6.0 / spacing_mm))) + 2.2 * centre
    subcut = 8.0 if density <= 0.5 else 5.0 if density <= 0.7 else 3.0
    allowed = area & (d_mm > subcut) & ~nipple
    dense = np.zeros((rows, cols), dtype=bool)
    n_dense = int(round(density * area.sum()))
    if n_dense > 0:
        vals = np.sort(score[allowed])[::-1]
        n_dense = min(n_dense, vals.size)
        dense = allowed & (score >= vals[n_dense - 1])
    g = np.clip(0.5 + 0.12 * _smooth(rng, rows, cols, max(4, int(4.0 / spacing_mm))), 0.3, 0.7)
    t_gland = np.where(dense, g * inner, 0.0)
    t_fat = inner - t_gland
    fat_texture = 1.0 + 0.02 * _smooth(rng, rows, cols, max(3, int(2.0 / spacing_mm)))
    line = MU["fat"] * t_fat * fat_texture + MU["gland"] * t_gland + MU["skin"] * skin
    line = np.where(pect, MU["muscle"] * total, line)
    if implant:
        t_impl = np.where(impl, 0.6 * inner, 0.0)
        line = line - np.where(impl, MU["fat"] * t_impl, 0.0) + MU["silicone"] * t_impl
    # The compression paddle's edge: a faint line in the air near the far edge.
    paddle = (np.abs(x - cols * 0.97) < max(1.0, 1.0 / spacing_mm)) & ~body
    line = line + np.where(paddle, 0.05, 0.0)
    fluence = photons * (1.0 - heel * x / cols)
    counts = rng.poisson(fluence * np.exp(-line)).astype(np.float32)
    if raw:
        img = np.clip(counts * (12000.0 / photons), 0, 16383)
    else:
        measured = np.log(fluence) - np.log(np.maximum(counts, 1.0))  # flat-field corrected log signal
        flat_fat = MU["fat"] * thickness_mm
        measured = measured + edge_eq * np.where(body & ~pect, flat_fat * (1.0 - total / thickness_mm), 0.0)
        img = np.clip(100.0 + 700.0 * measured, 0, 4095)
    if label:  # burned-in text in the air, far from the breast
        r0, c0 = int(rows * 0.90), int(cols * 0.80)
        box = (slice(r0, r0 + max(6, rows // 40)), slice(c0, c0 + max(20, cols // 8)))
        stripes = (np.arange(box[1].stop - box[1].start) // 3) % 2 == 0
        img[box] = np.where(stripes[None, :], img.max() if not raw else 0, img[box])
    chest_wall = "left"
    out = img.astype(np.uint16)
    masks = [body & ~pect & ~impl, dense, pect, impl]
    if laterality.upper().startswith("R"):
        out = out[:, ::-1]
        masks = [m[:, ::-1] for m in masks]
        chest_wall = "right"
    corner = "top" if view == "MLO" else "none"
    if flip_vertical:
        out = out[::-1, :]
        masks = [m[::-1, :] for m in masks]
        corner = {"top": "bottom", "none": "none"}[corner]
    breast_m, dense_m, pect_m, impl_m = (np.ascontiguousarray(m) for m in masks)
    truth = Truth(pd=float(dense_m.sum() / max(1, breast_m.sum())), breast=breast_m, dense=dense_m,
                  pectoral=pect_m, implant=impl_m, chest_wall=chest_wall, pectoral_corner=corner,
                  params={"density": density, "view": view, "laterality": laterality, "edge_eq": edge_eq,
                          "raw": raw, "implant": implant, "flip_vertical": flip_vertical, "seed": seed,
                          "thickness_mm": thickness_mm, "photons": photons})
    return np.ascontiguousarray(out), truth


_ORIENTATION = {("L", "CC"): ["A", "R"], ("R", "CC"): ["P", "L"], ("L", "MLO"): ["A", "FR"],
                ("R", "MLO"): ["P", "FL"]}


def phantom_dataset(rows: int = 1024, cols: int = 832, *, spacing_mm: float = 0.28, view: str = "CC",
                    laterality: str = "L", raw: bool = False, patient_id: str = "PID-PHANTOM",
                    patient_name: str = "PHANTOM^JANE", study_uid: str | None = None, seed: int = 0,
                    header_view: bool = True, **kw: object) -> tuple[Dataset, Truth]:
    """A complete MG dataset (with file meta) of one phantom view, and its truth.  ``one_breast=True``:
    the views of one study and side show one breast (one size, drawn from the study and the side)."""
    if kw.pop("one_breast", False) and study_uid and "size" not in kw:
        key = hashlib.sha256(f"{study_uid}:{laterality.upper()[:1]}".encode()).digest()
        kw["size"] = 0.9 + 0.15 * int.from_bytes(key[:4], "big") / 2 ** 32
    pixels, truth = render(rows, cols, spacing_mm=spacing_mm, view=view, laterality=laterality, raw=raw,
                           seed=seed, **kw)  # type: ignore[arg-type]
    sop_class = MG_FOR_PROCESSING if raw else MG_FOR_PRESENTATION
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    day = dt.date(2026, 11, 2) + dt.timedelta(days=seed % 20)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = f"{day:%Y%m%d}"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "101500"
    ds.AccessionNumber = f"ACC{seed:06d}"
    ds.Modality = "MG"
    ds.Manufacturer, ds.ManufacturerModelName = "PHANTOM PHYSICS", "BEER-LAMBERT 1"
    ds.DeviceSerialNumber = "SN-PHANTOM"
    ds.StationName = "MAMMO-TRUCK-A"
    ds.PatientName, ds.PatientID = patient_name, patient_id
    ds.PatientBirthDate, ds.PatientSex = "19650412", "F"
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = f"S{seed}", 1, 1
    ds.BodyPartExamined = "BREAST"
    if header_view:
        ds.ViewPosition = view.upper()
        ds.ImageLaterality = laterality.upper()[:1]
        ds.PatientOrientation = _ORIENTATION[(laterality.upper()[:1], view.upper())]
    ds.PresentationIntentType = "FOR PROCESSING" if raw else "FOR PRESENTATION"
    ds.KVP, ds.ExposureInuAs, ds.Exposure = 29, 120000, 120
    ds.BodyPartThickness = float(kw.get("thickness_mm", 50.0))  # type: ignore[arg-type]
    ds.CompressionForce = 110
    ds.AnodeTargetMaterial, ds.FilterMaterial = "TUNGSTEN", "RHODIUM"
    ds.ImagerPixelSpacing = ds.PixelSpacing = [spacing_mm, spacing_mm]
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    bits = 14 if raw else 12
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    if not raw:
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = pixels.tobytes()
    return ds, truth


def validation_cases() -> list[dict[str, Any]]:
    """The validation set of docs/triage.md: 5 to 80 % dense, CC and MLO, left and right, flipped,
    with and without peripheral equalisation, raw FOR PROCESSING, and an implant: 36 phantoms, grouped
    in exams of four views (RCC, LCC, RMLO, LMLO) of one woman (one density, one equalisation)."""
    cases: list[dict[str, object]] = []
    exam = 0
    # No density sits on a category boundary (0.104, 0.330, 0.648): a category there is a coin toss for
    # any reader, human or not.
    for density in (0.05, 0.15, 0.20, 0.40, 0.45, 0.55, 0.72, 0.80):
        for edge_eq in (0.0, 1.0) if density in (0.05, 0.20, 0.55, 0.80) else (0.5,):
            exam += 1
            for view in ("CC", "MLO"):
                for lat in ("R", "L"):
                    cases.append({"exam": exam, "density": density, "edge_eq": edge_eq, "view": view,
                                  "laterality": lat, "flip_vertical": (exam + len(cases)) % 3 == 0,
                                  "seed": 1000 + len(cases)})
    cases.append({"exam": 0, "density": 0.30, "edge_eq": 0.0, "view": "CC", "laterality": "L", "raw": True,
                  "flip_vertical": False, "seed": 2001})
    cases.append({"exam": 0, "density": 0.15, "edge_eq": 0.0, "view": "MLO", "laterality": "R", "raw": True,
                  "flip_vertical": True, "seed": 2002})
    cases.append({"exam": 0, "density": 0.30, "edge_eq": 0.0, "view": "CC", "laterality": "R", "implant": True,
                  "flip_vertical": False, "seed": 2003})
    return cases
