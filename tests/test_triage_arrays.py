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
    # exact (OpenCV's transform): an octagonal one on a coarse grid, repeated in 1.25-1.7 mm blocks, put
    # the steep edge's pixels a millimetre off and painted a speckled dense rim inside every film's skin line
    assert np.abs(got - want).max() < 1e-3
    assert (got[~breast] == 0).all()


@pytest.mark.parametrize("f", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.uint8, np.int64, np.float32])
def test_block_mean_and_box_filter_are_plain_means(f, dtype):
    rng = np.random.default_rng(f)
    lo = -2048 if np.dtype(dtype).kind in "if" else 0
    img = rng.integers(lo, 65536 if dtype == np.uint16 else 256 if dtype == np.uint8 else 2048, (61, 47)).astype(dtype)
    h, w = (61 // f) * f, (47 // f) * f
    want = img[:h, :w].reshape(h // f, f, w // f, f).astype(np.float64).mean(axis=(1, 3))
    got = block_mean(img, f)
    assert got.dtype == np.float32 and np.allclose(got, want, rtol=1e-6, atol=1e-3)
    a = rng.normal(size=(40, 40))
    got = box_filter(a, 5)
    assert got[20, 20] == pytest.approx(a[18:23, 18:23].mean(), rel=1e-6)


@pytest.mark.parametrize("f", [2, 4, 5, 16])
@pytest.mark.parametrize("top", [4095, 16383, None])
def test_block_mean_of_12_to_16_bit_pixels_added_narrow_is_exact(f, top):
    """Rows of uint16 pixels are added as uint16 when f of them stay under 2**16 (12-14 bits stored), else as
    uint32: both exact, at the edge too (the largest value just fitting, and one more)."""
    rng = np.random.default_rng(f)
    edge = (65535 // f) if top is None else top
    for hi in (edge, edge + 1):
        img = rng.integers(0, hi + 1, (8 * f + 3, 6 * f + 1)).astype(np.uint16)
        img[0:f, 0] = hi                    # a whole block column at the maximum: the largest row sum
        h, w = (img.shape[0] // f) * f, (img.shape[1] // f) * f
        sums = img[:h, :w].reshape(h // f, f, w // f, f).astype(np.uint64).sum(axis=(1, 3))
        want = sums.astype(np.float32) * np.float32(1.0 / (f * f))    # the exact sums, scaled once
        got = block_mean(img, f)
        assert got.dtype == np.float32 and np.array_equal(got, want), (f, hi)
        # the stored bits' top only ever skips the max pass: a top that lies (pixels above it) changes nothing
        for top in (65535, hi, 1):
            assert np.array_equal(block_mean(img, f, top), want), (f, hi, top)


def _random_masks(seed: int, n: int):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    for t in range(n):
        h, w = (int(x) for x in rng.integers(5, 120, 2))
        noise = rng.random((h, w))
        # speckle and blobs, both touching the borders (where the libraries' border rules differ)
        yield (ndimage.uniform_filter(noise, 5) > 0.5) if t % 2 else (noise > 0.3), rng


def test_binary_morphology_and_labels_are_scipys():
    """OpenCV's kernels give scipy.ndimage's results exactly: the same structuring elements, the same
    treatment of what lies outside the image (an erosion there erodes, an opening's min filter does not)."""
    from scipy import ndimage

    from medsendx_edge.triage.arrays import (cross_close, cross_dilate, cross_erode, cross_open, fill_holes, label,
                                             square_dilate, square_open)

    for m, rng in _random_masks(7, 40):
        size, it = int(rng.integers(1, 6)) * 2 + 1, int(rng.integers(1, 4))
        assert np.array_equal(square_open(m, size),
                              ndimage.maximum_filter(ndimage.minimum_filter(m, size=size), size=size))
        assert np.array_equal(square_dilate(m, size), ndimage.maximum_filter(m, size=size))
        assert np.array_equal(cross_erode(m, it), ndimage.binary_erosion(m, iterations=it))
        assert np.array_equal(cross_dilate(m, it), ndimage.binary_dilation(m, iterations=it))
        assert np.array_equal(cross_open(m, it), ndimage.binary_opening(m, iterations=it))
        assert np.array_equal(cross_close(m, it), ndimage.binary_closing(m, iterations=it))
        assert np.array_equal(fill_holes(m), ndimage.binary_fill_holes(m))
        got, n = label(m)
        ref, n_ref = ndimage.label(m)
        assert n == n_ref
        # the same partition (numbering aside): each of ours is exactly one of scipy's
        pairs = {(a, b) for a, b in zip(got[m].tolist(), ref[m].tolist())}
        assert len(pairs) == n and len({a for a, _ in pairs}) == n and len({b for _, b in pairs}) == n


def test_box_filter_is_scipys_uniform_filter_to_float_rounding():
    from scipy import ndimage

    rng = np.random.default_rng(3)
    v = (rng.random((97, 131)) * 4095).astype(np.float32)
    for size in (3, 7, 15):
        assert np.allclose(box_filter(v, size), ndimage.uniform_filter(v, size=size, mode="nearest"), atol=0.01)
    assert np.allclose(box_filter(v[:, ::-1], 5), ndimage.uniform_filter(v[:, ::-1], size=5, mode="nearest"),
                       atol=0.01)   # a flipped view (not contiguous) is taken as it is
    with pytest.raises(ValueError):
        box_filter(v, 4)


def test_median_and_quantiles_are_numpys_bit_for_bit():
    """The single-rank partitions give numpy's values and types exactly: ties, integers, float32 and
    float64, the ends, scalar (weak Python and numpy) and list quantiles, NaN handed to numpy."""
    from medsendx_edge.triage.arrays import median, percentile, quantile

    rng = np.random.default_rng(0)
    makers = [lambda n: rng.normal(0, 1, n).astype(np.float32),
              lambda n: (np.round(rng.normal(500, 20, n) * 16) / 16).astype(np.float32),   # a block mean's lattice
              lambda n: rng.integers(0, 50, n),
              lambda n: rng.normal(0, 1, n),
              lambda n: rng.integers(0, 4096, n).astype(np.uint16)]
    for t in range(600):
        n = int(rng.integers(1, 12)) if t % 3 == 0 else int(rng.integers(12, 3000))
        x = makers[t % len(makers)](n)
        qs = [float(rng.random()), 0.0, 1.0, 0.005, 0.995, 0.5, 0.999]
        for want, got in ((np.quantile(x, qs), quantile(x, qs)),
                          (np.percentile(x, [5, 99.9, 0.1]), percentile(x, [5, 99.9, 0.1])),
                          (np.median(x), median(x)),
                          (np.percentile(x, 1), percentile(x, 1)),
                          (np.percentile(x, np.float64(37.5)), percentile(x, np.float64(37.5))),
                          (np.quantile(x, 0.25), quantile(x, 0.25))):
            assert np.array_equal(want, got) and type(want) is type(got) and np.asarray(want).dtype == np.asarray(got).dtype
    x = np.array([1.0, np.nan, 3.0, 4.0])
    assert np.isnan(median(x)) and np.isnan(quantile(x, [0.5])).all()


def test_ranks_of_many_floats_by_their_bits_are_numpys():
    """Above RADIX_MIN float values the ranks come from the values' bits (arrays._Radix): numpy's values
    and types (a zero as 0.0), on the shapes the analysis meets (one value over half the array as a film's air,
    a lattice of block means, negatives and both zeros, all one value, float64 deviations, float64 a few
    ulps apart) and at the ends."""
    from medsendx_edge.triage import arrays
    from medsendx_edge.triage.arrays import median, percentile, quantile

    rng = np.random.default_rng(7)
    n = arrays.RADIX_MIN + 1
    shapes = [rng.normal(0, 1, 3 * n).astype(np.float32),
              np.where(rng.random(2 * n) < 0.57, 812.0, rng.normal(1500, 90, 2 * n)).astype(np.float32),
              (np.round(rng.normal(500, 20, n) * 16) / 16).astype(np.float32),
              np.concatenate([np.zeros(n, np.float32), -np.zeros(n // 2, np.float32), -rng.random(300).astype(np.float32),
                              rng.random(500).astype(np.float32)]),
              np.full(n + 5, -3.25, np.float32),
              np.abs(rng.normal(0, 4, 2 * n)),
              np.round(rng.normal(-5, 1, n), 1),
              np.concatenate([np.full(3 * n, 7.0), [-np.finfo(np.float64).max, np.finfo(np.float64).tiny, 1e300]]),
              (np.float64(1.0).view(np.uint64) + rng.integers(0, 1 << 16, 2 * n).astype(np.uint64)).view(np.float64),
              (np.float64(1.0).view(np.uint64) + rng.integers(0, 2, n).astype(np.uint64)).view(np.float64)]
    qs = [0.0, 1.0, 0.5, 0.005, 0.995, float(rng.random()), 0.999, 1e-9]
    for x in shapes:
        x = rng.permutation(x)
        assert isinstance(arrays._Ranks(x).radix, arrays._Radix)
        for want, got in ((np.quantile(x, qs), quantile(x, qs)), (np.median(x), median(x)),
                          (np.median(x[:-1]), median(x[:-1])), (np.percentile(x, 2.5), percentile(x, 2.5)),
                          (np.quantile(x, 0.75), quantile(x, 0.75))):
            assert np.array_equal(want, got) and type(want) is type(got) and np.asarray(want).dtype == np.asarray(got).dtype
        ks = rng.integers(0, x.size, 40)
        s = np.sort(x)
        for k in ks.tolist():   # every rank, not only the quantiles': the pair at k and k+1
            a, b = arrays._Ranks(x).pair(k)
            assert a == s[k] and b == s[min(k + 1, x.size - 1)] and a.dtype == x.dtype


def test_quantiles_numpy_computes_its_own_way_are_handed_to_numpy():
    from medsendx_edge.triage.arrays import percentile, quantile

    u = np.array([1, 5, 9, 3, 2, 7], dtype=np.uint16)
    got, want = quantile(u, [0, 1]), np.quantile(u, [0, 1])   # integer quantiles: no interpolation, the values' type
    assert np.array_equal(got, want) and got.dtype == want.dtype == np.uint16
    assert quantile(u, np.float32(0.1)) == np.quantile(u, np.float32(0.1))
    for bad in (lambda: quantile(u, 1.5), lambda: quantile(u, [-0.1]), lambda: percentile(u, 150)):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError, match="Percentiles"):
        percentile(u, [150])
    x = np.arange(10) * 1.1
    ps = np.array([10.1, 90.7], dtype=np.float32)          # numpy keeps the percentiles' type
    got, want = percentile(x, ps), np.percentile(x, ps)
    assert np.array_equal(got, want) and got.dtype == want.dtype


def _octagonal_peel_mm(mask, spacing_mm, max_side=192):
    """The coarse distance the motion-blur check was validated with (triage/arrays.py before the density
    took the exact one): octagonal peeling on a grid of at most ``max_side`` cells, repeated in blocks."""
    import math

    h, w = mask.shape
    c = max(1, math.ceil(max(h, w) / max_side))
    p = np.pad(mask[::c, ::c], 1)
    dist = np.zeros((p.shape[0] - 2, p.shape[1] - 2), dtype=np.float32)
    for it in range(4 * max_side):
        cur = p[1:-1, 1:-1].copy()
        if not cur.any():
            break
        dist += cur
        p[0, 1:-1], p[-1, 1:-1] = cur[0], cur[-1]
        p[:, 0], p[:, -1] = p[:, 1], p[:, -2]
        nxt = cur & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        if it % 2:
            nxt &= p[:-2, :-2] & p[:-2, 2:] & p[2:, :-2] & p[2:, 2:]
        p[1:-1, 1:-1] = nxt
    return dist.repeat(c, axis=0)[:h].repeat(c, axis=1)[:, :w] * np.float32(c * spacing_mm)


def test_the_blur_checks_region_is_the_one_it_was_validated_on():
    """The motion-blur check's tissue (at least 10 mm inside the outline) keeps the coarse measure it was
    validated with: the same pixels as that measure's distance >= the depth, on discs, noise and borders."""
    from medsendx_edge.triage.arrays import coarse_interior

    rng = np.random.default_rng(7)
    for _ in range(60):
        h, w = (int(x) for x in rng.integers(30, 900, 2))
        yy, xx = np.mgrid[:h, :w]
        mask = (xx ** 2 + (yy - rng.uniform(0, h)) ** 2) < rng.uniform(10, max(h, w)) ** 2
        mask |= rng.random((h, w)) < 0.01
        spacing, depth = float(rng.uniform(0.05, 0.4)), float(rng.uniform(1.0, 25.0))
        assert np.array_equal(coarse_interior(mask, spacing, depth), _octagonal_peel_mm(mask, spacing) >= np.float32(depth))
    # at and just below exact ties of depth and cells, where float32 rounding decides (a review's cases)
    yy, xx = np.mgrid[:192, :192]
    disc = (xx ** 2 + (yy - 96) ** 2) < 180 ** 2
    big = np.mgrid[:1024, :832][1] ** 2 + (np.mgrid[:1024, :832][0] - 512) ** 2 < 700 ** 2
    for mask, spacing in ((disc, 10 / 133), (disc, 10 / 40), (big, 10 / 36 * (1 - 5e-8)), (big, 10 / 36),
                          (big, 10 / 36 * (1 + 5e-8))):
        assert np.array_equal(coarse_interior(mask, spacing, 10.0), _octagonal_peel_mm(mask, spacing) >= np.float32(10.0))


def test_the_fat_levels_window_loops_are_the_per_band_loops_they_replace():
    """The fat level's running median over its bands and its lowest-ahead minimum, vectorised (one numpy
    call for all bands instead of one a band, the interpreter lock held for each), give exactly the
    values of the loops they replace: bands missing (a window's length varies), ties, even lengths."""
    from medsendx_edge.triage.arrays import window_median
    from medsendx_edge.triage.density import AHEAD_MM, AHEAD_SHARE, SPIKE_MM, _lowest_ahead

    rng = np.random.default_rng(7)
    for trial in range(600):
        n = int(rng.integers(1, 160))
        pos = np.sort(rng.choice(np.arange(260), n, replace=False)).astype(np.float64)
        lev = rng.normal(size=n) if trial % 3 else np.round(rng.normal(size=n), 1)   # ties
        cnt = rng.integers(0, 1000, n)
        lo = np.searchsorted(pos, pos - SPIKE_MM / 2.0, side="left")
        hi = np.searchsorted(pos, pos + SPIKE_MM / 2.0, side="right")
        smooth = window_median(lev, lo, hi)
        assert np.array_equal(smooth, np.array([np.median(lev[a:b]) for a, b in zip(lo, hi)]))
        end = np.searchsorted(pos, pos + AHEAD_MM, side="right")
        got = _lowest_ahead(smooth, cnt, end)
        want = np.array([smooth[i:e][cnt[i:e] >= AHEAD_SHARE * cnt[i]].min() for i, e in enumerate(end)])
        assert np.array_equal(got, want)
    assert np.array_equal(window_median(np.array([3.0, 1.0, 2.0, 10.0]), np.array([0, 0, 1]), np.array([4, 3, 2])),
                          np.array([2.5, 2.0, 1.0]))
