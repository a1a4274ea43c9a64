"""DICOMweb STOW-RS destination: ``POST {url}/studies``, one instance per request, streamed from disk.

Success only when the response lists this SOP Instance UID in ReferencedSOPSequence (0008,1199):
Orthanc 1.10 answers 200 with an empty sequence when the body was cut off, so a status code is no
proof.  A FailedSOPSequence (0008,1198) entry for the instance is a refusal (permanent).

A PACS that already holds an instance with the UID keeps its copy and lists the UID all the same
(Orthanc answers exactly as for a new instance), so the UID alone proves nothing about *our* bytes.
Before each send the destination asks (QIDO-RS) whether the UID is there; when it is, the copy is
retrieved (WADO-RS) and compared with the sha256 recorded when the item was queued: the same bytes
(or, from a PACS that coerces attributes on storage, the same pixel data in the same transfer syntax)
are "already at the destination" (nothing sent twice), other content is a conflict (permanent: the
item is quarantined with the reason, never counted delivered).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom

from medsendx_edge.anonymize.dicomio import sop_instance_uid
from medsendx_edge.config import DestinationConfig
from medsendx_edge.errors import PermanentUploadError, SyntaxRefusedError, TransientUploadError
from medsendx_edge.upload.destinations import PRESENT
from medsendx_edge.upload.destinations._http import HttpClient

REFERENCED_SOP_SEQ = "00081199"
FAILED_SOP_SEQ = "00081198"
REFERENCED_SOP_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
SYNTAX_NOT_SUPPORTED = 0xC122   # PS3.18 STOW-RS failure reason: Referenced Transfer Syntax not supported


def _pixels(source: Path | io.BytesIO) -> tuple[str | None, bytes | None]:
    """(transfer syntax, pixel data bytes) of a DICOM file, (None, None) when it has none or is unreadable."""
    try:
        ds = pydicom.dcmread(source, specific_tags=["PixelData"])
        return str(ds.file_meta.TransferSyntaxUID), bytes(ds.PixelData)
    except Exception:  # noqa: BLE001 - anything unreadable is no proof of sameness
        return None, None


def _compressed_syntax(path: Path) -> str | None:
    """The file's transfer syntax when it is an encoding (compressed or deflated), else None."""
    try:
        ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    except Exception:  # noqa: BLE001 - unreadable: nothing to decode
        return None
    return str(ts) if ts.is_compressed or ts.is_deflated else None


def _values(doc: dict[str, Any], tag: str) -> list[Any]:
    return list((doc.get(tag) or {}).get("Value") or [])


