"""HTTP destination: PUT or POST of the raw file to a URL template (a presigned object-store URL, a
REST ingest endpoint).  Placeholders: ``{id}`` (the spool id), ``{sha256}``.

Redirects are never followed (requests would turn the POST into a GET and report the final 200).
Delivery needs a 2xx *with proof* (``destination.delivery_proof: response``, the default): a body, an
``ETag`` (what object stores answer a PUT with) or a ``Location``.  A bare 2xx proves nothing (a login
page, a proxy that swallows bodies) unless the destination is configured ``delivery_proof: status``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medsendx_edge.config import DestinationConfig
from medsendx_edge.errors import DestinationFaultError
from medsendx_edge.upload.destinations import PRESENT
from medsendx_edge.upload.destinations._http import HttpClient


CONTENT_TYPES = {".dcm": "application/dicom", ".parquet": "application/vnd.apache.parquet", ".csv": "text/csv"}


class HttpDestination:
    kind = "http"

    def __init__(self, cfg: DestinationConfig, bandwidth_limit_bps: int | None = None) -> None:
        assert cfg.url
        self.template = cfg.url
        self.method = cfg.http_method
        self.proof = cfg.delivery_proof
        self.client = HttpClient(cfg, bandwidth_limit_bps)
        self.progress: Callable[[], None] | None = None

    def send(self, path: Path, item_id: str, sha256: str, suffix: str = ".dcm", retry: bool = False,
             sop_uid: str | None = None) -> str | None:
        url = self.template.replace("{id}", item_id).replace("{sha256}", sha256)
        if retry and self.method == "PUT" and self._holds(url, sha256, path.stat().st_size):
            return PRESENT
        body = self.client.body(b"", path, b"", self.progress)
        ctype = CONTENT_TYPES.get(suffix, "application/octet-stream")
        resp = self.client.send(self.method, url, body, {"Content-Type": ctype, "X-Content-SHA256": sha256})
        self.client.check_status(resp, f"HTTP {self.method}")
        if self.proof == "response" and not (resp.content or resp.headers.get("ETag")
                                             or resp.headers.get("Location")):
            raise DestinationFaultError(
                f"HTTP {self.method}: HTTP {resp.status_code} with no body, ETag or Location: no proof of "
                "delivery (set destination.delivery_proof: status if this server always answers so)")
        return None

    def _holds(self, url: str, sha256: str, size: int) -> bool:
        """HEAD before a re-send: the object is there, of this size, with this hash in its metadata
        (``X-Content-SHA256`` as we sent it, or S3's ``x-amz-meta-sha256``)."""
        resp = self.client.probe("HEAD", url)
        if resp is None or resp.status_code != 200:
            return False
        digest = resp.headers.get("X-Content-SHA256") or resp.headers.get("x-amz-meta-sha256")
        return digest == sha256 and resp.headers.get("Content-Length") in (None, str(size))

    def abort(self) -> None:
        self.client.abort()

    def close(self) -> None:
        self.client.close()
