"""Logs: JSON lines, known keys only, no DICOM values, tracebacks without messages or locals."""

from __future__ import annotations

import json

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
