"""Positioning landmarks and checks (issue 24) on geometry with a known answer: masks drawn from the
definitions (ellipse breast, nipple bump, straight pectoral edge), in every storage orientation, with
and without a pixel spacing; the whole-image checks on real films and the positioning phantom are in
test_triage_positioning_validation.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medsendx_edge.triage import positioning as P

SP = 0.25  # mm per working pixel


def _breast(view: str, nipple: bool = True, pect_len_rows: int = 700, rows: int = 800, cols: int = 560):
    """Chest wall left, pectoral top: a half ellipse (depth 110 mm, centre 55 % down), a nipple bump 8 mm
    wide and 4 mm high at the apex, and on an MLO a straight pectoral edge from (0, 200) towards
    (700, 0), the muscle ending at row ``pect_len_rows``."""
    y, x = np.mgrid[0:rows, 0:cols].astype(float)
    depth, half, cy = 110 / SP, 0.42 * rows, 0.55 * rows
    breast = (x / depth) ** 2 + ((y - cy) / half) ** 2 <= 1.0
    if view == "MLO":
        breast |= (x < 0.45 * cols) & (y < cy)                # the axilla up to the top edge
    if nipple:
        breast |= ((x - depth) ** 2 + (y - cy) ** 2 <= (4 / SP) ** 2) & (x >= depth - 1)
    pect = np.zeros_like(breast)
    if view == "MLO":
        pect = (x < 200 - 200 * y / 700) & (y < pect_len_rows) & breast
    return breast, pect, np.ones_like(breast), cy, depth


def _orient(a: np.ndarray, wall: str, corner: str) -> np.ndarray:
    a = a[:, ::-1] if wall == "right" else a
    return a[::-1] if corner == "bottom" else a


@pytest.mark.parametrize("wall", ["left", "right"])
def test_cc_nipple_and_nipple_line_in_mm(wall):
    breast, pect, field, cy, depth = _breast("CC")
    pos = P.landmarks(_orient(breast, wall, "top"), _orient(pect, wall, "top"), field, "CC", SP, wall, "none")
    row, col = pos.nipple
    assert abs(row - cy) <= 3
    assert abs((col if wall == "left" else breast.shape[1] - 1 - col) - (depth + 4 / SP)) <= 2
    assert pos.pnl_mm == pytest.approx(110 + 4, abs=1.0)          # apex of the nipple to the chest wall
    assert pos.nipple_bump_mm == pytest.approx(4, abs=1.0)
    P.assess(pos, "CC")
    results = {c.name: c.result for c in pos.checks}
    assert results["nipple_in_profile"] == "pass" and "pectoral_to_pnl" not in results


def test_no_bump_is_a_nipple_not_in_profile_and_no_spacing_measures_nothing():
    breast, pect, field, _cy, _d = _breast("CC", nipple=False)
    pos = P.landmarks(breast, pect, field, "CC", SP, "left", "none")
    P.assess(pos, "CC")
    assert {c.name: c.result for c in pos.checks}["nipple_in_profile"] == "fail"
    blind = P.landmarks(breast, pect, field, "CC", None, "left", "none")
    P.assess(blind, "CC")
    assert blind.pnl_mm is None and blind.nipple is not None      # drawn, never measured
    assert {c.name: c.result for c in blind.checks}["nipple_in_profile"] == "not measured"
    coarse = P.landmarks(breast, pect, field, "CC", 0.5, "left", "none")   # 0.5 mm working pixels
    P.assess(coarse, "CC")
    check = next(c for c in coarse.checks if c.name == "nipple_in_profile")
    assert check.result == "not measured" and "too coarse" in check.note and coarse.pnl_mm is not None


@pytest.mark.parametrize("wall,corner", [("left", "top"), ("right", "top"), ("left", "bottom"), ("right", "bottom")])
def test_mlo_pectoral_reaching_the_nipple_line_or_not(wall, corner):
    breast, pect_long, field, cy, depth = _breast("MLO", pect_len_rows=700)
    _b, pect_short, _f, _c, _d = _breast("MLO", pect_len_rows=250)
    nip = np.array([cy, depth + 4 / SP])
    for pect, reaches in ((pect_long, True), (pect_short, False)):
        pos = P.landmarks(_orient(breast, wall, corner), _orient(pect, wall, corner), field, "MLO", SP, wall, corner)
        # truth: the edge line through (0, 200) and (L, 0); the PNL is the nipple's distance to it
        a, b = np.array([0.0, 200.0]), np.array([700.0, 0.0])
        u = (b - a) / np.linalg.norm(b - a)
        foot_t = float(np.dot(nip - a, u))
        pnl = float(np.linalg.norm(nip - (a + foot_t * u))) * SP
        assert pos.pnl_mm == pytest.approx(pnl, rel=0.03)
        end = 700 if reaches else 250                          # the muscle's lowest row, on the line
        assert pos.pectoral_shortfall_mm == pytest.approx((foot_t - end / u[0]) * SP, abs=3.0)
        P.assess(pos, "MLO")
        result = {c.name: c.result for c in pos.checks}["pectoral_to_pnl"]
        assert result == ("pass" if reaches else "fail"), (wall, corner, pos.pectoral_shortfall_mm)


def test_blur_measure_sees_motion_not_an_anisotropic_detector():
    """Texture with a breast-like power law (1/f^3) and quantum noise added after the motion: a 0.6 mm
    motion along the rows takes the band's signal in that direction only; a detector that resolves less
    along one axis (its noise filtered with its signal) is not motion."""
    rng = np.random.default_rng(3)
    n, sp = 1024, 0.07
    fy, fx = np.fft.fftfreq(n)[:, None], np.fft.fftfreq(n)[None, :]
    fr = np.hypot(fy, fx)
    amp = 1.0 / np.maximum(fr, 1.0 / n) ** 1.5
    texture = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=(n, n))) * amp))
    texture *= 60.0 / texture.std()
    noise = rng.normal(scale=6.0, size=(n, n))
    tissue = np.ones((n // 4, n // 4), dtype=bool)

    def motion(img: np.ndarray, mm: float) -> np.ndarray:
        k = max(1, int(round(mm / sp)))
        return np.mean([np.roll(img, s, axis=1) for s in range(k)], axis=0)

    def detector(img: np.ndarray) -> np.ndarray:
        # A detector that resolves less along the columns: a Gaussian of 0.4 pixel, its MTF 18 % lower at
        # half Nyquist and 55 % at Nyquist (a CR plate's scan direction, a film digitiser's).
        from scipy import ndimage

        return ndimage.gaussian_filter1d(img, 0.4, axis=0, mode="wrap")

    sharp, _a, _n = P.blur(1000 + texture + noise, 4, tissue, sp)
    moved, angle, _n = P.blur(1000 + motion(texture, 0.6) + noise, 4, tissue, sp)
    soft, _a2, _n2 = P.blur(1000 + detector(texture + noise), 4, tissue, sp)
    assert sharp is not None and moved is not None and soft is not None
    assert sharp >= P.BLUR_RATIO and soft >= P.BLUR_RATIO and moved < P.BLUR_RATIO, (sharp, soft, moved)
    assert math.cos(math.radians(angle)) ** 2 > 0.8          # the weak direction is along the rows
    flat, _a3, note = P.blur(1000 + noise, 4, tissue, sp)
    assert flat is None and "texture" in note                 # noise alone: not measured, never a verdict


def test_the_mlo_nipple_line_stops_at_the_image_edge():
    """Review of issue 24: the PNL runs to the pectoral line or the image's chest-wall edge, whichever
    comes first (a steep muscle's line extended beyond the image gave a line 25 mm outside it)."""
    breast, _pect, field, cy, depth = _breast("MLO")
    y, x = np.mgrid[0:breast.shape[0], 0:breast.shape[1]].astype(float)
    steep = (x < 60 - 60 * y / 250) & breast          # edge from (0, 60) to (250, 0): foot beyond column 0
    pos = P.landmarks(breast, steep, field, "MLO", SP, "left", "top")
    (nr, nc), (fr, fc) = pos.pnl
    assert fc == pytest.approx(0.0, abs=0.5) and 0 <= fr < breast.shape[0]
    assert pos.pnl_mm == pytest.approx(math.hypot(nr - fr, nc - fc) * SP, rel=1e-6)
    assert pos.pnl_mm <= (depth + 4 / SP) * SP * 1.2   # about the nipple's depth, not the line's distance


def test_the_blur_spectrum_from_the_real_fft_is_the_complex_ffts():
    from medsendx_edge.triage.positioning import _power

    rng = np.random.default_rng(0)
    for p in (8, 9, 128):   # even and odd sides
        stack = rng.normal(size=(5, p, p))
        want = (np.abs(np.fft.fft2(stack)) ** 2).mean(axis=0)
        assert np.allclose(_power(stack), want, rtol=1e-12, atol=1e-12)
