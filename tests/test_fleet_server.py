"""The fleet service on a real PostgreSQL (issue 27): tokens stored hashed and revocable, idempotent uploads
(the same id again changes nothing, other bytes are a conflict), feature files checked and kept as Parquet
by station and day, heartbeats giving the truck's latest word whatever order they arrive in, and a daemon
reporting to it through its durable fleet outbox, shown on the dashboard in Chromium."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from conftest import make_config
from medsendx_edge.config import DestinationConfig, FleetConfig, replace
from medsendx_edge.fleet.server import FleetDB, create_app
from medsendx_edge.synthetic import synthetic_mammogram


@pytest.fixture
def fleet(postgres, tmp_path):
    """A fresh database in the server, the app on a free port, the operator's password."""
    import psycopg
    from werkzeug.serving import make_server

    name = f"fleet_{os.getpid()}_{time.monotonic_ns()}"
    with psycopg.connect(postgres, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = postgres.rsplit("/", 1)[0] + "/" + name
    db = FleetDB(dsn)
    assert db.migrate() == db.migrate() == 2            # idempotent
    server = make_server("127.0.0.1", 0, create_app(dsn, tmp_path / "features", "operator-pw", tmp_path / "reports"),
                         threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield db, f"http://127.0.0.1:{server.server_port}", tmp_path / "features"
    finally:
        server.shutdown()


def _heartbeat(sent_at: str, backlog: int) -> bytes:
    return json.dumps({"kind": "heartbeat", "sent_at": sent_at,
                       "status": {"version": "0.1.0", "healthy": True, "backlog": backlog, "uplink": "up",
                                  "disk_free_mb": 1234.5, "rechecks_today": 2}}).encode()


def test_tokens_uploads_are_idempotent_and_checked(fleet):
    db, base, features = fleet
    token = db.add_truck("TRUCK_A")
    with db.connect() as conn:   # only its hash is stored
        stored = conn.execute("SELECT token_sha256 FROM trucks WHERE station = 'TRUCK_A'").fetchone()[0]
    assert stored == hashlib.sha256(token.encode()).hexdigest() and token not in stored
    auth = {"Authorization": f"Bearer {token}"}
    url = base + "/api/v1/uploads/hb-1"
    assert requests.put(url, data=_heartbeat("2026-12-05T10:00:00+00:00", 3)).status_code == 401
    assert requests.put(url, data=_heartbeat("2026-12-05T10:00:00+00:00", 3),
                        headers={"Authorization": "Bearer nope"}).status_code == 401
    r = requests.put(url, data=_heartbeat("2026-12-05T10:00:00+00:00", 3), headers=auth)
    assert r.status_code == 201 and r.headers["ETag"]
    again = requests.put(url, data=_heartbeat("2026-12-05T10:00:00+00:00", 3), headers=auth)
    assert again.status_code == 200 and again.json()["stored"] == "already"
    assert requests.put(url, data=_heartbeat("2026-12-05T10:00:01+00:00", 3), headers=auth).status_code == 409
    head = requests.head(url, headers=auth)
    assert head.status_code == 200 and head.headers["X-Content-SHA256"] == r.json()["sha256"]
    # an older heartbeat arriving late (a backlog catching up) does not overwrite the latest word
    assert requests.put(base + "/api/v1/uploads/hb-0", data=_heartbeat("2026-12-05T09:00:00+00:00", 99),
                        headers=auth).status_code == 201
    trucks = requests.get(base + "/api/v1/trucks", auth=("fleet", "operator-pw")).json()["trucks"]
    assert trucks[0]["station"] == "TRUCK_A" and trucks[0]["backlog"] == 3 and trucks[0]["rechecks_today"] == 2
    assert requests.get(base + "/api/v1/trucks", auth=("fleet", "wrong")).status_code == 401
    # feature rows: Parquet with the feature columns only (anything else could carry patient data)
    good = io.BytesIO()
    pq.write_table(pa.table({"station_name": ["TRUCK_A"] * 2, "acquired_date": ["20261204"] * 2, "pd": [0.2, 0.4]}),
                   good)
    r = requests.put(base + "/api/v1/uploads/f-1", data=good.getvalue(), headers=auth)
    assert r.status_code == 201 and r.json()["rows"] == 2
    assert (features / "station=TRUCK_A" / "day=2026-12-04" / "f-1.parquet").exists()
    spoof = io.BytesIO()   # rows under another truck's name
    pq.write_table(pa.table({"station_name": ["TRUCK_B"], "pd": [0.2]}), spoof)
    assert requests.put(base + "/api/v1/uploads/f-3", data=spoof.getvalue(), headers=auth).status_code == 422
    bad = io.BytesIO()
    pq.write_table(pa.table({"pd": [0.2], "PatientName": ["DOE^JANE"]}), bad)
    refused = requests.put(base + "/api/v1/uploads/f-2", data=bad.getvalue(), headers=auth)
    assert refused.status_code == 422 and "PatientName" in refused.json()["error"]
    assert requests.put(base + "/api/v1/uploads/x", data=b"hello", headers=auth).status_code == 415
    odd = json.dumps({"kind": "exams", "exams": [{"exam": "e", "updated": "2026-12-05T00:00:00Z", "category": 3}]})
    assert requests.put(base + "/api/v1/uploads/ex-1", data=odd, headers=auth).status_code == 422   # not a 500
    assert requests.put(base + "/api/v1/uploads/bad%20id", data=_heartbeat("2026-12-05T11:00:00Z", 1),
                        headers=auth).status_code == 400
    assert requests.put(base + "/api/v1/uploads/hb-2", data=_heartbeat("2026-12-05T11:00:00Z", 1),
                        headers={**auth, "X-Content-SHA256": "0" * 64}).status_code == 400   # cut on the way
    # revoked: refused from then on
    assert db.revoke("TRUCK_A")
    assert requests.put(base + "/api/v1/uploads/hb-3", data=_heartbeat("2026-12-05T12:00:00Z", 1),
                        headers=auth).status_code == 401
    spec = requests.get(base + "/api/v1/openapi.json").json()
    assert spec["openapi"].startswith("3.") and "/api/v1/uploads/{id}" in spec["paths"]


def test_a_daemon_reports_to_the_service_through_its_outbox(fleet, tmp_path, browser):
    db, base, features = fleet
    token_file = tmp_path / "fleet.token"
    token_file.write_text(db.add_truck("MOBILE_CLINIC_01"))
    token_file.chmod(0o600)
    cfg = make_config(tmp_path)
    cfg = replace(cfg, fleet=FleetConfig(enabled=True, interval_s=3600, heartbeat_s=3600, destination=DestinationConfig(
        kind="http", path=None, url=base + "/api/v1/uploads/{id}", http_method="PUT", token_file=token_file)))
    cfg.inbox.mkdir(parents=True)
    for seed in (1, 2):
        synthetic_mammogram(256, 208, seed=seed)[0].save_as(cfg.inbox / f"m{seed}.dcm", enforce_file_format=True)
        os.utime(cfg.inbox / f"m{seed}.dcm", (0, 0))
    from medsendx_edge.daemon import Daemon

    daemon = Daemon(cfg)
    assert daemon.run_once() == 0
    with db.connect() as conn:
        kinds = dict(conn.execute("SELECT kind, count(*) FROM uploads GROUP BY kind").fetchall())
        rows = conn.execute("SELECT sum(rows) FROM uploads WHERE kind = 'features'").fetchone()[0]
    assert kinds == {"features": 1, "heartbeat": 1, "exams": 1} and rows == 2
    with db.connect() as conn:
        exams = conn.execute("SELECT exam, category, priority, reasons FROM exams").fetchall()
    assert exams and all(len(e[0]) == 16 for e in exams)   # the fleet's own exam pseudonym, nothing else of her
    with sqlite3.connect(cfg.spool_dir / "state" / "exams.db") as local:   # not the truck's key (the PACS could
        keys = {r[0] for r in local.execute("SELECT exam FROM exam_images")}   # compute that one from its study)
    assert keys and not keys & {e[0] for e in exams}
    assert "PID" not in json.dumps([list(map(str, e)) for e in exams])
    assert len(list(features.rglob("*.parquet"))) == 1
    # the miner reads the service's storage as it is (station=/day= folders, station_name in the files)
    from medsendx_edge.fleet import dose
    from medsendx_edge.fleet.data import expand_inputs

    stored = dose.load(expand_inputs([features]))
    assert stored["dose"].size == 0        # synthetic images carry no Organ Dose: read as no dose
    trucks = requests.get(base + "/api/v1/trucks", auth=("fleet", "operator-pw")).json()["trucks"]
    assert trucks[0]["station"] == "MOBILE_CLINIC_01" and trucks[0]["healthy"] is True
    # the dashboard in a real browser (basic auth in the URL for the driver only)
    browser.get(base.replace("http://", "http://fleet:operator-pw@") + "/")
    from selenium.webdriver.common.by import By

    text = browser.find_element(By.TAG_NAME, "body").text
    assert "MOBILE_CLINIC_01" in text and "healthy" in text
    shots = Path(__file__).resolve().parent.parent / "docs" / "img"
    if os.environ.get("MEDSENDX_SCREENSHOTS"):
        browser.save_screenshot(str(shots / "fleet-dashboard.png"))


def test_copies_of_one_upload_at_once_store_it_once(fleet):
    """A truck that lost the first answer may send the same upload again while the first is still being
    stored: every copy answers 201 or 200, one row, one file (found by the review: 500s, and a row of one
    body beside the file of the other)."""
    from concurrent.futures import ThreadPoolExecutor

    db, base, features = fleet
    auth = {"Authorization": f"Bearer {db.add_truck('TRUCK_C')}"}
    body = io.BytesIO()
    pq.write_table(pa.table({"station_name": ["TRUCK_C"] * 500, "pd": [0.3] * 500}), body)
    data = body.getvalue()
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: requests.put(base + "/api/v1/uploads/same", data=data, headers=auth,
                                                     timeout=30).status_code, range(8)))
    assert sorted(codes) == [200] * 7 + [201], codes
    files = list(features.rglob("same.parquet"))
    assert len(files) == 1 and not list(features.rglob("*.tmp"))
    assert pq.read_table(files[0]).num_rows == 500
    with db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM uploads WHERE upload_id = 'same'").fetchone()[0] == 1


