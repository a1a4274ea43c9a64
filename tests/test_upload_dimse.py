"""The DIMSE destination against a real Orthanc's DICOM port and against a pynetdicom SCP answering chosen
statuses: one association for many instances, the file's own transfer syntax or a lossless fallback,
statuses classed by the standard, an Orthanc stopped and started again mid-queue."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import numpy as np
import pydicom
import pytest
import requests
from pydicom.dataset import Dataset

from conftest import PYDICOM_TEST_FILES, make_config, require
from orthanc_server import DICOMWEB_PLUGIN, ORTHANC, OrthancServer, free_port
from medsendx_edge.config import ConfigError, DestinationConfig, UploadConfig, config_from_dict
from medsendx_edge.daemon import Daemon
from medsendx_edge.errors import PermanentUploadError, TransientUploadError
from medsendx_edge.spool import OUTBOX, SENT, Spool, new_id
from medsendx_edge.upload.uploader import Uploader
from medsendx_edge.synthetic import synthetic_mammogram
from medsendx_edge.upload.destinations import make_destination
from medsendx_edge.upload.destinations.dimse import COMMITMENT_CLASS, COMMITMENT_INSTANCE, classify


def _dimse(orthanc) -> DestinationConfig:
    return DestinationConfig(kind="dimse", path=None, host="127.0.0.1", port=orthanc.dicom_port,
                             called_aet="ORTHANC", calling_aet="MEDSENDX", timeout_s=10)


def test_statuses_are_classed_by_the_standard():
    assert classify(0x0000) == classify(0xB000) == classify(0xB007) == "delivered"
    assert classify(0xA700) == classify(0xA7FF) == "transient"
    assert classify(0xA900) == classify(0xC000) == classify(0xC211) == classify(0x0122) == "permanent"


def test_pipeline_delivers_over_dimse_on_one_association(tmp_path, orthanc):
    cfg = make_config(tmp_path, destination=_dimse(orthanc))
    cfg.inbox.mkdir(parents=True)
    for i in range(3):
        synthetic_mammogram(128, 104, seed=i)[0].save_as(cfg.inbox / f"m{i}.dcm", enforce_file_format=True)
    for name in ("CT_small.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"):
        shutil.copyfile(PYDICOM_TEST_FILES / name, cfg.inbox / name)
    for f in cfg.inbox.iterdir():
        os.utime(f, (0, 0))
    daemon = Daemon(cfg)
    assert daemon.run_once() == 0
    sent = daemon.spool.ready(SENT)
    uids = {str(pydicom.dcmread(daemon.spool.path(SENT, i), stop_before_pixels=True).SOPInstanceUID) for i in sent}
    # MR_small_jp2klossless and MR_small_RLE are one SOP Instance UID in two encodings, the same elements and
    # pixel values: the second is the same image, recorded as a duplicate and never sent (issue 29; it was
    # quarantined as a conflict before: the PACS keeps the first and answers success to the second)
    assert len(sent) == 6 and len(uids) == 5 and orthanc.instance_count() == 5
    assert list(daemon.spool.quarantined()) == []
    dups = [daemon.spool.state.item(i) for i in sent if daemon.spool.state.item(i).state.value == "duplicate"]
    assert len(dups) == 1 and "in another encoding" in dups[0].last_error
    for uid in uids:
        assert len(orthanc.qido_instance(uid)) == 1
    # Compressed files went as stored: Orthanc keeps their transfer syntax.
    syntaxes = {orthanc.get(f"/instances/{i}/metadata/TransferSyntax").text for i in orthanc.get("/instances").json()}
    # the compressed MR went as stored, not decoded (JPEG 2000 lossless or RLE: one instance in two
    # encodings, and the PACS keeps the one that arrives first)
    assert syntaxes & {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"}, syntaxes


def test_one_association_is_reused(tmp_path, orthanc):
    dest = make_destination(_dimse(orthanc))
    for i in range(5):
        ds, _ = synthetic_mammogram(64, 64, seed=i)
        p = tmp_path / f"m{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        dest.send(p, f"{i:024x}", "")
    assert dest.associations == 1 and orthanc.instance_count() == 5
    dest.close()


def test_orthanc_stopped_then_started_again(tmp_path, orthanc):
    dest = make_destination(_dimse(orthanc))
    ds, _ = synthetic_mammogram(64, 64, seed=9)
    p = tmp_path / "m.dcm"
    ds.save_as(p, enforce_file_format=True)
    orthanc.stop()
    with pytest.raises(TransientUploadError):
        dest.send(p, "a" * 24, "")
    orthanc.start()
    dest.send(p, "a" * 24, "")
    assert len(orthanc.qido_instance(str(ds.SOPInstanceUID))) == 1
    dest.close()


@pytest.mark.parametrize("status, error", [(0xA700, TransientUploadError), (0xC000, PermanentUploadError),
                                           (0xA900, PermanentUploadError), (0xB000, None)])
def test_scp_statuses(tmp_path, status, error):
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    ae = AE(ae_title="FAKEPACS")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, None)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: status)])
    try:
        dest = make_destination(DestinationConfig(kind="dimse", path=None, host="127.0.0.1",
                                                  port=server.server_address[1], called_aet="FAKEPACS",
                                                  timeout_s=5))
        ds, _ = synthetic_mammogram(32, 32)
        p = tmp_path / "m.dcm"
        ds.save_as(p, enforce_file_format=True)
        if error is None:
            dest.send(p, "b" * 24, "")
        else:
            with pytest.raises(error, match=f"0x{status:04X}"):
                dest.send(p, "b" * 24, "")
        dest.close()
    finally:
        server.shutdown()


# --------------------------------------------------------------------------- storage commitment
@pytest.fixture
def committing_orthanc(tmp_path):
    """Orthanc knowing the truck's AE title at the address where the destination takes reports."""
    require(ORTHANC, DICOMWEB_PLUGIN, package="orthanc orthanc-dicomweb")
    report_port = free_port()
    server = OrthancServer(tmp_path / "orthanc", extra={
        "DicomModalities": {"truck": ["MEDSENDX", "127.0.0.1", report_port]}})
    server.report_port = report_port
    yield server
    server.stop()


