"""The fleet service (issue 27, first part): the place every truck reports to.

``medsendx-edge fleet-server --dsn postgresql://... --storage DIR``: a Flask app (the package's web
framework) on PostgreSQL (psycopg 3).  Trucks send through their durable fleet outbox and uploader (the
``http`` destination: ``PUT {url}/api/v1/uploads/{id}`` with a bearer token), so a truck offline for a day
catches up and nothing is sent twice:

* **authentication**: one token per truck (``fleet-token add STATION`` prints it once; only its SHA-256
  is stored; ``fleet-token revoke``).  The station is the token's, never the payload's: a truck writes
  only its own rows.
* **uploads, idempotent**: ``PUT /api/v1/uploads/<id>``; the same id with the same bytes again is
  "already here" (200), with other bytes a conflict (409); ``HEAD`` answers ``X-Content-SHA256`` and the
  length (what the truck's uploader asks before a re-send).  What an upload is comes from its content:
  a Parquet file of feature rows (checked against the feature columns: any other column is refused, so
  nothing else can ride along), or JSON ``{"kind": "heartbeat", ...}`` (the truck's ``status``) or
  ``{"kind": "exams", ...}`` (per-exam summaries without patient data).  Bodies are bounded (413).
* **storage**: feature files as Parquet partitioned ``station=<s>/day=<yyyy-mm-dd>/<id>.parquet`` (the
  miner reads them with DuckDB); trucks, heartbeats, exams and uploads in PostgreSQL, its schema applied
  by numbered migrations in one transaction each (``schema_migrations``).  An upload is one transaction
  under a lock of its (station, id): the file is written (a unique temp name, fsync, rename) inside it,
  before the row; a failure after the rename leaves a file the truck's retry rewrites with the same rows.
* ``GET /api/v1/trucks`` and the dashboard ``GET /`` (HTTP Basic, the operator's password file), and
  ``GET /api/v1/openapi.json``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import re
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medsendx_edge.vocabulary import FEATURE_COLUMNS

MAX_UPLOAD = 64 * 1024 * 1024
UPLOAD_ID = re.compile(r"^[A-Za-z0-9._-]{1,80}$")
STATION = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
EXTRA_FEATURE_COLUMNS = {"recorded", "id"}   # the row's bookkeeping (features.write_rows)

MIGRATIONS: list[str] = [
    # 1: trucks, their uploads, heartbeats and exam summaries
    """
    CREATE TABLE trucks (
        station TEXT PRIMARY KEY,
        token_sha256 TEXT UNIQUE NOT NULL,
        created TIMESTAMPTZ NOT NULL DEFAULT now(),
        revoked TIMESTAMPTZ,
        last_seen TIMESTAMPTZ,
        version TEXT,
        status JSONB
    );
    CREATE TABLE uploads (
        station TEXT NOT NULL REFERENCES trucks,
        upload_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size BIGINT NOT NULL,
        rows INTEGER,
        received TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (station, upload_id)
    );
    CREATE TABLE heartbeats (
        station TEXT NOT NULL REFERENCES trucks,
        sent_at TIMESTAMPTZ NOT NULL,
        received TIMESTAMPTZ NOT NULL DEFAULT now(),
        status JSONB NOT NULL,
        PRIMARY KEY (station, sent_at)
    );
    CREATE TABLE exams (
        station TEXT NOT NULL REFERENCES trucks,
        exam TEXT NOT NULL,
        category TEXT,
        priority TEXT,
        reasons JSONB,
        updated TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (station, exam)
    );
    """,
    # 2: an exam record's revision (a number the truck raises with each change of the exam: its exam book's
    # record number; its number of images from older trucks): the day alone cannot order two of one day
    """
    ALTER TABLE exams ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
    """,
]


class FleetDB:
    """The service's PostgreSQL database (psycopg 3, one connection per request)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.dsn)

    def migrate(self) -> int:
        """Apply the migrations not applied yet, each in its own transaction; returns the schema version."""
        with self.connect() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                         "applied TIMESTAMPTZ NOT NULL DEFAULT now())")
            conn.commit()
            # one migrating process at a time (several app processes starting together)
            conn.execute("SELECT pg_advisory_lock(7402011)")
            try:
                done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
                for version, sql in enumerate(MIGRATIONS, start=1):
                    if version in done:
                        continue
                    with conn.transaction():
                        conn.execute(sql)
                        conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            finally:
                conn.execute("SELECT pg_advisory_unlock(7402011)")
            conn.commit()
        return len(MIGRATIONS)

    def add_truck(self, station: str) -> str:
        """A new token for ``station`` (made, or replacing its old one); returned once, stored hashed."""
        if not STATION.match(station):
            raise ValueError("a station name is letters, digits, '_', '.', '-' (at most 64)")
        token = secrets.token_urlsafe(32)
        with self.connect() as conn:
            conn.execute("INSERT INTO trucks (station, token_sha256) VALUES (%s, %s) ON CONFLICT (station) DO "
                         "UPDATE SET token_sha256 = excluded.token_sha256, revoked = NULL",
                         (station, _sha(token.encode())))
        return token

    def revoke(self, station: str) -> bool:
        with self.connect() as conn:
            cur = conn.execute("UPDATE trucks SET revoked = now() WHERE station = %s AND revoked IS NULL",
                               (station,))
            return bool(cur.rowcount)

    def station_of(self, token: str) -> str | None:
        with self.connect() as conn:
            row = conn.execute("SELECT station FROM trucks WHERE token_sha256 = %s AND revoked IS NULL",
                               (_sha(token.encode()),)).fetchone()
        return None if row is None else str(row[0])


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _ts(value: Any) -> datetime:
    t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


