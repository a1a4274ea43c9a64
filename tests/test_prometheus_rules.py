"""The sample alerting rules (config/prometheus/alerts.yml) checked by Prometheus's own promtool (Debian
``prometheus``): the file is valid, each alert fires on the series it is for and stays quiet otherwise
(issue 26: TruckNotDelivering never fired, its `and` joined series with different labels), and every
metric the rules name is one the daemon exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from conftest import require

RULES = Path(__file__).resolve().parents[1] / "config" / "prometheus" / "alerts.yml"

UNIT_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # truck a: backlog, uplink up, never delivered (no last-delivery gauge): alerts
      - series: 'medsendx_backlog_bytes{{instance="a"}}'
        values: '5000000x90'
      - series: 'medsendx_uplink_up{{instance="a"}}'
        values: '1x90'
      # truck b: backlog, uplink up, delivering (the last delivery a minute old at every scrape): quiet
      - series: 'medsendx_backlog_bytes{{instance="b"}}'
        values: '5000000x90'
      - series: 'medsendx_uplink_up{{instance="b"}}'
        values: '1x90'
      - series: 'medsendx_last_delivery_timestamp_seconds{{instance="b"}}'
        values: '0+60x90'
      # truck c: backlog, uplink down for over an hour: the uplink alert, not this one
      - series: 'medsendx_backlog_bytes{{instance="c"}}'
        values: '5000000x90'
      - series: 'medsendx_uplink_up{{instance="c"}}'
        values: '0x90'
      - series: 'medsendx_uplink_down_seconds{{instance="c"}}'
        values: '0+60x90'
      # truck d: delivered at minute 5, then stopped: alerts once 30 minutes (and the 10 minutes' for) pass
      - series: 'medsendx_backlog_bytes{{instance="d"}}'
        values: '5000000x90'
      - series: 'medsendx_uplink_up{{instance="d"}}'
        values: '1x90'
      - series: 'medsendx_last_delivery_timestamp_seconds{{instance="d"}}'
        values: '300x90'
      # truck a's disk fills at minute 30; its quarantine jumps by 50 right after a restart at minute 10
      - series: 'medsendx_disk_low{{instance="a"}}'
        values: '0x30 1x60'
      - series: 'medsendx_queue_items{{instance="a", queue="quarantine"}}'
        values: '2x10 52x80'
      # truck b's quarantine grows slowly: quiet
      - series: 'medsendx_queue_items{{instance="b", queue="quarantine"}}'
        values: '0+0.1x90'
    alert_rule_test:
      - eval_time: 30m
        alertname: TruckNotDelivering
        exp_alerts:
          - exp_labels: {{instance: a, severity: warning}}
            exp_annotations: {{summary: "a: backlog waiting, uplink up, nothing delivered for 30 minutes"}}
      - eval_time: 50m
        alertname: TruckNotDelivering
        exp_alerts:
          - exp_labels: {{instance: a, severity: warning}}
            exp_annotations: {{summary: "a: backlog waiting, uplink up, nothing delivered for 30 minutes"}}
          - exp_labels: {{instance: d, severity: warning}}
            exp_annotations: {{summary: "d: backlog waiting, uplink up, nothing delivered for 30 minutes"}}
      - eval_time: 20m
        alertname: TruckDiskLow
        exp_alerts: []
      - eval_time: 40m
        alertname: TruckDiskLow
        exp_alerts:
          - exp_labels: {{instance: a, severity: critical}}
            exp_annotations: {{summary: "a: disk low, the inbox is held"}}
      - eval_time: 50m
        alertname: TruckUplinkDownForAnHour
        exp_alerts: []
      - eval_time: 70m
        alertname: TruckUplinkDownForAnHour
        exp_alerts:
          - exp_labels: {{instance: c, severity: warning}}
            exp_annotations: {{summary: "c: uplink down for an hour"}}
      - eval_time: 30m
        alertname: TruckQuarantineGrowing
        exp_alerts:
          - exp_labels: {{instance: a, queue: quarantine, severity: warning}}
            exp_annotations: {{summary: "a: more than 10 files quarantined in the last hour"}}
"""


def _promtool() -> str:
    require("promtool", package="prometheus")
    tool = shutil.which("promtool")
    assert tool
    return tool


def test_the_sample_rules_are_valid_and_fire_when_they_should(tmp_path):
    tool = _promtool()
    check = subprocess.run([tool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(UNIT_TESTS.format(rules=str(RULES)))
    run = subprocess.run([tool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def _exported(tmp_path) -> set[str]:
    """Every metric name a scrape of a real daemon's registry shows (counters with their _total, histograms
    with their _bucket, _sum and _count), parsed with prometheus-client's own parser."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from conftest import make_config
    from medsendx_edge.daemon import Daemon
    from medsendx_edge.metrics import REGISTRY, SpoolCollector

    daemon = Daemon(make_config(tmp_path))
    daemon.spool.state.enqueue("1" * 24, 2, 10, "0" * 64)      # one delivered image: its time is a gauge
    daemon.spool.state.mark_delivered("1" * 24, "2026-12-05T10:00:00Z")
    own = CollectorRegistry()
    own.register(SpoolCollector(daemon))
    text = (generate_latest(REGISTRY) + generate_latest(own)).decode()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names |= {s.name for s in family.samples}
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
    assert {"medsendx_build_info", "medsendx_backlog_bytes", "medsendx_last_delivery_timestamp_seconds"} <= names
    return names


def test_the_rules_name_only_metrics_the_daemon_exports(tmp_path):
    rules = yaml.safe_load(RULES.read_text())
    used = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            used |= set(re.findall(r"\bmedsendx_[a-z0-9_]+", rule["expr"]))
    assert used and used <= _exported(tmp_path), used - _exported(tmp_path)


def test_the_grafana_dashboard_loads_and_names_only_exported_metrics(tmp_path):
    import json

    dash = json.loads((RULES.parents[1] / "grafana" / "medsendx-edge.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bmedsendx_[a-z0-9_]+", e)}
    assert len(dash["panels"]) >= 10 and len(used) >= 12
    assert used <= _exported(tmp_path), used - _exported(tmp_path)
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in dash["panels"]:   # a table of station and version needs an instant query in table format
        if p["type"] == "table":
            assert all(t.get("instant") and t.get("format") == "table" for t in p["targets"]), p["title"]