def _committing(orthanc, **kw) -> DestinationConfig:
    return dataclasses.replace(_dimse(orthanc), storage_commitment=True, commitment_port=orthanc.report_port, **kw)


def test_storage_commitment_confirmed_by_orthanc(tmp_path, committing_orthanc, log_lines):
    orthanc = committing_orthanc
    cfg = make_config(tmp_path, destination=_committing(orthanc))
    cfg.inbox.mkdir(parents=True)
    for i in range(4):
        synthetic_mammogram(128, 104, seed=i)[0].save_as(cfg.inbox / f"m{i}.dcm", enforce_file_format=True)
        os.utime(cfg.inbox / f"m{i}.dcm", (0, 0))
    daemon = Daemon(cfg)
    assert daemon.run_once() == 0
    state = daemon.spool.state
    sent = daemon.spool.ready(SENT)
    assert len(sent) == 4 and {state.item(i).state for i in sent} == {"delivered"}
    assert state.count_state("committing") == 0 and daemon.spool.ready(OUTBOX) == []
    events = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    stored = [e for e in events if e.get("event") == "file_stored"]
    confirmed = [e for e in events if e.get("event") == "file_delivered" and e.get("commitment") == "confirmed"]
    assert len(stored) == 4 and {e["outcome"] for e in stored} == {"awaiting_commitment"}
    assert sorted(e["file_id"] for e in confirmed) == sorted(sent)


def test_an_instance_the_pacs_lost_is_sent_again(tmp_path, committing_orthanc):
    """Stored, then lost by the PACS before it commits (deleted here through its REST API): Orthanc
    reports 0x0112 (no such object instance), the item goes back to the queue and is sent again."""
    orthanc = committing_orthanc
    spool, item_id, uploader, ds = _one_in_outbox(tmp_path, _committing(orthanc), seed=7)
    uploader.reconcile()
    assert uploader.step() and spool.state.item(item_id).state == "committing"
    for instance in orthanc.get("/instances").json():
        requests.delete(orthanc.url + f"/instances/{instance}", auth=(orthanc.user, orthanc.password), timeout=10)
    assert uploader.wait_for_commitments(20) == 0
    row = spool.state.item(item_id)
    assert row.state == "queued" and "0x0112 (no such object instance)" in row.last_error
    assert uploader.drain_once() == 0
    assert spool.state.item(item_id).state == "delivered" and spool.path(SENT, item_id).exists()
    assert len(orthanc.qido_instance(str(ds.SOPInstanceUID))) == 1
    uploader.destination.close()


