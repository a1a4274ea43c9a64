"""The tissue map for images that are not mammograms (triage/tissue.py, issue 30): on real CT slices the
bone class lies on bone (checked in Hounsfield units), on a real computed radiograph the collimated border
is left out, on a projection phantom made with Beer-Lambert (not the method's model) the bone rod is in the
dense class; and it never sets a priority, never enters the features, says "not applicable" otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from conftest import make_config
from medsendx_edge.triage.arrays import block_mean
from medsendx_edge.triage.tissue import BONE_HU, CLAIM, applies, collimation, render_png, tissue_map

PYDICOM_DATA = Path(__import__("data_store").__file__).parent / "data"


@pytest.mark.parametrize("path", [Path(get_testdata_file("CT_small.dcm")), PYDICOM_DATA / "693_UNCI.dcm",
                                  PYDICOM_DATA / "693_J2KR.dcm"])
def test_on_real_ct_the_bone_class_lies_on_bone(path):
    ds = pydicom.dcmread(path)
    tm = tissue_map(ds)
    hu = block_mean(ds.pixel_array, tm.meta["block"]) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    bone = tm.labels == 3
    assert tm.units == "HU" and tm.classes == ("air", "soft tissue", "bone")
    assert (hu[bone] > BONE_HU).mean() >= 0.99            # what it calls bone is bone
    assert bone[hu > 300].mean() >= 0.85                   # and most of the bone is called bone
    assert (hu[tm.labels == 1] < -300).mean() >= 0.99     # air is air
    assert tm.centres[0] < tm.centres[1] < tm.centres[2]
    assert tm.labels[hu < -1024].sum() == 0 if (hu < -1024).any() else True   # outside the field: unmapped


def test_a_real_computed_radiograph_leaves_its_collimation_out_and_says_what_the_top_class_is():
    ds = pydicom.dcmread(PYDICOM_DATA / "RG3_UNCI.dcm")   # a leg, MONOCHROME1, collimated on both sides
    tm = tissue_map(ds)
    assert "collimated" in tm.note and (tm.labels == 0).mean() > 0.4
    assert tm.classes[2] == "dense: bone or thick soft tissue" and tm.units == "stored values"
    png = render_png(tm)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def _projection_phantom(collimate: bool = True) -> pydicom.Dataset:
    """A forearm seen by a projection radiograph, by Beer-Lambert along each ray (not the method's model):
    a soft-tissue cylinder (2 cm radius, mu 0.2/cm) holding a bone rod (mu 0.5/cm), air around; detector signal
    I = I0 exp(-sum mu dl) with Poisson noise, stored log-inverted as a CR does (MONOCHROME1: bright is
    more exposure), and unexposed (collimated) strips at the detector's maximum on both sides."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(7)
    rows, cols, px_cm = 400, 400, 0.02
    x = (np.arange(cols) - cols / 2) * px_cm
    soft = 2 * np.sqrt(np.clip(2.0 ** 2 - x ** 2, 0, None))          # chord through a 2 cm radius cylinder
    bone = 2 * np.sqrt(np.clip(0.6 ** 2 - (x - 0.6) ** 2, 0, None))   # a 0.6 cm rod, off centre
    mu_path = 0.2 * (soft - bone) + 0.5 * bone
    photons = rng.poisson(20000 * np.exp(-np.tile(mu_path, (rows, 1)))).astype(float)
    stored = np.clip(900 * np.log10(np.maximum(photons, 1)), 0, 4095)   # log exposure (no clipping), MONOCHROME1
    if collimate:
        stored[:, :60] = 0
        stored[:, -60:] = 0          # no photons: the lowest stored value, white in MONOCHROME1
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.PhotometricInterpretation = "CR", "MONOCHROME1"
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.PixelData = stored.astype(np.uint16).tobytes()
    # A projection measures path length times attenuation, not material: the cylinder's thin rim (under
    # 2.5 cm of tissue along the ray, a third of its width) reads as air.  The truth tested is what a
    # projection can tell: soft tissue where its path is 2.5 cm or more.
    ds.truth = {"bone": np.tile(bone > 0.2, (rows, 1)), "soft": np.tile((soft >= 2.5) & (bone == 0), (rows, 1)),
                "air": np.tile(soft == 0, (rows, 1))}
    return ds


@pytest.mark.parametrize("collimate", [True, False])
def test_on_a_beer_lambert_phantom_the_rod_is_dense_the_soft_tissue_soft_and_the_air_air(collimate):
    ds = _projection_phantom(collimate)
    truth = ds.truth
    tm = tissue_map(ds)
    labels = tm.labels   # block 1 at this size
    inner = np.zeros_like(labels, dtype=bool)
    inner[:, 70:-70] = True   # away from the collimation and its penumbra margin
    for cls, k in (("air", 1), ("soft", 2), ("bone", 3)):
        where = truth[cls] & inner & (labels > 0)
        assert (labels[where] == k).mean() >= 0.9, (cls, (labels[where] == k).mean())
    if collimate:
        assert collimation(np.asarray(ds.pixel_array.max() + ds.pixel_array.min() - ds.pixel_array, float))[:, :50].all()
        assert (labels[:, :55] == 0).all() and (labels[:, -55:] == 0).all()


def test_what_it_does_not_map_and_that_it_never_sets_a_priority(tmp_path):
    from medsendx_edge.triage.stage import triage_file

    for name, why in (("MR_small.dcm", "modality MR"), ("SC_rgb.dcm", "modality OT")):
        assert why in applies(pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True))
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    stack = ds.copy()
    stack.NumberOfFrames = 3
    assert "multi-frame" in applies(stack)
    out, header = triage_file(Path(get_testdata_file("CT_small.dcm")), make_config(tmp_path))
    side = out.sidecar
    assert side["triage"] == "not applicable" and side["priority"] == "normal" and side["reasons"] == []
    assert side["pd"] is None and side["category"] is None and header is None   # no SR, no features
    assert side["tissue_map"]["status"] == "done" and side["tissue_map"]["claim"] == CLAIM
    assert out.png is not None and out.png[:8] == b"\x89PNG\r\n\x1a\n"
    off = make_config(tmp_path, triage=__import__("medsendx_edge.config", fromlist=["TriageConfig"]).TriageConfig(
        tissue_map=False, send_sr=False))
    out, _ = triage_file(Path(get_testdata_file("CT_small.dcm")), off)
    assert "tissue_map" not in out.sidecar and out.png is None


