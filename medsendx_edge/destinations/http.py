"""HTTP destination: PUT or POST of the raw file to a URL template (a presigned object-store URL, a
REST ingest endpoint).  Placeholders: ``{id}`` (the spool id), ``{sha256}``.  Success is a 2xx."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..config import DestinationConfig
from ._http import ChainedBody, HttpClient


CONTENT_TYPES = {".dcm": "application/dicom", ".parquet": "application/vnd.apache.parquet", ".csv": "text/csv"}


class HttpDestination:
    kind = "http"

    def __init__(self, cfg: DestinationConfig, bandwidth_limit_bps: int | None = None) -> None:
        assert cfg.url
        self.template = cfg.url
        self.method = cfg.http_method
        self.client = HttpClient(cfg, bandwidth_limit_bps)
        self.progress: Callable[[], None] | None = None

    def send(self, path: Path, item_id: str, sha256: str) -> None:
        url = self.template.replace("{id}", item_id).replace("{sha256}", sha256)
        body = ChainedBody(b"", path, b"", self.client.rate, self.progress)
        name = path.name[: -len(".work")] if path.name.endswith(".work") else path.name
        ctype = CONTENT_TYPES.get(Path(name).suffix, "application/octet-stream")
        resp = self.client.send(self.method, url, body, {"Content-Type": ctype, "X-Content-SHA256": sha256})
        self.client.check_status(resp, f"HTTP {self.method}")

    def close(self) -> None:
        self.client.close()