def test_unanswered_commitment_is_asked_again_then_the_instance_resent(tmp_path, committing_orthanc):
    """The PACS never reports (its reverse association finds no one listening, and this destination takes
    reports on the sending association only): asked commitment_requests times, then sent again."""
    orthanc = committing_orthanc
    dest_cfg = dataclasses.replace(_dimse(orthanc), storage_commitment=True, commitment_port=None,
                                   commitment_timeout_s=60, commitment_requests=2)
    spool, item_id, uploader, _ = _one_in_outbox(tmp_path, dest_cfg, seed=8)
    uploader.reconcile()
    assert uploader.step()
    t0 = time.time()
    assert uploader.request_commitments(t0) == 1
    assert uploader.request_commitments(t0 + 10) == 0            # within the timeout: not asked again
    assert uploader.request_commitments(t0 + 61) == 1            # asked a second time
    assert uploader.request_commitments(t0 + 122) == 0           # given up: back in the queue
    row = spool.state.item(item_id)
    assert row.state == "queued" and "no storage commitment after 2 requests" in row.last_error
    uploader.destination.close()


def _pacs(port: int) -> DestinationConfig:
    """A pynetdicom SCP playing the PACS, with Storage Commitment asked for."""
    return DestinationConfig(kind="dimse", path=None, host="127.0.0.1", port=port, called_aet="PACS",
                             calling_aet="MEDSENDX", timeout_s=10, storage_commitment=True, commitment_timeout_s=600)


def _one_in_outbox(tmp_path, dest_cfg: DestinationConfig, seed: int):
    """A spool with one mammogram in its outbox, and an uploader to ``dest_cfg``."""
    spool = Spool(tmp_path / "spool")
    ds, _ = synthetic_mammogram(64, 64, seed=seed)
    src = tmp_path / "m.dcm"
    ds.save_as(src, enforce_file_format=True)
    item_id = new_id()
    spool.publish_file(OUTBOX, item_id, src)
    return spool, item_id, Uploader(spool, make_destination(dest_cfg), UploadConfig()), ds


