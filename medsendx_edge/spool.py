"""The spool: the only code that creates, renames or removes queue files.

Layout under ``spool_dir``::

    inbox/            the modality's drop folder (any names, nested folders)
    inbox/.queue/     files adopted from the inbox, renamed to generated ids
    anonymized/       <id>.dcm                       (anonymize stage output)
    triaged/          <id>.dcm + companions          (triage stage output)
    outbox/           <id>.dcm + companions          (the uploader's queue)
    sent/             <id>.dcm                       (delivered, kept for sent_retention_days)
    quarantine/<stage>/<id>.dcm + <id>.reason.json
    state/            SQLite state (recoveries, upload queue, linkage)

Protocol (Maildir / Mailman / Postfix):

* **publish** writes ``.tmp-<rand>-<id>.dcm`` in the destination folder, fsyncs the
  file, ``os.replace``-s it to its name and fsyncs the folder;
* **claim** renames ``<id>.dcm`` to ``<id>.dcm.work`` before any work;
* **pass_on** moves a claimed item to the next queue (companions first, the ``.dcm`` last: the
  ``.dcm`` is the commit point); **finish** removes a claimed item once its output is published
  (Mailman's switchboard's word: done with it); **quarantine** writes the reason first, then moves
  the file;
* **place_picture** writes a picture drawn after its item moved on (triage/pictures.py) beside the item
  wherever it is now; it and every move of an item with its companions hold that item's lock, so a
  picture never lands beside a file that has just left;
* **recover** (on start, before anything else) removes stale temp files, drops
  claimed items whose id already exists downstream (the crash came after the
  output was published), puts the others back in their queue, and quarantines
  an item recovered ``max_recoveries`` times after deaths a file can cause ("crashed the daemon
  repeatedly"), or ``max_interruptions`` times after deaths that left no trace (SIGKILL, power cut):
  :mod:`medsendx_edge.deaths`.

Names are generated ids (creation time in ms + random), never derived from
DICOM content or from the modality's file names; they stay on the truck: what leaves is named by
:func:`export_id`, which carries no time.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from medsendx_edge.deaths import InHand
from medsendx_edge.fsutil import TMP_PREFIX, atomic_write, fsync_dir, write_bytes_atomic
from medsendx_edge.state import StateDB
from medsendx_edge.vocabulary import Priority, UploadState

INCOMING = "incoming"
ANONYMIZED = "anonymized"
TRIAGED = "triaged"
OUTBOX = "outbox"
SENT = "sent"
QUARANTINE = "quarantine"
#: Queues in pipeline order; a claimed item is stale if its id exists in a later one.
PIPELINE = (INCOMING, ANONYMIZED, TRIAGED, OUTBOX, SENT)

DCM = ".dcm"
WORK = ".work"
REASON = ".reason.json"
ADOPTING = ".medsendx-adopt-"
COMPANIONS = (".json", ".png")  # triage's metrics and picture, beside the item
INTERRUPTED = "interrupted"  # the recoveries key of deaths that left no trace: <id>:<stage>:interrupted
TEMP_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload", ".filepart", "~")


_ID_LOCK = threading.Lock()
_last_id_ms = 0


_ITEM_LOCKS = 64


def new_id() -> str:
    """A time-ordered random id: sorting ids sorts items by age, and ids made by this process in the order
    they were made.  Two made in the same millisecond sorted by their random part: two files adopted in one
    millisecond went through the stages in either order, so a breast's category could land on either
    view, and the exam book's later take (a retake, which supersedes) could be the earlier one (CI17 failed
    on it once).  Within a process the millisecond part only ever rises (a burst borrows the next ones)."""
    global _last_id_ms
    with _ID_LOCK:
        ms = max(time.time_ns() // 1_000_000, _last_id_ms + 1)
        _last_id_ms = ms
    return f"{ms:012x}{secrets.token_hex(6)}"


def derived_id(item_id: str, what: str) -> str:
    """The id of an item made from another (the triage SR of an image): the same for every attempt, so a
    stage redone after a crash replaces what it published before instead of adding a second one.  It
    keeps its source's time, so it sorts beside it."""
    return item_id[:12] + hashlib.sha256(f"{item_id}:{what}".encode()).hexdigest()[:12]