def first_part(body: bytes, content_type: str) -> bytes | None:
    """The first part of a multipart/related body (RFC 2046), or None."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        return None
    delimiter = b"--" + m.group(1).encode()
    start = body.find(delimiter)
    if start < 0:
        return None
    head_end = body.find(b"\r\n\r\n", start)
    end = body.find(b"\r\n" + delimiter, head_end + 4)
    if head_end < 0 or end < 0:
        return None
    return body[head_end + 4:end]


_items = _values


def _uid(item: dict[str, Any]) -> str | None:
    vals = (item.get(REFERENCED_SOP_UID) or {}).get("Value") or []
    return str(vals[0]) if vals else None


class DicomWebDestination:
    kind = "dicomweb"

    def __init__(self, cfg: DestinationConfig, bandwidth_limit_bps: int | None = None) -> None:
        assert cfg.url
        self.cfg = cfg
        self.base = cfg.url.rstrip("/")
        self.url = self.base + "/studies"
        self.client = HttpClient(cfg, bandwidth_limit_bps)
        self.progress: Callable[[], None] | None = None

    def send(self, path: Path, item_id: str, sha256: str, suffix: str = ".dcm", retry: bool = False,
             sop_uid: str | None = None) -> str | None:
        uid = sop_uid or sop_instance_uid(path)
        if uid is None:   # our own anonymized output: should never happen
            raise PermanentUploadError("outbox file has no readable SOPInstanceUID")
        held = self._held(uid)
        if held is not None:
            if self._same_instance(held, sha256, path):
                return PRESENT
            raise PermanentUploadError(
                "STOW-RS: conflict: the PACS already holds an instance with this SOP Instance UID and other "
                "content; it would keep its copy and answer success, so this one is not sent")
        boundary = "medsendx-" + secrets.token_hex(16)
        head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        body = self.client.body(head, path, tail, self.progress)
        resp = self.client.send("POST", self.url, body, {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        })
        doc: dict[str, Any] = {}
        try:
            parsed = json.loads(resp.content) if resp.content else {}
            doc = parsed[0] if isinstance(parsed, list) and parsed else parsed if isinstance(parsed, dict) else {}
        except ValueError:
            doc = {}
        failed = [i for i in _items(doc, FAILED_SOP_SEQ) if _uid(i) == uid]
        reason = ((failed[0].get(FAILURE_REASON) or {}).get("Value") or ["?"])[0] if failed else None
        if resp.status_code == 415 or reason == SYNTAX_NOT_SUPPORTED:
            syntax = _compressed_syntax(path)
            if syntax is not None:   # ours to undo: the file goes again, decoded
                raise SyntaxRefusedError(f"STOW-RS: the PACS refused the transfer syntax (HTTP {resp.status_code}"
                                         + (f", failure reason 0x{reason:04X})" if reason else ")"), syntax)
        if failed:
            raise PermanentUploadError(f"STOW-RS: the PACS refused the instance (failure reason {reason}, "
                                       f"HTTP {resp.status_code})")
        self.client.check_status(resp, "STOW-RS")
        if uid not in {_uid(i) for i in _items(doc, REFERENCED_SOP_SEQ)}:
            raise TransientUploadError(f"STOW-RS: HTTP {resp.status_code} without this instance in "
                                       "ReferencedSOPSequence (not stored)")
        return None

    def _held(self, uid: str) -> str | None:
        """QIDO-RS: the WADO-RS path of the instance with this SOP Instance UID when the PACS holds one,
        else None (also when the PACS cannot answer now: the send goes ahead and proves itself)."""
        resp = self.client.probe("GET", f"{self.base}/instances", {"Accept": "application/dicom+json"},
                                 {"SOPInstanceUID": uid, "includefield": "0020000D,0020000E,00080018"})
        if resp is None or resp.status_code != 200 or not resp.content:
            return None
        try:
            found = json.loads(resp.content)
        except ValueError:
            return None
        for d in found if isinstance(found, list) else []:
            if isinstance(d, dict) and uid in _values(d, "00080018"):
                study, series = _values(d, "0020000D"), _values(d, "0020000E")
                if study and series:
                    return f"{self.base}/studies/{study[0]}/series/{series[0]}/instances/{uid}"
                return f"{self.base}/instances/{uid}"  # pragma: no cover - a QIDO answer without its levels
        return None

    def _same_instance(self, url: str, sha256: str, path: Path) -> bool:
        """WADO-RS: is the copy the PACS holds the file we queued?  Byte for byte, or (a PACS that
        coerces attributes on storage: a new file meta, an issuer, its own private tags) the same pixel
        data in the same transfer syntax.  Transient when it cannot be told now (a re-send might be
        answered success for someone else's copy)."""
        resp = self.client.probe("GET", url, {"Accept": 'multipart/related; type="application/dicom"; '
                                              "transfer-syntax=*"})
        if resp is None or resp.status_code != 200:
            code = "no answer" if resp is None else f"HTTP {resp.status_code}"
            raise TransientUploadError(f"STOW-RS: the PACS holds this SOP Instance UID and its copy cannot be "
                                       f"retrieved to compare ({code})")
        part = first_part(resp.content, resp.headers.get("Content-Type", ""))
        if part is None:
            raise TransientUploadError("STOW-RS: the PACS holds this SOP Instance UID and its WADO-RS answer "
                                       "is not a multipart DICOM body")
        if hashlib.sha256(part).hexdigest() == sha256:
            return True
        return _pixels(io.BytesIO(part)) == _pixels(path) != (None, None)

    def abort(self) -> None:
        self.client.abort()

    def close(self) -> None:
        self.client.close()
