"""The pictures that can wait: drawn while the triage is idle, after their image has moved on.

A picture is for the people on the truck and the radiologist's console; the delivery does not wait for it.
In a burst (a four-view exam arriving at once, a backlog drained after an outage) drawing it took a fifth
of the triage's CPU (about 27 ms of 140 ms an image, on the 2 cores the anonymizer, the uploader and the
PACS share), so on the daemon the image goes on without it and its picture is drawn here, in one thread of
its own, whenever the triage has nothing in hand.  What must not wait is drawn at once, in the triage, as
before: an image whose priority is ``recheck`` (the radiographer acts on it while the woman is on the
truck), and every picture when ``triage.send_overlay`` makes it an object that is sent.

* **Bounded.** A waiting picture keeps its :class:`~medsendx_edge.triage.picture.PictureSource` (about
  1.6 MB); past ``max_waiting`` (24) of them the desk draws even while the triage works, so a long backlog
  lags about that many pictures behind; twice as many are held at most (77 MB), beyond which the triage
  draws its own as before.
* **Where the image is now.** The picture is written beside its image wherever it has got to (triaged/,
  outbox/ or sent/), under the spool's lock for that item, which every move of an item and its companions
  holds too (:meth:`Spool.place_picture`): a picture never lands beside a file that has just left.  An
  image that left the queues (quarantined, pruned) gets none.
* **Nothing lost to a stop.** A stop draws what is waiting before the daemon exits (``run --once`` too,
  before it returns); a crash or a power cut loses the waiting pictures, and the next start draws them
  again from their images (:meth:`TriageStage.missing_pictures`), at most ``max_recoveries`` times each
  (a picture whose drawing kills the daemon is given up, not a crash loop; the image being drawn is
  noted in hand, so a fatal record names it).

Rendering, not waiting, is the work: the thread waits on a condition the triage side signals, never on
a timer.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from medsendx_edge.logs import get_logger

#: The desk's name for what it has in hand (deaths.InHand: ``pictures:<id>``): a death blamed on it is counted.
PICTURES = "pictures"

#: Pictures waiting before the desk draws while the triage works (about 1.6 MB each); twice as many are held at
#: most: beyond that the triage draws its own (77 MB at most).
MAX_WAITING = 24


@dataclass
class Job:
    item_id: str
    draw: Callable[[], bytes | None]   # the picture's bytes (None: nothing to show after all)


class PictureDesk:
    """One thread that draws the deferred pictures while the triage is idle (see the module's text)."""

    def __init__(self, place: Callable[[str, bytes], object], max_waiting: int = MAX_WAITING,
                 holding: Callable[[str, str], AbstractContextManager[None]] | None = None) -> None:
        self.place = place                   # Spool.place_picture
        # the spool's InHand.holding: the image this thread draws is noted, so a fatal crash names it
        self.holding = holding or (lambda _queue, _item_id: nullcontext())
        self.max_waiting = max_waiting
        self.log = get_logger(stage="pictures")
        self._jobs: deque[Job] = deque()
        self._queued: set[str] = set()
        self._cv = threading.Condition()
        self._busy = False
        self._drawing = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.drawn = 0

    # ------------------------------------------------------------ state
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def waiting(self) -> int:
        with self._cv:
            return len(self._jobs) + (1 if self._drawing else 0)

    def busy(self, flag: bool) -> None:
        """The triage side says whether it has work in hand (True) or waits for more (False)."""
        with self._cv:
            if self._busy != flag:
                self._busy = flag
                self._cv.notify_all()

    # ------------------------------------------------------------ work in
    def defer(self, item_id: str, draw: Callable[[], bytes | None]) -> bool:
        """Queue the picture of ``item_id`` (already placed); False when the desk is not running, or twice
        ``max_waiting`` wait (the caller draws it itself).  An item queued twice (a crash's redo beside a live one) is drawn once."""
        with self._cv:
            if not self.running or len(self._jobs) >= 2 * self.max_waiting:
                return False   # (the thread drew too slowly to keep up: the triage draws, memory stays bounded)
            if item_id not in self._queued:
                self._jobs.append(Job(item_id, draw))
                self._queued.add(item_id)
                self._cv.notify_all()
            return True

    # ------------------------------------------------------------ the thread
    def start(self) -> None:
        with self._cv:
            thread = self._thread
            if thread is not None and thread.is_alive() and not self._stopping:
                return
        if thread is not None:
            thread.join()   # a stop that timed out: its thread finishes what it holds first
        with self._cv:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="pictures", daemon=True)
            self._thread.start()

    def _may_draw(self) -> bool:
        return bool(self._jobs) and (self._stopping or not self._busy or len(self._jobs) > self.max_waiting)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._may_draw():
                    if self._stopping and not self._jobs:
                        return
                    self._cv.wait()
                job = self._jobs.popleft()
                self._drawing = True
            try:
                self._draw(job)
            finally:
                with self._cv:
                    self._queued.discard(job.item_id)
                    self._drawing = False
                    self._cv.notify_all()

    def _draw(self, job: Job) -> None:
        try:
            with self.holding(PICTURES, job.item_id):
                png = job.draw()
                if png is None:
                    return
                where = self.place(job.item_id, png)
        except Exception as exc:  # noqa: BLE001 - a picture never stops the daemon; the image is delivered anyway
            self.log.error("picture_failed", file_id=job.item_id, error_class=type(exc).__name__, exc_info=exc)
            return
        self.drawn += 1
        if where is None:
            self.log.info("picture_dropped", file_id=job.item_id, reason="the image has left the queues")

    def stop(self, timeout: float | None = 30.0) -> int:
        """Draw what is waiting (the triage's busy flag no longer holds it back), then end the thread.
        Returns the pictures still waiting when ``timeout`` ran out (the next start draws them again)."""
        with self._cv:
            thread = self._thread
            self._stopping = True
            self._cv.notify_all()
        if thread is not None:
            thread.join(timeout)
        with self._cv:
            left = len(self._jobs) + (1 if self._drawing else 0)
            if thread is None or not thread.is_alive():
                self._thread = None
        if left:
            self.log.warning("pictures_not_drawn", count=left,
                             reason="the stop's time ran out: the next start draws them from their images")
        return left
