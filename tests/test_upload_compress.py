"""Lossless compression before the outbox: smaller, decoded back to identical pixels, compressed inputs
untouched, the queue recording what is sent, the original sent when verification fails."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import threading

import numpy as np
import pydicom
import pytest

from conftest import PYDICOM_TEST_FILES, make_config, require
from orthanc_server import free_port, wait_listening
from medsendx_edge.config import DestinationConfig
from medsendx_edge.daemon import Daemon
from medsendx_edge.spool import SENT
from medsendx_edge.triage.phantom import phantom_dataset
from medsendx_edge.upload import compress
from medsendx_edge.upload.compress import CODECS, compress_file
from medsendx_edge.upload.destinations.dicomweb import first_part



@pytest.mark.parametrize("codec", sorted(CODECS))
def test_each_codec_is_smaller_and_identical(tmp_path, codec):
    ds, _ = phantom_dataset(512, 416, spacing_mm=0.5, density=0.3, seed=2)
    src = tmp_path / "m.dcm"
    ds.save_as(src, enforce_file_format=True)
    packed = compress_file(src, codec)
    assert packed.data is not None, packed.note
    assert len(packed.data) < src.stat().st_size
    out = tmp_path / "c.dcm"
    out.write_bytes(packed.data)
    back = pydicom.dcmread(out)
    assert back.file_meta.TransferSyntaxUID == CODECS[codec]
    assert np.array_equal(back.pixel_array, ds.pixel_array)
    # the same SOP Instance in another encoding (pydicom's compress() made a random new UID by default:
    # the PACS got an instance the linkage table does not know, and a route redone after a crash would
    # have sent the image twice under two UIDs)
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_compressed_inputs_pass_untouched(tmp_path):
    assert compress_file(PYDICOM_TEST_FILES / "MR_small_RLE.dcm", "jpeg-ls").data is None


def test_a_failed_verification_sends_the_original(tmp_path, monkeypatch):
    ds, _ = phantom_dataset(256, 208, spacing_mm=0.5, seed=3)
    src = tmp_path / "m.dcm"
    ds.save_as(src, enforce_file_format=True)
    monkeypatch.setattr(compress.np, "array_equal", lambda a, b: False)
    packed = compress_file(src, "jpeg-ls")
    assert packed.data is None and "differ" in packed.note


def test_the_pipeline_sends_jpeg_ls_and_records_what_it_sends(tmp_path):
    cfg = make_config(tmp_path, destination=DestinationConfig(kind="directory", path=tmp_path / "archive",
                                                              compression="jpeg-ls"))
    cfg.inbox.mkdir(parents=True)
    ds, _ = phantom_dataset(1024, 832, spacing_mm=0.28, density=0.3, seed=4)
    ds.save_as(cfg.inbox / "m.dcm", enforce_file_format=True)
    shutil.copyfile(PYDICOM_TEST_FILES / "MR_small_RLE.dcm", cfg.inbox / "rle.dcm")
    for f in cfg.inbox.iterdir():
        os.utime(f, (0, 0))
    daemon = Daemon(cfg)
    assert daemon.run_once() == 0
    by_ts = {}
    for item_id in daemon.spool.ready(SENT):
        path = daemon.spool.path(SENT, item_id)
        out = pydicom.dcmread(path)
        by_ts[str(out.file_meta.TransferSyntaxUID)] = out
        row = daemon.spool.state.item(item_id)
        data = path.read_bytes()
        assert row.size == len(data) and row.sha256 == hashlib.sha256(data).hexdigest()
        assert (daemon.spool.dir(SENT) / f"{item_id}.json").exists()  # the sidecar travelled with it
    mg = by_ts["1.2.840.10008.1.2.4.80"]  # JPEG-LS Lossless
    assert np.array_equal(mg.pixel_array, ds.pixel_array)
    assert "1.2.840.10008.1.2.5" in by_ts  # the RLE input passed untouched
    assert len(list((tmp_path / "archive").iterdir())) == 2


# --------------------------------------------------------------------------- a destination that refuses the syntax
def _drop(cfg, n: int, seed: int) -> list:
    """``n`` small phantom mammograms into the inbox; returns their datasets."""
    out = []
    for i in range(n):
        ds, _ = phantom_dataset(384, 320, spacing_mm=0.6, density=0.3, seed=seed + i,
                                study_uid=f"1.2.826.0.1.3680043.8.498.77{seed}{i}")
        ds.save_as(cfg.inbox / f"m{seed}_{i}.dcm", enforce_file_format=True)
        out.append(ds)
    for f in cfg.inbox.iterdir():
        os.utime(f, (0, 0))
    return out


def _check_sent_as_decoded(daemon, originals, received: list[bytes]) -> None:
    """Every image arrived once, uncompressed, with its pixels; each queue row describes the bytes sent."""
    from pydicom.uid import ExplicitVRLittleEndian

    pixels = sorted(hashlib.sha256(ds.pixel_array.tobytes()).hexdigest() for ds in originals)
    got = [pydicom.dcmread(io.BytesIO(b)) for b in received]
    assert all(g.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian for g in got)
    mg = [g for g in got if g.Modality == "MG"]
    assert sorted(hashlib.sha256(g.pixel_array.tobytes()).hexdigest() for g in mg) == pixels
    assert len({g.SOPInstanceUID for g in got}) == len(got)          # nothing twice
    for item_id in daemon.spool.ready(SENT):
        row = daemon.spool.state.item(item_id)
        data = daemon.spool.path(SENT, item_id).read_bytes()
        assert row.size == len(data) and row.sha256 == hashlib.sha256(data).hexdigest()
    assert list(daemon.spool.quarantined()) == []


def _routed(log_lines) -> list[dict]:
    return [e for e in map(json.loads, log_lines.getvalue().splitlines())
            if e["event"] == "file_processed" and e.get("stage") == "route"]


def _refusals(log_lines) -> list[dict]:
    return [e for e in map(json.loads, log_lines.getvalue().splitlines()) if e["event"] == "compression_refused"]


def test_a_pacs_that_rejects_the_jpeg_ls_context_gets_the_files_decoded_and_compression_stops(tmp_path, log_lines):
    """dcmtk's storescp accepts only uncompressed syntaxes by default: the real DIMSE peer that refuses."""
    require("storescp", package="dcmtk")
    port = free_port()
    received = tmp_path / "pacs"
    received.mkdir()
    scp = subprocess.Popen(["storescp", "-aet", "ANY-SCP", "-od", str(received), str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        cfg = make_config(tmp_path, destination=DestinationConfig(
            kind="dimse", path=None, host="127.0.0.1", port=port, called_aet="ANY-SCP", calling_aet="MEDSENDX",
            timeout_s=10, compression="jpeg-ls"))
        cfg.inbox.mkdir(parents=True)
        first = _drop(cfg, 2, seed=11)
        daemon = Daemon(cfg)
        assert daemon.run_once() == 0
        assert len(_refusals(log_lines)) == 1                      # learned and said once
        routed = len(_routed(log_lines))
        assert any("jpeg-ls" in e.get("transfer_syntax", "") for e in _routed(log_lines))  # compressed at first
        later = _drop(cfg, 1, seed=21)                             # after the refusal: not compressed at all
        assert daemon.run_once() == 0
        assert len(_refusals(log_lines)) == 1
        new = _routed(log_lines)[routed:]
        assert new and all("transfer_syntax" not in e for e in new)
        _check_sent_as_decoded(daemon, first + later, [p.read_bytes() for p in received.iterdir()])
        daemon.shutdown()
    finally:
        scp.terminate()
        scp.wait(10)


class _RefusingStow(http.server.BaseHTTPRequestHandler):
    """A DICOMweb server that takes instances but answers 415 to a JPEG-LS one.  A stand-in: Orthanc
    stores any syntax (and its ReceivedInstanceFilter, tried for this, still answers success)."""

    received: list[bytes] = []

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):   # QIDO-RS: the PACS holds nothing before it is sent
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"[]")

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        part = first_part(body, self.headers["Content-Type"])
        ds = pydicom.dcmread(io.BytesIO(part), stop_before_pixels=True)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            self.send_response(415)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        type(self).received.append(part)
        doc = {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [str(ds.SOPInstanceUID)]}}]}}
        data = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def refusing_stow():
    """The 415 server on a free loopback port; yields the config of a destination that compresses to it."""
    _RefusingStow.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RefusingStow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield DestinationConfig(kind="dicomweb", path=None, url=f"http://127.0.0.1:{server.server_port}/dicom-web",
                                compression="jpeg-ls", timeout_s=10)
    finally:
        server.shutdown()


