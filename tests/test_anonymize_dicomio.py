"""Reading a file around its pixel data and writing it back: the header parsed to the pixels, the pixel
bytes copied untouched, every kind of cut or foreign file named, unfinished files told apart."""

from __future__ import annotations

import io
import os

import pydicom
import pytest

from conftest import PYDICOM_TEST_FILES
from medsendx_edge.anonymize.dicomio import incomplete_reason, read_split, write_split
from medsendx_edge.errors import QuarantineError
from medsendx_edge.synthetic import synthetic_mammogram


@pytest.fixture
def mammogram(tmp_path):
    ds, _ = synthetic_mammogram(256, 208, seed=1)
    path = tmp_path / "m.dcm"
    ds.save_as(path, enforce_file_format=True)
    return ds, path


def test_split_finds_the_pixel_data_and_writing_back_is_byte_identical(mammogram):
    ds, path = mammogram
    split = read_split(path)
    data = path.read_bytes()
    assert "PixelData" not in split.dataset and split.dataset.Rows == 256
    assert data[split.pixel_start:split.pixel_start + 4] == b"\xe0\x7f\x10\x00"   # (7FE0,0010)
    assert split.pixel_end == len(data) and split.trailing is None
    out = io.BytesIO()
    write_split(split, out)
    assert out.getvalue() == data


def test_a_changed_header_keeps_the_pixel_bytes(mammogram):
    ds, path = mammogram
    split = read_split(path)
    split.dataset.PatientName = "ANON^X"
    out = io.BytesIO()
    write_split(split, out)
    back = pydicom.dcmread(io.BytesIO(out.getvalue()))
    assert back.PatientName == "ANON^X" and back.PixelData == ds.PixelData


@pytest.mark.parametrize("make, error_class", [
    (lambda d: b"", "EmptyFile"),
    (lambda d: b"hello, not DICOM" * 20, "NotDicom"),
    (lambda d: d[: len(d) // 2], "Truncated"),
    (lambda d: d[:200], "Truncated"),              # inside the file meta group
])
def test_bad_files_are_named(tmp_path, mammogram, make, error_class):
    _, path = mammogram
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(make(path.read_bytes()))
    with pytest.raises(QuarantineError) as err:
        read_split(bad)
    assert err.value.error_class == error_class and err.value.reason


def test_symlinks_are_not_followed(tmp_path, mammogram):
    _, path = mammogram
    os.symlink(path, tmp_path / "link.dcm")
    with pytest.raises(QuarantineError) as err:
        read_split(tmp_path / "link.dcm")
    assert err.value.error_class == "Symlink"


def test_unfinished_files_are_told_apart_from_finished_and_foreign_ones(tmp_path, mammogram):
    ds, path = mammogram
    data = path.read_bytes()
    cases = {"whole": data, "half": data[: len(data) // 2], "preamble": b"\0" * 100,
             "header_only": data[: read_split(path).pixel_start], "text": b"plain text, never DICOM" * 10,
             "meta_cut": data[:200]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    assert incomplete_reason(tmp_path / "whole") is None
    assert incomplete_reason(tmp_path / "text") is None          # waiting will not make it DICOM
    assert incomplete_reason(tmp_path / "half")
    assert incomplete_reason(tmp_path / "meta_cut") == "truncated: the file meta information"
    assert incomplete_reason(tmp_path / "preamble") == "shorter than a DICOM preamble"
    assert "without pixel data" in incomplete_reason(tmp_path / "header_only")


def test_a_real_compressed_file_round_trips(tmp_path):
    src = PYDICOM_TEST_FILES / "JPEG2000.dcm"
    split = read_split(src)
    out = io.BytesIO()
    write_split(split, out)
    assert pydicom.dcmread(io.BytesIO(out.getvalue())).PixelData == pydicom.dcmread(src).PixelData
