"""The simple synthetic mammogram (fast fixtures for the pipeline tests): its labels match its pixels,
it carries the PHI the anonymizer must remove, and it is a valid MG object."""

from __future__ import annotations

import numpy as np

from medsendx_edge.synthetic import synthetic_mammogram


def test_labels_and_pixels_agree_and_density_is_what_was_asked():
    for density in (0.15, 0.6):
        ds, labels = synthetic_mammogram(512, 416, density=density, seed=3)
        img = ds.pixel_array
        breast = labels > 0
        dense = labels == 2
        assert abs(dense.sum() / breast.sum() - density) < 0.08
        assert img[dense].mean() > img[breast & ~dense].mean() > img[~breast].mean()


def test_it_carries_the_identifiers_and_header_of_a_mammogram():
    ds, _ = synthetic_mammogram(128, 104, patient_name="DOE^JANE", patient_id="PID-7", pixel_spacing_mm=0.1)
    assert ds.Modality == "MG" and str(ds.PatientName) == "DOE^JANE" and ds.PatientID == "PID-7"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert [float(v) for v in ds.PixelSpacing] == [0.1, 0.1]
    assert ds.pixel_array.shape == (128, 104) and ds.pixel_array.dtype == np.uint16
