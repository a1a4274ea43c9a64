from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pydicom.data
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from medsendx_edge.config import AnonymizeConfig, Config, DestinationConfig, LogConfig, UploadConfig, WatchConfig
from medsendx_edge.logs import configure_logging

PYDICOM_TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def all_pydicom_files() -> list[Path]:
    """Every file pydicom bundles (176 in pydicom 3.0.2), DICOM or not."""
    out = []
    for dirpath, dirnames, filenames in os.walk(PYDICOM_TEST_FILES):
        dirnames.sort()
        out.extend(Path(dirpath) / f for f in sorted(filenames))
    return out


def make_config(tmp: Path, **over) -> Config:
    anon = over.pop("anonymize", {})
    return Config(
        station_name=over.pop("station_name", "REMOTE_MOBILE_CLINIC_01"),
        spool_dir=tmp / "spool",
        watch=over.pop("watch", WatchConfig(mode="native", stable_seconds=0.05, rescan_seconds=1)),
        destination=over.pop("destination", DestinationConfig(kind="directory", path=tmp / "archive")),
        upload=over.pop("upload", UploadConfig(initial_backoff_s=0.05, max_backoff_s=0.5)),
        log=LogConfig(format="json", level="debug"),
        anonymize=AnonymizeConfig(secret_file=tmp / "secrets" / "site.key",
                                  linkage_key_file=tmp / "secrets" / "linkage.key", **anon),
        **over,
    )


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
def log_lines():
    """JSON log lines captured for the test (a list of raw strings)."""
    buf = io.StringIO()
    configure_logging("debug", "json", stream=buf)
    yield buf
    configure_logging("info", "json")


# --------------------------------------------------------------------------- a real PACS
import json as _json
import shutil as _shutil
import socket as _socket
import subprocess as _subprocess
import time as _time

import requests as _requests

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def free_port() -> int:
    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OrthancServer:
    def __init__(self, root: Path) -> None:
        if not (Path(ORTHANC).exists() and Path(DICOMWEB_PLUGIN).exists()):
            raise RuntimeError("Orthanc and its DICOMweb plugin are required: apt-get install orthanc orthanc-dicomweb")
        self.root = root
        self.port = free_port()
        self.user, self.password = "medsendx", "s3cret-pw"
        cfg = {
            "Name": "medsendx-test", "HttpPort": self.port, "DicomPort": free_port(),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
            "Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpTimeout": 30, "StableAge": 1,
        }
        root.mkdir(parents=True, exist_ok=True)
        (root / "orthanc.json").write_text(_json.dumps(cfg))
        self.log = open(root / "orthanc.log", "wb")
        self.proc = _subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=self.log, stderr=self.log)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = _time.time() + 30
        while _time.time() < deadline:
            try:
                if _requests.get(self.url + "/system", auth=(self.user, self.password), timeout=1).ok:
                    return
            except _requests.ConnectionError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("Orthanc exited: " + (root / "orthanc.log").read_text()[-2000:])
            _time.sleep(0.05)
        raise RuntimeError("Orthanc did not answer")

    @property
    def dicomweb(self) -> str:
        return self.url + "/dicom-web"

    def get(self, path: str, **kw):
        return _requests.get(self.url + path, auth=(self.user, self.password), timeout=30, **kw)

    def instance_count(self) -> int:
        return len(self.get("/instances").json())

    def qido_instance(self, sop_uid: str) -> list:
        r = self.get("/dicom-web/instances", params={"SOPInstanceUID": sop_uid})
        return r.json() if r.status_code == 200 and r.content else []

    def stop(self) -> None:
        self.proc.kill()  # its storage is thrown away with the test's folder: no need to wait for a clean stop
        self.proc.wait(10)
        self.log.close()


@pytest.fixture
def orthanc(tmp_path):
    server = OrthancServer(tmp_path / "orthanc")
    yield server
    server.stop()


def write_password(tmp: Path, password: str) -> Path:
    p = tmp / "secrets" / "pacs-password"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(password + "\n")
    p.chmod(0o600)
    return p