def test_the_service_mines_on_its_schedule_and_the_dashboard_names_the_findings(fleet, tmp_path, browser):
    """Ten trucks send their feature rows; the service's miner (its schedule, one tick here) names the unit
    whose scanner is broken and the unit that over-doses, on the dashboard and on the truck's page."""
    import numpy as np
    from fleet_synth import make_fleet
    from selenium.webdriver.common.by import By

    from medsendx_edge.fleet.server import MineSchedule

    db, base, features = fleet
    synth = make_fleet(n_stations=10, images_per_station=200, n_faulty=1, n_dense=0, n_drift=0, seed=3)
    rows = synth.rows
    rng = np.random.default_rng(4)
    names = sorted(set(rows["station_name"].tolist()))
    over = next(n for n in names if n not in synth.faulty)
    factor = np.where(rows["station_name"] == over, 1.6, 1.0)
    rows = {**rows, "organ_dose_mgy": 0.55 * np.exp(0.022 * rows["thickness_mm"]) * rng.lognormal(0, 0.14, len(factor))
            * factor}
    for name in names:
        token = db.add_truck(name)
        sel = rows["station_name"] == name
        buf = io.BytesIO()
        pq.write_table(pa.table({c: v[sel] for c, v in rows.items()}), buf)
        r = requests.put(base + "/api/v1/uploads/day-1", data=buf.getvalue(),
                         headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 201, r.text
    schedule = MineSchedule(features, tmp_path / "reports", 3600)
    assert schedule.once(), schedule.last_error
    browser.get(base.replace("http://", "http://fleet:operator-pw@") + "/")
    page = browser.find_element(By.TAG_NAME, "body").text
    assert "Scanner QC" in page and over in page and next(iter(synth.faulty)) in page
    if os.environ.get("MEDSENDX_SCREENSHOTS"):
        browser.save_screenshot(str(Path(__file__).resolve().parent.parent / "docs" / "img" / "fleet-dashboard.png"))
    browser.get(base.replace("http://", "http://fleet:operator-pw@") + f"/trucks/{over}")
    page = browser.find_element(By.TAG_NAME, "body").text
    assert "dose" in page and "against its peers" in page
    assert requests.get(base + "/reports/report.html", auth=("fleet", "operator-pw")).status_code == 200
    assert requests.get(base + "/reports/../x", auth=("fleet", "operator-pw")).status_code == 404


def test_a_truck_killed_and_restarted_sends_each_report_once(fleet, tmp_path):
    """A truck reporting to the service is killed with SIGKILL at file-system steps of its run (the fleet
    outbox, the heartbeat, the feature file, the exams and their uploads among them), then restarted: the
    service ends with every feature row once, every exam once, every upload id once, nothing lost."""
    from conftest import age_files, run_killed_at

    from medsendx_edge.daemon import Daemon

    db, base, features = fleet
    token_file = tmp_path / "fleet.token"
    token_file.write_text(db.add_truck("MOBILE_CLINIC_01"))
    token_file.chmod(0o600)

    def fresh(root: Path):
        cfg = make_config(root)
        cfg = replace(cfg, fleet=FleetConfig(enabled=True, interval_s=3600, heartbeat_s=3600,
                                             destination=DestinationConfig(kind="http", path=None,
                                                                           url=base + "/api/v1/uploads/{id}",
                                                                           http_method="PUT", token_file=token_file)))
        cfg.inbox.mkdir(parents=True)
        for seed in (1, 2):
            synthetic_mammogram(128, 104, seed=seed, patient_id=f"PID-K{root.name}{seed}")[0].save_as(
                cfg.inbox / f"m{seed}.dcm", enforce_file_format=True)
        age_files(cfg.inbox)
        return cfg

    steps = run_killed_at(lambda: Daemon(fresh(tmp_path / "count")).run_once(), 0)
    assert steps > 20
    # the fleet's part is at the end of a run: every step of the last quarter, a sample before it
    points = sorted(set(range(steps // 2, 3 * steps // 4, max(1, steps // 24))) | set(range(3 * steps // 4, steps)))
    killed = 0
    for k in points:
        cfg = fresh(tmp_path / f"k{k}")
        # (a run's step count varies by a few with its threads' timing: the last points may see it finish)
        killed += run_killed_at(lambda: Daemon(cfg).run_once(), k) == 0
        assert Daemon(cfg).run_once() == 0                              # the restart finishes the job
    assert killed >= len(points) - 5, (killed, len(points))
    with db.connect() as conn:
        rows = conn.execute("SELECT coalesce(sum(rows), 0) FROM uploads WHERE kind = 'features'").fetchone()[0]
        ids = conn.execute("SELECT count(*), count(DISTINCT upload_id) FROM uploads").fetchone()
        exams = conn.execute("SELECT count(*) FROM exams").fetchone()[0]
    runs = len(points) + 1
    assert rows == 2 * runs, (rows, runs)            # each run's two images, once each, whatever the kill
    assert ids[0] == ids[1]
    assert exams == 2 * runs                         # each run's two exams (own studies), once each
    files = list(features.rglob("*.parquet"))
    assert sum(pq.read_table(f).num_rows for f in files) == 2 * runs and not list(features.rglob("*.tmp"))


def test_the_service_over_tls_and_a_truck_that_checks_its_certificate(postgres, tmp_path):
    """``fleet-server --tls-cert --tls-key``: HTTPS only, TLS 1.2 or later; a truck whose fleet destination
    names the service's CA (``ca_bundle``) reports through it; a client that does not know the CA is
    refused by its own check, plain HTTP gets no service, and a key readable by others is refused at start."""
    import re
    import subprocess
    import sys

    import psycopg

    from tlsutil import self_signed

    name = f"fleet_tls_{os.getpid()}_{time.monotonic_ns()}"
    with psycopg.connect(postgres, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = postgres.rsplit("/", 1)[0] + "/" + name
    cert, key = self_signed(tmp_path, "127.0.0.1")
    pw = tmp_path / "operator.pw"
    pw.write_text("operator-pw")
    pw.chmod(0o600)
    cmd = [sys.executable, "-m", "medsendx_edge.cli", "fleet-server", "--dsn", dsn, "--storage", str(tmp_path / "f"),
           "--password-file", str(pw), "--port", "0", "--tls-cert", str(cert), "--tls-key", str(key)]
    key.chmod(0o644)
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "readable by others" in refused.stderr
    key.chmod(0o600)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in proc.stderr:   # type: ignore[union-attr]
            m = re.search(r"fleet service on https://127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "the service did not say where it listens"
        base = f"https://127.0.0.1:{port}"
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(base + "/api/v1/trucks", auth=("fleet", "operator-pw"), timeout=10)
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/api/v1/trucks", auth=("fleet", "operator-pw"), timeout=10)
        import socket

        silent = socket.create_connection(("127.0.0.1", port))   # a truck whose link dropped after the TCP handshake
        try:   # the handshake is the connection's own thread's business: the others are served meanwhile
            assert requests.get(base + "/api/v1/trucks", auth=("fleet", "operator-pw"), verify=str(cert),
                                timeout=10).status_code == 200
        finally:
            silent.close()
        db = FleetDB(dsn)
        token_file = tmp_path / "fleet.token"
        token_file.write_text(db.add_truck("MOBILE_CLINIC_01"))   # make_config's station
        token_file.chmod(0o600)
        cfg = make_config(tmp_path)
        cfg = replace(cfg, fleet=FleetConfig(enabled=True, interval_s=3600, heartbeat_s=3600, destination=DestinationConfig(
            kind="http", path=None, url=base + "/api/v1/uploads/{id}", http_method="PUT", token_file=token_file,
            ca_bundle=cert)))
        cfg.inbox.mkdir(parents=True)
        synthetic_mammogram(256, 208, seed=1)[0].save_as(cfg.inbox / "m.dcm", enforce_file_format=True)
        os.utime(cfg.inbox / "m.dcm", (0, 0))
        from medsendx_edge.daemon import Daemon

        assert Daemon(cfg).run_once() == 0
        with db.connect() as conn:
            kinds = dict(conn.execute("SELECT kind, count(*) FROM uploads GROUP BY kind").fetchall())
        assert kinds.get("heartbeat") == 1 and kinds.get("features") == 1
    finally:
        proc.terminate()
        proc.wait(30)


def test_tls_keys_the_service_refuses_say_why(tmp_path):
    """A key with a passphrase (a service cannot type it), a key others can read, an empty path, a key that
    does not match the certificate: each a ConfigError that says what to do, never a prompt or a traceback."""
    from cryptography.hazmat.primitives import serialization

    from medsendx_edge.errors import ConfigError
    from medsendx_edge.fleet.server import tls_context
    from tlsutil import self_signed

    cert, key = self_signed(tmp_path, "127.0.0.1")
    (tmp_path / "other").mkdir()
    _other_cert, other_key = self_signed(tmp_path / "other", "localhost")
    assert tls_context(cert, key).ctx.minimum_version.name == "TLSv1_2"
    pk = serialization.load_pem_private_key(key.read_bytes(), None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(pk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.BestAvailableEncryption(b"secret")))
    locked.chmod(0o600)
    with pytest.raises(ConfigError, match="passphrase"):
        tls_context(cert, locked)
    with pytest.raises(ConfigError, match="cannot be used"):
        tls_context(cert, other_key)
    with pytest.raises(ConfigError, match="no such file"):
        tls_context(cert, Path(""))
    key.chmod(0o640)
    with pytest.raises(ConfigError, match="readable by others"):
        tls_context(cert, key)


def test_an_upload_whose_body_stops_gets_408_and_is_sent_again_not_quarantined(fleet, tmp_path, monkeypatch):
    """A truck's link stalls mid-body past the service's connection timeout: the answer is 408 (which the
    truck's uploader retries), not werkzeug's 400 (which it would take as a refusal and quarantine)."""
    import socket

    from werkzeug.serving import make_server

    from medsendx_edge.fleet import server as fleet_server
    from medsendx_edge.upload.destinations._http import TRANSIENT_STATUS

    db, _base, _features = fleet
    token = db.add_truck("MOBILE_CLINIC_01")
    monkeypatch.setattr(fleet_server, "CONNECTION_TIMEOUT_S", 1.0)
    srv = make_server("127.0.0.1", 0, create_app(db.dsn, tmp_path / "f", "operator-pw"), threaded=True,
                      request_handler=fleet_server.request_handler())
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with socket.create_connection(("127.0.0.1", srv.server_port), timeout=30) as s:
            s.sendall(b"PUT /api/v1/uploads/0123456789abcdef01234567 HTTP/1.1\r\nHost: x\r\n"
                      b"Authorization: Bearer " + token.encode() + b"\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n" + b"{" * 10)          # then nothing: the link stalled
            answer = s.recv(4096).decode()
    finally:
        srv.shutdown()
    status = int(answer.split()[1])
    assert status == 408 and status in TRANSIENT_STATUS, answer[:200]
