"""The uploader against a real Orthanc (STOW-RS, verified with QIDO-RS), a fault matrix served by
pytest-httpserver and a raw socket, uplink down/up, the bandwidth cap.  (The daemon SIGKILLed during sends to
Orthanc: tests/e2e/test_acceptance.py.)"""

from __future__ import annotations

import json
import os
import resource
import socket
import threading
import time
from pathlib import Path

import pydicom
import pytest
import yaml
from werkzeug.wrappers import Response

from conftest import PYDICOM_TEST_FILES, make_config, write_password
from medsendx_edge.config import DestinationConfig, UploadConfig
from medsendx_edge.daemon import Daemon
from medsendx_edge.upload.destinations import make_destination
from medsendx_edge.errors import AuthUploadError, TransientUploadError
from medsendx_edge.upload.route import file_digest
from medsendx_edge.spool import OUTBOX, SENT, Spool, new_id
from medsendx_edge.vocabulary import Priority, UploadState
from medsendx_edge.synthetic import synthetic_mammogram
from medsendx_edge.upload.uploader import Uploader


def _anonymized_file(tmp: Path, name: str = "x.dcm", seed: int = 0, rows: int = 64) -> tuple[Path, str]:
    ds, _ = synthetic_mammogram(rows, rows, seed=seed)
    p = tmp / name
    ds.save_as(p, enforce_file_format=True)
    return p, str(ds.SOPInstanceUID)


def _dicomweb_cfg(url: str, tmp: Path, user: str | None = None, password: str | None = None,
                  timeout: float = 5.0) -> DestinationConfig:
    pw = write_password(tmp, password) if password else None
    return DestinationConfig(kind="dicomweb", path=None, url=url, username=user, password_file=pw, timeout_s=timeout)


def _stow_ok(uid: str) -> dict:
    return {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [uid]}}]}}


# --------------------------------------------------------------------------- real PACS
def test_pipeline_delivers_to_orthanc_verified_by_qido(tmp_path, orthanc):
    cfg = make_config(tmp_path, destination=_dicomweb_cfg(orthanc.dicomweb, tmp_path, orthanc.user, orthanc.password))
    cfg.inbox.mkdir(parents=True)
    for i in range(3):
        synthetic_mammogram(128, 104, seed=i)[0].save_as(cfg.inbox / f"m{i}.dcm", enforce_file_format=True)
    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm"):
        (cfg.inbox / name).write_bytes((PYDICOM_TEST_FILES / name).read_bytes())
    for f in cfg.inbox.iterdir():
        os.utime(f, (0, 0))
    daemon = Daemon(cfg)
    assert daemon.run_once() == 0
    sent = daemon.spool.ready(SENT)
    assert len(sent) >= 6
    for item_id in sent:
        uid = pydicom.dcmread(daemon.spool.path(SENT, item_id), stop_before_pixels=True).SOPInstanceUID
        assert len(orthanc.qido_instance(uid)) == 1
    assert orthanc.instance_count() == len(sent)


def test_resend_is_the_same_instance_for_the_pacs(tmp_path, orthanc):
    path, uid = _anonymized_file(tmp_path)
    dest = make_destination(_dicomweb_cfg(orthanc.dicomweb, tmp_path, orthanc.user, orthanc.password))
    size, digest = file_digest(path)
    dest.send(path, "a" * 24, digest)
    dest.send(path, "a" * 24, digest)  # a crash between send and record: sent again after restart
    assert orthanc.instance_count() == 1 and len(orthanc.qido_instance(uid)) == 1


def test_wrong_password_is_an_auth_error(tmp_path, orthanc):
    path, _ = _anonymized_file(tmp_path)
    dest = make_destination(_dicomweb_cfg(orthanc.dicomweb, tmp_path, orthanc.user, "wrong"))
    with pytest.raises(AuthUploadError):
        dest.send(path, "a" * 24, file_digest(path)[1])