def export_id(item_id: str) -> str:
    """The name an item carries outside the truck (a file name at the destination, a URL, a feature
    row id): a one-way hash of the spool id, the same on every retry.  Spool ids begin with the ingest
    time in milliseconds; nothing that leaves may carry that time."""
    return hashlib.sha256(f"medsendx-export:{item_id}".encode()).hexdigest()[:24]


def is_id(name: str) -> bool:
    return len(name) == 24 and all(c in "0123456789abcdef" for c in name)


def write_json_atomic(dest: Path, data: Any) -> Path:
    return write_bytes_atomic(dest, json.dumps(data, indent=2, sort_keys=True).encode())


@dataclass(frozen=True)
class Claimed:
    """An item this process has claimed: ``path`` is ``<queue>/<id>.dcm.work``."""

    queue: str
    id: str
    path: Path


class Spool:
    def __init__(self, root: Path, inbox: Path | None = None, state: StateDB | None = None,
                 max_recoveries: int = 3, max_interruptions: int = 10,
                 skip_on_crash_loop: dict[str, str] | None = None,
                 on_skip: Callable[[str, str], dict[str, Any]] | None = None, suffix: str = DCM,
                 stage_of_queue: dict[str, str] | None = None) -> None:
        """``skip_on_crash_loop``: {queue: next queue} for an optional stage whose crash-looping item
        passes on instead of going to quarantine; ``on_skip(id, why)`` gives the companion
        ``<id>.json`` written beside it (the stage's own words: the spool does not know them);
        ``stage_of_queue``: which stage reads each queue (a crash loop's quarantine folder): both from the
        declared stage graph (:mod:`medsendx_edge.pipeline`)."""
        self.root = Path(root)
        self.inbox = Path(inbox) if inbox is not None else self.root / "inbox"
        self.state = state if state is not None else StateDB(self.root / "state" / "state.db")
        self.in_hand = InHand(self.root / "state")   # which item each worker thread works on (a crash's culprit)
        self.max_recoveries = max_recoveries
        self.max_interruptions = max_interruptions
        self.skip_on_crash_loop = skip_on_crash_loop or {}
        self.stage_of_queue = stage_of_queue or dict(STAGE_OF_QUEUE)
        self.on_skip = on_skip
        self.suffix = suffix  # items are <id><suffix>: .dcm for images, .parquet for fleet feature files
        # Told each item id once it is in quarantine, or back in its queue (the exam book reads an image only
        # while it is on its way: triage/stage.py); a listener's failure never undoes either.
        self.quarantine_listeners: list[Callable[[str], object]] = []
        self.requeue_listeners: list[Callable[[str], object]] = []
        # An item's moves (with its companions) and a picture drawn after it moved on take its lock: the
        # picture lands beside the item, never beside a file that has just left (place_picture).
        self._item_locks = [threading.Lock() for _ in range(_ITEM_LOCKS)]

    def _lock(self, item_id: str) -> threading.Lock:
        return self._item_locks[hash(item_id) % _ITEM_LOCKS]

    # ---------------------------------------------------------------- layout
    def dir(self, queue: str) -> Path:
        if queue == INCOMING:
            return self.inbox / ".queue"
        return self.root / queue

    def quarantine_dir(self, stage: str) -> Path:
        return self.root / QUARANTINE / stage

    def ensure_layout(self) -> None:
        for q in PIPELINE:
            self.dir(q).mkdir(parents=True, exist_ok=True)
        (self.root / QUARANTINE).mkdir(parents=True, exist_ok=True)
        (self.root / "state").mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- listing
    def ready(self, queue: str) -> list[str]:
        """Ids waiting in ``queue``, oldest first."""
        try:
            names = os.listdir(self.dir(queue))
        except FileNotFoundError:
            return []
        ids = [n[: -len(self.suffix)] for n in names if n.endswith(self.suffix) and not n.startswith(".")]
        return sorted(i for i in ids if is_id(i))

    def claimed(self, queue: str) -> list[str]:
        try:
            names = os.listdir(self.dir(queue))
        except FileNotFoundError:
            return []
        return sorted(n[: -len(self.suffix + WORK)] for n in names if n.endswith(self.suffix + WORK))

    def path(self, queue: str, item_id: str) -> Path:
        return self.dir(queue) / f"{item_id}{self.suffix}"

    def companions(self, queue: str, item_id: str) -> list[Path]:
        """The files that travel with an item (``<id>.json``, ``<id>.png``): looked up by name, not by
        listing the folder, so a queue of thousands costs the same per item as a queue of ten."""
        d = self.dir(queue)
        return [p for p in (d / f"{item_id}{ext}" for ext in COMPANIONS) if p.exists()]

    def quarantined(self) -> Iterator[tuple[str, str]]:
        """(stage, id) of every quarantined item."""
        qroot = self.root / QUARANTINE
        if not qroot.is_dir():
            return
        for stage in sorted(os.listdir(qroot)):
            sdir = qroot / stage
            if not sdir.is_dir():
                continue
            for n in sorted(os.listdir(sdir)):
                if n.endswith(REASON):
                    yield stage, n[: -len(REASON)]

    def counts(self) -> dict[str, int]:
        out = {q: len(self.ready(q)) + len(self.claimed(q)) for q in PIPELINE}
        out[QUARANTINE] = sum(1 for _ in self.quarantined())
        return out

    def exists_after(self, queue: str, item_id: str) -> bool:
        """Is ``item_id`` present in a queue after ``queue`` or in quarantine?"""
        later = PIPELINE[PIPELINE.index(queue) + 1:]
        for q in later:
            d = self.dir(q)
            if (d / f"{item_id}{self.suffix}").exists() or (d / f"{item_id}{self.suffix}{WORK}").exists():
                return True
        qroot = self.root / QUARANTINE
        if qroot.is_dir():
            for stage in os.listdir(qroot):
                if (qroot / stage / f"{item_id}{REASON}").exists():
                    return True
        return False

    # ---------------------------------------------------------------- verbs
    def adopt(self, src: Path) -> str:
        """Take a stable file out of the inbox into the incoming queue under a new id.

        A rename when the file is on the inbox's file system.  Otherwise (a share
        mounted inside the inbox) the file is first renamed beside itself to
        ``.medsendx-adopt-<id>`` (hidden, so no scan takes it again), copied,
        published, and only then unlinked: a crash in between is finished by
        :meth:`recover`, which never adopts it twice.  Raises FileNotFoundError
        if the file vanished first.
        """
        item_id = new_id()
        qdir = self.dir(INCOMING)
        qdir.mkdir(parents=True, exist_ok=True)
        dest = qdir / f"{item_id}{self.suffix}"
        try:
            os.rename(src, dest)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            held = src.parent / f"{ADOPTING}{item_id}"
            os.rename(src, held)
            fsync_dir(src.parent)
            self._copy_in(held, item_id)
            return item_id
        fsync_dir(qdir)
        fsync_dir(src.parent)
        return item_id

    def _copy_in(self, held: Path, item_id: str) -> None:
        with open(held, "rb") as fin:
            atomic_write(self.path(INCOMING, item_id), lambda fh: shutil.copyfileobj(fin, fh, 1 << 20))
        os.unlink(held)
        fsync_dir(held.parent)

    def _recover_adoptions(self) -> int:
        """Finish cross-file-system adoptions a crash interrupted (see :meth:`adopt`)."""
        from medsendx_edge.fsutil import walk

        done = 0
        for dirpath, _dirs, files in walk(self.inbox, descend=lambda name: name != ".queue"):
            for name in files:
                if not name.startswith(ADOPTING):
                    continue
                held = Path(dirpath) / name
                item_id = name[len(ADOPTING):]
                if not is_id(item_id):
                    continue  # not one of ours: whoever named it so, we never touch it
                try:
                    if self.path(INCOMING, item_id).exists() or self.claimed(INCOMING).count(item_id) \
                            or self.exists_after(INCOMING, item_id):
                        held.unlink()  # the copy was published: only the unlink was missing
                    else:
                        self._copy_in(held, item_id)
                except OSError:
                    continue  # start-up survives anything in the inbox; the next start tries again
                done += 1
        return done

    def publish(self, queue: str, item_id: str, writer: Callable[[IO[bytes]], object],
                suffix: str | None = None) -> Path:
        """Atomically create ``<queue>/<id><suffix>`` with the bytes ``writer`` writes."""
        return atomic_write(self.dir(queue) / f"{item_id}{suffix or self.suffix}", writer)

    def sidecar(self, item_id: str, *queues: str) -> dict[str, Any]:
        """The item's ``<id>.json`` (triage's result and priority), from the first of ``queues`` that
        holds it (all pipeline queues by default); ``{}`` when there is none or it is unreadable.  The
        one reader of sidecars."""
        for queue in queues or PIPELINE:
            try:
                data = json.loads((self.dir(queue) / f"{item_id}.json").read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                return data
        return {}

    def publish_companion(self, queue: str, item_id: str, ext: str, data: bytes | Any) -> Path:
        """Atomically write a companion beside an item (``<id>.json`` or ``<id>.png``): bytes as they are,
        anything else as JSON.  Companions travel with their item through pass_on, quarantine and prune."""
        if ext not in COMPANIONS:
            raise ValueError(f"not a companion extension: {ext}")
        dest = self.dir(queue) / f"{item_id}{ext}"
        if isinstance(data, (bytes, bytearray)):
            return write_bytes_atomic(dest, bytes(data))
        return write_json_atomic(dest, data)

    def place_picture(self, item_id: str, png: bytes) -> Path | None:
        """A picture drawn after its image moved on (triage/pictures.py): written beside the image wherever
        it is now (triaged/, outbox/ or sent/, waiting or claimed), under the item's lock, which its moves
        hold too; None when the image has left the queues (quarantined, pruned): no picture without its
        image."""
        with self._lock(item_id):
            for queue in (TRIAGED, OUTBOX, SENT):
                path = self.path(queue, item_id)
                held = path.with_name(path.name + WORK)
                if path.exists() or path.is_symlink() or held.exists() or held.is_symlink():
                    return self.publish_companion(queue, item_id, ".png", png)
        return None

    def open_placed(self, item_id: str) -> int | None:
        """A read-only descriptor of the file of ``item_id`` in triaged/, outbox/ or sent/ (waiting or claimed),
        opened under the item's lock: it reads the same file whatever moves or claims it afterwards (a picture
        drawn again from its image, triage/pictures.py); None when it is in none of them."""
        with self._lock(item_id):
            for queue in (TRIAGED, OUTBOX, SENT):
                path = self.path(queue, item_id)
                for candidate in (path, path.with_name(path.name + WORK)):
                    try:
                        return os.open(candidate, os.O_RDONLY | os.O_CLOEXEC)
                    except FileNotFoundError:
                        continue
        return None

    def publish_file(self, queue: str, item_id: str, src: Path) -> Path:
        """Publish a finished file written elsewhere (the C-STORE listener's received dataset) as
        ``<queue>/<id><suffix>``: fsync it, rename it in, fsync the folder; copied through a temp
        name when it lies on another file system.  The source is gone afterwards."""
        dest = self.path(queue, item_id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(src, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.rename(src, dest)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            with open(src, "rb") as fin:
                atomic_write(dest, lambda fh: shutil.copyfileobj(fin, fh, 1 << 20))
            os.unlink(src)
            return dest
        fsync_dir(dest.parent)
        return dest

    def scratch_dir(self) -> Path:
        """A hidden folder beside the incoming queue (same file system) for files being received;
        emptied at start (nothing in it was ever acknowledged)."""
        return self.dir(INCOMING) / ".receiving"

    def claim(self, queue: str, item_id: str) -> Claimed | None:
        """Rename ``<id>.dcm`` to ``<id>.dcm.work``; None if another worker took it.

        Not fsynced: a claim lost in a power cut leaves the item in its queue, which is what
        recovery would do with it anyway.
        """
        src = self.path(queue, item_id)
        dst = src.with_name(src.name + WORK)
        try:
            with self._lock(item_id):   # (place_picture looks for either name)
                os.rename(src, dst)
        except FileNotFoundError:
            return None
        return Claimed(queue, item_id, dst)

    def unclaim(self, item: Claimed) -> None:
        with self._lock(item.id):
            os.rename(item.path, self.path(item.queue, item.id))
        fsync_dir(item.path.parent)

    def pass_on(self, item: Claimed, next_queue: str, *, durable: bool = True) -> Path:
        """Move a claimed item (and its companions) to ``next_queue``.

        ``durable=False`` skips the folder fsyncs, for moves whose outcome is already recorded
        elsewhere (the uploader's database says "delivered" before the move to sent/).
        """
        dest_dir = self.dir(next_queue)
        dest_dir.mkdir(parents=True, exist_ok=True)
        with self._lock(item.id):
            for comp in self.companions(item.queue, item.id):
                os.replace(comp, dest_dir / comp.name)
            dest = dest_dir / f"{item.id}{self.suffix}"
            os.replace(item.path, dest)
        if durable:
            fsync_dir(dest_dir)
            fsync_dir(item.path.parent)
        return dest

    def pass_on_replaced(self, item: Claimed, next_queue: str, data: bytes) -> Path:
        """Move a claimed item on with new content (the route stage's compressed file): companions
        first, then the new ``<id>`` published atomically (the commit point), then the input removed.
        A crash before the publish leaves the item to redo; after it, recovery drops the input."""
        dest_dir = self.dir(next_queue)
        dest_dir.mkdir(parents=True, exist_ok=True)
        with self._lock(item.id):
            for comp in self.companions(item.queue, item.id):
                os.replace(comp, dest_dir / comp.name)
            dest = self.publish(next_queue, item.id, lambda fh: fh.write(data))
            item.path.unlink(missing_ok=True)
        fsync_dir(item.path.parent)
        return dest

    def rewrite_claimed(self, item: Claimed, data: bytes) -> Path:
        """New content for a claimed item, in place (the uploader's decoded copy of a file whose encoding
        the destination refused): written under a temp name, fsynced, renamed over the claim, the folder
        fsynced.  A crash leaves the old content or the new, whole."""
        return atomic_write(item.path, lambda fh: fh.write(data))

    def finish(self, item: Claimed) -> None:
        """Done with a claimed item whose output has been published elsewhere: remove it."""
        with self._lock(item.id):
            for comp in self.companions(item.queue, item.id):
                comp.unlink(missing_ok=True)
            item.path.unlink(missing_ok=True)
        fsync_dir(item.path.parent)

    def quarantine(self, item: Claimed, stage: str, reason: str, error_class: str,
                   attempts: int = 1, retry: str | None = None) -> Path:
        """Park a claimed item in ``quarantine/<stage>/`` with a ``.reason.json``.

        ``reason`` must be free of patient data (it is written by this package).
        """
        qdir = self.quarantine_dir(stage)
        qdir.mkdir(parents=True, exist_ok=True)
        info = {
            "id": item.id,
            "stage": stage,
            "from_queue": item.queue,
            "error_class": error_class,
            "reason": reason,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "attempts": attempts,
            "retry": retry or f"fix the cause, then run: medsendx-edge requeue {item.id}",
        }
        write_json_atomic(qdir / f"{item.id}{REASON}", info)
        dest = qdir / f"{item.id}{self.suffix}"
        with self._lock(item.id):
            for comp in self.companions(item.queue, item.id):
                comp.unlink(missing_ok=True)
            if item.path.is_symlink() or item.path.exists():
                os.replace(item.path, dest)
        fsync_dir(qdir)
        fsync_dir(item.path.parent)
        self._tell(self.quarantine_listeners, item.id)
        return dest

    @staticmethod
    def _tell(listeners: list[Callable[[str], object]], item_id: str) -> None:
        for listener in listeners:
            try:
                listener(item_id)
            except Exception:  # noqa: BLE001, S110 - the listener's own reconciliation catches up (its docstring)
                pass

    def in_quarantine(self, stage: str, item_id: str) -> bool:
        """Is the quarantined file itself there (not only its reason)?"""
        path = self.quarantine_dir(stage) / f"{item_id}{self.suffix}"
        return path.exists() or path.is_symlink()

    def holds(self, item_id: str) -> bool:
        """Is ``item_id`` in a queue (waiting, claimed, or sent)?"""
        paths = (self.dir(q) / f"{item_id}{self.suffix}{tail}" for q in PIPELINE for tail in ("", WORK))
        return any(path.exists() or path.is_symlink() for path in paths)

    def prune(self, queue: str, older_than: float) -> int:
        """Remove the items of ``queue`` (``sent/``) last touched before ``older_than`` (epoch seconds),
        each with all its companions (picture, sidecar): companions first, the item last, so an item is
        never left without its picture while a picture outlives its item.  Returns how many."""
        removed: list[str] = []
        d = self.dir(queue)
        for item_id in self.ready(queue):
            path = self.path(queue, item_id)
            try:
                if path.stat().st_mtime >= older_than:
                    continue
            except FileNotFoundError:
                continue
            with self._lock(item_id):
                for comp in self.companions(queue, item_id):
                    comp.unlink(missing_ok=True)
                path.unlink(missing_ok=True)
            removed.append(item_id)
        try:
            self.state.forget_recoveries(removed)
        except sqlite3.OperationalError:
            pass   # a full disk (pruning is how the disk guard makes room): the counts are only left over
        # Companions whose item is gone (left by an older version, or a crash between the unlinks).
        live = set(self.ready(queue))
        try:
            names = os.listdir(d)
        except FileNotFoundError:  # nothing was ever delivered here
            names = []
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext in COMPANIONS and is_id(stem) and stem not in live:
                # under the item's lock, and only if its item is still not there: a move into this queue (the
                # uploader's, companions first) may have brought them since the listing
                with self._lock(stem):
                    try:
                        if (d / name).stat().st_mtime < older_than and not self.path(queue, stem).exists():
                            (d / name).unlink()
                    except FileNotFoundError:
                        pass
        if removed:
            fsync_dir(d)
        return len(removed)

    def reason(self, stage: str, item_id: str) -> dict[str, Any]:
        info: dict[str, Any] = json.loads((self.quarantine_dir(stage) / f"{item_id}{REASON}").read_text())
        return info

    def requeue(self, item_id: str) -> str:
        """Put a quarantined item back in the queue it came from; returns that queue."""
        for stage, qid in self.quarantined():
            if qid != item_id:
                continue
            qdir = self.quarantine_dir(stage)
            info = self.reason(stage, item_id)
            queue = str(info.get("from_queue", INCOMING))
            if queue not in PIPELINE:
                queue = INCOMING
            src = qdir / f"{item_id}{self.suffix}"
            if not (src.exists() or src.is_symlink()):
                raise FileNotFoundError(f"quarantined file for {item_id} is missing")
            dest_dir = self.dir(queue)
            dest_dir.mkdir(parents=True, exist_ok=True)
            self.state.reset_recoveries(item_id)
            os.replace(src, dest_dir / f"{item_id}{self.suffix}")
            fsync_dir(dest_dir)
            (qdir / f"{item_id}{REASON}").unlink()
            fsync_dir(qdir)
            self._tell(self.requeue_listeners, item_id)
            return queue
        raise KeyError(item_id)

    # ---------------------------------------------------------------- recovery
    def _others_waiting(self, item_id: str) -> bool:
        return any(r.id != item_id for r in self.state.due(float("inf"), limit=2))

    def recover(self, file_fault: bool = True, blamed: Collection[str] | None = None) -> dict[str, int]:
        """Run once at start, before any worker: see the module docstring.

        ``file_fault``: the previous process died of something a file in flight can cause (a fatal signal,
        an out-of-memory kill: :func:`medsendx_edge.deaths.previous_death`); False when it left no trace.
        ``blamed``: the items (``<queue>:<id>``) such a death is blamed on (:func:`medsendx_edge.deaths.blamed`:
        the one the crashed thread had in hand); None: every item in flight in the stages (an upload is
        counted only when it is named)."""
        self.ensure_layout()
        stats = {"temp_removed": 0, "requeued": 0, "dropped_done": 0, "quarantined": 0}
        stats["adoptions_finished"] = self._recover_adoptions()
        for n in os.listdir(self.root):   # a fleet shipment's staging folder a crash left (fleet/ship.py)
            if n.startswith(".staging-") and (self.root / n).is_dir():
                shutil.rmtree(self.root / n, ignore_errors=True)
                stats["temp_removed"] += 1
        scratch = self.scratch_dir()
        if scratch.is_dir():
            for n in os.listdir(scratch):  # receptions cut short: the sender was never told Success
                (scratch / n).unlink(missing_ok=True)
                stats["temp_removed"] += 1
        dirs = [self.dir(q) for q in PIPELINE] + [self.root / QUARANTINE / s for s in
                                                  _listdirs(self.root / QUARANTINE)] + [self.root / "state"]
        for d in dirs:
            for n in os.listdir(d):
                if n.startswith(TMP_PREFIX):
                    (d / n).unlink(missing_ok=True)
                    stats["temp_removed"] += 1
            fsync_dir(d)
        for queue in PIPELINE:
            for item_id in self.claimed(queue):
                item = Claimed(queue, item_id, self.dir(queue) / f"{item_id}{self.suffix}{WORK}")
                if self.exists_after(queue, item_id):
                    self.finish(item)
                    stats["dropped_done"] += 1
                    continue
                key = f"{queue}:{item_id}"
                at_fault = file_fault and (blamed is None or key in blamed)
                if queue == OUTBOX:
                    row = self.state.item(item_id)
                    if at_fault and blamed is not None and row is not None and row.state == UploadState.QUEUED:
                        # The uploader's own thread died on it (a decoder, sending a refused syntax decoded; an
                        # out-of-memory kill with it alone in hand): counted like any stage's crash, or it is
                        # retried first after every restart and nothing behind it is sent.
                        count = self.state.bump_recoveries(f"{item_id}:upload")
                        if count >= self.max_recoveries:
                            why = f"crashed the daemon repeatedly ({count} recoveries)"
                            self.state.set_state(item_id, UploadState.QUARANTINED, why)
                            self.quarantine(item, "upload", why, "CrashLoop", attempts=count)
                            stats["quarantined"] += 1
                            continue
                    # An upload in flight when the power went is the normal life of a truck on 4G, not a poison
                    # file: it goes back to the queue however often it happens, never to quarantine.  It counts
                    # as an attempt: the destination may hold it already, and is asked before a re-send.  After
                    # the second death with it in hand it waits a little, growing, when other uploads are waiting
                    # (never a recheck or a high-priority one): an upload that kills the daemon with no trace
                    # (out of memory in a container) cannot hold the queue for ever.
                    self.unclaim(item)
                    times = self.state.bump_recoveries(f"{item_id}:upload:{INTERRUPTED}")
                    if times >= 2 and row is not None and row.state == UploadState.QUEUED \
                            and row.priority >= Priority.NORMAL and self._others_waiting(item_id):
                        self.state.defer(item_id, time.time() + min(600.0, 5.0 * 2 ** min(times - 2, 7)),
                                         f"in flight at {times} deaths of the daemon: the rest of the queue first")
                    else:
                        self.state.mark_interrupted(item_id)
                    stats["requeued"] += 1
                    continue
                # Counted per stage: a file interrupted once in each of three stages is bad luck
                # (three power cuts), not a poison file.
                # Keyed by the stage that reads the queue now: a file that crashed triage twice, then met
                # the route stage after triage was turned off, has not crashed route yet.
                # A death that left no trace (SIGKILL, power cut), or a crash of another thread, is counted
                # apart, to a higher bar: it lands on whatever is in flight, often the same first file after
                # each start (:mod:`medsendx_edge.deaths`).
                stage = self.stage_of_queue.get(queue, queue)
                if at_fault:
                    count, bar = self.state.bump_recoveries(f"{item_id}:{stage}"), self.max_recoveries
                    why = f"crashed the daemon repeatedly ({count} recoveries)"
                else:
                    count, bar = self.state.bump_recoveries(f"{item_id}:{stage}:{INTERRUPTED}"), self.max_interruptions
                    why = (f"in flight at {count} deaths of the daemon not blamed on it (SIGKILL, power cut, a "
                           "crash or an out-of-memory kill that named no file, or another)")
                if count >= bar and queue in self.skip_on_crash_loop:
                    # An optional stage (triage) crash-looped: pass the file on, its reason beside it.
                    if self.on_skip is not None:
                        write_json_atomic(self.dir(queue) / f"{item_id}.json", self.on_skip(item_id, why))
                    self.pass_on(item, self.skip_on_crash_loop[queue])
                    stats["skipped"] = stats.get("skipped", 0) + 1
                elif count >= bar:
                    self.quarantine(item, stage, why, "CrashLoop" if at_fault else "InterruptLoop", attempts=count)
                    stats["quarantined"] += 1
                else:
                    self.unclaim(item)
                    stats["requeued"] += 1
        return stats


def _listdirs(path: Path) -> list[str]:
    try:
        return [n for n in os.listdir(path) if (path / n).is_dir()]
    except FileNotFoundError:
        return []


#: The stage that consumes each queue with triage on (quarantine folders are named by stage); the daemon
#: passes the declared graph's own map (:mod:`medsendx_edge.pipeline`).
STAGE_OF_QUEUE = {INCOMING: "anonymize", ANONYMIZED: "triage", TRIAGED: "route", OUTBOX: "upload", SENT: "sent"}
