"""The anonymizer against a PHI-laden corpus: raw output bytes and names are scanned for every marker."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from conftest import all_pydicom_files, make_config
from phi_corpus import Markers, build_corpus
from medsendx_edge.anonymize.profile import Context, anonymize_dataset
from medsendx_edge.anonymize.stage import Anonymizer
from medsendx_edge.config import AnonymizeConfig
from medsendx_edge.anonymize.dicomio import read_split
from medsendx_edge.errors import QuarantineError
from medsendx_edge.anonymize.linkage import LinkageStore
from medsendx_edge.synthetic import synthetic_mammogram

ID_NAME = re.compile(r"^[0-9a-f]{24}\.dcm$")


def found_markers(data: bytes, mk: Markers) -> set[str]:
    """Every marker present in ``data`` (text, dates, and UIDs as whole tokens)."""
    hits = {m.decode() for m in re.findall(rb"ZQX\d{5}", data)} & mk.text
    hits |= {m.decode() for m in re.findall(rb"(?<![0-9.])1887\d{4}", data)} & mk.dates
    hits |= {m.decode() for m in re.findall(rb"[0-9]+(?:\.[0-9]+)+", data)} & mk.uids
    return hits


def _pixel_bytes(path: Path) -> bytes | None:
    ds = pydicom.dcmread(path)
    return ds.get("PixelData")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi")
    mk = Markers()
    srcs = [p for p in all_pydicom_files() if p.suffix == ".dcm"]
    files = build_corpus(srcs, root / "in", mk)
    cfg = make_config(root, anonymize={"burned_in": "allow"})
    out = root / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "medsendx_edge.cli", "anonymize", str(root / "in"), str(out)],
        env={**os.environ, "MEDSENDX_EDGE_CONFIG": str(_write_cfg(root, cfg))},
        capture_output=True, text=True, timeout=300)
    return root, mk, files, out, proc, cfg


def _write_cfg(root: Path, cfg) -> Path:
    import yaml

    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump({
        "station_name": cfg.station_name,
        "spool_dir": str(cfg.spool_dir),
        "log": {"format": "json", "level": "info"},
        "anonymize": {"secret_file": str(cfg.anonymize.secret_file),
                      "linkage_key_file": str(cfg.anonymize.linkage_key_file), "burned_in": "allow"},
    }))
    return path


def test_corpus_is_substantial(corpus):
    _root, mk, files, _out, _proc, _cfg = corpus
    assert len(files) >= 60
    assert len(mk.text) > 10_000


def test_every_input_is_written_or_reported(corpus):
    _root, _mk, files, out, proc, _cfg = corpus
    written = list(out.iterdir())
    reported = [line for line in proc.stderr.splitlines() if "not anonymized" in line]
    assert len(written) + len(reported) == len(files)
    assert len(written) >= len(files) - 5
    assert proc.returncode == (1 if reported else 0)


def test_no_marker_survives_in_bytes_or_names(corpus):
    root, mk, _files, out, proc, cfg = corpus
    leaks = []
    for path in out.iterdir():
        assert ID_NAME.match(path.name), "output names are generated ids"
        leaks.extend((path.name, m) for m in found_markers(path.read_bytes(), mk))
    assert leaks == []
    assert found_markers((proc.stdout + proc.stderr).encode(), mk) == set()
    # The state folder holds the linkage table: encrypted, so no marker in its raw bytes either.
    for f in (cfg.spool_dir / "state").iterdir():
        assert found_markers(f.read_bytes(), mk) == set(), f.name


def test_outputs_are_valid_and_marked(corpus):
    _root, _mk, _files, out, _proc, _cfg = corpus
    for path in out.iterdir():
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.SOPInstanceUID.startswith("2.25.")
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert ds.StationName == "MOBILE_CLINIC_01"
        assert ds.LongitudinalTemporalInformationModified == "REMOVED"
        assert not any(elem.tag.is_private for elem in ds.iterall())
        assert not any(elem.tag.group & 0xFF00 in (0x5000, 0x6000) for elem in ds)


def test_study_and_series_grouping_kept(corpus):
    _root, _mk, _files, out, _proc, _cfg = corpus
    mg = [pydicom.dcmread(p, stop_before_pixels=True) for p in out.iterdir()]
    mg = [d for d in mg if d.get("Modality") == "MG"]
    assert len(mg) == 3
    assert len({d.StudyInstanceUID for d in mg}) == 1
    assert len({d.SeriesInstanceUID for d in mg}) == 1
    assert len({d.SOPInstanceUID for d in mg}) == 3
    assert len({d.PatientID for d in mg}) == 3  # three different fake patients


def test_pixel_bytes_identical(corpus):
    _root, _mk, files, out, _proc, _cfg = corpus
    originals = {}
    for f in files:
        px = _pixel_bytes(f)
        if px:
            originals.setdefault(px, f)
    seen = 0
    for path in out.iterdir():
        px = _pixel_bytes(path)
        if px:
            assert px in originals
            seen += 1
    assert seen >= 40


def test_trailing_elements_are_anonymized_without_touching_pixels(tmp_path):
    cfg = make_config(tmp_path)
    ds, _ = synthetic_mammogram(32, 24, patient_name="SECRET^TRAILING")
    sig = Dataset()
    sig.DigitalSignatureUID = "2.999.777.1"
    ds.add_new(0xFFFAFFFA, "SQ", [sig])
    ds.add_new(0xFFFCFFFC, "OB", b"ZQXTRAIL")
    src = tmp_path / "in.dcm"
    ds.save_as(src, enforce_file_format=True)
    split = read_split(src)
    assert split.trailing is not None and 0xFFFAFFFA in split.trailing
    anonymizer = Anonymizer(cfg)
    prepared = anonymizer.prepare(src)
    out = tmp_path / "out.dcm"
    with open(out, "wb") as fh:
        anonymizer.write(prepared, fh)
    data = out.read_bytes()
    assert b"ZQXTRAIL" not in data and b"2.999.777.1" not in data and b"SECRET" not in data
    back = pydicom.dcmread(out)
    assert back.PixelData == ds.PixelData


def test_pseudonyms_consistent_across_restarts_and_trucks(tmp_path):
    ds1, _ = synthetic_mammogram(16, 16, patient_id="P-42", seed=1)
    cfg_a = make_config(tmp_path / "a")
    a1 = Anonymizer(cfg_a)
    a2 = Anonymizer(cfg_a)  # a restart: the secret file is read back
    cfg_b = make_config(tmp_path / "b")
    cfg_b.anonymize.secret_file.parent.mkdir(parents=True)
    cfg_b.anonymize.secret_file.write_bytes(cfg_a.anonymize.secret_file.read_bytes())
    b = Anonymizer(cfg_b)  # another truck sharing the secret
    assert a1.ctx.uid(ds1.SOPInstanceUID) == a2.ctx.uid(ds1.SOPInstanceUID) == b.ctx.uid(ds1.SOPInstanceUID)
    assert a1.ctx.patient_pseudonym("P-42") == b.ctx.patient_pseudonym("P-42")
    mode = stat.S_IMODE(os.stat(cfg_a.anonymize.secret_file).st_mode)
    assert mode == 0o600
    other = make_config(tmp_path / "c")
    assert Anonymizer(other).ctx.uid(ds1.SOPInstanceUID) != a1.ctx.uid(ds1.SOPInstanceUID)


def _ctx(**opts) -> Context:
    return Context.create(b"k" * 32, AnonymizeConfig(**opts), "STATION")


def test_options_retain_what_they_say():
    ds, _ = synthetic_mammogram(16, 16, patient_id="P-7")
    ds.DeviceSerialNumber = "SN123"
    ds.SeriesDescription = "L MLO John Smith"
    ctx = _ctx(retain_patient_characteristics=True, retain_device_identity=True,
               retain_institution_identity=True, clean_descriptors=True, retain_longitudinal="full_dates")
    anonymize_dataset(ds, ctx)
    assert ds.PatientAge == "061Y" and ds.PatientSex == "F"
    assert ds.DeviceSerialNumber == "SN123"
    assert ds.InstitutionName == "Mobile Screening Unit"
    assert ds.StudyDate == "20261102"
    assert ds.SeriesDescription == "L MLO"  # the name is cleaned out
    assert ds.LongitudinalTemporalInformationModified == "UNMODIFIED"
    codes = {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}
    assert codes == {"113100", "113105", "113106", "113108", "113109", "113112"}
    assert not ds.PatientBirthDate  # not a characteristic the option keeps


def test_defaults_remove_characteristics_and_dates():
    ds, _ = synthetic_mammogram(16, 16)
    anonymize_dataset(ds, _ctx())
    assert "PatientAge" not in ds and ds.DeviceSerialNumber == "ANONYMIZED"
    assert not ds.StudyDate and ds.InstitutionName == "ANONYMIZED"
    assert ds.PatientName == ds.PatientID and ds.PatientID.startswith("MSX")


def test_modified_dates_shift_per_patient_and_keep_intervals():
    a1, _ = synthetic_mammogram(16, 16, patient_id="P-1", seed=0)
    a2, _ = synthetic_mammogram(16, 16, patient_id="P-1", seed=5)
    b, _ = synthetic_mammogram(16, 16, patient_id="P-2", seed=0)
    ctx = _ctx(retain_longitudinal="modified_dates")
    for d in (a1, a2, b):
        anonymize_dataset(d, ctx)
    import datetime as dt

    def day(s: str) -> dt.date:
        return dt.datetime.strptime(s, "%Y%m%d").date()

    assert (day(a2.StudyDate) - day(a1.StudyDate)).days == 5  # interval kept
    assert a1.StudyDate != "20261102" and b.StudyDate != a1.StudyDate
    assert a1.LongitudinalTemporalInformationModified == "MODIFIED"
    assert "113107" in {i.CodeValue for i in a1.DeidentificationMethodCodeSequence}


def test_patient_name_empty_option():
    ds, _ = synthetic_mammogram(16, 16)
    anonymize_dataset(ds, _ctx(patient_name="empty"))
    assert not ds.PatientName


def test_safe_private_list():
    ds, _ = synthetic_mammogram(16, 16)
    keep = ds.private_block(0x0019, "SAFE VENDOR", create=True)
    keep.add_new(0x10, "DS", "1.5")
    keep.add_new(0x11, "LO", "ZQXUNSAFE")
    anonymize_dataset(ds, _ctx(retain_safe_private=True, safe_private_tags=("0019,10,SAFE VENDOR",)))
    block = ds.private_block(0x0019, "SAFE VENDOR")
    assert block[0x10].value == "1.5"
    assert 0x00191011 not in ds


def test_burned_in_quarantined_by_default(tmp_path):
    ds, _ = synthetic_mammogram(16, 16)
    ds.BurnedInAnnotation = "YES"
    src = tmp_path / "burned.dcm"
    ds.save_as(src, enforce_file_format=True)
    with pytest.raises(QuarantineError, match="BurnedInAnnotation"):
        Anonymizer(make_config(tmp_path)).prepare(src)
    Anonymizer(make_config(tmp_path / "allow", anonymize={"burned_in": "allow"})).prepare(src)


def test_reidentify_and_export_linkage(tmp_path):
    cfg = make_config(tmp_path)
    ds, _ = synthetic_mammogram(16, 16, patient_name="DOE^JANE", patient_id="PID-77")
    src = tmp_path / "x.dcm"
    ds.save_as(src, enforce_file_format=True)
    prepared = Anonymizer(cfg).prepare(src)
    new = prepared.split.dataset
    env = {**os.environ, "MEDSENDX_EDGE_CONFIG": str(_write_cfg(tmp_path, cfg))}
    for key in (new.PatientID, new.StudyInstanceUID, new.SOPInstanceUID):
        proc = subprocess.run([sys.executable, "-m", "medsendx_edge.cli", "reidentify", key], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        rec = json.loads(proc.stdout)[0]
        assert rec["original_patient_id"] == "PID-77" and rec["original_patient_name"] == "DOE^JANE"
        assert rec["original_study_uid"] == ds.StudyInstanceUID
    raw = (cfg.spool_dir / "state" / "linkage.db").read_bytes()
    assert b"PID-77" not in raw and b"DOE^JANE" not in raw
    assert stat.S_IMODE(os.stat(cfg.anonymize.linkage_key_file).st_mode) == 0o600
    out = tmp_path / "linkage.export"
    proc = subprocess.run([sys.executable, "-m", "medsendx_edge.cli", "export-linkage", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert b"PID-77" not in out.read_bytes()
    records = LinkageStore(cfg.spool_dir / "state" / "linkage.db", cfg.anonymize.linkage_key_file)
    from cryptography.fernet import Fernet

    data = json.loads(Fernet(cfg.anonymize.linkage_key_file.read_bytes().strip()).decrypt(out.read_bytes()))
    assert data[0]["original_patient_id"] == "PID-77"
    assert records.lookup("2.25.0") == []


@pytest.mark.parametrize("path", all_pydicom_files(), ids=lambda p: p.name)
def test_every_bundled_file_is_anonymized_or_refused(tmp_path_factory, path):
    tmp = tmp_path_factory.getbasetemp() / "bundled"
    global _BUNDLED
    if _BUNDLED is None:
        _BUNDLED = Anonymizer(make_config(tmp, anonymize={"burned_in": "allow"}))
    try:
        prepared = _BUNDLED.prepare(path)
    except QuarantineError as exc:
        assert exc.reason
        return
    out = tmp / f"{path.name}.out"
    with open(out, "wb") as fh:
        _BUNDLED.write(prepared, fh)
    back = pydicom.dcmread(out)
    assert back.PatientIdentityRemoved == "YES"


_BUNDLED = None
