"""The triage validated on the physics phantom: every case of :func:`phantom.validation_cases` through the
same code the daemon runs (gate, analysis, priority, exam), against the phantom's ground truth.

``python -m medsendx_edge.triage.validation`` prints the tables of docs/triage.md.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsendx_edge.config import Config
from medsendx_edge.triage.categories import birads
from medsendx_edge.triage.exam import ExamBook
from medsendx_edge.triage.phantom import phantom_dataset, validation_cases
from medsendx_edge.triage.stage import triage_dataset


@dataclass
class Row:
    case: dict[str, Any]
    truth_pd: float
    pd: float | None
    chest_wall: tuple[str | None, str]        # (found, truth)
    pectoral_corner: tuple[str | None, str]
    implant: bool
    priority: str
    reasons: list[str]

    @property
    def error(self) -> float | None:
        return None if self.pd is None else self.pd - self.truth_pd


@dataclass
class ExamRow:
    exam: int
    truth_category: str | None
    category: str | None
    breast_pd: dict[str, float]
    truth_breast_pd: dict[str, float]
    priorities: set[str]


def validate(rows: int = 1024, cols: int = 832, spacing_mm: float = 0.28) -> tuple[list[Row], list[ExamRow]]:
    cfg = Config()
    out: list[Row] = []
    exams: dict[int, list[tuple[dict[str, Any], float, dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        book = ExamBook(Path(tmp) / "exams.db")
        for n, case in enumerate(validation_cases()):
            kw = {k: v for k, v in case.items() if k != "exam"}
            ds, truth = phantom_dataset(rows, cols, spacing_mm=spacing_mm, study_uid=f"2.25.{case['exam'] or 9000 + n}",
                                        **kw)
            side = triage_dataset(ds, cfg, ds.pixel_array).sidecar
            m = side.get("metrics") or {}
            out.append(Row(case, truth.pd, side.get("pd"), (m.get("chest_wall"), truth.chest_wall),
                           (m.get("pectoral_corner"), truth.pectoral_corner), bool(m.get("implant")),
                           side["priority"], side.get("reasons", [])))
            if case["exam"]:
                summary = book.record(f"{n:024x}", side)
                exams.setdefault(int(case["exam"]), []).append((case, truth.pd, summary.as_dict() if summary else {}))
    exam_rows = []
    for exam, items in sorted(exams.items()):
        sides: dict[str, list[float]] = {}
        for case, tpd, _s in items:
            sides.setdefault(str(case["laterality"]), []).append(tpd)
        truth_breast = {k: sum(v) / len(v) for k, v in sorted(sides.items())}
        last = items[-1][2]
        exam_rows.append(ExamRow(exam, birads(max(truth_breast.values())), last.get("category"),
                                 last.get("breast_pd", {}), truth_breast, {str(last.get("priority"))}))
    return out, exam_rows


def markdown(rows: list[Row], exams: list[ExamRow]) -> str:
    lines = ["| # | view | side | flipped | edge eq. | kind | truth pd | pd | error | chest wall | pectoral | priority |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        c = r.case
        kind = "raw" if c.get("raw") else "implant" if c.get("implant") else "presentation"
        lines.append(f"| {i} | {c['view']} | {c['laterality']} | {'yes' if c.get('flip_vertical') else 'no'} | "
                     f"{c.get('edge_eq', 0):.1f} | {kind} | {r.truth_pd:.3f} | "
                     f"{'-' if r.pd is None else f'{r.pd:.3f}'} | "
                     f"{'-' if r.error is None else f'{r.error:+.3f}'} | "
                     f"{r.chest_wall[0]}{'' if r.chest_wall[0] == r.chest_wall[1] else ' (WRONG)'} | "
                     f"{r.pectoral_corner[0]}{'' if r.pectoral_corner[0] == r.pectoral_corner[1] else ' (WRONG)'} | "
                     f"{r.priority} |")
    errs = [abs(r.error) for r in rows if r.error is not None]
    lines.append("")
    lines.append(f"{len(rows)} phantoms: largest |pd error| {max(errs):.3f}, mean {sum(errs) / len(errs):.3f}.")
    lines += ["", "| exam | truth L / R | measured L / R | truth category | category | exam priority |",
              "|---|---|---|---|---|---|"]
    for e in exams:
        t = " / ".join(f"{e.truth_breast_pd.get(k, 0):.2f}" for k in ("L", "R"))
        m = " / ".join(f"{e.breast_pd.get(k, 0):.2f}" for k in ("L", "R"))
        lines.append(f"| {e.exam} | {t} | {m} | {e.truth_category} | {e.category}"
                     f"{'' if e.category == e.truth_category else ' (WRONG)'} | {', '.join(sorted(e.priorities))} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    r, e = validate()
    print(markdown(r, e))
