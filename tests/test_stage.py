"""The runner: one spool verb and one log line per outcome, the machine's troubles retried (not
quarantined), a bad file quarantined without its message, orphaned claims released."""

from __future__ import annotations

import errno
import json
import sqlite3

import pytest

from medsendx_edge.errors import QuarantineError, RetryLater
from medsendx_edge.spool import ANONYMIZED, INCOMING, Spool
from medsendx_edge.stage import Outcome, Result, Runner, Stage


class _Scripted(Stage):
    """Raises (or returns) what the test says, then forwards."""

    name = "scripted"
    input_queue = INCOMING
    output_queue = ANONYMIZED

    def __init__(self, spool, behaviour):
        super().__init__(spool)
        self.behaviour = behaviour
        self.calls = 0

    def process(self, item):
        self.calls += 1
        todo = self.behaviour(self.calls)
        if isinstance(todo, BaseException):
            raise todo
        self.forward(item)
        return Result.done(bytes=1)


def _one(tmp_path, data=b"payload"):
    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    src = spool.inbox / "a.dcm"
    src.write_bytes(data)
    return spool, spool.adopt(src)


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EIO, "I/O error"),
    sqlite3.OperationalError("database or disk is full"),
    RetryLater("the modality is still writing"),
])
def test_the_machine_in_trouble_is_retried_not_quarantined(tmp_path, error):
    spool, item_id = _one(tmp_path)
    stage = _Scripted(spool, lambda n: error if n == 1 else None)
    runner = Runner(stage, retry_delay_s=0.0)
    assert runner.run_once() == 1
    assert spool.ready(INCOMING) == [item_id] and list(spool.quarantined()) == []
    assert runner.run_once() == 1 and spool.ready(ANONYMIZED) == [item_id]


def test_a_bad_file_is_quarantined_with_our_words_only(tmp_path, log_lines):
    spool, item_id = _one(tmp_path)
    Runner(_Scripted(spool, lambda n: ValueError("PatientName=DOE^JANE broke it"))).run_once()
    info = spool.reason("scripted", item_id)
    assert info["reason"] == "unexpected ValueError in stage scripted" and "DOE" not in json.dumps(info)
    assert "DOE" not in log_lines.getvalue()
    spool2, item2 = _one(tmp_path / "b")
    Runner(_Scripted(spool2, lambda n: QuarantineError("not DICOM", error_class="NotDicom"))).run_once()
    assert spool2.reason("scripted", item2)["error_class"] == "NotDicom"


def test_retry_delay_holds_the_item_back(tmp_path):
    spool, item_id = _one(tmp_path)
    stage = _Scripted(spool, lambda n: RetryLater("later") if n == 1 else None)
    runner = Runner(stage, retry_delay_s=3600.0)
    runner.run_once()
    assert runner.run_once() == 0 and stage.calls == 1  # not before its delay


def test_an_outcome_that_cannot_be_recorded_leaves_a_claim_the_sweep_releases(tmp_path, monkeypatch):
    spool, item_id = _one(tmp_path)
    runner = Runner(_Scripted(spool, lambda n: QuarantineError("bad", error_class="Bad")), retry_delay_s=0.0)

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool, "quarantine", full_disk)
    result = runner.handle(spool.claim(INCOMING, item_id))
    assert result.outcome is Outcome.RETRY_LATER and spool.claimed(INCOMING) == [item_id]
    assert runner.sweep_orphans() == 1 and spool.ready(INCOMING) == [item_id]
