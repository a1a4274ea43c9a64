"""The pictures that can wait (triage/pictures.py): drawn while the triage is idle, beside their image wherever
it has got to, the same bytes as a picture drawn at once; a recheck's picture is there when its image is; a stop
draws what waits, and a crash's lost pictures are drawn again at the next start."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import make_config
from medsendx_edge.config import TriageConfig
from medsendx_edge.daemon import Daemon
from medsendx_edge.spool import ANONYMIZED, OUTBOX, SENT, TRIAGED, Claimed, Spool
from medsendx_edge.stage import Runner
from medsendx_edge.triage.pictures import PictureDesk
from medsendx_edge.triage.phantom import phantom_dataset
from medsendx_edge.triage.stage import TriageStage, triage_file
from test_triage_exam_sr import FOUR, exam


def _cfg(tmp_path, **triage):
    cfg = make_config(tmp_path, triage=TriageConfig(send_sr=False, **triage))
    cfg.inbox.mkdir(parents=True)
    return cfg


def _at_once(path, cfg) -> bytes:
    outcome, _ = triage_file(path, cfg)   # no desk: the picture drawn in the triage, as the CLI does
    assert outcome.png is not None and outcome.later is None
    return outcome.png


def _one_image(tmp_path, spool: Spool, blank: bool = False) -> str:
    ds, _ = phantom_dataset(512, 416, density=0.3, seed=5, laterality="L", view="CC")
    if blank:   # no breast in the field: a recheck
        ds.PixelData = np.zeros((512, 416), dtype=np.uint16).tobytes()
    src = tmp_path / "one.dcm"
    ds.save_as(src, enforce_file_format=True)
    return spool.adopt(src)


def _triage(tmp_path, blank: bool = False, **triage):
    cfg = _cfg(tmp_path, **triage)
    spool = Spool(cfg.spool_dir)
    spool.ensure_layout()
    item_id = _one_image(tmp_path, spool, blank)
    spool.pass_on(Claimed("incoming", item_id, spool.path("incoming", item_id)), ANONYMIZED)
    stage = TriageStage(spool, cfg)
    desk = PictureDesk(spool.place_picture, holding=spool.in_hand.holding)   # as the daemon makes it
    stage.pictures = desk
    return cfg, spool, stage, desk, item_id


def _delivered_picture_lost(cfg, study: str):
    """One mammogram delivered by a daemon's run, then its picture lost (the desk held it when the power went):
    (the daemon, the image's id, where its picture goes, the picture's bytes)."""
    exam(cfg, FOUR[:1], study)
    d = Daemon(cfg)
    assert d.run_once() == 0
    [item_id] = d.spool.ready(SENT)
    png = d.spool.dir(SENT) / f"{item_id}.png"
    before = png.read_bytes()
    png.unlink()
    return d, item_id, png, before


def _start_again(cfg) -> Daemon:
    """The next start: recovery, the desk, the missing pictures queued, all drawn (its stop)."""
    again = Daemon(cfg)
    again.recover()
    again._start_pictures()
    assert again.pictures.stop(timeout=None) == 0
    return again


def test_the_daemon_delivers_first_and_every_picture_is_the_one_drawn_at_once(tmp_path):
    cfg = _cfg(tmp_path)
    exam(cfg, FOUR, "1.2.826.0.1.3680043.8.498.901")
    d = Daemon(cfg)
    assert d.run_once() == 0
    sent = d.spool.ready(SENT)
    assert len(sent) == 4
    assert d.pictures.drawn >= 1, "no picture went through the desk: the deferral was not exercised"
    for item_id in sent:
        path = d.spool.path(SENT, item_id)
        assert (d.spool.dir(SENT) / f"{item_id}.png").read_bytes() == _at_once(path, cfg), item_id
    for queue in (TRIAGED, OUTBOX):
        assert not list(d.spool.dir(queue).glob("*.png")), f"a picture left behind in {queue}/"


def test_a_picture_waits_while_the_triage_works_and_lands_where_its_image_went(tmp_path):
    cfg, spool, stage, desk, item_id = _triage(tmp_path)
    desk.start()
    desk.busy(True)
    assert Runner(stage).drain() == 1
    assert (spool.dir(TRIAGED) / f"{item_id}.json").exists()
    assert not (spool.dir(TRIAGED) / f"{item_id}.png").exists()
    assert desk.waiting() == 1
    # the image moves on (the route, then the upload) before the triage is idle
    spool.pass_on(spool.claim(TRIAGED, item_id), OUTBOX)
    spool.pass_on(spool.claim(OUTBOX, item_id), SENT)
    desk.busy(False)
    assert desk.stop(timeout=None) == 0
    png = spool.dir(SENT) / f"{item_id}.png"
    assert png.read_bytes() == _at_once(spool.path(SENT, item_id), cfg)
    assert not list(spool.dir(TRIAGED).glob("*.png")) and not list(spool.dir(OUTBOX).glob("*.png"))


def test_a_recheck_picture_is_beside_its_image_when_the_image_is_placed(tmp_path):
    cfg, spool, stage, desk, item_id = _triage(tmp_path, blank=True)
    desk.start()
    desk.busy(True)   # the desk draws nothing now: what is there was drawn in the triage
    assert Runner(stage).drain() == 1
    import json

    assert json.loads((spool.dir(TRIAGED) / f"{item_id}.json").read_text())["priority"] == "recheck"
    assert (spool.dir(TRIAGED) / f"{item_id}.png").read_bytes() == _at_once(spool.path(TRIAGED, item_id), cfg)
    assert desk.waiting() == 0
    desk.stop()


def test_an_overlay_that_is_sent_is_never_deferred(tmp_path):
    cfg, spool, stage, desk, item_id = _triage(tmp_path, send_overlay=True)
    stage.uid = lambda text: "1.2.826.0.1.3680043.8.498." + str(abs(hash(text)) % 10**12)
    desk.start()
    desk.busy(True)
    Runner(stage).drain()
    assert (spool.dir(TRIAGED) / f"{item_id}.png").exists() and desk.waiting() == 0
    assert len(spool.ready(TRIAGED)) == 2   # the image and its overlay object, drawn from the same picture
    desk.stop()


def test_an_image_quarantined_before_its_picture_gets_none(tmp_path):
    cfg, spool, stage, desk, item_id = _triage(tmp_path)
    desk.start()
    desk.busy(True)
    Runner(stage).drain()
    spool.quarantine(spool.claim(TRIAGED, item_id), "upload", "refused for good", "PermanentUploadError")
    desk.busy(False)
    desk.stop(timeout=None)
    assert not [p for p in cfg.spool_dir.rglob("*.png")], "a picture without its image"


def test_a_stop_draws_what_waits_and_a_stopped_desk_lets_the_triage_draw(tmp_path):
    cfg, spool, stage, desk, item_id = _triage(tmp_path)
    desk.start()
    desk.busy(True)   # the triage never idles: only the stop draws it
    Runner(stage).drain()
    assert desk.waiting() == 1
    assert desk.stop(timeout=None) == 0
    assert (spool.dir(TRIAGED) / f"{item_id}.png").exists()
    # stopped: the next image's picture is drawn by the triage itself
    assert not desk.running and not desk.defer("x" * 24, lambda: b"")
    second = _one_image(tmp_path, spool)
    spool.pass_on(Claimed("incoming", second, spool.path("incoming", second)), ANONYMIZED)
    Runner(stage).drain()
    assert (spool.dir(TRIAGED) / f"{second}.png").exists()


def test_the_desk_draws_while_busy_once_too_many_wait_and_survives_a_failing_picture(tmp_path, log_lines):
    order: list[str] = []
    drawn = threading.Event()
    placed: dict[str, bytes] = {}
    desk = PictureDesk(lambda i, png: placed.setdefault(i, png), max_waiting=2)
    desk.start()
    desk.busy(True)

    def job(name):
        def draw():
            order.append(name)
            drawn.set()
            if name == "bad":
                raise ValueError("a picture that cannot be drawn")
            return name.encode()
        return draw

    for name in ("bad", "b", "c"):
        assert desk.defer(f"{name:0>24}", job(name))
    drawn.wait(30)          # three waiting, two allowed: the oldest is drawn although the triage works
    assert order[:1] == ["bad"]
    order.append("idle")
    desk.busy(False)
    assert desk.stop(timeout=None) == 0
    assert order == ["bad", "idle", "b", "c"], order
    assert sorted(placed) == [f"{'b':0>24}", f"{'c':0>24}"]
    assert "picture_failed" in log_lines.getvalue()


def test_a_picture_drawn_beside_moves_is_never_left_behind(tmp_path):
    """The desk writes a picture while the pipeline moves the image on: hundreds of rounds, each ending with the
    picture beside the image and nowhere else (the spool's item lock)."""
    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    for n in range(300):
        item_id = f"{n:024x}"
        spool.publish(TRIAGED, item_id, lambda fh: fh.write(b"DICM"))
        go = threading.Barrier(2)

        def move():
            go.wait()
            spool.pass_on(spool.claim(TRIAGED, item_id), OUTBOX, durable=False)
            spool.pass_on(spool.claim(OUTBOX, item_id), SENT, durable=False)

        t = threading.Thread(target=move)
        t.start()
        go.wait()
        where = spool.place_picture(item_id, b"png")
        t.join()
        assert where is not None
        assert (spool.dir(SENT) / f"{item_id}.png").exists(), f"round {n}: the picture was left in {where.parent.name}/"
        assert not (spool.dir(TRIAGED) / f"{item_id}.png").exists() and not (spool.dir(OUTBOX) / f"{item_id}.png").exists()


def test_pictures_lost_to_a_crash_are_drawn_again_at_the_next_start(tmp_path):
    cfg = _cfg(tmp_path)
    exam(cfg, FOUR, "1.2.826.0.1.3680043.8.498.902")
    d = Daemon(cfg)
    assert d.run_once() == 0
    sent = d.spool.ready(SENT)
    before = {i: (d.spool.dir(SENT) / f"{i}.png").read_bytes() for i in sent}
    lost = sent[:2]
    for i in lost:   # the desk held them when the power went
        (d.spool.dir(SENT) / f"{i}.png").unlink()
    again = _start_again(cfg)
    assert {i: (again.spool.dir(SENT) / f"{i}.png").read_bytes() for i in sent} == before


@pytest.mark.parametrize("queue", [TRIAGED, OUTBOX])
def test_a_picture_is_placed_beside_a_claimed_image(tmp_path, queue):
    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    item_id = "a" * 24
    spool.publish(queue, item_id, lambda fh: fh.write(b"DICM"))
    claimed = spool.claim(queue, item_id)
    assert spool.place_picture(item_id, b"png") == spool.dir(queue) / f"{item_id}.png"
    spool.pass_on(claimed, SENT)
    assert (spool.dir(SENT) / f"{item_id}.png").read_bytes() == b"png"
    assert spool.place_picture("b" * 24, b"png") is None


def test_a_picture_that_cannot_be_drawn_again_is_given_up_after_max_recoveries(tmp_path, monkeypatch, log_lines):
    """Each redraw is counted before it runs: one whose drawing kills the daemon (here: gives nothing, each
    start) is tried ``max_recoveries`` times, then given up, not redrawn at every start for ever."""
    from medsendx_edge.triage import stage as S

    cfg = _cfg(tmp_path)
    d, item_id, png, _ = _delivered_picture_lost(cfg, "1.2.826.0.1.3680043.8.498.903")
    tries: list[str] = []
    monkeypatch.setattr(S, "triage_file", lambda path, _cfg, defer=False: (tries.append(str(path)),
                                                                            (S.not_applicable("crashed"), None))[1])
    for _start in range(cfg.max_recoveries + 2):
        _start_again(cfg)
    assert len(tries) == cfg.max_recoveries
    assert "picture_given_up" in log_lines.getvalue() and "picture_not_redrawn" in log_lines.getvalue()
    assert not png.exists()


def test_prune_never_deletes_the_companions_of_an_item_arriving_in_sent(tmp_path, monkeypatch):
    """The disk guard prunes sent/ (everything older than now) while the uploader moves a delivered image in,
    its companions first: prune's sweep of companions whose item is gone listed them after its look at the
    items, and deleted the sidecar and picture of an image that had just arrived (found by the review of the
    deferred pictures)."""
    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    item_id = "e" * 24
    spool.publish(OUTBOX, item_id, lambda fh: fh.write(b"DICM"))
    spool.publish_companion(OUTBOX, item_id, ".json", {"triage": "done"})
    spool.publish_companion(OUTBOX, item_id, ".png", b"png")
    real_ready, looks = spool.ready, []

    def ready(queue):
        out = real_ready(queue)
        if queue == SENT:
            looks.append(out)
            if len(looks) == 2:   # prune's look at the live items, then the uploader's move
                spool.pass_on(spool.claim(OUTBOX, item_id), SENT, durable=False)
        return out

    monkeypatch.setattr(spool, "ready", ready)
    spool.prune(SENT, float("inf"))
    assert sorted(p.name for p in spool.dir(SENT).iterdir()) == [f"{item_id}.dcm", f"{item_id}.json",
                                                                  f"{item_id}.png"]
