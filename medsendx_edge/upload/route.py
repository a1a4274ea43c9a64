"""The route stage: the last processed queue -> outbox/, registered in the durable upload queue.

The database row is written first (idempotent), the rename second: a crash in
between leaves the item in its queue, and the next run inserts nothing new.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from medsendx_edge.spool import ANONYMIZED, OUTBOX, Claimed, Spool
from medsendx_edge.stage import Result, Stage
from medsendx_edge.state import PRIORITIES


def file_digest(path) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def item_priority(spool: Spool, queue: str, item_id: str) -> str:
    """The priority triage wrote in ``<id>.json`` beside the file, else ``normal``."""
    meta = spool.dir(queue) / f"{item_id}.json"
    try:
        value = json.loads(meta.read_text()).get("priority", "normal")
    except (OSError, ValueError, AttributeError):
        return "normal"
    return value if value in PRIORITIES else "normal"


class RouteStage(Stage):
    name = "route"
    output_queue = OUTBOX

    def __init__(self, spool: Spool, input_queue: str = ANONYMIZED,
                 exam_priority: Callable[[str], str | None] | None = None, compression: str = "none") -> None:
        super().__init__(spool)
        self.input_queue = input_queue
        self.exam_priority = exam_priority  # the exam's priority, which may have risen since triage
        self.compression = compression      # the destination's lossless codec (upload/compress.py)

    def _follow_exam(self, item_id: str, priority: str) -> None:
        """Triage runs in its own thread: an exam may have turned urgent between the read above and the
        enqueue, after triage raised the rows already queued.  Looking again once the row exists closes
        that window (either this look sees the new priority, or triage's raise saw this row)."""
        exam = self.exam_priority(item_id) if self.exam_priority else None
        if exam in PRIORITIES and PRIORITIES[exam] < PRIORITIES[priority]:
            self.spool.state.raise_priority([item_id], PRIORITIES[exam])

    def process(self, item: Claimed) -> Result:
        priority = item_priority(self.spool, self.input_queue, item.id)
        exam = self.exam_priority(item.id) if self.exam_priority else None
        if exam in PRIORITIES and PRIORITIES[exam] < PRIORITIES[priority]:
            priority = exam
        if self.compression != "none":
            from medsendx_edge.upload.compress import compress_file

            packed = compress_file(item.path, self.compression)
            if packed.data is not None:
                data = packed.data
                # The file first, then its queue row (the uploader never sees a row without its file);
                # the queue records what is sent: the compressed file's size and hash.
                self.spool.pass_on_replaced(item, self.output_queue, data)
                self.spool.state.enqueue(item.id, PRIORITIES[priority], len(data), hashlib.sha256(data).hexdigest())
                self._follow_exam(item.id, priority)
                return Result.done(priority=priority, bytes=len(data), transfer_syntax=packed.note)
        size, digest = file_digest(item.path)
        self.forward(item)
        self.spool.state.enqueue(item.id, PRIORITIES[priority], size, digest)
        self._follow_exam(item.id, priority)
        return Result.done(priority=priority, bytes=size)
