"""Lossless codecs on mammograms and real radiographs: compression ratio, encode and decode time per image,
MB/s on one core, and bytes saved per CPU second (encode + the verifying decode the route stage does, with
the decoder the route stage asks for: ``dicomio.decoding_plugin``).

Images: phantom mammograms 2560x3328 at 12 bits (presentation, 3 densities) and 14 bits (raw), the real CR
radiographs of pydicom-data (RG1, RG3, uncompressed), and (``--sources``) the sets of
``benchmarks/sources.py``: the 8 real CBIS-DDSM films, and 8 cases of the independent phantom family whose
noise and texture compress like real MG.  The summary gives the median ratio per source: link figures from
the own phantom alone flatter the product.

    python benchmarks/bench_codecs.py [--sources] [--codecs jpeg-ls,rle]
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
from medsendx_edge.anonymize.dicomio import decoding_plugin  # noqa: E402
from medsendx_edge.upload.compress import CODECS  # noqa: E402


def images(with_sources: bool) -> list[tuple[str, pydicom.Dataset]]:
    out = []
    if with_sources:
        import sources

        for source in ("films", "independent"):
            out += [(f"{source} {i}", ds) for i, ds in enumerate(sources.base_set(source))]
    for d in (0.1, 0.4, 0.7):
        out.append((f"phantom 12-bit {d:.0%}", phantom_dataset(3328, 2560, spacing_mm=0.085, density=d, seed=7)[0]))
    out.append(("phantom 14-bit raw", phantom_dataset(3328, 2560, spacing_mm=0.085, density=0.4, raw=True, seed=8)[0]))
    data = Path(__import__("data_store").__file__).parent / "data"
    for name in ("RG1_UNCR.dcm", "RG3_UNCR.dcm"):
        if (data / name).exists():
            out.append((name, pydicom.dcmread(data / name)))
    return out


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--sources", action="store_true", help="also the real films and the independent family")
    ap.add_argument("--codecs", default=",".join(CODECS))
    args = ap.parse_args()
    codecs = {c: CODECS[c] for c in args.codecs.split(",")}
    rows = []
    for label, ds in images(args.sources):
        raw = len(ds.PixelData)
        original = ds.pixel_array.copy()
        for codec, ts in codecs.items():
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
            check = pydicom.dcmread(io.BytesIO(data))
            check.pixel_array_options(decoding_plugin=decoding_plugin(ts))
            back = check.pixel_array
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
    print("| source | codec | images | median ratio | range | median encode + decode s | MB saved per CPU s |")
    print("|---|---|---|---|---|---|---|")
    for source in ("phantom 12-bit", "phantom 14-bit", "independent", "films", "RG"):
        for codec in codecs:
            mine = [r for r in rows if r[1] == codec and r[0].startswith(source)]
            if mine:
                print(f"| {source} | {codec} | {len(mine)} | {statistics.median(r[2] for r in mine):.2f} | "
                      f"{min(r[2] for r in mine):.2f}-{max(r[2] for r in mine):.2f} | "
                      f"{statistics.median(r[3] + r[4] for r in mine):.2f} | "
                      f"{statistics.median(r[7] for r in mine):.1f} |")
    return 0


def _bytes(ds: pydicom.Dataset) -> io.BytesIO:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    out.seek(0)
    return out


if __name__ == "__main__":
    sys.exit(main())
