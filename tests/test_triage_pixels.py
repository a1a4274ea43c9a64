"""Pixels in (triage/pixels.py): real compressed and MONOCHROME1 files decoded as pydicom decodes them,
brighter always denser, the middle frame of a stack, colour as luminance, and the working image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medsendx_edge.triage.phantom import phantom_dataset
from medsendx_edge.triage.pixels import WORK_MAX, pixels_from_dataset, working_image

PYDICOM_DATA = Path(__import__("data_store").__file__).parent / "data"


@pytest.mark.parametrize("name", ["RG1_J2KR.dcm", "RG3_UNCI.dcm", "MR2_J2KR.dcm", "JPEG-LL.dcm"])
def test_real_files_decode_as_pydicom_decodes_them_and_monochrome1_is_inverted(name):
    ds = pydicom.dcmread(PYDICOM_DATA / name)
    px = pixels_from_dataset(ds)
    ref = ds.pixel_array.astype(np.int64)
    if ds.PhotometricInterpretation == "MONOCHROME1":  # bright = less attenuation there: turned over
        assert px.mono1 and (px.image.astype(np.int64) == px.max_value - ref).all()
    else:
        assert not px.mono1 and (px.image == ref).all()
    # saturation: the largest storable value (unsigned), the largest present (signed)
    want = (1 << int(ds.BitsStored)) - 1 if ds.PixelRepresentation == 0 else int(ref.max())
    assert px.max_value == want


def test_the_middle_frame_of_a_stack_and_colour_as_luminance():
    ds = pydicom.dcmread(PYDICOM_DATA / "SC_rgb_2frame.dcm")
    px = pixels_from_dataset(ds)
    rgb = ds.pixel_array[1].astype(np.float64)
    want = np.rint(0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2])
    assert (px.image == want).all() and "middle frame 2 of 2" in px.note and "luminance" in px.note


def test_the_working_image_is_block_means_at_most_work_max_a_side():
    ds, _ = phantom_dataset(2200, 1700, spacing_mm=0.07, density=0.3)
    px, f, small, v, pad, span = working_image(ds, None, "", "presentation")
    assert f == 3 and max(small.shape) <= WORK_MAX
    assert small[10, 10] == pytest.approx(px.image[30:33, 30:33].mean(), rel=1e-5)
    raw, _ = phantom_dataset(512, 416, density=0.3, raw=True)
    _px, _f, rsmall, rv, _pad, _span = working_image(raw, None, "", "processing")
    # a raw detector signal is read as -log of it: more signal (air), a lower value
    hi, lo = np.unravel_index(rsmall.argmax(), rsmall.shape), np.unravel_index(rsmall.argmin(), rsmall.shape)
    assert rv[hi] < rv[lo]
