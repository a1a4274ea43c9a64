"""Segmentation speed on a 4096x3328 16-bit mammogram, in one run:

* ours: histogram K-Means (one counting pass, Lloyd on the bins, a lookup table for the labels);
* scikit-learn ``KMeans(n_clusters=3)`` on all pixels;
* the floor: one ``np.bincount`` pass over the image.

Time is the best of REPEAT runs; extra memory is the tracemalloc peak (numpy allocations) above the
pixel array, as a multiple of the pixel array's size.  Also the agreement of the labels.

    python benchmarks/bench_segment.py [--repeat 5] [--no-sklearn]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from medsendx_edge.synthetic import render  # noqa: E402
from medsendx_edge.triage.kmeans import segment  # noqa: E402


def measure(fn, repeat: int) -> tuple[float, int, object]:
    best = float("inf")
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return best, peak, out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-sklearn", action="store_true")
    args = ap.parse_args()
    img, _ = render(4096, 3328, seed=1, density=0.3, view="MLO")
    nbytes = img.nbytes
    res = {}
    t, peak, (labels, centres) = measure(lambda: segment(img, 3), args.repeat)
    res["ours"] = {"s": t, "extra_mem_x": peak / nbytes, "centres": [float(c) for c in centres]}
    t, peak, _ = measure(lambda: np.bincount(img.ravel()), args.repeat)
    res["bincount_floor"] = {"s": t, "extra_mem_x": peak / nbytes}
    if not args.no_sklearn:
        from sklearn.cluster import KMeans

        def sk():
            km = KMeans(n_clusters=3, n_init=1, random_state=0).fit(img.reshape(-1, 1).astype(np.float32))
            return km

        t, peak, km = measure(sk, 1)
        order = np.argsort(np.argsort(km.cluster_centers_.ravel()))
        agree = float((order[km.labels_].reshape(img.shape) == labels).mean())
        res["sklearn_kmeans"] = {"s": t, "extra_mem_x": peak / nbytes,
                                 "centres": sorted(float(c) for c in km.cluster_centers_.ravel()),
                                 "label_agreement": agree}
    print(f"image 4096x3328 uint16 ({nbytes / 1e6:.1f} MB), best of {args.repeat}")
    for k, v in res.items():
        print(f"  {k:16s} {v['s'] * 1000:9.1f} ms   extra memory {v['extra_mem_x']:.2f}x the pixel array")
    ours = res["ours"]["s"]
    print(f"ours / bincount floor = {ours / res['bincount_floor']['s']:.2f}x (target <= 1.5)")
    if "sklearn_kmeans" in res:
        sk = res["sklearn_kmeans"]
        print(f"scikit-learn / ours = {sk['s'] / ours:.1f}x (target >= 20); labels agree on "
              f"{sk['label_agreement'] * 100:.2f}% of pixels")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "segment.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
