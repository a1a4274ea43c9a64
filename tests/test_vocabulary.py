"""The shared words, defined once (vocabulary.py): priorities (names, order, the fallback for unknown names),
upload states, outcomes, state keys; checked against the SQL of state.py and every log call of the
package (issue 25: upload states were raw SQL strings, the ``outcome`` field mixed words and sentences,
state keys were strings parsed with ``startswith``)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from medsendx_edge.vocabulary import (FEATURE_COLUMNS, PRIORITY_NAMES, RULE_METRICS, KeyPrefix, Outcome, Priority,
                                      StateKey, UploadState, Uplink)

PACKAGE = Path(__file__).resolve().parents[1] / "medsendx_edge"


def test_priorities_order_the_queue_most_urgent_first():
    assert PRIORITY_NAMES == ("recheck", "high", "normal", "low")
    assert sorted(PRIORITY_NAMES, key=lambda n: Priority.of(n)) == list(PRIORITY_NAMES)
    assert Priority.of("HIGH") is Priority.HIGH and Priority.of("urgent") is Priority.NORMAL
    assert Priority.of(None, Priority.LOW) is Priority.LOW and Priority(0).label == "recheck"


def test_rule_metrics_include_every_numeric_feature():
    assert {"pd", "snr_fat", "burnout_frac"} <= set(RULE_METRICS)
    assert len(set(FEATURE_COLUMNS)) == len(FEATURE_COLUMNS)


def test_the_sql_of_the_state_database_says_only_upload_states_and_state_keys():
    """SQL is its own language: its literals are checked against the enums instead of formatted from them."""
    sql = (PACKAGE / "state.py").read_text()
    for m in re.finditer(r"state\s*(?:=|IN)\s*\(?((?:'\w+'(?:,\s*)?)+)", sql):
        for word in re.findall(r"'(\w+)'", m.group(1)):
            assert word in {s.value for s in UploadState}, word
    for word in re.findall(r"VALUES \('(\w+)'", sql):
        assert word in {k.value for k in StateKey}, word
    assert "DEFAULT 'queued'" in sql and UploadState.QUEUED == "queued"


def _calls(keyword: str):
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == keyword:
                        yield path.relative_to(PACKAGE), node, kw.value


def test_every_logged_outcome_is_one_word_of_the_vocabulary():
    found = 0
    for where, _node, value in _calls("outcome"):
        if isinstance(value, ast.Constant):
            assert value.value in {o.value for o in Outcome}, (where, value.value)
        else:
            # an enum member, or the result's own (typed) outcome
            text = ast.unparse(value)
            assert text.startswith(("Outcome.", "result.outcome")) or " if " in text, (where, text)
            for name in re.findall(r"Outcome\.(\w+)", text):
                assert name in Outcome.__members__, (where, name)
        found += 1
    assert found >= 8


def test_state_keys_are_typed_never_literal_strings():
    """``state.get("uplink")``, ``state.put(f"ack:{id}")``: every key the package reads or writes is a
    StateKey or a KeyPrefix with its suffix."""
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("get", "put", "add") and "state" in ast.unparse(node.func.value) and node.args:
                key = node.args[0]
                assert not isinstance(key, (ast.Constant, ast.JoinedStr)), (path.name, ast.unparse(node))
    assert {p.value for p in KeyPrefix} == {"ack", "last_error", "refused_syntax"} and Uplink("paused") is Uplink.PAUSED
