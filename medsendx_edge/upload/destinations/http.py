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

    def send(self, path: Path, item_id: str, sha256: str, suffix: str = ".dcm") -> None:
        url = self.template.replace("{id}", item_id).replace("{sha256}", sha256)
        body = self.client.body(b"", path, b"", self.progress)
        ctype = CONTENT_TYPES.get(suffix, "application/octet-stream")
        resp = self.client.send(self.method, url, body, {"Content-Type": ctype, "X-Content-SHA256": sha256})
        self.client.check_status(resp, f"HTTP {self.method}")
        if self.proof == "response" and not (resp.content or resp.headers.get("ETag")
                                             or resp.headers.get("Location")):
            raise DestinationFaultError(
                f"HTTP {self.method}: HTTP {resp.status_code} with no body, ETag or Location: no proof of "
                "delivery (set destination.delivery_proof: status if this server always answers so)")

    def abort(self) -> None:
        self.client.abort()

    def close(self) -> None:
        self.client.close()
