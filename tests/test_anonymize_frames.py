"""Where each compressed frame ends, walked from the codec's own syntax, on real pydicom files."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_fragments

from medsendx_edge.anonymize import frames

PHI = b"DOE^JANE 19610203"


def _fragments(name: str) -> tuple[str, list[bytes], int, int]:
    ds = pydicom.dcmread(get_testdata_file(name))
    frags = list(generate_fragments(ds.PixelData))[1:]   # the first item is the offset table
    return str(ds.file_meta.TransferSyntaxUID), frags, int(ds.get("NumberOfFrames", 1)), ds.Rows * ds.Columns


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "JPEG-LL.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "JPEG2000.dcm", "GDCMJ2K_TextGBR.dcm", "SC_rgb_rle_2frame.dcm",
                                  "emri_small_jpeg_2k_lossless.dcm"])
def test_every_frame_ends_where_its_stream_ends(name):
    ts, frags, count, pixels = _fragments(name)
    ends = frames.frame_ends(ts, frags, count, pixels)
    assert len(ends) == count
    assert ends[-1][1] == len(frags) - 1                      # the frames account for every fragment
    for _first, last, used in ends:                           # and end at their last fragment's end,
        assert len(frags[last]) - used <= 1                   # but for one pad byte


def test_bytes_after_the_end_marker_are_not_part_of_the_frame():
    ts, frags, count, pixels = _fragments("SC_rgb_jpeg_dcmtk.dcm")
    clean = frames.frame_ends(ts, frags, count, pixels)
    frags[-1] = frags[-1] + PHI + b"\xff\xd9"                 # even with a second EOI after the PHI
    assert frames.frame_ends(ts, frags, count, pixels) == clean


def test_a_thumbnail_with_its_own_eoi_in_an_app_segment_does_not_end_the_frame():
    """An embedded JPEG (an EXIF thumbnail) has its own SOI..EOI inside an APP1 segment: the walker skips
    the segment by its length instead of stopping at the first FFD9."""
    ts, frags, count, pixels = _fragments("SC_rgb_jpeg_dcmtk.dcm")
    stream = frags[0]
    thumb = b"\xff\xd8" + b"\x00" * 10 + b"\xff\xd9"
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + len(thumb)) + thumb
    frags[0] = stream[:2] + app1 + stream[2:]
    (_f, _l, used), = frames.frame_ends(ts, frags, count, pixels)
    assert used >= len(frags[0]) - 1


def test_rle_and_deflated_frames_end_with_their_data():
    ts, frags, count, pixels = _fragments("SC_rgb_rle_2frame.dcm")
    clean = frames.frame_ends(ts, frags, count, pixels)
    assert frames.frame_ends(ts, [f + PHI for f in frags], count, pixels) == clean
    assert all(len(f) - used <= 1 for (_f, _l, used), f in zip(clean, frags))
    raw = np.arange(4096, dtype=np.uint8).tobytes()
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = packer.compress(raw) + packer.flush()
    (_f, _l, used), = frames.frame_ends(frames.DEFLATED_FRAMES, [stream + PHI], 1, 4096)
    assert used == len(stream)


def test_frames_that_do_not_parse_are_an_error_not_a_guess():
    ts, frags, count, pixels = _fragments("JPEG2000.dcm")
    with pytest.raises(frames.FrameError):
        frames.frame_ends(ts, [PHI + frags[0]], count, pixels)        # no SOC
    with pytest.raises(frames.FrameError):
        frames.frame_ends(ts, frags, count + 1, pixels)                # fewer frames than the header says
    with pytest.raises(frames.FrameError):
        frames.frame_ends("1.2.840.10008.1.2.4.102", frags, count, pixels)   # video: not walked
    assert not frames.supported("1.2.840.10008.1.2.4.102") and frames.supported(ts)