class BadUpload(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_features(body: bytes, station: str | None = None) -> tuple[Any, str]:
    """The Parquet table and the day it belongs to (its rows' first acquisition date, else today); rows of
    another station than the sender's are refused (a truck writes only its own)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(body))
    except Exception:  # noqa: BLE001 - any unreadable file is the sender's fault
        raise BadUpload(422, "not a readable Parquet file") from None
    unknown = set(table.column_names) - set(FEATURE_COLUMNS) - EXTRA_FEATURE_COLUMNS
    if unknown:
        raise BadUpload(422, f"columns that are not feature columns: {', '.join(sorted(unknown))[:200]}")
    if station is not None and "station_name" in table.column_names:
        others = {str(v) for v in table.column("station_name").to_pylist()} - {station}
        if others:
            raise BadUpload(422, "rows of another station than this truck's token")
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    if "acquired_date" in table.column_names and table.num_rows:
        first = str(table.column("acquired_date")[0].as_py() or "")
        if re.fullmatch(r"\d{8}", first):
            day = f"{first[:4]}-{first[4:6]}-{first[6:]}"
    return table, day


def findings(reports: Path | None) -> dict[str, Any]:
    """The latest miner run's findings (``<reports>/report.json``): the stations flagged, their severity and
    reasons, what is new since the run before, the dose QC's units."""
    if reports is None:
        return {}
    try:
        r = json.loads((reports / "report.json").read_text())
    except (OSError, ValueError):
        r = {}
    if not r and not (reports / "mine-error.txt").exists():
        return {}
    stations = {name: {"severity": st.get("severity"), "reasons": st.get("reasons") or [],
                       "new": any(f.get("new") for f in st.get("findings") or [])}
                for name, st in (r.get("stations") or {}).items() if st.get("flagged")}
    dose = r.get("dose") or {}
    for unit in dose.get("flagged") or []:
        entry = stations.setdefault(unit, {"severity": "high", "reasons": [], "new": False})
        entry["reasons"] = [*entry["reasons"], *(f"dose: {x}" for x in dose["units"][unit]["findings"])]
    error = None
    try:
        error = (reports / "mine-error.txt").read_text().strip() or None
    except OSError:
        pass
    mined = r.get("mined_at")
    when = f"{_ts(mined):%Y-%m-%d %H:%M} UTC" if mined else None
    return {"mined_at": when, "n_stations": r.get("n_stations"), "stations": stations, "error": error}


class MineSchedule:
    """The miner run by the service on a schedule (``fleet-server --mine-every``), over the feature files
    the trucks sent, into ``reports`` (report.json/html, dose.png) for the dashboard.  One thread; a run
    that fails is logged and tried again at the next tick."""

    def __init__(self, storage: Path, reports: Path, every_s: float) -> None:
        import threading

        self.storage, self.reports, self.every_s = storage, reports, every_s
        self.stop = threading.Event()
        self.runs = 0
        self.last_error: str | None = None
        self.thread = threading.Thread(target=self._run, name="fleet-mine", daemon=True)

    def start(self) -> "MineSchedule":
        self.thread.start()
        return self

    def once(self) -> bool:
        from medsendx_edge.fleet.report import mine_to

        if not any(self.storage.rglob("*.parquet")):
            return False
        try:
            mine_to([self.storage], self.reports)
        except Exception as exc:  # noqa: BLE001 - the service stays up; the next tick tries again
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            from medsendx_edge.logs import get_logger

            get_logger().error("fleet_mine_failed", error_class=type(exc).__name__, reason=self.last_error)
            try:   # the dashboard says so beside the last good run
                self.reports.mkdir(parents=True, exist_ok=True)
                (self.reports / "mine-error.txt").write_text(
                    f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: {self.last_error}\n")
            except OSError:
                pass
            return False
        self.runs += 1
        self.last_error = None
        (self.reports / "mine-error.txt").unlink(missing_ok=True)
        return True

    def _run(self) -> None:
        while True:
            self.once()
            if self.stop.wait(self.every_s):
                return


def create_app(dsn: str, storage: Path, admin_password: str, reports: Path | None = None) -> Any:
    from flask import Flask, Response, abort, jsonify, render_template_string, request, send_file

    app = Flask("medsendx_fleet")
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD
    db = FleetDB(dsn)
    storage = Path(storage)

    def truck() -> str:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            abort(401)
        station = db.station_of(auth[7:].strip())
        if station is None:
            abort(401)
        return station

    def operator() -> None:
        auth = request.headers.get("Authorization", "")
        ok = False
        if auth.startswith("Basic "):
            try:
                user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
                ok = user == "fleet" and hmac.compare_digest(pw, admin_password)
            except ValueError:
                ok = False
        if not ok:
            abort(Response("operator login required", 401, {"WWW-Authenticate": 'Basic realm="fleet"'}))

    @app.errorhandler(413)
    def too_large(_e: Any) -> Any:
        return jsonify(error=f"upload larger than {MAX_UPLOAD} bytes"), 413

    from werkzeug.exceptions import ClientDisconnected

    @app.errorhandler(ClientDisconnected)
    def body_cut(_e: Any) -> Any:
        # The body stopped arriving (the connection's timeout, or the truck went away): a 408, which a truck
        # sends again later; werkzeug's own answer, 400, would make it quarantine the file.
        return jsonify(error="the upload's body stopped arriving: send it again"), 408

    @app.route("/api/v1/uploads/<upload_id>", methods=["HEAD"])
    def held(upload_id: str) -> Any:
        station = truck()
        with db.connect() as conn:
            row = conn.execute("SELECT sha256, size FROM uploads WHERE station = %s AND upload_id = %s",
                               (station, upload_id)).fetchone()
        if row is None:
            return Response(status=404)
        return Response(status=200, headers={"X-Content-SHA256": row[0], "Content-Length": str(row[1])})

    @app.route("/api/v1/uploads/<upload_id>", methods=["PUT", "POST"])
    def upload(upload_id: str) -> Any:
        station = truck()
        if not UPLOAD_ID.match(upload_id):
            return jsonify(error="an upload id is letters, digits, '.', '_', '-' (at most 80)"), 400
        body = request.get_data(cache=False)
        digest = _sha(body)
        claimed = request.headers.get("X-Content-SHA256")
        if claimed and claimed != digest:
            return jsonify(error="the body does not match X-Content-SHA256 (cut on the way?)"), 400
        try:
            kind, handle = _classify(body, station)
        except BadUpload as exc:
            return jsonify(error=str(exc)), exc.status
        with db.connect() as conn:
            # one request at a time per (station, id): two copies of one upload at once (a truck that lost
            # the first answer) must not both write its file, nor leave the file of one and the row of the other
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{station}/{upload_id}",))
            row = conn.execute("SELECT sha256 FROM uploads WHERE station = %s AND upload_id = %s",
                               (station, upload_id)).fetchone()
            if row is not None:
                if row[0] == digest:
                    return jsonify(id=upload_id, sha256=digest, stored="already"), 200, {"ETag": f'"{digest}"'}
                return jsonify(error="this upload id was received before with other content"), 409
            try:
                rows = handle(conn, station, upload_id)
            except BadUpload as exc:
                conn.rollback()
                return jsonify(error=str(exc)), exc.status
            conn.execute("INSERT INTO uploads (station, upload_id, kind, sha256, size, rows) VALUES "
                         "(%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                         (station, upload_id, kind, digest, len(body), rows))
        return jsonify(id=upload_id, sha256=digest, kind=kind, rows=rows), 201, {"ETag": f'"{digest}"'}

    def _classify(body: bytes, station: str) -> tuple[str, Any]:
        if body[:4] == b"PAR1":
            table, day = parse_features(body, station)

            def features(conn: Any, station: str, upload_id: str) -> int:
                import pyarrow.parquet as pq

                folder = storage / f"station={station}" / f"day={day}"
                folder.mkdir(parents=True, exist_ok=True)
                tmp = folder / f".{upload_id}.{secrets.token_hex(6)}.tmp"
                pq.write_table(table, tmp)
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, folder / f"{upload_id}.parquet")
                return int(table.num_rows)

            return "features", features
        try:
            doc = json.loads(body)
        except ValueError:
            raise BadUpload(415, "neither a Parquet file of feature rows nor a JSON report") from None
        if not isinstance(doc, dict) or doc.get("kind") not in ("heartbeat", "exams"):
            raise BadUpload(422, "a JSON report has kind heartbeat or exams")
        if doc["kind"] == "heartbeat":
            return "heartbeat", lambda conn, station, _id: _heartbeat(conn, station, doc)
        return "exams", lambda conn, station, _id: _exams(conn, station, doc)

    @app.get("/api/v1/trucks")
    def trucks() -> Any:
        operator()
        return jsonify(trucks=_trucks(db))

    @app.get("/api/v1/openapi.json")
    def openapi() -> Any:
        return jsonify(OPENAPI)

    @app.get("/")
    def dashboard() -> Any:
        operator()
        return render_template_string(DASHBOARD, trucks=_trucks(db), now=datetime.now(timezone.utc), disk=disk_text,
                                      found=findings(reports))

    @app.get("/trucks/<station>")
    def truck_page(station: str) -> Any:
        operator()
        if not STATION.match(station):
            abort(404)
        with db.connect() as conn:
            beats = conn.execute("SELECT sent_at, status FROM heartbeats WHERE station = %s ORDER BY sent_at DESC "
                                 "LIMIT 48", (station,)).fetchall()
            exams = conn.execute("SELECT exam, category, priority, reasons, updated FROM exams WHERE station = %s "
                                 "ORDER BY updated DESC LIMIT 50", (station,)).fetchall()
        truck = next((t for t in _trucks(db) if t["station"] == station), None)
        if truck is None:
            abort(404)
        return render_template_string(TRUCK_PAGE, t=truck, beats=beats, exams=exams, disk=disk_text,
                                      finding=findings(reports).get("stations", {}).get(station))

    @app.get("/reports/<name>")
    def report_file(name: str) -> Any:
        operator()
        if reports is None or name not in ("report.html", "dose.png", "report.json", "stations.csv"):
            abort(404)
        path = reports / name
        if not path.exists():
            abort(404)
        return send_file(path)

    return app


def tls_context(cert: Path, key: Path) -> Any:
    """The service's HTTPS: TLS 1.2 or later, the certificate chain and key given (``fleet-server
    --tls-cert --tls-key``).  A key readable by its group or others is refused (it is the service's
    identity), so is a key with a passphrase (a service cannot type it); every refusal says why.

    The context given to the server defers each handshake to the connection's own thread: werkzeug wraps
    the listening socket, and a handshake done in the accept loop let one silent client (a truck whose
    link dropped after the TCP handshake) hold every other truck off."""
    import ssl

    from medsendx_edge.errors import ConfigError

    try:
        for f in (cert, key):
            if not f.is_file():
                raise ConfigError(f"fleet-server: no such file: {f!s}")
        mode = key.stat().st_mode
    except OSError as exc:   # a folder the service cannot enter (certbot's live/ is 0700)
        raise ConfigError(f"fleet-server: the certificate or key cannot be read "
                          f"({exc.strerror or type(exc).__name__})") from exc
    if mode & 0o077:
        raise ConfigError(f"fleet-server: --tls-key {key} is readable by others (chmod 600)")

    def no_passphrase() -> str:
        raise ConfigError("fleet-server: --tls-key is encrypted with a passphrase: give the service an unencrypted "
                          "key (mode 0600)")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key), password=no_passphrase)
    except ssl.SSLError as exc:
        raise ConfigError(f"fleet-server: the certificate or key cannot be used "
                          f"({exc.reason or str(exc) or type(exc).__name__})") from exc
    except OSError as exc:
        raise ConfigError(f"fleet-server: the certificate or key cannot be read "
                          f"({exc.strerror or type(exc).__name__})") from exc
    return _HandshakeInThread(ctx)


