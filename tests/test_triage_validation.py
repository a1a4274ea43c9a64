"""The validation set of docs/triage.md (``python -m medsendx_edge.triage.validation``): physics phantoms
within 0.05 of their truth, orientation and pectoral corner found from the pixels, every exam its
category and one priority."""

from __future__ import annotations

import pytest

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
