"""One priority vocabulary: names, order, and the fallback for unknown names."""

from __future__ import annotations

from medsendx_edge.state import PRIORITIES
from medsendx_edge.vocabulary import FEATURE_COLUMNS, PRIORITY_NAMES, RULE_METRICS, Priority


def test_priorities_order_the_queue_most_urgent_first():
    assert PRIORITY_NAMES == ("recheck", "high", "normal", "low")
    assert sorted(PRIORITY_NAMES, key=lambda n: PRIORITIES[n]) == list(PRIORITY_NAMES)
    assert Priority.of("HIGH") is Priority.HIGH and Priority.of("urgent") is Priority.NORMAL
    assert Priority.of(None, Priority.LOW) is Priority.LOW and Priority(0).label == "recheck"


def test_rule_metrics_include_every_numeric_feature():
    assert {"pd", "snr_fat", "burnout_frac"} <= set(RULE_METRICS)
    assert len(set(FEATURE_COLUMNS)) == len(FEATURE_COLUMNS)
