"""The radiologist's picture: the windowed grey image beside the same image with the classes overlaid
(fat, dense, pectoral muscle, implant), the breast outline, a scale bar, and a legend that says what
the image is (laterality, view, chest-wall side, the tomosynthesis frame), the view's percent dense in
whole percent (an estimate, not a BI-RADS assessment; no category: a category is the breast's, from all
its views, in the exam summary and the SR), the priority and its reasons.  Legends list only the classes present.
numpy and Pillow only (no scipy on the daemon's hot path)."""

from __future__ import annotations

import functools
import struct
import threading
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from medsendx_edge.triage.analysis import Analysis
from medsendx_edge.triage.positioning import Positioning
from medsendx_edge.triage.arrays import percentile

COLOURS = {  # RGBA overlays
    "fat": (255, 196, 0, 60),
    "dense": (235, 40, 90, 140),
    "pectoral": (40, 170, 255, 110),
    "implant": (170, 90, 255, 140),
}
CODES = {"fat": 1, "dense": 2, "implant": 254, "pectoral": 255}
OUTLINE = (80, 255, 120)
PRIORITY_COLOURS = {"recheck": (255, 80, 80), "high": (255, 190, 60), "normal": (200, 200, 200),
                    "low": (160, 160, 160)}


def _grey(an: Analysis) -> np.ndarray:
    small = an.small
    step = max(1, int((small.size / 100_000) ** 0.5))  # the window from ~100k pixels, not all of them
    sub, sub_mask = small[::step, ::step], an.breast[::step, ::step]
    sample = sub[sub_mask] if sub_mask.any() else sub.ravel()
    lo, hi = percentile(sample, [0.5, 99.5]) if sample.size else (float(small.min()), float(small.max()))
    lo = min(float(lo), float(percentile(sub, 1)))
    g = np.clip((small - lo) * (255.0 / max(float(hi) - lo, 1e-6)), 0, 255).astype(np.uint8)
    if an.metrics.get("domain") == "processing":
        g = 255 - g  # raw signal: air bright; shown as a radiologist expects, tissue bright
    return g


@dataclass
class PictureSource:
    """What the picture is drawn from, and no more: the windowed grey image (8 bits), the class map, the
    breast outline, the legend's values and the landmarks (about 1.6 MB for a 832x640 working image,
    against 20 MB for the whole analysis).  A picture drawn later (triage/pictures.py) keeps this."""

    grey: np.ndarray
    labels_small: np.ndarray
    breast: np.ndarray
    metrics: dict[str, Any]
    positioning: Positioning
    chest_wall: str
    pectoral_corner: str
    spacing_mm: float | None

    @property
    def shape(self) -> tuple[int, int]:
        h, w = self.grey.shape
        return int(h), int(w)


def picture_source(an: Analysis) -> PictureSource:
    """The analysis's picture inputs, copied where a later step could change them (the metrics)."""
    return PictureSource(_grey(an), an.labels_small, an.breast, dict(an.metrics), an.positioning, an.chest_wall,
                         an.pectoral_corner, an.spacing_mm)


_FONTS = threading.local()


def _font(size: int) -> Any:
    """Pillow's default font at ``size``, loaded once per thread (a FreeType face is not to be shared
    between threads; loading it for every picture held the interpreter lock for a millisecond)."""
    fonts = _FONTS.__dict__.setdefault("by_size", {})
    if size not in fonts:
        try:
            fonts[size] = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1
            fonts[size] = ImageFont.load_default()
    return fonts[size]


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    edge = np.zeros_like(mask)
    for _ in range(width):
        p = np.pad(mask & ~edge, 1)
        inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        edge |= mask & ~inner & ~edge
        mask = mask & inner
    return edge


def _scale_bar(draw: ImageDraw.ImageDraw, spacing_px_mm: float | None, x0: int, y0: int, font: Any) -> None:
    """A 5 cm (or 1 cm on small fields) bar, in the picture's own pixels."""
    if not spacing_px_mm:
        return
    for mm in (50, 20, 10):
        length = int(round(mm / spacing_px_mm))
        if length <= 160:
            break
    draw.rectangle([x0, y0, x0 + length, y0 + 4], fill=(255, 255, 255, 255))
    draw.text((x0, y0 - 22), f"{mm // 10} cm", fill=(255, 255, 255, 255), font=font)


LANDMARK = (0, 230, 255)
FAILED = (255, 80, 80)


