"""C-STORE ingest with dcmtk as the real peer: echoscu and storescu against the daemon's Storage SCP."""

from __future__ import annotations

import shutil
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
    cfg = replace(make_config(tmp_path), dicom_listener=DicomListenerConfig(enabled=True, ae_title="MEDSENDX",
                                                                            bind="127.0.0.1", port=0))
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
