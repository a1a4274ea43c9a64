"""Density categories and priority rules (triage/categories.py)."""

from __future__ import annotations

import pytest

from medsendx_edge.config import TriageRule
from medsendx_edge.triage.categories import CATEGORY_THRESHOLDS, birads, priority


def test_priority_rules():
    rules = (TriageRule("saturated_frac", ">", 0.02, "recheck"), TriageRule("pd", ">=", 0.5, "high"))
    assert priority({"pd": 0.6, "saturated_frac": 0.0}, rules)[0] == "high"
    assert priority({"pd": 0.6, "saturated_frac": 0.1}, rules)[0] == "recheck"
    assert priority({"pd": 0.2, "saturated_frac": None}, rules) == ("normal", [])


def test_categories_begin_at_the_readers_midpoints_and_none_is_not_a_category():
    # a 6.0 %, b 14.8 %, c 51.2 %, d 78.4 % (readers' medians): the boundaries are their midpoints.
    assert CATEGORY_THRESHOLDS == pytest.approx(((0.060 + 0.148) / 2, (0.148 + 0.512) / 2, (0.512 + 0.784) / 2),
                                                abs=0.001)
    assert [birads(x) for x in (0.0, 0.103, 0.104, 0.329, 0.330, 0.647, 0.648, 1.0)] == list("aabbccdd")
    assert birads(None) is None


def test_the_most_urgent_rule_wins_and_every_match_is_named():
    rules = (TriageRule("pd", ">=", 0.5, "high", "dense"), TriageRule("cnr", "<", 1.0, "recheck", "low contrast"),
             TriageRule("pd", ">", 0.9, "low"))
    best, reasons = priority({"pd": 0.95, "cnr": 0.5}, rules)
    assert best == "recheck" and reasons == ["dense", "low contrast", "pd > 0.9"]
    assert priority({"pd": 0.95, "cnr": 2.0}, rules) == ("high", ["dense", "pd > 0.9"])
    # a metric that is not a number (not measured) never matches
    assert priority({"pd": "n/a", "cnr": None}, rules) == ("normal", [])
