"""Array helpers: block means, box filters, binary morphology and connected components (OpenCV's kernels),
isotonic regression, distance to the skin line.

The image kernels are OpenCV's (``opencv-python-headless``) rather than scipy.ndimage's: on a 1024x832
working image a 9-pixel opening takes 0.33 ms against scipy's 14.5 ms, a box filter 1.1 against 5.2 ms, a
labelling 1.7 against 7.4 ms (benchmarks/bench_triage.py measures the whole analysis).  The binary
results are identical to scipy's (same structuring elements, same borders: tests/test_triage_arrays.py
checks them against scipy); the box filter's float sums differ from scipy's running sums in the last bits.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


# --------------------------------------------------------------------------- array helpers (numpy only)
def block_mean(img: np.ndarray, f: int, top: int | None = None) -> np.ndarray:
    """Mean of f x f blocks, as float32.  Integer pixels: the f rows of a block added whole (contiguous
    rows, exact integer sums), then the f columns of the row sums, then one scaling (a third less time
    than adding f*f strided views, and the same values); other types: f*f strided float views."""
    if f == 1:
        return img.astype(np.float32)
    h, w = (img.shape[0] // f) * f, (img.shape[1] // f) * f
    if img.dtype.kind in "ui" and img.dtype.itemsize <= 2 and f <= 16:
        # (f <= 16: the old float32 adds stay exact, so the two paths agree; beyond, the sums pass 2**24)
        # Unsigned 16-bit pixels whose f rows add up below 2**16 (12-14 bits stored: digital detectors) are
        # added as uint16, half the memory traffic of uint32 (5.8 against 9.5 ms on 4096x3328); one max
        # pass (1 ms) proves that they do; it is skipped when ``top``, the largest value the pixels can
        # hold (Bits Stored), already rules the narrow sums out (16-bit films).
        narrow = (img.dtype == np.uint16 and img.size and (top is None or top * f < 1 << 16)
                  and int(img.max()) * f < 1 << 16)
        rows = img[0:h:f, :w].astype(np.uint16 if narrow else np.int64 if img.dtype.kind == "i" else np.uint32)
        for i in range(1, f):
            np.add(rows, img[i:h:f, :w], out=rows)
        sums = rows[:, 0::f].astype(np.int64 if img.dtype.kind == "i" else np.uint32)
        for j in range(1, f):
            np.add(sums, rows[:, j::f], out=sums)
        out = sums.astype(np.float32)
        out *= 1.0 / (f * f)
        return out
    acc = np.zeros((h // f, w // f), dtype=np.float32)
    for i in range(f):
        for j in range(f):
            acc += img[i:h:f, j:w:f]
    acc *= 1.0 / (f * f)
    return acc


def windows(lo: np.ndarray, hi: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The windows ``[lo[i], hi[i])`` of an array of ``size`` values as rows of one index matrix: the
    indices (clipped into the array) and which of them are inside their window.  For the per-band loops
    of the fat level, which otherwise make one small numpy call a band, each holding the interpreter lock
    that the daemon's other threads wait on."""
    width = int(max(1, (hi - lo).max())) if lo.size else 1
    idx = lo[:, None] + np.arange(width)[None, :]
    return np.minimum(idx, max(0, size - 1)), idx < hi[:, None]


