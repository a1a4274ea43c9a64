"""The exam as radiologists read it: per breast (CC and MLO together) and per exam (the images of one
study), built up as images stream in.

* **Per breast**: the mean percent dense of that side's views (CC and MLO see the same breast), read
  from the views that count: a view taken again (a retake of the same side and view) supersedes the
  earlier one; a view cut off by the field does not count when the side has one that is not; on a
  breast with an implant the implant-displaced (ID) views are read for density, as BI-RADS does, and
  the implant views themselves never count.
* **A breast's density category** once every one of its views the truck takes (``triage.exam_views``)
  is in with a density (a blank exposure is not, and a blank retake does not undo the take before it;
  with an implant, every implant-displaced view): from the mean of the views that count (one take a
  view, the 2D one before a tomosynthesis frame; a cut view only when the side has nothing better, so a
  breast whose other view is cut is graded from the view that is not, until the retake).  Never from
  one view while another is to come (BI-RADS judges a breast from its views together, and the cleared
  products grade from the views' mean: Volpara's density grade from the views' mean): a CC and an MLO
  of one breast read 0.36 and 0.26 on a real film (docs/triage.md), on both sides of a boundary.
* **Per exam**: the denser breast, as radiologists report density; its density category (an
  automated estimate with calibrated boundaries, not a BI-RADS assessment) from the breasts that have
  one (none while no breast has all its views: ``pd`` is then the running estimate); an **asymmetry**
  flag when the two breasts, both with their category, differ by ``triage.asymmetry_pd`` or more.
* **Priority**: the exam's priority (``high`` for category c or d, or an asymmetry) is applied to every
  image of the exam still waiting in the upload queue; an image's own ``recheck`` stays immediate and
  per image (the woman is still on the truck).
* **Complete exam**: the truck's views (``triage.exam_views``, the four screening views by default) once
  each: a missing view is named ("RMLO missing") while the exam is open, so the radiographer sees it
  before the woman leaves; the same image received twice (same SOP instance) is named a duplicate and
  counted once; another image of a view already taken is a retake and supersedes it.
* **Positioning across views**: the CC's posterior nipple line within 1 cm of the same breast's MLO's
  (ACR, EUREF; docs/triage.md), from the latest take of each; a failure raises ``recheck`` when
  ``pnl_cc_mlo`` is in ``triage.positioning_recheck``.
* **When is an exam complete?** In a streaming daemon nobody says "this study is finished".  An exam
  counts as complete once the truck's views (``triage.exam_views``) are in, or once no image
  has joined it for ``EXAM_QUIET_S`` (10 minutes: longer than a screening exam's gaps between views).
  Before that the summary is marked ``partial``.  The exam's queue priority reaches the images still
  queued only upwards: once a breast of category c or d or an asymmetry makes it ``high``, they are
  raised and never lowered (a later retake that changes the breast does not lower what was raised).
* **Withdrawn**: an image quarantined after its record (the PACS refused it for good) is not read, nor
  called missing, until it is requeued: the exam's SR must not name an image the PACS will not get.
* **Order**: the exam is read in the order its images were first recorded (``first_seq``): a redo of an
  image after a crash keeps its place (which copy of an image came first, which take is the retake).

No patient data: the exam key is a hash of the pseudonymized StudyInstanceUID.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from medsendx_edge.state import EXAMS_SCHEMA, SQLiteFile, shipped_upto
from medsendx_edge.triage.categories import CATEGORY_CLAIM, CATEGORY_THRESHOLDS, birads
from medsendx_edge.triage.positioning import PECTORAL_TOLERANCE_MM, PNL_CC_MLO_MM, message

EXAM_QUIET_S = 600.0


@dataclass
class ExamSummary:
    exam: str
    images: list[str] = field(default_factory=list)
    views: list[str] = field(default_factory=list)            # "RCC", "LMLO", ...
    breast_pd: dict[str, float] = field(default_factory=dict)  # "L"/"R" -> mean pd of the side's views
    breast_category: dict[str, str] = field(default_factory=dict)   # side -> category, once its views are in
    breast_views: dict[str, list[str]] = field(default_factory=dict)  # side -> the views its pd is read from
    breast_refs: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)  # side -> their (class, instance, series)
    pd: float | None = None
    category: str | None = None
    asymmetry: bool = False
    complete: bool = False
    priority: str = "normal"
    reasons: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)        # expected views not (yet) received
    withdrawn: list[str] = field(default_factory=list)      # views taken but quarantined since: not read
    seq: int = 0                                            # the exam's last record number, read with its rows
    key_extra: list[str] = field(default_factory=list)      # what else the SR is made of (see report_key)
    duplicates: list[str] = field(default_factory=list)     # the same image received again
    duplicate_ids: set[str] = field(default_factory=set)    # ... their ids (the later copies)
    retakes: list[str] = field(default_factory=list)        # a view taken again (the later take is read)
    pnl_mm: dict[str, float] = field(default_factory=dict)  # "RCC" -> its posterior nipple line
    positioning: list[str] = field(default_factory=list)    # the exam's positioning failures, in words
    recheck: dict[str, dict[str, str]] = field(default_factory=dict)  # side -> {check: words} that raise recheck
    latest: set[str] = field(default_factory=set)           # the ids of the takes that count (no superseded one)

    @property
    def report_key(self) -> str:
        """What the exam's SR is made of, as a key: its takes that count (a duplicate or a superseded take
        changes nothing; a retake or a view more makes a new version), and, where there are any, a measured
        take a blank retake left counted for density and the views withdrawn (taken, then quarantined).  An
        exam without either has the key of the releases before.  A key may come back (withdrawn, then
        requeued): the sweep names its item by the key and the version, and compares a key with the last
        version's only."""
        return hashlib.sha256(",".join(sorted(self.latest) + sorted(self.key_extra)).encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        return {"exam": self.exam, "images": len(self.images), "views": self.views,
                "breast_pd": self.breast_pd, "breast_category": self.breast_category,
                "breast_views": self.breast_views, "pd": self.pd, "category": self.category,
                "asymmetry": self.asymmetry, "status": "complete" if self.complete else "partial",
                "priority": self.priority, "reasons": self.reasons, "missing": self.missing,
                "duplicates": self.duplicates, "withdrawn": self.withdrawn, "retakes": self.retakes, "pnl_mm": self.pnl_mm,
                "positioning": self.positioning, "recheck": self.recheck}


class ExamBook(SQLiteFile):
    """Per-image triage results grouped by exam (``<spool>/state/exams.db``)."""

    def __init__(self, path: Path, thresholds: tuple[float, ...] = CATEGORY_THRESHOLDS,
                 asymmetry_pd: float = 0.15, views: tuple[str, ...] = ("RCC", "LCC", "RMLO", "LMLO"),
                 positioning_recheck: tuple[str, ...] = ("nipple_in_profile", "pnl_cc_mlo")) -> None:
        super().__init__(path)
        self.thresholds, self.asymmetry_pd = thresholds, asymmetry_pd
        self.views, self.positioning_recheck = views, positioning_recheck
        with self.tx() as conn:   # the set-up in one commit, not one a statement (a fresh book: 24 fsyncs)
            self.schema_from(EXAMS_SCHEMA, "the exam book")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS exam_images (id TEXT PRIMARY KEY, exam TEXT NOT NULL, laterality TEXT, "
                "view TEXT, pd REAL, implant INTEGER, recorded REAL NOT NULL)")
            conn.execute("CREATE INDEX IF NOT EXISTS exam_images_exam ON exam_images (exam)")
            columns = {r[1] for r in conn.execute("PRAGMA table_info(exam_images)")}
            for column in ("cut", "displaced", "withdrawn"):  # books from before these rules
                if column not in columns:
                    conn.execute(f"ALTER TABLE exam_images ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
            for column, kind in (("pnl_mm", "REAL"), ("instance", "TEXT"), ("pect_short_mm", "REAL"), ("nipple", "TEXT"),
                                 ("kind", "TEXT"), ("sop_class", "TEXT"), ("sop_uid", "TEXT"),
                                 ("series_uid", "TEXT"), ("first_seq", "INTEGER"), ("report", "TEXT"),
                                 ("header", "TEXT")):
                if column not in columns:
                    conn.execute(f"ALTER TABLE exam_images ADD COLUMN {column} {kind}")
            # The order images were recorded in, whatever the wall clock did (schema 2): the fleet's exam
            # watermark (one on the time passed over the exams recorded after a clock stepped back).
            if "seq" not in columns:   # older records numbered in insertion order, in one transaction with the column
                conn.execute("ALTER TABLE exam_images ADD COLUMN seq INTEGER")
                conn.execute("UPDATE exam_images SET seq = rowid")
            conn.execute("CREATE INDEX IF NOT EXISTS exam_images_seq ON exam_images (seq)")
            # the few withdrawn images, looked at by every sweep (a year's book: 60,000 rows, 4-5 ms a scan without)
            conn.execute("CREATE INDEX IF NOT EXISTS exam_images_withdrawn ON exam_images (id) WHERE withdrawn = 1")
            # The exam's SRs (triage/stage.py), a row a version, written before the SR is published (``maker``: its
            # item's id; ``previous``: the version it replaces) and marked with the exam's last record number once it
            # is in the spool (``seq``: the sweep looks only at exams with a record after it, whatever the clock did).
            conn.execute(
                "CREATE TABLE IF NOT EXISTS exam_reports (exam TEXT NOT NULL, key TEXT NOT NULL, sop_uid TEXT NOT NULL, "
                "version INTEGER NOT NULL, previous TEXT, maker TEXT NOT NULL, seq INTEGER, PRIMARY KEY (exam, key))")
            held = {r[1] for r in conn.execute("PRAGMA table_info(exam_reports)")}
            for column, kind in (("previous", "TEXT"), ("maker", "TEXT NOT NULL DEFAULT ''"), ("seq", "INTEGER")):
                if column not in held:   # a book from a development build of the exam's SR
                    conn.execute(f"ALTER TABLE exam_reports ADD COLUMN {column} {kind}")
            # The exams recorded before the exam's SR existed get none from the sweep.
            conn.execute("CREATE TABLE IF NOT EXISTS exam_meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            conn.execute("INSERT OR IGNORE INTO exam_meta (name, value) VALUES ('reports_from_seq', "
                                 "coalesce((SELECT max(seq) FROM exam_images), 0))")
            self.schema_is(EXAMS_SCHEMA)

    def record(self, item_id: str, sidecar: dict[str, Any], now: float | None = None,
               sop: tuple[str, str, str] | None = None, report: str | None = None,
               header: str | None = None) -> ExamSummary | None:
        """Record one triaged image (``sop``: its anonymized SOP class, SOP instance and series UIDs, which
        the exam's SR references; ``report``: what the SR says of this view, JSON; ``header``: the anonymized
        patient and study attributes the SR carries, DICOM JSON) and return its exam's summary."""
        exam = sidecar.get("exam")
        if not exam or sidecar.get("triage") != "done":
            return None
        metrics = sidecar.get("metrics") or {}
        checks = {c.get("check"): c.get("result") for c in (sidecar.get("positioning") or {}).get("checks") or []}
        # A 2D image, a tomosynthesis frame and a synthesised 2D of one view are not retakes of each other.
        kind = ("tomosynthesis" if sidecar.get("frame") is not None else
                "synthesised" if any(str(r).startswith("synthesised") for r in sidecar.get("reasons") or []) else "2d")
        # ``seq`` numbers every record (a redo after a crash is recorded again: the fleet's watermark ships
        # it again); ``first_seq`` is the image's first record, never moved by a redo: the order the exam
        # is read in (which copy of an image came first, which take is the retake).
        # A record (a redo, a requeued image triaged again) is a take the exam reads: never ``withdrawn``.
        columns = ("exam, laterality, view, pd, implant, recorded, cut, displaced, pnl_mm, instance, pect_short_mm, "
                   "nipple, kind, sop_class, sop_uid, series_uid, report, header, withdrawn, seq")
        self._conn().execute(
            f"INSERT INTO exam_images (id, {columns}, first_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
            "?, ?, ?, 0, coalesce((SELECT max(seq) FROM exam_images), 0) + 1, coalesce((SELECT max(seq) FROM exam_images), 0) + 1) "
            "ON CONFLICT(id) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in columns.split(", ")),
            (item_id, exam, sidecar.get("laterality"), sidecar.get("view"), sidecar.get("pd"),
             1 if metrics.get("implant") else 0, time.time() if now is None else now,
             1 if (metrics.get("cut_off") or 0) >= 1 else 0, 1 if metrics.get("implant_displaced") else 0,
             metrics.get("pnl_mm"), sidecar.get("instance"), metrics.get("pectoral_shortfall_mm"),
             checks.get("nipple_in_profile"), kind, *(sop or (None, None, None)), report, header))
        return self.summary(exam, now)

    # ------------------------------------------------------------ images that will not reach the PACS
    def withdraw(self, item_ids: Iterable[str]) -> list[str]:
        """Images recorded and then quarantined (a refused upload, a placement that failed for good): the
        exam is read without them, as if never taken, until one is taken in again (:meth:`restore`, or its
        record again).  Each change gets a new record number, so the sweep makes the exam's SR again
        without it (the version out names an image the PACS will not get).  Returns their exams."""
        return self._mark(item_ids, 1)

    def restore(self, item_ids: Iterable[str]) -> list[str]:
        """Withdrawn images back in the spool (a requeue): read again.  Returns their exams."""
        return self._mark(item_ids, 0)

    def _mark(self, item_ids: Iterable[str], withdrawn: int) -> list[str]:
        exams: list[str] = []
        with self.tx() as db:
            for item_id in item_ids:
                row = db.execute("UPDATE exam_images SET withdrawn = ?, seq = (SELECT max(seq) FROM exam_images) + 1 "
                                 "WHERE id = ? AND withdrawn != ? RETURNING exam", (withdrawn, item_id, withdrawn)).fetchone()
                if row is not None:
                    exams.append(str(row[0]))
        return exams

    def withdrawn(self) -> list[str]:
        return [str(r[0]) for r in self._conn().execute("SELECT id FROM exam_images WHERE withdrawn = 1")]

    def recorded(self, item_ids: Iterable[str]) -> list[str]:
        """Which of ``item_ids`` the book holds as taken (not withdrawn)."""
        ids = list(item_ids)
        out: list[str] = []
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            out += [str(r[0]) for r in self._conn().execute(
                f"SELECT id FROM exam_images WHERE withdrawn = 0 AND id IN ({', '.join('?' * len(chunk))})", chunk)]
        return out

    # ------------------------------------------------------------ the exam's SR
    def report_inputs(self, exam: str) -> tuple[str | None, dict[str, tuple[str | None, tuple[str, str, str] | None]]]:
        """What the exam's SR is made from: the first stored header (in the order recorded) and, per image,
        its view's report and SOP UIDs (None where a release before the exam's SR recorded it)."""
        rows = self._conn().execute(
            "SELECT id, report, header, sop_class, sop_uid, series_uid FROM exam_images WHERE exam = ? "
            "ORDER BY coalesce(first_seq, seq)", (exam,)).fetchall()
        header = next((str(r[2]) for r in rows if r[2]), None)
        return header, {str(r[0]): (r[1], (str(r[3]), str(r[4]), str(r[5])) if r[3] and r[4] and r[5] else None)
                        for r in rows}

    def last_report(self, exam: str) -> tuple[str, str, int, str | None, str, int | None] | None:
        """The exam's latest SR: (its key, SOP instance UID, version, the version it replaces, its item's id,
        the exam's last record number when it was found in the spool: None while it is not known to be)."""
        row = self._conn().execute("SELECT key, sop_uid, version, previous, maker, seq FROM exam_reports "
                                   "WHERE exam = ? ORDER BY version DESC LIMIT 1", (exam,)).fetchone()
        return None if row is None else (str(row[0]), str(row[1]), int(row[2]), row[3], str(row[4]), row[5])

    def last_placed(self, exam: str) -> int | None:
        """The version of the exam's SR last found in the spool (marked placed), or None."""
        row = self._conn().execute("SELECT max(version) FROM exam_reports WHERE exam = ? AND sop_uid != '' "
                                   "AND seq IS NOT NULL", (exam,)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def report_made(self, exam: str, key: str, sop_uid: str, version: int, previous: str | None, maker: str) -> None:
        """An SR of the exam is about to be published (``maker``: its item's id): its version recorded first, so
        the next one names it whatever happens to this one."""
        with self.tx() as db:
            # a version never published is replaced under its number (only such a one can share it)
            db.execute("DELETE FROM exam_reports WHERE exam = ? AND version = ? AND key != ?", (exam, version, key))
            db.execute(
                "INSERT INTO exam_reports (exam, key, sop_uid, version, previous, maker) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(exam, key) DO UPDATE SET sop_uid = excluded.sop_uid, version = excluded.version, "
                "previous = excluded.previous, maker = excluded.maker, "
                # a key come back (an image withdrawn, then requeued): the new version is not placed yet
                "seq = CASE WHEN exam_reports.version = excluded.version THEN exam_reports.seq ELSE NULL END",
                (exam, key, sop_uid, version, previous, maker))

    def report_none(self, exam: str, key: str, seq: int) -> None:
        """No SR to make for the exam as it is (SRs off, nothing the book can read): a mark up to ``seq``, which
        never takes the place of a version made (a row with an instance UID)."""
        self._conn().execute("INSERT OR IGNORE INTO exam_reports (exam, key, sop_uid, version, previous, maker, seq) "
                             "VALUES (?, ?, '', 0, NULL, 'none', ?)", (exam, key, seq))
        self.report_placed(exam, key, seq)

    def report_placed(self, exam: str, key: str, seq: int) -> None:
        """The exam's SR for ``key`` is in the spool, or the exam was found reported (its records up to ``seq``)."""
        self._conn().execute("UPDATE exam_reports SET seq = max(coalesce(seq, 0), ?) WHERE exam = ? AND key = ?",
                             (seq, exam, key))

    def unreported(self) -> list[tuple[str, int, float]]:
        """The exams recorded since SRs were on with a record after their last SR was placed (or none placed):
        (exam, its last record's number, that record's wall-clock time), in the order recorded.  Whether
        one is quiet is the sweep's to judge (the wall clock may have been wrong when it was recorded)."""
        rows = self._conn().execute(
            "SELECT i.exam, max(i.seq), max(i.recorded) FROM exam_images i GROUP BY i.exam "
            "HAVING max(i.seq) > (SELECT value FROM exam_meta WHERE name = 'reports_from_seq') "
            "AND max(i.seq) > coalesce((SELECT max(r.seq) FROM exam_reports r WHERE r.exam = i.exam), 0) "
            "ORDER BY max(i.seq)").fetchall()
        return [(str(r[0]), int(r[1]), float(r[2])) for r in rows]

    def updated_after(self, after: int) -> list[tuple[str, float, int]]:
        """The exams an image was recorded in after the record numbered ``after`` (0: all), with their latest
        record's time and number, in the order recorded."""
        rows = self._conn().execute("SELECT exam, max(recorded), max(seq) FROM exam_images GROUP BY exam "
                                    "HAVING max(seq) > ? ORDER BY 3", (after,)).fetchall()
        return [(str(e), float(t), int(n)) for e, t, n in rows]

    def shipped_upto(self, recorded: float) -> int:
        """What an older release's time watermark had shipped, as a number (see FeatureStore.shipped_upto)."""
        return shipped_upto(self._conn(), "exam_images", recorded)

    def last_seq(self) -> int:
        row = self._conn().execute("SELECT max(seq) FROM exam_images").fetchone()
        return int(row[0] or 0)

    def exam_of(self, item_id: str) -> str | None:
        row = self._conn().execute("SELECT exam FROM exam_images WHERE id = ?", (item_id,)).fetchone()
        return None if row is None else str(row[0])

    def summary(self, exam: str, now: float | None = None) -> ExamSummary:
        now = time.time() if now is None else now
        rows = self._conn().execute(
            "SELECT id, laterality, view, pd, implant, recorded, cut, displaced, pnl_mm, instance, pect_short_mm, "
            "nipple, kind, coalesce(first_seq, seq), sop_class, sop_uid, series_uid, withdrawn, seq "
            # in the order recorded (a retake after a wall clock stepped back is still the later take); one read,
            # the withdrawn and the exam's last record number with the rest (a withdrawal by the uploader thread
            # comes before or after all of it)
            "FROM exam_images WHERE exam = ? ORDER BY coalesce(first_seq, seq)", (exam,)).fetchall()
        # An image withdrawn (quarantined after its record) is not read: the PACS will not hold it.  Its instance
        # still makes a later copy of it a duplicate (the route never sends that copy: it holds the instance).
        held = [r for r in rows if r[17]]
        seq = max((int(r[18] or 0) for r in rows), default=0)
        every = rows
        rows = [r[:17] for r in rows if not r[17]]
        out = ExamSummary(exam, images=[r[0] for r in rows], seq=seq)
        seen: set[tuple[str, str]] = set()
        latest: dict[tuple[str, str, bool, str], tuple[Any, ...]] = {}   # (side, view, displaced, kind) -> last take
        measured: dict[tuple[str, str, bool, str], tuple[Any, ...]] = {}  # ... its last take with a density
        instances: set[str] = set()
        implant = False
        for row in every:
            if row[17]:   # withdrawn: not read, but a later copy of its instance is still a copy
                if row[9]:
                    instances.add(row[9])
                continue
            row = row[:17]
            _id, lat, view, _pd, imp, _t, _cut, displaced, _pnl, instance, _short, _nipple, kind, _seq, _c, _u, _s = row
            lat, view = (lat or "").upper(), (view or "").upper()
            name = f"{lat}{view}" + (" ID" if displaced else "")
            if instance and instance in instances:
                out.duplicates.append(name)                   # the same image again: counted once
                out.duplicate_ids.add(str(_id))
                continue
            if instance:
                instances.add(instance)
            if lat and view:
                seen.add((lat, view))
            implant |= bool(imp)
            if lat in ("L", "R"):
                key = (lat, view, bool(displaced), kind or "2d")
                if key in latest:
                    out.retakes.append(name)
                latest[key] = row   # a retake supersedes the earlier take
                if _pd is not None:
                    measured[key] = row   # (for density, a blank retake does not supersede a measured take)
        sides: dict[str, list[float]] = {}
        counted: dict[str, list[tuple[Any, ...]]] = {}
        taken: dict[str, set[str]] = {}
        for lat in ("L", "R"):
            takes = [r for (side, _v, _d, _k), r in measured.items() if side == lat]
            if any(r[7] for r in takes):
                takes = [r for r in takes if r[7]]           # implant displaced: the views read for density
            else:
                takes = [r for r in takes if not r[4]]       # implant views: not comparable
            taken[lat] = {f"{lat}{(r[2] or '').upper()}" for r in takes}   # the breast's views that are in
            if any(not r[6] for r in takes):
                takes = [r for r in takes if not r[6]]       # cut views only when nothing better
            # One take per view: the 2D one where there is one (a tomosynthesis frame or a synthesised 2D of
            # the same view is the same breast again), else the latest (rows in the order recorded).
            per_view: dict[str, tuple[Any, ...]] = {}
            for r in sorted(takes, key=lambda r: ((r[12] or "2d") == "2d", r[13])):
                per_view[(r[2] or "").upper()] = r
            takes = list(per_view.values())
            if takes:
                sides[lat] = [float(r[3]) for r in takes]
                counted[lat] = takes
        out.views = sorted(f"{lat}{view}" for lat, view in seen)
        out.breast_pd = {lat: sum(v) / len(v) for lat, v in sorted(sides.items())}
        names = {f"{lat}{view}" for lat, view in seen}
        last = max((r[5] for r in rows), default=now)
        for lat, takes in sorted(counted.items()):
            expected = [v for v in self.views if v[:1] == lat]
            if expected and all(v in taken[lat] for v in expected):
                # Every view of the breast is in with a density (with an implant: every implant-displaced
                # view; a blank exposure is not in): its category, from the views that count together (a
                # cut view only when the side has nothing better).  Not on a quiet exam with a view missing:
                # what the images and the SRs carry is what the console says.
                out.breast_category[lat] = birads(out.breast_pd[lat], self.thresholds) or ""
                out.breast_views[lat] = sorted(f"{(r[1] or '').upper()}{(r[2] or '').upper()}"
                                               + (" ID" if r[7] else "") for r in takes)
                out.breast_refs[lat] = [(str(r[14]), str(r[15]), str(r[16])) for r in takes if r[14] and r[15] and r[16]]
        if out.breast_pd:
            out.pd = max(out.breast_pd.values())    # the running estimate, while views are still coming
        if out.breast_category:
            # the denser of the breasts that have one (a breast with a view still to come has none yet)
            out.category = birads(max(out.breast_pd[lat] for lat in out.breast_category), self.thresholds)
        if len(out.breast_category) == 2 and abs(out.breast_pd["L"] - out.breast_pd["R"]) >= self.asymmetry_pd:
            # between breasts, not between single views (a CC and an MLO of one breast differ by up to 0.12)
            out.asymmetry = True
            out.reasons.append(f"asymmetry: left {out.breast_pd['L'] * 100:.0f}% and right "
                               f"{out.breast_pd['R'] * 100:.0f}% dense")
        if out.category in ("c", "d"):
            out.reasons.append(f"dense-breast rule: estimated density category {out.category} "
                               f"({CATEGORY_CLAIM})")
        if implant:
            out.reasons.append("implant in the exam: density of the implant views not comparable")
        self._positioning(out, latest)
        # (the withdrawn names are known below: the key's part for them is added there)
        out.key_extra = sorted(f"+{r[0]}" for takes in counted.values() for r in takes if str(r[0]) not in out.latest)
        # A positioning recheck is the breast's (its images take it: the stage), not the exam's queue priority.
        out.priority = "high" if out.asymmetry or out.category in ("c", "d") else "normal"
        for r in held:   # taken, then quarantined: not missing (no retake), not read either
            name = f"{(r[1] or '').upper()}{(r[2] or '').upper()}"
            if name not in names and name + (" ID" if r[7] else "") not in out.withdrawn:
                out.withdrawn.append(name + (" ID" if r[7] else ""))
        out.key_extra += sorted(f"-{w}" for w in out.withdrawn)   # what the SR says of them
        exposed = names | {w.removesuffix(" ID") for w in out.withdrawn}
        out.missing = [v for v in self.views if v not in exposed]
        out.complete = not out.missing or now - last >= EXAM_QUIET_S
        return out

    def _positioning(self, out: ExamSummary, latest: dict[tuple[str, str, bool, str], tuple[Any, ...]]) -> None:
        """The breast's checks across its views, from the latest 2D (else any) take of its CC and MLO:
        the CC's posterior nipple line within 1 cm of the MLO's; the nipple in profile on at least one of
        the two (ACR: on at least one view)."""
        out.latest = {str(r[0]) for r in latest.values()}
        takes: dict[str, tuple[Any, ...]] = {}
        for (lat, view, displaced, kind), row in sorted(latest.items(), key=lambda kv: (kv[0][3] != "2d", kv[1][13])):
            if not displaced and view in ("CC", "MLO"):
                takes.setdefault(f"{lat}{view}", row)        # the 2D take first, else the latest of another kind
        for name, row in sorted(takes.items()):
            if row[8] is not None:
                out.pnl_mm[name] = round(float(row[8]), 1)
        for lat in ("R", "L"):
            cc_row, mlo_row = takes.get(f"{lat}CC"), takes.get(f"{lat}MLO")
            if cc_row is None or mlo_row is None:
                continue
            findings: list[tuple[str, bool, str]] = []       # (check, trusted, words)
            if cc_row[11] == "fail" and mlo_row[11] == "fail":
                findings.append(("nipple_in_profile", True, f"nipple not in profile on {lat}CC nor {lat}MLO"))
            cc, mlo = out.pnl_mm.get(f"{lat}CC"), out.pnl_mm.get(f"{lat}MLO")
            if cc is not None and mlo is not None and mlo - cc > PNL_CC_MLO_MM:
                short = mlo_row[10]
                # The MLO's line holds where the muscle reaches the nipple line; a short muscle's line is
                # extrapolated (and may be a misfound one): the comparison is then advisory.
                trusted = short is not None and short <= PECTORAL_TOLERANCE_MM
                findings.append(("pnl_cc_mlo", trusted,
                                 f"{message('pnl_cc_mlo', lat + 'CC')} ({lat}CC {cc:.0f} mm, {lat}MLO {mlo:.0f} mm)"))
            for check, trusted, words in findings:
                if check in self.positioning_recheck and trusted:
                    out.recheck.setdefault(lat, {})[check] = words
                elif not trusted:
                    words += " (advisory: the MLO's pectoral line is extrapolated)"
                else:
                    words += " (advisory)"
                out.positioning.append(words)
