"""A hostile review of 95457eb (deferred triage pictures, 2026-12-07): each test failed on that commit and showed one
defect (the fifth now holds the bound the docs state)."""
from __future__ import annotations

import pathlib
import threading

import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian

from conftest import make_config
from medsendx_edge.config import DestinationConfig, TriageConfig
from medsendx_edge.console import Console
from medsendx_edge.daemon import Daemon
from medsendx_edge.spool import OUTBOX, SENT, TRIAGED, Spool
from medsendx_edge.stage import Runner
from medsendx_edge.triage import stage as triage_stage_module
from medsendx_edge.triage.pictures import PictureDesk
from test_triage_pictures import _cfg, _delivered_picture_lost, _start_again, _triage


def _note_of_this_thread(spool: Spool) -> str | None:
    try:
        return (spool.in_hand.dir / f"{threading.get_ident():x}").read_text()
    except FileNotFoundError:
        return None


# 1 ------------------------------------------------------------------------------------------------------------
def test_a_picture_is_not_dropped_while_the_uploader_puts_its_image_back(tmp_path, monkeypatch):
    """place_picture looks for ``<id>.dcm`` then ``<id>.dcm.work`` without excluding ``unclaim`` (which takes no
    item lock): an upload that fails (a 4G drop) and puts the image back between the two looks makes the
    picture 'dropped' although its image never left the outbox."""
    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    item_id = "c" * 24
    spool.publish(OUTBOX, item_id, lambda fh: fh.write(b"DICM"))
    held = spool.claim(OUTBOX, item_id)          # the uploader is sending it
    waiting = spool.path(OUTBOX, item_id)
    real = pathlib.PosixPath.is_symlink
    putting_back: list[threading.Thread] = []

    def is_symlink(self):
        if self == waiting and held.path.exists() and not putting_back:
            # the send failed: the uploader puts it back now (Uploader._attempt), from its own thread; with the
            # item's lock held by the picture it waits for it (the bounded join), without the lock it is done
            putting_back.append(threading.Thread(target=spool.unclaim, args=(held,)))
            putting_back[0].start()
            putting_back[0].join(0.5)
        return real(self)

    monkeypatch.setattr(pathlib.PosixPath, "is_symlink", is_symlink)
    where = spool.place_picture(item_id, b"png")
    monkeypatch.undo()
    putting_back[0].join(30)
    assert spool.path(OUTBOX, item_id).exists(), "the image is in the outbox all along"
    assert where is not None and (spool.dir(OUTBOX) / f"{item_id}.png").exists(), \
        "the image is in the outbox, its picture was dropped"


# 2 ------------------------------------------------------------------------------------------------------------
def test_a_redraw_at_start_survives_the_uploader_taking_the_image_meanwhile(tmp_path, log_lines):
    """TriageStage._redraw finds the image (Spool.where), then triage_file reads it by that path, unlocked: the
    uploader's claim (or its move to sent/) in between makes the read fail (FileNotFoundError, swallowed into a
    'failed' outcome), the picture is None and the desk drops it without a word."""
    cfg, spool, stage, desk, item_id = _triage(tmp_path)
    Runner(stage).drain()                        # no desk running: the picture is drawn at once
    drawn = (spool.dir(TRIAGED) / f"{item_id}.png").read_bytes()
    spool.pass_on(spool.claim(TRIAGED, item_id), OUTBOX)
    (spool.dir(OUTBOX) / f"{item_id}.png").unlink()   # the desk held it when the power went
    # (the review's test patched Spool.where, found then read by path; the fix opens the file under the item's
    # lock and reads that descriptor: the claim comes right after the look, as the review had it)
    real_open = spool.open_placed

    def open_placed(i):
        fd = real_open(i)
        spool.claim(OUTBOX, i)                   # the uploader takes it to send it, right then
        return fd

    spool.open_placed = open_placed
    desk.start()
    assert stage.missing_pictures() == 1
    assert desk.stop(timeout=None) == 0
    png = spool.dir(OUTBOX) / f"{item_id}.png"
    assert png.exists(), "the redraw read a path that had just been renamed: no picture, nothing logged"
    assert png.read_bytes() == drawn


