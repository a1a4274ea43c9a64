"""What the HTTP destinations share: one keep-alive session, auth from files or env, TLS, a body
streamed from disk (optionally rate-limited), and the mapping of HTTP outcomes to our errors."""

from __future__ import annotations

import email.utils
import fcntl
import os
import socket
import ssl
import struct
import termios
import threading
import time
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import IO

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from medsendx_edge.config import DestinationConfig
from medsendx_edge.errors import (AuthUploadError, ConfigError, DestinationFaultError, PermanentUploadError,
                      TransientUploadError)

TOKEN_ENV = "MEDSENDX_EDGE_TOKEN"
TRANSIENT_STATUS = {408, 425, 429}
#: Statuses that say the destination is wrong (path, method, size limit), not the file: the queue waits.
DESTINATION_STATUS = {404, 405, 410, 411, 413, 414, 421}
#: No socket read may wait longer than this; the progress watch ends a stall much sooner.
BACKSTOP_READ_S = 3600.0


def read_secret(path: Path | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"destination.{what}: cannot read the file ({exc.strerror})") from None


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class ChainedBody:
    """A request body: head bytes, the file (read from disk in chunks), tail bytes.

    An iterable with a known ``len()``: requests sends a Content-Length and passes the chunks to
    the socket as they are (1 MiB each; a file-like body would go out in 8 KiB writes).  With
    ``rate`` (bytes/s) the chunks shrink to 64 KiB and are paced, for metered links.
    """

    def __init__(self, head: bytes, path: Path, tail: bytes, rate: int | None = None,
                 progress: Callable[[], None] | None = None, on_done: Callable[[], None] | None = None) -> None:
        self.head, self.tail = head, tail
        self.progress = progress
        self.on_done = on_done
        self.fh: IO[bytes] = open(path, "rb")
        self.size = os.fstat(self.fh.fileno()).st_size
        self.total = len(head) + self.size + len(tail)
        self.rate = rate
        self.chunk = (1 << 16) if rate else (1 << 20)

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[bytes]:
        start, sent = time.monotonic(), 0
        self.fh.seek(0)
        remaining = self.size
        pending = self.head  # sent with the first chunk: one write fewer per request
        while remaining > 0 or pending:
            data = self.fh.read(min(self.chunk, remaining)) if remaining > 0 else b""
            if remaining > 0 and not data:
                raise TransientUploadError("the outbox file shrank while being sent")
            remaining -= len(data)
            part = pending + data if pending else data
            pending = b""
            if remaining == 0:
                part += self.tail
            if self.rate:
                delay = start + sent / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            sent += len(part)
            if self.progress is not None:
                self.progress()  # a long upload on a slow link is not a hung thread
            yield part
        if self.on_done is not None:
            self.on_done()

    def close(self) -> None:
        self.fh.close()


def _unacked_bytes(sock: socket.socket | None) -> int | None:
    """Bytes written to ``sock`` that the peer has not acknowledged yet (Linux SIOCOUTQ), or None."""
    if sock is None:
        return None
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except (OSError, ValueError, AttributeError):
        return None