def _commitment_pacs(port: int, on_action):
    """A pynetdicom SCP playing the PACS: it stores everything and answers N-ACTION with ``on_action``."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    scp = AE(ae_title="PACS")
    scp.supported_contexts = AllStoragePresentationContexts
    scp.add_supported_context(COMMITMENT_CLASS)
    return scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[
        (evt.EVT_C_STORE, lambda e: 0x0000), (evt.EVT_N_ACTION, on_action)])


def test_a_report_on_the_sending_association_is_taken(tmp_path):
    """A PACS that answers N-ACTION with the N-EVENT-REPORT on the same association (pynetdicom SCP)."""
    port = free_port()

    def on_action(event):
        info = Dataset()
        info.TransactionUID = event.action_information.TransactionUID
        info.ReferencedSOPSequence = event.action_information.ReferencedSOPSequence
        event.assoc.send_n_event_report(info, 1, COMMITMENT_CLASS, COMMITMENT_INSTANCE)
        yield 0x0000
        yield None

    server = _commitment_pacs(port, on_action)
    try:
        spool, item_id, uploader, _ = _one_in_outbox(tmp_path, _pacs(port), seed=3)
        assert uploader.drain_once() == 0
        assert spool.state.item(item_id).state == "delivered" and spool.path(SENT, item_id).exists()
        uploader.destination.close()
    finally:
        server.shutdown()


def test_storage_commitment_needs_dimse(tmp_path):
    with pytest.raises(ConfigError, match="storage_commitment: needs kind dimse"):
        config_from_dict({"destination": {"kind": "directory", "path": str(tmp_path), "storage_commitment": True}})


def test_a_pacs_without_storage_commitment_is_reported_and_asked_again_later(tmp_path):
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    port = free_port()
    scp = AE(ae_title="PACS")
    scp.supported_contexts = AllStoragePresentationContexts  # C-STORE only
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000)])
    try:
        spool, item_id, uploader, _ = _one_in_outbox(tmp_path, _pacs(port), seed=4)
        uploader.reconcile()
        assert uploader.step() and spool.state.item(item_id).state == "committing"
        t0 = time.time()
        assert uploader.request_commitments(t0) == 0                  # refused: not counted as a request
        assert spool.state.commitments_due(t0 + 10, 600) == []        # not asked again at once...
        assert [r[0] for r in spool.state.commitments_due(t0 + 31, 600)] == [item_id]  # ...but in 30 s
        assert spool.state.item(item_id).state == "committing"        # never taken for delivered
        uploader.destination.close()
    finally:
        server.shutdown()


def test_a_modality_push_reaches_orthanc_over_dimse_anonymized(tmp_path, orthanc):
    """The whole DICOM path: storescu (the allowed modality AE) -> the truck's listener -> anonymize ->
    triage -> the DIMSE destination -> Orthanc's DICOM port; a foreign AE is turned away."""
    import subprocess

    from medsendx_edge.config import DicomListenerConfig, replace
    from medsendx_edge.synthetic import synthetic_mammogram as mammogram

    require("storescu", package="dcmtk")
    cfg = replace(make_config(tmp_path, destination=_dimse(orthanc)), dicom_listener=DicomListenerConfig(
        enabled=True, ae_title="MEDSENDX", bind="127.0.0.1", port=0, allowed_calling_aets=("MAMMO_SCANNER",)))
    ds, _ = mammogram(256, 208, patient_name="DOE^JANE", patient_id="PID-DIMSE-1")
    src = tmp_path / "push.dcm"
    ds.save_as(src, enforce_file_format=True)
    daemon = Daemon(cfg)
    daemon.start()
    try:
        port = str(daemon.listener.port)
        foreign = subprocess.run(["storescu", "-aet", "INTRUDER", "-aec", "MEDSENDX", "127.0.0.1", port, str(src)],
                                 capture_output=True, text=True, timeout=60)
        assert foreign.returncode != 0
        push = subprocess.run(["storescu", "-aet", "MAMMO_SCANNER", "-aec", "MEDSENDX", "127.0.0.1", port, str(src)],
                              capture_output=True, text=True, timeout=60)
        assert push.returncode == 0, push.stderr
        assert orthanc.wait_stored(1, 60) == 1   # Orthanc says it stored it (its OnStoredInstance event)
    finally:
        daemon.shutdown()
    (instance,) = orthanc.get("/instances").json()
    tags = orthanc.get(f"/instances/{instance}/simplified-tags").json()
    assert tags["PatientName"] != "DOE^JANE" and tags["PatientID"] != "PID-DIMSE-1"
    assert tags["PatientIdentityRemoved"] == "YES" and tags["SOPInstanceUID"] != str(ds.SOPInstanceUID)
    assert orthanc.get(f"/instances/{instance}/file").content.count(b"DOE") == 0


def test_a_forged_commitment_report_delivers_nothing(tmp_path):
    """Issue 23, finding 4: a process calling itself the PACS, on the report port, with a Transaction UID
    the truck never issued (or the right one, for an instance it did not name) moves nothing to sent/;
    the PACS's own report for the transaction does."""
    from pynetdicom import AE
    from pydicom.uid import generate_uid

    port, report_port = free_port(), free_port()
    asked = []

    def on_action(event):  # a PACS that accepts the request and reports later (on a reverse association)
        asked.append(event.action_information)
        yield 0x0000
        yield None

    server = _commitment_pacs(port, on_action)

    def report(transaction_uid: str, sop_uid: str) -> int:
        forger = AE(ae_title="PACS")  # the AE title is all the report listener can check
        forger.add_requested_context(COMMITMENT_CLASS)
        assoc = forger.associate("127.0.0.1", report_port, ae_title="MEDSENDX")
        assert assoc.is_established
        info = Dataset()
        info.TransactionUID = transaction_uid
        ref = Dataset()
        ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
        ref.ReferencedSOPInstanceUID = sop_uid
        info.ReferencedSOPSequence = [ref]
        status, _ = assoc.send_n_event_report(info, 1, COMMITMENT_CLASS, COMMITMENT_INSTANCE)
        assoc.release()
        return int(status.Status)

    try:
        dest = dataclasses.replace(_pacs(port), commitment_port=report_port)
        spool, item_id, uploader, ds = _one_in_outbox(tmp_path, dest, seed=5)
        uploader.reconcile()
        assert uploader.step() and uploader.request_commitments() == 1
        assert spool.state.item(item_id).state == "committing"
        issued = str(asked[0].TransactionUID)
        sop = str(ds.SOPInstanceUID)
        report(generate_uid(), sop)                       # a transaction we never issued
        report(issued, generate_uid())                    # ours, for an instance it did not name
        uploader.reconcile()
        assert spool.state.item(item_id).state == "committing" and not spool.path(SENT, item_id).exists()
        assert report(issued, sop) == 0x0000              # the real report
        uploader.reconcile()
        assert spool.state.item(item_id).state == "delivered" and spool.path(SENT, item_id).exists()
        uploader.destination.close()
    finally:
        server.shutdown()


