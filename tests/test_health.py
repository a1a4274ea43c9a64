"""The status rules: healthy by default; the disk, a long or paused uplink, a growing quarantine and
files the inbox never takes each make it unhealthy, in plain words."""

from __future__ import annotations

import json
import os

from conftest import make_config
from medsendx_edge.config import HealthConfig, replace
from medsendx_edge.health import evaluate, uplink_down_since
from medsendx_edge.spool import INCOMING, Spool
from medsendx_edge.vocabulary import Uplink


def _spool(cfg) -> Spool:
    spool = Spool(cfg.spool_dir)
    spool.ensure_layout()
    return spool


def test_a_fresh_truck_is_healthy(tmp_path):
    cfg = replace(make_config(tmp_path), min_free_mb=0)
    out = evaluate(cfg, _spool(cfg))
    assert out["healthy"] and out["problems"] == [] and out["uplink_down_since"] is None


def test_each_rule(tmp_path):
    cfg = replace(make_config(tmp_path), min_free_mb=1e12,
                  health=HealthConfig(uplink_down_max_s=600, max_quarantined_per_hour=2))
    spool = _spool(cfg)
    spool.state.set_uplink(Uplink.DOWN, "connection refused", since=1000.0)
    for i in range(3):
        src = spool.inbox / f"bad{i}.dcm"
        src.write_bytes(b"x")
        spool.quarantine(spool.claim(INCOMING, spool.adopt(src)), "anonymize", "not DICOM", "NotDicom")
    spool.state.put("inbox_ignored", json.dumps({"ignored_stale": 4}))
    out = evaluate(cfg, spool, now=2000.0)
    text = " | ".join(out["problems"])
    assert not out["healthy"] and len(out["problems"]) == 4, text
    assert "disk low" in text and "uplink down for 1000 s > health.uplink_down_max_s 600" in text
    assert "quarantine growing: 3 files in the last hour > health.max_quarantined_per_hour 2" in text
    assert "4 file(s) with hidden or temporary names" in text
    assert uplink_down_since(spool) == 1000.0


def test_quarantine_counts_only_the_last_hour_and_a_paused_uplink_is_reported(tmp_path):
    cfg = replace(make_config(tmp_path), min_free_mb=0, health=HealthConfig(max_quarantined_per_hour=0))
    spool = _spool(cfg)
    src = spool.inbox / "bad.dcm"
    src.write_bytes(b"x")
    item_id = spool.adopt(src)
    spool.quarantine(spool.claim(INCOMING, item_id), "anonymize", "not DICOM", "NotDicom")
    reason = next(spool.root.glob(f"quarantine/anonymize/{item_id}.reason.json"))
    assert "quarantine growing: 1 files" in " ".join(evaluate(cfg, spool)["problems"])
    os.utime(reason, (0, 0))  # quarantined long ago
    spool.state.set_uplink(Uplink.PAUSED, "HTTP 401 check the credentials")
    out = evaluate(cfg, spool)
    assert out["quarantined_last_hour"] == 0
    assert out["problems"] == ["uplink paused: HTTP 401 check the credentials"]
