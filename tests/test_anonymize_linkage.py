"""The re-identification table: encrypted at rest, found by pseudonym or new UID, keys never replaced
under existing records, the export readable only with its key."""

from __future__ import annotations

import json
import stat

import pytest
from cryptography.fernet import Fernet

from medsendx_edge.anonymize.linkage import LinkageStore, holds_pseudonymized_data
from medsendx_edge.anonymize.profile import Linkage
from medsendx_edge.errors import ConfigError


def _link(n: int = 1) -> Linkage:
    return Linkage(pseudonym="PSEUDO-1", original_patient_id="PID-0001", original_patient_name="DOE^JANE",
                   original_accession="ACC-9", original_study_uid="1.2.3", original_sop_uid=f"1.2.3.{n}",
                   study_uid="2.25.10", sop_uid=f"2.25.10.{n}")


def test_records_are_encrypted_at_rest_and_found_by_any_new_identifier(tmp_path):
    store = LinkageStore(tmp_path / "linkage.db", tmp_path / "linkage.key")
    store.record(_link(1))
    store.record(_link(2))
    raw = (tmp_path / "linkage.db").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("linkage.db-*"))
    assert b"DOE^JANE" not in raw and b"PID-0001" not in raw
    assert stat.S_IMODE((tmp_path / "linkage.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "linkage.db").stat().st_mode) == 0o600
    assert [r["original_sop_uid"] for r in store.lookup("PSEUDO-1")] == ["1.2.3.1", "1.2.3.2"]
    assert store.lookup("2.25.10.2")[0]["original_patient_name"] == "DOE^JANE"
    assert store.lookup(" 2.25.10 ")[0]["original_patient_id"] == "PID-0001"
    assert store.lookup("nobody") == []


def test_the_key_is_never_replaced_under_existing_records(tmp_path):
    store = LinkageStore(tmp_path / "linkage.db", tmp_path / "linkage.key")
    store.record(_link())
    assert holds_pseudonymized_data(tmp_path / "linkage.db")
    (tmp_path / "linkage.key").unlink()
    with pytest.raises(ConfigError, match="linkage_key_file"):
        LinkageStore(tmp_path / "linkage.db", tmp_path / "linkage.key")
    assert not (tmp_path / "linkage.key").exists()


def test_an_unreadable_table_counts_as_holding_data(tmp_path):
    (tmp_path / "linkage.db").write_bytes(b"not sqlite at all" * 100)
    assert holds_pseudonymized_data(tmp_path / "linkage.db")
    assert not holds_pseudonymized_data(tmp_path / "absent.db")


def test_export_is_one_token_readable_only_with_its_key(tmp_path):
    store = LinkageStore(tmp_path / "linkage.db", tmp_path / "linkage.key")
    for n in (1, 2, 2):
        store.record(_link(n))
    key = Fernet.generate_key()
    assert store.export(tmp_path / "out.bin", key) == 2
    blob = (tmp_path / "out.bin").read_bytes()
    assert b"DOE" not in blob and stat.S_IMODE((tmp_path / "out.bin").stat().st_mode) == 0o600
    records = json.loads(Fernet(key).decrypt(blob))
    assert sorted(r["original_sop_uid"] for r in records) == ["1.2.3.1", "1.2.3.2"]
    assert len(store.lookup("PSEUDO-1")) == 2  # the instance recorded twice is one record
