"""The README's main command (make demo) at a small size: every file of the batch delivered or
quarantined, the exam sheet and pictures in report.html, exit code 0."""

from __future__ import annotations

import contextlib
import io
import re

from medsendx_edge.demo import DEMO_FILES, DEMO_MARK, run_demo
from medsendx_edge.logs import configure_logging


def test_the_demo_delivers_or_quarantines_every_file_and_writes_its_report(tmp_path):
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            assert run_demo(tmp_path / "demo", mammo_size=(512, 416)) == 0
    finally:
        configure_logging("info", "json")  # the demo logged to its own file, closed now
    out = printed.getvalue()
    m = re.search(r"(\d+) files in: (\d+) delivered to [^,]*, (?:(\d+) duplicates \([^)]*\), )?(\d+) quarantined, "
                  r"(\d+) waiting", out)
    assert m, out[-2000:]
    total, delivered, duplicates, quarantined, waiting = (int(g or 0) for g in m.groups())
    assert total >= len(DEMO_FILES) and delivered + duplicates + quarantined == total and waiting == 0
    # MR_small in three encodings (explicit little and big endian, RLE): one image, sent once, the other two
    # recorded as the same image in another encoding (they were quarantined as conflicts before issue 29)
    assert duplicates == 2 and out.count("the same image as item") == 2
    assert quarantined >= 1  # the empty file, at least
    archive = list((tmp_path / "demo" / "archive").iterdir())
    assert len(archive) >= delivered  # plus triage overlays, when configured
    page = (tmp_path / "demo" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4  # the four views' pictures
    for view in ("RCC", "LCC", "RMLO", "LMLO"):
        assert view in page
    assert "DEMO^JANE" not in page and "PID-DEMO-1" not in page and "DEMO^ANNA" not in page
    # issue 26: the README leads with the recheck: the demo has one (a low-dose RMLO of a second woman)
    assert re.search(r"MG +delivered +sent +recheck", out), out[-3000:]
    assert "underexposed or noisy" in out
    assert (tmp_path / "demo" / DEMO_MARK).exists()   # the next demo may empty this folder
    # issue 26: report.html names every file's outcome (quarantined ones with their reason), the metrics
    # with their units, and says "not measured" for a breast with no image instead of 0 %; the phantom
    # render says what it is doing
    rows = re.findall(r"<tr class='(delivered|duplicate|quarantined|waiting)'>", page)
    made = int(re.search(r"and (\d+) triage reports made on the truck", out).group(1))
    assert len(rows) == total + made, (len(rows), total, made)   # every input, and every SR made here
    assert rows.count("quarantined") == quarantined
    assert "empty file (0 bytes)" in page and "percent dense (area)" in page and " cm²" in page
    assert "left not measured dense" in page   # the second woman's exam: her right MLO only
    assert "rendering the physics phantom mammograms" in out and "5 of 5" in out
    # issue 30: the CT (and the CR, with the demo extra) get a tissue map in the report, never a priority
    assert page.count("tissue map: visual aid, not a measurement") >= 1
    assert re.search(r"CT +delivered +sent +normal", out)


def test_the_demo_never_empties_a_spool_it_did_not_make(tmp_path, capsys):
    """``demo --workdir /var/lib/medsendx-edge`` deleted a truck's spool: undelivered images, the state
    database.  A folder holding a spool or an archive without the demo's mark is refused, nothing deleted."""
    work = tmp_path / "var-lib"
    waiting = work / "spool" / "outbox" / "a1" / "image.dcm"
    waiting.parent.mkdir(parents=True)
    waiting.write_bytes(b"undelivered")
    (work / "archive").mkdir()
    assert run_demo(work, mammo_size=(512, 416)) == 1
    assert "no demo made" in capsys.readouterr().err
    assert waiting.read_bytes() == b"undelivered" and (work / "archive").is_dir()
    assert not (work / DEMO_MARK).exists()


def test_the_demo_refuses_a_spool_a_daemon_runs_on_and_empties_its_own(tmp_path, capsys):
    """A demo folder whose spool a daemon holds (another demo, or a run pointed at it) is refused; once free,
    the next demo empties it and holds the lock on the new spool for its run."""
    import os

    import pytest

    from medsendx_edge.demo import claim_workdir
    from medsendx_edge.errors import SpoolBusyError
    from medsendx_edge.startup import lock_spool

    work = tmp_path / "demo"
    old = work / "spool" / "sent" / "x.dcm"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"from the last demo")
    (work / DEMO_MARK).touch()
    held = lock_spool(work / "spool")
    try:
        assert run_demo(work, mammo_size=(512, 416)) == 1
        assert "holds" in capsys.readouterr().err and old.exists()
    finally:
        os.close(held)
    lock = claim_workdir(work)
    try:
        assert not old.exists() and (work / "spool" / "state").is_dir()
        with pytest.raises(SpoolBusyError):
            lock_spool(work / "spool")
    finally:
        os.close(lock)