class ProgressWatch:
    """Ends a request that stops moving, not one that is merely slow.

    While the body goes out, progress is a chunk handed to the socket or a fall in the bytes the
    peer has not acknowledged yet (on a 4 KB/s link a 1 MiB write takes minutes and moves all the
    time).  ``stall_s`` without progress ends the request.  Once every byte is acknowledged the
    server has the whole body, and its complete answer must come within ``response_s`` in total:
    a server that trickles one header line at a time cannot hold the uploader.  The watch ends a
    request by shutting its socket down, which wakes the blocked read or write at once; it does
    the same on :meth:`abort` (a SIGTERM must not wait for a slow link).
    """

    def __init__(self, stall_s: float, response_s: float, progress: Callable[[], None] | None = None) -> None:
        self.stall_s, self.response_s = stall_s, response_s
        self.progress_cb = progress
        self.conn: HTTPConnection | None = None
        self.active = False
        self.body_done = False
        self.reason: str | None = None
        self._last = time.monotonic()
        self._unacked: int | None = None
        self._response_deadline: float | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def begin(self) -> None:
        with self._lock:
            self.conn, self.active, self.body_done, self.reason = None, True, False, None
            self._last, self._unacked, self._response_deadline = time.monotonic(), None, None
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="upload-watch", daemon=True)
                self._thread.start()

    def end(self) -> None:
        with self._lock:
            self.active, self.conn = False, None

    def moved(self) -> None:
        self._last = time.monotonic()
        if self.progress_cb is not None:
            self.progress_cb()

    def sent_all(self) -> None:
        self.body_done = True
        self.moved()

    def abort(self, reason: str) -> None:
        with self._lock:
            if not self.active:
                return
            self.reason = self.reason or reason
            conn = self.conn
        sock = getattr(conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def check(self, now: float) -> None:
        """One look (the watch thread calls this every 0.2 s)."""
        if not self.active:
            return
        unacked = _unacked_bytes(getattr(self.conn, "sock", None))
        if unacked is not None and self._unacked is not None and unacked < self._unacked:
            self.moved()
        self._unacked = unacked
        if self.body_done and (unacked == 0 or unacked is None) and self._response_deadline is None:
            self._response_deadline = now + self.response_s
        if self._response_deadline is not None and now > self._response_deadline:
            self.abort(f"no complete answer within {self.response_s:g} s of the whole body being received")
        elif now - self._last > self.stall_s and self._response_deadline is None:
            self.abort(f"stalled: no progress for {self.stall_s:g} s")

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            time.sleep(0.2)
            now = time.monotonic()
            if self.active:
                idle_since = now
            elif now - idle_since > 10.0:
                with self._lock:  # idle: the thread ends; the next begin() starts another
                    if not self.active:
                        self._thread = None
                        return
            try:
                self.check(now)
            except Exception:  # noqa: BLE001 - the watch must outlive anything odd a socket does
                pass


_current_watch = threading.local()


def _track(cls: type) -> type:
    """A urllib3 connection class that tells the current request's watch which socket it uses."""

    class Tracked(cls):  # type: ignore[misc]
        def request(self, *args: object, **kwargs: object) -> None:
            watch = getattr(_current_watch, "watch", None)
            if watch is not None:
                watch.conn = self
            super().request(*args, **kwargs)

    Tracked.__name__ = "Tracked" + cls.__name__
    return Tracked


class _TrackedPool(HTTPConnectionPool):
    ConnectionCls = _track(HTTPConnection)


class _TrackedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _track(HTTPSConnection)


class _Adapter(HTTPAdapter):
    def init_poolmanager(self, *args: object, **kwargs: object) -> None:
        super().init_poolmanager(*args, **kwargs)  # type: ignore[arg-type]
        self.poolmanager.pool_classes_by_scheme = {"http": _TrackedPool, "https": _TrackedHTTPSPool}


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and everything it wraps (requests -> urllib3 -> ssl), without loops."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 32:
        e = todo.pop()
        if any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
        for attr in ("reason", "__cause__", "__context__"):
            inner = getattr(e, attr, None)
            if isinstance(inner, BaseException):
                todo.append(inner)
    return seen


def tls_error(exc: BaseException) -> TransientUploadError | DestinationFaultError:
    """A TLS failure, classed: a handshake cut short is the link (transient); a certificate that
    does not verify or match, or a protocol the two ends do not share, is the destination's setup
    (the whole queue waits, nothing is quarantined)."""
    chain = _chain(exc)
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in chain):
        verify = next(e for e in chain if isinstance(e, ssl.SSLCertVerificationError))
        what = "does not match the host name" if "hostname" in str(verify.verify_message or "").lower() \
            else f"does not verify ({verify.verify_message or 'unknown reason'})"
        return DestinationFaultError(f"TLS: the server certificate {what}: check destination.url and ca_bundle")
    cut = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError, TimeoutError)
    text = " ".join(str(e) for e in chain).upper()
    if any(isinstance(e, cut) for e in chain) or "EOF" in text or "RESET" in text:
        return TransientUploadError("network: TLS handshake cut short")
    if "CERTIFICATE" in text or "HOSTNAME" in text:
        return DestinationFaultError("TLS: the server certificate is not accepted: check ca_bundle")
    return DestinationFaultError("TLS: no common protocol or cipher with the server")