def test_a_stow_415_gets_the_file_decoded_sent_again_and_remembered(tmp_path, log_lines, refusing_stow):
    cfg = make_config(tmp_path, destination=refusing_stow)
    cfg.inbox.mkdir(parents=True)
    originals = _drop(cfg, 2, seed=31)
    daemon = Daemon(cfg)
    assert daemon.run_once() == 0
    refusals = _refusals(log_lines)
    assert len(refusals) == 1 and "HTTP 415" in refusals[0]["reason"]
    originals += _drop(cfg, 1, seed=41)
    assert daemon.run_once() == 0 and len(_refusals(log_lines)) == 1
    _check_sent_as_decoded(daemon, originals, _RefusingStow.received)
    rows = [daemon.spool.state.item(i) for i in daemon.spool.ready(SENT)]
    assert all(r.attempts <= 1 for r in rows)     # a refused syntax is no failed attempt
    daemon.shutdown()


def test_another_destination_tries_compression_afresh(tmp_path):
    from medsendx_edge.state import StateDB
    from medsendx_edge.upload.compress import destination_key, refused_syntaxes, remember_refusal

    state = StateDB(tmp_path / "state.db")
    a = DestinationConfig(kind="dimse", path=None, host="10.0.0.1", port=104, called_aet="PACS")
    b = DestinationConfig(kind="dimse", path=None, host="10.0.0.2", port=104, called_aet="PACS")
    assert remember_refusal(state, destination_key(a), "1.2.840.10008.1.2.4.80")
    assert not remember_refusal(state, destination_key(a), "1.2.840.10008.1.2.4.80")   # said once
    assert refused_syntaxes(state, destination_key(a)) == {"1.2.840.10008.1.2.4.80"}
    assert refused_syntaxes(state, destination_key(b)) == set()
    assert "10.0.0.1" not in destination_key(a)


