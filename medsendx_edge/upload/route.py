"""The route stage: the last processed queue -> outbox/, registered in the durable upload queue.

The database row is written first (idempotent), the rename second: a crash in
between leaves the item in its queue, and the next run inserts nothing new.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable


from medsendx_edge.anonymize.dicomio import sop_instance_uid
from medsendx_edge.errors import QuarantineError
from medsendx_edge.spool import ANONYMIZED, OUTBOX, SENT, Claimed, Spool
from medsendx_edge.stage import Result, Stage
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
    meta = spool.dir(queue) / f"{item_id}.json"
    try:
        value = json.loads(meta.read_text()).get("priority")
    except (OSError, ValueError, AttributeError):
        return Priority.NORMAL
    return Priority.of(value)


class RouteStage(Stage):
    name = "route"
    output_queue = OUTBOX

    def __init__(self, spool: Spool, input_queue: str = ANONYMIZED,
                 exam_priority: Callable[[str], Priority | None] | None = None, compression: str = "none") -> None:
        super().__init__(spool)
        self.input_queue = input_queue
        self.exam_priority = exam_priority  # the exam's priority, which may have risen since triage
        self.compression = compression      # the destination's lossless codec (upload/compress.py)

    def _follow_exam(self, item_id: str, priority: Priority) -> None:
        """Triage runs in its own thread: an exam may have turned urgent between the read above and the
        enqueue, after triage raised the rows already queued.  Looking again once the row exists closes
        that window (either this look sees the new priority, or triage's raise saw this row)."""
        exam = self.exam_priority(item_id) if self.exam_priority else None
        if exam is not None and exam < priority:
            self.spool.state.raise_priority([item_id], exam)

    def _instance(self, item: Claimed) -> str:
        uid = sop_instance_uid(item.path)
        if uid is None:  # our own anonymized output: should never happen
            raise QuarantineError("the anonymized file has no readable SOPInstanceUID",
                                  error_class="NoSOPInstance")
        return uid

    def _copy_of(self, item: Claimed, sop_uid: str, digest: str, size: int, priority: Priority) -> Result | None:
        """None when no other item is this instance; a Result when this one is an exact copy of an item
        already queued or delivered (recorded, moved to sent/, never sent twice); a QuarantineError when
        it is the same SOP Instance UID with other content (a PACS keeps the first copy of a UID and
        answers success to the second: sent, it would be counted delivered and lost)."""
        holder = self.spool.state.instance_holder(sop_uid, item.id)
        if holder is None:
            return None
        other, other_digest = holder
        if other_digest != digest:
            raise QuarantineError(
                f"conflict: item {other} has the same SOP Instance UID with other content (other pixels, or the "
                "same in another encoding); a PACS keeps the first and answers success to the second, so this "
                "one is not sent (check the modality's UIDs)",
                error_class="InstanceConflict")
        self.spool.state.record_duplicate(item.id, size, digest, sop_uid, other)
        self.spool.pass_on(item, SENT)
        return Result.done(priority=priority.label, bytes=0, duplicate_of=other)

    def process(self, item: Claimed) -> Result:
        sop_uid = self._instance(item)
        priority = item_priority(self.spool, self.input_queue, item.id)
        exam = self.exam_priority(item.id) if self.exam_priority else None
        if exam is not None and exam < priority:
            priority = exam
        if self.compression != "none":
            from medsendx_edge.upload.compress import compress_file

            packed = compress_file(item.path, self.compression)
            if packed.data is not None:
                data = packed.data
                digest = hashlib.sha256(data).hexdigest()
                copy = self._copy_of(item, sop_uid, digest, len(data), priority)
                if copy is not None:
                    return copy
                # The file first, then its queue row (the uploader never sees a row without its file);
                # the queue records what is sent: the compressed file's size and hash.
                self.spool.pass_on_replaced(item, self.output_queue, data)
                self._enqueue(item.id, priority, len(data), digest, sop_uid)
                return Result.done(priority=priority.label, bytes=len(data), transfer_syntax=packed.note)
        size, digest = file_digest(item.path)
        copy = self._copy_of(item, sop_uid, digest, size, priority)
        if copy is not None:
            return copy
        self.forward(item)
        self._enqueue(item.id, priority, size, digest, sop_uid)
        return Result.done(priority=priority.label, bytes=size)

    def _enqueue(self, item_id: str, priority: Priority, size: int, digest: str, sop_uid: str) -> None:
        self.spool.state.enqueue(item_id, priority, size, digest, sop_uid=sop_uid)
        self._follow_exam(item_id, priority)