def test_cut_off_body_is_not_taken_for_delivery(tmp_path, orthanc):
    """Orthanc answers 200 with an empty ReferencedSOPSequence to a truncated body: not proof."""
    import requests

    from medsendx_edge.upload.destinations.dicomweb import REFERENCED_SOP_SEQ

    data = (PYDICOM_TEST_FILES / "CT_small.dcm").read_bytes()
    b = "xyz"
    body = f"--{b}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + f"\r\n--{b}--\r\n".encode()
    r = requests.post(orthanc.dicomweb + "/studies", data=body[: len(body) // 2], auth=(orthanc.user, orthanc.password),
                      headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={b}'})
    assert r.status_code == 200 and not r.json().get(REFERENCED_SOP_SEQ, {}).get("Value")


# --------------------------------------------------------------------------- fault matrix
def _queue_one(tmp_path: Path, upload: UploadConfig, dest_cfg: DestinationConfig) -> tuple[Uploader, str, str]:
    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    src, uid = _anonymized_file(tmp_path)
    item_id = "0" * 23 + "1"
    os.replace(src, spool.path(OUTBOX, item_id))
    up = Uploader(spool, make_destination(dest_cfg), upload, rng=lambda a, b: b)
    up.reconcile()
    return up, item_id, uid


FAST = UploadConfig(initial_backoff_s=1, max_backoff_s=600)


@pytest.mark.parametrize("status, headers, body, expect", [
    (500, {}, None, "transient"),
    (503, {"Retry-After": "120"}, None, "transient>=120"),
    (503, {"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"}, None, "transient>=600"),
    (429, {"Retry-After": "30"}, None, "transient>=30"),
    (408, {}, None, "transient"),
    (200, {}, {"00081199": {"vr": "SQ"}}, "transient"),   # empty ReferencedSOPSequence
    (200, {}, "OK", "delivered"),
    (202, {}, "OK", "delivered"),
    (409, {}, "FAILED", "quarantine"),
    (202, {}, "FAILED", "quarantine"),
    (400, {}, None, "quarantine"),
    (415, {}, None, "quarantine"),
    (401, {}, None, "auth"),
    (403, {}, None, "auth"),
])
def test_fault_matrix(tmp_path, httpserver, status, headers, body, expect):
    up, item_id, uid = _queue_one(tmp_path, FAST, _dicomweb_cfg(httpserver.url_for("/dw"), tmp_path))
    if body == "OK":
        body = _stow_ok(uid)
    elif body == "FAILED":
        body = {"00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [uid]},
                                                    "00081197": {"vr": "US", "Value": [49442]}}]}}
    httpserver.expect_request("/dw/studies", method="POST").respond_with_response(
        Response(json.dumps(body) if body is not None else "", status=status, headers=headers,
                 content_type="application/dicom+json"))
    t0 = time.time()
    assert up.step(t0)
    row = up.spool.state.item(item_id)
    if expect == "delivered":
        assert row.state == "delivered" and up.spool.ready(SENT) == [item_id]
    elif expect.startswith("transient"):
        assert row.state == "queued" and row.attempts == 1 and up.spool.ready(OUTBOX) == [item_id]
        floor = float(expect.split(">=")[1]) if ">=" in expect else 1.0
        assert row.next_attempt >= t0 + floor - 1
        assert row.next_attempt <= t0 + 600 + 1  # never beyond max_backoff_s
        assert row.last_error and uid not in row.last_error
    elif expect == "quarantine":
        assert row.state == "quarantined" and list(up.spool.quarantined()) == [("upload", item_id)]
        reason = up.spool.reason("upload", item_id)["reason"]
        assert str(status) in reason or "49442" in reason
    elif expect == "auth":
        assert up.uplink.paused_auth and up.uplink.hold_until >= t0 + 599
        assert up.step(t0 + 1) is False  # paused: no spinning
        assert up.spool.ready(OUTBOX) == [item_id]
    body_sent = [req for req, _resp in httpserver.log if req.method == "POST"][0].get_data()
    assert uid.encode() in body_sent and body_sent.startswith(b"--medsendx-")


def test_response_slower_than_the_timeout_is_transient(tmp_path, httpserver):
    up, item_id, uid = _queue_one(tmp_path, FAST, _dicomweb_cfg(httpserver.url_for("/dw"), tmp_path, timeout=0.3))

    def slow(request):
        time.sleep(1.0)
        return Response(json.dumps(_stow_ok(uid)), status=200)

    httpserver.expect_request("/dw/studies").respond_with_handler(slow)
    up.step(time.time())
    row = up.spool.state.item(item_id)
    assert row.state == "queued" and "Timeout" in row.last_error


