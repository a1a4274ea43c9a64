"""The radiographer's picture: the image beside its overlay, at most preview_max_px, the dense tissue,
the pectoral muscle and the skin line drawn where the analysis found them, the priority in its colour."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from medsendx_edge.triage.analysis import analyse
from medsendx_edge.triage.phantom import phantom_dataset
from medsendx_edge.triage.picture import COLOURS, OUTLINE, PRIORITY_COLOURS, render_png


def _picture(priority="high", max_px=512, **kw):
    ds, _ = phantom_dataset(1024, 832, spacing_mm=0.28, density=0.45, seed=2, view="MLO", **kw)
    an = analyse(ds, 3, "T", ds.pixel_array)
    png = render_png(an, priority, max_px, reasons=["dense breast (BI-RADS c or d): supplemental screening"])
    return an, np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _rows(an, img):
    """Height of the image part (the legend is below it)."""
    h, w = an.breast.shape
    return round(h * ((img.shape[1] - 6) // 2) / w)


def _near(img, rgb, tol=40):
    return (np.abs(img.astype(int) - np.array(rgb)).sum(axis=-1) < tol)


def test_size_halves_and_overlay_where_the_analysis_found_tissue(tmp_path):
    an, img = _picture()
    half_w = (img.shape[1] - 6) // 2
    rows = _rows(an, img)
    assert max(half_w, rows) == 512 and img.shape[1] == 2 * half_w + 6
    left, right = img[:, :half_w], img[:, half_w + 6:]
    changed = np.abs(left[:rows].astype(int) - right[:rows].astype(int)).sum(axis=-1) > 20
    # the overlay changes the right half inside the breast, not the background
    assert 0.1 < changed.mean() < 0.9
    assert _near(right[:rows], OUTLINE).sum() > 100                  # the skin line is drawn
    dense_tint = right[:rows][changed]
    assert (dense_tint[:, 0] > dense_tint[:, 1]).mean() > 0.3        # red-magenta (dense) and orange (fat)


def test_the_priority_is_written_in_its_colour():
    for priority in ("recheck", "high", "normal"):
        an, img = _picture(priority)
        legend = img[_rows(an, img):]
        assert _near(legend, PRIORITY_COLOURS[priority], tol=30).sum() > 20, priority


def test_legend_lists_what_is_shown():
    an, img = _picture()
    legend = img[_rows(an, img):, :]  # the band under the images (the legend has its own line)
    assert _near(legend, COLOURS["dense"][:3], tol=30).sum() > 20
    assert _near(legend, COLOURS["pectoral"][:3], tol=30).sum() > 20


def test_png_writer_gives_pillow_and_zlib_the_same_pixels():
    """The pictures' PNG writer (unfiltered rows, zlib level 1): Pillow decodes exactly the pixels it was
    given, odd sizes included, and its CRCs hold (Pillow checks them on load)."""
    from medsendx_edge.triage.picture import png_bytes

    import pytest

    rng = np.random.default_rng(7)
    for bad in (np.zeros((0, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint16), np.zeros((4, 4), np.uint8)):
        with pytest.raises(ValueError):
            png_bytes(bad)
    for h, w in ((1, 1), (3, 5), (895, 1186), (17, 2), (2400, 2400)):   # the last one in two IDAT chunks
        rgb = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        im = Image.open(io.BytesIO(png_bytes(rgb)))
        im.load()
        assert im.mode == "RGB" and im.size == (w, h)
        assert np.array_equal(np.asarray(im), rgb)


def test_overlay_colours_are_the_table_s():
    """The class overlay (one 32-bit word a pixel from the colour table): where the analysis says pectoral,
    the right panel is the grey image blended with the pectoral colour at its alpha."""
    an, img = _picture()
    half_w = (img.shape[1] - 6) // 2
    rows = _rows(an, img)
    left, right = img[:rows, :half_w].astype(float), img[:rows, half_w + 6:].astype(float)
    small = np.asarray(Image.fromarray(an.labels_small, mode="L").resize((half_w, rows), Image.Resampling.NEAREST))
    inner = small == 255
    r, g, b, a = COLOURS["pectoral"]
    expect = left[inner] * (1 - a / 255) + np.array([r, g, b]) * (a / 255)
    close = np.abs(right[inner] - expect).max(axis=1) <= 2
    assert inner.sum() > 100 and close.mean() > 0.9


def test_a_long_reason_is_wrapped_inside_the_picture_not_cut_at_its_edge():
    """The dense-breast rule's reason is longer than a CC's picture is wide: it ran off the right edge
    ("... not a BI-RA"); it is now broken between words, each line inside the picture, nothing lost."""
    from medsendx_edge.triage.picture import _font, _wrap

    font = _font(17)
    text = "- dense-breast rule: " + " ".join(f"word{i}" for i in range(60))
    lines = _wrap(text, font, 400)
    assert len(lines) > 2 and all(font.getlength(line) <= 400 for line in lines)
    assert " ".join(line.strip() for line in lines) == text
    ds, _ = phantom_dataset(1024, 832, spacing_mm=0.28, density=0.45, seed=2, view="CC")
    an = analyse(ds, 3, "T", ds.pixel_array)
    short = Image.open(io.BytesIO(render_png(an, "high", 512, reasons=["short"])))
    long_ = Image.open(io.BytesIO(render_png(an, "high", 512, reasons=[text])))
    assert long_.width == short.width and long_.height > short.height   # more lines, the same width
    legend = np.asarray(long_.convert("RGB"))[_rows(an, np.asarray(long_)):]
    ink = _near(legend, PRIORITY_COLOURS["high"], tol=30)
    assert ink.any() and not ink[:, -6:].any()    # the reason's colour nowhere at the right edge


def test_fonts_are_loaded_once_per_thread_and_never_shared_between_threads():
    """The picture's font is loaded once per thread (not on every picture), and the triage's threads
    each have their own (a FreeType face is not to be used by two threads at once)."""
    import threading

    from medsendx_edge.triage.picture import _font

    mine = _font(17)
    assert _font(17) is mine and _font(18) is not mine
    theirs = []
    t = threading.Thread(target=lambda: theirs.append(_font(17)))
    t.start()
    t.join()
    # (Pillow before 10.1 has one bitmap font with no size)
    assert theirs and theirs[0] is not mine and getattr(theirs[0], "size", None) == getattr(mine, "size", None)


def test_the_picture_drawn_on_an_rgb_canvas_is_the_opaque_rgba_canvas_pixel_for_pixel(monkeypatch):
    """The canvas is RGB (no conversion of the whole picture before its PNG, 3 ms): Pillow's text (with its
    stroke), lines, rings, boxes and the RGBA panels pasted on it give, pixel for pixel, what they gave on
    the opaque RGBA canvas the picture used to be drawn on (an MLO: the landmarks and the PNL label too)."""
    import medsendx_edge.triage.picture as picture

    ds, _ = phantom_dataset(1024, 832, spacing_mm=0.28, density=0.45, seed=2, view="MLO")
    an = analyse(ds, 3, "T", ds.pixel_array)
    reasons = ["pectoral muscle does not reach the nipple line on RMLO", "dense breast (BI-RADS c or d): rule"]
    rgb = np.asarray(Image.open(io.BytesIO(render_png(an, "recheck", 512, reasons=reasons))))
    real_new = Image.new
    drawn: list[np.ndarray] = []

    def rgba_canvas(mode, size, color=0):
        return real_new("RGBA", size, (*color, 255)) if mode == "RGB" else real_new(mode, size, color)

    monkeypatch.setattr(picture.Image, "new", rgba_canvas)
    monkeypatch.setattr(picture, "png_bytes", lambda pixels: drawn.append(np.array(pixels)) or b"")
    render_png(an, "recheck", 512, reasons=reasons)
    assert drawn[0].shape[-1] == 4 and (drawn[0][..., 3] == 255).all()   # the old canvas: opaque RGBA
    assert rgb.shape == drawn[0][..., :3].shape and np.array_equal(rgb, drawn[0][..., :3])
