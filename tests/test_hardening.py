"""Regression tests for the attacks of the hostile review (issue "Hardening from a hostile test"):
each test reproduces one attack and checks the promise it broke.

Uploads: redirects, body-less 2xx, TLS faults, 404/413, a trickling response, a slow link, SIGTERM
during a send.  Anonymization: PHI in UN elements.  Ingest: a slow writer, a deep folder tree,
limbo names.  Memory: a large multi-frame object through triage and through C-STORE.  Config and
keys.  Logs.  Crash-loop counting, a full disk, bulk requeue.
"""

from __future__ import annotations

import io
import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from conftest import make_config, require
from tlsutil import self_signed
from medsendx_edge.anonymize.profile import Context, anonymize_dataset
from medsendx_edge.config import AnonymizeConfig, DestinationConfig, UploadConfig, WatchConfig, load_config
from medsendx_edge.daemon import Daemon
from medsendx_edge.upload.destinations import make_destination
from medsendx_edge.anonymize.dicomio import read_split, write_split
from medsendx_edge.errors import ConfigError, QuarantineError
from medsendx_edge.ingest import InboxScanner
from medsendx_edge.spool import INCOMING, OUTBOX, SENT, Spool
from medsendx_edge.synthetic import synthetic_mammogram
from medsendx_edge.upload.uploader import Uploader

CLI = [sys.executable, "-m", "medsendx_edge.cli"]


# --------------------------------------------------------------------------- helpers
def _mammo_file(path: Path, rows: int = 64, seed: int = 0) -> str:
    ds, _ = synthetic_mammogram(rows, rows, seed=seed)
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def _outbox_one(tmp_path: Path, dest: DestinationConfig, rows: int = 64,
                upload: UploadConfig | None = None) -> tuple[Uploader, str]:
    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    item_id = "0" * 23 + "1"
    _mammo_file(spool.path(OUTBOX, item_id), rows)
    up = Uploader(spool, make_destination(dest), upload or UploadConfig(initial_backoff_s=1, max_backoff_s=600),
                  rng=lambda a, b: b)
    up.reconcile()
    return up, item_id


