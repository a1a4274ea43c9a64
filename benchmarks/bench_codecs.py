"""Lossless codecs on mammograms and real radiographs: compression ratio, encode and decode time per image,
MB/s on one core, and bytes saved per CPU second (encode + the verifying decode the route stage does).

Images: phantom mammograms 2560x3328 at 12 bits (presentation, 3 densities) and 14 bits (raw), and the
real CR radiographs of pydicom-data (RG1, RG3, uncompressed).

    python benchmarks/bench_codecs.py
"""

from __future__ import annotations

import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pydicom

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from medsendx_edge.triage.phantom import phantom_dataset  # noqa: E402
from medsendx_edge.upload.compress import CODECS  # noqa: E402


def images() -> list[tuple[str, pydicom.Dataset]]:
    out = []
    for d in (0.1, 0.4, 0.7):
        out.append((f"phantom 12-bit {d:.0%}", phantom_dataset(3328, 2560, spacing_mm=0.085, density=d, seed=7)[0]))
    out.append(("phantom 14-bit raw", phantom_dataset(3328, 2560, spacing_mm=0.085, density=0.4, raw=True, seed=8)[0]))
    data = Path(__import__("data_store").__file__).parent / "data"
    for name in ("RG1_UNCR.dcm", "RG3_UNCR.dcm"):
        if (data / name).exists():
            out.append((name, pydicom.dcmread(data / name)))
    return out


def main() -> int:
    rows = []
    for label, ds in images():
        raw = len(ds.PixelData)
        original = ds.pixel_array.copy()
        for codec, ts in CODECS.items():
            d = pydicom.dcmread(_bytes(ds))
            t0 = time.process_time()
            if codec == "deflate":
                d.file_meta.TransferSyntaxUID = ts
                data = _bytes(d).getvalue()
            else:
                d.compress(ts)
                data = _bytes(d).getvalue()
            enc = time.process_time() - t0
            t0 = time.process_time()
            back = pydicom.dcmread(io.BytesIO(data)).pixel_array
            dec = time.process_time() - t0
            same = bool(np.array_equal(back, original))
            size = len(data)
            rows.append((label, codec, raw / size, enc, dec, raw / 1e6 / max(enc, 1e-9), same,
                         (raw - size) / 1e6 / max(enc + dec, 1e-9)))
    print("| image | codec | ratio | encode s | decode s | encode MB/s | identical | MB saved per CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.1f} | {'yes' if r[6] else 'NO'} | {r[7]:.1f} |")
    print()
    for codec in CODECS:
        mine = [r for r in rows if r[1] == codec and r[0].startswith("phantom")]
        print(f"{codec:9s} mammograms: ratio {statistics.median(r[2] for r in mine):.2f}, "
              f"MB saved per CPU second {statistics.median(r[7] for r in mine):.1f}")
    return 0


def _bytes(ds: pydicom.Dataset) -> io.BytesIO:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    out.seek(0)
    return out


if __name__ == "__main__":
    sys.exit(main())
