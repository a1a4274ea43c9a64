"""Array helpers (triage/arrays.py) against scipy: isotonic regression, the distance to the skin line,
block means."""

from __future__ import annotations

import numpy as np
import pytest

from medsendx_edge.triage.arrays import block_mean, box_filter, distance_mm


def test_isotonic_fit_matches_scipy():
    from scipy.optimize import isotonic_regression

    from medsendx_edge.triage.arrays import isotonic

    rng = np.random.default_rng(4)
    y = np.cumsum(rng.normal(0.2, 1.0, 120))
    w = rng.integers(1, 500, 120).astype(float)
    assert np.allclose(isotonic(y, w), isotonic_regression(y, weights=w, increasing=True).x)


def test_distance_to_the_skin_line_matches_scipys_exact_transform():
    from scipy.ndimage import distance_transform_edt

    yy, xx = np.mgrid[:300, :240]
    breast = (xx < 40) | ((xx ** 2 + (yy - 150) ** 2) < 170 ** 2)  # a half-disc on the chest wall (left)
    got = distance_mm(breast, 0.2)
    # image borders are no skin line (the chest wall, an axilla off the image): scipy's exact transform of
    # the breast continued beyond them
    padded = np.pad(breast, 300, mode="edge")
    want = distance_transform_edt(padded)[300:-300, 300:-300] * 0.2
    inside = breast & (want > 2)
    # an octagonal metric on a coarse grid: short of the Euclidean distance by 6-7 % (median) and 10 %
    # (95th percentile) on this disc; the fat level is binned in the same metric, so only its consistency
    # matters, not its scale
    rel = np.abs(got[inside] - want[inside]) / want[inside]
    assert np.median(rel) < 0.075 and np.percentile(rel, 95) < 0.11
    far_outside = distance_transform_edt(~breast) > 3  # the coarse grid blurs the outline by a cell
    assert (got[far_outside] == 0).all()


@pytest.mark.parametrize("f", [1, 2, 3])
def test_block_mean_and_box_filter_are_plain_means(f):
    rng = np.random.default_rng(f)
    img = rng.integers(0, 4096, (61, 47)).astype(np.uint16)
    h, w = (61 // f) * f, (47 // f) * f
    want = img[:h, :w].reshape(h // f, f, w // f, f).astype(np.float64).mean(axis=(1, 3))
    assert np.allclose(block_mean(img, f), want, rtol=1e-5)
    a = rng.normal(size=(40, 40))
    got = box_filter(a, 5)
    assert got[20, 20] == pytest.approx(a[18:23, 18:23].mean(), rel=1e-6)
