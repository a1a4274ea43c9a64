"""DICOM C-STORE ingest: the modality can push images instead of dropping files on the share.

A pynetdicom Storage SCP (every storage SOP class, every transfer syntax, plus Verification).
Each received dataset is streamed to disk as it arrives (pynetdicom's
``STORE_RECV_CHUNKED_DATASET``, into a hidden folder beside the incoming queue), never held in memory
or decoded: a 1 GB tomosynthesis object costs a few MB of RAM, and three at once no more.  It is
fsynced and renamed into the incoming queue *before* the SCP answers Success: once the modality sees
Success it may delete its own copy.  While the disk is low it answers 0xA700 (out of resources), so the
modality keeps the image and retries later.

Locked down (``dicom_listener`` config): it binds loopback unless told otherwise; an association from a
calling AE title not on ``allowed_calling_aets`` is rejected at association time (A-ASSOCIATE-RJ,
"calling AE title not recognised") and logged once per AE title and peer address; at most
``max_associations`` at once; a connection that does not associate within ``acse_timeout_s`` (the ARTIM
timer) is dropped, so idle sockets cannot lock the modality out; one association may store at most
``max_bytes_per_association`` (then 0xA700); optional DICOM TLS.
"""

from __future__ import annotations

import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from medsendx_edge.config import DicomListenerConfig
from medsendx_edge.errors import ConfigError
from medsendx_edge.logs import get_logger
from medsendx_edge.spool import INCOMING, Spool, new_id

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
PROCESSING_FAILURE = 0xC000


#: No PDU a peer may send us is larger: an A-ASSOCIATE-RQ with every presentation context and a user
#: identity is well under 1 MB, and a P-DATA-TF is bounded by the maximum length we advertise (16 KB on the
#: listener and to a PACS, 64 KB for storage commitment reports).  pynetdicom reads whatever length a PDU
#: announces into memory, before any AE title is checked: one connection announcing 2 GB took the daemon
#: from 76 MB to 711 MB.
MAX_PDU_BYTES = 1 << 20


def bound_pdu_reads() -> None:
    """Refuse, for every pynetdicom socket of this process, a PDU announcing more than MAX_PDU_BYTES: the
    read fails as a closed transport (pynetdicom's Evt17) after the 6-byte header, nothing buffered."""
    from pynetdicom.transport import AssociationSocket

    original = AssociationSocket.recv
    if getattr(original, "bounded", False):
        return

    def recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
        if nr_bytes > MAX_PDU_BYTES:
            raise OSError(f"a PDU announcing {nr_bytes} bytes, over the {MAX_PDU_BYTES} any peer may send: "
                          "connection closed")
        return original(self, nr_bytes)

    recv.bounded = True  # type: ignore[attr-defined]
    AssociationSocket.recv = recv  # type: ignore[method-assign]


