"""A hub worker: :class:`~hub.core.HubCore` fed from MQTT.

Several workers split the load of one broker through a shared subscription
(``$share/hub/...``) and share one database.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from drivers.collector import steady_gc
from hub.core import HubCore
from hub.reconnect import Outage
from protocols import command, topics
from protocols.receipt import seal_receipt, seal_refusal

if TYPE_CHECKING:
    import aiomqtt

    from protocols import ed25519

__all__ = ["Hub", "publish", "quiet_closed_sockets"]

log = logging.getLogger(__name__)
# the MQTT client's own log: it says "failed to receive on socket" (at ERROR) for every
# outage the worker reports itself, once, in its own words (hub.reconnect)
_client_log = logging.getLogger("hub.mqtt")
_client_log.setLevel(logging.CRITICAL)


async def publish(client: aiomqtt.Client, topic: str, data: bytes, **kw: Any) -> None:
    """``client.publish``, honouring a cancellation it swallowed: aiomqtt waits with
    ``asyncio.wait_for``, which on Python 3.11 returns the result when the publish
    completes as the cancellation lands, and a TaskGroup cancels its tasks once.
    The task still says it is being cancelled: without this the worker can outlive
    SIGTERM for good."""
    await client.publish(topic, data, **kw)
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def quiet_closed_sockets(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """An event loop exception handler: aiomqtt schedules add_writer for its socket from
    the client's callback, and when the broker has just closed that socket the
    callback fails with EBADF, which asyncio would print as a traceback. It is part
    of an outage already reported; anything else goes to the default handler."""
    exc = context.get("exception")
    if isinstance(exc, OSError) and exc.errno == errno.EBADF:
        log.debug("a socket closed under the MQTT client: %s", context.get("message"))
        return
    loop.default_exception_handler(context)


class Hub:
    """A hub worker: :class:`HubCore` fed from MQTT through a shared subscription.

    With ``persistent=True`` the hub keeps a broker session (clean session off,
    a client id stable across restarts: ``vitals-hub-<worker>``): what gateways
    publish while the hub is away is queued for it by the broker. Without it, a
    batch the broker acknowledged while no hub was subscribed is gone, whatever
    the gateway does.

    With ``ack_after_write`` (the default) a message is acknowledged to the
    broker (PUBACK) only once what it carried is written: a hub killed between
    receiving and writing gets it again from its session. aiomqtt 2.x has no
    public manual acknowledgement (empicano/aiomqtt#345), so this reaches its
    paho client (``manual_ack_set``, ``ack``), which aiomqtt pins (<3). The
    broker then bounds the messages in flight to a worker by its
    ``max_inflight_messages`` (Mosquitto: 20 by default; 0 is no bound).

    With ``hub_key`` the worker answers for what it stored (issue 15,
    ``protocols.receipt``): after each write it publishes a signed receipt to each
    gateway it wrote for (at most once per second per gateway, and once per
    heartbeat), a receipt of kind "event" after each edge event it stored (at most
    once per second per gateway), a receipt of kind "refused" for the batches it
    refused for good (too old, a payload that does not decode: the gateway deletes
    them), and asks a gateway that sends heartbeats for the seqs it misses
    longer than the core's ``hole_grace_s`` with a signed ``resend`` command.

    The connection is retried for ever with jittered, capped back-off; an
    outage is logged once when it starts and once when it ends
    (:class:`~hub.reconnect.Outage`).
    """

    def __init__(
        self,
        core: HubCore,
        *,
        host: str = "127.0.0.1",
        port: int = 1883,
        prefix: str | None = None,  # default: the core's
        group: str = "hub",
        shared: bool = True,
        client_id: str = "",
        persistent: bool = False,
        ack_after_write: bool = True,
        flush_interval_s: float = 0.2,
        backoff_max_s: float = 5.0,
        tls: ssl.SSLContext | None = None,
        hub_key: ed25519.PrivateKey | None = None,
    ) -> None:
        self.core = core
        self.hub_key = hub_key
        self._written = False  # a write since the last look: receipts may be due
        self.host, self.port, self.group = host, port, group
        self.prefix = core.prefix if prefix is None else prefix
        self.shared = shared  # amqtt (the demo's embedded broker) has no shared subscriptions
        if not client_id:
            client_id = f"vitals-hub-{core.worker}" if persistent else f"vitals-hub-{id(self):x}"
        self.client_id = client_id
        self.persistent = persistent
        self.ack_after_write = ack_after_write
        self.flush_interval_s = flush_interval_s
        self.tls = tls
        self.subscribed = asyncio.Event()
        self.results: Counter[str] = Counter()
        self.outage = Outage(log, "hub worker", host, port, cap_s=backoff_max_s)
        self._unacked: list[tuple[int, int]] = []  # (mid, qos) of messages not yet written
        self._paho: Any = None  # the connected client's paho client, for manual acks
        self.write_failed: BaseException | None = None

    def _filters(self) -> list[str]:
        out = []
        for kind in ("batch", "gap", "event", "hb"):
            f = topics.subscription(kind, self.prefix)
            out.append(topics.shared(self.group, f) if self.shared else f)
        out.append(topics.subscription("meta", self.prefix))
        return out

    def commit(self) -> None:
        """Write what the core holds, then acknowledge every message it came in. A
        failed write acknowledges nothing, and the worker stops (:attr:`write_failed`):
        its session keeps the messages for the next start."""
        try:
            self.core.flush()
        except BaseException as exc:
            self.write_failed = exc
            raise
        unacked, self._unacked = self._unacked, []
        self._written = True
        paho = self._paho
        if paho is not None:
            for mid, qos in unacked:
                paho.ack(mid, qos)

    async def run(self) -> None:
        """Receive until cancelled, reconnecting when the broker goes away; on the way
        out (SIGTERM) write what is held and acknowledge it."""
        import aiomqtt  # the hub extra: `vitals hub stats` and `token` work without it

        with steady_gc():  # start-up is done: the core holds the store and the keys
            try:
                while True:
                    client = aiomqtt.Client(
                        self.host,
                        self.port,
                        identifier=self.client_id,
                        clean_session=not self.persistent,
                        max_queued_incoming_messages=100_000,
                        tls_context=self.tls,
                        logger=_client_log,
                        timeout=5.0,
                    )
                    if self.ack_after_write:
                        client._client.manual_ack_set(True)
                    try:
                        async with client:
                            for f in self._filters():
                                await client.subscribe(f, qos=1)
                            self._paho = client._client if self.ack_after_write else None
                            self.subscribed.set()
                            self.outage.up()
                            try:
                                async with asyncio.TaskGroup() as tg:
                                    tg.create_task(self._flusher(), name="hub.flush")
                                    tg.create_task(self._receive(client), name="hub.receive")
                                    tg.create_task(self._clock(client), name="hub.time")
                                    if self.hub_key is not None:
                                        tg.create_task(self._answer(client), name="hub.receipts")
                            finally:
                                # lost or stopping: write what is held; the acks go out only
                                # if the connection is still up (else the session redelivers)
                                if self.write_failed is None:
                                    self.commit()
                                self._paho = None
                    except* aiomqtt.MqttError as group:
                        self.subscribed.clear()
                        self._paho = None
                        if self.write_failed is not None:
                            raise self.write_failed from None
                        self.commit()
                        await asyncio.sleep(self.outage.down(group.exceptions[0]))
            finally:
                self._paho = None
                self.subscribed.clear()
                if self.write_failed is None:
                    self.core.flush()

    async def _receive(self, client: aiomqtt.Client) -> None:
        core, results = self.core, self.results
        async for msg in client.messages:
            payload = msg.payload
            if isinstance(payload, bytes | bytearray):
                try:
                    results[core.handle(msg.topic.value, bytes(payload))] += 1
                except BaseException as exc:  # a write inside (meta, gap, event) failed
                    self.write_failed = exc
                    raise
            if msg.qos and self._paho is not None:
                self._unacked.append((msg.mid, msg.qos))
            if (core.buffered or self._unacked) and not len(client.messages):
                # one turn of the loop lets the client read what the socket holds; if
                # nothing came, the broker has nothing more queued: write now rather
                # than at the flusher's next tick (under load the queue is never empty)
                await asyncio.sleep(0)
                if not len(client.messages):
                    self.commit()

    async def _clock(self, client: aiomqtt.Client, every_s: float = 1.0) -> None:
        """The hub's time, each second, retained: ``vitals diag uplink`` checks a
        gateway's clock against it (MQTT itself carries no time)."""
        topic = topics.hub_time(self.prefix)
        while True:
            await publish(client, topic, f"{time.time():.3f}".encode(), qos=0, retain=True)
            await asyncio.sleep(every_s)

    async def _answer(self, client: aiomqtt.Client, every_s: float = 1.0) -> None:
        """Receipts after each write (and each heartbeat), resend asks for holes.

        It looks every 50 ms whether a write happened (no timeout around a wait: on
        Python 3.11 a cancellation landing as the timeout expires can be taken for
        the timeout, and SIGTERM must end the worker)."""
        core, key = self.core, self.hub_key
        assert key is not None
        next_look = next_holes = 0.0
        while True:
            await asyncio.sleep(0.05)
            for gw, entries in core.event_receipts_due():  # events are written as they come
                wire = seal_receipt(key, gw, entries, time.time_ns() // 1_000_000, kind="event")
                core.counters["event_receipts_sent"] += 1  # counted as it goes (below)
                await publish(client, topics.receipt(gw, self.prefix), wire, qos=1)
            # batches refused for good were recorded as they came: settle them now
            for gw, refused in core.refusals_due():
                wire = seal_refusal(key, gw, refused, time.time_ns() // 1_000_000)
                core.counters["refusals_sent"] += 1
                await publish(client, topics.receipt(gw, self.prefix), wire, qos=1)
            if not self._written and time.monotonic() < next_look:
                continue
            self._written = False
            next_look = time.monotonic() + every_s
            now = time.monotonic()
            t_ms = time.time_ns() // 1_000_000
            for gw, entries in core.receipts_due(now):
                wire = seal_receipt(key, gw, entries, t_ms)
                # counted as it goes out: the gateway may have it before the broker's
                # PUBACK returns here, and a stop then must not lose the count
                core.counters["receipts_sent"] += 1
                await publish(client, topics.receipt(gw, self.prefix), wire, qos=1)
            if now < next_holes:
                continue
            next_holes = now + min(5.0, core.hole_grace_s / 3)
            for gw, epoch, ranges in core.asks_due(now):
                wire, _ = command.command(
                    "resend",
                    {"epoch": epoch, "ranges": [list(r) for r in ranges]},
                    gateway=gw,
                    hub_key=key,
                    now_ms=t_ms,
                    ttl_ms=max(10_000, int(core.hole_grace_s * 1000)),
                )
                log.info(
                    "hub: asking %s to resend epoch %d seqs %s",
                    gw,
                    epoch,
                    ", ".join(f"{lo}-{hi}" for lo, hi in ranges[:4])
                    + (" ..." if len(ranges) > 4 else ""),
                )
                await publish(client, topics.cmd(gw, self.prefix), wire, qos=1)

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            if self.core.buffered or self._unacked:
                self.commit()
