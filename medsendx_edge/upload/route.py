"""The route stage: the last processed queue -> outbox/, registered in the durable upload queue.

The database row is written first (idempotent), the rename second: a crash in
between leaves the item in its queue, and the next run inserts nothing new.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass


from medsendx_edge.anonymize.dicomio import sop_instance_uid
from medsendx_edge.config import DestinationConfig
from medsendx_edge.errors import QuarantineError
from medsendx_edge.spool import ANONYMIZED, OUTBOX, SENT, Claimed, Spool
from medsendx_edge.stage import Output, Result, Stage
from medsendx_edge.vocabulary import Priority


def file_digest(path) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def item_priority(spool: Spool, queue: str, item_id: str) -> Priority:
    """The priority triage wrote in ``<id>.json`` beside the file, else normal."""
    return Priority.of(spool.sidecar(item_id, queue).get("priority"))


class RouteStage(Stage):
    name = "route"
    output_queue = OUTBOX

    def __init__(self, spool: Spool, input_queue: str = ANONYMIZED,
                 exam_priority: Callable[[str], Priority | None] | None = None, compression: str = "none",
                 destination: DestinationConfig | None = None) -> None:
        super().__init__(spool)
        self.input_queue = input_queue
        self.exam_priority = exam_priority  # the exam's priority, which may have risen since triage
        self.compression = compression      # the destination's lossless codec (upload/compress.py)
        self.destination_key: str | None = None
        if destination is not None:
            self.reconfigure(destination)

    def reconfigure(self, destination: DestinationConfig) -> None:
        from medsendx_edge.upload.compress import destination_key

        self.compression = destination.compression
        self.destination_key = destination_key(destination)

    def codec(self) -> str:
        """The configured codec, or none once the destination refused its syntax (the uploader learned it)."""
        if self.compression == "none" or self.destination_key is None:
            return self.compression
        from medsendx_edge.upload.compress import CODECS, refused_syntaxes

        refused = refused_syntaxes(self.spool.state, self.destination_key)
        return "none" if str(CODECS[self.compression]) in refused else self.compression

    def _follow_exam(self, item_id: str, priority: Priority) -> None:
        """Triage runs in its own thread: an exam may have turned urgent between the read above and the
        enqueue, after triage raised the rows already queued.  Looking again once the row exists closes
        that window (either this look sees the new priority, or triage's raise saw this row)."""
        exam = self.exam_priority(item_id) if self.exam_priority else None
        if exam is not None and exam < priority:
            self.spool.state.raise_priority([item_id], exam)

    def _instance(self, item: Claimed, recorded: str | None) -> str:
        uid = recorded or sop_instance_uid(item.path)
        if uid is None:  # our own anonymized output: should never happen
            raise QuarantineError("the anonymized file has no readable SOPInstanceUID",
                                  error_class="NoSOPInstance")
        return uid

    def _same_id(self, item: Claimed, digest: str) -> None:
        """An item queued before under this id with other bytes: a stage redone after a crash made it again
        differently (the triage SR of an exam that changed in between).  The queued copy may be sent or
        delivered already; this one is not sent under a row that describes the other."""
        row = self.spool.state.item(item.id)
        if row is not None and row.sha256 != digest:
            raise QuarantineError(
                f"conflict: item {item.id} was queued before with other content (made again by a stage redone "
                "after a crash); the first copy is the one sent", error_class="InstanceConflict")

    def _copy_of(self, item: Claimed, sop_uid: str, digest: str, size: int, priority: Priority) -> Result | None:
        """None when no other item is this instance; a Result when this one is an exact copy of an item
        already queued or delivered (recorded, moved to sent/, never sent twice); a QuarantineError when
        it is the same SOP Instance UID with other content (a PACS keeps the first copy of a UID and
        answers success to the second: sent, it would be counted delivered and lost)."""
        holder = self.spool.state.instance_holder(sop_uid, item.id)
        if holder is None:
            return None
        other, other_digest = holder
        encoding = other_digest != digest
        if encoding and not self._same_image(other, item):
            raise QuarantineError(
                f"conflict: item {other} has the same SOP Instance UID with other content (other pixels or other "
                "elements); a PACS keeps the first and answers success to the second, so this one is not sent "
                "(check the modality's UIDs)",
                error_class="InstanceConflict")
        self.spool.state.record_duplicate(item.id, size, digest, sop_uid, other,   # the record first, then the move
                                          encoding=encoding)
        return Result.done(Output(to=SENT), priority=priority.label, bytes=0, duplicate_of=other)

    def _same_image(self, other: str, item: Claimed) -> bool:
        """The queued or delivered copy of this SOP instance holds the same pixel values as this file, in
        another encoding: the uploader decoded it for a destination that refused its compression (its row
        then holds the decoded file's hash), and this is the modality sending the image again."""
        import numpy as np
        import pydicom

        for path in (self.spool.path(OUTBOX, other), self.spool.path(SENT, other),
                     self.spool.path(OUTBOX, other).with_name(self.spool.path(OUTBOX, other).name + ".work")):
            # the uploader may hold it claimed (``.work``) for the whole of a long send
            if not path.exists():
                continue
            try:
                a, b = pydicom.dcmread(path), pydicom.dcmread(item.path)
                if not np.array_equal(a.pixel_array, b.pixel_array):
                    return False
                for ds in (a, b):   # and every other element the same: only the encoding differs
                    del ds.PixelData
                return bool(a == b)
            except Exception:  # noqa: BLE001 - what cannot be compared is not the same
                return False
        return False

    def process(self, item: Claimed) -> Result:
        """The instance, size and hash come from what anonymize (or triage, for its SR) recorded when it
        wrote the file; the file is read only where they are missing (a crash between the write and the
        record, a file from before they were recorded) or where it is re-encoded."""
        recorded_uid, recorded_size, recorded_digest = self.spool.state.facts(item.id)
        sop_uid = self._instance(item, recorded_uid)
        priority = item_priority(self.spool, self.input_queue, item.id)
        exam = self.exam_priority(item.id) if self.exam_priority else None
        if exam is not None and exam < priority:
            priority = exam
        codec = self.codec()
        if codec != "none":
            from medsendx_edge.upload.compress import compress_file

            packed = compress_file(item.path, codec)
            if packed.data is not None:
                data = packed.data
                digest = hashlib.sha256(data).hexdigest()
                self._same_id(item, digest)
                copy = self._copy_of(item, sop_uid, digest, len(data), priority)
                if copy is not None:
                    return copy
                # The queue records what is sent: the compressed file's size and hash.
                return Result.done(Output(data=data), priority=priority.label, bytes=len(data),
                                   transfer_syntax=packed.note, after=_Row(priority, len(data), digest, sop_uid))
        if recorded_size is not None and recorded_digest is not None:
            size, digest = recorded_size, recorded_digest
        else:
            size, digest = file_digest(item.path)
        self._same_id(item, digest)
        copy = self._copy_of(item, sop_uid, digest, size, priority)
        if copy is not None:
            return copy
        return Result.done(Output(), priority=priority.label, bytes=size, after=_Row(priority, size, digest, sop_uid))

    def placed(self, item: Claimed, result: Result) -> None:
        """The file is in the outbox: now its queue row (the uploader never sees a row without its file)."""
        row = result.after
        if not isinstance(row, _Row):   # a duplicate, moved to sent/ and recorded before
            return
        self.spool.state.enqueue(item.id, row.priority, row.size, row.sha256, sop_uid=row.sop_uid)
        self._follow_exam(item.id, row.priority)


@dataclass(frozen=True)
class _Row:
    """The upload queue row of an item the runner has just placed in the outbox."""

    priority: Priority
    size: int
    sha256: str
    sop_uid: str