def test_the_same_image_again_after_a_refusal_is_a_duplicate_not_a_conflict(tmp_path, refusing_stow):
    """After a refusal the queue row holds the decoded copy's hash; the modality sending the same image
    again (Implicit VR, as many send over C-STORE) is routed uncompressed with another hash: recognised by
    its pixels as the same image, recorded as a duplicate, never quarantined as a conflict (review)."""
    from pydicom.uid import ImplicitVRLittleEndian

    from medsendx_edge.vocabulary import UploadState

    cfg = make_config(tmp_path, destination=refusing_stow)
    cfg.inbox.mkdir(parents=True)
    ds, _ = phantom_dataset(384, 320, spacing_mm=0.6, density=0.3, seed=5)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    daemon = Daemon(cfg)
    for name in ("a.dcm", "a-again.dcm"):
        (cfg.inbox / name).write_bytes(buf.getvalue())
        os.utime(cfg.inbox / name, (0, 0))
        assert daemon.run_once() == 0
    states = sorted(daemon.spool.state.item(i).state.value for i in daemon.spool.ready(SENT)
                    if daemon.spool.sidecar(i, SENT).get("triage") != "report")
    assert states == [UploadState.DELIVERED.value, UploadState.DUPLICATE.value], states
    assert list(daemon.spool.quarantined()) == []
    daemon.shutdown()
