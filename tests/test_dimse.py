"""The DIMSE destination against a real Orthanc's DICOM port and against a pynetdicom SCP answering chosen
statuses: one association for many instances, the file's own transfer syntax or a lossless fallback,
statuses classed by the standard, an Orthanc stopped and started again mid-queue."""

from __future__ import annotations

import os
import shutil

import pydicom
import pytest

from conftest import PYDICOM_TEST_FILES, make_config
from medsendx_edge.config import DestinationConfig
from medsendx_edge.daemon import Daemon
from medsendx_edge.errors import PermanentUploadError, TransientUploadError
from medsendx_edge.spool import SENT
from medsendx_edge.synthetic import synthetic_mammogram
from medsendx_edge.upload.destinations import make_destination
from medsendx_edge.upload.destinations.dimse import classify


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
    # MR_small_jp2klossless and MR_small_RLE are one instance in two encodings: the PACS keeps one
    assert len(sent) == 6 and len(uids) == 5 and orthanc.instance_count() == 5
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