class HttpClient:
    def __init__(self, cfg: DestinationConfig, bandwidth_limit_bps: int | None = None) -> None:
        self.cfg = cfg
        self.rate = bandwidth_limit_bps
        self._local = threading.local()
        password = read_secret(cfg.password_file, "password_file")
        token = read_secret(cfg.token_file, "token_file") or os.environ.get(TOKEN_ENV)
        self.auth = (cfg.username, password or "") if cfg.username else None
        self.headers = {"Authorization": f"Bearer {token}"} if token and not self.auth else {}
        self.verify: bool | str = str(cfg.ca_bundle) if cfg.ca_bundle else cfg.verify_tls
        self.watch = ProgressWatch(cfg.timeout_s, cfg.timeout_s)

    def session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.trust_env = False  # never a proxy from the environment: the truck talks to its PACS only
            adapter = _Adapter()
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            self._local.session = s
        return s

    def body(self, head: bytes, path: Path, tail: bytes, progress: Callable[[], None] | None) -> ChainedBody:
        """The request body for ``path``, reporting its progress to the watch."""
        self.watch.progress_cb = progress
        return ChainedBody(head, path, tail, self.rate, self.watch.moved, on_done=self.watch.sent_all)

    def send(self, method: str, url: str, body: ChainedBody, headers: dict[str, str]) -> requests.Response:
        """One request, redirects never followed (a POST turned into a GET proves nothing)."""
        self.watch.begin()
        _current_watch.watch = self.watch
        try:
            resp = self.session().request(method, url, data=body, headers={**self.headers, **headers},
                                          auth=self.auth, verify=self.verify, allow_redirects=False,
                                          timeout=(self.cfg.timeout_s, BACKSTOP_READ_S))
            if self.watch.reason:
                # Cut by the watch: a response ended by our own shutdown can parse as a short,
                # complete-looking answer (end of file ends the headers).  It is never an answer.
                raise TransientUploadError(f"network: Timeout ({self.watch.reason})")
            return resp
        except requests.exceptions.SSLError as exc:
            raise tls_error(exc) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                requests.exceptions.ChunkedEncodingError) as exc:
            if self.watch.reason:
                raise TransientUploadError(f"network: Timeout ({self.watch.reason})") from None
            if any(isinstance(e, ssl.SSLError) for e in _chain(exc)):
                raise tls_error(exc) from None
            raise TransientUploadError(f"network: {type(exc).__name__}") from None
        finally:
            _current_watch.watch = None
            self.watch.end()
            body.close()

    def probe(self, method: str, url: str, headers: dict[str, str] | None = None,
              params: dict[str, str] | None = None) -> requests.Response | None:
        """A small question to the destination (QIDO-RS, HEAD) before a re-send; None when it cannot
        answer now (the re-send goes ahead: asking never stops a delivery)."""
        try:
            return self.session().request(method, url, params=params, headers={**self.headers, **(headers or {})},
                                          auth=self.auth,
                                          verify=self.verify, allow_redirects=False,
                                          timeout=(self.cfg.timeout_s, self.cfg.timeout_s))
        except requests.exceptions.RequestException:
            return None

    def abort(self) -> None:
        """End the request in flight now (shutdown): it fails as transient and is retried later."""
        self.watch.abort("aborted: the daemon is stopping")

    @staticmethod
    def check_status(resp: requests.Response, what: str) -> None:
        """Raise for what the status alone decides; return for 2xx (the caller verifies further)."""
        code = resp.status_code
        if 200 <= code < 300:
            return
        if 300 <= code < 400:
            raise DestinationFaultError(f"{what}: HTTP {code}: the server redirects elsewhere; redirects are "
                                        "never followed for uploads: check destination.url")
        if code in (401, 403):
            raise AuthUploadError(f"{what}: HTTP {code}: credentials refused")
        if code in DESTINATION_STATUS:
            raise DestinationFaultError(f"{what}: HTTP {code}: the destination refuses every upload "
                                        "(wrong path, method or size limit): check destination.url")
        if code in TRANSIENT_STATUS or code >= 500:
            raise TransientUploadError(f"{what}: HTTP {code}", retry_after=retry_after(resp.headers.get("Retry-After")))
        raise PermanentUploadError(f"{what}: HTTP {code}: refused")

    def close(self) -> None:
        s = getattr(self._local, "session", None)
        if s is not None:
            s.close()
