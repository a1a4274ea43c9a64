"""Logs: JSON lines, known keys only, no DICOM values, tracebacks without messages or locals."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydicom.dataset import Dataset

from medsendx_edge.logs import get_logger


def test_json_lines_with_iso_utc_timestamps(log_lines):
    get_logger(stage="anonymize").info("file_processed", file_id="abc", outcome="done")
    rec = json.loads(log_lines.getvalue())
    assert rec["event"] == "file_processed" and rec["stage"] == "anonymize" and rec["file_id"] == "abc"
    assert rec["timestamp"].endswith("Z") and rec["level"] == "info"


def test_unknown_keys_and_dicom_values_are_blocked(log_lines):
    ds = Dataset()
    ds.PatientName = "DOE^JANE"
    get_logger().info("file_processed", patient_name="DOE^JANE", dataset=ds, reason=ds.PatientName,
                      file_id=ds)
    line = log_lines.getvalue()
    assert "DOE" not in line
    rec = json.loads(line)
    assert rec["redacted_keys"] == 2 and rec["reason"] == "[redacted]"


def test_tracebacks_carry_no_message_and_no_locals(log_lines):
    def fail(secret="DOE^JANE"):
        raise ValueError(f"bad value {secret}")

    try:
        fail()
    except ValueError as exc:
        get_logger().error("stage_error", exc_info=exc)
    rec = json.loads(log_lines.getvalue())
    assert "DOE" not in log_lines.getvalue()
    assert "ValueError" in rec["exception"] and "in fail" in rec["exception"]


def _logged_events() -> dict[str, set[str]]:
    """Every event the package logs, with its levels, read from the code: ``<logger>.<level>("event", ...)``
    (either branch of a conditional event name included)."""
    import ast

    root = Path(__file__).resolve().parents[1] / "medsendx_edge"
    events: dict[str, set[str]] = {}
    dynamic = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args
                    and node.func.attr in ("debug", "info", "warning", "error")
                    and "log" in ast.unparse(node.func.value).lower()):
                continue
            first = node.args[0]
            names = [first] if not isinstance(first, ast.IfExp) else [first.body, first.orelse]
            for name in names:
                if isinstance(name, ast.Constant) and isinstance(name.value, str):
                    events.setdefault(name.value, set()).add(node.func.attr)
                else:
                    dynamic.append(f"{path.name}: {ast.unparse(first)}")
    assert dynamic == [], "event names must be literal (the table is checked against them)"
    # a third-party library's record is logged at its own level
    events["library_log"] = {"debug", "info", "warning", "error"}
    return events


def test_the_log_event_table_in_operations_md_is_the_code_s():
    """Issue 25: 9 events were missing from the table.  Every event the code logs has a row, every row's
    event is logged, and the level column says the levels the code uses."""
    import re

    doc = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    section = doc.split("## Logs", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([a-z_]+)`", cells[0])
        levels = [lv.strip() for lv in cells[1].split("/")]   # "a / b": the levels of two events in turn
        for i, name in enumerate(names):
            level = levels[min(i, len(levels) - 1)]
            # "info, warning": one event logged at either level
            rows[name] = {"debug", "info", "warning", "error"} if level == "any" else \
                {lv.strip() for lv in level.split(",")}
    code = _logged_events()
    assert sorted(set(code) - set(rows)) == [], "logged but not in docs/operations.md"
    assert sorted(set(rows) - set(code)) == [], "in docs/operations.md but never logged"
    wrong = {e: (sorted(rows[e]), sorted(code[e])) for e in code if not code[e] <= rows[e]}
    assert wrong == {}, "level column"


def test_the_restart_keys_in_the_docs_are_the_code_s():
    """The config table's "applied" column is generated from the schema; the restart_required row refers
    to it instead of naming keys (it named three of nine)."""
    from medsendx_edge.config_reference import restart_keys

    doc = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    table = doc.split("<!-- config-table", 1)[1]
    marked = {m for m in re.findall(r"^\| `([a-z_.]+)` \| [^|]* \| restart \|", table, re.M)}
    for key in restart_keys():
        assert key in marked or any(m.startswith(key + ".") for m in marked), key
    assert all(any(m == k or m.startswith(k + ".") for k in restart_keys()) for m in marked)
    row = next(line for line in doc.splitlines() if line.startswith("| `restart_required`"))
    assert "marks `restart`" in row


def test_a_container_logs_json_on_stdout(tmp_path):
    """log.stream: stdout (the container image's setting): the daemon's JSON lines on stdout, none on
    stderr (a container runtime collects stdout: `podman logs`)."""
    import subprocess
    import sys

    import yaml

    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump({"spool_dir": str(tmp_path / "spool"),
                                    "destination": {"kind": "directory", "path": str(tmp_path / "out")},
                                    "anonymize": {"secret_file": str(tmp_path / "s.key"),
                                                  "linkage_key_file": str(tmp_path / "l.key")},
                                    "log": {"format": "json", "stream": "stdout"}}))
    proc = subprocess.run([sys.executable, "-m", "medsendx_edge.cli", "run", "--once", "--config", str(conf)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line)["event"] for line in proc.stdout.splitlines() if line.startswith("{")]
    assert "spool_recovered" in events and proc.stderr.strip() == ""


def test_each_log_line_is_one_write_newline_included():
    """A line and its newline leave in one write(): print() wrote them apart, and a SIGKILL between the two
    glued the next start's first line onto the last one (tests/e2e/test_acceptance.py's kills found it)."""
    from medsendx_edge.logs import configure_logging, get_logger

    class Recording:
        def __init__(self) -> None:
            self.writes: list[str] = []

        def write(self, s: str) -> int:
            self.writes.append(s)
            return len(s)

        def flush(self) -> None:
            pass

    out = Recording()
    configure_logging("info", "json", out)
    try:
        for i in range(5):
            get_logger(stage="ingest").info("file_received", bytes=i)
    finally:
        configure_logging("info", "json")
    assert len(out.writes) == 5
    assert all(w.endswith("\n") and w.count("\n") == 1 and json.loads(w)["event"] == "file_received"
               for w in out.writes)