class _HandshakeInThread:
    """What werkzeug's server needs of an SSL context (``wrap_socket``), with the handshake left to the
    first read in the connection's own thread (bounded by the request handler's timeout)."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    def wrap_socket(self, sock: Any, server_side: bool = True, **_: Any) -> Any:
        return self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)


#: Seconds a connection may stay silent (handshake, request line, headers, body) before it is closed: well
#: above a truck's own stall watch (``destination.timeout_s``, 60 s by default), so the truck gives up on
#: a dead link first; this only gives the threads of dead connections back.
CONNECTION_TIMEOUT_S = 300.0


def request_handler() -> Any:
    """werkzeug's request handler with a socket timeout: an idle connection (a truck that went out of
    coverage mid-request) gives its thread back after :data:`CONNECTION_TIMEOUT_S`."""
    from werkzeug.serving import WSGIRequestHandler

    class Handler(WSGIRequestHandler):
        timeout = CONNECTION_TIMEOUT_S

    return Handler


def wsgi_app() -> Any:
    """The app for a WSGI server of several processes (``gunicorn -w 4 'medsendx_edge.fleet.server:wsgi_app()'``):
    its settings from $MEDSENDX_FLEET_DSN, $MEDSENDX_FLEET_STORAGE and $MEDSENDX_FLEET_PASSWORD_FILE (run
    ``fleet-server --migrate-only`` once before)."""
    password = Path(os.environ["MEDSENDX_FLEET_PASSWORD_FILE"]).read_text().strip()
    if not password:
        raise ValueError("MEDSENDX_FLEET_PASSWORD_FILE is empty: the operator pages would open to anyone")
    reports = os.environ.get("MEDSENDX_FLEET_REPORTS")
    return create_app(os.environ["MEDSENDX_FLEET_DSN"], Path(os.environ["MEDSENDX_FLEET_STORAGE"]), password,
                      Path(reports) if reports else None)


def _heartbeat(conn: Any, station: str, doc: dict[str, Any]) -> int:
    from psycopg.types.json import Jsonb

    try:
        sent = _ts(doc["sent_at"])
        status = dict(doc["status"])
    except (KeyError, TypeError, ValueError):
        raise BadUpload(422, "a heartbeat has sent_at (ISO 8601) and status (an object)") from None
    conn.execute("INSERT INTO heartbeats (station, sent_at, status) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                 (station, sent, Jsonb(status)))
    # the truck's latest word, whatever order the uploads arrive in (a day's backlog catching up)
    conn.execute("UPDATE trucks SET last_seen = %s, status = %s, version = %s WHERE station = %s AND "
                 "(last_seen IS NULL OR last_seen < %s)",
                 (sent, Jsonb(status), str(status.get("version") or ""), station, sent))
    return 1


def _exams(conn: Any, station: str, doc: dict[str, Any]) -> int:
    from psycopg.types.json import Jsonb

    exams = doc.get("exams")
    if not isinstance(exams, list):
        raise BadUpload(422, "an exams report has exams (a list)")
    for e in exams:
        try:
            if not isinstance(e, dict):
                raise TypeError
            reasons = e.get("reasons") or []
            if not isinstance(reasons, list) or not all(
                    isinstance(x, (str, type(None))) for x in (e.get("category"), e.get("priority"), *reasons)):
                raise TypeError
            conn.execute("INSERT INTO exams (station, exam, category, priority, reasons, updated, revision) VALUES "
                         "(%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (station, exam) DO UPDATE SET category = "
                         "excluded.category, priority = excluded.priority, reasons = excluded.reasons, "
                         "updated = excluded.updated, revision = excluded.revision WHERE "
                         "(exams.updated, exams.revision) < (excluded.updated, excluded.revision)",
                         (station, str(e["exam"])[:64], e.get("category"), e.get("priority"),
                          Jsonb([str(x)[:300] for x in reasons][:20]), _ts(e["updated"]), int(e.get("revision") or 0)))
        except (KeyError, TypeError, ValueError):
            raise BadUpload(422, "an exam has exam, updated (ISO 8601), and optional revision (a number), category "
                                 "and priority (text), reasons (a list of text)") from None
    return len(exams)


def _trucks(db: FleetDB) -> list[dict[str, Any]]:
    with db.connect() as conn:
        rows = conn.execute("SELECT station, last_seen, version, status, revoked FROM trucks ORDER BY station")
        out = []
        for station, last_seen, version, status, revoked in rows:
            s = status or {}
            ago = (datetime.now(timezone.utc) - last_seen).total_seconds() if last_seen else None
            out.append({"station": station, "last_seen": last_seen.isoformat() if last_seen else None,
                        "last_seen_text": _seen(last_seen, ago), "silent": ago is None or ago > SILENT_S,
                        "version": version, "revoked": revoked is not None,
                        "backlog": s.get("backlog"), "uplink": s.get("uplink"),
                        "disk_free_mb": s.get("disk_free_mb"), "rechecks_today": s.get("rechecks_today"),
                        "healthy": s.get("healthy")})
    return out


SILENT_S = 3 * 300.0   # three heartbeats (fleet.heartbeat_s's default) missed: the truck is shown silent


def _seen(when: datetime | None, ago: float | None) -> str:
    if when is None or ago is None:
        return "never"
    if ago < 90:
        rel = "just now"
    elif ago < 5400:
        rel = f"{ago / 60:.0f} min ago"
    elif ago < 2 * 86400:
        rel = f"{ago / 3600:.0f} h ago"
    else:
        rel = f"{ago / 86400:.0f} days ago"
    return f"{when.astimezone(timezone.utc):%Y-%m-%d %H:%M} UTC ({rel})"


def disk_text(mb: Any) -> str:
    if mb is None:
        return "-"
    return f"{float(mb) / 1024:.1f} GB" if float(mb) >= 1024 else f"{float(mb):.0f} MB"


OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "MedSendX fleet service", "version": "1"},
    "components": {"securitySchemes": {"truck": {"type": "http", "scheme": "bearer"},
                                       "operator": {"type": "http", "scheme": "basic"}}},
    "paths": {
        "/api/v1/uploads/{id}": {
            "parameters": [{"name": "id", "in": "path", "required": True,
                            "schema": {"type": "string", "pattern": UPLOAD_ID.pattern}}],
            "put": {"security": [{"truck": []}],
                    "summary": "a feature file (Parquet), a heartbeat or an exams report (JSON); idempotent by id",
                    "requestBody": {"content": {"application/vnd.apache.parquet": {}, "application/json": {}}},
                    "responses": {"201": {"description": "stored"}, "200": {"description": "already stored"},
                                  "400": {"description": "bad id or a body cut on the way"},
                                  "401": {"description": "no or revoked token"},
                                  "409": {"description": "the id was stored with other content"},
                                  "413": {"description": "too large"}, "415": {"description": "unknown content"},
                                  "422": {"description": "not what its kind must hold"}}},
            "head": {"security": [{"truck": []}], "summary": "whether the upload is stored, its SHA-256 and size",
                     "responses": {"200": {"description": "stored"}, "404": {"description": "not stored"}}}},
        "/api/v1/trucks": {"get": {"security": [{"operator": []}], "summary": "every truck's last word",
                                   "responses": {"200": {"description": "the trucks"}}}},
    },
}

DASHBOARD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MedSendX fleet</title>
<style>body{font-family:sans-serif;margin:2em;background:#f7f7f7}table{border-collapse:collapse;background:#fff}
td,th{padding:.4em .8em;border-bottom:1px solid #ddd;text-align:left}th{background:#333;color:#fff}
.bad{color:#b00;font-weight:bold}.ok{color:#070}</style></head>
<body><h1>MedSendX fleet</h1><p>{{ trucks|length }} truck{{ '' if trucks|length == 1 else 's' }},
{{ now.strftime('%Y-%m-%d %H:%M') }} UTC; a truck is <span class="bad">silent</span> after three missed heartbeats</p>
<table><tr><th>truck</th><th>last seen</th><th>health</th><th>backlog</th><th>uplink</th><th>disk free</th>
<th>rechecks today</th><th>version</th></tr>
{% for t in trucks %}<tr><td><a href="/trucks/{{ t.station }}">{{ t.station }}</a>{% if t.revoked %} (revoked){% endif %}</td>
<td class="{{ 'bad' if t.silent else '' }}">{{ t.last_seen_text }}</td>
<td class="{{ 'ok' if t.healthy else 'bad' }}">{{ 'healthy' if t.healthy else ('unhealthy' if t.healthy is not none else '-') }}</td>
<td>{{ t.backlog if t.backlog is not none else '-' }}</td><td>{{ t.uplink or '-' }}</td>
<td>{{ disk(t.disk_free_mb) }}</td>
<td>{{ t.rechecks_today if t.rechecks_today is not none else '-' }}</td><td>{{ t.version or '-' }}</td></tr>
{% endfor %}</table>
<h2>Scanner QC</h2>
{% if not found %}<p>The miner has not run yet (it runs on the feature files the trucks send).</p>
{% else %}{% if found.error %}<p class="bad">The last run failed: {{ found.error }}</p>{% endif %}
<p>Last run {{ found.mined_at or '-' }} over {{ found.n_stations }} stations:
{{ found.stations|length }} flagged. <a href="/reports/report.html">The full report</a></p>
{% if found.stations %}<table><tr><th>station</th><th>severity</th><th>what the miner found</th></tr>
{% for name, f in found.stations|dictsort %}<tr><td><a href="/trucks/{{ name }}">{{ name }}</a>
{% if f.new %} <b>new</b>{% endif %}</td><td class="{{ 'bad' if f.severity == 'high' else '' }}">{{ f.severity or '-' }}</td>
<td>{{ f.reasons|join('; ') }}</td></tr>{% endfor %}</table>{% endif %}{% endif %}
</body></html>
"""

