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
