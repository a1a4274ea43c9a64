"""Upload destinations: one small interface, one module each."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from medsendx_edge.config import DestinationConfig


PRESENT = "already at the destination"  # send() found the instance there and sent nothing


class Destination(Protocol):
    """Sends one file; returns only when the destination has confirmed this instance.

    Raises TransientUploadError (retry with backoff), PermanentUploadError
    (quarantine) or DestinationFaultError / AuthUploadError (the destination is at fault:
    pause the whole queue, quarantine nothing).
    """

    kind: str
    progress: Callable[[], None] | None  # called while a long send is under way (heartbeat)

    def send(self, path: Path, item_id: str, sha256: str, suffix: str = ".dcm", retry: bool = False,
             sop_uid: str | None = None) -> str | None:
        """Send the file at ``path`` (wherever the spool keeps it) as ``item_id`` + ``suffix``.

        ``retry``: an earlier attempt may have reached the destination (cut before its answer, a crash):
        a destination that can ask first (QIDO-RS, HEAD) returns ``PRESENT`` instead of sending again.
        ``sop_uid``: the instance, as the queue row recorded it (a destination that needs it then does not
        read the file's header for it)."""

    def abort(self) -> None:
        """End a send in flight promptly (shutdown); it fails as transient."""

    def close(self) -> None: ...


def describe(cfg: DestinationConfig) -> str:
    """Where a destination sends, for logs and status: the kind and the host (never a user or a password;
    a URL's path, which may carry a tenant, is left out too)."""
    from urllib.parse import urlsplit

    if cfg.kind == "directory":
        return f"directory {cfg.path}"
    if cfg.kind == "dimse":
        return f"dimse {cfg.host}:{cfg.port}"
    host = ""
    if cfg.url:
        parts = urlsplit(cfg.url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"                  # an IPv6 address
        try:
            port = parts.port
        except ValueError:                      # a port that is no port: the send says so, not the log
            port = None
        if port:
            host += f":{port}"
    if cfg.kind == "s3":
        return f"s3 {cfg.bucket}" + (f" at {host}" if host else "")
    return f"{cfg.kind} {host}".strip()


def make_destination(cfg: DestinationConfig, bandwidth_limit_bps: int | None = None) -> Destination:
    dest = _make(cfg, bandwidth_limit_bps)
    setattr(dest, "where", describe(cfg))  # noqa: B010 - every kind's; not part of each constructor
    return dest


def _make(cfg: DestinationConfig, bandwidth_limit_bps: int | None = None) -> Destination:
    if cfg.kind == "directory":
        from medsendx_edge.upload.destinations.directory import DirectoryDestination

        assert cfg.path is not None
        return DirectoryDestination(cfg.path, cfg.require_mount)
    if cfg.kind == "dimse":
        from medsendx_edge.upload.destinations.dimse import DimseDestination

        return DimseDestination(cfg)
    if cfg.kind == "s3":
        from medsendx_edge.upload.destinations.s3 import S3Destination

        return S3Destination(cfg)
    if cfg.kind == "dicomweb":
        from medsendx_edge.upload.destinations.dicomweb import DicomWebDestination

        return DicomWebDestination(cfg, bandwidth_limit_bps)
    from medsendx_edge.upload.destinations.http import HttpDestination

    return HttpDestination(cfg, bandwidth_limit_bps)
