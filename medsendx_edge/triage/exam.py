"""The exam as radiologists read it: per breast (CC and MLO together) and per exam (the images of one
study), built up as images stream in.

* **Per breast**: the mean percent dense of that side's views (CC and MLO see the same breast).
* **Per exam**: the denser breast, as radiologists report density; its BI-RADS category; an
  **asymmetry** flag when the two breasts differ by ``triage.asymmetry_pd`` or more.
* **Priority**: the exam's priority (``high`` for category c or d, or an asymmetry) is applied to every
  image of the exam still waiting in the upload queue; an image's own ``recheck`` stays immediate and
  per image (the woman is still on the truck).
* **When is an exam complete?** In a streaming daemon nobody says "this study is finished".  An exam
  counts as complete once the four screening views (RCC, LCC, RMLO, LMLO) are in, or once no image
  has joined it for ``EXAM_QUIET_S`` (10 minutes: longer than a screening exam's gaps between views).
  Before that the summary is marked ``partial`` and may still rise in urgency (never fall): a later
  dense view raises the earlier views' queue priority.

No patient data: the exam key is a hash of the pseudonymized StudyInstanceUID.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsendx_edge.state import SQLiteFile
from medsendx_edge.triage.analysis import birads

EXAM_QUIET_S = 600.0
SCREENING_VIEWS = {("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")}


@dataclass
class ExamSummary:
    exam: str
    images: list[str] = field(default_factory=list)
    views: list[str] = field(default_factory=list)            # "RCC", "LMLO", ...
    breast_pd: dict[str, float] = field(default_factory=dict)  # "L"/"R" -> mean pd of the side's views
    pd: float | None = None
    category: str | None = None
    asymmetry: bool = False
    complete: bool = False
    priority: str = "normal"
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"exam": self.exam, "images": len(self.images), "views": self.views,
                "breast_pd": self.breast_pd, "pd": self.pd, "category": self.category,
                "asymmetry": self.asymmetry, "status": "complete" if self.complete else "partial",
                "priority": self.priority, "reasons": self.reasons}


class ExamBook(SQLiteFile):
    """Per-image triage results grouped by exam (``<spool>/state/exams.db``)."""

    def __init__(self, path: Path, thresholds: tuple[float, ...] = (0.25, 0.5, 0.75),
                 asymmetry_pd: float = 0.15) -> None:
        super().__init__(path)
        self.thresholds, self.asymmetry_pd = thresholds, asymmetry_pd
        self._conn().execute(
            "CREATE TABLE IF NOT EXISTS exam_images (id TEXT PRIMARY KEY, exam TEXT NOT NULL, laterality TEXT, "
            "view TEXT, pd REAL, implant INTEGER, recorded REAL NOT NULL)")
        self._conn().execute("CREATE INDEX IF NOT EXISTS exam_images_exam ON exam_images (exam)")

    def record(self, item_id: str, sidecar: dict[str, Any], now: float | None = None) -> ExamSummary | None:
        exam = sidecar.get("exam")
        if not exam or sidecar.get("triage") != "done":
            return None
        self._conn().execute(
            "INSERT OR REPLACE INTO exam_images (id, exam, laterality, view, pd, implant, recorded) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (item_id, exam, sidecar.get("laterality"), sidecar.get("view"), sidecar.get("pd"),
             1 if (sidecar.get("metrics") or {}).get("implant") else 0, time.time() if now is None else now))
        return self.summary(exam, now)

    def exam_of(self, item_id: str) -> str | None:
        row = self._conn().execute("SELECT exam FROM exam_images WHERE id = ?", (item_id,)).fetchone()
        return None if row is None else str(row[0])

    def summary(self, exam: str, now: float | None = None) -> ExamSummary:
        now = time.time() if now is None else now
        rows = self._conn().execute(
            "SELECT id, laterality, view, pd, implant, recorded FROM exam_images WHERE exam = ? ORDER BY recorded",
            (exam,)).fetchall()
        out = ExamSummary(exam, images=[r[0] for r in rows])
        seen: set[tuple[str, str]] = set()
        sides: dict[str, list[float]] = {}
        implant = False
        for _id, lat, view, pd, imp, _t in rows:
            lat, view = (lat or "").upper(), (view or "").upper()
            if lat and view:
                seen.add((lat, view))
            implant |= bool(imp)
            if pd is not None and lat in ("L", "R") and not imp:
                sides.setdefault(lat, []).append(float(pd))
        out.views = sorted(f"{lat}{view}" for lat, view in seen)
        out.breast_pd = {lat: sum(v) / len(v) for lat, v in sorted(sides.items())}
        if out.breast_pd:
            out.pd = max(out.breast_pd.values())
            out.category = birads(out.pd, self.thresholds)
        if len(out.breast_pd) == 2 and abs(out.breast_pd["L"] - out.breast_pd["R"]) >= self.asymmetry_pd:
            out.asymmetry = True
            out.reasons.append(f"asymmetry: left {out.breast_pd['L'] * 100:.0f}% and right "
                               f"{out.breast_pd['R'] * 100:.0f}% dense")
        if out.category in ("c", "d"):
            out.reasons.append(f"dense breasts (BI-RADS {out.category}): supplemental screening")
        if implant:
            out.reasons.append("implant in the exam: density of the implant views not comparable")
        out.priority = "high" if out.asymmetry or out.category in ("c", "d") else "normal"
        last = max((r[5] for r in rows), default=now)
        out.complete = SCREENING_VIEWS <= seen or now - last >= EXAM_QUIET_S
        return out
