"""The display pipeline as a viewer applies it (Modality LUT, VOI LUT Sequence or window, MONOCHROME1),
Pixel Padding, and the exposed field (collimator strips and film edges left out)."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_voi_lut

from medsendx_edge.triage.display import display_transfer, exposed_field, padding_mask


def _header(**kw) -> Dataset:
    ds = Dataset()
    ds.BitsStored, ds.PixelRepresentation, ds.PhotometricInterpretation = 12, 0, "MONOCHROME2"
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def test_no_display_pipeline_is_the_identity():
    assert display_transfer(_header()) is None


def test_voi_lut_sequence_matches_pydicom_and_monochrome1_is_inverted():
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = (np.sqrt(np.arange(4096) / 4095.0) * 65535).astype(np.uint16).tolist()
    ds = _header(VOILUTSequence=[item])
    t = display_transfer(ds)
    stored = np.array([0, 100, 1000, 4095], dtype=np.uint16)
    assert t is not None and "VOI LUT Sequence" in t.note
    assert np.allclose(t(stored.astype(np.float32)), apply_voi_lut(stored, ds), atol=1)
    ds.PhotometricInterpretation = "MONOCHROME1"
    inv = display_transfer(ds)
    assert inv is not None and "MONOCHROME1" in inv.note
    shown = inv(stored.astype(np.float32))
    assert np.all(np.diff(shown) < 0)   # low stored values are bright: brighter = denser after the chain


def test_window_is_applied():
    ds = _header(WindowCenter=1000, WindowWidth=200)
    t = display_transfer(ds)
    out = t(np.array([0.0, 1000.0, 4095.0], dtype=np.float32))
    assert out[0] == out.min() and out[2] == out.max() and out.min() < out[1] < out.max()


def test_padding_value_and_range():
    img = np.array([[0, 5, 4095], [7, 8, 9]], dtype=np.uint16)
    assert (padding_mask(img, _header(PixelPaddingValue=4095)) == (img == 4095)).all()
    rng = padding_mask(img, _header(PixelPaddingValue=5, PixelPaddingRangeLimit=8))
    assert rng.tolist() == [[False, True, False], [True, True, False]]
    assert padding_mask(img, _header()) is None


def test_exposed_field_leaves_out_bright_strips_and_film_edges_not_the_breast():
    rng = np.random.default_rng(0)
    v = rng.normal(100, 5, (200, 160)).astype(np.float32)      # air
    yy, xx = np.mgrid[:200, :160]
    breast = (xx < 90) & ((yy - 100) ** 2 / 90 ** 2 + xx ** 2 / 90 ** 2 < 1)
    v[breast] = rng.normal(2000, 300, breast.sum())
    v[:6] = 4000                                                  # an unexposed collimator strip, flat
    v[-4:] = np.linspace(3000, 2500, 160)[None, :]                # a film edge: a bright ramp, not flat
    field = exposed_field(v, tissue_threshold=600.0, wall="left")
    assert not field[:6].any() and not field[-4:].any()
    assert field[10:-10].all()                                    # the breast and the air beside it stay
    pad = np.zeros_like(field)
    pad[:, -5:] = True
    assert not exposed_field(v, pad)[:, -5:].any()
