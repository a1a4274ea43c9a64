"""Array helpers, numpy only: block means, box filters, isotonic regression, distance to the skin line.
"""

from __future__ import annotations

import math

import numpy as np


# --------------------------------------------------------------------------- array helpers (numpy only)
def block_mean(img: np.ndarray, f: int) -> np.ndarray:
    """Mean of f x f blocks, as float32, by adding f*f strided views (no full-size float copy)."""
    if f == 1:
        return img.astype(np.float32)
    h, w = (img.shape[0] // f) * f, (img.shape[1] // f) * f
    acc = np.zeros((h // f, w // f), dtype=np.float32)
    for i in range(f):
        for j in range(f):
            acc += img[i:h:f, j:w:f]
    acc *= 1.0 / (f * f)
    return acc


def box_filter(a: np.ndarray, size: int) -> np.ndarray:
    """Mean over a size x size window (edges replicated): scipy's separable uniform filter."""
    from scipy import ndimage

    out: np.ndarray = ndimage.uniform_filter(a.astype(np.float32, copy=False), size=size, mode="nearest")
    return out


def isotonic(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least-squares non-decreasing fit of ``y`` (pool adjacent violators).  Written here rather
    than imported: scipy.optimize costs 0.49 s and scikit-learn 0.92 s to import, per ``segment``
    process, against a 0.5 s read + bincount floor; the fit itself is over a hundred points."""
    means: list[float] = []
    weights: list[float] = []
    sizes: list[int] = []
    for value, weight in zip(y.tolist(), w.tolist()):
        means.append(value)
        weights.append(weight)
        sizes.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            wsum = weights[-2] + weights[-1]
            means[-2] = (means[-2] * weights[-2] + means[-1] * weights[-1]) / wsum if wsum > 0 else means[-1]
            weights[-2] = wsum
            sizes[-2] += sizes[-1]
            del means[-1], weights[-1], sizes[-1]
    return np.repeat(np.asarray(means, dtype=np.float64), sizes)


def distance_mm(mask: np.ndarray, spacing_mm: float, max_side: int = 192) -> np.ndarray:
    """Distance to the mask's outline in mm (the skin line), on a coarse grid by peeling (alternating
    4- and 8-neighbour erosions: an octagonal metric), then upsampled.  Image borders count as inside
    (the chest wall and an axilla running off the image are not skin)."""
    h, w = int(mask.shape[0]), int(mask.shape[1])
    c = max(1, math.ceil(max(h, w) / max_side))
    m = mask[::c, ::c]
    gh, gw = int(m.shape[0]), int(m.shape[1])
    dist = np.zeros((gh, gw), dtype=np.float32)
    p = np.zeros((gh + 2, gw + 2), dtype=bool)   # the mask with its edge replicated, one buffer
    p[1:-1, 1:-1] = m
    for it in range(4 * max_side):
        cur = p[1:-1, 1:-1]
        if not cur.any():
            break
        dist += cur
        p[0, 1:-1], p[-1, 1:-1] = cur[0], cur[-1]
        p[:, 0], p[:, -1] = p[:, 1], p[:, -2]
        nxt = cur & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        if it % 2:
            nxt &= p[:-2, :-2] & p[:-2, 2:] & p[2:, :-2] & p[2:, 2:]
        p[1:-1, 1:-1] = nxt
    # every row i maps to i // c (m has ceil(h / c) rows): block repeats, no index arrays
    out: np.ndarray = dist.repeat(c, axis=0)[:h].repeat(c, axis=1)[:, :w]
    out *= np.float32(c * spacing_mm)
    return out


def robust_std(x: np.ndarray) -> float:
    if x.size < 10:
        return float("nan")
    if x.size > 250_000:
        x = x[:: x.size // 250_000 + 1]
    med = np.median(x)
    return float(1.4826 * np.median(np.abs(x - med)))
