"""A PHI-laden corpus: a unique marker in every Annex E attribute whose VR can hold one.

Markers are ``ZQX`` + 5 digits (text), ``1887MMDD`` dates, ``2.999.<n>`` UIDs;
they sit at the top level, in nested sequences (RequestAttributesSequence,
ReferencedPatientSequence, OtherPatientIDsSequence), in private blocks, in
curves and overlays, after the pixel data, and in the file and folder names.
"""

from __future__ import annotations

import csv
import itertools
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom._uid_dict import UID_dictionary

from medsendx_edge.synthetic import synthetic_mammogram

TEXT_VRS = {"LO", "SH", "PN", "LT", "ST", "UT", "UC", "CS", "AE"}


def profile_rows() -> list[tuple[int, str]]:
    rows = []
    with resources.files("medsendx_edge.data").joinpath("annex_e_basic_profile.tsv").open() as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            if "x" in row["tag"].lower():
                continue
            tag = int(row["tag"], 16)
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                continue
            rows.append((tag, vr))
    return rows


@dataclass
class Markers:
    counter: itertools.count = field(default_factory=lambda: itertools.count(1))
    text: set[str] = field(default_factory=set)
    dates: set[str] = field(default_factory=set)
    uids: set[str] = field(default_factory=set)

    def t(self) -> str:
        m = f"ZQX{next(self.counter):05d}"
        self.text.add(m)
        return m

    def d(self) -> str:
        n = next(self.counter)
        m = f"1887{1 + n % 12:02d}{1 + n % 28:02d}"
        self.dates.add(m)
        return m

    def u(self) -> str:
        m = f"2.999.{next(self.counter)}"
        self.uids.add(m)
        return m

    def all(self) -> set[str]:
        return self.text | self.dates | self.uids


def _value(vr: str, mk: Markers):
    if vr in TEXT_VRS:
        return mk.t()
    if vr == "DA":
        return mk.d()
    if vr == "DT":
        return mk.d() + "101010"
    if vr == "TM":
        return None
    if vr == "UI":
        return mk.u()
    return None


def _phi_item(mk: Markers) -> Dataset:
    item = Dataset()
    item.PatientName = mk.t()
    item.PatientID = mk.t()
    item.IssuerOfPatientID = mk.t()
    item.ReferencedSOPInstanceUID = mk.u()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.AccessionNumber = mk.t()
    item.RequestedProcedureID = mk.t()
    item.StudyInstanceUID = mk.u()
    return item


def add_phi(ds: Dataset, mk: Markers, rows: list[tuple[int, str]]) -> None:
    for tag, vr in rows:
        if tag >> 16 in (0x0000, 0x0002, 0xFFFA, 0xFFFC) or tag in (0x00080016, 0x00080005):
            continue
        if vr == "SQ":
            ds.add_new(tag, "SQ", Sequence([_phi_item(mk)]))
            continue
        value = _value(vr, mk)
        if value is not None:
            ds.add_new(tag, vr, value)
    # Keep the original UIDs in the object (they are original UIDs too) but register them as markers.
    for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if kw in ds:
            mk.uids.add(str(ds[kw].value))
    ds.RequestAttributesSequence = Sequence([_phi_item(mk)])
    ds.ReferencedPatientSequence = Sequence([_phi_item(mk)])
    other = Dataset()
    other.PatientID = mk.t()
    other.IssuerOfPatientID = mk.t()
    ds.OtherPatientIDsSequence = Sequence([other])
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ref.ReferencedSOPInstanceUID = mk.u()
    nested = Dataset()
    nested.ReferencedSOPInstanceUID = mk.u()
    ref.SourceImageSequence = Sequence([nested])
    ds.ReferencedImageSequence = Sequence([ref])
    block = ds.private_block(0x0009, "ACME PHI STORE", create=True)
    block.add_new(0x01, "LO", mk.t())
    block.add_new(0x02, "PN", mk.t())
    ds.add_new(0x50000000 | 0x3000, "OB", mk.t().encode() + b"\x00")  # curve data
    ds.add_new(0x60004000, "LT", mk.t())  # overlay comments
    sig = Dataset()
    sig.DigitalSignatureUID = mk.u()
    sig.add_new(0x04000020, "AT", [0x00100010])
    ds.add_new(0xFFFAFFFA, "SQ", Sequence([sig]))  # stored after the pixel data


def original_uids(ds: Dataset) -> set[str]:
    out = set()

    def walk(d: Dataset) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
            elif elem.VR == "UI" and elem.value:
                vals = elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue)) else [elem.value]
                for v in vals:
                    v = str(v)
                    if v and v not in UID_dictionary:
                        out.add(v)

    walk(ds)
    return out


def build_corpus(src_files: list[Path], out_root: Path, mk: Markers) -> list[Path]:
    """Write PHI-laden copies of readable ``src_files`` plus a shared-study MG series."""
    rows = profile_rows()
    folder = out_root / f"DOE_JANE_{mk.t()}" / f"study_{mk.t()}"
    folder.mkdir(parents=True)
    written = []
    for src in src_files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(src)
                _ = ds.get("PixelData")
                if "TransferSyntaxUID" not in ds.file_meta or ds.file_meta.TransferSyntaxUID.is_deflated:
                    continue
                add_phi(ds, mk, rows)
                mk.uids |= original_uids(ds)
                dest = folder / f"{mk.t()}_{src.name}"
                ds.save_as(dest, enforce_file_format=True)
                pydicom.dcmread(dest)
            except Exception:
                continue
        written.append(dest)
    study, series = f"2.999.{next(mk.counter)}", f"2.999.{next(mk.counter)}"
    mk.uids |= {study, series}
    for i in range(3):
        ds, _ = synthetic_mammogram(64, 48, seed=i, patient_name=mk.t(), patient_id=mk.t(),
                                    study_uid=study, series_uid=series)
        add_phi(ds, mk, rows)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        mk.uids.add(str(ds.SOPInstanceUID))
        dest = folder / f"mammo_{mk.t()}.dcm"
        ds.save_as(dest, enforce_file_format=True)
        written.append(dest)
    return written
