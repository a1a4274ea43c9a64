"""The stage graph declared once (issue 25): every queue has a reader and every stage an exit, for both
settings of ``triage.enabled``; the file that was stranded for ever (triage off, a file crash-looping the
route stage skipped into ``triaged/``, which nothing read) now ends in quarantine under the stage that
crashed, and files left in ``triaged/`` when triage is turned off are delivered."""

from __future__ import annotations

from conftest import make_config
from medsendx_edge import pipeline
from medsendx_edge.config import TriageConfig
from medsendx_edge.daemon import Daemon
from medsendx_edge.spool import ANONYMIZED, INCOMING, OUTBOX, SENT, TRIAGED
from medsendx_edge.synthetic import synthetic_mammogram


def test_every_queue_has_a_reader_and_every_stage_an_exit():
    for triage in (True, False):
        specs = pipeline.graph(triage)
        assert pipeline.problems(specs) == [], triage
        assert specs[0].input == INCOMING and specs[-1].output == SENT
    # The wiring before this graph, triage off: route read anonymized only, and the spool's skip map still
    # sent a crash-looping item from anonymized to triaged (an exit nothing read).
    before = (pipeline.StageSpec("anonymize", INCOMING, ANONYMIZED, "quarantine"),
              pipeline.StageSpec("route", ANONYMIZED, TRIAGED, "skip"),
              pipeline.StageSpec("upload", OUTBOX, SENT, "requeue"))
    assert "queue 'triaged' has no reader" in pipeline.problems(before)


def test_only_triage_is_skipped_on_a_crash_loop():
    assert pipeline.skip_map(pipeline.graph(True)) == {ANONYMIZED: TRIAGED}
    assert pipeline.skip_map(pipeline.graph(False)) == {}
    assert pipeline.stage_of_queue(pipeline.graph(False))[ANONYMIZED] == "route"


def _file(path):
    ds, _ = synthetic_mammogram(128, 104, seed=1, density=0.3, pixel_spacing_mm=0.5)
    ds.save_as(path, enforce_file_format=True)


def _segfaulted(daemon: Daemon, queue: str, item_id: str) -> None:
    """What a worker thread that crashed on ``item_id`` leaves (medsendx_edge/deaths.py): faulthandler's record
    naming the thread, and the thread's note of its item."""
    state = daemon.spool.root / "state"
    (state / "fatal.log").write_text("Fatal Python error: Segmentation fault\n\n"
                                     "Current thread 0x00007f00000000a1 (most recent call first):\n")
    (state / "inhand").mkdir(exist_ok=True)
    (state / "inhand" / "7f00000000a1").write_text(f"{queue}:{item_id}")


def test_triage_off_a_route_crash_loop_is_quarantined_not_stranded(tmp_path):
    cfg = make_config(tmp_path, triage=TriageConfig(enabled=False, send_sr=False), max_recoveries=2)
    daemon = Daemon(cfg)
    spool = daemon.spool
    _file(spool.path(ANONYMIZED, "a" * 24))
    for _ in range(2):          # the route stage took it and the daemon died, twice
        spool.claim(ANONYMIZED, "a" * 24)
        _segfaulted(daemon, ANONYMIZED, "a" * 24)
        daemon.recover()
    assert spool.ready(TRIAGED) == [] and spool.ready(ANONYMIZED) == []
    assert list(spool.quarantined()) == [("route", "a" * 24)]   # named for the stage that crashed


def test_triage_turned_off_still_delivers_what_waits_in_triaged(tmp_path):
    cfg = make_config(tmp_path, triage=TriageConfig(enabled=False, send_sr=False))
    daemon = Daemon(cfg)
    _file(daemon.spool.path(TRIAGED, "b" * 24))
    daemon.recover()
    daemon.process_pipeline()
    assert daemon.run_once() == 0
    assert daemon.spool.ready(SENT) == ["b" * 24] and daemon.spool.ready(TRIAGED) == []


def test_crashes_count_per_stage_not_per_queue(tmp_path):
    """Review: a file that crashed triage twice, then met the route stage after triage was turned off, was
    quarantined as a route crash loop although route had never run it."""
    cfg = make_config(tmp_path, max_recoveries=3)
    daemon = Daemon(cfg)
    spool = daemon.spool
    _file(spool.path(ANONYMIZED, "c" * 24))
    for _ in range(2):          # triage took it and the daemon died, twice
        spool.claim(ANONYMIZED, "c" * 24)
        _segfaulted(daemon, ANONYMIZED, "c" * 24)
        daemon.recover()
    off = Daemon(make_config(tmp_path, triage=TriageConfig(enabled=False, send_sr=False), max_recoveries=3))
    off.spool.claim(ANONYMIZED, "c" * 24)   # route took it, and the daemon died once
    _segfaulted(off, ANONYMIZED, "c" * 24)
    off.recover()
    assert off.spool.ready(ANONYMIZED) == ["c" * 24] and list(off.spool.quarantined()) == []


def test_the_docs_show_the_declared_graph():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    shown = doc.split("<!-- stage-graph", 1)[1].split("-->", 1)[1].split("<!-- /stage-graph -->", 1)[0]
    assert shown.strip() == pipeline.docs_section().strip()


