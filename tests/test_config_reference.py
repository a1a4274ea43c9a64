"""The schema generates its reference: the example YAML and the table of docs/operations.md match
config.py, every option says what it does, the example is the defaults, and a reload either applies a
key or reports it as needing a restart, as the schema declares."""

from __future__ import annotations

import dataclasses
import io
import json
import sys
from pathlib import Path

import pytest
import yaml

from medsendx_edge import config_reference
from medsendx_edge.config import Config, load_config, resolve_paths
from medsendx_edge.config_reference import EXAMPLE, ROOT, lookup, options, restart_keys
from medsendx_edge.daemon import Daemon
from medsendx_edge.logs import configure_logging


def test_the_example_and_the_operations_table_are_generated_from_the_schema(capsys):
    assert config_reference.main(["--check"]) == 0, capsys.readouterr().err


def test_every_option_says_what_it_does():
    undocumented = [o.key for o in options() if not o.section and not o.doc.strip()]
    assert undocumented == []


def _resolved(cfg):
    """Paths as the kernel resolves them (config/../var/spool is var/spool)."""
    changes = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, Path):
            changes[f.name] = value.resolve()
        elif dataclasses.is_dataclass(value):
            changes[f.name] = _resolved(value)
    return dataclasses.replace(cfg, **changes)


def test_the_example_is_the_defaults():
    assert _resolved(load_config(EXAMPLE)) == _resolved(resolve_paths(Config(), ROOT))


def test_restart_keys_come_from_the_schema():
    assert set(restart_keys()) == {"spool_dir", "inbox_dir", "inbox_require_mount", "dicom_listener", "metrics", "console", "fleet.enabled",
                                   "fleet.format", "log.stream",
                                   "max_recoveries", "max_interruptions"}


def _yaml(tmp_path, **over) -> dict:
    data = {
        "spool_dir": str(tmp_path / "spool"),
        "destination": {"kind": "directory", "path": str(tmp_path / "archive")},
        "fleet": {"enabled": True, "destination": {"kind": "directory", "path": str(tmp_path / "fleet")}},
        "anonymize": {"secret_file": str(tmp_path / "site.key"), "linkage_key_file": str(tmp_path / "link.key")},
        "min_free_mb": 1,
    }
    for key, value in over.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


# one key of each kind: what object must see the new value once reloaded
APPLIED = {
    "destination.path": ("archive2", lambda d: d.uploader.destination.path.name),
    "upload.max_backoff_s": (77.0, lambda d: d.uploader.cfg.max_backoff_s),
    "fleet.destination.path": ("fleet2", lambda d: d.fleet_uploader.destination.path.name),
    "triage.k": (4, lambda d: d.triage_stage.cfg.triage.k),
    "watch.stable_seconds": (7.0, lambda d: d.scanner.stable_seconds),
    "destination.compression": ("rle", lambda d: next(r.stage.compression for r in d.runners
                                                      if r.stage.name == "route")),
    "station_name": ("TRUCK_07", lambda d: d.anonymize_stage.anonymizer.cfg.station_name),
}
RESTART = {"spool_dir": "elsewhere", "dicom_listener.port": 11999, "fleet.format": "csv", "max_recoveries": 5}


@pytest.mark.parametrize("key", sorted(APPLIED) + sorted(RESTART))
def test_a_reload_applies_a_key_or_says_it_needs_a_restart(tmp_path, key):
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump(_yaml(tmp_path)))
    (tmp_path / "started.yaml").write_text(conf.read_text())
    daemon = Daemon(load_config(conf), config_path=conf)
    try:
        if key in APPLIED:
            value, seen = APPLIED[key]
            if key.endswith("destination.path"):
                value = str(tmp_path / value)
        else:
            value = RESTART[key]
            if key == "spool_dir":
                value = str(tmp_path / value)
        conf.write_text(yaml.safe_dump(_yaml(tmp_path, **{key: value})))
        stderr, sys.stderr = sys.stderr, io.StringIO()  # a reload configures logging again, on stderr
        try:
            assert daemon.reload()
            lines = sys.stderr.getvalue().splitlines()
        finally:
            sys.stderr = stderr
        events = [json.loads(x) for x in lines if x.startswith("{")]
        restart = [e for e in events if e["event"] == "restart_required"]
        if key in APPLIED:
            assert restart == []
            expected = value.rsplit("/", 1)[-1] if key.endswith("destination.path") else value
            assert seen(daemon) == expected
            daemon.uploader._close_retired()
        else:
            assert len(restart) == 1 and key.split(".")[0] in restart[0]["key"]
            # the daemon runs on as started for that key until the restart (the review of issue 28: a reload
            # that took a new spool_dir wrote linkage records into the new spool while the old one ran on)
            assert lookup(daemon.cfg, key) == lookup(load_config(tmp_path / "started.yaml"), key)
            if key == "spool_dir":
                assert not (tmp_path / "elsewhere").exists()
            # issue 26: `status` says a restart is pending (the journal alone said it), until the next start
            from medsendx_edge.health import status_data

            assert key.split(".")[0] in status_data(daemon.cfg, daemon.spool)["restart_pending"]
            daemon.recover()
            assert status_data(daemon.cfg, daemon.spool)["restart_pending"] is None
    finally:
        daemon.uploader.destination.close()
        configure_logging("info", "json")  # the reload pointed logging at this test's buffer


def test_a_pending_restart_survives_a_second_reload_that_changes_something_else(tmp_path):
    """Review of issue 26: the pending restart was computed against the last reload, so a second reload of
    another key cleared it while the daemon still ran on its start values."""
    from medsendx_edge.health import status_data

    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump(_yaml(tmp_path)))
    daemon = Daemon(load_config(conf), config_path=conf)
    stderr, sys.stderr = sys.stderr, io.StringIO()
    try:
        conf.write_text(yaml.safe_dump(_yaml(tmp_path, max_recoveries=5)))
        assert daemon.reload()
        assert "max_recoveries" in status_data(daemon.cfg, daemon.spool)["restart_pending"]
        conf.write_text(yaml.safe_dump(_yaml(tmp_path, max_recoveries=5, station_name="TRUCK_09")))
        assert daemon.reload()
        assert "max_recoveries" in status_data(daemon.cfg, daemon.spool)["restart_pending"]
        conf.write_text(yaml.safe_dump(_yaml(tmp_path, station_name="TRUCK_09")))   # back as started
        assert daemon.reload()
        assert status_data(daemon.cfg, daemon.spool)["restart_pending"] is None
    finally:
        sys.stderr = stderr
        daemon.uploader.destination.close()
        configure_logging("info", "json")