def _landmarks(draw: ImageDraw.ImageDraw, an: PictureSource, scale: float, x0: int, font: Any) -> None:
    """The positioning landmarks on the analysis panel: the pectoral line, the posterior nipple line
    with its length, and the nipple (a ring; red when that check failed)."""
    pos = an.positioning
    failed = {c.name for c in pos.checks if c.result == "fail"}

    def xy(p: tuple[float, float]) -> tuple[float, float]:
        return (x0 + (p[1] + 0.5) * scale, (p[0] + 0.5) * scale)

    width = max(2, int(round(3 * scale * max(an.shape) / 1024)))
    if pos.pectoral_line is not None:
        colour = FAILED if "pectoral_to_pnl" in failed else LANDMARK
        draw.line([xy(pos.pectoral_line[0]), xy(pos.pectoral_line[1])], fill=(*colour, 255), width=width)
    if pos.pnl is not None:
        a, b = xy(pos.pnl[0]), xy(pos.pnl[1])
        draw.line([a, b], fill=(*LANDMARK, 255), width=width)
        label = f"PNL {pos.pnl_mm:.0f} mm" if pos.pnl_mm is not None else "PNL (no spacing)"
        if pos.pectoral_shortfall_mm is not None and pos.pectoral_shortfall_mm > 0:
            label += f", pectoral {pos.pectoral_shortfall_mm:.0f} mm short"
        mx, my = (a[0] + b[0]) / 2, (a[1] + b[1]) / 2
        tw = draw.textlength(label, font=font)
        right = x0 + an.shape[1] * scale       # the label stays on the analysis panel
        draw.text((max(x0 + 4, min(mx - tw / 2, right - tw - 4)), my + 4), label, fill=(*LANDMARK, 255),
                  font=font, stroke_width=2, stroke_fill=(0, 0, 0, 255))
    if pos.nipple is not None:
        x, y = xy(pos.nipple)
        r = 4 * width
        colour = FAILED if "nipple_in_profile" in failed else LANDMARK
        draw.ellipse([x - r, y - r, x + r, y + r], outline=(*colour, 255), width=width)


def _wrap(text: str, font: Any, width: float) -> list[str]:
    """:func:`_wrap_words` of ``text`` in the default font at ``font``'s size, remembered: the claim and
    the rules' reasons come back on every picture (measured word by word, they held the interpreter lock
    for 2 ms a picture)."""
    size = getattr(font, "size", None)   # the bitmap font of a Pillow before 10.1 has none: not remembered
    return list(_wrapped(text, int(size), float(width))) if size else _wrap_words(text, font, width)


@functools.lru_cache(maxsize=512)
def _wrapped(text: str, size: int, width: float) -> tuple[str, ...]:
    return tuple(_wrap_words(text, _font(size), width))


def _wrap_words(text: str, font: Any, width: float) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels, broken between words (continuations indented; a
    word wider than the line stands alone): a reason cut off at the picture's edge is half a reason."""
    lines: list[str] = []
    cur = ""
    for word in text.split(" "):
        trial = f"{cur} {word}" if cur.strip() else cur + word
        if cur.strip() and font.getlength(trial) > width:
            lines.append(cur)
            cur = "   " + word
        else:
            cur = trial
    lines.append(cur)
    return lines


def render_png(an: Analysis, priority: str, max_px: int = 768, *, reasons: list[str] | None = None,
               frame_note: str = "") -> bytes:
    return draw_png(picture_source(an), priority, max_px, reasons=reasons, frame_note=frame_note)


