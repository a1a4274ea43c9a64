"""Config: the example loads as is; bad keys and values are named in the error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medsendx_edge.config import Config, config_from_dict, load_config
from medsendx_edge.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_example_config_loads_and_is_frozen():
    cfg = load_config(REPO / "config" / "medsendx-edge.yaml")
    assert cfg.station_name == "MOBILE_CLINIC_01"
    assert cfg.watch.mode == "native" and cfg.watch.stable_seconds == 2
    # relative paths resolve against the config file's folder: the repository's var/
    assert cfg.destination.kind == "directory" and cfg.destination.path.resolve() == REPO / "var" / "archive"
    assert cfg.upload.max_backoff_s == 600 and cfg.log.format == "json"
    assert cfg.anonymize.retain_longitudinal == "off"
    assert cfg.inbox.resolve() == REPO / "var" / "spool" / "inbox"
    assert cfg.anonymize.secret_file.resolve() == REPO / "var" / "secrets" / "site-secret.key"
    with pytest.raises(AttributeError):
        cfg.station_name = "X"  # type: ignore[misc]


def test_env_names_the_default_config(tmp_path, monkeypatch):
    p = tmp_path / "c.yaml"
    p.write_text("station_name: TRUCK_7\n")
    monkeypatch.setenv("MEDSENDX_EDGE_CONFIG", str(p))
    assert load_config().station_name == "TRUCK_7"


@pytest.mark.parametrize("data, message", [
    ({"colour": "blue"}, "colour: unknown key (got 'blue')"),
    ({"watch": {"mode": "fancy"}}, "watch.mode: must be one of native | polling (got 'fancy')"),
    ({"watch": {"stable_seconds": -1}}, "watch.stable_seconds: must be >= 0.0 (got -1)"),
    ({"watch": {"stable_seconds": "two"}}, "watch.stable_seconds: must be a number"),
    ({"upload": {"initial_backoff_s": 60, "max_backoff_s": 30}}, "upload.max_backoff_s: must be >= "),
    ({"destination": {"kind": "dicomweb"}}, "destination.url: must be an http(s) URL"),
    ({"destination": {"kind": "ftp"}}, "destination.kind: must be one of"),
    ({"destination": {"password_file": "/x"}}, "destination.username: required"),
    ({"log": {"level": "loud"}}, "log.level: must be one of"),
    ({"anonymize": {"retain_longitudinal": "some"}}, "anonymize.retain_longitudinal"),
    ({"anonymize": {"safe_private_tags": ["0010,10,X"]}}, "group must be odd"),
    ({"anonymize": {"password": "hunter2"}}, "anonymize.password: unknown key"),
    ({"watch": "fast"}, "watch: must be a mapping"),
])
def test_bad_values_are_named(data, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert message in str(err.value)


def test_yaml_off_means_off():
    assert config_from_dict({"anonymize": {"retain_longitudinal": False}}).anonymize.retain_longitudinal == "off"


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("watch: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(p)


def test_defaults_are_the_safest():
    a = Config().anonymize
    assert not (a.retain_patient_characteristics or a.retain_device_identity or a.retain_institution_identity
                or a.clean_descriptors or a.retain_safe_private)
    assert a.retain_longitudinal == "off" and a.burned_in == "quarantine"


def test_priority_names_are_one_vocabulary():
    import typing

    from medsendx_edge.config import TriageRule
    from medsendx_edge.vocabulary import PRIORITY_NAMES, Priority

    assert typing.get_args(typing.get_type_hints(TriageRule)["priority"]) == PRIORITY_NAMES
    assert [p.label for p in Priority] == list(PRIORITY_NAMES) and Priority.of("recheck") < Priority.of("high")
    assert Priority.of("no such thing") is Priority.NORMAL


def test_a_yaml_alias_bomb_is_refused_at_once_and_errors_never_print_a_whole_value(tmp_path):
    """Issue 23, finding 9: nested aliases in anonymize.safe_private_tags took 2.5 GB and ended in a
    MemoryError; aliases are refused before anything expands, and a long bad value is cut in the message."""
    import resource

    bomb = ["a: &a [" + ",".join(['"lol"'] * 9) + "]"]
    for prev, name in zip("abcde", "bcdef"):   # 9**6 strings once expanded: enough to show, not to hurt
        bomb.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb.append("anonymize:\n  safe_private_tags: *f")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(bomb) + "\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ConfigError, match="aliases are not allowed"):
        load_config(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000   # kB: nothing expanded
    with pytest.raises(ConfigError) as err:
        config_from_dict({"station_name": "X" * 100_000})
    assert len(str(err.value)) < 300 and "100002 characters" in str(err.value)


@pytest.mark.parametrize("data, message", [
    ({"spool_dir": "/srv/share/spool", "inbox_dir": "/srv/share"}, "spool_dir: inside the inbox"),
    ({"spool_dir": "/srv/spool", "inbox_dir": "/srv/spool/anonymized"}, "inbox_dir: inside the spool"),
    ({"spool_dir": "/srv/spool", "destination": {"kind": "directory", "path": "/srv/spool/inbox/out"}},
     "destination.path"),
    ({"spool_dir": "/srv/spool", "inbox_dir": "/srv/share",
      "destination": {"kind": "directory", "path": "/srv/share/archive"}}, "overlaps the inbox"),
])
def test_overlapping_inbox_spool_and_destination_are_refused(data, message):
    """Issue 23, finding 8: a destination or the spool inside the inbox gave 14 deliveries of one input
    in 20 s; check-config and the daemon refuse nested paths."""
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)
    assert config_from_dict({"spool_dir": "/srv/spool", "inbox_dir": "/srv/spool/inbox"}).inbox == \
        Path("/srv/spool/inbox")


def test_the_accession_is_shown_on_a_loopback_console_only(tmp_path):
    """Review of issue 26: show_accession with a console bound beyond loopback sent the accession over the
    network in clear."""
    from medsendx_edge.config import load_config

    base = {"spool_dir": str(tmp_path / "s"), "console": {"enabled": True, "show_accession": True}}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(base))
    assert load_config(p).console.show_accession
    base["console"]["bind"] = "0.0.0.0"
    p.write_text(yaml.safe_dump(base))
    with pytest.raises(ConfigError, match="console.show_accession: .* beyond loopback"):
        load_config(p)
