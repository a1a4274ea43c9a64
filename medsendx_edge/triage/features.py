"""The per-image feature rows (no patient data) that the fleet QC miner pools from every truck.

The triage stage appends one row per image to ``<spool>/state/features.db`` (SQLite, keyed by the
spool id, so a re-run after a crash replaces rather than duplicates).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from medsendx_edge.state import SQLiteFile, number_unnumbered, shipped_upto

from medsendx_edge.vocabulary import FEATURE_COLUMNS, TEXT_COLUMNS


class FeatureStore(SQLiteFile):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        cols = ", ".join(f"{c} {'TEXT' if c in TEXT_COLUMNS else 'REAL'}" for c in FEATURE_COLUMNS)
        with self.tx() as conn:   # the set-up in one commit, not one a statement
            conn.execute(f"CREATE TABLE IF NOT EXISTS features (id TEXT PRIMARY KEY, recorded REAL, {cols})")
            have = {row[1] for row in conn.execute("PRAGMA table_info(features)")}
            for c in FEATURE_COLUMNS:  # a store from an older version gains the new columns, empty
                if c not in have:
                    conn.execute(f"ALTER TABLE features ADD COLUMN {c} {'TEXT' if c in TEXT_COLUMNS else 'REAL'}")
            # The order rows were recorded in, whatever the wall clock did: the fleet shipments' watermark (a
            # watermark on the time passed over the rows recorded after a clock stepped back, for ever).
            if "seq" not in have:   # older rows numbered in insertion order, with the column
                conn.execute("ALTER TABLE features ADD COLUMN seq INTEGER")
                conn.execute("UPDATE features SET seq = rowid")
            conn.execute("CREATE INDEX IF NOT EXISTS features_seq ON features (seq)")
            number_unnumbered(self, "features")   # rows an older release added after a downgrade

    def append(self, item_id: str, metrics: dict[str, Any]) -> None:
        values = [float(v) if isinstance(v, bool) else v for v in (metrics.get(c) for c in FEATURE_COLUMNS)]
        marks = ", ".join("?" * (len(FEATURE_COLUMNS) + 2)) + ", coalesce((SELECT max(seq) FROM features), 0) + 1"
        # A triage redone after a crash records the item again: its values, under its first time, so a row
        # already shipped to the fleet is not shipped a second time (the shipments go by time).
        updates = ", ".join(f"{c} = excluded.{c}" for c in FEATURE_COLUMNS)
        self._conn().execute(
            f"INSERT INTO features (id, recorded, {', '.join(FEATURE_COLUMNS)}, seq) VALUES ({marks}) "
            f"ON CONFLICT(id) DO UPDATE SET {updates}",
            [item_id, time.time(), *values])

    def rows_after(self, after: int, upto: int | None = None) -> tuple[list[dict[str, Any]], int]:
        """Rows recorded after the one numbered ``after`` (0: all) and up to ``upto``, in the order they were
        recorded; and the number of the last (``after`` when none).  A row recorded again (a redone triage)
        keeps its number."""
        cur = self._conn().execute(
            f"SELECT id, recorded, {', '.join(FEATURE_COLUMNS)}, seq FROM features WHERE seq > ? AND seq <= ? "
            "ORDER BY seq", (after, upto if upto is not None else 2 ** 62))
        names = [d[0] for d in cur.description]
        out = [dict(zip(names, r)) for r in cur.fetchall()]
        last = max((int(r.pop("seq")) for r in out), default=after)
        return out, last

    def shipped_upto(self, recorded: float) -> int:
        """What an older release's time watermark ``recorded`` had shipped, as a number: every row before the
        first one recorded after that time (a row recorded after a clock stepped back, at a time under the
        watermark, counts as shipped: that release would never have shipped it either)."""
        return shipped_upto(self._conn(), "features", recorded)

    def last_seq(self) -> int:
        row = self._conn().execute("SELECT max(seq) FROM features").fetchone()
        return int(row[0] or 0)

    def rows(self, since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
        """Rows recorded after ``since`` (all by default) and up to ``until``, oldest first."""
        cur = self._conn().execute(
            f"SELECT id, recorded, {', '.join(FEATURE_COLUMNS)} FROM features WHERE recorded > ? AND recorded <= ? "
            "ORDER BY recorded, id", (since if since is not None else -1.0, until if until is not None else 1e18))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]


#: What leaves the truck is coarsened to what the fleet QC uses (docs/privacy.md, "Feature rows"): the
#: compressed thickness to its 5 mm band (the miner's strata), the compression force to 10 N, the mAs to
#: 10 % steps; the exam key (a hash of the study UID, which the PACS holds) and the laterality (no QC use)
#: stay on the truck.
BANDS = {"thickness_mm": 5.0, "compression_n": 10.0}
MAS_STEP = 1.1
LOCAL_ONLY = ("exam", "laterality")


def coarsen(row: dict[str, Any]) -> dict[str, Any]:
    """One feature row as it leaves the truck: banded values (the band's centre), local-only keys empty."""
    out = dict(row)
    for key, width in BANDS.items():
        value = out.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = (math.floor(value / width) + 0.5) * width
    mas = out.get("exposure_mas")
    if isinstance(mas, (int, float)) and math.isfinite(mas) and mas > 0:
        out["exposure_mas"] = round(MAS_STEP ** round(math.log(mas, MAS_STEP)), 1)
    for key in LOCAL_ONLY:
        out[key] = None
    return out


def write_rows(rows: list[dict[str, Any]], out: Path, *, durable: bool = False) -> Path:
    """Parquet (pyarrow) for ``*.parquet``, CSV otherwise or when pyarrow is missing; atomic.

    This is the export: row ids are :func:`spool.export_id` hashes, ``recorded`` is cut to the day
    (UTC midnight), so nothing that leaves the truck carries an ingest time, and the values are
    :func:`coarsen`-ed."""
    from medsendx_edge.fsutil import atomic_write, write_bytes_atomic
    from medsendx_edge.spool import export_id

    rows = [{**coarsen(r), "id": export_id(str(r["id"])),
             "recorded": None if r.get("recorded") is None else float(r["recorded"]) // 86400 * 86400}
            for r in rows]
    columns = ["id", "recorded", *FEATURE_COLUMNS]
    out = Path(out)
    if out.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            out = out.with_suffix(".csv")
        else:
            table = pa.table({c: [r.get(c) for r in rows] for c in columns},
                             schema=pa.schema([(c, pa.string() if c in TEXT_COLUMNS or c == "id" else pa.float64())
                                               for c in columns]))
            atomic_write(out, lambda fh: pq.write_table(table, fh), durable=durable)
            return out
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    data = buf.getvalue().encode()
    write_bytes_atomic(out, data, durable=durable)
    return out
