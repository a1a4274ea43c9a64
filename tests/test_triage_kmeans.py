"""1-D K-Means on the histogram (triage/kmeans.py): the optimum of an exhaustive multi-level Otsu search and
scikit-learn's answer, and why the breast mask must come before it."""

from __future__ import annotations

import numpy as np

from medsendx_edge.synthetic import LABELS, synthetic_mammogram
from medsendx_edge.triage.analysis import analyse
from medsendx_edge.triage.kmeans import histogram, kmeans_hist, segment


def _sse(counts: np.ndarray, thresholds: list[float]) -> float:
    x = np.arange(counts.size, dtype=np.float64)
    edges = [0] + [int(np.floor(t)) + 1 for t in thresholds] + [counts.size]
    total = 0.0
    for a, b in zip(edges[:-1], edges[1:]):
        c, v = counts[a:b], x[a:b]
        if c.sum():
            m = (c * v).sum() / c.sum()
            total += (c * (v - m) ** 2).sum()
    return total


def _otsu3(counts: np.ndarray) -> tuple[float, tuple[int, int]]:
    """Exhaustive two-threshold search (multi-level Otsu): minimum within-class sum of squares."""
    x = np.arange(counts.size, dtype=np.float64)
    c0 = np.concatenate(([0.0], np.cumsum(counts)))
    c1 = np.concatenate(([0.0], np.cumsum(counts * x)))
    c2 = np.concatenate(([0.0], np.cumsum(counts * x * x)))

    def sse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        n = c0[b] - c0[a]
        s = c1[b] - c1[a]
        return np.where(n > 0, (c2[b] - c2[a]) - s * s / np.maximum(n, 1e-300), 0.0)

    n = counts.size
    best, arg = np.inf, (0, 0)
    for t1 in range(1, n - 1):
        t2 = np.arange(t1 + 1, n)
        total = sse(np.array([0]), np.array([t1])) + sse(np.full(t2.size, t1), t2) + sse(t2, np.full(t2.size, n))
        i = int(np.argmin(total))
        if total[i] < best:
            best, arg = float(total[i]), (t1, int(t2[i]))
    return best, arg


def test_histogram_kmeans_matches_multilevel_otsu_and_sklearn():
    from sklearn.cluster import KMeans

    ds, _ = synthetic_mammogram(256, 208, seed=4, density=0.35, noise_sigma=60)
    img = ds.pixel_array
    counts, offset = histogram(img)
    assert counts.sum() == img.size
    cl = kmeans_hist(counts, 3)
    assert np.all(np.diff(cl.centres) > 0)  # ordered by centroid
    # Coarser bins keep the exhaustive search fast; the optimum must match ours within a bin.
    coarse = np.add.reduceat(counts, np.arange(0, counts.size, 16))
    best, (t1, t2) = _otsu3(coarse)
    ours = kmeans_hist(coarse, 3)
    assert _sse(coarse, list(ours.thresholds)) <= best * (1 + 1e-9)
    occupied = np.flatnonzero(coarse)
    otsu_labels = (occupied >= t1).astype(int) + (occupied >= t2)
    our_labels = np.searchsorted(ours.thresholds, occupied, side="left")
    assert (otsu_labels == our_labels).all()  # the same partition of the occupied bins
    sk = KMeans(n_clusters=3, n_init=4, random_state=0).fit(img[::2, ::2].reshape(-1, 1).astype(np.float64))
    sk_centres = np.sort(sk.cluster_centers_.ravel())
    assert np.allclose(cl.centres + offset, sk_centres, atol=0.01 * (img.max() - img.min()))
    labels, centres = segment(img, 3)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1, 2}
    assert np.all(np.diff(centres) > 0)
    sk_labels = np.argsort(np.argsort(sk.cluster_centers_.ravel()))[sk.predict(img.reshape(-1, 1).astype(np.float64))]
    assert (sk_labels.reshape(img.shape) == labels).mean() > 0.995


def test_whole_image_kmeans_would_overstate_density_on_mlo():
    """Why the mask comes first: the pectoral muscle lands in the dense class."""
    ds, truth = synthetic_mammogram(512, 416, seed=7, density=0.1, view="MLO", pixel_spacing_mm=0.28)
    labels, _ = segment(ds.pixel_array, 3)
    tissue = (truth > 0) & (truth < LABELS["marker"])
    naive_pd = (labels[tissue] == 2).mean()
    true_pd = (truth == LABELS["dense"]).sum() / ((truth == 1) | (truth == 2)).sum()
    assert naive_pd - true_pd > 0.05
    assert abs(analyse(ds, 3).metrics["pd"] - true_pd) < 0.02


def _numpy_lloyd(counts: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """The Lloyd loop as it was written with numpy calls (before the loop on Python floats): the reference."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.size
    cs = np.concatenate(([0.0], np.cumsum(counts)))
    cxs = np.concatenate(([0.0], np.cumsum(counts * np.arange(n, dtype=np.float64))))
    k = max(1, min(k, int(np.count_nonzero(counts))))
    centres = np.unique(np.searchsorted(cs[1:], (np.arange(k) + 0.5) / k * cs[-1]).astype(np.float64))
    while centres.size < k:
        occupied = np.flatnonzero(counts)
        centres = np.unique(np.concatenate([centres, occupied[np.linspace(0, occupied.size - 1, k).astype(int)]]))[:k]
    it = 0
    for it in range(1, 301):
        edges = np.clip(np.concatenate(([0], np.floor((centres[:-1] + centres[1:]) / 2.0).astype(np.int64) + 1, [n])), 0, n)
        s, sx = cs[edges[1:]] - cs[edges[:-1]], cxs[edges[1:]] - cxs[edges[:-1]]
        new = np.where(s > 0, sx / np.maximum(s, 1e-300), centres)
        converged = float(np.abs(new - centres).max()) <= 1e-9
        centres = new
        if converged:
            break
    return centres, it


def test_the_lloyd_loop_on_python_floats_gives_the_numpy_loops_centres_bit_for_bit():
    """The iterations run on Python floats (a numpy call per step cost more than its arithmetic): the same
    IEEE operations in the same order, so the same centres to the last bit and the same iteration count,
    on integer counts, sparse and two-peaked histograms, float weights and ties."""
    rng = np.random.default_rng(7)
    for i in range(600):
        n = int(rng.integers(1, 3000))
        x = np.arange(n)
        h = [rng.integers(0, 1000, n), rng.poisson(rng.uniform(0, 40), n) * (rng.random(n) < rng.uniform(0.01, 1)),
             (1e5 * np.exp(-0.5 * ((x - rng.uniform(0, n)) / rng.uniform(1, max(1.5, n / 5))) ** 2)
              + 3e4 * np.exp(-0.5 * ((x - rng.uniform(0, n)) / rng.uniform(1, max(1.5, n / 7))) ** 2)).astype(np.int64),
             rng.random(n) * rng.uniform(1, 1e6)][i % 4]
        if h.sum() == 0:
            h = np.ones(n)
        k = int(rng.integers(1, 6))
        centres, iterations = _numpy_lloyd(h, k)
        ours = kmeans_hist(h, k)
        assert np.array_equal(ours.centres, centres) and ours.iterations == iterations