def test_the_report_listener_needs_a_certificate_under_tls(tmp_path):
    with pytest.raises(ConfigError, match="report listener is TLS too"):
        config_from_dict({"destination": {"kind": "dimse", "host": "127.0.0.1", "port": 104, "called_aet": "PACS",
                                          "tls": True, "storage_commitment": True, "commitment_port": 11113}})


def test_a_pacs_that_takes_only_implicit_vr_gets_decoded_files(tmp_path):
    """Implicit VR Little Endian is the one syntax every Storage SCP must accept, and some accept nothing
    else: it is proposed too, a JPEG-LS file is a SyntaxRefusedError (decoded and sent again, not
    quarantined), and an Explicit VR file goes in Implicit VR (found by the review of issue 29)."""
    from pynetdicom import AE, StoragePresentationContexts, evt
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    from medsendx_edge.errors import SyntaxRefusedError
    from medsendx_edge.triage.phantom import phantom_dataset
    from medsendx_edge.upload.compress import compress_file, decompressed_file

    scp = AE(ae_title="OLDPACS")
    for cx in StoragePresentationContexts:
        scp.add_supported_context(cx.abstract_syntax, [ImplicitVRLittleEndian])
    got = []

    def on_store(event):
        got.append(event.context.transfer_syntax)
        return 0x0000

    server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        ds, _ = phantom_dataset(256, 208, spacing_mm=0.5, seed=3)
        ds.save_as(tmp_path / "plain.dcm", enforce_file_format=True)
        (tmp_path / "jls.dcm").write_bytes(compress_file(tmp_path / "plain.dcm", "jpeg-ls").data)
        dest = make_destination(DestinationConfig(kind="dimse", path=None, host="127.0.0.1",
                                                  port=server.server_address[1], called_aet="OLDPACS", timeout_s=5))
        with pytest.raises(SyntaxRefusedError):
            dest.send(tmp_path / "jls.dcm", "x", "0")
        (tmp_path / "decoded.dcm").write_bytes(decompressed_file(tmp_path / "jls.dcm"))
        assert pydicom.dcmread(tmp_path / "decoded.dcm").file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert dest.send(tmp_path / "decoded.dcm", "x", "0") is None
        assert got == [ImplicitVRLittleEndian]
        dest.close()
    finally:
        server.shutdown()


