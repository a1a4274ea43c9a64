"""The truck's console: a local web page and a JSON API for the radiographer and the technician.

Built on Flask (a small, well-kept WSGI framework: routing, JSON and test client, nothing to build by
hand) served by werkzeug's server, bounded, in its own daemon thread.  Every request only reads the spool
folders and SQLite (each thread its own connection) or calls the spool's own verbs (requeue): it can never
hold a lock the pipeline or the uploader needs.

* ``/`` the page (tabs Now, Alerts, Exams, Quarantine; short polling every second; works on a tablet).
* ``/api/now``, ``/api/alerts``, ``/api/exams``, ``/api/quarantine``: the same data as JSON (``now`` is
  ``health.status_data``, what ``medsendx-edge status --json`` prints).
* ``/api/picture/<id>.png``: the triage picture (anonymized pixels) of one image.
* ``POST /api/alerts/<id>/ack`` and ``POST /api/quarantine/<id>/requeue``: need the token.

Security: loopback by default.  A state-changing request needs the token (the 0600 ``token_file``) in the
``X-MedSendX-Token`` header: a custom header a cross-site form or image cannot send, and a cross-site
script cannot either without a CORS pre-flight this server never grants; its Origin, when sent, must be
this server.  Bound beyond loopback, every request needs the token (header, or ``?token=`` once, which
sets a SameSite=Strict cookie; a POST never takes it from the URL).  The Host header must be an address or
localhost while the console is on loopback (DNS rebinding).  At most 32 connections at once, each closed after 10 s of silence.  Ids are checked against the spool's id format before any file is
touched: no request reaches the file system outside the spool.  No patient data: pseudonymous ids,
anonymized pictures, our own reason texts.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from flask import Flask, Response, abort, jsonify, request, send_file
from werkzeug.serving import BaseWSGIServer

from medsendx_edge.config import Config
from medsendx_edge.health import status_data
from medsendx_edge.spool import OUTBOX, SENT, TRIAGED, Spool, is_id
from medsendx_edge.triage.exam import ExamBook
from medsendx_edge.vocabulary import KeyPrefix, state_key

TOKEN_HEADER = "X-MedSendX-Token"


MAX_CONNECTIONS = 32      # the console's connections at once; more are closed at once (a tablet needs 2-6)
IDLE_TIMEOUT_S = 10.0     # a connection silent this long is closed


class _BoundedServer(BaseWSGIServer):
    """werkzeug's server with a bounded set of connections, each with a timeout: its threaded server
    gives every connection a thread and a file descriptor for as long as the peer likes, and about 1,060
    idle connections exhausted the daemon's descriptors (EMFILE in the pipeline's thread, exit 1).  A
    connection over MAX_CONNECTIONS is closed at once; nothing the console meets reaches the pipeline."""

    def __init__(self, host: str, port: int, app: Any) -> None:
        super().__init__(host, port, app)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        request.settimeout(IDLE_TIMEOUT_S)
        threading.Thread(target=self._serve, args=(request, client_address), name="console-conn",
                         daemon=True).start()

    def _serve(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - a broken or slow client; the console goes on
            pass
        finally:
            self.shutdown_request(request)
            self._slots.release()


def _host_allowed(host: str) -> bool:
    """The Host header names this truck by address or as localhost, never by a DNS name: a page that
    rebinds its own name to 127.0.0.1 (DNS rebinding) would otherwise read the console from the truck's
    browser."""
    if host.startswith("["):          # [::1]:8080
        name = host[1:host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:        # 127.0.0.1:8080, localhost:8080
        name = host.split(":", 1)[0]
    else:
        name = host
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _loopback(bind: str) -> bool:
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return bind == "localhost"


class Source(Protocol):
    """What the console is given of the daemon (issue 25: it took the whole daemon, untyped): the config,
    the spool it reads, the exam book, and the event a requeue sets to wake the pipeline."""

    cfg: Config
    spool: Spool
    wake: threading.Event

    @property
    def exams(self) -> ExamBook: ...

    def who(self, item_id: str) -> dict[str, str]: ...


class Console:
    def __init__(self, daemon: "Source", bind: str, port: int, token: str) -> None:
        self.daemon = daemon
        self.token = token
        self.open_reads = _loopback(bind)
        self.app = self._build()
        # werkzeug logs every request at INFO: the page's polling made 149 of 212 journal lines of a short
        # run (about 100,000 a shift); its warnings and errors still reach the journal
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.server = _BoundedServer(bind, port, self.app)
        self.port = int(self.server.server_port)
        self.thread = threading.Thread(target=self.server.serve_forever, name="console", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ----------------------------------------------------------------- data (also for tests and the CLI)
    def _sidecar(self, item_id: str) -> dict[str, Any]:
        return self.daemon.spool.sidecar(item_id, TRIAGED, OUTBOX, SENT)

    def _upload_state(self, item_id: str) -> str:
        row = self.daemon.spool.state.item(item_id)
        return "triage" if row is None else row.state

    def alerts(self) -> dict[str, Any]:
        state = self.daemon.spool.state
        rechecks = []
        # All of the day's rechecks (the summary keeps the newest 20: twenty newer acknowledged ones would
        # push an open one out), open ones first, then at most 50 in all.
        order = self._todays_order()
        book = self.daemon.exams
        for item_id in state.rechecks_since(time.time() - 86400):
            side = self._sidecar(item_id)
            exam = book.exam_of(item_id)
            rechecks.append({
                "id": item_id, "view": side.get("view"), "laterality": side.get("laterality"),
                "reasons": side.get("reasons", []), "acknowledged": state.get(state_key(KeyPrefix.ACK, item_id)) is not None,
                "picture": f"/api/picture/{item_id}.png", "upload": self._upload_state(item_id),
                # who and when, on this screen only: the woman's place in today's list, the time the image
                # was taken and received, the accession number where enabled
                "position": order.get(exam) if exam else None, "received": _received(item_id),
                **self.daemon.who(item_id)})
        # Open alerts first (newest first within each): an acknowledged card never pushes an open one off
        # the screen (issue 26).
        rechecks.sort(key=lambda a: a["acknowledged"])
        rechecks = rechecks[:50]
        high = [e for e in self.exams()["exams"] if e["priority"] == "high"]
        high.sort(key=lambda e: e["category"] or "", reverse=True)
        return {"rechecks": rechecks, "high_priority_exams": high}

    def _todays_order(self) -> dict[str, int]:
        """Exam -> its place in today's list (1 for the day's first woman), by its first image."""
        book: ExamBook = self.daemon.exams
        start_of_day = _local_midnight()
        rows = book._conn().execute(  # noqa: SLF001 - the book's own database, read only
            "SELECT exam, MIN(recorded) AS first FROM exam_images GROUP BY exam HAVING first >= ? ORDER BY first",
            (start_of_day,)).fetchall()
        return {exam: n for n, (exam, _first) in enumerate(rows, 1)}

    def exams(self) -> dict[str, Any]:
        book: ExamBook = self.daemon.exams  # the daemon's own book (its own connection per thread)
        start_of_day = _local_midnight()   # the truck's day, as the alerts count it (UTC midnight before)
        rows = book._conn().execute(  # noqa: SLF001 - the book's own database, read only
            "SELECT exam, MIN(recorded) FROM exam_images GROUP BY exam HAVING MAX(recorded) >= ? "
            "ORDER BY MIN(recorded) DESC LIMIT 200", (start_of_day,)).fetchall()
        out = []
        order = self._todays_order()
        for exam, _first in rows:
            s = book.summary(exam)
            out.append({**s.as_dict(), "position": order.get(exam), "images": [
                {"id": i, "upload": self._upload_state(i), "picture": f"/api/picture/{i}.png"} for i in s.images]})
        return {"exams": out, "other_images": self.other_images()}

    def other_images(self, limit: int = 50) -> list[dict[str, Any]]:
        """Today's radiographs and CT slices with their tissue map (a visual aid), newest first: ids are
        time-ordered, so today's are the names from today's first id on."""
        spool = self.daemon.spool
        first_id = f"{int(_local_midnight() * 1000):012x}"
        found = []
        for queue in (TRIAGED, OUTBOX, SENT):
            try:
                names = [n[:-5] for n in os.listdir(spool.dir(queue)) if n.endswith(".json") and n[:-5] >= first_id]
            except OSError:
                continue
            found += [(i, queue) for i in names if is_id(i)]
        out = []
        for item_id, queue in sorted(found, reverse=True):
            tm = spool.sidecar(item_id, queue).get("tissue_map") or {}
            if tm.get("status") == "done":
                out.append({"id": item_id, "received": _received(item_id), "picture": f"/api/picture/{item_id}.png",
                            "claim": tm.get("claim"), "classes": tm.get("classes"), "fractions": tm.get("fractions")})
            if len(out) >= limit:
                break
        return out

    def quarantine(self) -> dict[str, Any]:
        spool = self.daemon.spool
        items = []
        for stage, item_id in spool.quarantined():
            try:
                info = spool.reason(stage, item_id)
            except (OSError, ValueError):
                info = {}
            items.append({"id": item_id, "stage": stage, "reason": info.get("reason"),
                          "error_class": info.get("error_class"), "when": info.get("time")})
        return {"items": items}

    # ----------------------------------------------------------------- web
    def _token_ok(self) -> bool:
        given = request.headers.get(TOKEN_HEADER) or request.cookies.get("medsendx_token") or ""
        return bool(self.token) and hmac.compare_digest(given.encode(), self.token.encode())

    def _build(self) -> Flask:
        app = Flask("medsendx_edge.console", static_folder=None)
        page = (Path(__file__).parent / "data" / "console.html").read_text()

        @app.before_request
        def guard() -> Response | None:
            if self.open_reads and not _host_allowed(request.host):
                abort(421)  # a DNS name pointing at loopback (rebinding): not this console (bound beyond
                # loopback every request needs the token, and a tablet may call the truck by its name)
            if not self.open_reads:
                given = request.args.get("token") if request.method == "GET" else None
                if given and hmac.compare_digest(given.encode(), self.token.encode()):
                    return None  # the page load that carries the token sets the cookie (after_request)
                if not self._token_ok():
                    abort(401)
            if request.method != "GET":
                origin = request.headers.get("Origin")
                if origin is not None and origin != request.host_url.rstrip("/"):
                    abort(403)  # a cross-site request
                if not request.headers.get(TOKEN_HEADER) or not self._token_ok():
                    abort(403)
            return None

        @app.after_request
        def headers(resp: Response) -> Response:
            if not request.path.startswith("/api/picture/") or resp.status_code == 404:
                # live data; a picture never changes, but one not drawn yet (triage/pictures.py) soon will be
                resp.headers["Cache-Control"] = "no-store"
            resp.headers["X-Content-Type-Options"] = "nosniff"
            resp.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self'; "
                                                       "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'")
            given = request.args.get("token")
            if given and hmac.compare_digest(given.encode(), self.token.encode()):
                resp.set_cookie("medsendx_token", given, httponly=True, samesite="Strict")
            return resp

        @app.get("/")
        def index() -> Response:
            return Response(page, mimetype="text/html")

        @app.get("/api/now")
        def now() -> Response:
            data = status_data(self.daemon.cfg, self.daemon.spool)
            data["console_time"] = time.time()
            return jsonify(data)

        @app.get("/api/alerts")
        def alerts() -> Response:
            return jsonify(self.alerts())

        @app.get("/api/exams")
        def exams() -> Response:
            return jsonify(self.exams())

        @app.get("/api/quarantine")
        def quarantine() -> Response:
            return jsonify(self.quarantine())

        @app.get("/api/picture/<item_id>.png")
        def picture(item_id: str) -> Response:
            if not is_id(item_id):
                abort(404)
            for queue in (TRIAGED, OUTBOX, SENT):
                path = self.daemon.spool.dir(queue) / f"{item_id}.png"
                if path.is_file():
                    return send_file(path, mimetype="image/png")
            abort(404)

        @app.post("/api/alerts/<item_id>/ack")
        def ack(item_id: str) -> Response:
            if not is_id(item_id) or not self._sidecar(item_id):
                abort(404)   # an id with no triage result: nothing to acknowledge, no row written
            self.daemon.spool.state.put(state_key(KeyPrefix.ACK, item_id), repr(time.time()))
            return jsonify({"id": item_id, "acknowledged": True})

        @app.post("/api/quarantine/<item_id>/requeue")
        def requeue(item_id: str) -> Response:
            if not is_id(item_id):
                abort(404)
            try:
                queue = self.daemon.spool.requeue(item_id)
            except (KeyError, FileNotFoundError):
                abort(404)
            self.daemon.wake.set()
            return jsonify({"id": item_id, "requeued_to": queue})

        return app


def _received(item_id: str) -> str | None:
    """When the truck received the image (local HH:MM:SS): spool ids begin with the time in milliseconds."""
    try:
        return time.strftime("%H:%M:%S", time.localtime(int(item_id[:12], 16) / 1000))
    except ValueError:
        return None


def _local_midnight() -> float:
    """The start of the truck's day (local time), epoch seconds: one definition for every list of "today"."""
    return time.mktime(time.localtime()[:3] + (0, 0, 0, 0, 0, -1))
