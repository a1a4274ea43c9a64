"""DIMSE throughput: the DIMSE destination (one association, files streamed as stored) against dcmtk's
``storescu`` sending the same files to the same loopback Orthanc in one association.  Rounds interleaved,
each to a fresh Orthanc, medians; for Orthanc's default maximum PDU (16 KB: every sender cuts a 10 MB
image into 640 PDUs, and ours pays Python's cost per PDU) and for a PACS that takes 128 KB PDUs.

    python benchmarks/bench_dimse.py [--files 20] [--rounds 3] [--pdu 16384 131072]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from orthanc_server import OrthancServer  # noqa: E402

from medsendx_edge.config import DestinationConfig  # noqa: E402
from medsendx_edge.triage.phantom import phantom_dataset  # noqa: E402
from medsendx_edge.upload.destinations import make_destination  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pdu", type=int, nargs="+", default=[16384, 131072], help="the PACS's maximum PDU length")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(args.files):
            ds, _ = phantom_dataset(2560, 2048, spacing_mm=0.1, density=0.3, seed=i)
            p = Path(tmp) / f"m{i}.dcm"
            ds.save_as(p, enforce_file_format=True)
            files.append(p)
        mb = sum(p.stat().st_size for p in files) / 1e6
        print(f"{len(files)} files, {mb:.0f} MB, to a loopback Orthanc over C-STORE, medians of {args.rounds}")
        for pdu in args.pdu:
            ours, dcmtk = [], []
            for r in range(args.rounds):
                extra = {"MaximumPduLength": pdu}
                orthanc = OrthancServer(Path(tmp) / f"o{pdu}-{r}a", extra=extra)
                try:
                    dest = make_destination(DestinationConfig(kind="dimse", path=None, host="127.0.0.1",
                                                              port=orthanc.dicom_port, called_aet="ORTHANC"))
                    t0 = time.perf_counter()
                    for n, p in enumerate(files):
                        dest.send(p, f"{n:024x}", "")
                    ours.append(time.perf_counter() - t0)
                    dest.close()
                    assert orthanc.instance_count() == len(files)
                finally:
                    orthanc.stop()
                orthanc = OrthancServer(Path(tmp) / f"o{pdu}-{r}b", extra=extra)
                try:
                    t0 = time.perf_counter()
                    subprocess.run(["storescu", "-aec", "ORTHANC", "127.0.0.1", str(orthanc.dicom_port),
                                    *map(str, files)], check=True, capture_output=True)
                    dcmtk.append(time.perf_counter() - t0)
                    assert orthanc.instance_count() == len(files)
                finally:
                    orthanc.stop()
            o, d = statistics.median(ours), statistics.median(dcmtk)
            print(f"  PACS maximum PDU {pdu // 1024} KB:")
            print(f"    ours (DIMSE destination)  {o:6.2f} s  {len(files) / o:6.1f} files/s")
            print(f"    dcmtk storescu            {d:6.2f} s  {len(files) / d:6.1f} files/s")
            print(f"    ours / storescu throughput = {d / o:.2f} (target >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
