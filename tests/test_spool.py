"""The spool protocol: publish, claim, finish, quarantine, recover.  (SIGKILL at every step: the real pipeline
in test_daemon.py, and the end-to-end run in tests/e2e.)"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest

from medsendx_edge.fsutil import atomic_write
from medsendx_edge.spool import ANONYMIZED, INCOMING, OUTBOX, SENT, TRIAGED, Spool, is_id
from medsendx_edge.stage import Runner, Stage

def _spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool")
    s.ensure_layout()
    return s


def _drop(spool: Spool, name: str, data: bytes) -> Path:
    p = spool.inbox / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def test_adopt_renames_to_a_generated_id(tmp_path):
    spool = _spool(tmp_path)
    src = _drop(spool, "DOE^JANE 1965.dcm", b"x")
    item_id = spool.adopt(src)
    assert is_id(item_id) and not src.exists()
    assert spool.ready(INCOMING) == [item_id]
    assert "DOE" not in "".join(os.listdir(spool.dir(INCOMING)))


def test_claim_finish_complete(tmp_path):
    spool = _spool(tmp_path)
    item_id = spool.adopt(_drop(spool, "a", b"abc"))
    item = spool.claim(INCOMING, item_id)
    assert item is not None and spool.claim(INCOMING, item_id) is None  # claimed once
    assert spool.ready(INCOMING) == [] and spool.claimed(INCOMING) == [item_id]
    spool.pass_on(item, ANONYMIZED)
    assert spool.path(ANONYMIZED, item_id).read_bytes() == b"abc"
    item = spool.claim(ANONYMIZED, item_id)
    spool.publish(OUTBOX, item_id, lambda fh: fh.write(b"new"))
    spool.finish(item)
    assert spool.counts()[ANONYMIZED] == 0 and spool.path(OUTBOX, item_id).read_bytes() == b"new"


def test_atomic_write_failure_leaves_nothing(tmp_path):
    def boom(fh):
        fh.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(tmp_path / "out.dcm", boom)
    assert list(tmp_path.iterdir()) == []


def test_quarantine_and_requeue(tmp_path):
    spool = _spool(tmp_path)
    item_id = spool.adopt(_drop(spool, "a", b"abc"))
    item = spool.claim(INCOMING, item_id)
    spool.quarantine(item, "anonymize", "not DICOM", "NotDicom")
    info = spool.reason("anonymize", item_id)
    assert info["stage"] == "anonymize" and info["reason"] == "not DICOM" and info["error_class"] == "NotDicom"
    assert info["attempts"] == 1 and "requeue" in info["retry"] and info["time"].endswith("Z")
    assert (spool.root / "quarantine" / "anonymize" / f"{item_id}.dcm").read_bytes() == b"abc"
    assert spool.requeue(item_id) == INCOMING
    assert spool.ready(INCOMING) == [item_id]
    assert list(spool.quarantined()) == []


def test_recover_puts_claims_back_and_quarantines_crash_loops(tmp_path):
    spool = _spool(tmp_path)
    item_id = spool.adopt(_drop(spool, "a", b"abc"))
    (spool.dir(ANONYMIZED) / ".tmp-deadbeef-x.dcm").write_bytes(b"half")
    for n in range(1, 4):
        assert spool.claim(INCOMING, item_id) is not None  # ... and the daemon dies
        stats = spool.recover()
        if n < 3:
            assert stats["requeued"] == 1 and spool.ready(INCOMING) == [item_id]
    assert stats["quarantined"] == 1
    assert "crashed the daemon repeatedly" in spool.reason("anonymize", item_id)["reason"]
    assert not any(n.startswith(".tmp-") for n in os.listdir(spool.dir(ANONYMIZED)))


def test_recover_drops_a_claim_whose_output_exists(tmp_path):
    spool = _spool(tmp_path)
    item_id = spool.adopt(_drop(spool, "a", b"abc"))
    spool.claim(INCOMING, item_id)
    spool.publish(ANONYMIZED, item_id, lambda fh: fh.write(b"anon"))  # crash before complete()
    assert spool.recover()["dropped_done"] == 1
    assert spool.counts()[INCOMING] == 0 and spool.ready(ANONYMIZED) == [item_id]


class _Boom(Stage):
    name = "boom"
    input_queue = INCOMING
    output_queue = ANONYMIZED

    def process(self, item):
        raise RuntimeError("DOE^JANE secret value")


def test_runner_quarantines_unexpected_errors_without_their_message(tmp_path, log_lines):
    spool = _spool(tmp_path)
    item_id = spool.adopt(_drop(spool, "a", b"abc"))
    result = Runner(_Boom(spool)).run_once()
    assert result == 1
    info = spool.reason("boom", item_id)
    assert info["error_class"] == "RuntimeError" and "DOE" not in json.dumps(info)
    assert "DOE" not in log_lines.getvalue() and "file_quarantined" in log_lines.getvalue()


def test_adoption_across_file_systems_is_finished_after_a_crash(tmp_path, monkeypatch):
    spool = _spool(tmp_path)
    src = _drop(spool, "share/img.dcm", b"from the share")
    real_rename = os.rename

    def exdev_into_queue(a, b):
        if str(b).endswith(".dcm") and ".queue" in str(b):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(a, b)

    monkeypatch.setattr(os, "rename", exdev_into_queue)
    calls = {"n": 0}
    real_copy = Spool._copy_in

    def crash_once(self, held, item_id):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt  # the power goes after the file was set aside
        return real_copy(self, held, item_id)

    monkeypatch.setattr(Spool, "_copy_in", crash_once)
    with pytest.raises(KeyboardInterrupt):
        spool.adopt(src)
    assert not src.exists() and spool.ready(INCOMING) == []
    from medsendx_edge.ingest import InboxScanner

    assert InboxScanner(spool, 0).scan().adopted == []  # the held file is hidden: never adopted twice
    assert spool.recover()["adoptions_finished"] == 1
    (item_id,) = spool.ready(INCOMING)
    assert spool.path(INCOMING, item_id).read_bytes() == b"from the share"
    assert spool.recover()["adoptions_finished"] == 0
    assert [p for p in spool.inbox.rglob("*") if p.is_file() and ".queue" not in p.parts] == []


def test_an_upload_interrupted_many_times_is_never_called_a_crash_loop(tmp_path):
    spool = _spool(tmp_path)
    item_id = spool.adopt(_drop(spool, "a", b"abc"))
    spool.pass_on(spool.claim(INCOMING, item_id), OUTBOX)
    for _ in range(5):
        assert spool.claim(OUTBOX, item_id) is not None  # power cut mid-upload
        spool.recover()
    assert spool.ready(OUTBOX) == [item_id] and list(spool.quarantined()) == []


def test_pruning_sent_removes_every_companion(tmp_path):
    """fe570f1 pruned the .dcm and left its .json and .png (~0.8 MB a mammogram: 30 GB a year)."""
    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    old, new = f"{1:024x}", f"{2:024x}"
    sent = spool.dir(SENT)
    for item_id in (old, new):
        for ext in (".dcm", ".json", ".png"):
            (sent / f"{item_id}{ext}").write_bytes(b"x")
    orphan = sent / f"{3:024x}.png"  # a picture whose item an older version already pruned
    orphan.write_bytes(b"x")
    past = time.time() - 40 * 86400
    for p in [*sent.glob(f"{old}*"), orphan]:
        os.utime(p, (past, past))
    assert spool.prune(SENT, time.time() - 30 * 86400) == 1
    assert sorted(p.name for p in sent.iterdir()) == [f"{new}.dcm", f"{new}.json", f"{new}.png"]


def test_pruning_a_queue_that_does_not_exist_yet_is_a_no_op(tmp_path):
    spool = Spool(tmp_path / "spool")  # no layout yet: nothing was ever delivered
    assert spool.prune(SENT, time.time()) == 0


def test_a_crash_looping_optional_stage_passes_the_item_on_with_its_reason(tmp_path):
    from medsendx_edge.triage.stage import skipped_sidecar

    spool = Spool(tmp_path / "spool", max_recoveries=2, skip_on_crash_loop={ANONYMIZED: TRIAGED},
                  on_skip=skipped_sidecar)
    spool.ensure_layout()
    item_id = spool.adopt(_drop(spool, "a.dcm", b"an image triage chokes on"))
    spool.pass_on(spool.claim(INCOMING, item_id), ANONYMIZED)
    for _ in range(2):  # triage took it, and the daemon died, twice
        spool.claim(ANONYMIZED, item_id)
        spool.recover()
    assert spool.ready(TRIAGED) == [item_id] and list(spool.quarantined()) == []
    side = json.loads((spool.dir(TRIAGED) / f"{item_id}.json").read_text())
    assert side["triage"] == "failed" and side["priority"] == "normal" and "2 recoveries" in side["reason"]


def test_recovery_removes_a_staging_folder_a_crash_left(tmp_path):
    """A kill inside a fleet shipment leaves its staging folder beside the queues (third review)."""
    spool = Spool(tmp_path / "fleet")
    spool.ensure_layout()
    staging = spool.root / ".staging-abc"
    staging.mkdir()
    (staging / "rows.parquet").write_bytes(b"PAR1")
    stats = spool.recover()
    assert not staging.exists() and stats["temp_removed"] >= 1


def test_pruning_sent_forgets_the_recovery_counts(tmp_path):
    """The recoveries table is read once a stage pass (the recovered go last): it keeps only what is on
    the truck."""
    spool = _spool(tmp_path)
    item_id = spool.adopt(_drop(spool, "a", b"abc"))
    spool.claim(INCOMING, item_id)
    spool.recover(file_fault=False)
    assert spool.state.recovered_in("anonymize") == {item_id}
    spool.pass_on(spool.claim(INCOMING, item_id), SENT)
    assert spool.prune(SENT, time.time() + 1) == 1
    assert spool.state.recovered_in("anonymize") == set()


def test_ids_sort_in_the_order_they_were_made_even_within_one_millisecond(tmp_path):
    """CI17: two files adopted in the same millisecond got ids that sorted by their random part, and were
    triaged in either order (the breast's category landed on the other view).  Ids made by one process,
    from several threads too, sort in the order they were made; files adopted in name order go through the
    queue in that order."""
    import threading as _threading

    from medsendx_edge.spool import new_id

    ids = [new_id() for _ in range(2000)]          # far more than one a millisecond
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    made: list[str] = []
    lock = _threading.Lock()

    def make() -> None:
        for _ in range(500):
            with lock:                              # the order they were made in, as the list records it
                made.append(new_id())

    threads = [_threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert made == sorted(made) and len(set(made)) == len(made)
    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    names = [f"{c}.dcm" for c in "abcdefgh"]
    adopted = []
    for name in names:
        (spool.inbox / name).write_bytes(b"x")
        adopted.append(spool.adopt(spool.inbox / name))
    assert spool.ready(INCOMING) == adopted
