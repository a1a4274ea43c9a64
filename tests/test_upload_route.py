"""The route stage: the priority triage wrote (or the exam's, when more urgent) queues the item; the
file reaches the outbox before its queue row; compression records what is sent."""

from __future__ import annotations

import hashlib
import json

import pydicom

from medsendx_edge.spool import ANONYMIZED, OUTBOX, TRIAGED, Spool, new_id
from medsendx_edge.stage import Runner
from medsendx_edge.vocabulary import Priority
from medsendx_edge.synthetic import synthetic_mammogram
from medsendx_edge.upload.route import RouteStage, item_priority


def _triaged(tmp_path, priority=None, n=1):
    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    ids = []
    for i in range(n):
        ds, _ = synthetic_mammogram(256, 208, seed=i)
        src = tmp_path / f"m{i}.dcm"
        ds.save_as(src, enforce_file_format=True)
        item_id = new_id()
        spool.publish_file(TRIAGED, item_id, src)
        if priority:
            spool.publish_companion(TRIAGED, item_id, ".json", json.dumps({"priority": priority}).encode())
        ids.append(item_id)
    return spool, ids


def test_the_sidecar_priority_queues_the_item_and_travels_with_it(tmp_path):
    spool, (item_id,) = _triaged(tmp_path, "recheck")
    assert item_priority(spool, TRIAGED, item_id) is Priority.RECHECK
    Runner(RouteStage(spool, TRIAGED)).run_once()
    row = spool.state.item(item_id)
    assert row.priority == Priority.RECHECK and row.state == "queued"
    data = spool.path(OUTBOX, item_id).read_bytes()
    assert row.size == len(data) and row.sha256 == hashlib.sha256(data).hexdigest()
    assert (spool.dir(OUTBOX) / f"{item_id}.json").exists()


def test_no_or_a_foreign_sidecar_is_normal(tmp_path):
    spool, (a,) = _triaged(tmp_path)
    assert item_priority(spool, TRIAGED, a) is Priority.NORMAL
    (spool.dir(TRIAGED) / f"{a}.json").write_text('{"priority": "urgent!!"}')
    assert item_priority(spool, TRIAGED, a) is Priority.NORMAL
    (spool.dir(TRIAGED) / f"{a}.json").write_text("not json")
    assert item_priority(spool, TRIAGED, a) is Priority.NORMAL


def test_an_exam_that_turned_urgent_lifts_the_item(tmp_path):
    spool, (item_id,) = _triaged(tmp_path, "normal")
    Runner(RouteStage(spool, TRIAGED, exam_priority=lambda i: Priority.HIGH)).run_once()
    assert spool.state.item(item_id).priority == Priority.HIGH
    spool2, (other,) = _triaged(tmp_path / "b", "recheck")
    Runner(RouteStage(spool2, TRIAGED, exam_priority=lambda i: Priority.of("normal"))).run_once()
    assert spool2.state.item(other).priority == Priority.RECHECK  # an exam never lowers an image


def test_compression_records_the_compressed_bytes(tmp_path):
    spool, (item_id,) = _triaged(tmp_path, "normal")
    original = spool.path(TRIAGED, item_id).read_bytes()
    Runner(RouteStage(spool, TRIAGED, compression="jpeg-ls")).run_once()
    data = spool.path(OUTBOX, item_id).read_bytes()
    row = spool.state.item(item_id)
    assert len(data) < len(original) and row.size == len(data)
    assert row.sha256 == hashlib.sha256(data).hexdigest()
    assert pydicom.dcmread(spool.path(OUTBOX, item_id)).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"
    assert spool.ready(ANONYMIZED) == [] and spool.ready(TRIAGED) == []
