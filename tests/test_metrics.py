"""The Prometheus endpoint, scraped over HTTP and parsed with prometheus-client's own parser: queue
depths, files by stage and outcome, quarantines by error class, stage latency, deliveries, uplink."""

from __future__ import annotations

import os
import time

import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import PYDICOM_TEST_FILES, make_config
from medsendx_edge.config import MetricsConfig, replace
from medsendx_edge.daemon import Daemon
from medsendx_edge.spool import SENT
from medsendx_edge.synthetic import synthetic_mammogram


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert "DOE" not in text and "PID-" not in text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_tell_what_the_truck_did(tmp_path):
    cfg = replace(make_config(tmp_path), metrics=MetricsConfig(enabled=True, bind="127.0.0.1", port=0))
    cfg.inbox.mkdir(parents=True)
    for i in range(2):
        synthetic_mammogram(128, 104, seed=i, patient_name="DOE^JANE", patient_id="PID-7")[0].save_as(
            cfg.inbox / f"m{i}.dcm", enforce_file_format=True)
    (cfg.inbox / "junk.dcm").write_bytes(b"not DICOM" * 50)
    (cfg.inbox / "ct.dcm").write_bytes((PYDICOM_TEST_FILES / "CT_small.dcm").read_bytes())
    for f in cfg.inbox.iterdir():
        os.utime(f, (0, 0))
    daemon = Daemon(cfg)
    before = None
    daemon.start()
    try:
        port = daemon.metrics_server.server_port
        before = _scrape(port)
        deadline = time.time() + 60
        while len(daemon.spool.ready(SENT)) < 3 and time.time() < deadline:
            time.sleep(0.1)
        after = _scrape(port)
    finally:
        daemon.shutdown()

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - (before or {}).get(key, 0.0)

    assert grew("medsendx_files_processed_total", stage="anonymize", outcome="done") == 3
    assert grew("medsendx_files_processed_total", stage="anonymize", outcome="quarantine") == 1
    assert grew("medsendx_files_quarantined_total", stage="anonymize", error_class="NotDicom") == 1
    assert grew("medsendx_stage_seconds_count", stage="triage") == 3
    assert grew("medsendx_delivered_total", destination="directory") == 3
    assert grew("medsendx_delivered_bytes_total", destination="directory") > 0
    assert after[("medsendx_queue_items", (("queue", "sent"),))] == 3
    assert after[("medsendx_queue_items", (("queue", "quarantine"),))] == 1
    assert after[("medsendx_upload_items", (("state", "delivered"),))] == 3
    assert after[("medsendx_uplink_up", ())] == 1 and after[("medsendx_disk_low", ())] == 0
    assert daemon.metrics_server is None  # stopped with the daemon