class StoreSCP:
    def __init__(self, spool: Spool, cfg: DicomListenerConfig,
                 may_accept: Callable[[], bool] = lambda: True, on_stored: Callable[[], None] = lambda: None) -> None:
        if not cfg.allowed_calling_aets:
            raise ConfigError("dicom_listener.allowed_calling_aets: required when the listener is enabled (got [])")
        self.spool = spool
        self.cfg = cfg
        self.address = (cfg.bind, cfg.port)
        self.may_accept = may_accept
        self.on_stored = on_stored
        self.ae = AE(ae_title=cfg.ae_title)
        all_syntaxes = None  # pynetdicom: None = every transfer syntax it knows
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            self.ae.add_supported_context(cx.abstract_syntax, all_syntaxes)
        self.ae.add_supported_context(Verification)
        self.ae.require_calling_aet = [a.strip() for a in cfg.allowed_calling_aets]
        self.ae.maximum_associations = cfg.max_associations
        self.ae.acse_timeout = cfg.acse_timeout_s
        self.ae.network_timeout = cfg.network_timeout_s
        self.server: Any = None
        self._previous_tempdir: str | None = None
        self._bytes: dict[int, int] = {}           # per association (id of the Association object)
        self._rejected_seen: set[tuple[str, str]] = set()
        self.active = 0          # associations established and not yet released or aborted
        self.peak_active = 0
        self._lock = threading.Lock()
        self.log = get_logger(stage="ingest")

    def _ssl_context(self) -> ssl.SSLContext | None:
        cfg = self.cfg
        if cfg.tls_cert_file is None or cfg.tls_key_file is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(cfg.tls_cert_file), str(cfg.tls_key_file))
        if cfg.tls_ca_file is not None:
            ctx.load_verify_locations(str(cfg.tls_ca_file))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    @staticmethod
    def _peer(event: Any) -> tuple[str, str]:
        req = event.assoc.requestor
        aet = str(getattr(req, "ae_title", "") or "").strip()
        return "".join(c if c.isprintable() else "?" for c in aet)[:16], f"{req.address}:{req.port}"

    def handle_rejected(self, event: Any) -> None:
        aet, peer = self._peer(event)
        with self._lock:
            if (aet, peer.rsplit(":", 1)[0]) in self._rejected_seen or len(self._rejected_seen) > 1000:
                return
            self._rejected_seen.add((aet, peer.rsplit(":", 1)[0]))
        self.log.warning("cstore_rejected", calling_ae=aet, peer=peer,
                         reason="calling AE title not on dicom_listener.allowed_calling_aets")

    def handle_established(self, event: Any) -> None:
        aet, peer = self._peer(event)
        with self._lock:
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)
        self.log.info("cstore_association", calling_ae=aet, peer=peer)

    def handle_released(self, event: Any) -> None:
        with self._lock:
            self._bytes.pop(id(event.assoc), None)
            self.active = max(0, self.active - 1)

    def handle_ended(self, event: Any) -> None:
        """An association aborted or its connection cut mid-transfer: the partial dataset pynetdicom was
        writing is deleted (it was never acknowledged, so the modality still has the image)."""
        self.handle_released(event)
        message = getattr(getattr(event.assoc, "dimse", None), "message", None)
        partial = getattr(message, "_data_set_file", None)
        if partial is None:
            return
        try:
            partial.close()
            Path(partial.name).unlink(missing_ok=True)
        except OSError:
            pass  # the sweep below gets it
        aet, peer = self._peer(event)
        self.log.warning("cstore_cut", calling_ae=aet, peer=peer, reason="association ended mid-transfer: "
                         "the partial dataset is discarded, the modality keeps its image")

    def sweep_scratch(self, now: float | None = None) -> int:
        """Delete received-file leftovers no transfer has written to for twice the network timeout (a
        transfer that stalls that long is aborted by pynetdicom)."""
        now = time.time() if now is None else now
        stale = now - max(60.0, 2 * self.cfg.network_timeout_s)
        removed = 0
        try:
            entries = list(os.scandir(self.spool.scratch_dir()))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < stale:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue
        if removed:
            self.log.warning("cstore_leftovers_removed", count=removed)
        return removed

    def handle_store(self, event: Any) -> int:
        if not self.may_accept():
            self.log.warning("cstore_refused", reason="disk low", status=OUT_OF_RESOURCES)
            return OUT_OF_RESOURCES
        item_id = new_id()
        try:
            src = Path(event.dataset_path)
            size = src.stat().st_size
            with self._lock:
                total = self._bytes.get(id(event.assoc), 0) + size
                self._bytes[id(event.assoc)] = total
            if total > self.cfg.max_bytes_per_association:
                aet, peer = self._peer(event)
                self.log.warning("cstore_refused", calling_ae=aet, peer=peer, status=OUT_OF_RESOURCES,
                                 reason="this association sent more than max_bytes_per_association")
                return OUT_OF_RESOURCES
            self.spool.publish_file(INCOMING, item_id, src)
        except OSError as exc:
            self.log.error("cstore_failed", file_id=item_id, error_class=type(exc).__name__, reason=exc.strerror)
            return OUT_OF_RESOURCES
        except Exception as exc:  # noqa: BLE001 - answer the modality, never crash the listener
            self.log.error("cstore_failed", file_id=item_id, error_class=type(exc).__name__)
            return PROCESSING_FAILURE
        self.log.info("file_received", file_id=item_id, bytes=size, mode="c-store")
        self.on_stored()
        return SUCCESS

    def start(self) -> None:
        # Received datasets go to disk in chunks, in a folder on the queue's file system (pynetdicom
        # writes them with NamedTemporaryFile, so the daemon process's temp dir is pointed there).
        _config.STORE_RECV_CHUNKED_DATASET = True
        bound_pdu_reads()
        scratch = self.spool.scratch_dir()
        scratch.mkdir(parents=True, exist_ok=True)
        self._previous_tempdir = tempfile.tempdir
        tempfile.tempdir = str(scratch)
        self.server = self.ae.start_server(self.address, block=False, ssl_context=self._ssl_context(),
                                           evt_handlers=[(evt.EVT_C_STORE, self.handle_store),
                                                         (evt.EVT_REJECTED, self.handle_rejected),
                                                         (evt.EVT_ESTABLISHED, self.handle_established),
                                                         (evt.EVT_RELEASED, self.handle_released),
                                                         (evt.EVT_ABORTED, self.handle_ended)])
        self.log.info("cstore_listening", key=f"{self.address[0]}:{self.server.server_address[1]}")

    @property
    def port(self) -> int:
        return int(self.server.server_address[1]) if self.server else self.address[1]

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
            tempfile.tempdir = self._previous_tempdir