# --------------------------------------------------------------------------- the triage side (daemon._overlapped)
def _stubbed(tmp_path, n_incoming=0, n_anonymized=0):
    """A daemon whose stages only pass items on (the pass's scheduling is what is tested), triage counted."""
    from medsendx_edge.stage import Result

    d = Daemon(make_config(tmp_path))
    for i in range(n_incoming):
        d.spool.publish(INCOMING, f"{i:024x}", lambda fh: fh.write(b"x"))
    for i in range(n_anonymized):
        d.spool.publish(ANONYMIZED, f"{1000 + i:024x}", lambda fh: fh.write(b"x"))
    triaged = []
    d.anonymize_stage.process = lambda item: Result.done()
    d.triage_stage.process = lambda item: (triaged.append(item.id), Result.done())[1]
    d.triage_stage.lookahead = 0
    for r in d.runners:
        if r.stage.name == "route":
            r.stage.process = lambda item: Result.done()
            r.stage.placed = lambda item, result: None
    return d, triaged


def test_an_error_beside_the_triage_side_stops_it_after_its_batch(tmp_path):
    """The anonymize side fails (a share gone stale under ``listdir``): the error surfaces, and the triage
    side finishes at most the batch in hand instead of draining the whole backlog first (the heartbeat
    would have stood still all that time); nothing is left claimed, the next pass does the rest."""
    import errno

    import pytest

    d, triaged = _stubbed(tmp_path, n_anonymized=40)
    anon = next(r for r in d.runners if r.stage is d.anonymize_stage)
    real = anon.run_once
    anon.run_once = lambda limit=None: (_ for _ in ()).throw(OSError(errno.ESTALE, "Stale file handle"))
    with pytest.raises(OSError):
        d.process_pipeline()
    assert len(triaged) <= 4, len(triaged)        # one batch at most
    assert d.spool.claimed(ANONYMIZED) == []
    anon.run_once = real
    d.process_pipeline()
    assert len(triaged) == 40 and len(set(triaged)) == 40 and d.spool.ready(ANONYMIZED) == []


def test_a_reload_that_swaps_the_runners_mid_pass_ends_the_pass_cleanly(tmp_path):
    """A reload replaces ``daemon.runners`` while a pass runs: the pass ends (the side after its batch), the
    next one runs the new list, every item is done once and no error is raised."""
    from medsendx_edge.stage import Result

    d, triaged = _stubbed(tmp_path, n_incoming=12)
    swapped = []

    def anonymize(item):
        if not swapped:
            swapped.append(True)
            d.runners = list(d.runners)      # what _build_runners does on a reload
        return Result.done()

    d.anonymize_stage.process = anonymize
    assert d.process_pipeline() > 0
    assert sorted(triaged) == sorted(set(triaged)) and len(triaged) == 12
    assert d.spool.ready(INCOMING) == d.spool.ready(ANONYMIZED) == d.spool.ready(TRIAGED) == []
    assert len(d.spool.ready(OUTBOX)) == 12


def test_a_reload_before_a_pass_starts_does_not_end_the_call_with_work_waiting(tmp_path):
    """The runners swapped between the pass's snapshot and its first step: the pass does nothing (it
    proves nothing about the queues), and the call goes on with the new list instead of returning 0."""
    d, triaged = _stubbed(tmp_path, n_incoming=8)
    real = d._overlapped
    swaps = []

    def overlapped(runners, side, batch, feed=None):
        if not swaps:
            swaps.append(True)
            d.runners = list(d.runners)
        return real(runners, side, batch, feed)

    d._overlapped = overlapped
    assert d.process_pipeline() >= 8
    assert len(triaged) == 8 and len(d.spool.ready(OUTBOX)) == 8


def test_files_copied_into_the_inbox_during_a_pass_join_it(tmp_path):
    """A burst on the share: the daemon adopted the first file and is triaging it when the next one lands.
    The next one is adopted and anonymized while the first is still in triage (the pipeline thread looks
    at the inbox between its batches), not after the pass ends: the second of 20 mammograms copied at
    once waited for the first one's whole triage (benchmarks/bench_e2e.py, the running daemon)."""
    import os
    import threading

    from medsendx_edge.stage import Result

    d, triaged = _stubbed(tmp_path)
    inbox = d.spool.inbox
    first = inbox / "first.dcm"
    _file(first)
    os.utime(first, (0, 0))
    anonymized, second_anonymized, held, woke = [], threading.Event(), [], []

    def anonymize(item):
        anonymized.append(item.id)
        if len(anonymized) == 2:
            second_anonymized.set()
        return Result.done()

    def triage(item):
        triaged.append(item.id)
        if len(triaged) == 1:   # the first file in triage: the second lands on the share now
            second = inbox / "second.dcm"
            _file(second)
            os.utime(second, (0, 0))
            # the pass listens for wake-ups: one ends its wait at once (not at its next half-second look)
            woke.append(d._wake.also is not None)
            d.wake.set()         # what the inbox watcher does on its close event
            held.append(second_anonymized.wait(30))
        return Result.done()

    d.anonymize_stage.process = anonymize
    d.triage_stage.process = triage
    d.feed_inbox()
    assert d.process_pipeline(feed=d.feed_inbox) > 0
    assert woke == [True] and held == [True]   # adopted and anonymized while the first was in triage
    assert len(triaged) == 2 and len(d.spool.ready(OUTBOX)) == 2 and list(inbox.glob("*.dcm")) == []


def test_a_wake_up_also_ends_the_wait_of_the_pass_in_progress():
    import threading

    from medsendx_edge.daemon import _Wake

    wake, passing = _Wake(), threading.Event()
    wake.set()
    assert wake.is_set() and not passing.is_set()      # no pass listening
    wake.clear()
    wake.also = passing
    wake.set()
    assert wake.is_set() and passing.is_set()
