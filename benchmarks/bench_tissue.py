"""Issue 30: the tissue map against the mammogram's analysis, per pixel, on decoded pixels (the decode is
the same for both and left out): ms per megapixel for the analysis alone, and with the picture (a fixed
cost of about 40 ms, PNG encoding a 768-pixel side-by-side picture: per pixel it weighs on small images),
and the ratios to the mammogram's.

    python benchmarks/bench_tissue.py
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _ms(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> int:
    import data_store
    from pydicom.data import get_testdata_file

    from medsendx_edge.triage.analysis import analyse
    from medsendx_edge.triage.gate import gate
    from medsendx_edge.triage.phantom import phantom_dataset
    from medsendx_edge.triage.picture import render_png as mammo_png
    from medsendx_edge.triage.tissue import render_png, tissue_map

    data = Path(data_store.__file__).parent / "data"
    out = {}
    for name, path in (("CR leg 1760x1760", data / "RG3_UNCI.dcm"), ("CR chest 1955x1841", data / "RG1_UNCI.dcm"),
                       ("CT head 512x512", data / "693_UNCI.dcm"), ("CT 128x128", Path(get_testdata_file("CT_small.dcm")))):
        ds = pydicom.dcmread(path)
        px = ds.pixel_array
        ms = _ms(lambda: render_png(tissue_map(ds, px)))
        ms_map = _ms(lambda: tissue_map(ds, px))
        out[name] = {"ms": round(ms, 1), "ms_per_mpx": round(ms / (px.size / 1e6), 1),
                     "analysis_ms_per_mpx": round(ms_map / (px.size / 1e6), 1)}
    ds, _ = phantom_dataset(4096, 3328, spacing_mm=0.07, density=0.3, seed=1)
    px = ds.pixel_array
    g = gate(ds)
    ms = _ms(lambda: mammo_png(analyse(ds, 3, "B", px, g.frame_note, g.domain), "normal"), repeat=3)
    ms_an = _ms(lambda: analyse(ds, 3, "B", px, g.frame_note, g.domain), repeat=3)
    out["mammogram 4096x3328"] = {"ms": round(ms, 1), "ms_per_mpx": round(ms / (px.size / 1e6), 1),
                                  "analysis_ms_per_mpx": round(ms_an / (px.size / 1e6), 1)}
    ref = out["mammogram 4096x3328"]
    for v in out.values():
        v["ratio_with_picture"] = round(v["ms_per_mpx"] / ref["ms_per_mpx"], 2)
        v["ratio_analysis"] = round(v["analysis_ms_per_mpx"] / ref["analysis_ms_per_mpx"], 2)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
