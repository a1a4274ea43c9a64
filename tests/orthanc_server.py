"""A real Orthanc (Debian's orthanc + orthanc-dicomweb) as a plain process on 127.0.0.1, for tests and
benchmarks: random free ports, remote access off, authentication on, storage in a given folder."""

from __future__ import annotations

from pathlib import Path
import json as _json
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


def wait_listening(port: int, timeout_s: float = 60.0, host: str = "127.0.0.1") -> None:
    """Until a server accepts a TCP connection on ``port`` (its own start-up, not a guess)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class OrthancServer:
    def __init__(self, root: Path, extra: dict | None = None, link: object | None = None,
                 feed: bool = False) -> None:
        """``link``: a linkemu.Link; Orthanc then runs in its network namespace, at its far address.
        ``feed``: Orthanc itself says when it has stored an instance (a Lua ``OnStoredInstance`` writes
        its id to a FIFO this process holds open): :meth:`wait_stored` waits on that event instead of
        asking the REST API over and over, which would take CPU from the 2 cores it measures."""
        if not (Path(ORTHANC).exists() and Path(DICOMWEB_PLUGIN).exists()):
            raise RuntimeError("Orthanc and its DICOMweb plugin are required: apt-get install orthanc orthanc-dicomweb")
        self.root = root
        self.port = free_port()
        self.user, self.password = "medsendx", "s3cret-pw"
        self.prefix: list[str] = list(getattr(link, "prefix", []))
        self.host = getattr(link, "far_ip", "127.0.0.1")
        self.dicom_port = free_port()
        cfg = {
            "Name": "medsendx-test", "HttpPort": self.port, "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": link is not None, "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
            "Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpTimeout": 30, "StableAge": 1,
        }
        for key, value in (extra or {}).items():  # e.g. DicomWeb.Servers for a gateway set-up
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        root.mkdir(parents=True, exist_ok=True)
        self._feed: Path | None = None
        self._feed_fd: int | None = None
        self._fed: set[bytes] = set()
        self._partial = b""
        if feed:
            import os

            fifo = root / "stored.fifo"
            os.mkfifo(fifo, 0o600)
            self._feed = fifo
            (root / "stored.lua").write_text(
                "function OnStoredInstance(instanceId, tags, metadata, origin)\n"
                f"  local f = assert(io.open('{fifo}', 'a'))\n"
                "  f:write(instanceId .. '\\n')\n  f:close()\nend\n")
            cfg["LuaScripts"] = [*cfg.get("LuaScripts", []), str(root / "stored.lua")]
        (root / "orthanc.json").write_text(_json.dumps(cfg))
        self.url = f"http://{self.host}:{self.port}"
        self.start()

    def start(self) -> None:
        """Start (or start again, on the same ports and storage) and wait until it answers."""
        root = self.root
        if self._feed is not None and self._feed_fd is None:
            import os

            # Held open for reading and writing while Orthanc runs: opening never waits for a writer, and
            # Orthanc's open for its event never waits for a reader (without one its Lua thread would hang).
            self._feed_fd = os.open(self._feed, os.O_RDWR | os.O_NONBLOCK)
        self.log = open(root / "orthanc.log", "ab")
        self.proc = _subprocess.Popen([*self.prefix, ORTHANC, str(root / "orthanc.json")], stdout=self.log,
                                      stderr=self.log)
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

    def wait_stored(self, count: int, timeout_s: float) -> int:
        """Until Orthanc has said it stored ``count`` distinct instances (since it started), or
        ``timeout_s``; returns how many it said.  Needs ``feed=True``.  Orthanc says it again for an
        instance sent twice ("AlreadyStored"): counted once, as /statistics counts."""
        import os
        import select

        assert self._feed_fd is not None, "OrthancServer(feed=True) is needed"
        deadline = _time.monotonic() + timeout_s
        while len(self._fed) < count:
            left = deadline - _time.monotonic()
            if left <= 0 or not select.select([self._feed_fd], [], [], left)[0]:
                break
            try:
                self._partial += os.read(self._feed_fd, 65536)
            except BlockingIOError:
                continue
            *lines, self._partial = self._partial.split(b"\n")
            self._fed.update(lines)
        return len(self._fed)

    def qido_instance(self, sop_uid: str) -> list:
        r = self.get("/dicom-web/instances", params={"SOPInstanceUID": sop_uid})
        return r.json() if r.status_code == 200 and r.content else []

    def stop(self) -> None:
        self.proc.kill()  # its storage is thrown away with the test's folder: no need to wait for a clean stop
        self.proc.wait(10)
        self.log.close()
        if self._feed_fd is not None:
            import os

            os.close(self._feed_fd)
            self._feed_fd = None


