"""Lossless compression before the outbox: smaller, decoded back to identical pixels, compressed inputs
untouched, the queue recording what is sent, the original sent when verification fails."""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pydicom
import pytest

from conftest import PYDICOM_TEST_FILES, make_config
from medsendx_edge.config import DestinationConfig
from medsendx_edge.daemon import Daemon
from medsendx_edge.spool import SENT
from medsendx_edge.triage.phantom import phantom_dataset
from medsendx_edge.upload import compress
from medsendx_edge.upload.compress import CODECS, compress_file


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
