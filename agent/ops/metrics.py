"""The gateway's Prometheus endpoint: ``[metrics] listen = "127.0.0.1:9108"``.

Off unless configured; this module (and prometheus-client) is imported only
then, so ``vitals run`` without metrics pays nothing. Nothing is counted for it
on the hot path but the reply-time counts: :class:`AgentCollector` reads
``Agent.statistics()`` at each scrape and turns it into metric families. The endpoint is served from the
agent's own event loop (an asyncio handler, no server thread): the counters are read
where they are kept, never while a poll changes them (the snapshot's text is
then made in a worker thread).

Labels are only ``bus``, ``device``, ``protocol``, ``reason``, ``state``,
``status``: names the configuration or the code fixes, never a point or a
value, so the series are bounded by the configuration. Reply times are a
histogram per protocol (``vitals_modbus_reply_seconds{protocol}``, buckets
``agent.fieldbus.poller.REPLY_BUCKETS_S``): each bus's poller adds one to a plain list per
reply, summed here by the bus's kind at each scrape. Per bus it would be 13
series a bus: 0.62 % of a core instead of 0.38 % at 500 Modbus TCP buses, over
the half point allowed (docs/decisions.md 26); per device, the last reply's
time is a gauge.

=====================================================  ============================
``vitals_bus_transactions_total{bus}``                 requests answered or not
``vitals_modbus_reply_seconds{protocol}``              histogram: rtu, tcp, rtu-over-tcp
``vitals_bus_timeouts_total{bus}``                     requests never answered
``vitals_bus_bad_frames_total{bus}``                   CRC, framing, MBAP errors
``vitals_bus_late_replies_total{bus}``                 replies after their timeout
``vitals_bus_link_downs_total{bus}``                   link lost (port, connection)
``vitals_bus_online{bus}``                             1 while the link is up
``vitals_device_polls_total{bus,device}``              polls
``vitals_device_polls_failed_total{bus,device}``       polls without a good reply
``vitals_device_reply_seconds{bus,device}``            the last reply's round trip
``vitals_device_state{bus,device,state}``              1 for the device's state
``vitals_spool_batches`` / ``_bytes`` / ``_disk_bytes``  what waits for the broker
``vitals_spool_oldest_age_seconds``                    the oldest batch waiting
``vitals_spool_unconfirmed_batches``                   sent, no hub receipt yet
``vitals_spool_dropped_batches_total{reason}``         spool_full, too_old, disk_full
``vitals_uplink_connected`` / ``_connects_total``      the broker connection
``vitals_events_fired_total`` ... ``_outbox``          edge rules, events waiting for the hub
``vitals_commands_total{status,reason}``               signed commands answered
``vitals_clock_synced`` / ``_jumps_total``             the system clock (NTP) state
=====================================================  ============================
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from agent.fieldbus.poller import REPLY_BUCKETS_S
from agent.ops.status import spool_oldest_age_s
from drivers.scrape import start_endpoint

__all__ = ["AgentCollector", "render", "serve_metrics", "snapshot"]

log = logging.getLogger(__name__)

_STATES = ("unknown", "online", "degraded", "offline")
_LE = (*(str(b) for b in REPLY_BUCKETS_S), "+Inf")

# (statistics key, metric name, help): per bus, from the poller and its link
_BUS_COUNTERS = (
    ("transactions", "vitals_bus_transactions", "Modbus requests sent on the bus"),
    ("timeouts", "vitals_bus_timeouts", "Requests never answered in time"),
    ("overruns", "vitals_bus_overruns", "Polls that fell behind their interval"),
    ("link_downs", "vitals_bus_link_downs", "Times the link (port, connection) was lost"),
    ("readings", "vitals_bus_readings", "Readings the bus delivered"),
)
_LINK_COUNTERS = (
    ("replies", "vitals_bus_replies", "Replies received"),
    ("bad_frames", "vitals_bus_bad_frames", "Replies refused: bad CRC, framing or header"),
    ("stray_bytes", "vitals_bus_stray_bytes", "Bytes received outside any reply"),
    ("connects", "vitals_bus_connects", "Link openings (connections, port opens)"),
    ("late_replies", "vitals_bus_late_replies", "Replies that came after their timeout"),
    ("echo_errors", "vitals_bus_echo_errors", "Own requests heard back wrong (RS-485 echo)"),
    ("resets", "vitals_bus_resets", "Connections dropped after a fault"),
)
_DEVICE_COUNTERS = (
    ("polls", "vitals_device_polls", "Polls of the device"),
    ("polls_failed", "vitals_device_polls_failed", "Polls without a good reply"),
    ("polls_skipped", "vitals_device_polls_skipped", "Polls skipped while backing off"),
)


def _num(d: Mapping[str, Any], key: str) -> float:
    value = d.get(key)
    return float(value) if isinstance(value, (int, float)) else 0.0


class AgentCollector(Collector):
    """The metric families of one snapshot of ``Agent.statistics()``.

    The snapshot is taken on the agent's loop (1.8 ms at 500 devices); turning
    it into text (50 ms) runs in a worker thread (:func:`render`), so the
    loop's polls are not held up by a scrape.
    """

    def __init__(self, stats: Mapping[str, Any], oldest_age_s: float | None = None) -> None:
        self.stats = stats
        self.oldest_age_s = oldest_age_s

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        yield from self._buses(stats.get("buses") or {})
        yield from self._spool(stats.get("spool") or {})
        yield from self._uplink(stats)
        yield GaugeMetricFamily(
            "vitals_uptime_seconds", "Seconds since the agent started", value=stats["uptime_s"]
        )
        clock = stats.get("clock")
        if clock is not None:
            yield GaugeMetricFamily(
                "vitals_clock_synced",
                "1 while the system clock is synchronised (NTP); 0: readings are stamped "
                "from the monotonic clock and corrected at the sync",
                value=float(bool(clock["synced"])),
            )
            yield CounterMetricFamily(
                "vitals_clock_jumps",
                "Steps of the wall clock seen while running",
                value=clock["jumps"],
            )
        yield GaugeMetricFamily(
            "vitals_epoch", "The agent's epoch (one more each start)", value=stats["epoch"]
        )

    def _buses(self, buses: Mapping[str, Any]) -> Iterator[Metric]:
        bus_l, dev_l = ["bus"], ["bus", "device"]
        fams = {
            key: CounterMetricFamily(name, doc, labels=bus_l)
            for key, name, doc in (*_BUS_COUNTERS, *_LINK_COUNTERS)
        }
        online = GaugeMetricFamily(
            "vitals_bus_online", "1 while the bus's link is up", labels=bus_l
        )
        devs = {
            key: CounterMetricFamily(name, doc, labels=dev_l) for key, name, doc in _DEVICE_COUNTERS
        }
        rtt = GaugeMetricFamily(
            "vitals_device_reply_seconds",
            "Round trip of the device's last reply (a gauge: no work on the poll path)",
            labels=dev_l,
        )
        state = GaugeMetricFamily(
            "vitals_device_state",
            "1 for the device's current state (unknown, online, degraded, offline)",
            labels=[*dev_l, "state"],
        )
        for bus, b in sorted(buses.items()):
            link = b.get("link") or {}
            for key, *_ in _BUS_COUNTERS:
                if key in b:
                    fams[key].add_metric([bus], _num(b, key))
            for key, *_ in _LINK_COUNTERS:
                if key in link:
                    fams[key].add_metric([bus], _num(link, key))
            online.add_metric([bus], 0.0 if b.get("state") == "offline" else 1.0)
            for dev, d in sorted((b.get("devices") or {}).items()):
                for key, *_ in _DEVICE_COUNTERS:
                    if key in d:
                        devs[key].add_metric([bus, dev], _num(d, key))
                if "rtt_ms" in d:
                    rtt.add_metric([bus, dev], _num(d, "rtt_ms") / 1000.0)
                for s in _STATES:
                    state.add_metric([bus, dev, s], float(d.get("state") == s))
        yield from fams.values()
        yield online
        yield _replies(buses)
        yield from devs.values()
        yield rtt
        yield state

    def _spool(self, sp: Mapping[str, Any]) -> Iterator[Metric]:
        def gauge(name: str, doc: str, key: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=_num(sp, key))

        def counter(name: str, doc: str, key: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=_num(sp, key))

        yield gauge("vitals_spool_batches", "Batches waiting for the broker's ack", "depth_batches")
        yield gauge("vitals_spool_bytes", "Bytes of the batches waiting", "depth_bytes")
        yield gauge("vitals_spool_disk_bytes", "The spool's files on disk", "disk_bytes")
        yield gauge("vitals_spool_max_bytes", "The spool's configured bound", "max_bytes")
        yield gauge("vitals_spool_disk_full", "1 while the disk is full", "disk_full")
        yield counter("vitals_spool_appended_batches", "Batches written to the spool", "appended")
        yield counter("vitals_spool_acked_batches", "Batches the broker acknowledged", "acked")
        # hub receipts (docs/reliability.md): sent = the broker has it; confirmed = the hub
        yield gauge(
            "vitals_spool_unconfirmed_batches",
            "Batches the broker acknowledged that wait for the hub's receipt",
            "sent_unconfirmed",
        )
        yield counter(
            "vitals_spool_sent_batches",
            "Publishes the broker acknowledged, receipts on (a batch sent again counts again)",
            "sent",
        )
        yield counter(
            "vitals_spool_confirmed_batches", "Batches the hub's receipt confirmed", "confirmed"
        )
        yield counter(
            "vitals_spool_republished_batches",
            "Batches published again: no receipt in time, or the hub asked",
            "republished",
        )
        yield counter(
            "vitals_spool_split_batches", "Batches re-sealed smaller: they could not pass", "split"
        )
        yield counter(
            "vitals_spool_dropped_readings", "Readings of the batches dropped", "dropped_readings"
        )
        yield counter(
            "vitals_spool_disk_full_events", "Times the disk was found full", "disk_full_events"
        )
        dropped = CounterMetricFamily(
            "vitals_spool_dropped_batches",
            "Batches dropped before the broker had them, by reason",
            labels=["reason"],
        )
        for reason in ("spool_full", "too_old", "disk_full"):
            dropped.add_metric([reason], _num(sp, f"dropped_{reason}"))
        yield dropped
        if self.oldest_age_s is not None:
            yield GaugeMetricFamily(
                "vitals_spool_oldest_age_seconds",
                "Age of the oldest batch waiting (absent while the spool is empty)",
                value=self.oldest_age_s,
            )

    def _uplink(self, stats: Mapping[str, Any]) -> Iterator[Metric]:
        up = stats.get("uplink") or {}
        yield GaugeMetricFamily(
            "vitals_uplink_connected",
            "1 while connected to the broker",
            value=_num(up, "connected"),
        )
        yield CounterMetricFamily(
            "vitals_uplink_connects", "Connections made to the broker", value=_num(up, "connects")
        )
        yield CounterMetricFamily(
            "vitals_uplink_connect_failures",
            "Connection attempts that failed",
            value=_num(up, "connect_failures"),
        )
        yield CounterMetricFamily(
            "vitals_uplink_readings_acked",
            "Readings the broker acknowledged",
            value=_num(up, "readings_acked"),
        )
        yield GaugeMetricFamily(
            "vitals_uplink_in_flight",
            "Batches sent, not yet acknowledged",
            value=_num(up, "in_flight"),
        )
        batch = stats.get("batch") or {}
        yield CounterMetricFamily(
            "vitals_readings", "Readings polled into batches", value=_num(batch, "readings_in")
        )
        yield CounterMetricFamily(
            "vitals_batches_sealed", "Batches sealed", value=_num(batch, "batches_sealed")
        )
        ev = stats.get("events")
        if ev is not None:
            for key, doc in (
                ("fired", "Edge rules that fired"),
                ("cleared", "Edge rules that cleared"),
                ("published", "Edge events the broker acknowledged"),
                ("dropped", "Edge events dropped (outbox full)"),
                ("confirmed", "Edge events a hub receipt confirmed"),
                ("republished", "Edge events sent again (no hub receipt in time)"),
            ):
                yield CounterMetricFamily(f"vitals_events_{key}", doc, value=_num(ev, key))
            yield GaugeMetricFamily(
                "vitals_events_active", "Edge rules fired, not cleared", value=_num(ev, "active")
            )
            yield GaugeMetricFamily(
                "vitals_events_outbox", "Edge events waiting for the hub", value=_num(ev, "outbox")
            )
        cmds = stats.get("commands")
        if cmds is not None:
            fam = CounterMetricFamily(
                "vitals_commands",
                "Signed commands answered, by status and reason",
                labels=["status", "reason"],
            )
            for key, value in sorted(cmds.items()):
                status, _, reason = key.partition(".")
                fam.add_metric([status, reason], float(value))
            yield fam


def _replies(buses: Mapping[str, Any]) -> HistogramMetricFamily:
    """The buses' reply counts (``reply_counts``, per bucket) summed by their ``kind``."""
    sums: dict[str, tuple[list[int], list[float]]] = {}
    for b in buses.values():
        counts, kind = b.get("reply_counts"), b.get("kind")
        if not isinstance(kind, str) or not counts or len(counts) != len(_LE):
            continue
        total, s = sums.setdefault(kind, ([0] * len(_LE), [0.0]))
        for i, n in enumerate(counts):
            total[i] += n
        s[0] += _num(b, "reply_sum_s")
    fam = HistogramMetricFamily(
        "vitals_modbus_reply_seconds",
        "Time from a request's sending to its reply, polls of every bus of the protocol",
        labels=["protocol"],
    )
    for kind, (total, s) in sorted(sums.items()):
        cumulative, buckets = 0, []
        for le, n in zip(_LE, total, strict=True):
            cumulative += n
            buckets.append((le, float(cumulative)))
        fam.add_metric([kind], buckets, s[0])
    return fam


