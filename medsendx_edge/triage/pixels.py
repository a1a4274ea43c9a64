"""Pixels in: decoding, frame choice, MONOCHROME1, the display pipeline, and the working image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from medsendx_edge.triage.arrays import block_mean

#: The working image is at most this many pixels a side (block means of the stored pixels).
WORK_MAX = 1024

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



def working_image(ds: Any, frame: np.ndarray | None, frame_note: str,
                   domain: str) -> tuple[Any, int, np.ndarray, np.ndarray, np.ndarray | None, float]:
    """The pixels, the block factor, the block-averaged image, the values clustered and the padding
    at the working resolution.  Presentation values go through the display pipeline (Modality LUT,
    VOI LUT or window, MONOCHROME1: :mod:`medsendx_edge.triage.display`), the image the radiologist
    sees; a raw detector signal (linear in photons, air brightest) is read as -log of it, the
    attenuation line integral the presentation image is made from (milli-log units)."""
    from medsendx_edge.triage.display import display_transfer

    px = pixels_from_dataset(ds, frame, frame_note)
    f = max(1, math.ceil(max(px.image.shape) / WORK_MAX))
    small = block_mean(px.image, f, px.max_value)
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
