"""The phantom generator is physical, not a flat blob: its truth matches its pixels, the signal falls
with the thickness towards the skin line, gland attenuates more than fat, the pectoral muscle and the
nipple are where the view puts them, laterality and flips move the truth with the pixels, and the
photon noise follows Poisson statistics."""

from __future__ import annotations

import numpy as np
import pytest

from medsendx_edge.triage.phantom import render


def test_truth_matches_the_pixels_and_the_requested_density():
    for density in (0.1, 0.4, 0.7):
        img, truth = render(512, 416, spacing_mm=0.5, density=density, seed=1)
        assert abs(truth.pd - density) < 0.02
        assert truth.dense.sum() <= truth.breast.sum() and not (truth.dense & ~truth.breast).any()
        # gland attenuates more than fat: dense pixels read brighter (a FOR PRESENTATION log signal)
        inner = truth.breast
        assert img[truth.dense & inner].mean() > img[~truth.dense & inner].mean() + 20
        assert img[truth.breast].mean() > img[~truth.breast & ~truth.pectoral].mean() + 100  # air is dark


def test_the_signal_falls_with_thickness_towards_the_skin_line():
    img, truth = render(512, 416, spacing_mm=0.5, density=0.0, seed=2, heel=0.0, label=False)
    row = img[256].astype(float)
    inside = np.flatnonzero(truth.breast[256])
    edge = inside.max()
    centre = row[inside.min() + 20:inside.min() + 60].mean()
    near_edge = row[edge - 6:edge - 2].mean()
    assert centre > near_edge + 30  # 50 mm of fat in the middle, a few mm at the skin line


def test_mlo_has_a_pectoral_muscle_in_the_top_chest_wall_corner_and_flips_move_it():
    _, truth = render(512, 416, spacing_mm=0.5, view="MLO", seed=3)
    assert truth.pectoral.any() and truth.pectoral_corner == "top" and truth.chest_wall == "left"
    rows, cols = np.nonzero(truth.pectoral)
    assert rows.mean() < 512 / 3 and cols.mean() < 416 / 3
    _, flipped = render(512, 416, spacing_mm=0.5, view="MLO", seed=3, laterality="R", flip_vertical=True)
    assert flipped.chest_wall == "right" and flipped.pectoral_corner == "bottom"
    assert np.array_equal(flipped.pectoral, truth.pectoral[::-1, ::-1])
    _, cc = render(512, 416, spacing_mm=0.5, view="CC", seed=3)
    assert not cc.pectoral.any() and cc.pectoral_corner == "none"


def test_photon_noise_is_poisson():
    """Raw counts (FOR PROCESSING) in the open field: variance equal to the mean."""
    img, truth = render(512, 416, spacing_mm=0.5, raw=True, seed=4, heel=0.0, photons=4000.0, label=False)
    air = img[20:120, 330:400].astype(float) / (12000.0 / 4000.0)
    assert air.mean() == pytest.approx(4000.0, rel=0.02)
    assert air.var() == pytest.approx(air.mean(), rel=0.1)


def test_same_seed_same_phantom():
    a, ta = render(256, 208, spacing_mm=1.0, seed=7)
    b, tb = render(256, 208, spacing_mm=1.0, seed=7)
    c, _ = render(256, 208, spacing_mm=1.0, seed=8)
    assert np.array_equal(a, b) and ta.pd == tb.pd and not np.array_equal(a, c)
