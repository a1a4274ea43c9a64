"""Upload throughput to a loopback Orthanc (STOW-RS), in one run:

* ours: the uploader thread's code path (durable queue, claim, streamed multipart body, verified
  delivery, record, move to sent/), draining an outbox;
* the peer: a plain ``requests`` keep-alive loop that STOW-RSes the same files (body read into memory,
  status code checked, no verification, no bookkeeping).

For 1 MB and 20 MB files; files/s of each, and ours / peer (target >= 0.9).  Orthanc's storage is
emptied between runs, so both store every instance anew.

    python benchmarks/bench_upload.py [--files 30]
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from orthanc_server import OrthancServer  # noqa: E402

from medsendx_edge.config import DestinationConfig, UploadConfig  # noqa: E402
from medsendx_edge.upload.destinations import make_destination  # noqa: E402
from medsendx_edge.logs import configure_logging  # noqa: E402
from medsendx_edge.spool import OUTBOX, Spool, new_id  # noqa: E402
from medsendx_edge.synthetic import synthetic_mammogram  # noqa: E402
from medsendx_edge.upload.uploader import Uploader  # noqa: E402


def make_files(folder: Path, n: int, mb: float) -> list[Path]:
    folder.mkdir(parents=True)
    side = int((mb * 1e6 / 2) ** 0.5)
    out = []
    for i in range(n):
        ds, _ = synthetic_mammogram(side, side, seed=i)
        p = folder / f"{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def clear(orthanc: OrthancServer) -> None:
    for iid in orthanc.get("/instances").json():
        requests.delete(f"{orthanc.url}/instances/{iid}", auth=(orthanc.user, orthanc.password), timeout=30)


def peer_loop(orthanc: OrthancServer, files: list[Path]) -> float:
    s = requests.Session()
    t0 = time.perf_counter()
    for p in files:
        b = secrets.token_hex(16)
        body = f"--{b}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p.read_bytes() + f"\r\n--{b}--\r\n".encode()
        r = s.post(orthanc.dicomweb + "/studies", data=body, auth=(orthanc.user, orthanc.password),
                   headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={b}',
                            "Accept": "application/dicom+json"})
        r.raise_for_status()
    return time.perf_counter() - t0


def ours(orthanc: OrthancServer, files: list[Path], work: Path) -> float:
    spool = Spool(work / "spool")
    spool.ensure_layout()
    for p in files:
        shutil.copyfile(p, spool.path(OUTBOX, new_id()))
    pw = work / "pw"
    pw.write_text(orthanc.password)
    dest = make_destination(DestinationConfig(kind="dicomweb", path=None, url=orthanc.dicomweb,
                                              username=orthanc.user, password_file=pw))
    up = Uploader(spool, dest, UploadConfig())
    up.reconcile()  # queueing (sha256) is the route stage's work, done before upload
    t0 = time.perf_counter()
    while up.step():
        pass
    dt = time.perf_counter() - t0
    assert len(spool.ready("sent")) == len(files), "not all delivered"
    return dt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    configure_logging("warning", "json")
    root = Path(tempfile.mkdtemp(prefix="bench-upload-"))
    orthanc = OrthancServer(root / "orthanc")
    results = {}
    try:
        for mb in (1, 20):
            n = args.files if mb == 1 else max(5, args.files // 4)
            files = make_files(root / f"files{mb}", n, mb)
            best_ours, best_peer = float("inf"), float("inf")
            for r in range(args.repeat):
                clear(orthanc)
                best_peer = min(best_peer, peer_loop(orthanc, files))
                clear(orthanc)
                best_ours = min(best_ours, ours(orthanc, files, root / f"w{mb}-{r}"))
            results[f"{mb}MB"] = {"files": n, "ours_files_s": n / best_ours, "peer_files_s": n / best_peer,
                                  "ratio": best_peer / best_ours}
    finally:
        orthanc.stop()
        shutil.rmtree(root, ignore_errors=True)
    for k, v in results.items():
        print(f"{k:5s} x{v['files']:3d}: ours {v['ours_files_s']:.1f} files/s, requests loop "
              f"{v['peer_files_s']:.1f} files/s, ours/peer = {v['ratio']:.2f} (target >= 0.9)")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "upload.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
