"""DIMSE destination: C-STORE to a PACS over one association reused for many instances.

* **Presentation contexts for what the queue holds**: for each SOP class met, the file's own transfer
  syntax first, then Explicit VR Little Endian as the fallback; when a new SOP class or syntax appears
  the association is renegotiated with the union (at most 128 contexts).  A file goes as stored (no
  decoding) when its syntax was accepted.  A compressed file whose context was rejected is a
  :class:`SyntaxRefusedError`: the uploader decodes it losslessly in the outbox and sends it again (the
  queue row then describes what is sent), and the route stage stops compressing for this PACS.  An
  uncompressed file in another encoding goes in the uncompressed one accepted (Explicit, else Implicit VR
  Little Endian, which every Storage SCP must take and some take alone).
* **Statuses classed by the standard** (PS3.4 Annex B.2.3): success and warnings (0xB000, 0xB006,
  0xB007) are delivered; 0xA7xx (out of resources) is transient; 0xA9xx (data set does not match SOP
  class) and 0xCxxx (cannot understand) are permanent, quarantined with the status and its meaning; no
  response (timeout, abort) is transient and the association is dropped.  An association rejected
  permanently (a calling AE title the PACS does not know) is a destination fault: the queue waits.
* **Storage Commitment** (optional, PS3.4 Annex J, push model): ``request_commitment`` sends an
  N-ACTION naming stored instances; the PACS answers later with an N-EVENT-REPORT, on the sending
  association or on a reverse one to a small SCP that accepts only the PACS's AE title.  Reports go to
  ``report_sink`` (the uploader), which makes the named items delivered or sends them again.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medsendx_edge.config import DestinationConfig
from medsendx_edge.dicom_listener import bound_pdu_reads
from medsendx_edge.errors import DestinationFaultError, PermanentUploadError, SyntaxRefusedError, TransientUploadError

COMMITMENT_CLASS = "1.2.840.10008.1.20.1"            # Storage Commitment Push Model SOP Class
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"       # its well-known SOP Instance
#: PS3.3 C.14.1.1 Failure Reason meanings (N-EVENT-REPORT Failed SOP Sequence)
FAILURE_REASONS = {0x0110: "processing failure", 0x0112: "no such object instance", 0x0213: "resource limitation",
                   0x0122: "referenced SOP class not supported", 0x0119: "class / instance conflict",
                   0x0131: "duplicate transaction UID"}
WARNINGS = {0xB000: "coercion of data elements", 0xB006: "elements discarded", 0xB007: "data set does not match SOP class"}
MAX_CONTEXTS = 128


def status_meaning(code: int) -> str:
    if code in WARNINGS:
        return f"warning: {WARNINGS[code]}"
    if code & 0xFF00 == 0xA700:
        return "refused: out of resources"
    if code & 0xFF00 == 0xA900:
        return "error: data set does not match SOP class"
    if code & 0xF000 == 0xC000:
        return "error: cannot understand"
    if code == 0x0122:
        return "refused: SOP class not supported"
    if code == 0x0124:
        return "refused: not authorized"
    return "failure"


def classify(code: int) -> str:
    """"delivered", "transient" or "permanent" for a C-STORE response status."""
    if code == 0x0000 or code in WARNINGS:
        return "delivered"
    if code & 0xFF00 == 0xA700 or code == 0x0213:  # out of resources; (0x0213: resource limitation)
        return "transient"
    return "permanent"


WORD_BYTES = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}   # VRs whose bytes are words in the byte order


def _swapped(data: bytes, width: int) -> bytes:
    """Words of ``width`` bytes from big to little endian (overlays, LUT data, private OW)."""
    import numpy as np

    n = len(data) // width * width
    return np.frombuffer(data[:n], dtype=f">u{width}").astype(f"<u{width}").tobytes() + data[n:]


def _beat_until(done: threading.Event, progress: Callable[[], None]) -> None:
    while not done.wait(5.0):
        progress()


class DimseDestination:
    kind = "dimse"

    def __init__(self, cfg: DestinationConfig) -> None:
        from pynetdicom import AE, _config

        # pynetdicom's own per-event debug handlers cost ~10 % of the throughput; our log lines are ours
        _config.LOG_HANDLER_LEVEL = "none"
        bound_pdu_reads()   # a PACS (or whoever answers in its place) cannot announce a 2 GB PDU either
        assert cfg.host and cfg.port
        self.cfg = cfg
        self.ae = AE(ae_title=cfg.calling_aet)
        self.ae.acse_timeout = cfg.timeout_s
        self.ae.dimse_timeout = cfg.timeout_s
        self.ae.network_timeout = cfg.timeout_s
        self.assoc: Any = None
        self._reject_result: int | None = None
        self.wanted: dict[str, list[str]] = {}   # SOP class -> transfer syntaxes proposed
        self._proposed: set[str] = set()         # the SOP classes the current association proposed
        self.associations = 0                      # how many were opened (tests, the benchmark)
        self.progress: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self.commitment = cfg.storage_commitment
        self.last_sent: tuple[str, str] | None = None  # (SOP class, SOP instance) of the last stored file
        #: called with (committed SOP instance UIDs, {failed UID: reason}) for each report
        self.report_sink: Callable[[str, list[str], dict[str, str]], None] | None = None
        self._report_server: Any = None

    # --------------------------------------------------------------- association
    def _ssl(self) -> ssl.SSLContext | None:
        if not self.cfg.tls:
            return None
        ctx = ssl.create_default_context(cafile=str(self.cfg.ca_bundle) if self.cfg.ca_bundle else None)
        if self.cfg.tls_cert_file and self.cfg.tls_key_file:
            ctx.load_cert_chain(str(self.cfg.tls_cert_file), str(self.cfg.tls_key_file))
        return ctx

    def _accepted(self, sop_class: str, syntax: str) -> Any:
        if self.assoc is None or not self.assoc.is_established:
            return None
        for cx in self.assoc.accepted_contexts:
            if cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == syntax:
                return cx
        return None

    def _want(self, sop_class: str, syntax: str) -> bool:
        """Add (sop_class, syntax) to what is proposed; True when the association must be renegotiated."""
        proposals = self.wanted.pop(sop_class, [])
        self.wanted[sop_class] = proposals   # the most recently sent last: the newest-first proposal keeps it
        changed = False
        # the file's own syntax, then the two uncompressed ones (Implicit VR Little Endian is the one syntax
        # every Storage SCP must accept: a PACS may take nothing else)
        for ts in (syntax, str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)):
            if ts not in proposals:
                proposals.append(ts)
                changed = True
        return changed

    def _associate(self, first: str | None = None) -> None:
        """A new association proposing what the queue has met: the SOP class ``first`` (the file in hand)
        before all others, then the others from the newest met, whole classes while the 128 contexts an
        association may carry last (one kept for Storage Commitment).  Oldest first, a truck that had met
        some 42 classes proposed no context for the next one, and its files were quarantined as refused."""
        from pynetdicom import evt

        self.close_association()
        self.ae.requested_contexts = []
        budget = MAX_CONTEXTS - (1 if self.commitment else 0)
        order = sorted(reversed(list(self.wanted.items())), key=lambda kv: kv[0] != first)   # stable
        count = 0
        self._proposed = set()
        for sop_class, syntaxes in order:
            if count + len(syntaxes) > budget:
                continue   # a class with fewer syntaxes may still fit
            for ts in syntaxes:  # one context per syntax: each can be accepted on its own
                self.ae.add_requested_context(sop_class, [ts])
                count += 1
            self._proposed.add(sop_class)
        handlers: list[Any] = [(evt.EVT_ACSE_RECV, self._acse)]
        if self.commitment:
            self.ae.add_requested_context(COMMITMENT_CLASS)
            handlers.append((evt.EVT_N_EVENT_REPORT, self._on_report))
        self._reject_result = None
        host, port, tls = str(self.cfg.host), int(self.cfg.port or 0), self._ssl()
        try:
            assoc = self.ae.associate(host, port, ae_title=self.cfg.called_aet,
                                      tls_args=(tls, host) if tls is not None else None, evt_handlers=handlers)
        except ssl.SSLError:
            raise DestinationFaultError("DIMSE: TLS failed: check ca_bundle and the PACS certificate") from None
        except OSError as exc:
            raise TransientUploadError(f"DIMSE: cannot connect ({type(exc).__name__})") from None
        if assoc.is_rejected:
            # Permanent rejections (unknown AE titles) are the configuration; transient ones wait.
            if self._reject_result == 0x01:
                raise DestinationFaultError("DIMSE: association rejected permanently: check called_aet and "
                                            "that the PACS knows calling_aet")
            raise TransientUploadError("DIMSE: association rejected (transient)")
        if not assoc.is_established:
            raise TransientUploadError("DIMSE: association not established (aborted or no answer)")
        self.assoc = assoc
        self.associations += 1

    def _acse(self, event: Any) -> None:
        result = getattr(event.primitive, "result", None)
        if result in (0x01, 0x02):
            self._reject_result = result

    # --------------------------------------------------------------- send
    def send(self, path: Path, item_id: str, sha256: str, suffix: str = ".dcm", retry: bool = False,
             sop_uid: str | None = None) -> str | None:
        from pynetdicom import _config

        with self._lock:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                sop_class = str(ds.SOPClassUID)
                syntax = str(ds.file_meta.TransferSyntaxUID)
            except Exception as exc:  # noqa: BLE001 - our own anonymized output: should never happen
                raise PermanentUploadError(f"DIMSE: outbox file unreadable ({type(exc).__name__})") from None
            # Again when the association in hand left this class out (it was met long ago, and another
            # class's association had no room for it): proposed, refused, it is the PACS's answer.
            if (self._want(sop_class, syntax) or self.assoc is None or not self.assoc.is_established
                    or sop_class not in self._proposed):
                self._associate(first=sop_class)
            cx = self._accepted(sop_class, syntax)
            plain = next((UID(ts) for ts in (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
                          if self._accepted(sop_class, ts) is not None), None)
            if cx is not None:
                _config.STORE_SEND_CHUNKED_DATASET = True  # streamed from the file, never decoded
                payload: Any = str(path)
            elif plain is not None:
                if UID(syntax).is_compressed or UID(syntax).is_deflated:
                    # The PACS takes the instance but not this encoding: the uploader decodes the file in
                    # the outbox (its queue row then describes what is sent) and the route stage stops
                    # compressing for this PACS.
                    raise SyntaxRefusedError(f"DIMSE: the PACS rejected the presentation context for "
                                             f"{UID(syntax).name}", syntax)
                _config.STORE_SEND_CHUNKED_DATASET = False
                payload = pydicom.dcmread(path)
                if not UID(syntax).is_little_endian:
                    # Big endian: every element decoded to its value (written again in the accepted byte
                    # order), the pixel values swapped; left raw, its bytes went out as they were (a PACS got
                    # 16384 rows for 64: found by the review of issue 29).
                    values = payload.pixel_array if "PixelData" in payload else None
                    for elem in payload.iterall():   # decoded to values; words of other data swapped
                        width = WORD_BYTES.get(str(elem.VR))
                        if width and elem.tag != 0x7FE00010 and isinstance(elem.value, (bytes, bytearray)):
                            elem.value = _swapped(bytes(elem.value), width)
                    if values is not None:
                        payload.PixelData = values.astype(values.dtype.newbyteorder("<")).tobytes()
                payload.file_meta.TransferSyntaxUID = plain   # pynetdicom encodes it in the accepted one
                payload.set_original_encoding(plain.is_implicit_VR, plain.is_little_endian,
                                              payload.original_character_set)
            else:
                raise PermanentUploadError(f"DIMSE: the PACS accepts no presentation context for SOP class "
                                           f"{UID(sop_class).name}")
            beating = threading.Event()
            if self.progress is not None:
                # A heartbeat every few seconds while a large object goes out (a per-PDU event handler
                # would cost 10 % of the throughput).
                threading.Thread(target=_beat_until, args=(beating, self.progress), daemon=True).start()
            dul = self.assoc.dul
            idle_delay = getattr(dul, "_run_loop_delay", None)
            try:
                if idle_delay is not None:
                    # pynetdicom's reactor sleeps 1 ms whenever its queue is empty, which during a send
                    # happens between every few PDUs: polled without a pause while this send runs
                    # (idle, the kept-open association goes back to sleeping).
                    dul._run_loop_delay = 0.0
                status = self.assoc.send_c_store(payload)
            except (OSError, RuntimeError, ValueError) as exc:
                self.close_association()
                raise TransientUploadError(f"DIMSE: C-STORE failed ({type(exc).__name__})") from None
            finally:
                beating.set()
                if idle_delay is not None:
                    dul._run_loop_delay = idle_delay
            if not status or "Status" not in status:
                self.close_association()
                raise TransientUploadError("DIMSE: no C-STORE response (timeout or abort)")
            code = int(status.Status)
            outcome = classify(code)
            if outcome == "transient":
                raise TransientUploadError(f"DIMSE: C-STORE status 0x{code:04X} ({status_meaning(code)})")
            if outcome == "permanent":
                raise PermanentUploadError(f"DIMSE: C-STORE status 0x{code:04X} ({status_meaning(code)})")
            self.last_sent = (sop_class, str(ds.SOPInstanceUID))
            return None

    # --------------------------------------------------------------- storage commitment
    def request_commitment(self, instances: list[tuple[str, str]], transaction_uid: str) -> str:
        """N-ACTION: ask the PACS to commit to ``instances`` ((SOP class, SOP instance) pairs) under
        ``transaction_uid``, which the caller has recorded first (a PACS may report on this association
        before the N-ACTION returns).  The answer comes later, to ``report_sink``."""
        from pydicom.dataset import Dataset

        self._ensure_report_listener()
        with self._lock:
            if self.assoc is None or not self.assoc.is_established or not any(
                    cx.abstract_syntax == COMMITMENT_CLASS for cx in self.assoc.accepted_contexts):
                self._associate()
            if not any(cx.abstract_syntax == COMMITMENT_CLASS for cx in self.assoc.accepted_contexts):
                raise DestinationFaultError("DIMSE: the PACS does not accept Storage Commitment "
                                            "(set storage_commitment: false)")
            request = Dataset()
            request.TransactionUID = transaction_uid
            refs = []
            for sop_class, sop_instance in instances:
                ref = Dataset()
                ref.ReferencedSOPClassUID = sop_class
                ref.ReferencedSOPInstanceUID = sop_instance
                refs.append(ref)
            request.ReferencedSOPSequence = refs
            try:
                status, _ = self.assoc.send_n_action(request, 1, COMMITMENT_CLASS, COMMITMENT_INSTANCE)
            except (OSError, RuntimeError, ValueError) as exc:
                self.close_association()
                raise TransientUploadError(f"DIMSE: N-ACTION failed ({type(exc).__name__})") from None
            if not status or "Status" not in status:
                self.close_association()
                raise TransientUploadError("DIMSE: no N-ACTION response (timeout or abort)")
            code = int(status.Status)
            if code != 0x0000:
                raise TransientUploadError(f"DIMSE: storage commitment request refused, status 0x{code:04X}")
            return str(request.TransactionUID)

    def _on_report(self, event: Any) -> tuple[int, None]:
        """An N-EVENT-REPORT (PS3.4 J.3.3): event type 1 all committed, 2 some failed."""
        info = event.event_information
        if event.event_type not in (1, 2) or info is None:
            return 0x0113, None  # no such event type
        transaction = str(info.get("TransactionUID", "") or "").strip()
        if not transaction:
            return 0x0120, None  # missing attribute: a report names the transaction it answers (PS3.4 J.3.3)
        committed = [str(r.ReferencedSOPInstanceUID) for r in info.get("ReferencedSOPSequence", [])]
        failed = {}
        for r in info.get("FailedSOPSequence", []):
            code = int(r.get("FailureReason", 0x0110))
            failed[str(r.ReferencedSOPInstanceUID)] = (f"storage commitment failed: 0x{code:04X} "
                                                       f"({FAILURE_REASONS.get(code, 'failure')})")
        if self.report_sink is not None:
            self.report_sink(transaction, committed, failed)
        return 0x0000, None

    def _ensure_report_listener(self) -> None:
        """The SCP for reports on a reverse association: the PACS's AE title only, our AE title only."""
        if self.cfg.commitment_port is None or self._report_server is not None:
            return
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.cfg.calling_aet)
        ae.add_supported_context(COMMITMENT_CLASS, scu_role=True, scp_role=True)
        ae.require_calling_aet = [self.cfg.called_aet]
        ae.require_called_aet = True
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.cfg.timeout_s
        ae.maximum_associations = 4
        ae.maximum_pdu_size = 64 * 1024
        self._report_server = ae.start_server((self.cfg.commitment_bind, int(self.cfg.commitment_port)),
                                              block=False, ssl_context=self._server_ssl(),
                                              evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)])

    def _server_ssl(self) -> ssl.SSLContext | None:
        """With ``tls: true`` the report listener is DICOM TLS too: our certificate, and the PACS's
        client certificate checked against ca_bundle when one is given."""
        if not self.cfg.tls:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        assert self.cfg.tls_cert_file and self.cfg.tls_key_file  # config.py refuses the rest
        ctx.load_cert_chain(str(self.cfg.tls_cert_file), str(self.cfg.tls_key_file))
        if self.cfg.ca_bundle:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(str(self.cfg.ca_bundle))
        return ctx

    def abort(self) -> None:
        assoc = self.assoc
        if assoc is not None and assoc.is_established:
            assoc.abort()

    def close(self) -> None:
        self.close_association()
        server, self._report_server = self._report_server, None
        if server is not None:
            server.shutdown()

    def close_association(self) -> None:
        assoc, self.assoc = self.assoc, None
        if assoc is not None and assoc.is_established:
            try:
                assoc.release()
            except Exception:  # noqa: BLE001 - a dead association needs no release
                pass