def test_breast_images_and_odd_headers_get_no_tissue_map_and_fail_nothing(tmp_path):
    """Review of issue 30: a breast image the density gate refuses (a spot view, a QC phantom, a DX breast
    named only by its anatomic region) was given a bone map; a NumberOfFrames of '1\\\\1' raised inside the
    stage and quarantined a CT.  And a CR with BodyPartExamined BREAST is a mammogram: density applies."""
    import copy

    from pydicom.dataset import Dataset

    from medsendx_edge.triage.gate import gate
    from medsendx_edge.triage.stage import not_applicable, with_tissue_map

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for change in ({"BodyPartExamined": "BREAST"}, {"ViewPosition": "MLO"}):
        d = copy.deepcopy(ds)
        for k, v in change.items():
            setattr(d, k, v)
        assert "breast image" in applies(d)
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "76752008", "SCT", "Breast"
    d = copy.deepcopy(ds)
    d.AnatomicRegionSequence = [region]
    assert "breast image" in applies(d)
    odd = copy.deepcopy(ds)
    odd.NumberOfFrames = "1\\1"
    out = not_applicable("modality CT")
    with_tissue_map(out, odd, frame=ds.pixel_array)   # never raises
    assert out.sidecar["tissue_map"]["status"] == "not applicable"
    cr = copy.deepcopy(ds)
    cr.Modality, cr.BodyPartExamined, cr.SOPClassUID = "CR", "BREAST", "1.2.840.10008.5.1.4.1.1.1"
    assert gate(cr).applicable
