"""Density categories (an estimate, not a BI-RADS assessment) and the priority rules.
"""

from __future__ import annotations

from typing import Any


from medsendx_edge.vocabulary import Priority


#: What a category is, said wherever one is shown (sidecar, console, picture, SR, docs).
CATEGORY_CLAIM = "automated area-based density estimate, not a BI-RADS assessment"
#: Where categories b, c and d begin: the midpoints between the median area densities radiologists'
#: BI-RADS categories had in 200 screening exams (a 6.0 %, b 14.8 %, c 51.2 %, d 78.4 %; Acad Radiol
#: 2006;13(9):1143-9).  The 4th edition's quartiles (25/50/75 %) were dropped by the 5th edition.
CATEGORY_THRESHOLDS = (0.104, 0.330, 0.648)


def birads(pd: float | None, thresholds: tuple[float, ...] = CATEGORY_THRESHOLDS) -> str | None:
    """Density category a-d from the automated area density (boundaries calibrated to readers'
    medians: :data:`CATEGORY_THRESHOLDS`); an estimate, not a BI-RADS assessment."""
    if pd is None:
        return None
    return "abcd"[min(3, sum(pd >= t for t in thresholds))]


# --------------------------------------------------------------------------- priority
_OPS = {
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, "==": lambda a, b: a == b,
}


def priority(metrics: dict[str, Any], rules: Any) -> tuple[str, list[str]]:
    """The most urgent priority among the rules that match, and why; ``normal`` if none."""
    best = "normal"
    reasons = []
    for rule in rules:
        value = metrics.get(rule.metric)
        if value is None or not isinstance(value, (int, float)):
            continue
        if _OPS[rule.op](value, rule.value):
            reasons.append(rule.reason or f"{rule.metric} {rule.op} {rule.value}")
            if Priority.of(rule.priority) < Priority.of(best):
                best = rule.priority
    return best, reasons