def draw_png(an: PictureSource, priority: str, max_px: int = 768, *, reasons: list[str] | None = None,
             frame_note: str = "") -> bytes:
    """The picture (:func:`render_png`) from its :class:`PictureSource`."""
    grey = an.grey
    h, w = grey.shape
    scale = min(1.0, max_px / max(h, w))
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    base = Image.fromarray(grey, mode="L").resize(size, Image.Resampling.BILINEAR)
    # The overlay is built at the picture's size, not the working image's (half the pixels).
    labels = np.asarray(Image.fromarray(an.labels_small, mode="L").resize(size, Image.Resampling.NEAREST))
    breast = np.asarray(Image.fromarray(an.breast.astype(np.uint8), mode="L").resize(size, Image.Resampling.NEAREST)) > 0
    lut = np.zeros((256, 4), dtype=np.uint8)
    present = []
    counts = np.bincount(labels.ravel(), minlength=256)
    for name, code in CODES.items():
        if counts[code]:
            lut[code] = COLOURS[name]
            present.append(name)
    overlay = lut.view(np.uint32).ravel()[labels].view(np.uint8).reshape(*labels.shape, 4)  # one word a pixel
    overlay[_outline(breast, max(1, size[1] // 300))] = (*OUTLINE, 255)
    over = Image.fromarray(overlay, mode="RGBA")
    left = base.convert("RGBA")
    right = Image.alpha_composite(left, over)
    m = an.metrics
    reasons = reasons or []
    fsize = max(12, size[1] // 44)
    font = _font(fsize)
    text_w = size[0] * 2 + 6 - 16
    claim = (_wrap("(an automated area-based estimate of this view, not a BI-RADS assessment; a category is a "
                   "breast's)", font, text_w)
             if m.get("pd") is not None else [])
    reason_lines = [line for reason in reasons for line in _wrap("- " + reason, font, text_w)]
    lines = 3 + len(reason_lines) + len(claim)
    legend_h = (fsize + 6) * lines + 12
    canvas = Image.new("RGB", (size[0] * 2 + 6, size[1] + legend_h), (16, 16, 16))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (size[0] + 6, 0))
    draw = ImageDraw.Draw(canvas)
    # What the image is, on the image: laterality, view, chest wall, frame.
    ident = " ".join(x for x in (m.get("laterality"), m.get("view")) if x) or "view unknown"
    wall = f"chest wall {an.chest_wall}"
    corner = f", pectoral {an.pectoral_corner}" if an.pectoral_corner != "none" else ""
    draw.text((8, 6), f"{ident}   {wall}{corner}", fill=(255, 255, 120, 255), font=font)
    if frame_note:
        draw.text((8, 6 + fsize + 4), frame_note, fill=(255, 255, 120, 255), font=font)
    spacing = an.spacing_mm / scale if an.spacing_mm else None
    _scale_bar(draw, spacing, 12, size[1] - 14, font)
    _landmarks(draw, an, scale, size[0] + 6, font)
    y = size[1] + 6
    pd = m.get("pd")
    head = ("percent dense " + (f"{pd * 100:.0f}% (this view)" if pd is not None else "-")
            + (f"   breast {m['breast_area_cm2']:.0f} cm2" if m.get("breast_area_cm2") else ""))
    draw.text((8, y), head, fill=(255, 255, 255, 255), font=font)
    draw.text((8 + int(draw.textlength(head, font=font)) + 24, y), f"priority {priority.upper()}",
              fill=(*PRIORITY_COLOURS.get(priority, (255, 255, 255)), 255), font=font)
    y += fsize + 6
    for line in claim:
        draw.text((8, y), line, fill=(200, 200, 200, 255), font=font)
        y += fsize + 6
    snr = m.get("snr_fat")
    draw.text((8, y), (f"fat SNR {snr:.0f}" if snr is not None else "fat SNR -")
              + (f"   burn-out {m['burnout_frac'] * 100:.1f}%" if m.get("burnout_frac") else "")
              + (f"   clipped {m['clipped_frac'] * 100:.1f}%" if m.get("clipped_frac") else ""),
              fill=(200, 200, 200, 255), font=font)
    y += fsize + 6
    for line in reason_lines:
        draw.text((8, y), line, fill=(*PRIORITY_COLOURS.get(priority, (230, 230, 230)), 255), font=font)
        y += fsize + 6
    x = 8
    ly = y   # the legend on its own line, under the reasons
    for name in present + ["outline"]:
        colour = COLOURS.get(name, (*OUTLINE, 255))
        draw.rectangle([x, ly + 2, x + fsize, ly + 2 + fsize], fill=(*colour[:3], 255))
        draw.text((x + fsize + 4, ly), name, fill=(230, 230, 230, 255), font=font)
        x += fsize + 14 + int(draw.textlength(name, font=font))
    return png_bytes(np.asarray(canvas))


def _deflate(data: bytes | memoryview) -> bytes:
    try:
        from isal import isal_zlib
    except ImportError:   # a platform without its wheel: the same stream format, 4x the CPU
        return zlib.compress(data, 1)
    out: bytes = isal_zlib.compress(data, 1)
    return out


def png_bytes(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of ``rgb`` (h, w, 3), rows unfiltered and deflated at level 1 by ISA-L (python-isal).

    Pillow's encoder tries the five PNG row filters on every row before deflating: 46 ms for a
    1186x895 picture, of which deflate is 21; on these pictures (flat legend, smooth grey, a few
    overlay colours) the filters win 1 % in size.  The triage's CPU is what bounds a truck's day
    (benchmarks/bench_e2e.py), so the rows go to deflate as they are: the same pixels, half the time
    (decoded by Pillow and checked pixel for pixel in tests/test_triage_picture.py).  The deflate itself is
    ISA-L's: 4.8 ms against zlib's 20.4 ms at level 1 for a 3.3 MB picture, 0.63 MB against 0.61
    (benchmarks/bench_triage.py, picture); any zlib inflater reads its stream.  zlib where isal is missing."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or 0 in rgb.shape[:2]:
        raise ValueError(f"png_bytes takes a non-empty (h, w, 3) uint8 array, not {rgb.dtype} {rgb.shape}")
    h, w, _ = rgb.shape
    raw = np.zeros((h, 1 + 3 * w), dtype=np.uint8)   # each row: filter byte 0 (none), then RGB
    raw[:, 1:] = rgb.reshape(h, 3 * w)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)   # 8 bits, truecolour, deflate, filters, no interlace
    data = _deflate(raw.data.cast("B"))
    step = 1 << 24   # IDAT chunks of 16 MB at most (a chunk's length field is 31 bits)
    idat = b"".join(chunk(b"IDAT", data[i:i + step]) for i in range(0, len(data), step))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")