def snapshot(agent: Any) -> dict[str, Any]:
    """``agent.statistics()`` with what the metrics add: each bus's kind (the
    protocol), the clock's state. On the agent's loop: a copy, then any thread."""
    stats: dict[str, Any] = agent.statistics()  # a snapshot: fresh dicts and numbers
    buses = stats.get("buses") or {}
    for bus in agent.config.buses:
        if bus.name in buses:
            buses[bus.name]["kind"] = bus.kind
    clock: Any = getattr(agent, "clock", None)
    if hasattr(clock, "synced"):  # agent.clock.SystemClock (not a test's clock)
        stats["clock"] = {"synced": clock.synced, "jumps": getattr(clock, "jumps", 0)}
    return stats


def render(stats: Mapping[str, Any], oldest_age_s: float | None = None) -> bytes:
    """The Prometheus text of a snapshot of ``Agent.statistics()`` (any thread)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(stats, oldest_age_s))
    return generate_latest(registry)


async def serve_metrics(agent: Any, host: str, port: int) -> None:
    """Answer ``GET /metrics`` on ``host:port`` until cancelled (a task of the agent).
    An address that cannot be bound is said once at ERROR: the agent polls on."""
    db = agent.config.gateway.state_dir / "spool.sqlite3"

    async def scrape() -> bytes:
        stats = snapshot(agent)
        spool = getattr(agent, "spool", None)
        # a spool opened on a full disk keeps its WAL index to itself (agent/ops/status.py)
        oldest = (
            None
            if getattr(spool, "exclusive", False)
            else await asyncio.to_thread(spool_oldest_age_s, db)
        )
        return await asyncio.to_thread(render, stats, oldest)

    try:
        server = await start_endpoint(scrape, host, port, content_type=CONTENT_TYPE_LATEST)
    except OSError as exc:
        log.error(
            "metrics: cannot listen on %s:%d (%s); the agent runs without its endpoint: "
            "free the port or change [metrics] listen",
            host,
            port,
            exc.strerror or exc,
        )
        return
    async with server:
        await server.serve_forever()
