"""Prometheus metrics for the fleet's monitoring (prometheus-client): what the truck is doing, for 30
trucks on one dashboard.  No patient data: counts, bytes, seconds, stage and error-class names.

* Counted as it happens (the stage runner, the uploader, triage): files processed per stage and outcome,
  files quarantined per stage and error class, stage latency histograms, images and bytes delivered,
  positioning checks by check and result.
* Read at scrape time from the spool and the state database (a collector, so a restarted daemon reports
  the truth, not counters reset to zero): the build (version, station), queue depths, backlog bytes, goodput and time to drain, uplink
  state and how long it has been down, rechecks in the last 24 h, items awaiting commitment, bytes not
  re-sent, free disk.

``metrics.enabled`` serves ``/metrics`` on ``metrics.bind:metrics.port`` (loopback by default) in its own
thread; a scrape reads files and SQLite, never takes a lock the pipeline or the uploader holds.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from medsendx_edge.vocabulary import Uplink

REGISTRY = CollectorRegistry()

FILES = Counter("medsendx_files_processed_total", "Files through a stage, by outcome",
                ["stage", "outcome"], registry=REGISTRY)
QUARANTINED = Counter("medsendx_files_quarantined_total", "Files quarantined, by stage and error class",
                      ["stage", "error_class"], registry=REGISTRY)
STAGE_SECONDS = Histogram("medsendx_stage_seconds", "Time a stage takes per file", ["stage"], registry=REGISTRY,
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
POSITIONING = Counter("medsendx_positioning_checks_total",
                      "Positioning and blur checks of triaged mammograms, by check and result (pass, fail, not "
                      "measured): failure rates per truck, no operator identity", ["check", "result"],
                      registry=REGISTRY)
DELIVERED = Counter("medsendx_delivered_total", "Objects delivered to the destination", ["destination"],
                    registry=REGISTRY)
DELIVERED_BYTES = Counter("medsendx_delivered_bytes_total", "Bytes delivered to the destination (as sent)",
                          ["destination"], registry=REGISTRY)


class SpoolCollector(Collector):
    """Gauges read from the spool and the state database at each scrape."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from medsendx_edge import __version__

        build = GaugeMetricFamily("medsendx_build_info", "The daemon's version and its station (always 1)",
                                  labels=["version", "station"])
        build.add_metric([__version__, str(self.daemon.cfg.station_name)], 1)
        yield build
        spool = self.daemon.spool
        counts = spool.counts()
        queue = GaugeMetricFamily("medsendx_queue_items", "Items waiting in each spool queue", labels=["queue"])
        for name, n in counts.items():
            queue.add_metric([name], n)
        yield queue
        summary = spool.state.queue_summary()
        backlog = summary["backlog"]
        yield GaugeMetricFamily("medsendx_backlog_bytes", "Bytes queued for upload", value=backlog["bytes"])
        yield GaugeMetricFamily("medsendx_goodput_bytes_per_second", "Delivered bytes per second, last 10 minutes",
                                value=backlog["goodput_bps_10min"])
        if backlog["drain_s"] is not None:
            yield GaugeMetricFamily("medsendx_drain_seconds", "Estimated time to send the backlog",
                                    value=backlog["drain_s"])
        yield GaugeMetricFamily("medsendx_not_resent_bytes", "Bytes a re-send did not send (already there)",
                                value=backlog["bytes_not_resent"])
        states = GaugeMetricFamily("medsendx_upload_items", "Upload queue rows by state", labels=["state"])
        for state, n in dict(summary["states"]).items():
            states.add_metric([state], n)
        yield states
        uplink, _reason, since = spool.state.uplink()
        yield GaugeMetricFamily("medsendx_uplink_up", "1 while the uplink works, 0 down or paused",
                                value=1 if uplink is Uplink.UP else 0)
        down_s = time.time() - since if since is not None and uplink is Uplink.DOWN else 0.0
        yield GaugeMetricFamily("medsendx_uplink_down_seconds", "How long the uplink has been down", value=down_s)
        last = spool.state.last_delivery()
        if last is not None:
            yield GaugeMetricFamily("medsendx_last_delivery_timestamp_seconds",
                                    "When an image was last confirmed delivered (committed, with storage "
                                    "commitment); read from the state database, so a restart keeps it",
                                    value=last)
        yield GaugeMetricFamily("medsendx_rechecks_last_24h", "Images flagged recheck in the last 24 hours",
                                value=len(list(summary["recheck_last_24h"])))
        yield GaugeMetricFamily("medsendx_disk_free_bytes", "Free bytes on the spool's file system",
                                value=shutil.disk_usage(spool.root).free)
        yield GaugeMetricFamily("medsendx_disk_low", "1 while the disk guard holds the inbox",
                                value=1 if self.daemon.disk_low else 0)


def serve(daemon: Any, bind: str, port: int) -> Any:
    """Serve ``/metrics`` in a daemon thread; returns the server (``server_port``, ``shutdown()``)."""
    REGISTRY.register(SpoolCollector(daemon))
    server, _thread = start_http_server(port, addr=bind, registry=REGISTRY)
    return server


def stop(server: Any) -> None:
    server.shutdown()
    server.server_close()
    for collector in list(REGISTRY._collector_to_names):  # noqa: SLF001 - the spool collector goes with it
        if isinstance(collector, SpoolCollector):
            REGISTRY.unregister(collector)
