"""The hub's Prometheus endpoint: ``vitals hub --metrics-port 9464``.

Served from the worker's own event loop (no thread: the numbers are read where
they are kept), bound to 127.0.0.1 unless ``--metrics-host`` says otherwise.
Counters are this worker's (Prometheus sums the workers); per gateway only what
is one number a gateway: its missing batches and the time of its newest batch.

======================================================  ==============================
``vitals_hub_batches_stored_total``                     batches verified and written
``vitals_hub_readings_stored_total``                    their readings
``vitals_hub_refused_total{reason}``                    messages refused, by reason
``vitals_hub_duplicates_total``                         batches received again
``vitals_hub_enrollments_total{status}``                enrollment requests, by answer
``vitals_hub_gap_notices_total``                        signed "I had to drop" notices
``vitals_hub_events_total``                             edge events stored
``vitals_hub_receipts_sent_total``                      signed receipts sent
``vitals_hub_resend_asks_total``                        resend commands for holes
``vitals_hub_hole_batches``                             batches missing (tail included)
``vitals_hub_missing_batches{gateway}``                 below its newest seq, neither
                                                        arrived nor declared dropped
``vitals_hub_gateway_last_batch_timestamp_seconds``     its newest batch's last reading
``vitals_hub_lag_seconds``                              histogram: a batch's last
                                                        reading to its write
``vitals_hub_buffered_batches``                         verified, not yet written
``vitals_hub_broker_connected``                         1 while subscribed
``vitals_hub_broker_outages_total``                     connections lost
======================================================  ==============================
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from drivers.scrape import start_endpoint
from hub.store import BatchRow

if TYPE_CHECKING:
    from hub.core import HubCore
    from hub.worker import Hub

__all__ = ["Metrics", "start_metrics"]

_LAG_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400)


class Metrics(Collector):
    """The numbers of one worker, read from its core and worker at each scrape."""

    def __init__(self, core: HubCore, worker: Hub | None = None) -> None:
        self.core, self.worker = core, worker
        self.registry = CollectorRegistry(auto_describe=True)
        self.lag = Histogram(
            "vitals_hub_lag_seconds",
            "From a batch's last reading (the gateway's clock) to its write at the hub",
            buckets=_LAG_BUCKETS,
            registry=self.registry,
        )
        self.last_batch: dict[str, int] = {}  # gateway -> newest t1 (ms) stored
        self.registry.register(self)
        core.on_flush = self._flushed

    def _flushed(self, batches: list[BatchRow], won: list[bool]) -> None:
        now_ms = time.time_ns() // 1_000_000
        last = self.last_batch
        for row, ok in zip(batches, won, strict=True):
            if ok:
                gw, t1 = row[0], row[5]
                self.lag.observe(max(0, now_ms - t1) / 1000.0)
                if t1 > last.get(gw, -1):
                    last[gw] = t1

    def collect(self) -> Iterator[Metric]:
        c = dict(self.core.counters)

        def counter(name: str, doc: str, value: int) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield counter(
            "vitals_hub_batches_stored", "Batches verified and written", c.get("batches", 0)
        )
        yield counter(
            "vitals_hub_readings_stored", "Readings of the batches written", c.get("readings", 0)
        )
        yield counter(
            "vitals_hub_duplicates", "Batches received again (dropped)", c.get("duplicates", 0)
        )
        yield counter(
            "vitals_hub_gap_notices",
            "Signed notices of batches a gateway dropped",
            c.get("gap_notices", 0),
        )
        yield counter("vitals_hub_events", "Edge events stored", c.get("events", 0))
        yield counter(
            "vitals_hub_receipts_sent",
            "Signed receipts sent to gateways",
            c.get("receipts_sent", 0),
        )
        yield counter(
            "vitals_hub_resend_asks",
            "Signed resend commands for batches missing past the grace time",
            c.get("resend_asks", 0),
        )
        yield GaugeMetricFamily(
            "vitals_hub_hole_batches",
            "Batches missing from the gateways that send heartbeats (tail included)",
            value=self.core.hole_batches(),
        )
        refused = CounterMetricFamily(
            "vitals_hub_refused", "Messages refused, by reason", labels=["reason"]
        )
        enrolled = CounterMetricFamily(
            "vitals_hub_enrollments", "Enrollment requests, by the hub's answer", labels=["status"]
        )
        for key, value in sorted(c.items()):
            if key.startswith("rejected."):
                refused.add_metric([key.removeprefix("rejected.")], value)
            elif key.startswith("enroll."):
                enrolled.add_metric([key.removeprefix("enroll.")], value)
        yield refused
        yield enrolled
        missing = GaugeMetricFamily(
            "vitals_hub_missing_batches",
            "Batches below a gateway's newest seq that neither arrived nor were declared dropped",
            labels=["gateway"],
        )
        for gw, n in sorted(self.core.missing().items()):
            missing.add_metric([gw], n)
        yield missing
        newest = GaugeMetricFamily(
            "vitals_hub_gateway_last_batch_timestamp_seconds",
            "The last reading of a gateway's newest stored batch (Unix time, gateway's clock)",
            labels=["gateway"],
        )
        for gw, t1 in sorted(self.last_batch.items()):
            newest.add_metric([gw], t1 / 1000.0)
        yield newest
        yield GaugeMetricFamily(
            "vitals_hub_buffered_batches", "Verified, not yet written", value=self.core.buffered
        )
        if self.worker is not None:
            yield GaugeMetricFamily(
                "vitals_hub_broker_connected",
                "1 while the worker is connected and subscribed",
                value=int(self.worker.subscribed.is_set()),
            )
            yield counter(
                "vitals_hub_broker_outages",
                "Connections to the broker lost",
                self.worker.outage.outages,
            )

    def text(self) -> bytes:
        return generate_latest(self.registry)


async def start_metrics(
    metrics: Metrics, host: str = "127.0.0.1", port: int = 9464
) -> asyncio.Server:
    """Listen for ``GET /metrics`` (Prometheus text format); OSError if the address
    cannot be bound. Serves until the server is closed (``serve_forever``)."""

    async def render() -> bytes:
        return metrics.text()

    return await start_endpoint(render, host, port, content_type=CONTENT_TYPE_LATEST)