class RawServer:
    """A TCP server on 127.0.0.1 that runs ``handler(conn)`` for each connection, in threads."""

    def __init__(self, handler, rcvbuf: int | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.handler, self.tls = handler, tls
        self.requests: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            conn.settimeout(20)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handler(self, conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


def read_request(conn: socket.socket, pace_bps: int | None = None) -> bytes:
    """Headers and a Content-Length body; with ``pace_bps`` the body is read slowly (a slow link)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    while len(body) < length:
        chunk = conn.recv(4096 if pace_bps else 65536)
        if not chunk:
            break
        body += chunk
        if pace_bps:
            time.sleep(len(chunk) / pace_bps)
    return head + b"\r\n\r\n" + body


# --------------------------------------------------------------------------- 1. UN elements
def _implicit(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)
    return fp.getvalue()


def _retag(data: bytes, old: int, new: int) -> bytes:
    o, n = struct.pack("<HH", old >> 16, old & 0xFFFF), struct.pack("<HH", new >> 16, new & 0xFFFF)
    assert data.count(o + b"UN") == 1
    return data.replace(o + b"UN", n + b"UN")


def un_laden_file(path: Path) -> None:
    """A mammogram carrying PHI in elements stored as UN: a sequence (0008,0063) holding a
    PatientName, a UID (0008,001A), a TextValue inside ContentSequence, and an unknown public tag.
    pydicom converts UN of known tags when writing, so they are written under private placeholder
    tags and renamed in the bytes."""
    ds, _ = synthetic_mammogram(64, 64)
    inner = Dataset()
    inner.PatientName = "ZZSECRET^UNSEQ"
    item = _implicit(inner)
    ds.add_new(0x00090010, "LO", "PLACEHOLDER")
    ds.add_new(0x00090063, "UN", struct.pack("<HHL", 0xFFFE, 0xE000, len(item)) + item)
    ds.add_new(0x0009001A, "UN", b"1.2.3.4.999.777\x00")
    ds.add_new(0x00090077, "UN", b"ZZSECRET-UNKNOWN")
    cs = Dataset()
    cs.add_new(0x0041A160, "UN", b"ZZSECRET TEXTVALUE ")
    ds.ContentSequence = [cs]
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    data = _retag(data, 0x00090063, 0x00080063)
    data = _retag(data, 0x0009001A, 0x0008001A)
    data = _retag(data, 0x0041A160, 0x0040A160)
    data = _retag(data, 0x00090077, 0x00080077)  # not in the data dictionary
    path.write_bytes(data)


def test_phi_in_un_elements_never_leaves(tmp_path):
    src = tmp_path / "un.dcm"
    un_laden_file(src)
    assert src.read_bytes().count(b"ZZSECRET") == 3 and b"1.2.3.4.999.777" in src.read_bytes()
    split = read_split(src)
    anonymize_dataset(split.dataset, Context.create(b"k" * 32, AnonymizeConfig(), "STATION01"), split.trailing)
    out = tmp_path / "out.dcm"
    with open(out, "wb") as fh:
        write_split(split, fh)
    data = out.read_bytes()
    assert b"ZZSECRET" not in data and b"1.2.3.4.999.777" not in data
    ds = pydicom.dcmread(out)
    assert ds[0x00080063].VR == "SQ"                            # decoded and walked into
    assert ds[0x0008001A].value.startswith("2.25.")             # a UID: replaced
    assert 0x00080077 not in ds                                 # unknown tag: removed
    assert ds.pixel_array.shape == (64, 64)


def test_phi_in_un_elements_never_reaches_orthanc(tmp_path, orthanc):
    cfg = make_config(tmp_path, destination=DestinationConfig(
        kind="dicomweb", path=None, url=orthanc.dicomweb, username=orthanc.user,
        password_file=_password(tmp_path, orthanc.password)))
    cfg.inbox.mkdir(parents=True)
    un_laden_file(cfg.inbox / "un.dcm")
    os.utime(cfg.inbox / "un.dcm", (0, 0))
    assert Daemon(cfg).run_once() == 0
    ids = orthanc.get("/instances").json()
    assert len(ids) == 1
    stored = orthanc.get(f"/instances/{ids[0]}/file").content
    assert b"ZZSECRET" not in stored and b"1.2.3.4.999.777" not in stored


def _password(tmp: Path, pw: str) -> Path:
    p = tmp / "pw"
    p.write_text(pw)
    p.chmod(0o600)
    return p


# --------------------------------------------------------------------------- 2. redirects, bare 2xx
def test_redirect_is_never_delivery(tmp_path):
    def handler(srv, conn):
        req = read_request(conn)
        srv.requests.append(req.split(b"\r\n", 1)[0])
        if req.startswith(b"POST"):
            conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: /login\r\nContent-Length: 0\r\n\r\n")
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nlogin")

    srv = RawServer(handler)
    try:
        up, item_id = _outbox_one(tmp_path, DestinationConfig(
            kind="http", path=None, url=f"http://127.0.0.1:{srv.port}/ingest/{{id}}", timeout_s=5))
        up.step(time.time())
    finally:
        srv.close()
    row = up.spool.state.item(item_id)
    assert row.state == "queued" and up.spool.ready(SENT) == []
    assert list(up.spool.quarantined()) == []          # the destination's fault, not the file's
    assert up.uplink.paused_auth and "redirect" in row.last_error
    assert [r.split(b" ")[0] for r in srv.requests] == [b"POST"]  # never followed with a GET


@pytest.mark.parametrize("proof, headers, delivered", [
    ("response", {}, False),                  # an empty 200 proves nothing
    ("response", {"ETag": '"abc"'}, True),    # what an object store answers a PUT with
    ("status", {}, True),                     # configured for a server that answers so
])
def test_body_less_2xx_is_not_delivery_unless_configured(tmp_path, httpserver, proof, headers, delivered):
    httpserver.expect_request("/up").respond_with_data("", status=200, headers=headers)
    up, item_id = _outbox_one(tmp_path, DestinationConfig(kind="http", path=None, url=httpserver.url_for("/up"),
                                                          delivery_proof=proof))
    up.step(time.time())
    row = up.spool.state.item(item_id)
    assert (row.state == "delivered") is delivered
    assert list(up.spool.quarantined()) == []


@pytest.mark.parametrize("status", [404, 413])
def test_404_and_413_are_destination_faults(tmp_path, httpserver, status):
    httpserver.expect_request("/up").respond_with_data("no", status=status)
    up, item_id = _outbox_one(tmp_path, DestinationConfig(kind="http", path=None, url=httpserver.url_for("/up")))
    t0 = time.time()
    up.step(t0)
    assert list(up.spool.quarantined()) == [] and up.spool.ready(OUTBOX) == [item_id]
    assert up.uplink.paused_auth and up.uplink.hold_until >= t0 + 599
    assert up.step(t0 + 1) is False  # the queue waits: one probe per max_backoff_s


# --------------------------------------------------------------------------- 4. TLS
_self_signed = self_signed   # tests/tlsutil.py


def test_tls_certificate_mismatch_pauses_the_queue_quarantines_nothing(tmp_path):
    cert, key = _self_signed(tmp_path, "pacs.elsewhere.example")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    def handler(srv, conn):
        with ctx.wrap_socket(conn, server_side=True) as tls:
            read_request(tls)

    srv = RawServer(handler)
    try:
        spool = Spool(tmp_path / "spool")
        spool.ensure_layout()
        ids = [f"{i:024x}" for i in range(1, 4)]
        for i in ids:
            _mammo_file(spool.path(OUTBOX, i))
        up = Uploader(spool, make_destination(DestinationConfig(
            kind="dicomweb", path=None, url=f"https://127.0.0.1:{srv.port}/dw", ca_bundle=cert, timeout_s=5)),
            UploadConfig(initial_backoff_s=1, max_backoff_s=600), rng=lambda a, b: b)
        up.reconcile()
        t0 = time.time()
        up.step(t0)
        assert up.step(t0 + 1) is False  # one fault holds the destination: no second file tried
    finally:
        srv.close()
    assert list(spool.quarantined()) == [] and spool.ready(OUTBOX) == ids
    assert "certificate" in spool.state.item(ids[0]).last_error
    status, reason, _since = spool.state.uplink()
    assert status == "paused" and reason.startswith("TLS")


def test_tls_handshake_cut_by_fin_is_transient(tmp_path):
    def handler(srv, conn):
        conn.recv(100)  # the ClientHello, then FIN: a link that drops mid-handshake
        conn.shutdown(socket.SHUT_RDWR)

    srv = RawServer(handler)
    try:
        up, item_id = _outbox_one(tmp_path, DestinationConfig(
            kind="dicomweb", path=None, url=f"https://127.0.0.1:{srv.port}/dw", timeout_s=5))
        up.step(time.time())
    finally:
        srv.close()
    row = up.spool.state.item(item_id)
    assert row.state == "queued" and "TLS handshake cut" in row.last_error
    assert list(up.spool.quarantined()) == [] and not up.uplink.paused_auth


# --------------------------------------------------------------------------- 7. stalls and slow links
def test_trickling_response_is_cut_within_the_timeout(tmp_path):
    def handler(srv, conn):
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        for _ in range(40):  # one header line every 0.3 s, for 12 s
            time.sleep(0.3)
            conn.sendall(b"X-Slow: yes\r\n")

    srv = RawServer(handler)
    try:
        up, item_id = _outbox_one(tmp_path, DestinationConfig(
            kind="http", path=None, url=f"http://127.0.0.1:{srv.port}/up", timeout_s=1.0))
        t0 = time.monotonic()
        up.step(time.time())
        elapsed = time.monotonic() - t0
    finally:
        srv.close()
    row = up.spool.state.item(item_id)
    assert row.state == "queued" and "no complete answer" in row.last_error
    assert elapsed < 4.0, f"the uploader was held {elapsed:.1f} s by a trickling answer"


def test_slow_link_that_moves_bytes_is_not_a_failure(tmp_path):
    """64 KB/s with a 1 s timeout: the 280 KB body takes about 4 s, always moving.  Before, the
    socket timeout measured the whole write and the send restarted from byte 0 forever."""
    def handler(srv, conn):
        req = read_request(conn, pace_bps=64_000)
        srv.requests.append(req)
        conn.sendall(b"HTTP/1.1 201 Created\r\nETag: \"x\"\r\nContent-Length: 0\r\n\r\n")

    srv = RawServer(handler, rcvbuf=4096)
    try:
        up, item_id = _outbox_one(tmp_path, DestinationConfig(
            kind="http", path=None, url=f"http://127.0.0.1:{srv.port}/up", timeout_s=1.0), rows=370)
        size = up.spool.path(OUTBOX, item_id).stat().st_size
        up.step(time.time())
    finally:
        srv.close()
    assert size > 250_000
    assert up.spool.state.item(item_id).state == "delivered"
    assert len(srv.requests) == 1 and len(srv.requests[0]) > size


def test_sigterm_during_a_stalled_send_is_prompt(tmp_path):
    connected = threading.Event()

    def handler(srv, conn):
        connected.set()
        srv.stop.wait(30)  # accepts, never reads: the send blocks

    srv = RawServer(handler, rcvbuf=4096)
    cfg = make_config(tmp_path, destination=DestinationConfig(
        kind="http", path=None, url=f"http://127.0.0.1:{srv.port}/up", timeout_s=60))
    daemon = Daemon(cfg)
    item = "0" * 23 + "1"
    try:
        _mammo_file(daemon.spool.path(OUTBOX, item), rows=1200)
        daemon.start()
        # Wait for the send to be under way (the destination took the connection, the item is claimed),
        # not for a time: the test used to pass with no send started at all (issue 25).
        assert connected.wait(30), "the send never started"
        assert item in daemon.spool.claimed(OUTBOX)
        t0 = time.monotonic()
        daemon.shutdown()
        elapsed = time.monotonic() - t0
    finally:
        srv.close()
    assert elapsed < 5.0, f"shutdown took {elapsed:.1f} s"
    assert daemon.spool.ready(OUTBOX) == ["0" * 23 + "1"]  # back in the queue, whole


# --------------------------------------------------------------------------- 3. slow writer
def _header_and_pixels(path: Path) -> tuple[bytes, bytes]:
    _mammo_file(path, rows=128)
    data = path.read_bytes()
    cut = data.index(struct.pack("<HH", 0x7FE0, 0x0010))
    return data[:cut], data[cut:]


def test_slow_writer_pausing_before_the_pixels_is_waited_for(tmp_path):
    cfg = make_config(tmp_path)
    cfg.inbox.mkdir(parents=True)
    head, pixels = _header_and_pixels(tmp_path / "m.dcm")
    target = cfg.inbox / "m.dcm"
    fh = open(target, "wb")  # one writer, one open file: pauses 70 s in real life
    fh.write(head)
    fh.flush()
    past = time.time() - 30
    os.utime(target, (past, past))
    daemon = Daemon(cfg)
    assert daemon.run_once() == 1            # stable, but an image header without pixels: waits
    assert target.exists() and daemon.spool.ready(INCOMING) == []
    assert not (tmp_path / "archive").exists() or not list((tmp_path / "archive").iterdir())
    fh.write(pixels)
    fh.close()
    os.utime(target, (past, past))
    assert daemon.run_once() == 0
    out = list((tmp_path / "archive").glob("*.dcm"))
    assert len(out) == 1 and pydicom.dcmread(out[0]).pixel_array.shape == (128, 128)
    assert list(daemon.spool.quarantined()) == []


def test_reopen_and_append_writer_is_waited_for(tmp_path):
    cfg = make_config(tmp_path)
    cfg.inbox.mkdir(parents=True)
    head, pixels = _header_and_pixels(tmp_path / "m.dcm")
    target = cfg.inbox / "m.dcm"
    target.write_bytes(head)
    past = time.time() - 30
    os.utime(target, (past, past))
    scanner = InboxScanner(Spool(cfg.spool_dir), 0.05, incomplete_grace_s=120)
    assert scanner.scan().adopted == [] and target.exists()
    with open(target, "ab") as fh:  # the modality comes back and appends by name
        fh.write(pixels)
    os.utime(target, (past, past))
    assert scanner.scan().adopted == []  # changed since the last look: stable only on the next
    assert len(scanner.scan().adopted) == 1


def test_image_without_pixels_past_the_grace_is_quarantined(tmp_path):
    cfg = make_config(tmp_path, watch=WatchConfig(stable_seconds=0.05, rescan_seconds=1, incomplete_grace_s=1))
    cfg.inbox.mkdir(parents=True)
    head, _ = _header_and_pixels(tmp_path / "m.dcm")
    (cfg.inbox / "m.dcm").write_bytes(head)
    os.utime(cfg.inbox / "m.dcm", (0, 0))
    daemon = Daemon(cfg)
    assert daemon.run_once() == 0
    (stage, item_id), = list(daemon.spool.quarantined())
    assert "without pixel data" in daemon.spool.reason(stage, item_id)["reason"]
    assert not (tmp_path / "archive").exists() or not list((tmp_path / "archive").iterdir())


# --------------------------------------------------------------------------- 5. a deep tree
@pytest.fixture
def deep_tree(tmp_path):
    """1,100 nested folders in the inbox, removed afterwards without recursion (pytest's own cleanup
    of old temp folders uses a recursive rmtree, which a tree this deep would break)."""
    cfg = make_config(tmp_path)
    cfg.inbox.mkdir(parents=True)
    deep = str(cfg.inbox)
    for _ in range(1100):  # pathlib's mkdir(parents=True) would itself recurse
        deep = os.path.join(deep, "d")
        os.mkdir(deep)
    yield cfg, Path(deep)
    subprocess.run(["rm", "-rf", str(cfg.inbox)], check=False)


def test_deep_folder_tree_neither_stops_the_scan_nor_the_start(tmp_path, deep_tree):
    cfg, deep = deep_tree
    _mammo_file(deep / "m.dcm")
    # a cross-file-system adoption left half done at the bottom: recovery must walk there too
    held = deep / f".medsendx-adopt-{'a' * 24}"
    _mammo_file(held)
    os.utime(deep / "m.dcm", (0, 0))
    daemon = Daemon(cfg)
    stats = daemon.recover()
    assert stats["adoptions_finished"] == 1 and not held.exists()
    assert daemon.run_once() == 0
    assert len(list((tmp_path / "archive").glob("*.dcm"))) == 2


# --------------------------------------------------------------------------- 6. memory
def _sparse_tomo(path: Path, frames: int, rows: int = 2048, cols: int = 2560) -> int:
    """A multi-frame MG object whose pixel data is a sparse hole of ``frames`` frames."""
    ds, _ = synthetic_mammogram(16, 16)
    ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, cols
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    length = rows * cols * 2 * frames
    with open(path, "ab") as fh:
        fh.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, length))
        fh.truncate(fh.tell() + length)
    return length


def _peak_rss_mb(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess]:
    code = ("import resource, subprocess, sys, json; p = subprocess.run(sys.argv[1:], capture_output=True, "
            "text=True); print(json.dumps([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.returncode, "
            "p.stdout, p.stderr]))")
    proc = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, timeout=300,
                          env=env)
    rss_kb, rc, out, err = json.loads(proc.stdout)
    return rss_kb / 1024, subprocess.CompletedProcess(cmd, rc, out, err)


def test_triage_of_a_1gb_multiframe_object_decodes_one_frame(tmp_path):
    path = tmp_path / "tomo.dcm"
    size = _sparse_tomo(path, frames=100)
    assert size > 1_000_000_000
    rss, proc = _peak_rss_mb([*CLI, "segment", str(path), "--json", str(tmp_path / "out.json")])
    assert proc.returncode in (0, 1), proc.stderr
    side = json.loads((tmp_path / "out.json").read_text())
    assert "frame 51 of 100, decoded alone" in (side.get("pixels_note") or side["metrics"]["pixels_note"])
    assert rss < 400, f"peak RSS {rss:.0f} MB for a 1 GB object"


def test_cstore_of_a_large_object_is_streamed_to_disk(tmp_path):

    require("storescu", package="dcmtk")
    from orthanc_server import free_port

    port = free_port()
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "spool_dir": str(tmp_path / "spool"),
        "destination": {"kind": "directory", "path": str(tmp_path / "archive")},
        "anonymize": {"secret_file": str(tmp_path / "s.key"), "linkage_key_file": str(tmp_path / "l.key")},
        "triage": {"enabled": False}, "upload": {"initial_backoff_s": 60, "max_backoff_s": 600},
        "dicom_listener": {"enabled": True, "bind": "127.0.0.1", "port": port, "allowed_calling_aets": ["STORESCU"]},
    }))
    obj = tmp_path / "big.dcm"
    ds, _ = synthetic_mammogram(16, 16)
    ds.NumberOfFrames, ds.Rows, ds.Columns = 30, 2048, 2048
    ds.PixelData = bytes(2048 * 2048 * 2 * 30)  # 250 MB: received, it must not sit in RAM
    ds.save_as(obj, enforce_file_format=True)
    del ds
    proc = subprocess.Popen([*CLI, "run", "--config", str(cfg_path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 20
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        sent = subprocess.run(["storescu", "-aec", "MEDSENDX", "127.0.0.1", str(port), str(obj)],
                              capture_output=True, timeout=120)
        assert sent.returncode == 0, sent.stderr[-500:]
        hwm = [line for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
               if line.startswith("VmHWM")][0]
        peak_mb = int(hwm.split()[1]) / 1024
    finally:
        proc.terminate()
        proc.wait(20)
    assert peak_mb < 200, f"the listener's peak RSS was {peak_mb:.0f} MB for a 250 MB object"


# --------------------------------------------------------------------------- 8. config and keys
def _write_yaml(tmp: Path, data: dict) -> Path:
    p = tmp / "cfg.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_nan_and_infinite_numbers_are_refused(tmp_path):
    for text in ("watch: {stable_seconds: .nan}", "upload: {max_backoff_s: .inf}"):
        p = tmp_path / "c.yaml"
        p.write_text(text)
        with pytest.raises(ConfigError, match="finite"):
            load_config(p)


def test_binary_config_is_a_clear_error_not_a_traceback(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(bytes(range(256)) * 4)
    proc = subprocess.run([*CLI, "check-config", str(p)], capture_output=True, text=True)
    assert proc.returncode == 2 and "not a text file" in proc.stderr and "Traceback" not in proc.stderr


def test_rejected_reload_never_logs_a_url_password(tmp_path, log_lines):
    cfg = make_config(tmp_path)
    path = _write_yaml(tmp_path, {"spool_dir": str(cfg.spool_dir),
                                  "anonymize": {"secret_file": str(cfg.anonymize.secret_file),
                                                "linkage_key_file": str(cfg.anonymize.linkage_key_file)}})
    daemon = Daemon(load_config(path), config_path=path)
    path.write_text(yaml.safe_dump({"spool_dir": str(cfg.spool_dir), "destination": {
        "kind": "dicomweb", "url": "ftp://admin:hunter2-secret@pacs.example/dicom-web"}}))
    assert daemon.reload() is False
    text = log_lines.getvalue()
    assert "config_rejected" in text and "hunter2-secret" not in text and "***@" in text


@pytest.mark.parametrize("break_it", ["fernet", "directory"])
def test_sighup_with_a_broken_key_file_keeps_the_daemon_running(tmp_path, log_lines, break_it):
    cfg = make_config(tmp_path)
    base = {"spool_dir": str(cfg.spool_dir),
            "anonymize": {"secret_file": str(cfg.anonymize.secret_file),
                          "linkage_key_file": str(cfg.anonymize.linkage_key_file)}}
    path = _write_yaml(tmp_path, base)
    daemon = Daemon(load_config(path), config_path=path)
    if break_it == "fernet":
        bad = tmp_path / "bad.key"
        bad.write_text("not-a-fernet-key\n")
        bad.chmod(0o600)
        base["anonymize"]["linkage_key_file"] = str(bad)
    else:
        (tmp_path / "adir").mkdir()
        base["anonymize"]["secret_file"] = str(tmp_path / "adir")
    path.write_text(yaml.safe_dump(base))
    assert daemon.reload() is False
    events = [json.loads(line) for line in log_lines.getvalue().splitlines() if line.startswith("{")]
    rejected = [e for e in events if e["event"] == "config_rejected"]
    assert rejected and ("Fernet" in rejected[0]["reason"] or "directory" in rejected[0]["reason"])
    assert daemon.cfg.anonymize.secret_file == cfg.anonymize.secret_file  # still on the old config


def test_secret_files_checked_for_mode_and_kind(tmp_path):
    cfg = make_config(tmp_path)
    cfg.anonymize.secret_file.parent.mkdir(parents=True)
    cfg.anonymize.secret_file.write_text("x" * 64)
    cfg.anonymize.secret_file.chmod(0o644)
    data = {"spool_dir": str(cfg.spool_dir),
            "anonymize": {"secret_file": str(cfg.anonymize.secret_file),
                          "linkage_key_file": str(cfg.anonymize.linkage_key_file)}}
    proc = subprocess.run([*CLI, "check-config", str(_write_yaml(tmp_path, data))], capture_output=True, text=True)
    # issue 23, finding 13: a key every user of the machine can read is refused, with the fix
    assert proc.returncode == 2 and "open to every user" in proc.stderr and "chmod 600" in proc.stderr
    cfg.anonymize.secret_file.chmod(0o640)    # its group only: a warning
    proc = subprocess.run([*CLI, "check-config", str(_write_yaml(tmp_path, data))], capture_output=True, text=True)
    assert proc.returncode == 0 and "readable by its group" in proc.stderr and "chmod 600" in proc.stderr
    data["anonymize"]["linkage_key_file"] = str(tmp_path)  # a folder
    proc = subprocess.run([*CLI, "check-config", str(_write_yaml(tmp_path, data))], capture_output=True, text=True)
    assert proc.returncode == 2 and "must be a regular file" in proc.stderr and "Traceback" not in proc.stderr


def test_a_replaced_site_secret_is_refused_and_a_rotated_linkage_key_still_reidentifies(tmp_path):
    """Finding 13: replacing the site secret on a spool that has pseudonyms gave the same woman a new
    pseudonym; rotating the linkage key made reidentify fail and export-linkage crash with a traceback.
    Now: a fingerprint of the secret is kept with the linkage table and a different secret is refused;
    the key file holds one key a line (the first encrypts, all decrypt), `rotate` re-encrypts."""
    from cryptography.fernet import Fernet

    from medsendx_edge.anonymize.linkage import LinkageStore
    from medsendx_edge.anonymize.stage import Anonymizer
    from medsendx_edge.errors import MedSendXError

    cfg = make_config(tmp_path)
    src = tmp_path / "in.dcm"
    _mammo_file(src)
    anon = Anonymizer(cfg)
    pseudonym = str(anon.prepare(src).split.dataset.PatientID)      # recorded in the linkage table
    cfg.anonymize.secret_file.write_text("f" * 64 + "\n")                 # someone "fixes" the secret
    with pytest.raises(ConfigError, match="not the site secret this spool"):
        Anonymizer(cfg)
    key_file = cfg.anonymize.linkage_key_file
    old_key = key_file.read_text().strip()
    new_key = Fernet.generate_key().decode()
    key_file.write_text(new_key + "\n")                                    # rotated, old key dropped
    store = LinkageStore(cfg.spool_dir / "state" / "linkage.db", key_file)
    with pytest.raises(MedSendXError, match="put the key it was made with back"):
        store.export(tmp_path / "export.bin")
    key_file.write_text(new_key + "\n" + old_key + "\n")                 # the documented rotation
    store = LinkageStore(cfg.spool_dir / "state" / "linkage.db", key_file)
    assert store.lookup(pseudonym)[0]["original_patient_id"]
    assert store.rotate() >= 1
    key_file.write_text(new_key + "\n")                                    # old key gone after rotate
    store = LinkageStore(cfg.spool_dir / "state" / "linkage.db", key_file)
    assert store.lookup(pseudonym) and store.export(tmp_path / "export.bin") == 1


# --------------------------------------------------------------------------- 9. limbo and logs
def test_temporary_names_are_counted_and_reported(tmp_path, log_lines):
    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    old = time.time() - 7200
    for name in (".DOE^JANE.dcm", "img.part", "scan.tmp"):
        (spool.inbox / name).write_bytes(b"x" * 200)
        os.utime(spool.inbox / name, (old, old))
    (spool.inbox / "fresh.part").write_bytes(b"x")
    scanner = InboxScanner(spool, 0.05, ignored_report_s=3600)
    result = scanner.scan()
    scanner.scan()
    assert result.ignored == 4 and result.ignored_stale == 3 and result.adopted == []
    warnings_ = [json.loads(x) for x in log_lines.getvalue().splitlines() if "inbox_files_ignored" in x]
    assert len(warnings_) == 1 and warnings_[0]["count"] == 3  # once, not every scan
    assert "DOE" not in log_lines.getvalue()
    proc = subprocess.run([*CLI, "status", "--json"], capture_output=True, text=True, env={
        **os.environ, "MEDSENDX_EDGE_CONFIG": str(_write_yaml(tmp_path, {"spool_dir": str(spool.root)}))})
    status = json.loads(proc.stdout)
    assert status["inbox_ignored"]["ignored_stale"] == 3 and proc.returncode == 1


def test_third_party_warnings_are_json_without_paths(tmp_path):
    code = ("from medsendx_edge.logs import configure_logging; configure_logging(); import warnings, logging; "
            "warnings.warn(RuntimeWarning('cannot watch /srv/inbox/DOE^JANE_1965/study')); "
            "logging.getLogger('watchdog.observers').warning('gone: %s', '/srv/inbox/DOE^JANE_1965')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 2
    for line in lines:
        json.loads(line)
    assert "DOE" not in proc.stderr and "[path]" in proc.stderr


def test_deeply_nested_sequence_gives_a_bounded_log_line(tmp_path):
    cfg = make_config(tmp_path)
    cfg.inbox.mkdir(parents=True)
    _mammo_file(tmp_path / "m.dcm", rows=16)
    data = (tmp_path / "m.dcm").read_bytes()
    cut = data.index(struct.pack("<HH", 0x7FE0, 0x0010))
    depth = 10000  # ContentSequence in ContentSequence, 10,000 levels, undefined lengths
    opening = (struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
               + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF))
    closing = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    path = cfg.inbox / "deep.dcm"
    path.write_bytes(data[:cut] + opening * depth + closing * depth + data[cut:])
    os.utime(path, (0, 0))
    cfg_path = _write_yaml(tmp_path, {"spool_dir": str(cfg.spool_dir),
                                      "destination": {"kind": "directory", "path": str(tmp_path / "archive")},
                                      "anonymize": {"secret_file": str(cfg.anonymize.secret_file),
                                                    "linkage_key_file": str(cfg.anonymize.linkage_key_file)}})
    proc = subprocess.run([*CLI, "run", "--once", "--config", str(cfg_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    for line in lines:
        json.loads(line)
    longest = max(len(line) for line in lines)
    assert longest < 8000, f"a log line of {longest} characters"
    assert len(list(Spool(cfg.spool_dir).quarantined())) == 1


def test_explicit_vr_header_over_implicit_data_is_named(tmp_path):
    from pydicom.uid import ImplicitVRLittleEndian
    from medsendx_edge.anonymize.dicomio import _Walker

    ds, _ = synthetic_mammogram(32, 32)
    ds.save_as(tmp_path / "e.dcm", enforce_file_format=True)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(tmp_path / "i.dcm", enforce_file_format=True)
    e, i = (tmp_path / "e.dcm").read_bytes(), (tmp_path / "i.dcm").read_bytes()

    def start(b: bytes) -> int:
        return _Walker(io.BytesIO(b), len(b)).dataset_start()

    (tmp_path / "mix.dcm").write_bytes(e[:start(e)] + i[start(i):])
    with pytest.raises(QuarantineError) as err:
        read_split(tmp_path / "mix.dcm")
    assert err.value.error_class == "EncodingMismatch" and "truncated" not in err.value.reason


def test_one_interruption_in_each_of_three_stages_is_not_a_crash_loop(tmp_path):
    spool = Spool(tmp_path / "spool", max_recoveries=3)
    spool.ensure_layout()
    item_id = "0" * 23 + "7"
    for queue in (INCOMING, "anonymized", "triaged"):
        _mammo_file(spool.path(queue, item_id))
        assert spool.claim(queue, item_id) is not None  # the power goes while the stage works
        spool.recover()
        assert spool.ready(queue) == [item_id]
        spool.path(queue, item_id).unlink()  # the stage finished after the restart
    assert list(spool.quarantined()) == []


def test_an_unmounted_share_is_neither_an_inbox_nor_a_delivery(tmp_path):
    """Finding 14: a destination folder on an unmounted share filled the local disk and counted as
    delivered; an inbox on an unmounted share sat empty for ever; an inbox_dir that does not exist was
    created.  With require_mount the destination copies nothing while the share is off (the queue waits,
    nothing delivered) and delivers once it is back; the daemon does not start on a missing or unmounted
    inbox; check-config says the same."""
    from medsendx_edge.config import mounted, replace

    share = tmp_path / "share"
    share.mkdir()
    cfg = make_config(tmp_path, destination=DestinationConfig(kind="directory", path=share / "archive",
                                                              require_mount=True))
    assert not mounted(share) and not mounted(share / "archive")
    proc = subprocess.run([*CLI, "check-config", str(_write_yaml(tmp_path, {
        "spool_dir": str(cfg.spool_dir), "destination": {"kind": "directory", "path": str(share / "archive"),
                                                         "require_mount": True},
        "anonymize": {"secret_file": str(cfg.anonymize.secret_file),
                      "linkage_key_file": str(cfg.anonymize.linkage_key_file)}}))], capture_output=True, text=True)
    assert proc.returncode == 0 and "destination.require_mount" in proc.stderr   # a warning: the queue waits
    Daemon(cfg).shutdown()   # the daemon (and its DICOM listener) still starts; the destination holds the queue
    fresh = tmp_path / "fresh"   # an inbox_dir that is the spool's own inbox is made like the rest of the spool
    Daemon(replace(make_config(fresh), inbox_dir=fresh / "spool" / "inbox")).shutdown()
    with pytest.raises(ConfigError, match="inbox_dir: .* is not a folder"):
        Daemon(replace(cfg, inbox_dir=tmp_path / "no-such-share", destination=DestinationConfig(
            kind="directory", path=tmp_path / "archive")))
    with pytest.raises(ConfigError, match="inbox_require_mount"):
        Daemon(replace(cfg, inbox_dir=share, inbox_require_mount=True, destination=DestinationConfig(
            kind="directory", path=tmp_path / "archive")))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(share)]).returncode != 0:
        pytest.fail("cannot mount a tmpfs (tests run as root)")
    try:
        assert mounted(share / "archive")
        up, item_id = _outbox_one(tmp_path, cfg.destination)
        assert subprocess.run(["umount", str(share)]).returncode == 0   # the share comes off mid-shift
        up.drain_once()
        assert up.spool.state.item(item_id).state == "queued" and not (share / "archive").exists()
        assert subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(share)]).returncode == 0
        up.uplink.hold_until = 0.0
        up.drain_once()
        assert up.spool.state.item(item_id).state == "delivered" and len(list((share / "archive").iterdir())) == 1
    finally:
        subprocess.run(["umount", str(share)], capture_output=True)


def test_full_disk_resumes_by_itself(tmp_path, log_lines):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.fail("cannot mount a tmpfs (tests run as root)")
    try:
        cfg = make_config(mnt, min_free_mb=0.0, destination=DestinationConfig(kind="directory",
                                                                               path=tmp_path / "archive"))
        cfg.inbox.mkdir(parents=True)
        for i in range(6):
            _mammo_file(cfg.inbox / f"m{i}.dcm", rows=300, seed=i)
            os.utime(cfg.inbox / f"m{i}.dcm", (0, 0))
        daemon = Daemon(cfg)
        daemon.recover()
        filler = mnt / "filler.bin"
        with open(filler, "wb", buffering=0) as fh:  # the disk fills up (unbuffered: nothing left to flush at close)
            try:
                while True:
                    fh.write(b"\0" * (1 << 16))
                    fh.flush()
            except OSError:
                pass
        daemon.scan_inbox()
        daemon.process_pipeline()
        daemon.uploader.drain_once()
        stuck = sum(len(daemon.spool.claimed(q)) for q in (INCOMING, "anonymized", "triaged", OUTBOX))
        assert list(daemon.spool.quarantined()) == []  # a full disk is the machine's fault, not the files'
        filler.unlink()  # room again: no restart
        for r in daemon.runners:
            r._last_sweep = 0.0
            r._not_before.clear()
        daemon.process_pipeline()
        daemon.uploader.uplink.hold_until = 0.0
        daemon.uploader.drain_once()
        assert len(list((tmp_path / "archive").glob("*.dcm"))) == 6, f"{stuck} claimed while full"
        assert sum(len(daemon.spool.claimed(q)) for q in (INCOMING, "anonymized", "triaged", OUTBOX)) == 0
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_bulk_requeue_by_stage_and_reason(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    for n, (queue, stage, reason) in enumerate([
            (OUTBOX, "upload", "TLS: the server certificate does not verify"),
            (OUTBOX, "upload", "TLS: the server certificate does not verify"),
            (OUTBOX, "upload", "HTTP 400: refused"),
            (INCOMING, "anonymize", "not a DICOM Part 10 file")]):
        item_id = f"{n + 1:024x}"
        _mammo_file(spool.path(queue, item_id))
        spool.quarantine(spool.claim(queue, item_id), stage, reason, "X")
    cfg_path = _write_yaml(tmp_path, {"spool_dir": str(spool.root)})
    env = {**os.environ, "MEDSENDX_EDGE_CONFIG": str(cfg_path)}
    out = subprocess.run([*CLI, "requeue", "--stage", "upload", "--reason", "certificate"], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0 and "requeued 2 item(s): 2 to outbox" in out.stdout
    assert len(spool.ready(OUTBOX)) == 2 and len(list(spool.quarantined())) == 2
    out = subprocess.run([*CLI, "requeue", "--all"], capture_output=True, text=True, env=env)
    assert "requeued 2 item(s)" in out.stdout and list(spool.quarantined()) == []


# --------------------------------------------------------------------------- issue 23, critical findings
_MARKER = b"DOE^JANE^MARIE 19610203 ID-4711-SECRET!!"  # 40 bytes: a name, a birth date, an ID


def _anonymize_file(src: Path, out: Path) -> bytes:
    split = read_split(src)
    anonymize_dataset(split.dataset, Context.create(b"k" * 32, AnonymizeConfig(), "STATION01"), split.trailing)
    with open(out, "wb") as fh:
        write_split(split, fh)
    return out.read_bytes()


def test_unknown_public_elements_and_urls_never_leave_whatever_their_vr(tmp_path):
    """Finding 1: an allow-list by attribute: public elements the dictionary does not know are removed
    whatever VR they claim (OB, OW, CS, AE, UR), and URLs (RetrieveURL) too."""
    from pydicom.datadict import DicomDictionary
    from pydicom.dataelem import DataElement

    ds, _ = synthetic_mammogram(64, 64, seed=0)
    unknown = [(0x00087F01, "OB", b"ZQX^JANE"), (0x00087F02, "OW", b"ZQX^JANE"), (0x00187F03, "CS", "ZQXJANE"),
               (0x00207F04, "AE", "ZQXJANE"), (0x00287F05, "UR", "http://pacs.example/ZQXJANE")]
    for tag, vr, value in unknown:
        assert tag not in DicomDictionary
        ds.add(DataElement(tag, vr, value))
    ds.RetrieveURL = "http://hospital.example/wado?patient=ZQX^JANE"
    src = tmp_path / "in.dcm"
    ds.save_as(src, enforce_file_format=True)
    assert src.read_bytes().count(b"ZQX") == 6
    data = _anonymize_file(src, tmp_path / "out.dcm")
    assert b"ZQX" not in data
    out = pydicom.dcmread(tmp_path / "out.dcm")
    assert "RetrieveURL" not in out and not [t for t, _vr, _v in unknown if t in out]
    assert out.pixel_array.shape == (64, 64)


def test_known_attributes_are_judged_by_the_attribute_not_the_vr_the_file_claims(tmp_path):
    """Finding 1, as a review found it still open: a known text attribute written as OB, retired
    attributes in repeating groups, bytes the table does not name (MakerNote, PrivateInformation inside a
    sequence item) reached the output as read.  Vetted arrays (a palette, a waveform) stay."""
    from pydicom.dataelem import DataElement

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    planted = [(0x00080101, "OB", b"ZQX^JANE"),    # ExtendedCodeValue (LO) stored as OB
               (0x00080008, "OB", b"ZQX^JANE"),    # ImageType (CS) stored as OB
               (0x00203100, "CS", "ZQXJANE"),      # SourceImageIDs: retired, repeating group 0020,31xx
               (0x7F000010, "OW", b"ZQX^JANE"),    # VariablePixelData: retired, repeating group 7Fxx
               (0x0016002B, "OB", b"ZQX^JANE"),    # MakerNote (EXIF)
               (0x0016008C, "OB", b"ZQX^JANE")]    # GPSAreaInformation
    for tag, vr, value in planted:
        ds.add(DataElement(tag, vr, value))
    item = Dataset()
    item.add(DataElement(0x00020102, "OB", b"ZQX^JANE"))   # PrivateInformation inside a sequence item
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ds.SOPClassUID, "1.2.3.4"
    ds.ReferencedImageSequence = [item]
    ds.RedPaletteColorLookupTableData = b"\x01\x02" * 4   # a vetted array: numbers, kept
    src = tmp_path / "in.dcm"
    ds.save_as(src)
    assert src.read_bytes().count(b"ZQX") == 7
    data = _anonymize_file(src, tmp_path / "out.dcm")
    assert b"ZQX" not in data
    out = pydicom.dcmread(tmp_path / "out.dcm")
    assert not [t for t, _vr, _v in planted if t in out]
    assert "ReferencedImageSequence" in out and 0x00020102 not in out.ReferencedImageSequence[0]
    assert out.RedPaletteColorLookupTableData == b"\x01\x02" * 4
    assert out.pixel_array.shape == (128, 128)


def test_an_encapsulated_pdf_keeps_its_media_type_and_an_sr_its_evidence(tmp_path):
    """Finding 11: MIMETypeOfEncapsulatedDocument (Type 1) was emptied by the free-text rule, and viewers
    need an SR's Current Requested Procedure Evidence Sequence to open it: both kept, UIDs remapped."""
    ds = Dataset()
    ds.PatientID, ds.SOPInstanceUID, ds.SOPClassUID = "PID-1", "1.2.3.4.5", "1.2.840.10008.5.1.4.1.1.104.1"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    sop = Dataset()
    sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.11"
    series = Dataset()
    series.SeriesInstanceUID, series.ReferencedSOPSequence = "1.2.3.10", [sop]
    evidence = Dataset()
    evidence.StudyInstanceUID, evidence.ReferencedSeriesSequence = "1.2.3.9", [series]
    ds.CurrentRequestedProcedureEvidenceSequence = [evidence]
    anonymize_dataset(ds, Context.create(b"k" * 32, AnonymizeConfig(), "STATION01"))
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    kept = ds.CurrentRequestedProcedureEvidenceSequence[0]
    ref = kept.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert kept.StudyInstanceUID.startswith("2.25.") and ref.ReferencedSOPInstanceUID.startswith("2.25.")
    assert ref.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"


def test_bytes_after_the_native_frames_never_leave(tmp_path):
    """Finding 2, native: 40 bytes of name, ID and birth date after the frames inside Pixel Data are cut."""
    ds, _ = synthetic_mammogram(64, 64, seed=0)
    frames = bytes(ds.PixelData)
    ds.PixelData = frames + _MARKER
    src = tmp_path / "in.dcm"
    ds.save_as(src, enforce_file_format=True)
    assert _MARKER in src.read_bytes()
    split = read_split(src)
    assert split.pixel_trimmed == len(_MARKER)
    data = _anonymize_file(src, tmp_path / "out.dcm")
    assert _MARKER[:8] not in data
    out = pydicom.dcmread(tmp_path / "out.dcm")
    assert bytes(out.PixelData) == frames and out.pixel_array.shape == (64, 64)
    # an image with nothing after its frames is copied byte for byte (no re-encoding)
    ds.PixelData = frames
    ds.save_as(src, enforce_file_format=True)
    assert read_split(src).pixel_parts is None


@pytest.mark.parametrize("name", ["SC_rgb_rle_2frame.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm"])
def test_fragments_after_the_encapsulated_frames_never_leave(tmp_path, name):
    """Finding 2, encapsulated: a fragment after the frames (one JPEG/J2K stream per frame ended by its
    marker, or one RLE fragment per frame) is not sent; the frames decode as before."""
    from pydicom.encaps import generate_fragments
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file(name))
    before = ds.pixel_array.copy()
    # one more item (a fragment holding PHI) after the last frame; pydicom writes the delimiter after it
    ds.PixelData = bytes(ds.PixelData) + struct.pack("<HHL", 0xFFFE, 0xE000, len(_MARKER)) + _MARKER
    ds["PixelData"].is_undefined_length = True
    src = tmp_path / "in.dcm"
    ds.save_as(src, enforce_file_format=True)
    assert _MARKER in src.read_bytes()
    assert len(list(generate_fragments(pydicom.dcmread(src).PixelData))) >= 2
    data = _anonymize_file(src, tmp_path / "out.dcm")
    assert _MARKER[:8] not in data
    out = pydicom.dcmread(tmp_path / "out.dcm")
    assert (out.pixel_array == before).all()


def _rebuild(fragments: list[bytes], offsets: bytes = b"") -> bytes:
    """Encapsulated Pixel Data from fragments as given (an offset table of the given bytes first)."""
    out = struct.pack("<HHL", 0xFFFE, 0xE000, len(offsets)) + offsets
    for frag in fragments:
        out += struct.pack("<HHL", 0xFFFE, 0xE000, len(frag)) + frag
    return out


@pytest.mark.parametrize("name", ["SC_rgb_rle_2frame.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm", "GDCMJ2K_TextGBR.dcm", "JPEG-LL.dcm"])
@pytest.mark.parametrize("where", ["after the end marker", "in the offset table"])
def test_bytes_inside_the_encapsulated_frames_fragments_never_leave(tmp_path, name, where):
    """Finding 2, as a review found it still open: bytes after a frame's EOI / EOC (or after an RLE
    frame's last segment) inside its own fragment, and an offset table holding PHI, were copied.  Each
    frame is now cut where its code stream ends and the offset table is rebuilt; the pixels are the same."""
    from pydicom.encaps import generate_fragments

    ds = pydicom.dcmread(get_testdata_file(name))
    before = ds.pixel_array.copy()
    frags = list(generate_fragments(ds.PixelData))[1:]   # the first item is the offset table
    if where == "after the end marker":
        frags[-1] = frags[-1] + _MARKER
        ds.PixelData = _rebuild(frags)
    else:
        ds.PixelData = _rebuild(frags, _MARKER)
    ds["PixelData"].is_undefined_length = True
    src = tmp_path / "in.dcm"
    ds.save_as(src, enforce_file_format=True)
    assert _MARKER in src.read_bytes()
    data = _anonymize_file(src, tmp_path / "out.dcm")
    assert _MARKER[:8] not in data
    out = pydicom.dcmread(tmp_path / "out.dcm")
    assert (out.pixel_array == before).all()


def test_pixel_data_that_cannot_be_vetted_is_quarantined_never_copied(tmp_path):
    """Finding 2: a header that cannot say how long its frames are, a second pixel data element, an
    encapsulated syntax whose frames cannot be walked: quarantined with the reason, not copied; a
    deflated file is cut to its frames like any other."""
    import copy

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds, _ = synthetic_mammogram(64, 64, seed=0)
    frames = bytes(ds.PixelData)
    cases = {}
    no_bits = copy.deepcopy(ds)
    del no_bits.Rows
    no_bits.PixelData = frames + _MARKER
    cases["frames"] = no_bits
    two = copy.deepcopy(ds)
    two.FloatPixelData = b"\0" * 16
    cases["more than one pixel data element"] = two
    video = pydicom.dcmread(get_testdata_file("JPEG2000.dcm"))
    video.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"
    cases["cannot be walked"] = video
    hostile = pydicom.dcmread(get_testdata_file("JPEG2000.dcm"))
    hostile.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"
    cases["(not a UID)"] = hostile   # replaced below by a name where the UID should be
    for reason, bad in cases.items():
        src = tmp_path / "bad.dcm"
        bad.save_as(src, enforce_file_format=True)
        if reason == "(not a UID)":   # a hostile modality writes a name as the transfer syntax
            data = src.read_bytes()
            src.write_bytes(data.replace(b"1.2.840.10008.1.2.4.102", b"DOE^JANE^MARIE^1961.02\0", 1))
        with pytest.raises(QuarantineError) as err:
            read_split(src)
        assert reason in err.value.reason and "DOE" not in err.value.reason
    deflated = copy.deepcopy(ds)
    deflated.PixelData = frames + _MARKER
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    src = tmp_path / "deflated.dcm"
    deflated.save_as(src, enforce_file_format=True)
    assert _MARKER not in src.read_bytes()   # compressed: the marker is inside the deflate stream
    _anonymize_file(src, tmp_path / "out.dcm")
    out = pydicom.dcmread(tmp_path / "out.dcm")
    assert bytes(out.PixelData) == frames and _MARKER not in bytes(out.PixelData)


def test_an_outbox_file_found_without_its_row_is_registered_with_its_instance(tmp_path):
    """Finding 3: a file the uploader finds in the outbox before the route's row (a crash between the
    move and the enqueue, or the two threads racing) is registered with its SOP Instance UID, so a
    later copy of that instance with other content is a conflict, not a second send."""
    up, item_id = _outbox_one(tmp_path, DestinationConfig(kind="directory", path=tmp_path / "out"))
    uid = str(pydicom.dcmread(up.spool.path(OUTBOX, item_id), stop_before_pixels=True).SOPInstanceUID)
    assert up.spool.state.instance_holder(uid, "another") == (item_id, up.spool.state.item(item_id).sha256)


def _same_uid_pair(inbox: Path, identical: bool) -> None:
    a, _ = synthetic_mammogram(64, 64, seed=0)
    b, _ = synthetic_mammogram(64, 64, seed=0 if identical else 1)
    for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientName"):
        setattr(b, kw, getattr(a, kw))
    inbox.mkdir(parents=True, exist_ok=True)
    for name, ds in (("a.dcm", a), ("b.dcm", b)):
        ds.save_as(inbox / name, enforce_file_format=True)
        os.utime(inbox / name, (0, 0))


def test_same_uid_other_pixels_is_quarantined_not_counted_delivered(tmp_path, orthanc):
    """Finding 3: Orthanc keeps the first instance of a UID and lists the second as stored too; the
    second copy, with other pixels, must end in quarantine with the reason, not in sent/."""
    cfg = make_config(tmp_path, destination=DestinationConfig(
        kind="dicomweb", path=None, url=orthanc.dicomweb, username=orthanc.user,
        password_file=_password(tmp_path, orthanc.password)))
    _same_uid_pair(cfg.inbox, identical=False)
    assert Daemon(cfg).run_once() == 0
    spool = Spool(cfg.spool_dir)
    assert len(list(spool.ready(SENT))) == 1
    reasons = [json.loads(p.read_text()) for p in spool.dir("quarantine").rglob("*.reason.json")]
    assert len(reasons) == 1 and "same SOP Instance UID with other content" in json.dumps(reasons[0])
    assert len(orthanc.get("/instances").json()) == 1


def test_exact_copy_is_recorded_and_never_sent_twice(tmp_path):
    cfg = make_config(tmp_path)
    _same_uid_pair(cfg.inbox, identical=True)
    assert Daemon(cfg).run_once() == 0
    spool = Spool(cfg.spool_dir)
    assert len(list(spool.ready(SENT))) == 2 and not list(spool.dir("quarantine").rglob("*.reason.json"))
    assert len(list(cfg.destination.path.rglob("*.dcm"))) == 1     # one copy at the destination
    assert spool.state.count_state("delivered") == 1 and spool.state.count_state("duplicate") == 1


def test_a_pacs_copy_with_other_content_is_a_conflict_and_the_same_content_is_present(tmp_path, orthanc):
    """Finding 3, the destination side: 'already held' compares the bytes (the sha256 we keep), not the UID."""
    from medsendx_edge.errors import PermanentUploadError
    from medsendx_edge.upload.destinations import PRESENT
    from medsendx_edge.upload.route import file_digest

    dest = make_destination(DestinationConfig(kind="dicomweb", path=None, url=orthanc.dicomweb,
                                              username=orthanc.user,
                                              password_file=_password(tmp_path, orthanc.password)))
    ours, theirs = tmp_path / "ours.dcm", tmp_path / "theirs.dcm"
    _same_uid_pair(tmp_path / "pair", identical=False)
    (tmp_path / "pair" / "a.dcm").rename(ours)
    (tmp_path / "pair" / "b.dcm").rename(theirs)
    import requests
    requests.post(orthanc.url + "/instances", data=theirs.read_bytes(), auth=(orthanc.user, orthanc.password),
                  timeout=30).raise_for_status()
    with pytest.raises(PermanentUploadError, match="conflict"):
        dest.send(ours, "x", file_digest(ours)[1])
    assert dest.send(theirs, "y", file_digest(theirs)[1]) == PRESENT
    # A PACS that coerces attributes on storage (here: the same pixels with another description) holds
    # the same image: present, not a conflict that would quarantine a retry after a lost answer.
    coerced = pydicom.dcmread(theirs)
    coerced.SeriesDescription = "stored by another PACS"
    coerced.save_as(tmp_path / "coerced.dcm")
    assert dest.send(tmp_path / "coerced.dcm", "z", file_digest(tmp_path / "coerced.dcm")[1]) == PRESENT
    dest.close()
