"""The triage stage: anonymized/ -> triaged/, with ``<id>.json`` (metrics, priority) and ``<id>.png``
(the radiologist's picture) beside the file, and a features row in the local store.

Triage never blocks an anonymized file: objects without pixels pass with triage "not applicable",
pixels that cannot be decoded or analysed pass with the reason recorded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from .config import Config
from .features import FEATURE_COLUMNS, FeatureStore
from .logs import get_logger
from .spool import ANONYMIZED, TRIAGED, Claimed, Spool, write_json_atomic, atomic_write
from .stage import Result, Stage

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass
class TriageOutcome:
    sidecar: dict[str, Any]
    png: bytes | None


def triage_dataset(ds: pydicom.Dataset, cfg: Config) -> TriageOutcome:
    """Metrics, priority and picture for one dataset (the stage and ``segment`` share this)."""
    from .preview import render_png
    from .triage import analyse, priority

    tcfg = cfg.triage
    if not any(k in ds for k in PIXEL_KEYWORDS):
        return TriageOutcome({"triage": "not applicable", "reason": "no pixel data", "priority": "normal"}, None)
    try:
        an = analyse(ds, tcfg.k, cfg.station_name)
    except Exception as exc:  # noqa: BLE001 - undecodable or unusual pixels: record and pass on
        return TriageOutcome({"triage": "failed", "priority": "normal",
                              "reason": f"pixels could not be analysed ({type(exc).__name__})"}, None)
    prio, reasons = priority(an.metrics, tcfg.rules)
    sidecar = {"triage": "done", "priority": prio, "reasons": reasons, "labels": an.label_names,
               **{c: an.metrics.get(c) for c in FEATURE_COLUMNS}, "metrics": an.metrics}
    return TriageOutcome(sidecar, render_png(an, prio, tcfg.preview_max_px))


class TriageStage(Stage):
    name = "triage"
    input_queue = ANONYMIZED
    output_queue = TRIAGED

    def __init__(self, spool: Spool, cfg: Config, features: FeatureStore | None = None) -> None:
        super().__init__(spool)
        self.cfg = cfg
        self.features = features or FeatureStore(spool.root / "state" / "features.db")
        self.log = get_logger(stage=self.name)

    def process(self, item: Claimed) -> Result:
        qdir = self.spool.dir(self.input_queue)
        try:
            ds = pydicom.dcmread(item.path)
            outcome = triage_dataset(ds, self.cfg)
        except Exception as exc:  # noqa: BLE001 - never block the upload
            outcome = TriageOutcome({"triage": "failed", "priority": "normal",
                                     "reason": f"could not be read for triage ({type(exc).__name__})"}, None)
        sidecar = {"id": item.id, **outcome.sidecar}
        if outcome.png is not None:
            png = outcome.png
            atomic_write(qdir / f"{item.id}.png", lambda fh: fh.write(png))
        write_json_atomic(qdir / f"{item.id}.json", sidecar)
        if sidecar["triage"] == "done":
            self.features.append(item.id, sidecar)
        if sidecar["priority"] == "recheck":
            self.log.warning("triage_recheck", file_id=item.id, priority="recheck", reason="; ".join(sidecar["reasons"]))
        self.forward(item)
        return Result.done(triage=sidecar["triage"], priority=sidecar["priority"],
                           percent_dense=sidecar.get("pd"), reason=sidecar.get("reason"))


def read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
