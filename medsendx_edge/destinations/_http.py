"""What the HTTP destinations share: one keep-alive session, auth from files or env, TLS, a body
streamed from disk (optionally rate-limited), and the mapping of HTTP outcomes to our errors."""

from __future__ import annotations

import email.utils
import os
import threading
import time
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import IO

import requests

from ..config import DestinationConfig
from ..errors import AuthUploadError, ConfigError, PermanentUploadError, TransientUploadError

TOKEN_ENV = "MEDSENDX_EDGE_TOKEN"
TRANSIENT_STATUS = {408, 425, 429}


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
                 progress: Callable[[], None] | None = None) -> None:
        self.head, self.tail = head, tail
        self.progress = progress
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

    def close(self) -> None:
        self.fh.close()


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

    def session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.trust_env = False  # never a proxy from the environment: the truck talks to its PACS only
            self._local.session = s
        return s

    def send(self, method: str, url: str, body: ChainedBody, headers: dict[str, str]) -> requests.Response:
        try:
            return self.session().request(method, url, data=body, headers={**self.headers, **headers},
                                          auth=self.auth, verify=self.verify, timeout=self.cfg.timeout_s)
        except requests.exceptions.SSLError as exc:
            raise PermanentUploadError(f"TLS error ({type(exc).__name__}): check ca_bundle") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                requests.exceptions.ChunkedEncodingError) as exc:
            raise TransientUploadError(f"network: {type(exc).__name__}") from None
        finally:
            body.close()

    @staticmethod
    def check_status(resp: requests.Response, what: str) -> None:
        """Raise for what the status alone decides; return for 2xx (the caller verifies further)."""
        code = resp.status_code
        if 200 <= code < 300:
            return
        if code in (401, 403):
            raise AuthUploadError(f"{what}: HTTP {code}: credentials refused")
        if code in TRANSIENT_STATUS or code >= 500:
            raise TransientUploadError(f"{what}: HTTP {code}", retry_after=retry_after(resp.headers.get("Retry-After")))
        raise PermanentUploadError(f"{what}: HTTP {code}: refused")

    def close(self) -> None:
        s = getattr(self._local, "session", None)
        if s is not None:
            s.close()
