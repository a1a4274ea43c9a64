"""Anonymization throughput, whole processes, side by side in one run.

Over one folder (20 synthetic 16-bit mammograms 2560x3328 plus pydicom's readable bundled files):
ours (`medsendx-edge anonymize`) against dicognito, dicom-anonymizer and deid (their own venv, from
benchmarks/requirements-peers.txt), a pydicom read + write of every file with no change, and a plain copy
(the floor).  Each command runs REPEAT times; the median wall time is reported, and ratios against ours.

    python benchmarks/bench_anonymize.py [--mammograms 20] [--repeat 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

PYDICOM_RW = """
import os, sys, pydicom, warnings
warnings.simplefilter("ignore")
src, dst = sys.argv[1], sys.argv[2]
for root, _d, files in os.walk(src):
    for i, f in enumerate(files):
        try:
            ds = pydicom.dcmread(os.path.join(root, f))
            ds.save_as(os.path.join(dst, f"{i}_{f}"))
        except Exception as exc:
            print(f, type(exc).__name__, file=sys.stderr)
"""

DEID = """
import os, sys, warnings, logging
warnings.simplefilter("ignore")
from deid.dicom import get_files, replace_identifiers
from deid.logger import bot
bot.level = 0
files = list(get_files(sys.argv[1]))
replace_identifiers(dicom_files=files, save=True, output_folder=sys.argv[2], overwrite=True)
"""


def peers_venv(path: Path) -> Path:
    py = path / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", "-r", str(HERE / "requirements-peers.txt")],
                       check=True)
    return path


def make_input(folder: Path, n_mammo: int) -> tuple[int, int]:
    import pydicom
    import pydicom.data

    from medsendx_edge.synthetic import synthetic_mammogram

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_mammo):
        ds, _ = synthetic_mammogram(3328, 2560, seed=i, patient_id=f"PID{i:04d}", patient_name=f"DOE^JANE{i}")
        ds.save_as(folder / f"mammo_{i:02d}.dcm", enforce_file_format=True)
    src = Path(pydicom.data.__file__).parent / "test_files"
    for p in sorted(src.glob("*.dcm")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(p)
                _ = ds.PixelData if "PixelData" in ds else None
                if "SOPInstanceUID" not in ds or "TransferSyntaxUID" not in ds.file_meta:
                    continue
            except Exception:
                continue
        shutil.copyfile(p, folder / p.name)
    files = list(folder.iterdir())
    return len(files), sum(f.stat().st_size for f in files)


def timed(cmd: list[str], out: Path, env: dict | None = None) -> tuple[float, int, int]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env={**os.environ, **(env or {})})
    dt = time.perf_counter() - t0
    n = sum(len(fs) for _r, _d, fs in os.walk(out))
    return dt, n, proc.returncode


def in_process(inp: Path, work: Path, cfg_path: Path) -> dict[str, float]:
    """Per-file cost without process start-up: the mammograms, ours against shutil.copyfile and a
    pydicom read + write, in this process (best of 3 passes each)."""
    import pydicom

    from medsendx_edge.anonymize.stage import Anonymizer
    from medsendx_edge.config import load_config
    from medsendx_edge.logs import quiet_pydicom
    from medsendx_edge.fsutil import atomic_write

    quiet_pydicom()
    anonymizer = Anonymizer(load_config(cfg_path), durable=False)
    files = sorted(inp.glob("mammo_*.dcm"))
    out = work / "inproc"
    out.mkdir(exist_ok=True)

    def ours() -> None:
        for i, f in enumerate(files):
            prepared = anonymizer.prepare(f)
            atomic_write(out / f"{i}.dcm", lambda fh: anonymizer.write(prepared, fh), durable=False)

    def copy() -> None:
        for i, f in enumerate(files):
            shutil.copyfile(f, out / f"{i}.dcm")

    def rw() -> None:
        for i, f in enumerate(files):
            pydicom.dcmread(f).save_as(out / f"{i}.dcm")

    best = {}
    for name, fn in (("ours", ours), ("copyfile", copy), ("pydicom_rw", rw)):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        best[name] = min(times) / len(files) * 1000
    print(f"\nin process, per mammogram (2560x3328, 17 MB): ours {best['ours']:.1f} ms, "
          f"shutil.copyfile {best['copyfile']:.1f} ms, pydicom read+write {best['pydicom_rw']:.1f} ms; "
          f"ours / copy = {best['ours'] / best['copyfile']:.2f}x, pydicom r+w / ours = "
          f"{best['pydicom_rw'] / best['ours']:.2f}x")
    shutil.rmtree(out)
    return best


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mammograms", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", type=Path, default=REPO / "var" / "bench-anonymize")
    ap.add_argument("--peers-venv", type=Path, default=REPO / "var" / "bench-peers-venv")
    args = ap.parse_args()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    inp = work / "in"
    n_files, n_bytes = make_input(inp, args.mammograms)
    venv = peers_venv(args.peers_venv)
    pbin = venv / "bin"
    cfg = work / "cfg.yaml"
    cfg.write_text(
        f"spool_dir: {work / 'spool'}\nlog: {{format: json, level: warning}}\n"
        f"anonymize: {{secret_file: {work / 'site.key'}, linkage_key_file: {work / 'linkage.key'}, burned_in: allow}}\n")
    (work / "pydicom_rw.py").write_text(PYDICOM_RW)
    (work / "deid_run.py").write_text(DEID)
    out = work / "out"
    commands = {
        "medsendx-edge": [sys.executable, "-m", "medsendx_edge.cli", "anonymize", str(inp), str(out),
                          "--config", str(cfg)],
        "dicognito": [str(pbin / "python"), "-m", "dicognito", "--quiet", "--assume-burned-in-annotation", "never",
                      "-o", str(out), str(inp)],
        "dicom-anonymizer": [str(pbin / "dicom-anonymizer"), str(inp), str(out)],
        "deid": [str(pbin / "python"), str(work / "deid_run.py"), str(inp), str(out)],
        "pydicom read+write": [str(pbin / "python"), str(work / "pydicom_rw.py"), str(inp), str(out)],
        "medsendx-edge --fsync": [sys.executable, "-m", "medsendx_edge.cli", "anonymize", str(inp), str(out),
                                  "--config", str(cfg), "--fsync"],
        "plain copy (floor)": ["cp", "-r", f"{inp}/.", str(out)],
    }
    results = {}
    for name, cmd in commands.items():
        times, outs, rcs = [], [], []
        for _ in range(args.repeat):
            dt, n, rc = timed(cmd, out)
            times.append(dt)
            outs.append(n)
            rcs.append(rc)
        results[name] = {"median_s": statistics.median(times), "times_s": times, "files_out": outs[-1],
                         "exit": rcs[-1]}
    ours = results["medsendx-edge"]["median_s"]
    print(f"\ninput: {n_files} files, {n_bytes / 1e6:.0f} MB ({args.mammograms} synthetic mammograms 2560x3328 "
          f"+ pydicom's readable files); median of {args.repeat} runs\n")
    print("| tool | median s | MB/s | files out | exit | time / ours |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['median_s']:.2f} | {n_bytes / 1e6 / r['median_s']:.0f} | {r['files_out']}/{n_files} | "
              f"{r['exit']} | {r['median_s'] / ours:.2f} |")
    peers = [results[k]["median_s"] for k in ("dicognito", "dicom-anonymizer", "deid")]
    floor = results["plain copy (floor)"]["median_s"]
    summary = {"fastest_peer_over_ours": min(peers) / ours, "ours_over_copy": ours / floor,
               "files": n_files, "bytes": n_bytes, "results": results}
    print(f"\nfastest peer / ours = {summary['fastest_peer_over_ours']:.2f}x (target >= 2)")
    print(f"ours / plain copy  = {summary['ours_over_copy']:.2f}x (target <= 1.5)")
    summary["in_process_mammograms"] = in_process(inp, work, cfg)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "anonymize.json").write_text(json.dumps(summary, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
