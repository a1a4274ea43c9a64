"""The radiologist's picture: the windowed grey image beside the same image with the classes overlaid,
the breast outline, the pectoral muscle, and a legend with percent dense."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from medsendx_edge.triage.analysis import Analysis

COLOURS = {  # RGBA overlays
    "fat": (255, 196, 0, 70),
    "dense": (235, 40, 90, 140),
    "pectoral": (40, 170, 255, 110),
    "tissue": (255, 196, 0, 70),
}
OUTLINE = (80, 255, 120)


def _grey(an: Analysis) -> np.ndarray:
    small = an.small
    inside = small[an.body] if an.body.any() else small.ravel()
    lo, hi = np.percentile(inside, [0.5, 99.5]) if inside.size else (small.min(), small.max())
    lo = min(lo, float(np.percentile(small, 1)))
    g = np.clip((small - lo) / max(hi - lo, 1e-6), 0, 1)
    return (g * 255).astype(np.uint8)


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def render_png(an: Analysis, priority: str, max_px: int = 768) -> bytes:
    grey = _grey(an)
    h, w = grey.shape
    base = Image.fromarray(grey, mode="L").convert("RGBA")
    overlay = np.zeros((h, w, 4), dtype=np.uint8)
    names = an.label_names
    for idx in range(1, len(names)):
        name = names[idx]
        colour = COLOURS.get(name, (255, 140, 0, 90) if name.startswith("tissue_") else None)
        if colour is not None:
            overlay[an.labels_small == idx] = colour
    overlay[an.labels_small == 255] = COLOURS["pectoral"]
    edge = an.body & ~ndimage.binary_erosion(an.body, iterations=max(1, h // 400))
    overlay[edge] = (*OUTLINE, 255)
    seg = Image.alpha_composite(base, Image.fromarray(overlay, mode="RGBA"))
    scale = min(1.0, max_px / max(h, w))
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    left = base.resize(size, Image.Resampling.LANCZOS)
    right = seg.resize(size, Image.Resampling.LANCZOS)
    legend_h = max(54, size[1] // 9)
    canvas = Image.new("RGBA", (size[0] * 2 + 6, size[1] + legend_h), (16, 16, 16, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (size[0] + 6, 0))
    draw = ImageDraw.Draw(canvas)
    fsize = max(11, legend_h // 4)
    font = _font(fsize)
    m = an.metrics
    pd = m.get("pd")
    area = m.get("breast_area_cm2")
    line1 = (f"percent dense {pd * 100:.1f}%" if pd is not None else "percent dense -") + \
        (f"   breast {area:.0f} cm2" if area else "") + f"   priority {priority.upper()}"
    cnr = m.get("cnr")
    line2 = f"contrast {m.get('contrast') or 0:.0f}   CNR {cnr:.1f}" if cnr is not None else ""
    y0 = size[1] + 6
    draw.text((8, y0), line1, fill=(255, 255, 255, 255), font=font)
    if line2:
        draw.text((8, y0 + fsize + 4), line2, fill=(200, 200, 200, 255), font=font)
    x = size[0] + 14
    swatches = [(n, COLOURS.get(n)) for n in names[1:] if COLOURS.get(n)] + [("pectoral", COLOURS["pectoral"]),
                                                                             ("outline", (*OUTLINE, 255))]
    for name, colour in swatches:
        draw.rectangle([x, y0 + 2, x + fsize, y0 + 2 + fsize], fill=(*colour[:3], 255))
        draw.text((x + fsize + 4, y0), name, fill=(230, 230, 230, 255), font=font)
        x += fsize + 12 + int(draw.textlength(name, font=font))
    out = io.BytesIO()
    canvas.convert("RGB").save(out, format="PNG", compress_level=1)  # fast: zlib level 6 costs 0.3 s a picture
    return out.getvalue()
