"""Density (triage/density.py): the fat level against the distance from the skin line, measured from the
image whatever the edge's profile, and an implant told from the brightest gland."""

from __future__ import annotations

import numpy as np
import pytest

from medsendx_edge.triage.density import fat_trend, find_implant


@pytest.mark.parametrize("edge_mm,power", [(14.0, 0.5), (32.0, 0.3)])
def test_the_fat_level_follows_the_edge_whatever_its_width_and_profile(edge_mm, power):
    """A fatty breast whose thickness rises as a power law over 14 to 32 mm (not the phantom's half
    circle), with gland patches that must not lift the fat level."""
    rng = np.random.default_rng(int(edge_mm))
    d = np.tile(np.linspace(0, 60, 600, dtype=np.float32), (400, 1))
    thick = np.minimum(1.0, d / edge_mm) ** power
    fat = 200.0 + 1800.0 * thick
    v = fat + rng.normal(0, 15, d.shape)
    gland = (rng.random(d.shape) < 0.2) & (d > 20)
    v[gland] += 600.0 * thick[gland]
    tissue = d > 0
    got = fat_trend(v.astype(np.float32), d, tissue, air=200.0)
    inside = tissue & (d > 2)
    assert np.median(np.abs(got[inside] - fat[inside]) / (fat[inside] - 200.0)) < 0.05


@pytest.mark.parametrize("scatter", [0.0, 0.25])
def test_a_dense_core_filling_its_distance_bands_does_not_lift_the_fat_level(scatter):
    """Gland fills every distance band from 18 to 30 mm (a dense core; its 5th percentile is gland), with
    fat again deeper in (lobules, 8 % of the bands beyond), as in the independent family's case 5 and the
    second woman's right CC.  The fat level under the core stays the fat's: before this change the
    isotonic fit pooled the core with the fat beyond it and carried the core's level inwards for good
    (the core's own gland then read as fat).  With ``scatter``, the fat level falls by a quarter of its
    signal from 30 mm inwards (scatter under a large breast): the curve still follows it within 10 %."""
    rng = np.random.default_rng(7)
    d = np.tile(np.linspace(0, 70, 700, dtype=np.float32), (400, 1))
    thick = np.minimum(1.0, d / 28.0) ** 0.6
    fat = 200.0 + 1800.0 * thick * (1.0 - scatter * np.clip((d - 30.0) / 40.0, 0.0, 1.0))
    v = fat + rng.normal(0, 15, d.shape)
    core = (d >= 18) & (d < 30)
    lobules = (d >= 30) & (rng.random(d.shape) < 0.08)
    gland = core | ((d >= 30) & ~lobules) | ((d >= 4) & (d < 18) & (rng.random(d.shape) < 0.5))
    v[gland] += 900.0 * thick[gland]
    tissue = d > 0
    got = fat_trend(v.astype(np.float32), d, tissue, air=200.0)
    for lo, hi in ((19, 29), (31, 69)):
        band = tissue & (d >= lo) & (d < hi)
        err = np.median(np.abs(got[band] - fat[band]) / (fat[band] - 200.0))
        assert err < 0.10, (lo, hi, err)


def test_an_implant_is_found_and_bright_gland_with_texture_is_not():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:300, :300]
    tissue = (xx ** 2 + (yy - 150) ** 2) < 290 ** 2
    d = np.where(tissue, 30.0, 0.0).astype(np.float32)
    v = (1000 + rng.normal(0, 20, tissue.shape)).astype(np.float32)
    implant = ((xx - 110) ** 2 + (yy - 150) ** 2) < 60 ** 2
    v[implant] = 3000 + rng.normal(0, 3, implant.sum())
    found = find_implant(v, tissue, d)
    assert (found & implant).sum() / (found | implant).sum() > 0.8
    # the same place, as gland: bright but textured at the scale of millimetres
    v2 = v.copy()
    v2[implant] = 2300 + 700 * rng.random(implant.sum())
    assert not find_implant(v2, tissue, d).any()
