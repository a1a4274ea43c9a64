"""DICOMweb STOW-RS destination: ``POST {url}/studies``, one instance per request, streamed from disk.

Success only when the response lists this SOP Instance UID in ReferencedSOPSequence (0008,1199):
Orthanc 1.10 answers 200 with an empty sequence when the body was cut off, so a status code is no
proof.  A FailedSOPSequence (0008,1198) entry for the instance is a refusal (permanent).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom

from medsendx_edge.config import DestinationConfig
from medsendx_edge.errors import PermanentUploadError, TransientUploadError
from medsendx_edge.upload.destinations import PRESENT
from medsendx_edge.upload.destinations._http import HttpClient

REFERENCED_SOP_SEQ = "00081199"
FAILED_SOP_SEQ = "00081198"
REFERENCED_SOP_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"


def sop_instance_uid(path: Path) -> str:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        return str(ds.SOPInstanceUID)
    except Exception as exc:  # noqa: BLE001 - our own anonymized output: should never happen
        raise PermanentUploadError(f"outbox file has no readable SOPInstanceUID ({type(exc).__name__})") from None


def _items(doc: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return list((doc.get(tag) or {}).get("Value") or [])


def _uid(item: dict[str, Any]) -> str | None:
    vals = (item.get(REFERENCED_SOP_UID) or {}).get("Value") or []
    return str(vals[0]) if vals else None


class DicomWebDestination:
    kind = "dicomweb"

    def __init__(self, cfg: DestinationConfig, bandwidth_limit_bps: int | None = None) -> None:
        assert cfg.url
        self.base = cfg.url.rstrip("/")
        self.url = self.base + "/studies"
        self.client = HttpClient(cfg, bandwidth_limit_bps)
        self.progress: Callable[[], None] | None = None

    def send(self, path: Path, item_id: str, sha256: str, suffix: str = ".dcm", retry: bool = False) -> str | None:
        uid = sop_instance_uid(path)
        if retry and self._holds(uid):
            return PRESENT
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
        if failed:
            reason = ((failed[0].get(FAILURE_REASON) or {}).get("Value") or ["?"])[0]
            raise PermanentUploadError(f"STOW-RS: the PACS refused the instance (failure reason {reason}, "
                                       f"HTTP {resp.status_code})")
        self.client.check_status(resp, "STOW-RS")
        if uid not in {_uid(i) for i in _items(doc, REFERENCED_SOP_SEQ)}:
            raise TransientUploadError(f"STOW-RS: HTTP {resp.status_code} without this instance in "
                                       "ReferencedSOPSequence (not stored)")
        return None

    def _holds(self, uid: str) -> bool:
        """QIDO-RS: does the PACS already have this SOP Instance UID (a send cut after the PACS stored it)?"""
        resp = self.client.probe("GET", f"{self.base}/instances", {"Accept": "application/dicom+json"},
                                 {"SOPInstanceUID": uid, "includefield": "00080018"})
        if resp is None or resp.status_code != 200 or not resp.content:
            return False
        try:
            found = json.loads(resp.content)
        except ValueError:
            return False
        return isinstance(found, list) and any(
            isinstance(d, dict) and uid in ((d.get("00080018") or {}).get("Value") or []) for d in found)

    def abort(self) -> None:
        self.client.abort()

    def close(self) -> None:
        self.client.close()
