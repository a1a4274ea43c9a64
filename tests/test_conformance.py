"""Anonymizer conformance with PHI-laden input: free text outside the table, coded SR content, deflated
preambles, encapsulated documents, missing PatientIDs, ages over 89, device dates, every option column,
the station code, identifiers that leave the truck, and secrets that cannot silently change."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset

from conftest import make_config
from medsendx_edge.anonymize.profile import Context, anonymize_dataset
from medsendx_edge.anonymize.stage import Anonymizer
from medsendx_edge.config import AnonymizeConfig, config_from_dict
from medsendx_edge.daemon import Daemon
from medsendx_edge.errors import ConfigError
from medsendx_edge.spool import SENT, export_id
from medsendx_edge.synthetic import synthetic_mammogram

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
SECRET = b"s" * 32


def _anon(ds: Dataset, **options) -> Dataset:
    anonymize_dataset(ds, Context.create(SECRET, AnonymizeConfig(**options), "MOBILE_CLINIC_01"))
    return ds


def _bytes(ds: Dataset) -> bytes:
    from io import BytesIO

    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_free_text_outside_the_table_never_survives():
    ds, _ = synthetic_mammogram(32, 32)
    ds.DocumentTitle = "Report for ZZJANE DOE"
    ds.ContentDescription = "Annotations for ZZJANE DOE"
    ds.ContentLabel = "ZZJANEDOE"
    ds.CompletionFlagDescription = "checked by ZZJANE"
    ds.PositionReferenceIndicator = "ZZJANE"
    _anon(ds)
    data = _bytes(ds)
    assert b"ZZJANE" not in data
    assert ds.ContentLabel == "ANONYMIZED"           # Type 1 in presentation states: a dummy
    assert "PositionReferenceIndicator" in ds and not ds.PositionReferenceIndicator  # Type 2: emptied, present
    assert ds.Manufacturer == "SYNTHETIC MEDICAL"     # vetted technical text is kept


def test_sr_keeps_its_coded_content():
    src = pydicom.dcmread(TEST_FILES / "test-SR.dcm")
    ds = _anon(pydicom.dcmread(TEST_FILES / "test-SR.dcm"))

    def codes(d: Dataset) -> list[tuple[str, str, str]]:
        out = []
        for elem in d:
            if elem.keyword == "DeidentificationMethodCodeSequence":
                continue  # the anonymizer's own mark
            if elem.VR == "SQ":
                for item in elem.value:
                    out += codes(item)
        if "CodeValue" in d:
            out.append((str(d.CodeValue), str(d.get("CodingSchemeDesignator")), str(d.get("CodeMeaning"))))
        return out

    content = [codes(item) for item in src.ContentSequence]
    assert sum(map(len, content)) >= 28
    # the report's coded content: every code, scheme and meaning, in order
    assert [codes(item) for item in ds.ContentSequence] == content
    assert not any("ANONYMIZED" in c for triple in codes(ds) for c in triple)
    # an observer's identification code is an identity: emptied (Z), as the table says
    assert "1705" in {c[0] for c in codes(src)} and "1705" not in {c[0] for c in codes(ds)}


def test_deflated_file_gets_a_zero_preamble(tmp_path):
    raw = bytearray((TEST_FILES / "image_dfl.dcm").read_bytes())
    raw[:17] = b"DOE^JANE PID-0001"
    src = tmp_path / "dfl.dcm"
    src.write_bytes(bytes(raw))
    anon = Anonymizer(make_config(tmp_path, anonymize={"burned_in": "allow"}), durable=False)
    out = tmp_path / "out.dcm"
    with open(out, "wb") as fh:
        anon.write(anon.prepare(src), fh)
    data = out.read_bytes()
    assert data[:128] == b"\0" * 128 and b"DOE^JANE" not in data
    assert pydicom.dcmread(out).pixel_array.shape == pydicom.dcmread(TEST_FILES / "image_dfl.dcm").pixel_array.shape


def test_encapsulated_document_length_follows_the_document():
    ds, _ = synthetic_mammogram(16, 16)
    del ds.PixelData
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    ds.EncapsulatedDocument = b"%PDF-1.4 Report for ZZJANE DOE\n%%EOF\n"
    ds.EncapsulatedDocumentLength = len(ds.EncapsulatedDocument)
    _anon(ds)
    assert b"ZZJANE" not in _bytes(ds)
    assert ds.EncapsulatedDocumentLength == len(ds.EncapsulatedDocument)


def test_missing_patient_id_gives_each_study_its_own_patient():
    def mammo(study: str, seed: int) -> Dataset:
        ds, _ = synthetic_mammogram(16, 16, seed=seed, study_uid=study)
        del ds.PatientID
        return _anon(ds, retain_longitudinal="modified_dates")

    a1, a2, b = mammo("1.2.3.100", 1), mammo("1.2.3.100", 1), mammo("1.2.3.200", 1)
    assert a1.PatientID == a2.PatientID != b.PatientID
    assert a1.StudyDate == a2.StudyDate  # one study, one shift
    src = synthetic_mammogram(16, 16, seed=1)[0].StudyDate
    assert a1.StudyDate != src and b.StudyDate != a1.StudyDate  # shifted, and not by the same offset


def test_ages_over_89_are_aggregated_when_kept():
    old, _ = synthetic_mammogram(16, 16)
    old.PatientAge = "093Y"
    young, _ = synthetic_mammogram(16, 16)
    young.PatientAge = "045Y"
    assert _anon(old, retain_patient_characteristics=True).PatientAge == "090Y"
    assert _anon(young, retain_patient_characteristics=True).PatientAge == "045Y"


def test_device_dates_never_carry_the_patients_offset():
    def with_calibration(**options) -> Dataset:
        ds, _ = synthetic_mammogram(16, 16)
        ds.DateOfLastCalibration = "20260101"
        return _anon(ds, retain_longitudinal="modified_dates", **options)

    assert "DateOfLastCalibration" not in with_calibration()
    kept = with_calibration(retain_device_identity=True)
    assert kept.DateOfLastCalibration == "20260101"  # the device's own date, unshifted
    assert kept.AcquisitionDate != synthetic_mammogram(16, 16)[0].AcquisitionDate  # the patient's, shifted


@pytest.mark.parametrize("option, keyword, value, expect", [
    ("retain_patient_characteristics", "PatientSize", "1.62", "1.62"),
    ("retain_device_identity", "DeviceSerialNumber", "SN-4711", "SN-4711"),
    ("retain_institution_identity", "InstitutionName", "Mobile Screening Unit", "Mobile Screening Unit"),
    ("clean_descriptors", "SeriesDescription", "L CC ZZJANE DOE", "L CC"),
])
def test_each_option_column_touches_its_own_attribute(option, keyword, value, expect):
    base, _ = synthetic_mammogram(16, 16)
    setattr(base, keyword, value)
    assert keyword not in _anon(base) or str(getattr(base, keyword)) in ("", "ANONYMIZED")
    ds, _ = synthetic_mammogram(16, 16)
    setattr(ds, keyword, value)
    assert str(getattr(_anon(ds, **{option: True}), keyword)) == expect


@pytest.mark.parametrize("mode, same", [("full_dates", True), ("modified_dates", False)])
def test_longitudinal_options(mode, same):
    src, _ = synthetic_mammogram(16, 16)
    ds = _anon(synthetic_mammogram(16, 16)[0], retain_longitudinal=mode)
    assert (ds.AcquisitionDate == src.AcquisitionDate) is same
    assert "PatientBirthDate" not in ds or ds.PatientBirthDate in (None, "", "19000101")  # never kept


def test_station_code_within_sh():
    with pytest.raises(ConfigError, match="at most 16 characters"):
        config_from_dict({"station_name": "REMOTE_MOBILE_CLINIC_01"})


def test_nothing_that_leaves_carries_the_ingest_time(tmp_path):
    cfg = make_config(tmp_path)
    cfg.inbox.mkdir(parents=True)
    synthetic_mammogram(64, 64)[0].save_as(cfg.inbox / "m.dcm", enforce_file_format=True)
    os.utime(cfg.inbox / "m.dcm", (0, 0))
    daemon = Daemon(cfg)
    assert daemon.run_once() == 0
    (item_id,) = daemon.spool.ready(SENT)
    (archived,) = (tmp_path / "archive").iterdir()
    assert archived.name == f"{export_id(item_id)}.dcm" and item_id[:12] not in archived.name
    from medsendx_edge.triage.features import write_rows

    rows = daemon.triage_stage.features.rows()
    out = write_rows(rows, tmp_path / "rows.csv")
    text = out.read_text()
    assert item_id not in text and export_id(item_id) in text
    import csv

    (row,) = list(csv.DictReader(text.splitlines()))
    assert float(row["recorded"]) % 86400 == 0  # the day, not the millisecond


def test_secrets_cannot_silently_change(tmp_path):
    cfg = make_config(tmp_path)
    cfg.inbox.mkdir(parents=True)
    synthetic_mammogram(32, 32)[0].save_as(cfg.inbox / "m.dcm", enforce_file_format=True)
    os.utime(cfg.inbox / "m.dcm", (0, 0))
    assert Daemon(cfg).run_once() == 0
    cfg.anonymize.secret_file.unlink()  # lost, or the daemon started where a relative path misses it
    with pytest.raises(ConfigError, match="already holds pseudonymized data"):
        Daemon(cfg)
    assert not cfg.anonymize.secret_file.exists()  # no new secret was made
    # reidentify never creates a key: a mistyped linkage_key_file is an error, not a new empty key
    conf = tmp_path / "c.yaml"
    conf.write_text(json.dumps({"spool_dir": str(cfg.spool_dir), "anonymize": {
        "secret_file": str(tmp_path / "other.key"), "linkage_key_file": str(tmp_path / "typo.key")}}))
    proc = subprocess.run([sys.executable, "-m", "medsendx_edge.cli", "reidentify", "--config", str(conf), "MSX0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and not (tmp_path / "typo.key").exists()


def test_station_code_is_declared():
    ds = _anon(synthetic_mammogram(16, 16)[0])
    assert ds.StationName == "MOBILE_CLINIC_01"
    assert "StationName: fleet station code" in list(ds.DeidentificationMethod)
