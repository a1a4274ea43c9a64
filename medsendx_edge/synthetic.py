"""Synthetic mammograms (no real one ships anywhere): pydicom, Modality MG, 12 bits in 16.

A breast (half ellipse from the chest wall), fatty tissue with a smooth
texture, dense fibroglandular regions at a chosen fraction, on MLO views a
pectoral muscle triangle, a burned-in laterality marker in the background,
and Gaussian noise; deterministic by seed.  Returns the dataset and the
ground-truth label map (see ``LABELS``).  Patient fields carry obviously fake
but realistic identifiers, so tests can check they never leave.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
LABELS = {"background": 0, "fat": 1, "dense": 2, "pectoral": 3, "marker": 4}


def _smooth_field(rng: np.random.Generator, rows: int, cols: int, cell: int) -> np.ndarray:
    small = rng.standard_normal((max(2, rows // cell), max(2, cols // cell))).astype(np.float32)
    img = Image.fromarray(small, mode="F").resize((cols, rows), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def render(rows: int = 512, cols: int = 416, *, seed: int = 0, density: float = 0.25, view: str = "MLO",
           gain: float = 1.0, offset: float = 0.0, noise_sigma: float = 25.0, marker: bool = True,
           fat_level: float = 1300.0, dense_level: float = 2300.0, pectoral_level: float = 2700.0,
           background_level: float = 120.0) -> tuple[np.ndarray, np.ndarray]:
    """Pixel array (uint16, 12-bit) and label map for one synthetic breast."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, a, b = rows * 0.5, cols * 0.78, rows * 0.44
    breast = ((x / a) ** 2 + ((y - cy) / b) ** 2) <= 1.0
    labels = np.zeros((rows, cols), dtype=np.uint8)
    labels[breast] = LABELS["fat"]
    field = _smooth_field(rng, rows, cols, max(8, rows // 24))
    # Dense tissue sits mostly behind the nipple, away from the skin line.
    depth = 1.0 - np.sqrt((x / a) ** 2 + ((y - cy) / b) ** 2)
    score = field + 2.5 * np.clip(depth, 0, 1)
    if density > 0:
        inside = score[breast]
        thr = np.quantile(inside, 1.0 - density)
        labels[breast & (score >= thr)] = LABELS["dense"]
    if view.upper() == "MLO":
        pect = (x / (cols * 0.30) + y / (rows * 0.42)) < 1.0
        labels[pect & breast] = LABELS["pectoral"]
    img = np.full((rows, cols), background_level, dtype=np.float32)
    texture = 60.0 * _smooth_field(rng, rows, cols, max(4, rows // 96))
    img[labels == LABELS["fat"]] = fat_level
    img[labels == LABELS["dense"]] = dense_level
    img[labels == LABELS["pectoral"]] = pectoral_level
    img[labels != 0] += texture[labels != 0]
    if marker:
        r0, c0 = int(rows * 0.06), int(cols * 0.86)
        h, w = max(4, rows // 24), max(3, cols // 40)
        labels[r0:r0 + h, c0:c0 + w] = LABELS["marker"]
        img[r0:r0 + h, c0:c0 + w] = 4000.0
    img = img * gain + offset + rng.normal(0.0, noise_sigma, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 4095).astype(np.uint16), labels


def synthetic_mammogram(rows: int = 512, cols: int = 416, *, seed: int = 0, density: float = 0.25,
                        view: str = "MLO", laterality: str = "L", gain: float = 1.0, offset: float = 0.0,
                        noise_sigma: float = 25.0, marker: bool = True, patient_name: str = "DOE^JANE",
                        patient_id: str = "PID-0001", study_uid: str | None = None,
                        series_uid: str | None = None, station_name: str = "MAMMO-TRUCK-A",
                        pixel_spacing_mm: float = 0.07) -> tuple[Dataset, np.ndarray]:
    """A complete MG dataset (with file meta) and its ground-truth labels."""
    pixels, labels = render(rows, cols, seed=seed, density=density, view=view, gain=gain, offset=offset,
                            noise_sigma=noise_sigma, marker=marker)
    today = dt.date(2026, 11, 2) + dt.timedelta(days=seed % 28)
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(MG_FOR_PRESENTATION)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MG_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = f"{today:%Y%m%d}"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "101500"
    ds.AccessionNumber = f"ACC{seed:06d}"
    ds.Modality = "MG"
    ds.Manufacturer = "SYNTHETIC MEDICAL"
    ds.ManufacturerModelName = "SYNTH-MAMMO 3000"
    ds.DeviceSerialNumber = f"SN-{station_name}"
    ds.InstitutionName = "Mobile Screening Unit"
    ds.StationName = station_name
    ds.ReferringPhysicianName = "WHO^REFERRED"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19650412"
    ds.PatientSex = "F"
    ds.PatientAge = "061Y"
    ds.StudyID = f"S{seed}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "BREAST"
    ds.ViewPosition = view.upper()
    ds.ImageLaterality = laterality
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.KVP = 29
    ds.Exposure = 120
    ds.ExposureInuAs = 120000
    ds.ExposureTime = 1100
    ds.BodyPartThickness = 52
    ds.CompressionForce = 110
    ds.AnodeTargetMaterial = "TUNGSTEN"
    ds.FilterMaterial = "RHODIUM"
    ds.ImagerPixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
    ds.PixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PixelData = pixels.tobytes()
    return ds, labels
