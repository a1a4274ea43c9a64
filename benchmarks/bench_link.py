"""The uploader on an emulated 4G uplink (tests/linkemu.py; root): 8 Mbit/s up, 30 ms each way, ~1 %
loss (retransmission stalls), a 30 s outage every 2 minutes that resets every connection (a 4G
reconnect).  The far side is a real Orthanc (DICOMweb) or moto's S3 emulator in a network namespace.

    python benchmarks/bench_link.py backlog [--n 50] [--size 2048x1664]   # a backlog of mammograms, daemon
    python benchmarks/bench_link.py big --mb 500 [--dest s3|dicomweb]     # one large object, the uploader
    python benchmarks/bench_link.py day [--n 160] [--source films]        # a day drained, a study through it

``day`` (issue 29): a truck's day of mammograms from ``benchmarks/sources.py`` (the real films, the
independent family or the own phantom) waits in the inbox; once ``--study-after`` of them are delivered a
four-view study lands (own phantoms: underexposed, priority ``recheck``; or dense, priority ``high`` by the
dense-breast rule, ``--study-priority high``), written by a modality (temp name, rename).  Reported: seconds from its last view landing to the PACS having confirmed
all four (STOW-RS ReferencedSOPSequence), through the outages; the minutes to drain the day against the
floor of its raw bytes at the link rate; the compression ratio the day got.

Reports goodput (delivered bytes per second of link up-time, as sent and as images before compression)
against the link rate, the time to drain, retries per image, bytes on the wire beyond one copy of each
object (sent twice), bytes a re-send did not send (the destination already held them).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

import linkemu  # noqa: E402
from conftest import make_config, write_password  # noqa: E402
from orthanc_server import OrthancServer, free_port  # noqa: E402

from medsendx_edge.config import DestinationConfig, UploadConfig  # noqa: E402
from medsendx_edge.logs import configure_logging  # noqa: E402
from medsendx_edge.spool import OUTBOX, SENT, Spool, new_id  # noqa: E402

RATE_MBIT = 8.0


def _report(what: str, delivered: int, original: int, elapsed: float, link: linkemu.Link,
            proxy: linkemu.DelayProxy, attempts: list[int], not_resent: int, outages: int) -> None:
    up = max(0.1, elapsed - link.outage_s)
    print(f"{what}: {delivered / 1e6:.1f} MB sent ({original / 1e6:.1f} MB of images before compression) "
          f"in {elapsed:.0f} s, {outages} outages ({link.outage_s:.0f} s down)")
    print(f"  goodput while the link is up: {delivered * 8 / up / 1e6:.2f} Mbit/s = "
          f"{delivered * 8 / up / 1e6 / RATE_MBIT * 100:.0f} % of the {RATE_MBIT:g} Mbit/s link; "
          f"images: {original * 8 / up / 1e6:.2f} Mbit/s")
    print(f"  overall (outages included): {delivered * 8 / elapsed / 1e6:.2f} Mbit/s")
    print(f"  attempts per object: mean {sum(attempts) / max(1, len(attempts)):.2f}, max {max(attempts or [0])}")
    print(f"  bytes on the wire beyond one copy: {(proxy.up_bytes - delivered) / 1e6:.1f} MB "
          f"({(proxy.up_bytes - delivered) / max(1, delivered) * 100:.1f} %); "
          f"not re-sent (already at the destination): {not_resent / 1e6:.1f} MB")


def _over_the_link(tmpp: Path, link: linkemu.Link, compression: str) -> tuple[OrthancServer, linkemu.DelayProxy, Any]:
    """A real Orthanc in the link's far namespace, the delay-and-loss proxy in front of it, and a daemon
    config that sends to it over STOW-RS (its inbox made)."""
    orthanc = OrthancServer(tmpp / "orthanc", link=link)
    proxy = linkemu.DelayProxy((link.far_ip, orthanc.port), delay_s=0.03, loss=0.01)
    cfg = make_config(tmpp, destination=DestinationConfig(
        kind="dicomweb", path=None, url=f"http://127.0.0.1:{proxy.port}/dicom-web", username=orthanc.user,
        password_file=write_password(tmpp, orthanc.password), timeout_s=20, compression=compression),
        upload=UploadConfig(initial_backoff_s=1.0, max_backoff_s=10.0))
    cfg.inbox.mkdir(parents=True)
    return orthanc, proxy, cfg


def backlog(args: argparse.Namespace) -> None:
    from medsendx_edge.daemon import Daemon
    from medsendx_edge.triage.phantom import phantom_dataset

    rows, cols = map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp, linkemu.Link(rate_mbit=RATE_MBIT) as link:
        tmpp = Path(tmp)
        orthanc, proxy, cfg = _over_the_link(tmpp, link, args.compression)
        original = 0
        for i in range(args.n):
            ds, _ = phantom_dataset(rows, cols, spacing_mm=0.07 * 4096 / max(rows, cols), density=0.1 + 0.6 * (i % 7) / 6,
                                    seed=i, view="CC" if i % 2 else "MLO", laterality="L" if i % 4 < 2 else "R")
            ds.save_as(cfg.inbox / f"m{i}.dcm", enforce_file_format=True)
            os.utime(cfg.inbox / f"m{i}.dcm", (0, 0))
            original += len(ds.PixelData)
        configure_logging("warning", "json", stream=open(tmpp / "daemon.log", "w"))
        daemon = Daemon(cfg)
        t0 = time.monotonic()
        daemon.start()
        outages = linkemu.Outages(link, proxy, period_s=args.period, down_s=args.down)
        try:
            while len(daemon.spool.ready(SENT)) < args.n:
                time.sleep(0.5)
            elapsed = time.monotonic() - t0
        finally:
            outages.close()
            daemon.shutdown()
        sent = daemon.spool.ready(SENT)
        rows_ = [daemon.spool.state.item(i) for i in sent]
        delivered = sum(r.size for r in rows_)
        assert orthanc.instance_count() == args.n
        _report(f"{args.n} mammograms {rows}x{cols}, {args.compression}", delivered, original, elapsed, link, proxy,
                [r.attempts for r in rows_], int(daemon.spool.state.get("bytes_not_resent") or 0), outages.count)
        proxy.close()
        orthanc.stop()


def day(args: argparse.Namespace) -> None:
    import sources

    from medsendx_edge.daemon import Daemon

    study = list(sources.make("phantom", 4))
    for ds, (view, lat) in zip(study, sources.VIEWS):
        from medsendx_edge.triage.phantom import phantom_dataset

        # recheck: exposed at a fiftieth of the dose (underexposed: the retake decided while she is on the
        # truck); high: a dense breast (the dense-breast rule, which half of a screening population meets)
        kw = {"photons": 30, "density": 0.25} if args.study_priority == "recheck" else {"density": 0.6}
        urgent, _ = phantom_dataset(3328, 2560, spacing_mm=0.085, view=view, laterality=lat, seed=99, **kw)
        ds.PixelData = urgent.PixelData
    with tempfile.TemporaryDirectory() as tmp, linkemu.Link(rate_mbit=args.rate) as link:
        tmpp = Path(tmp)
        orthanc, proxy, cfg = _over_the_link(tmpp, link, args.compression)
        raw = 0
        for i, ds in enumerate(sources.make(args.source, args.n)):
            ds.save_as(cfg.inbox / f"d{i}.dcm", enforce_file_format=True)
            os.utime(cfg.inbox / f"d{i}.dcm", (0, 0))
            raw += len(ds.PixelData)
        configure_logging("warning", "json", stream=open(tmpp / "daemon.log", "w"))
        daemon = Daemon(cfg)
        t0 = time.monotonic()
        daemon.start()
        outages = linkemu.Outages(link, proxy, period_s=args.period, down_s=args.down)
        state = daemon.spool.state

        def delivered_images() -> list:
            rows = [state.item(i) for i in daemon.spool.ready(SENT)]
            return [r for r in rows if r is not None and daemon.spool.sidecar(r.id, SENT).get("triage") != "report"]

        try:
            while len(delivered_images()) < args.study_after:
                time.sleep(0.2)
            for i, ds in enumerate(study):   # the modality writes each view under a temp name, then renames
                tmpf = cfg.inbox / f".s{i}.part"
                ds.save_as(tmpf, enforce_file_format=True)
                os.rename(tmpf, cfg.inbox / f"s{i}.dcm")
                raw += len(ds.PixelData)
            landed = time.monotonic()
            want = {daemon.anonymize_stage.anonymizer.ctx.uid(str(ds.SOPInstanceUID)) for ds in study}
            while len({r.sop_uid for r in delivered_images()} & want) < 4:
                time.sleep(0.2)
            study_s = time.monotonic() - landed
            behind = args.n - sum(1 for r in delivered_images() if r.sop_uid not in want)
            while len(delivered_images()) < args.n + 4:
                time.sleep(0.5)
            elapsed = time.monotonic() - t0
        finally:
            outages.close()
            daemon.shutdown()
        rows_ = delivered_images()
        sent_bytes = sum(r.size for r in rows_)
        floor = raw * 8 / (args.rate * 1e6)
        print(f"day: {args.n} + 4 mammograms ({args.source}), {args.compression}, {args.rate:g} Mbit/s, "
              f"30 ms, 1 % loss, a {args.down:g} s outage every {args.period:g} s ({outages.count} outages)")
        print(f"  the study (priority {args.study_priority}) at the PACS {study_s:.1f} s after its last view landed, "
              f"{behind} images of the day still waiting then")
        print(f"  the day drained in {elapsed / 60:.1f} min; raw-bytes floor {floor / 60:.1f} min "
              f"({elapsed / floor:.2f}x the floor); {raw / 1e6:.0f} MB of images sent as {sent_bytes / 1e6:.0f} MB "
              f"({raw / max(1, sent_bytes):.2f}:1)")
        print(f"  attempts per image: mean {sum(r.attempts for r in rows_) / max(1, len(rows_)):.2f}; "
              f"instances at the PACS {orthanc.instance_count()} (the SRs of the last images may still be on their way)")
        proxy.close()
        orthanc.stop()


def big(args: argparse.Namespace) -> None:
    from medsendx_edge.upload.destinations import make_destination
    from medsendx_edge.upload.uploader import Uploader

    with tempfile.TemporaryDirectory() as tmp, linkemu.Link(rate_mbit=RATE_MBIT) as link:
        tmpp = Path(tmp)
        src = tmpp / "big.dcm"
        with open(src, "wb") as fh:
            for _ in range(args.mb):
                fh.write(os.urandom(1 << 20))
        size = src.stat().st_size
        far: subprocess.Popen | None = None
        orthanc = None
        if args.dest == "s3":
            port = free_port()
            far = subprocess.Popen([*link.prefix, sys.executable, "-m", "moto.server", "-H", "0.0.0.0", "-p", str(port)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            import boto3
            from botocore.config import Config

            for _ in range(100):
                try:
                    boto3.client("s3", endpoint_url=f"http://{link.far_ip}:{port}", region_name="us-east-1",
                                 aws_access_key_id="a", aws_secret_access_key="b",
                                 config=Config(s3={"addressing_style": "path"})).create_bucket(Bucket="truck-images")
                    break
                except Exception:  # noqa: BLE001 - still starting
                    time.sleep(0.2)
            proxy = linkemu.DelayProxy((link.far_ip, port), delay_s=0.03, loss=0.01)
            secret = tmpp / "secret"
            secret.write_text("b")
            dcfg = DestinationConfig(kind="s3", path=None, url=f"http://127.0.0.1:{proxy.port}", bucket="truck-images",
                                     username="a", password_file=secret, part_size_mb=args.part_mb, timeout_s=20)
        else:
            orthanc = OrthancServer(tmpp / "orthanc", link=link)
            proxy = linkemu.DelayProxy((link.far_ip, orthanc.port), delay_s=0.03, loss=0.01)
            dcfg = DestinationConfig(kind="http", path=None, http_method="PUT", delivery_proof="status",
                                     url=f"http://127.0.0.1:{proxy.port}/tools/no-such-endpoint/{{id}}",
                                     timeout_s=20)
        spool = Spool(tmpp / "spool")
        item_id = new_id()
        spool.publish_file(OUTBOX, item_id, src)
        configure_logging("warning", "json", stream=open(os.environ.get("BENCH_LOG", "/dev/null"), "w"))
        up = Uploader(spool, make_destination(dcfg), UploadConfig(initial_backoff_s=1.0, max_backoff_s=10.0))
        up.reconcile()
        t0 = time.monotonic()
        thread = threading.Thread(target=up.run, daemon=True)
        thread.start()
        outages = linkemu.Outages(link, proxy, period_s=args.period, down_s=args.down)
        deadline = t0 + args.give_up_s
        while not spool.path(SENT, item_id).exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        elapsed = time.monotonic() - t0
        outages.close()
        up.stop.set()
        up.wake.set()
        row = spool.state.item(item_id)
        ok = row is not None and row.state == "delivered"
        print(f"one {args.mb} MB object to {args.dest}: {'DELIVERED' if ok else 'NOT delivered'} "
              f"after {elapsed:.0f} s ({outages.count} outages, {link.outage_s:.0f} s down), "
              f"{row.attempts if row else '?'} attempts, {proxy.up_bytes / 1e6:.0f} MB on the wire "
              f"({proxy.up_bytes / size:.2f}x the object)")
        if args.dest == "s3":
            d = up.destination
            print(f"  parts sent {d.parts_sent}, parts the store already held on resuming {d.parts_skipped}")
        proxy.close()
        if far is not None:
            far.terminate()
        if orthanc is not None:
            orthanc.stop()


def main() -> int:
    why = linkemu.available()
    if why:
        print(f"bench_link: {why}")
        return 2
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=["backlog", "big", "day"])
    ap.add_argument("--source", default="films", help="day: films | independent | phantom")
    ap.add_argument("--study-after", type=int, default=10, help="day: images delivered before the study lands")
    ap.add_argument("--rate", type=float, default=RATE_MBIT, help="day: the uplink in Mbit/s")
    ap.add_argument("--study-priority", choices=["recheck", "high"], default="recheck",
                    help="day: what makes the study urgent (an underexposed retake, or a dense breast)")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--size", default="2048x1664")
    ap.add_argument("--compression", default="jpeg-ls")
    ap.add_argument("--mb", type=int, default=500)
    ap.add_argument("--part-mb", type=float, default=8.0)
    ap.add_argument("--dest", choices=["s3", "http"], default="s3")
    ap.add_argument("--period", type=float, default=120.0)
    ap.add_argument("--down", type=float, default=30.0)
    ap.add_argument("--give-up-s", type=float, default=3600.0)
    args = ap.parse_args()
    {"backlog": backlog, "big": big, "day": day}[args.phase](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
