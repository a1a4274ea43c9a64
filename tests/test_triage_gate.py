"""What triage applies to (triage/gate.py), from the header alone: mammograms, the screening views, the
frame to read and the domain; everything else is "not applicable" with its reason."""

from __future__ import annotations

import copy
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from conftest import PYDICOM_TEST_FILES, make_config
from medsendx_edge.triage.gate import gate, header_view, view_modifiers
from medsendx_edge.triage.phantom import phantom_dataset
from medsendx_edge.triage.stage import triage_dataset


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "SC_rgb_gdcm_KY.dcm"])
def test_non_mammograms_are_not_applicable(name):
    ds = pydicom.dcmread(PYDICOM_TEST_FILES / name)
    out = triage_dataset(ds, make_config(Path("/nonexistent")))
    assert out.sidecar["triage"] == "not applicable" and out.sidecar["pd"] is None
    assert out.sidecar["priority"] == "normal" and out.sidecar["reason"].startswith(("modality", "SOP class"))


def test_a_secondary_capture_with_modality_mg_is_not_applicable():
    ds, _ = phantom_dataset(256, 208, density=0.5)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    g = gate(ds)
    assert not g.applicable and "SOP class" in g.reason


def _code(meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "X", "SCT", meaning
    return item


def test_a_cr_mammogram_is_read_and_a_qc_phantom_magnification_or_spot_view_is_not():
    ds, _ = phantom_dataset(256, 208, density=0.3)
    assert gate(ds).applicable and gate(ds).domain == "presentation"
    cr = copy.deepcopy(ds)
    cr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage, Modality MG: a CR truck's mammogram
    assert gate(cr).applicable
    qc = copy.deepcopy(ds)
    qc.QualityControlImage = "YES"
    assert not gate(qc).applicable and "quality-control" in gate(qc).reason
    spot = copy.deepcopy(ds)
    spot.ViewModifierCodeSequence = [_code("Spot Compression")]
    assert view_modifiers(spot) == ["spot compression"]
    assert not gate(spot).applicable and "spot compression view" in gate(spot).reason
    mag = copy.deepcopy(ds)
    mag.EstimatedRadiographicMagnificationFactor = 1.8
    assert not gate(mag).applicable and "magnification" in gate(mag).reason
    raw = copy.deepcopy(ds)
    raw.PresentationIntentType = "FOR PROCESSING"
    assert gate(raw).domain == "processing"


def test_the_view_from_its_code_and_a_tomosynthesis_stack_reads_its_middle_frame():
    ds, _ = phantom_dataset(256, 208, density=0.3, view="MLO", laterality="R")
    del ds.ViewPosition
    ds.ViewCodeSequence = [_code("medio-lateral oblique")]
    assert header_view(ds) == ("MLO", "R")
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.13.1.3"
    ds.NumberOfFrames = 49
    g = gate(ds)
    assert g.applicable and g.frame == 24 and "frame 25 of 49" in g.frame_note
