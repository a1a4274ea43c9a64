"""A second hostile review of the deferred triage pictures (95457eb, 462ae02; 2026-12-07): each test failed on
462ae02 and showed one defect (the second now holds what the fix chose: a deflated multi-frame object is not
read at all)."""
from __future__ import annotations

import threading

import numpy as np
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from medsendx_edge.daemon import Daemon
from medsendx_edge.triage import stage as S
from medsendx_edge.triage.phantom import phantom_dataset
from medsendx_edge.triage.stage import read_for_triage
from test_triage_pictures import _cfg, _delivered_picture_lost, _start_again


# 1 ------------------------------------------------------------------------------------------------------------
def test_a_redraw_cut_by_power_cuts_is_not_given_up_as_a_crash_loop(tmp_path, monkeypatch):
    """_redraw counts every attempt in ``<id>:picture`` before it runs, and gives up after ``max_recoveries``,
    whatever ended the attempt: a truck switched off (or SIGKILLed, no fatal record, nothing blamed on the file)
    three times while the desk redraws at start loses that picture for good, though drawing it never crashed
    anything.  The spool's own recovery counts such deaths apart (``max_interruptions``, deaths.py); the picture's
    counter ignores the in-hand note it writes."""
    cfg = _cfg(tmp_path)
    _d, _item_id, png, before = _delivered_picture_lost(cfg, "1.2.826.0.1.3680043.8.498.941")
    real = S.triage_file
    entered, release = threading.Event(), threading.Event()
    cut = [True]

    def triage_file(path, c, defer=False):
        if cut[0]:
            entered.set()
            release.wait(60)                         # the power goes while this is drawn: never returns here
            return S.not_applicable("abandoned"), None
        return real(path, c, defer)

    monkeypatch.setattr(S, "triage_file", triage_file)
    try:
        for _power_cut in range(cfg.max_recoveries):
            entered.clear()
            again = Daemon(cfg)
            again.recover()
            again._start_pictures()
            assert entered.wait(30), "the redraw did not start"
            # the power cut: this process is gone (its desk thread stays blocked, never placing anything)
        cut[0] = False
        _start_again(cfg)
        assert png.exists(), (f"{cfg.max_recoveries} power cuts during its redraw, and the picture is given up as "
                              "if its drawing had crashed the daemon")
        assert png.read_bytes() == before
    finally:
        release.set()


# 2 ------------------------------------------------------------------------------------------------------------
def test_a_deflated_tomosynthesis_is_not_inflated_whole_and_one_deflated_frame_is_read_as_stored(tmp_path):
    """read_for_triage's deflate branch (462ae02) read the dataset whole and decoded every frame, before the
    MAX_FRAME_BYTES check, and returned a view that kept the whole stack alive through the analysis (a 16-frame
    object: 75 frames' worth at its peak).  A deflated stream cannot be read a frame at a time: a deflated
    multi-frame object is now not triaged, with its reason, and one deflated frame reads as the same image
    stored plainly, the frame owning its pixels."""
    import pytest

    ds, _ = phantom_dataset(512, 416, density=0.4, seed=6, laterality="R", view="CC")
    a = ds.pixel_array.astype(np.uint16)
    out = {}
    for ts in (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = ts
        path = tmp_path / f"{ts.name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        _, g, frame = read_for_triage(path)
        out[ts.name] = (frame, g.frame)
    native, deflated = out[ExplicitVRLittleEndian.name], out[DeflatedExplicitVRLittleEndian.name]
    assert np.array_equal(native[0], deflated[0]) and native[1] == deflated[1]
    assert deflated[0].base is None or deflated[0].base.nbytes <= 2 * deflated[0].nbytes
    frames = 16
    ds.NumberOfFrames = frames
    ds.PixelData = np.stack([a] * frames).tobytes()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "dbt.dcm"
    ds.save_as(path, enforce_file_format=True)
    # (its header read still inflates the stream, as pydicom reads any deflated file, and as the anonymizer
    # read it: a limit said in docs/triage.md; nothing is decoded)
    with pytest.raises(S.NotTriaged, match="deflated multi-frame"):
        read_for_triage(path)


# 3 ------------------------------------------------------------------------------------------------------------
def test_a_picture_given_up_is_not_queued_again_at_every_start(tmp_path, monkeypatch, log_lines):
    """Once given up, missing_pictures still queues the image at every start (its sidecar says "done", no .png):
    each start writes the state DB again and logs ``picture_given_up`` again, for as long as the image stays in
    sent/ (``sent_retention_days``), and such images take the desk's 48 places at start before the pictures a
    crash really lost (the rest are 'left' to the next start)."""
    cfg = _cfg(tmp_path)
    _delivered_picture_lost(cfg, "1.2.826.0.1.3680043.8.498.942")
    monkeypatch.setattr(S, "triage_file", lambda path, _c, defer=False: (S.not_applicable("gives none"), None))
    for _start in range(cfg.max_recoveries + 1):     # tried max_recoveries times, then given up
        _start_again(cfg)
    assert "picture_given_up" in log_lines.getvalue()
    log_lines.truncate(0)
    log_lines.seek(0)
    later = Daemon(cfg)
    later.recover()
    later.pictures.start()
    queued = later.triage_stage.missing_pictures()
    later.pictures.stop(timeout=None)
    assert queued == 0 and "picture_given_up" not in log_lines.getvalue(), \
        "a picture given up is queued, counted and given up again at every start"


def test_a_death_blamed_on_the_picture_being_drawn_counts_towards_giving_it_up(tmp_path, monkeypatch, log_lines):
    """The other half of the first defect's fix: a death whose fatal record names the desk's thread (its in-hand
    note ``pictures:<id>``) is counted against that picture, so a picture whose drawing kills the daemon is
    given up after ``max_recoveries`` starts, not redrawn into a crash loop; a power cut (no fatal record)
    counts nothing (the test above)."""
    from medsendx_edge import daemon as D
    from medsendx_edge.triage.pictures import PICTURES

    cfg = _cfg(tmp_path)
    _d, item_id, _png, _ = _delivered_picture_lost(cfg, "1.2.826.0.1.3680043.8.498.943")
    monkeypatch.setattr(D.deaths, "previous_death", lambda _state: "SIGSEGV in thread pictures")
    monkeypatch.setattr(D.deaths, "blamed", lambda _state, also=(): {f"{PICTURES}:{item_id}"})
    tries: list[str] = []
    monkeypatch.setattr(S, "triage_file", lambda path, _c, defer=False: (tries.append(str(path)), (None, None))[1])
    for _crash in range(cfg.max_recoveries):
        again = Daemon(cfg)
        again.recover()              # each start after a death blamed on the picture
    assert again.triage_stage.picture_given_up(item_id)
    again.pictures.start()
    assert again.triage_stage.missing_pictures() == 0 and not tries
    again.pictures.stop(timeout=None)
    assert "picture_given_up" in log_lines.getvalue()
