"""DICOM C-STORE ingest: the modality can push images instead of dropping files on the share.

A pynetdicom Storage SCP (every storage SOP class, every transfer syntax, plus Verification).
Each received dataset is streamed to disk as it arrives (pynetdicom's
``STORE_RECV_CHUNKED_DATASET``, into a hidden folder beside the incoming queue), never held in memory
or decoded: a 1 GB tomosynthesis object costs a few MB of RAM, and three at once no more.  It is
fsynced and renamed into the incoming queue *before* the SCP answers Success: once the modality sees
Success it may delete its own copy.  While the disk is low it answers 0xA700 (out of resources), so the
modality keeps the image and retries later.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from medsendx_edge.logs import get_logger
from medsendx_edge.spool import INCOMING, Spool, new_id

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
PROCESSING_FAILURE = 0xC000


class StoreSCP:
    def __init__(self, spool: Spool, ae_title: str, bind: str, port: int,
                 may_accept: Callable[[], bool] = lambda: True, on_stored: Callable[[], None] = lambda: None) -> None:
        self.spool = spool
        self.address = (bind, port)
        self.may_accept = may_accept
        self.on_stored = on_stored
        self.ae = AE(ae_title=ae_title)
        all_syntaxes = None  # pynetdicom: None = every transfer syntax it knows
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, all_syntaxes)
        self.ae.add_supported_context(Verification)
        self.server: Any = None
        self._previous_tempdir: str | None = None
        self.log = get_logger(stage="ingest")

    def handle_store(self, event: Any) -> int:
        if not self.may_accept():
            self.log.warning("cstore_refused", reason="disk low", status=OUT_OF_RESOURCES)
            return OUT_OF_RESOURCES
        item_id = new_id()
        try:
            src = Path(event.dataset_path)
            size = src.stat().st_size
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
        scratch = self.spool.scratch_dir()
        scratch.mkdir(parents=True, exist_ok=True)
        self._previous_tempdir = tempfile.tempdir
        tempfile.tempdir = str(scratch)
        self.server = self.ae.start_server(self.address, block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self.handle_store)])
        self.log.info("cstore_listening", key=f"{self.address[0]}:{self.server.server_address[1]}")

    @property
    def port(self) -> int:
        return int(self.server.server_address[1]) if self.server else self.address[1]

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
            tempfile.tempdir = self._previous_tempdir
