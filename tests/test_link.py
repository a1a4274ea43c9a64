"""The uploader over an emulated 4G link (tests/linkemu.py: a network namespace, tbf at 8 Mbit/s, 30 ms
each way, ~1 % loss stalls, outages that reset every connection) into a real Orthanc on the far side:
every image delivered exactly once, nothing sent more than twice, goodput near the link rate while up.
The long profile (50 mammograms, a 30 s outage every 2 minutes) is benchmarks/bench_link.py."""

from __future__ import annotations

import dataclasses
import os
import time

import pydicom
import pytest

import linkemu
from conftest import make_config
from medsendx_edge.config import DestinationConfig, UploadConfig
from medsendx_edge.daemon import Daemon
from medsendx_edge.spool import SENT
from medsendx_edge.triage.phantom import phantom_dataset
from orthanc_server import OrthancServer


@pytest.fixture
def link():
    why = linkemu.available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"the link emulator {why}")
        pytest.skip(f"the link emulator {why}")
    with linkemu.Link(rate_mbit=8) as lk:
        yield lk


def test_delivered_exactly_once_through_outages(tmp_path, link):
    orthanc = OrthancServer(tmp_path / "orthanc", link=link)
    proxy = linkemu.DelayProxy((link.far_ip, orthanc.port), delay_s=0.03, loss=0.01)
    try:
        cfg = make_config(tmp_path, destination=DestinationConfig(
            kind="dicomweb", path=None, url=f"http://127.0.0.1:{proxy.port}/dicom-web", username=orthanc.user,
            password_file=_password(tmp_path, orthanc.password), timeout_s=5, compression="jpeg-ls"),
            upload=UploadConfig(initial_backoff_s=0.2, max_backoff_s=1.0))
        cfg = dataclasses.replace(cfg, triage=dataclasses.replace(cfg.triage, enabled=False))
        cfg.inbox.mkdir(parents=True)
        for i in range(8):
            ds, _ = phantom_dataset(1024, 832, spacing_mm=0.28, density=0.3, seed=i)
            ds.save_as(cfg.inbox / f"m{i}.dcm", enforce_file_format=True)
            os.utime(cfg.inbox / f"m{i}.dcm", (0, 0))
        daemon = Daemon(cfg)
        t0 = time.monotonic()
        daemon.start()
        outages = linkemu.Outages(link, proxy, period_s=4.0, down_s=1.5)
        try:
            deadline = time.monotonic() + 120
            while len(daemon.spool.ready(SENT)) < 8 and time.monotonic() < deadline:
                time.sleep(0.2)
            elapsed = time.monotonic() - t0
        finally:
            outages.close()
            daemon.shutdown()
        sent = daemon.spool.ready(SENT)
        delivered = sum(daemon.spool.state.item(i).size for i in sent)
        attempts = [daemon.spool.state.item(i).attempts for i in sent]
        assert len(sent) == 8 and outages.count >= 1
        assert orthanc.instance_count() == 8
        sent_uids = {str(pydicom.dcmread(daemon.spool.path(SENT, i), stop_before_pixels=True).SOPInstanceUID)
                     for i in sent}
        assert len(sent_uids) == 8 and all(len(orthanc.qido_instance(u)) == 1 for u in sent_uids)
        # no image sent more than twice: the bytes through the link stay under two copies of everything
        assert proxy.up_bytes < 2 * delivered, (proxy.up_bytes, delivered)
        up_time = max(0.1, elapsed - link.outage_s)
        goodput = delivered / up_time
        print(f"\nlink: {delivered / 1e6:.1f} MB delivered in {elapsed:.1f} s ({link.outage_s:.1f} s of outages, "
              f"{outages.count} outages), goodput while up {goodput * 8 / 1e6:.2f} Mbit/s of 8, "
              f"wire/delivered {proxy.up_bytes / delivered:.2f}, attempts per image {attempts}")
        assert goodput * 8 / 1e6 > 3.0  # the link, not the uploader, sets the pace
    finally:
        proxy.close()
        orthanc.stop()


def _password(tmp_path, password):
    from conftest import write_password

    return write_password(tmp_path, password)
