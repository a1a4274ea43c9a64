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


def test_triage_off_a_route_crash_loop_is_quarantined_not_stranded(tmp_path):
    cfg = make_config(tmp_path, triage=TriageConfig(enabled=False, send_sr=False), max_recoveries=2)
    daemon = Daemon(cfg)
    spool = daemon.spool
    _file(spool.path(ANONYMIZED, "a" * 24))
    for _ in range(2):          # the route stage took it and the daemon died, twice
        spool.claim(ANONYMIZED, "a" * 24)
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
        daemon.recover()
    off = Daemon(make_config(tmp_path, triage=TriageConfig(enabled=False, send_sr=False), max_recoveries=3))
    off.spool.claim(ANONYMIZED, "c" * 24)   # route took it, and the daemon died once
    off.recover()
    assert off.spool.ready(ANONYMIZED) == ["c" * 24] and list(off.spool.quarantined()) == []


def test_the_docs_show_the_declared_graph():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    shown = doc.split("<!-- stage-graph", 1)[1].split("-->", 1)[1].split("<!-- /stage-graph -->", 1)[0]
    assert shown.strip() == pipeline.docs_section().strip()