def window_median(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``[np.median(x[a:b]) for a, b in zip(lo, hi)]`` for non-empty windows, the same values: each row
    sorted (padding last), and numpy's median of its one or two middle values, ``(a + b) / 2``."""
    idx, inside = windows(lo, hi, x.size)
    m = np.where(inside, x[idx], np.inf)
    m.sort(axis=1)
    n = hi - lo
    rows = np.arange(lo.size)
    out: np.ndarray = (m[rows, (n - 1) // 2] + m[rows, n // 2]) / 2
    return out


def _cv2() -> Any:
    import cv2

    return cv2


def box_filter(a: np.ndarray, size: int) -> np.ndarray:
    """Mean over a size x size window (odd ``size``; edges replicated, scipy's ``mode="nearest"``), as
    float32."""
    if size % 2 == 0:
        raise ValueError("box_filter: the window must be odd (centred)")
    cv2 = _cv2()
    src = np.ascontiguousarray(a, dtype=np.float32)
    out: np.ndarray = cv2.blur(src, (size, size), borderType=cv2.BORDER_REPLICATE)
    return out


def _u8(mask: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(mask, dtype=bool).view(np.uint8)


def square_open(mask: np.ndarray, size: int) -> np.ndarray:
    """A binary opening by a size x size square: scipy's ``maximum_filter(minimum_filter(m, size), size)``
    (what lies outside the image does not count)."""
    cv2 = _cv2()
    kernel = np.ones((size, size), dtype=np.uint8)
    out: np.ndarray = cv2.morphologyEx(_u8(mask), cv2.MORPH_OPEN, kernel,
                                       borderType=cv2.BORDER_REPLICATE).view(bool)
    return out


def square_dilate(mask: np.ndarray, size: int) -> np.ndarray:
    """scipy's ``maximum_filter(m, size)`` on a binary mask."""
    cv2 = _cv2()
    out: np.ndarray = cv2.dilate(_u8(mask), np.ones((size, size), dtype=np.uint8),
                                 borderType=cv2.BORDER_REPLICATE).view(bool)
    return out


def corner_erode(mask: np.ndarray, size: int) -> np.ndarray:
    """True where the size x size box whose top-left corner is the pixel lies wholly in the mask (boxes
    running off the image's bottom or right edge: see their in-image part only; crop them)."""
    cv2 = _cv2()
    out: np.ndarray = cv2.erode(_u8(mask), np.ones((size, size), dtype=np.uint8), anchor=(0, 0),
                                borderType=cv2.BORDER_REPLICATE).view(bool)
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndimage.binary_fill_holes`` (background not 4-connected to the image border is filled): the
    background inside a one-pixel frame of background, flood-filled from the frame (OpenCV)."""
    cv2 = _cv2()
    h, w = mask.shape
    bg = np.ones((h + 2, w + 2), dtype=np.uint8)
    bg[1:-1, 1:-1] = ~mask
    cv2.floodFill(bg, None, (0, 0), 2, flags=4)
    out: np.ndarray = bg[1:-1, 1:-1] != 2
    return out


_CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=np.uint8)


def cross_erode(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """scipy's ``binary_erosion(m, iterations=n)`` (4-connected cross; outside the image is background)."""
    cv2 = _cv2()
    out: np.ndarray = cv2.erode(_u8(mask), _CROSS, iterations=iterations, borderType=cv2.BORDER_CONSTANT,
                                borderValue=0).view(bool)
    return out


def cross_dilate(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """scipy's ``binary_dilation(m, iterations=n)`` (4-connected cross)."""
    cv2 = _cv2()
    out: np.ndarray = cv2.dilate(_u8(mask), _CROSS, iterations=iterations, borderType=cv2.BORDER_CONSTANT,
                                 borderValue=0).view(bool)
    return out


def cross_open(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """scipy's ``binary_opening(m, iterations=n)``."""
    return cross_dilate(cross_erode(mask, iterations), iterations)


def cross_close(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """scipy's ``binary_closing(m, iterations=n)``: the erosion counts outside the image as background."""
    return cross_erode(cross_dilate(mask, iterations), iterations)


def label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components, as scipy's ``ndimage.label``: (labels, count), 0 the background.  The
    numbering may differ from scipy's; callers use only sizes and membership."""
    cv2 = _cv2()
    n, labels = cv2.connectedComponents(_u8(mask), connectivity=4, ltype=cv2.CV_32S)
    return labels, int(n) - 1


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


def distance_mm(mask: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Distance to the mask's outline in mm (the skin line): OpenCV's exact Euclidean transform at the
    working resolution.  Image borders count as inside (the chest wall and an axilla running off the
    image are not skin): the transform takes only the pixels in the image as outline.

    Exact and per pixel because the fat level is read against it where it rises fastest: an earlier
    coarse transform (octagonal, on a grid of 1.25-1.7 mm cells, repeated in blocks) put whole cells of
    the steep edge a millimetre or more off, and their pixels read as a speckled rim of dense tissue
    3-6 mm inside the skin line on every real film (3-6 % of the breast)."""
    import cv2

    m = np.ascontiguousarray(mask, dtype=bool).view(np.uint8)
    out: np.ndarray = cv2.distanceTransform(m, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    if mask.all():   # no outline in the image: deeper than anything in it (its height plus its width)
        out.fill(float(sum(mask.shape)))
    out *= np.float32(spacing_mm)
    return out


def coarse_interior(mask: np.ndarray, spacing_mm: float, depth_mm: float, max_side: int = 192) -> np.ndarray:
    """The pixels at least ``depth_mm`` inside the mask's outline by the coarse measure the motion-blur
    check was validated with (issue 24): alternating 4- and 8-neighbour erosions (an octagonal metric) on
    a grid of at most ``max_side`` cells a side, whose first peel counts a whole cell, repeated back in
    blocks; image borders count as inside.  The density reads the exact distance (:func:`distance_mm`);
    the blur check keeps this region because its sample of patches moves with it: with the exact
    distance at 10 mm one of the positioning family's 0.4 mm blurs was missed, at 10.7 mm it was found and
    at 11 mm a 1 mm blur was missed (per-image ratios moved by 0.3 within a millimetre of depth), a
    fragility of the check's own to be mended there, not by choosing a depth that passes."""
    h, w = int(mask.shape[0]), int(mask.shape[1])
    c = max(1, math.ceil(max(h, w) / max_side))
    # the peels a pixel must survive: the fewest cells k with k * (cell in mm) >= depth in float32, as the
    # old measure compared them (an exact tie such as 133 cells of 10/133 mm falls short in float32)
    cell, target = np.float32(c * spacing_mm), np.float32(depth_mm)
    need = max(1, math.ceil(depth_mm / (c * spacing_mm)))
    while np.float32(need) * cell < target:
        need += 1
    while need > 1 and np.float32(need - 1) * cell >= target:
        need -= 1
    p = np.zeros((math.ceil(h / c) + 2, math.ceil(w / c) + 2), dtype=bool)   # the edge replicated
    p[1:-1, 1:-1] = mask[::c, ::c]
    for it in range(need - 1):
        cur = p[1:-1, 1:-1]
        if not cur.any():
            break
        p[0, 1:-1], p[-1, 1:-1] = cur[0], cur[-1]
        p[:, 0], p[:, -1] = p[:, 1], p[:, -2]
        nxt = cur & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        if it % 2:
            nxt &= p[:-2, :-2] & p[:-2, 2:] & p[2:, :-2] & p[2:, 2:]
        p[1:-1, 1:-1] = nxt
    out: np.ndarray = p[1:-1, 1:-1].repeat(c, axis=0)[:h].repeat(c, axis=1)[:, :w]
    return out


#: Above this many float values, ranks are found by their bits (:class:`_Radix`).
RADIX_MIN = 8192


class _Ranks:
    """The values of ``x`` by rank (0-based), each found the fastest exact way for these values.

    numpy selects by introselect: 0.27 ms for the median of 225,000 random values, but 3.4 ms when
    one value repeats over much of them (a real film's air: 57 % of the dark class is one value), and
    numpy 2.4's selection at several ranks at once (its median and quantiles) is slow on any values
    (3.2 ms).  Its sort takes 0.6-1.6 ms whatever the values.  So, for float values: above
    :data:`RADIX_MIN` of them, by their bits (:class:`_Radix`, which repeats do not slow); fewer (and
    integers), a sample of a thousand values, a value repeating over 2 % of it, the sort; else one
    single-rank selection per rank."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x
        self.sorted: np.ndarray | None = None
        self.radix: _Radix | None = None
        if x.dtype in (np.float32, np.float64) and x.size >= RADIX_MIN:
            self.radix = _Radix(x)
            return
        sample = x[:: max(1, x.size // 1024)]
        repeats = int(np.unique(sample, return_counts=True)[1].max())
        self.sorted = np.sort(x) if repeats > 0.02 * sample.size else None

    def pair(self, k: int) -> tuple[Any, Any]:
        """The k-th and (k+1)-th smallest values (the last one twice at the end)."""
        if self.radix is not None:
            return self.radix.pair(k)
        if self.sorted is not None:
            return self.sorted[k], self.sorted[min(k + 1, self.x.size - 1)]
        p = np.partition(self.x, k)
        return p[k], (p[k + 1:].min() if k + 1 < self.x.size else p[k])


class _Radix:
    """Exact order statistics of finite float32 or float64 values by their bits.  Each value's bits are made
    an unsigned key in the values' order (the sign bit set on a positive value, every bit flipped on a
    negative one); the keys' span (largest less smallest) is cut into at most 65,536 digits of equal width
    (its top 16 bits), counted once (one ``bincount``) for every rank asked of the array; a rank's digit is
    found in the running count, and that digit's keys are taken out and sorted, once, for every rank that
    falls in it.  The span, not the whole key, is what is cut, so values packed close together (float64
    sharing their top 48 bits) spread over the digits as values spread wide do.

    The values numpy's sort or partition puts at each rank (tests/test_triage_arrays.py; a zero is
    given as 0.0, where numpy may give either zero), at a cost that repeats do not change: the ranks of
    the whole triage of one image took 14.5 ms against 30 on the 20 phantom mammograms of
    benchmarks/bench_e2e.py, 11.5 against 26 on the real films (one value over half a film's air made
    numpy sort).  Its worst case is a digit holding most of the values without one value filling it:
    their sort, which numpy's sort of the whole array would have cost anyway."""

    def __init__(self, x: np.ndarray) -> None:
        self.dtype = x.dtype
        self.n = x.size
        self.bits = 8 * x.dtype.itemsize
        self._ukind: type[np.unsignedinteger[Any]] = np.uint32 if self.bits == 32 else np.uint64
        ikind: type[np.signedinteger[Any]] = np.int32 if self.bits == 32 else np.int64
        u: np.ndarray = np.ascontiguousarray(x).ravel().view(self._ukind)
        signed: np.ndarray = u.view(ikind)
        # all ones where the sign is set (an arithmetic shift), else the sign bit alone: one xor makes the key
        key: np.ndarray = (signed >> (self.bits - 1)).view(self._ukind)
        key |= self._ukind(1 << (self.bits - 1))
        key ^= u
        self.key = key
        self.base = key.min()
        self.shift = max(0, int(key.max() - self.base).bit_length() - 16)
        self.digit = ((key - self.base) >> self._ukind(self.shift)).astype(np.intp)
        counts = np.bincount(self.digit)
        counts = np.pad(counts, (0, -counts.size % 256))
        self.counts = counts
        self.coarse = np.cumsum(counts.reshape(-1, 256).sum(axis=1))
        self._sorted: dict[int, np.ndarray] = {}

    def _rank_digit(self, k: int) -> tuple[int, int]:
        """The digit whose keys hold rank k, and k's rank among them: a running count over groups of 256
        digits, then over the one group (a running count over all 65,536 is 0.2 ms)."""
        g = int(np.searchsorted(self.coarse, k, side="right"))
        k -= int(self.coarse[g - 1]) if g else 0
        fine = np.cumsum(self.counts[g << 8:(g + 1) << 8])
        d = int(np.searchsorted(fine, k, side="right"))
        k -= int(fine[d - 1]) if d else 0
        return (g << 8) + d, k

    def _key_at(self, k: int) -> Any:
        d, k = self._rank_digit(k)
        keys = self._sorted.get(d)
        if keys is None:
            keys = self.key[self.digit == d]
            if keys.size > 1 and keys.min() != keys.max():
                keys = np.sort(keys)
            self._sorted[d] = keys
        return keys[k]   # (keys of one value are left unsorted: any index is that value)

    def _value(self, key: Any) -> Any:
        ukind = self._ukind
        sign = ukind(1 << (self.bits - 1))
        key = ukind(key)
        u = key ^ sign if key & sign else ~key
        value = np.asarray(u, dtype=ukind).view(self.dtype)[()]
        return value if value else self.dtype.type(0)   # -0.0 and 0.0 have two keys, one value: 0.0

    def pair(self, k: int) -> tuple[Any, Any]:
        a = self._key_at(k)
        b = self._key_at(k + 1) if k + 1 < self.n else a
        return self._value(a), self._value(b)


def median(x: np.ndarray) -> Any:
    """``np.median(x)`` of a 1-D array without NaN, the same value: the two middle values (:class:`_Ranks`)
    and numpy's median of them (the mean of the two, as numpy computes it)."""
    x = np.asarray(x).ravel()
    n = x.size
    if n < 3 or (x.dtype.kind == "f" and not np.isfinite(x).all()):
        return np.median(x)
    a, b = _Ranks(x).pair((n - 1) // 2)
    return np.median(np.asarray([a, b] if n % 2 == 0 else [a], dtype=x.dtype))


def quantile(x: np.ndarray, qs: Any) -> Any:
    """``np.quantile(x, qs)`` (linear) of a 1-D array without NaN, the same values (see :func:`median`):
    per quantile the two order statistics around its position (:class:`_Ranks`), then numpy's own
    interpolation between them at the same fraction."""
    x = np.asarray(x).ravel()
    n = x.size
    q_kind = np.asanyarray(qs).dtype
    # numpy's own hands: few values, NaN or infinities, integer quantiles (its no-interpolation path keeps
    # the values' type), quantiles of another float type, quantiles out of [0, 1] (its error)
    if (n < 3 or (x.dtype.kind == "f" and not np.isfinite(x).all()) or q_kind.kind != "f"
            or (q_kind != np.float64 and type(qs) is not float)
            or not bool(np.all((np.asanyarray(qs) >= 0) & (np.asanyarray(qs) <= 1)))):
        return np.quantile(x, qs)
    ranks = _Ranks(x)
    if np.ndim(qs) == 0:
        # a scalar: a Python float is numpy's "weak" scalar (the result keeps the values' precision)
        as_given = float if type(qs) in (int, float) else np.float64
        k, gamma = _rank(n, np.float64(qs))
        if gamma is None:
            return np.quantile(np.asarray([x.max()], dtype=x.dtype), as_given(0.0))
        a, b = ranks.pair(k)
        return np.quantile(np.asarray([a, b], dtype=x.dtype), as_given(gamma))
    q = np.asanyarray(qs, dtype=np.float64)
    out = []
    for qi in q.ravel().tolist():
        k, gamma = _rank(n, np.float64(qi))
        if gamma is None:
            out.append(np.quantile(np.asarray([x.max()], dtype=x.dtype), [0.0])[0])
            continue
        a, b = ranks.pair(k)
        out.append(np.quantile(np.asarray([a, b], dtype=x.dtype), [gamma])[0])
    return np.asarray(out).reshape(q.shape)


def _rank(n: int, q: np.float64) -> tuple[int, np.float64 | None]:
    """numpy's linear method: the lower rank of quantile q of n values and the fraction towards the next
    (None: the largest value)."""
    virtual = (n - 1) * q
    k = int(np.floor(virtual))
    if k >= n - 1:
        return n - 1, None
    if virtual < 0:
        return 0, np.float64(0.0)
    return k, virtual - np.floor(virtual)


def percentile(x: np.ndarray, ps: Any) -> Any:
    """``np.percentile(x, ps)``, the same values, as :func:`quantile` (numpy's own division of the
    percentiles, their type kept; numpy's own error out of [0, 100])."""
    q = np.true_divide(ps, 100, out=...)
    if q.size and not bool(np.all((q >= 0) & (q <= 1))):
        return np.percentile(x, ps)
    if type(ps) in (int, float):
        return quantile(x, float(q))   # numpy's weak scalar, as np.percentile
    return quantile(x, q if q.ndim else q[()])


def robust_std(x: np.ndarray) -> float:
    if x.size < 10:
        return float("nan")
    if x.size > 250_000:
        x = x[:: x.size // 250_000 + 1]
    med = median(x)
    return float(1.4826 * median(np.abs(x - med)))
