"""The display pipeline of a mammogram, as a viewer applies it, and the exposed field.

A FOR PRESENTATION image is made to be looked at through its Modality LUT (Rescale Slope / Intercept
or a Modality LUT Sequence), its VOI LUT (a VOI LUT Sequence, else Window Center / Width) and its
Photometric Interpretation (MONOCHROME1: low values bright); Pixel Padding Value / Range marks pixels
that are no image at all.  The density analysis reads what the radiologist sees, brighter = denser:

* :func:`display_transfer` builds the whole chain as one lookup over the stored values (pydicom's own
  ``apply_modality_lut`` and ``apply_voi_lut`` applied to every possible stored value, once), so
  applying it costs an interpolation at the working resolution, not a float pass over 13 M pixels;
* :func:`padding_mask` marks the padding (PS3.3 C.7.5.1.1.2);
* :func:`exposed_field` leaves out what is not the exposed field: the padding, and flat strips along
  the image borders at the top of the range (an unexposed collimator border, the clear edge of a
  digitised film, a paddle lip printed white).  Tissue touching the field's edge is then "cut off";
  tissue touching a border strip is not tissue touching the image edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from medsendx_edge.triage.arrays import percentile, quantile


@dataclass(frozen=True)
class Transfer:
    """Stored value -> display value (brighter = denser) as a table over ``[lo, lo + len(table))``."""

    lo: int
    table: np.ndarray      # float32 display values
    note: str              # what was applied ("VOI LUT Sequence", "window 2048/4096", ...)

    @property
    def top(self) -> float:
        return float(self.table.max())

    def __call__(self, values: np.ndarray) -> np.ndarray:
        """Display values of (block-averaged, so fractional) stored values."""
        idx = np.rint(values).astype(np.int64)
        idx -= self.lo
        np.clip(idx, 0, self.table.size - 1, out=idx)
        out: np.ndarray = self.table.take(idx)   # the nearest stored value's display value
        return out


def _stored_range(ds: Any) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", 16) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def display_transfer(ds: Any, lo: int | None = None, hi: int | None = None) -> Transfer | None:
    """The Modality LUT, VOI LUT and MONOCHROME1 inversion of ``ds`` as one table, or None when the
    header asks for nothing but the identity (no VOI, no modality LUT sequence, MONOCHROME2): the
    stored values are then the display values up to a linear rescale, which changes no cluster."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut  # type: ignore[attr-defined]

    has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
    mono1 = str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
    if not has_voi and "ModalityLUTSequence" not in ds and not mono1:
        return None
    s_lo, s_hi = _stored_range(ds)
    lo = s_lo if lo is None else max(s_lo, lo)
    hi = s_hi if hi is None else min(s_hi, hi)
    dtype = np.int32 if s_lo < 0 else np.uint32
    stored = np.arange(lo, hi + 1, dtype=np.int64).astype(dtype)
    notes = []
    try:
        values = apply_modality_lut(stored, ds).astype(np.float64)
        if "ModalityLUTSequence" in ds:
            notes.append("Modality LUT Sequence")
        if has_voi:
            values = apply_voi_lut(values, ds).astype(np.float64)
            notes.append("VOI LUT Sequence" if "VOILUTSequence" in ds else "window")
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        values = stored.astype(np.float64)
        notes = ["VOI not usable: stored values read as they are"]
    if mono1:
        values = float(values.max()) + float(values.min()) - values
        notes.append("MONOCHROME1 inverted")
    return Transfer(int(lo), values.astype(np.float32), ", ".join(notes))


def padding_mask(img: np.ndarray, ds: Any) -> np.ndarray | None:
    """Pixels at Pixel Padding Value (or within the range it opens with Pixel Padding Range Limit),
    or None when the header declares no padding."""
    pad = ds.get("PixelPaddingValue")
    if pad is None or isinstance(pad, (bytes, bytearray)):
        return None
    try:
        a = int(pad)
        b = int(ds.get("PixelPaddingRangeLimit", a))
    except (TypeError, ValueError):
        return None
    lo, hi = min(a, b), max(a, b)
    if lo == hi:
        out: np.ndarray = img == lo
        return out
    return (img >= lo) & (img <= hi)


#: A border strip is flat (its inner 80 % of values within this fraction of the image's range) ...
FLAT_SPREAD = 0.04
#: ... and at the top of the range (its median above this quantile of the image).
TOP_QUANTILE = 0.985
#: Strips are looked for in the outer part of each border only.
MAX_STRIP = 0.15


#: A border line (a row at the top or bottom, a column on the side away from the chest wall) that is
#: this bright over this much of its length is no breast: a breast line always meets air somewhere.
FULL_LINE = 0.9


def exposed_field(v: np.ndarray, padding: np.ndarray | None = None, tissue_threshold: float | None = None,
                  wall: str | None = None) -> np.ndarray:
    """The exposed field at the working resolution: True but for padding, flat bright strips along the
    four borders (unexposed collimation), and border lines brighter than ``tissue_threshold`` over
    90 % of their length (the clear edge of a digitised film, a bright ramp along a border): at the
    top, the bottom and the side away from the chest wall (``wall``: "left" | "right"), each with a
    margin of 1 % of the image after it."""
    h, w = v.shape
    field = np.ones((h, w), dtype=bool) if padding is None else ~padding
    if not field.any():
        return field
    inside = v[field]
    inside = inside[:: max(1, inside.size // 250_000)]   # quantiles of a quarter-million sample
    lo, hi, top = (float(q) for q in quantile(inside, [0.005, 0.995, TOP_QUANTILE]))
    span = max(hi - lo, 1e-6)

    def flat_bright(line: np.ndarray, ok: np.ndarray) -> bool:
        vals = line[ok]
        if vals.size < 0.5 * line.size:
            return False
        p10, p50, p90 = percentile(vals, [10, 50, 90])
        return bool(p50 >= top and (p90 - p10) <= FLAT_SPREAD * span)

    for axis in (0, 1):
        n = h if axis == 0 else w
        for end in (0, 1):
            for k in range(int(n * MAX_STRIP)):
                i = k if end == 0 else n - 1 - k
                line = v[i] if axis == 0 else v[:, i]
                ok = field[i] if axis == 0 else field[:, i]
                if not flat_bright(line, ok):
                    break
                if axis == 0:
                    field[i] = False
                else:
                    field[:, i] = False
    if tissue_threshold is None:
        return field
    sides = [(0, 0), (0, 1)] + ([(1, 1)] if wall == "left" else [(1, 0)] if wall == "right" else [])
    for axis, end in sides:
        n = h if axis == 0 else w
        found = 0
        for k in range(int(n * MAX_STRIP)):
            i = k if end == 0 else n - 1 - k
            line = v[i] if axis == 0 else v[:, i]
            if float((line > tissue_threshold).mean()) < FULL_LINE:
                break
            found = k + 1
        if found:
            found = min(n, found + max(1, n // 100))
            if axis == 0:
                field[:found] = False if end == 0 else field[:found]
                if end == 1:
                    field[n - found:] = False
            else:
                if end == 0:
                    field[:, :found] = False
                else:
                    field[:, w - found:] = False
    return field

