"""apply-config (issue 28): the path of a configuration edited remotely, against a running daemon (its
SIGHUP and its confirmation in the state database) and without one."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml

from medsendx_edge.apply_config import apply
from medsendx_edge.errors import ConfigError
from medsendx_edge.synthetic import synthetic_mammogram
from test_service import NotifySocket, _yaml


def test_without_a_daemon_the_file_is_checked_and_put_in_place(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSENDX_EDGE_RUNTIME_DIR", str(tmp_path / "run"))
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump(_yaml(tmp_path)))
    conf.chmod(0o640)
    with pytest.raises(ConfigError):
        apply(tmp_path / "c.yaml", conf, rollback=True)          # nothing to roll back to
    new = tmp_path / "n.yaml"
    new.write_text(yaml.safe_dump(_yaml(tmp_path, station_name="TRUCK_7")))
    done = apply(new, conf)
    assert done.outcome == "no daemon" and "next start" in done.detail
    assert "TRUCK_7" in conf.read_text() and "TRUCK_7" not in conf.with_name("c.yaml.previous").read_text()
    assert oct(conf.stat().st_mode & 0o777) == "0o640"              # its mode kept


def test_a_config_edited_remotely_is_checked_put_in_place_and_reloaded_or_rolled_back(tmp_path):
    """apply-config (issue 28): a file the check refuses changes nothing; a good one replaces the current
    file atomically, the old one kept as .previous, and the running daemon confirms it runs on it; a file
    the daemon refuses on reload (another site secret on a spool with pseudonyms) is put back; --rollback
    applies .previous."""
    conf = tmp_path / "c.yaml"
    original = yaml.safe_dump(_yaml(tmp_path))
    conf.write_text(original)
    ns = NotifySocket(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(ns.path), "MEDSENDX_EDGE_RUNTIME_DIR": str(tmp_path / "run")}
    proc = subprocess.Popen([sys.executable, "-m", "medsendx_edge.cli", "run", "--config", str(conf)],
                            env=env, stderr=subprocess.DEVNULL)

    def apply(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "medsendx_edge.cli", "apply-config", *args, "--config",
                               str(conf)], env=env, capture_output=True, text=True, timeout=120)

    try:
        ns.wait_for(lambda m: "READY=1" in m)
        # a pseudonym made, so that the site secret is bound to the spool
        inbox = tmp_path / "spool" / "inbox"
        synthetic_mammogram(64, 64, seed=3)[0].save_as(inbox / "m.dcm", enforce_file_format=True)
        _wait_for(lambda: any((tmp_path / "archive").rglob("*.dcm")))

        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(_yaml(tmp_path, upload={"initial_backoff_s": 9, "max_backoff_s": 1})))
        refused = apply(str(bad))
        assert refused.returncode == 2 and "initial_backoff_s" in refused.stderr
        assert conf.read_text() == original and not conf.with_name("c.yaml.previous").exists()

        good = tmp_path / "good.yaml"
        good.write_text(yaml.safe_dump(_yaml(tmp_path, log={"format": "json", "level": "debug"})))
        done = apply(str(good))
        assert done.returncode == 0 and done.stdout.startswith("applied:"), (done.stdout, done.stderr)
        assert conf.read_text() == good.read_text() and conf.with_name("c.yaml.previous").read_text() == original

        other = tmp_path / "other-site.key"
        other.write_bytes(os.urandom(32))
        other.chmod(0o600)
        foreign = tmp_path / "foreign.yaml"
        foreign.write_text(yaml.safe_dump(_yaml(tmp_path, anonymize={
            "secret_file": str(other), "linkage_key_file": str(tmp_path / "link.key")})))
        rejected = apply(str(foreign))
        assert rejected.returncode == 1 and rejected.stdout.startswith("rejected:"), rejected.stdout
        assert "site secret" in rejected.stdout
        assert conf.read_text() == good.read_text()      # put back: the next start does not fail on it

        assert conf.with_name("c.yaml.previous").read_text() == original   # the rollback as it was
        back = apply("--rollback")
        assert back.returncode == 0 and back.stdout.startswith("applied:"), back.stdout
        assert conf.read_text() == original and conf.with_name("c.yaml.previous").read_text() == good.read_text()
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(20)
        ns.close()


def _wait_for(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_daemon_is_heard_in_its_own_spool_and_an_old_refusal_is_not_this_one(tmp_path):
    """The new file may name another spool (a restart key): the daemon confirms in the spool it runs on,
    and nothing is created in the other one; a refusal of the same bytes recorded before this SIGHUP (an
    earlier attempt) is not taken as the answer."""
    import hashlib

    from medsendx_edge.state import StateDB
    from medsendx_edge.vocabulary import StateKey

    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump(_yaml(tmp_path)))
    ns = NotifySocket(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(ns.path), "MEDSENDX_EDGE_RUNTIME_DIR": str(tmp_path / "run")}
    proc = subprocess.Popen([sys.executable, "-m", "medsendx_edge.cli", "run", "--config", str(conf)],
                            env=env, stderr=subprocess.DEVNULL)
    try:
        ns.wait_for(lambda m: "READY=1" in m)
        moved = tmp_path / "moved.yaml"
        (tmp_path / "spool2").mkdir()
        moved.write_text(yaml.safe_dump(_yaml(tmp_path, spool_dir=str(tmp_path / "spool2"))))
        # an earlier refusal of these very bytes, before this attempt
        state = StateDB(tmp_path / "spool" / "state" / "state.db")
        digest = hashlib.sha256(moved.read_bytes()).hexdigest()
        state.put(StateKey.CONFIG_REJECTED, f"{digest} {time.time() - 600:.3f} an earlier reason")
        state.close()
        done = subprocess.run([sys.executable, "-m", "medsendx_edge.cli", "apply-config", str(moved), "--config",
                               str(conf)], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.startswith("applied:"), (done.stdout, done.stderr)
        assert "wait for a restart: spool_dir" in done.stdout     # said, not implied to be running
        assert not (tmp_path / "spool2" / "state").exists()
    finally:
        proc.terminate()
        proc.wait(20)
        ns.close()
