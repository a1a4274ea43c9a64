"""The anonymize stage: the anonymized output replaces the input in one step, the re-identification
row is recorded, a file cut recently waits for the rest, an old one is quarantined."""

from __future__ import annotations

import os
import time

import pydicom

from conftest import make_config
from medsendx_edge.anonymize.linkage import LinkageStore
from medsendx_edge.anonymize.stage import Anonymizer, AnonymizeStage
from medsendx_edge.spool import ANONYMIZED, INCOMING, Spool
from medsendx_edge.stage import Outcome, Runner
from medsendx_edge.synthetic import synthetic_mammogram


def _stage(tmp_path):
    cfg = make_config(tmp_path)
    spool = Spool(cfg.spool_dir)
    spool.ensure_layout()
    return cfg, spool, AnonymizeStage(spool, Anonymizer(cfg))


def _drop(spool, name, data):
    src = spool.inbox / name
    src.write_bytes(data)
    return spool.adopt(src)


def test_output_replaces_input_and_linkage_is_recorded(tmp_path):
    cfg, spool, stage = _stage(tmp_path)
    ds, _ = synthetic_mammogram(128, 104, patient_name="DOE^JANE", patient_id="PID-0042")
    src = tmp_path / "m.dcm"
    ds.save_as(src, enforce_file_format=True)
    item_id = _drop(spool, "m.dcm", src.read_bytes())
    result = Runner(stage).handle(spool.claim(INCOMING, item_id))
    assert result.outcome is Outcome.DONE and result.info["modality"] == "MG"
    assert spool.ready(INCOMING) == [] and spool.claimed(INCOMING) == [] and spool.ready(ANONYMIZED) == [item_id]
    out = pydicom.dcmread(spool.path(ANONYMIZED, item_id))
    assert "DOE" not in str(out.PatientName) and out.PatientID != "PID-0042"
    assert out.PixelData == ds.PixelData
    store = LinkageStore(cfg.spool_dir / "state" / "linkage.db", cfg.anonymize.linkage_key_file)
    assert store.lookup(str(out.PatientID))[0]["original_patient_id"] == "PID-0042"


def test_a_recently_cut_file_waits_and_an_old_one_is_quarantined(tmp_path):
    cfg, spool, stage = _stage(tmp_path)
    ds, _ = synthetic_mammogram(128, 104, seed=2)
    src = tmp_path / "m.dcm"
    ds.save_as(src, enforce_file_format=True)
    item_id = _drop(spool, "cut.dcm", src.read_bytes()[:-5000])
    runner = Runner(stage, retry_delay_s=0.0)
    assert runner.handle(spool.claim(INCOMING, item_id)).outcome is Outcome.RETRY_LATER
    assert spool.ready(INCOMING) == [item_id]
    old = time.time() - cfg.watch.incomplete_grace_s - 10
    os.utime(spool.path(INCOMING, item_id), (old, old))
    result = runner.handle(spool.claim(INCOMING, item_id))
    assert result.outcome is Outcome.QUARANTINE and "truncated" in result.reason
    assert spool.reason("anonymize", item_id)["error_class"] == "Truncated"
