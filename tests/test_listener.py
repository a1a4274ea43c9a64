"""C-STORE ingest with dcmtk as the real peer: echoscu and storescu against the daemon's Storage SCP."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time

import pydicom
import pytest

from conftest import PYDICOM_TEST_FILES, make_config
from medsendx_edge.config import DicomListenerConfig, replace
from medsendx_edge.daemon import Daemon
from medsendx_edge.spool import INCOMING, SENT
from medsendx_edge.synthetic import synthetic_mammogram


@pytest.fixture
def daemon(tmp_path):
    for tool in ("storescu", "echoscu"):
        assert shutil.which(tool), "dcmtk is required (Debian package dcmtk)"
    cfg = replace(make_config(tmp_path), dicom_listener=DicomListenerConfig(
        enabled=True, ae_title="MEDSENDX", bind="127.0.0.1", port=0, allowed_calling_aets=("STORESCU", "ECHOSCU")))
    d = Daemon(cfg)
    d.start()
    yield d
    d.shutdown()


def _wait(pred, timeout=30.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_modality_pushes_by_cstore(daemon, tmp_path):
    port = str(daemon.listener.port)
    echo = subprocess.run(["echoscu", "-aec", "MEDSENDX", "127.0.0.1", port], capture_output=True, text=True,
                          timeout=30)
    assert echo.returncode == 0, echo.stderr
    ds, _ = synthetic_mammogram(128, 104, patient_name="DOE^JANE", patient_id="PID-CSTORE")
    mg = tmp_path / "mg.dcm"
    ds.save_as(mg, enforce_file_format=True)
    proc = subprocess.run(["storescu", "-aec", "MEDSENDX", "127.0.0.1", port, str(mg),
                           str(PYDICOM_TEST_FILES / "CT_small.dcm")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert _wait(lambda: len(daemon.spool.ready(SENT)) == 2)
    for item_id in daemon.spool.ready(SENT):
        out = pydicom.dcmread(daemon.spool.path(SENT, item_id))
        assert out.PatientIdentityRemoved == "YES" and "DOE" not in str(out.PatientName)
        assert out.StationName == "MOBILE_CLINIC_01"
    mg_out = next(pydicom.dcmread(daemon.spool.path(SENT, i)) for i in daemon.spool.ready(SENT)
                  if pydicom.dcmread(daemon.spool.path(SENT, i), stop_before_pixels=True).Modality == "MG")
    assert mg_out.PixelData == ds.PixelData


def test_refuses_while_the_disk_is_low(daemon, tmp_path):
    daemon.cfg = replace(daemon.cfg, min_free_mb=1e12)  # as if the disk were full
    daemon.wake.set()
    assert _wait(lambda: daemon.disk_low)
    proc = subprocess.run(["storescu", "-aec", "MEDSENDX", "127.0.0.1", str(daemon.listener.port),
                           str(PYDICOM_TEST_FILES / "CT_small.dcm")], capture_output=True, text=True, timeout=60)
    assert "a700" in (proc.stdout + proc.stderr).lower() or proc.returncode != 0
    assert daemon.spool.ready(INCOMING) == [] and daemon.spool.ready(SENT) == []


def _storescu(port: int, *files: str, aet: str = "STORESCU") -> subprocess.CompletedProcess:
    return subprocess.run(["storescu", "-aet", aet, "-aec", "MEDSENDX", "127.0.0.1", str(port), *files],
                          capture_output=True, text=True, timeout=60)


def test_a_foreign_calling_ae_is_rejected_and_logged_once(log_lines, daemon, tmp_path):
    ct = str(PYDICOM_TEST_FILES / "CT_small.dcm")
    for _ in range(2):
        proc = _storescu(daemon.listener.port, ct, aet="INTRUDER")
        assert proc.returncode != 0
        assert "calling ae title not recognized" in (proc.stdout + proc.stderr).lower() or \
            "rejected" in (proc.stdout + proc.stderr).lower()
    assert daemon.spool.ready(INCOMING) == [] and not _wait(lambda: daemon.spool.ready(SENT), 1.0)
    lines = [json.loads(x) for x in log_lines.getvalue().splitlines() if '"cstore_rejected"' in x]
    assert len(lines) == 1 and lines[0]["calling_ae"] == "INTRUDER" and lines[0]["peer"].startswith("127.0.0.1:")


def test_idle_sockets_cannot_lock_the_modality_out(tmp_path):
    cfg = replace(make_config(tmp_path), dicom_listener=DicomListenerConfig(
        enabled=True, ae_title="MEDSENDX", bind="127.0.0.1", port=0, allowed_calling_aets=("STORESCU",),
        max_associations=8, acse_timeout_s=1.0))
    d = Daemon(cfg)
    d.start()
    idle = []
    try:
        for _ in range(40):  # a flood of connections that never associate
            s = socket.socket()
            s.connect(("127.0.0.1", d.listener.port))
            idle.append(s)
        t0 = time.time()
        while True:  # the modality gets through within a few ARTIM periods, not 30 s
            proc = _storescu(d.listener.port, str(PYDICOM_TEST_FILES / "CT_small.dcm"))
            if proc.returncode == 0 or time.time() - t0 > 15:
                break
            time.sleep(0.5)
        assert proc.returncode == 0, proc.stderr[-500:]
        assert time.time() - t0 < 10
    finally:
        for s in idle:
            s.close()
        d.shutdown()


def test_listener_binds_loopback_and_needs_an_allow_list():
    from medsendx_edge.config import config_from_dict
    from medsendx_edge.errors import ConfigError

    assert DicomListenerConfig().bind == "127.0.0.1"
    with pytest.raises(ConfigError, match="allowed_calling_aets"):
        config_from_dict({"dicom_listener": {"enabled": True}})


def test_dicom_tls(tmp_path):
    from test_hardening import _self_signed

    cert, key = _self_signed(tmp_path, "localhost")
    cfg = replace(make_config(tmp_path), dicom_listener=DicomListenerConfig(
        enabled=True, ae_title="MEDSENDX", bind="127.0.0.1", port=0, allowed_calling_aets=("STORESCU",),
        tls_cert_file=cert, tls_key_file=key))
    d = Daemon(cfg)
    d.start()
    try:
        ct = str(PYDICOM_TEST_FILES / "CT_small.dcm")
        plain = subprocess.run(["storescu", "-aec", "MEDSENDX", "127.0.0.1", str(d.listener.port), ct],
                               capture_output=True, text=True, timeout=30)
        assert plain.returncode != 0  # no TLS, no association
        tls = subprocess.run(["storescu", "+tla", "+cf", str(cert), "-aec", "MEDSENDX", "127.0.0.1",
                              str(d.listener.port), ct], capture_output=True, text=True, timeout=30)
        assert tls.returncode == 0, tls.stderr[-800:]
        assert _wait(lambda: len(d.spool.ready(SENT)) == 1)
    finally:
        d.shutdown()
