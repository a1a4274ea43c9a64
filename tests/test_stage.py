"""The runner: one spool verb and one log line per outcome, the machine's troubles retried (not
quarantined), a bad file quarantined without its message, orphaned claims released."""

from __future__ import annotations

import errno
import json
import sqlite3
import threading

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
        return Result.done(bytes=1)  # the runner passes it on


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


def test_the_runner_places_the_output_and_records_what_was_written(tmp_path):
    """Issue 25: the runner places every output (the stage only says what) and records the size and hash
    of the bytes as written, even from a writer that copies by file descriptor (copy_file_range would
    bypass a hash taken on the way: the runner's file offers no descriptor)."""
    import hashlib

    from medsendx_edge.anonymize.dicomio import _copy_range
    from medsendx_edge.spool import ANONYMIZED
    from medsendx_edge.stage import Facts, NewItem, Output, Result, Runner, Stage

    body = bytes(range(256)) * 9000 + b"odd"   # 2.2 MiB: hashed through a 1 MiB buffer, its last pass partial
    spool, item_id = _one(tmp_path, data=body)
    src = spool.path(INCOMING, item_id)

    class Copy(Stage):
        name, input_queue, output_queue = "copy", INCOMING, ANONYMIZED

        def process(self, item):
            def write(fh):
                fh.write(b"HEAD")
                with open(item.path, "rb") as s:
                    _copy_range(s, fh, 0, item.path.stat().st_size)

            extra = NewItem(lambda fh: fh.write(b"report"), {"triage": "report", "priority": "normal"}, "1.2.3")
            return Result.done(Output(writer=write, companions={".json": {"seen": True}}, new_items=[extra],
                                      facts=Facts(sop_uid="1.2.840.1")))

    Runner(Copy(spool)).run_once()
    out = spool.path(ANONYMIZED, item_id)
    data = out.read_bytes()
    assert data == b"HEAD" + body and not src.exists()
    assert spool.state.facts(item_id) == ("1.2.840.1", len(data), hashlib.sha256(data).hexdigest())
    assert json.loads((spool.dir(ANONYMIZED) / f"{item_id}.json").read_text()) == {"seen": True}
    (other,) = [i for i in spool.ready(ANONYMIZED) if i != item_id]
    assert spool.state.facts(other) == ("1.2.3", 6, hashlib.sha256(b"report").hexdigest())


def test_route_queues_from_the_recorded_facts_and_reads_the_file_only_without_them(tmp_path):
    from medsendx_edge.spool import ANONYMIZED, OUTBOX
    from medsendx_edge.upload.route import RouteStage

    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    spool.publish(ANONYMIZED, "a" * 24, lambda fh: fh.write(b"not DICOM at all"))
    spool.state.record_facts("a" * 24, "1.2.3.4", 16, "ab" * 32)
    spool.publish(ANONYMIZED, "b" * 24, lambda fh: fh.write(b"not DICOM either"))
    Runner(RouteStage(spool, ANONYMIZED)).drain()
    # recorded: queued without reading the file (it is no DICOM: a read would have quarantined it)
    row = spool.state.item("a" * 24)
    assert row.sop_uid == "1.2.3.4" and row.sha256 == "ab" * 32 and spool.path(OUTBOX, "a" * 24).exists()
    assert spool.state.facts("a" * 24) == (None, None, None)   # moved into the queue row
    # not recorded (a crash between the write and the record): read, and refused for what it is
    assert spool.state.item("b" * 24) is None and [q for q in spool.quarantined()] == [("route", "b" * 24)]


def test_a_redone_stage_leaves_no_stale_facts_and_a_changed_copy_is_not_sent_under_the_old_row(tmp_path):
    """Review of issue 25: (1) facts of a first attempt outlived a second attempt whose record failed, and
    route queued the new bytes under the old hash; (2) an SR made again with other bytes under its derived
    id, after route had queued the first, replaced the outbox file under the first one's row."""
    import hashlib

    from medsendx_edge.spool import OUTBOX, TRIAGED, derived_id, new_id
    from medsendx_edge.stage import NewItem, Output, Result, Runner, Stage
    from medsendx_edge.upload.route import RouteStage

    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    image = new_id()
    sr_id = derived_id(image, "report")
    bodies = iter([b"first report", b"second report, the exam changed"])

    class Triage(Stage):
        name, input_queue, output_queue = "triage", ANONYMIZED, TRIAGED

        def process(self, item):
            body = next(bodies)
            return Result.done(Output(new_items=[NewItem(lambda fh: fh.write(body), {"id": sr_id}, "1.2.3.4", sr_id)]))

    # (1) the first attempt's facts, then a second attempt whose record fails: no facts are left at all
    spool.publish(ANONYMIZED, image, lambda fh: fh.write(b"image"))
    Runner(Triage(spool)).run_once()
    assert spool.state.facts(sr_id)[2] == hashlib.sha256(b"first report").hexdigest()
    route = Runner(RouteStage(spool, TRIAGED))
    route.run_once()   # the first SR queued (the image itself is no DICOM here: quarantined, not our concern)
    row = spool.state.item(sr_id)
    assert row is not None and row.sha256 == hashlib.sha256(b"first report").hexdigest()
    spool.publish(ANONYMIZED, image, lambda fh: fh.write(b"image"))   # the image comes back (a redo)
    real = spool.state.record_facts
    spool.state.record_facts = lambda *a: (_ for _ in ()).throw(sqlite3.OperationalError("disk is full"))
    try:
        Runner(Triage(spool)).run_once()
    finally:
        spool.state.record_facts = real
    assert spool.state.facts(sr_id) == (None, None, None)   # nothing stale for route to trust
    # (2) the changed copy with its facts recorded: route meets it under the id it queued before, and
    # quarantines it as a conflict, the queued row and the outbox file untouched
    spool.state.record_facts(sr_id, "1.2.3.4", 31, hashlib.sha256(b"second report, the exam changed").hexdigest())
    route.run_once()
    assert ("route", sr_id) in list(spool.quarantined())
    assert spool.reason("route", sr_id)["error_class"] == "InstanceConflict"
    assert spool.state.item(sr_id).sha256 == hashlib.sha256(b"first report").hexdigest()
    assert spool.path(OUTBOX, sr_id).read_bytes() == b"first report"