@pytest.mark.parametrize("accepted", [("1.2.840.10008.1.2.1", "1.2.840.10008.1.2"), ("1.2.840.10008.1.2",)])
def test_a_big_endian_file_reaches_a_little_endian_pacs_with_its_values(accepted, tmp_path):
    """A big-endian file (anonymize keeps its encoding; JPEG-LS cannot take it) to a PACS that accepts only
    little endian: every element and pixel value arrives as it was (its raw bytes went out unswapped, and a
    PACS stored 16384 rows for 64: found by the review of issue 29)."""
    from pynetdicom import AE, StoragePresentationContexts, evt

    scp = AE(ae_title="PACS")
    for cx in StoragePresentationContexts:
        scp.add_supported_context(cx.abstract_syntax, list(accepted))
    got = []

    def on_store(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        got.append(ds)
        return 0x0000

    server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        # with words of other data than the pixels too: an overlay, a VOI LUT's data, a private OW element
        be = pydicom.dcmread(PYDICOM_TEST_FILES / "MR_small_bigendian.dcm")
        words = np.array([0x0001, 0x8000, 0x00FF, 0x1234], dtype=">u2").tobytes()
        be.add_new(0x60000010, "US", 2)
        be.add_new(0x60000011, "US", 32)
        be.add_new(0x60000100, "US", 1)
        be.add_new(0x60000102, "US", 0)
        be.add_new(0x60003000, "OW", words)
        lut = pydicom.Dataset()
        lut.LUTDescriptor = [4, 0, 16]
        lut.add_new(0x00283006, "OW", words)
        be.VOILUTSequence = pydicom.Sequence([lut])
        be.add_new(0x00091010, "LO", "PRIV")
        be.add_new(0x00091011, "OW", words)
        src = tmp_path / "be.dcm"
        be.save_as(src, enforce_file_format=True)
        ref = pydicom.dcmread(src)
        assert not ref.file_meta.TransferSyntaxUID.is_little_endian
        dest = make_destination(DestinationConfig(kind="dimse", path=None, host="127.0.0.1",
                                                  port=server.server_address[1], called_aet="PACS", timeout_s=5))
        assert dest.send(src, "x", "0") is None
        ds = got[0]
        assert np.array_equal(ds.pixel_array, ref.pixel_array)
        want = np.array([0x0001, 0x8000, 0x00FF, 0x1234], dtype="<u2").tobytes()
        assert ds[0x60003000].value == want and ds[0x00091011].value == want
        assert ds.VOILUTSequence[0][0x00283006].value == want
        for elem in ref:
            if elem.keyword != "PixelData" and elem.VR not in ("OW", "SQ") and not elem.tag.is_private:
                assert ds[elem.tag].value == elem.value, elem.keyword
        dest.close()
    finally:
        server.shutdown()


def test_a_class_met_after_many_others_still_gets_its_context(tmp_path):
    """An association carries at most 128 presentation contexts, three per SOP class here: a truck that had
    met 60 classes proposed none for the 61st, and its file was quarantined as refused by the PACS."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    port = free_port()
    scp = AE(ae_title="PACS")
    scp.supported_contexts = AllStoragePresentationContexts
    stored: list[str] = []

    def on_store(event):
        stored.append(str(event.request.AffectedSOPClassUID))
        return 0x0000

    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        cfg = DestinationConfig(kind="dimse", path=None, host="127.0.0.1", port=port, called_aet="PACS",
                                calling_aet="MEDSENDX", timeout_s=10)
        spool, item_id, uploader, ds = _one_in_outbox(tmp_path, cfg, seed=5)
        dest = uploader.destination
        others = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts
                  if str(cx.abstract_syntax) != str(ds.SOPClassUID)][:60]
        for sop_class in others:   # what the queue met before this file, newest last
            dest._want(sop_class, "1.2.840.10008.1.2.4.80")   # JPEG-LS, and the two uncompressed
        assert len(dest.wanted) == 60 and 3 * 60 > 128
        uploader.reconcile()
        assert uploader.step() and spool.state.item(item_id).state == "delivered"
        assert stored == [str(ds.SOPClassUID)]
        # Then 60 more classes, each sent, and the first class again: met long ago, left out of the
        # association the last file had, it is proposed again rather than taken for refused.
        newer = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts
                 if str(cx.abstract_syntax) not in (*others, str(ds.SOPClassUID))][:60]
        for sop_class in newer[:-1]:
            dest._want(sop_class, "1.2.840.10008.1.2.4.80")
        dest._want(newer[-1], "1.2.840.10008.1.2.1")   # 2 + 42 x 3: the 128 contexts full
        dest._associate(first=newer[-1])
        assert str(ds.SOPClassUID) not in dest._proposed
        again = tmp_path / "again.dcm"
        ds2 = synthetic_mammogram(64, 64, seed=6)[0]
        ds2.save_as(again, enforce_file_format=True)
        second = new_id()
        spool.publish_file(OUTBOX, second, again)
        uploader.reconcile()
        assert uploader.step() and spool.state.item(second).state == "delivered"
        assert stored == [str(ds.SOPClassUID)] * 2
        dest.close()
    finally:
        server.shutdown()
