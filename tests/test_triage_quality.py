"""Quality metrics that mean what they say (triage/quality.py): burn-out, clipping, exposure, a small
breast against one cut off by the field."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conftest import make_config
from medsendx_edge.triage.phantom import phantom_dataset
from medsendx_edge.triage.stage import triage_dataset


def _side(ds, frame=None):
    return triage_dataset(ds, make_config(Path("/x")), ds.pixel_array if frame is None else frame).sidecar


def test_quality_rules_burnout_clipping_exposure_and_size():
    good, _ = phantom_dataset(1024, 832, density=0.3, seed=21)
    side = _side(good)
    assert side["priority"] == "normal" and side["reasons"] == []
    # Burn-out: a detector patch at background values inside the skin line.
    burnt = good.pixel_array.copy()
    burnt[400:600, 150:330] = 100
    side = _side(good, burnt)
    assert side["priority"] == "recheck" and any(r.startswith("burn-out") for r in side["reasons"])
    assert not any(r.startswith("clipping") for r in side["reasons"])
    # Clipping: display saturation is a plateau at the top of the range, named as such.
    clipped = np.clip(good.pixel_array.astype(np.int32) * 2, 0, 4095).astype(np.uint16)
    side = _side(good, clipped)
    assert any(r.startswith("clipping") for r in side["reasons"])
    assert not any(r.startswith("burn-out") for r in side["reasons"])
    # Underexposed: 30 photons per pixel trips the exposure rule; 4000 does not.
    low, _ = phantom_dataset(1024, 832, density=0.3, photons=30, seed=21)
    assert any("underexposed" in r for r in _side(low)["reasons"])
    # A small breast, fully imaged, is not asked to be retaken; one cut by the field is.
    small, _ = phantom_dataset(1024, 832, spacing_mm=0.10, density=0.3, seed=22)
    side = _side(small)
    assert side["metrics"]["breast_area_cm2"] < 40 and side["priority"] != "recheck"
    cut = good.pixel_array[:, :400].copy()
    good.Columns = 400
    side = _side(good, cut)
    assert any("cut off" in r for r in side["reasons"])
