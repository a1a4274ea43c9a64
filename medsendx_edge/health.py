"""The health rules behind ``medsendx-edge status`` (exit 1 when unhealthy) and anything else that asks
"is this truck all right?": disk, uplink, quarantine growth, files the inbox never takes.  Pure: the
caller gathers the figures, this decides."""

from __future__ import annotations

import json
import shutil
import time
from typing import Any

from medsendx_edge.config import Config
from medsendx_edge.spool import QUARANTINE, REASON, Spool
from medsendx_edge.vocabulary import StateKey, Uplink


def uplink_down_since(spool: Spool) -> float | None:
    """When the uplink went down (epoch seconds), as the uploader recorded it, or None."""
    return spool.state.uplink()[2]


def status_data(cfg: Config, spool: Spool) -> dict[str, Any]:
    """What ``medsendx-edge status --json`` prints and the console's Now page shows."""
    return {"spool_dir": str(cfg.spool_dir), "counts": spool.counts(), "upload_queue": spool.state.queue_summary(),
            "restart_pending": spool.state.get(StateKey.RESTART_PENDING),
            **evaluate(cfg, spool)}


def quarantine_by_cause(spool: Spool) -> list[dict[str, Any]]:
    """Quarantined items grouped by stage and error class, most first, each with one example reason and
    the command that puts them all back once the cause is fixed (the reasons hold no patient data).
    Reads every reason file: ``status`` asks for it, not the console's once-a-second poll."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for stage, item_id in spool.quarantined():
        try:
            info = spool.reason(stage, item_id)
        except (OSError, ValueError):
            info = {}
        cls = str(info.get("error_class") or "unknown")
        g = groups.setdefault((stage, cls), {"stage": stage, "error_class": cls, "count": 0,
                                             "example": str(info.get("reason") or "")[:160],
                                             "requeue": f"medsendx-edge requeue --stage {stage} --error-class {cls}"})
        g["count"] += 1
    return sorted(groups.values(), key=lambda g: (-g["count"], g["stage"], g["error_class"]))


def evaluate(cfg: Config, spool: Spool, now: float | None = None) -> dict[str, Any]:
    """The figures and the problems (plain sentences, no patient data); healthy when there are none."""
    now = time.time() if now is None else now
    problems: list[str] = []
    free_mb = shutil.disk_usage(spool.root).free / 1e6
    if free_mb < cfg.min_free_mb:
        problems.append(f"disk low: {free_mb:.0f} MB free < min_free_mb {cfg.min_free_mb:.0f}")
    uplink, reason, since = spool.state.uplink()
    if uplink is Uplink.DOWN and since is not None:
        down_s = now - since
        if down_s > cfg.health.uplink_down_max_s:
            problems.append(f"uplink down for {down_s:.0f} s > health.uplink_down_max_s "
                            f"{cfg.health.uplink_down_max_s:.0f}")
    elif uplink is Uplink.PAUSED:
        problems.append(f"uplink paused: {reason}" if reason else "uplink paused")
    hour_ago = now - 3600
    recent = 0
    for stage, item_id in spool.quarantined():
        try:
            recent += (spool.root / QUARANTINE / stage / f"{item_id}{REASON}").stat().st_mtime > hour_ago
        except FileNotFoundError:
            continue
    if recent > cfg.health.max_quarantined_per_hour:
        problems.append(f"quarantine growing: {recent} files in the last hour > "
                        f"health.max_quarantined_per_hour {cfg.health.max_quarantined_per_hour}")
    try:
        ignored = json.loads(spool.state.get(StateKey.INBOX_IGNORED) or "{}")
    except ValueError:
        ignored = {}
    if ignored.get("ignored_stale"):
        problems.append(f"inbox: {ignored['ignored_stale']} file(s) with hidden or temporary names "
                        f"untouched for {cfg.watch.ignored_report_s:.0f} s are never ingested")
    return {"free_mb": round(free_mb, 1), "quarantined_last_hour": recent, "inbox_ignored": ignored,
            "uplink_down_since": since, "healthy": not problems, "problems": problems}