# 3 ------------------------------------------------------------------------------------------------------------
def test_a_picture_lost_to_a_crash_is_drawn_again_when_the_route_deflated_the_file(tmp_path, log_lines):
    """With ``destination.compression: deflate`` the files in outbox/ and sent/ are Deflated Explicit VR Little
    Endian; read_for_triage reads it as 'no pixel data' (the header read ends at the end of the file), so
    _redraw returns None: the picture is never drawn again (lost for good), nothing is logged, and every
    start queues the same images again (holding the desk's slots)."""
    cfg = make_config(tmp_path, triage=TriageConfig(send_sr=False),
                      destination=DestinationConfig(kind="directory", path=tmp_path / "archive", compression="deflate"))
    cfg.inbox.mkdir(parents=True)
    d, item_id, png, before = _delivered_picture_lost(cfg, "1.2.826.0.1.3680043.8.498.931")
    ts = pydicom.dcmread(d.spool.path(SENT, item_id), stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert ts == DeflatedExplicitVRLittleEndian
    _start_again(cfg)
    assert png.exists(), "a crash lost this picture for good: the deflated image cannot be redrawn"
    assert png.read_bytes() == before


# 4 ------------------------------------------------------------------------------------------------------------
def test_a_redraw_at_the_desk_names_its_image_in_hand(tmp_path, monkeypatch):
    """The desk decodes and analyses the image again (a redraw) or draws its picture in a thread that notes no
    item in hand (deaths.InHand): a fatal crash there (a decoder, Pillow, an out-of-memory kill) is blamed on no
    file, and since every start redraws the same image, the daemon crash-loops for good; before the commit
    the same work ran in the triage's workers, whose notes let recovery skip the file after max_recoveries."""
    cfg = _cfg(tmp_path)
    _d, item_id, _png, _ = _delivered_picture_lost(cfg, "1.2.826.0.1.3680043.8.498.932")
    again = Daemon(cfg)
    again.recover()
    notes: list[str | None] = []
    real = triage_stage_module.triage_file

    def triage_file(path, cfg, defer=False):
        notes.append(_note_of_this_thread(again.spool))
        return real(path, cfg, defer)

    monkeypatch.setattr(triage_stage_module, "triage_file", triage_file)
    again._start_pictures()
    assert again.pictures.stop(timeout=None) == 0
    assert notes, "the redraw did not run"
    assert notes[0] is not None and item_id in notes[0], f"nothing in hand while the desk redraws: {notes}"


def test_a_deferred_picture_is_drawn_with_its_image_in_hand(tmp_path, monkeypatch):
    """The same for a picture deferred in the triage: drawn by the desk with no item noted in hand."""
    from medsendx_edge.triage import picture

    cfg, spool, stage, desk, item_id = _triage(tmp_path)
    notes: list[str | None] = []
    real = picture.draw_png

    def draw_png(*a, **k):
        notes.append(_note_of_this_thread(spool))
        return real(*a, **k)

    monkeypatch.setattr(picture, "draw_png", draw_png)
    desk.start()
    desk.busy(True)
    Runner(stage).drain()
    assert desk.stop(timeout=None) == 0
    assert (spool.dir(TRIAGED) / f"{item_id}.png").exists()
    assert notes and notes[0] is not None and item_id in notes[0], f"nothing in hand while the desk draws: {notes}"


# 5 ------------------------------------------------------------------------------------------------------------
def test_the_pictures_held_are_bounded(tmp_path):
    """The review found 4 x max_waiting held (96 x 1.6 MB) where the docs said 24.  Now: past max_waiting the
    desk draws beside the triage, and twice max_waiting are held at most; beyond that defer refuses (the
    triage draws its own), whatever the desk's pace."""
    release, started = threading.Event(), threading.Event()
    desk = PictureDesk(lambda i, png: None, max_waiting=2)
    desk.start()
    desk.busy(True)

    def slow():
        started.set()
        release.wait(30)
        return b"png"

    accepted = [desk.defer(f"{n:024x}", slow) for n in range(20)]
    assert started.wait(30)
    try:
        assert sum(accepted) <= 2 * desk.max_waiting + 1 and desk.waiting() <= 2 * desk.max_waiting + 1, \
            (sum(accepted), desk.waiting())
        assert not accepted[-1]
    finally:
        release.set()
        desk.busy(False)
        desk.stop(timeout=None)


# 6 ------------------------------------------------------------------------------------------------------------
def test_a_picture_revalidated_by_the_browser_stays_cacheable(tmp_path):
    """The console's pictures are sent with ``no-cache`` (werkzeug's send_file: revalidate) and an ETag; the
    page re-renders every second and the browser revalidates.  The commit marks every non-200 picture answer
    ``no-store``, so a 304 (the picture is there and unchanged) now tells the browser to drop its copy."""
    cfg = _cfg(tmp_path)
    d = Daemon(cfg)
    item_id = "d" * 24
    d.spool.publish(SENT, item_id, lambda fh: fh.write(b"DICM"))
    d.spool.publish_companion(SENT, item_id, ".png", b"\x89PNG\r\n\x1a\n")
    console = Console(d, "127.0.0.1", 0, "console-review-token-0123456789")
    try:
        client = console.app.test_client()
        first = client.get(f"/api/picture/{item_id}.png")
        assert first.status_code == 200 and first.headers.get("ETag")
        again = client.get(f"/api/picture/{item_id}.png", headers={"If-None-Match": first.headers["ETag"]})
        assert again.status_code == 304
        assert "no-store" not in (again.headers.get("Cache-Control") or ""), again.headers.get("Cache-Control")
    finally:
        console.server.server_close()