def _reset_server(read_bytes: int = 2048) -> tuple[int, threading.Thread, list[int]]:
    """A TCP server that reads part of the request body, then resets the connection (RST)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    got: list[int] = []

    def run() -> None:
        srv.settimeout(10)
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        n = 0
        while n < read_bytes:
            chunk = conn.recv(4096)
            if not chunk:
                break
            n += len(chunk)
        got.append(n)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()
        srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return port, t, got


def test_connection_reset_mid_body_is_transient(tmp_path):
    port, t, got = _reset_server()
    up, item_id, _ = _queue_one(tmp_path, FAST, _dicomweb_cfg(f"http://127.0.0.1:{port}/dw", tmp_path))
    src = up.spool.path(OUTBOX, item_id)
    big, _ = _anonymized_file(tmp_path, "big.dcm", rows=1024)  # 2 MB: the reset comes mid-body
    os.replace(big, src)
    up.spool.state.set_state(item_id, UploadState.QUEUED)
    with up.spool.state.tx() as db:
        db.execute("UPDATE queue SET sha256 = ?, size = ? WHERE id = ?", (file_digest(src)[1], src.stat().st_size, item_id))
    up.step(time.time())
    t.join(10)
    assert got and got[0] < src.stat().st_size
    row = up.spool.state.item(item_id)
    assert row.state == "queued" and row.last_error.startswith("network:")


def test_uplink_down_once_restored_once_and_idle_cpu(tmp_path, httpserver, log_lines):
    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    uids = {}
    for i in range(5):
        p, uid = _anonymized_file(tmp_path, f"f{i}.dcm", seed=i)
        item_id = f"{i + 1:024x}"
        os.replace(p, spool.path(OUTBOX, item_id))
        uids[item_id] = uid
    link = {"up": False}

    def handler(request):
        if not link["up"]:
            return Response("", status=503)
        body = request.get_data()
        uid = next(u for u in uids.values() if u.encode() in body)
        return Response(json.dumps(_stow_ok(uid)), status=200)

    httpserver.expect_request("/dw/studies").respond_with_handler(handler)
    cfg = UploadConfig(initial_backoff_s=0.05, max_backoff_s=0.4)
    up = Uploader(spool, make_destination(_dicomweb_cfg(httpserver.url_for("/dw"), tmp_path)), cfg)
    t = threading.Thread(target=up.run, daemon=True)
    t.start()

    def wait_for(cond, timeout=20.0):
        deadline = time.monotonic() + timeout
        while not cond() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cond()

    # Events, not sleeps: the link declared down, then twenty more probes while it stays down.
    wait_for(lambda: spool.state.uplink()[0] == "down")
    probes0 = len(httpserver.log)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    wall0 = time.monotonic()
    wait_for(lambda: len(httpserver.log) >= probes0 + 20)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.monotonic() - wall0
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    assert cpu < 0.25 * wall                 # idle while it waits
    assert 20 / wall < 20, wall              # backed off (full jitter up to 0.4 s), not hammering
    probes_offline = len(httpserver.log)
    link["up"] = True
    deadline = time.time() + 10
    while len(spool.ready(SENT)) < 5 and time.time() < deadline:
        time.sleep(0.05)
    up.stop.set()
    up.wake.set()
    t.join(5)
    assert len(spool.ready(SENT)) == 5
    events = [json.loads(line)["event"] for line in log_lines.getvalue().splitlines()]
    assert events.count("uplink_down") == 1 and events.count("uplink_restored") == 1
    # No line per retry: at most one per item before the link is declared down.
    assert probes_offline >= 5 and events.count("upload_deferred") <= 2
    assert spool.state.get("uplink") == "up"


def test_bandwidth_cap_and_http_put_template(tmp_path, httpserver):
    path, _ = _anonymized_file(tmp_path, rows=700)  # ~1 MB
    size, digest = file_digest(path)
    httpserver.expect_request(f"/ingest/{'b' * 24}.dcm", method="PUT").respond_with_data("", status=201, headers={"ETag": "\"d41d8cd9\""})  # as an object store answers a PUT
    cfg = DestinationConfig(kind="http", path=None, url=httpserver.url_for("/ingest/{id}.dcm"), http_method="PUT")
    dest = make_destination(cfg, bandwidth_limit_bps=2_000_000)
    t0 = time.monotonic()
    dest.send(path, "b" * 24, digest)
    elapsed = time.monotonic() - t0
    assert elapsed >= size / 2_000_000 * 0.8
    req = httpserver.log[0][0]
    assert req.get_data() == path.read_bytes() and req.headers["X-Content-SHA256"] == digest
    httpserver.clear()
    httpserver.expect_request("/ingest/x", method="POST").respond_with_data("", status=500)
    dest = make_destination(DestinationConfig(kind="http", path=None, url=httpserver.url_for("/ingest/x")))
    with pytest.raises(TransientUploadError):
        dest.send(path, "c" * 24, digest)


def test_bearer_token_from_env(tmp_path, httpserver, monkeypatch):
    monkeypatch.setenv("MEDSENDX_EDGE_TOKEN", "tok-123")
    path, uid = _anonymized_file(tmp_path)
    httpserver.expect_request("/dw/studies", headers={"Authorization": "Bearer tok-123"}).respond_with_json(
        _stow_ok(uid))
    make_destination(_dicomweb_cfg(httpserver.url_for("/dw"), tmp_path)).send(path, "d" * 24, "x")


def test_clock_jump_clamp_and_sent_pruning(tmp_path):
    up, item_id, _ = _queue_one(tmp_path, UploadConfig(initial_backoff_s=1, max_backoff_s=60, sent_retention_days=1),
                                DestinationConfig(kind="directory", path=tmp_path / "archive"))
    now = time.time()
    up.spool.state.defer(item_id, now + 10 * 365 * 86400, "x")  # the clock was years ahead
    assert up.spool.state.clamp_next_attempts(now, 60) == 1
    assert up.spool.state.item(item_id).next_attempt <= now + 60
    with up.spool.state.tx() as db:
        db.execute("UPDATE queue SET next_attempt = 0")
    assert up.step() and up.spool.ready(SENT) == [item_id]
    assert up.step() is False  # delivered: never sent again
    old = time.time() - 3 * 86400
    os.utime(up.spool.path(SENT, item_id), (old, old))
    assert up.prune_sent() == 1 and up.spool.ready(SENT) == []


def test_status_shows_the_backlog_goodput_and_time_to_drain(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    now = time.time()
    for i, (size, state) in enumerate([(4_000_000, "queued"), (2_000_000, "queued"), (3_000_000, "delivered")]):
        spool.state.enqueue(f"{i:024x}", 2, size, "x", now=now)
        if state == "delivered":
            spool.state.mark_delivered(f"{i:024x}", "2026-11-27T00:00:00Z")
    b = spool.state.queue_summary()["backlog"]
    assert b["items"] == 2 and b["bytes"] == 6_000_000
    assert b["goodput_bps_10min"] == pytest.approx(3_000_000 / 600, rel=1e-6)
    assert b["drain_s"] == pytest.approx(6_000_000 / (3_000_000 / 600), rel=1e-3)


@pytest.mark.parametrize("compression", ["none", "jpeg-ls"])
def test_the_uploader_never_sees_a_queue_row_before_its_file(tmp_path, compression):
    """The CI failure of stop 19: the route stage queued the row, the uploader thread looked before the
    file was renamed into the outbox, found no file, and marked the item 'missing' (lost).  Here the
    uploader looks at the exact moment each row appears, and again whenever the route publishes."""
    cfg = make_config(tmp_path, destination=DestinationConfig(kind="directory", path=tmp_path / "archive",
                                                              compression=compression))
    cfg.inbox.mkdir(parents=True)
    for i in range(3):
        synthetic_mammogram(256, 208, seed=i)[0].save_as(cfg.inbox / f"m{i}.dcm", enforce_file_format=True)
        os.utime(cfg.inbox / f"m{i}.dcm", (0, 0))
    daemon = Daemon(cfg)
    state, spool, uploader = daemon.spool.state, daemon.spool, daemon.uploader
    real_enqueue, real_publish, real_finish = state.enqueue, spool.publish, spool.pass_on
    looks = []

    def look():
        for row in state.due(float("inf"), limit=100):
            looks.append(row.id)
            uploader.step(time.time(), row=row)

    def enqueue_then_look(*args, **kwargs):
        real_enqueue(*args, **kwargs)
        look()

    def look_then_publish(queue, *args, **kwargs):
        if queue == OUTBOX:
            look()
        return real_publish(queue, *args, **kwargs)

    def look_then_finish(item, queue, *args, **kwargs):
        if queue == OUTBOX:
            look()
        return real_finish(item, queue, *args, **kwargs)

    state.enqueue = enqueue_then_look
    spool.publish = look_then_publish
    spool.pass_on = look_then_finish
    daemon.recover()
    daemon.scanner.scan(may_adopt=True)
    daemon.process_pipeline()
    daemon._stop_triage_pool()
    assert len(looks) >= 3
    rows = [state.item(i) for i in spool.ready(SENT)]
    assert len(rows) == 3 and {r.state for r in rows} == {"delivered"}
    assert len(list((tmp_path / "archive").iterdir())) == 3
    assert spool.ready(OUTBOX) == []


def test_sync_gives_a_file_found_in_the_outbox_its_triage_priority_and_revives_a_missing_row(tmp_path):
    spool = Spool(tmp_path / "spool")
    item_id = new_id()
    src, _ = _anonymized_file(tmp_path)
    spool.publish_file(OUTBOX, item_id, src)
    spool.publish_companion(OUTBOX, item_id, ".json", json.dumps({"priority": "high"}).encode())
    uploader = Uploader(spool, make_destination(DestinationConfig(kind="directory", path=tmp_path / "out")),
                        UploadConfig())
    uploader.reconcile()
    assert spool.state.item(item_id).priority == Priority.HIGH
    spool.state.set_state(item_id, UploadState.MISSING, "outbox file missing")
    uploader.reconcile()
    assert spool.state.item(item_id).state == "queued"
    assert uploader.drain_once() == 0 and spool.state.item(item_id).state == "delivered"


def test_after_a_reload_upload_events_name_the_new_destination_and_host_never_its_credentials(tmp_path, log_lines):
    """Issue 26: after a reload to DICOMweb the upload events still said `destination: directory`, and
    no event named the host."""

    from medsendx_edge.config import load_config
    from medsendx_edge.daemon import Daemon

    cfg = make_config(tmp_path)
    base = {"spool_dir": str(cfg.spool_dir),
            "anonymize": {"secret_file": str(cfg.anonymize.secret_file),
                          "linkage_key_file": str(cfg.anonymize.linkage_key_file)},
            "destination": {"kind": "directory", "path": str(tmp_path / "archive")}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base))
    daemon = Daemon(load_config(path), config_path=path)
    import structlog

    from medsendx_edge.logs import redact_phi

    before = structlog.get_context(daemon.uploader.log)
    pw = tmp_path / "pw"
    pw.write_text("hunter2-secret\n")
    pw.chmod(0o600)
    base["destination"] = {"kind": "dicomweb", "url": "http://127.0.0.1:8042/dicom-web", "username": "truck",
                           "password_file": str(pw)}
    path.write_text(yaml.safe_dump(base))
    assert daemon.reload() is True
    after = structlog.get_context(daemon.uploader.log)
    assert before["destination"] == "directory" and before["host"] == f"directory {tmp_path / 'archive'}"
    assert after["destination"] == "dicomweb" and after["host"] == "dicomweb 127.0.0.1:8042"
    line = redact_phi(None, "info", {"event": "file_uploaded", **after})   # the host survives the log's filter
    assert line["host"] == "dicomweb 127.0.0.1:8042" and "redacted_keys" not in line
    assert "hunter2" not in str(after) and "truck" not in after["host"]


def test_a_queued_record_whose_file_is_in_sent_is_recorded_delivered_not_spun_on(tmp_path):
    """A state database restored from a backup says queued for an item delivered since (its file in sent/):
    recorded as delivered once, never sent again, and the uploader moves on to the next item."""
    from medsendx_edge.spool import OUTBOX, SENT, Spool
    from medsendx_edge.upload.uploader import Uploader
    from medsendx_edge.vocabulary import Priority, UploadState

    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    for name in ("a", "b"):
        item = "0" * 23 + name
        spool.publish(OUTBOX, item, lambda fh: fh.write(b"x"))
        spool.state.enqueue(item, Priority.NORMAL, 1, "h", now=0.0)
    done = "0" * 23 + "a"
    os.replace(spool.path(OUTBOX, done), spool.path(SENT, done))   # delivered by the newer release

    class Dest:
        kind = "directory"
        progress = None
        sent: list[str] = []

        def send(self, path, item_id, sha256, **kw):
            self.sent.append(item_id)

        def close(self):
            pass

    dest = Dest()
    up = Uploader(spool, dest, UploadConfig())
    assert up.step(now=1.0) and up.step(now=1.0)
    assert spool.state.item(done).state is UploadState.DELIVERED
    assert len(dest.sent) == 1 and dest.sent[0] != done
    assert not up.step(now=1.0)     # nothing left: no spin