class _Ahead(Stage):
    """prepare() of the second item must start before process() of the first returns (it waits for it);
    the third item's prepare raises."""

    name = "ahead"
    input_queue = INCOMING
    output_queue = ANONYMIZED
    lookahead = 1

    def __init__(self, spool, ids):
        super().__init__(spool)
        self.ids = ids
        self.started = {i: threading.Event() for i in ids}
        self.order: list[str] = []
        self.threads: set[str] = set()

    def prepare(self, item):
        self.threads.add(threading.current_thread().name)
        self.started[item.id].set()
        if item.id == self.ids[2]:
            raise ValueError("a decoder failed on this one")
        return item.path.read_bytes()

    def process(self, item):
        data = self.prepared(item)
        if item.id == self.ids[0] and self.lookahead:   # the next item is prepared while this one is handled
            assert self.started[self.ids[1]].wait(30), "the lookahead did not start the next item"
        self.order.append(item.id)
        return Result.done(bytes=len(data))


def test_a_stage_with_lookahead_prepares_ahead_in_threads_and_settles_in_claim_order(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    ids = []
    for n in range(4):
        src = spool.inbox / f"{n}.dcm"
        src.write_bytes(b"x" * (n + 1))
        ids.append(spool.adopt(src))
    ids = spool.ready(INCOMING)   # the claim order
    stage = _Ahead(spool, ids)
    runner = Runner(stage)
    assert runner.run_once() == 4
    assert stage.order == [ids[0], ids[1], ids[3]]                    # claim order, the failed one left out
    assert all(name.startswith("ahead-ahead") for name in stage.threads)
    assert sorted(spool.ready(ANONYMIZED)) == sorted([ids[0], ids[1], ids[3]])
    assert spool.reason("ahead", ids[2])["reason"] == "unexpected ValueError in stage ahead"
    assert spool.claimed(INCOMING) == [] and stage._ahead == {}       # nothing left in flight


def test_a_lookahead_changed_by_a_reload_makes_the_workers_again(tmp_path):
    spool, item_id = _one(tmp_path)
    stage = _Ahead(spool, [item_id, "b", "c"])
    stage.lookahead = 0
    runner = Runner(stage)
    assert runner.run_once() == 1 and runner._pool is None and stage.threads == {threading.current_thread().name}


def _three_waiting(tmp_path):
    """A spool with three items in its first queue; their ids in claim order."""
    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    for n in range(3):
        src = spool.inbox / f"{n}.dcm"
        src.write_bytes(b"x")
        spool.adopt(src)
    return spool, spool.ready(INCOMING)


@pytest.mark.parametrize("key", ["{}:ahead", "{}:ahead:interrupted"])   # after a crash, or a SIGKILL (deaths.py)
def test_an_item_in_flight_at_a_crash_is_handled_alone(tmp_path, key):
    """Two claims in flight when the daemon died are both counted by recovery; the one found in flight
    before is handled alone (prepared in the runner's thread, nothing beside it), so that a crash it causes
    again is its own, and a healthy neighbour is not skipped with it (found by the review of issue 29)."""
    spool, ids = _three_waiting(tmp_path)
    suspect = ids[1]
    spool.state.bump_recoveries(key.format(suspect))
    running: set[str] = set()
    lock = threading.Lock()
    seen: dict[str, tuple[str, set[str]]] = {}
    claims: list[str] = []

    class Watched(_Ahead):
        def prepare(self, item):
            with lock:
                seen[item.id] = (threading.current_thread().name, set(running))
                running.add(item.id)
                if item.id == suspect:   # nothing else claimed beside it either
                    claims.extend(spool.claimed(INCOMING))
            try:
                return b"x"
            finally:
                with lock:
                    running.discard(item.id)

        def process(self, item):
            return Result.done(bytes=len(self.prepared(item)))

    stage = Watched(spool, ids)
    assert Runner(stage).run_once() == 3
    assert seen[suspect][0] == threading.current_thread().name and seen[suspect][1] == set()
    assert claims == [suspect]
    assert not any(name == threading.current_thread().name for i, (name, _) in seen.items() if i != suspect)


def test_items_found_in_flight_at_a_death_go_after_the_others(tmp_path):
    """CI: the acceptance test's SIGKILLs, a second apart, found the first file each start took in hand again
    and again (it was the oldest); a file recovered in this stage now waits for the others of the pass."""
    spool, ids = _three_waiting(tmp_path)
    spool.state.bump_recoveries(f"{ids[0]}:plain:interrupted")
    spool.state.bump_recoveries(f"{ids[1]}:another-stage")   # in flight elsewhere: not this stage's concern
    seen: list[str] = []

    class Plain(Stage):
        name = "plain"
        input_queue = INCOMING
        output_queue = ANONYMIZED

        def process(self, item):
            seen.append(item.id)
            return Result.done(bytes=1)

    assert Runner(Plain(spool)).run_once() == 3
    assert seen == [ids[1], ids[2], ids[0]]