TRUCK_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ t.station }}: MedSendX fleet</title>
<style>body{font-family:sans-serif;margin:2em;background:#f7f7f7}table{border-collapse:collapse;background:#fff}
td,th{padding:.3em .7em;border-bottom:1px solid #ddd;text-align:left}th{background:#333;color:#fff}
.bad{color:#b00;font-weight:bold}.ok{color:#070}</style></head>
<body><p><a href="/">&larr; the fleet</a></p><h1>{{ t.station }}</h1>
<p>Last seen <span class="{{ 'bad' if t.silent else '' }}">{{ t.last_seen_text }}</span>; version {{ t.version or '-' }};
<span class="{{ 'ok' if t.healthy else 'bad' }}">{{ 'healthy' if t.healthy else 'unhealthy' }}</span>;
backlog {{ t.backlog if t.backlog is not none else '-' }}; free disk {{ disk(t.disk_free_mb) }}</p>
{% if finding %}<p class="bad">Scanner QC: {{ finding.reasons|join('; ') }}</p>{% endif %}
<h2>Heartbeats</h2><table><tr><th>sent</th><th>health</th><th>backlog</th><th>uplink</th><th>rechecks today</th></tr>
{% for sent, s in beats %}<tr><td>{{ sent.strftime('%Y-%m-%d %H:%M') }} UTC</td>
<td class="{{ 'ok' if s.healthy else 'bad' }}">{{ 'healthy' if s.healthy else 'unhealthy' }}</td>
<td>{{ s.backlog }}</td><td>{{ s.uplink }}</td><td>{{ s.rechecks_today }}</td></tr>{% endfor %}</table>
<h2>Exams</h2><table><tr><th>exam</th><th>category</th><th>priority</th><th>reasons</th><th>updated</th></tr>
{% for exam, cat, prio, reasons, updated in exams %}<tr><td>{{ exam }}</td><td>{{ cat or '-' }}</td>
<td class="{{ 'bad' if prio in ('recheck', 'high') else '' }}">{{ prio or '-' }}</td><td>{{ (reasons or [])|join('; ') }}</td>
<td>{{ updated.strftime('%Y-%m-%d %H:%M') }}</td></tr>{% endfor %}</table>
<p><small>Categories are automated area-based density estimates, not BI-RADS assessments.</small></p></body></html>
"""
