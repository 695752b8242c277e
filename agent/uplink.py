"""The uplink: spooled batches to the broker over MQTT QoS 1.

A batch leaves the spool only when its PUBACK arrives; a lost connection
simply restarts from the oldest unacknowledged batch (the hub drops the
duplicates by (gateway, epoch, seq)).

Draining. Before each connection attempt the spool is cut in two at its newest
batch: what is older is the *backlog*, what is appended later is *live*; both
are read oldest first.
Up to ``window`` batches are in flight; when both have batches waiting, the
backlog gets ``backlog_share`` of the publish slots and live data the rest, so
after an outage fresh readings go out at once while the backlog drains; when
either is idle the other takes every slot.

Gap notices (:mod:`protocols.gap`) for batches the spool had to drop are sent
on ``{prefix}/{gateway}/gap`` before anything else, and their rows deleted on
PUBACK.

Reconnects back off with full jitter up to a cap; a broker that is unreachable
at start is normal (one log line, then quiet retries). A connection that
fails (lost, refused, a broker silent for 1.5 keepalives, a PUBACK later than
``publish_timeout_s``) fails every publish in flight at once: the session ends
and the next one resends them. The connection is :class:`agent.mqtt.MqttClient`
(docs/decisions.md, 17): a publish is a Future and a done-callback, no task.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent.commands import CommandExecutor, on_message
from agent.mqtt import MqttClient, MqttError
from agent.spool import Spool, SpoolRow
from protocols import topics
from protocols.gap import GapRange

__all__ = ["GapSigner", "Uplink", "UplinkSettings", "gap_topic"]

log = logging.getLogger(__name__)

GapSigner = Callable[[Sequence[GapRange]], bytes]


gap_topic = topics.gap  # signed gap notices, QoS 1


@dataclass(frozen=True)
class UplinkSettings:
    gateway: str
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    keepalive_s: int = 30
    prefix: str = topics.DEFAULT_PREFIX
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: ssl.SSLContext | None = field(default=None, repr=False)
    window: int = 32
    backlog_share: float = 0.5
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0
    publish_timeout_s: float = 30.0
    # a broker (or a NAT, a proxy) that accepts TCP but never answers CONNECT must
    # not hold the uplink for the publish timeout: give up and back off sooner
    connect_timeout_s: float = 10.0


class Uplink:
    def __init__(
        self,
        settings: UplinkSettings,
        spool: Spool,
        *,
        meta: bytes | None = None,
        gap_signer: GapSigner | None = None,
    ) -> None:
        if not 0.0 <= settings.backlog_share <= 1.0:
            raise ValueError("backlog_share must be within [0, 1]")
        self._s = settings
        self._spool = spool
        self._meta = meta
        self._gap_signer = gap_signer
        self.connected = asyncio.Event()
        self.connects = 0
        self.connect_failures = 0
        self.published = 0
        self.readings_acked = 0
        self.backlog_published = 0
        self.live_published = 0
        self.backlog_acked = 0
        self.gap_notices = 0
        self.in_flight = 0
        self.commands: CommandExecutor | None = None  # signed commands from the hub
        self.last_acked: tuple[int, int] | None = None
        self.last_error = ""
        self._gap_busy = False

    def statistics(self) -> dict[str, object]:
        return {
            "connected": self.connected.is_set(),
            "connects": self.connects,
            "connect_failures": self.connect_failures,
            "batches_acked": self.published,
            "readings_acked": self.readings_acked,
            "backlog_batches_sent": self.backlog_published,
            "live_batches_sent": self.live_published,
            "backlog_batches_acked": self.backlog_acked,
            "gap_notices_acked": self.gap_notices,
            "in_flight": self.in_flight,
            "last_acked": list(self.last_acked) if self.last_acked else None,
            "last_error": self.last_error,
        }

    def _client(self) -> MqttClient:
        s = self._s
        return MqttClient(
            s.host,
            s.port,
            client_id=s.client_id or f"vitals-{s.gateway}",
            username=s.username,
            password=s.password,
            keepalive=s.keepalive_s,
            tls=s.tls,
            will=(topics.status(s.gateway, s.prefix), b"offline", 1, True),
            farewell=(topics.status(s.gateway, s.prefix), b"offline", 0, True),
            connect_timeout=s.connect_timeout_s,
            ack_timeout=s.publish_timeout_s,
        )

    async def run(self) -> None:
        """Publish forever, reconnecting as needed. Cancel to stop."""
        s = self._s
        attempt = 0
        down_since = time.monotonic()
        while True:
            mark = self._spool.last_id  # older: backlog; appended from now on: live
            try:
                async with self._client() as client:
                    attempt = 0
                    self.connects += 1
                    self.connected.set()
                    log.info(
                        "uplink connected to %s:%d (%s); %d batches to send",
                        s.host,
                        s.port,
                        f"down {time.monotonic() - down_since:.1f} s"
                        if self.connects > 1
                        else "first",
                        self._spool.statistics()["depth_batches"],
                    )
                    await self._session(client, mark)
            except* MqttError as group:
                self.last_error = str(group.exceptions[0])
            if self.connected.is_set():
                down_since = time.monotonic()
                log.warning("uplink to %s:%d lost: %s", s.host, s.port, self.last_error)
            else:
                self.connect_failures += 1
                if self.connects == 0 and attempt == 0:
                    # normal at boot (the cabinet's modem may still be dialling)
                    log.info(
                        "broker %s:%d not reachable yet (%s); spooling, will keep trying",
                        s.host,
                        s.port,
                        self.last_error,
                    )
                elif attempt == 0:
                    log.warning("uplink cannot reach %s:%d: %s", s.host, s.port, self.last_error)
            self.connected.clear()
            attempt += 1
            cap = min(s.backoff_max_s, s.backoff_min_s * 2 ** min(attempt, 16))
            await asyncio.sleep(random.uniform(s.backoff_min_s / 2, cap))

    async def _session(self, client: MqttClient, mark: int) -> None:
        s = self._s
        spool = self._spool
        await client.publish(topics.status(s.gateway, s.prefix), b"online", qos=1, retain=True)
        if self.commands is not None:
            await client.subscribe(topics.cmd(s.gateway, s.prefix), qos=1)
        if self._meta is not None:
            await client.publish(topics.meta(s.gateway, s.prefix), self._meta, qos=1, retain=True)
        await spool.flush_acks()
        topic = topics.batch(s.gateway, s.prefix)
        room = asyncio.Semaphore(s.window)
        back_cursor, live_cursor = 0, mark
        back: deque[SpoolRow] = deque()
        live: deque[SpoolRow] = deque()
        back_done = False
        back_sent = live_sent = 0
        read = s.window * 4
        spool.added.set()
        if spool.has_gaps:
            spool.gaps_added.set()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch(client), name="uplink.watch")
            while True:
                if spool.gaps_added.is_set() and self._gap_signer and not self._gap_busy:
                    spool.gaps_added.clear()
                    self._gap_busy = True
                    await room.acquire()
                    tg.create_task(self._send_gaps(client, room), name="uplink.gap")
                if not live and spool.added.is_set():
                    spool.added.clear()
                    rows = await spool.pending(live_cursor, read)
                    if rows:
                        live.extend(rows)
                        live_cursor = rows[-1].id
                    if len(rows) == read:
                        spool.added.set()  # more where these came from
                if not back and not back_done:
                    rows = await spool.pending(back_cursor, read, upto_id=mark)
                    if rows:
                        back.extend(rows)
                        back_cursor = rows[-1].id
                    else:
                        back_done = True
                        if back_sent:
                            log.info("uplink: backlog of %d batches sent", back_sent)
                if not live and not back:
                    await spool.added.wait()
                    continue
                await room.acquire()
                await client.drain()  # the socket's buffer is over its mark: wait
                take_back = bool(back) and (
                    not live or back_sent <= s.backlog_share * (back_sent + live_sent)
                )
                row = back.popleft() if take_back else live.popleft()
                try:
                    acked = client.publish_nowait(topic, row.data, qos=1)
                except MqttError:
                    room.release()
                    raise
                acked.add_done_callback(functools.partial(self._acked, row, room, take_back))
                self.in_flight += 1
                if take_back:
                    back_sent += 1
                    self.backlog_published += 1
                else:
                    live_sent += 1
                    self.live_published += 1

    async def _watch(self, client: MqttClient) -> None:
        """Hand commands to the executor; raise MqttError when the connection fails, which
        ends the session even when the publishing loop is idle."""
        async for msg in client.messages:
            if self.commands is not None:
                await on_message(client, msg, self.commands, prefix=self._s.prefix)

    def _acked(
        self, row: SpoolRow, room: asyncio.Semaphore, backlog: bool, fut: asyncio.Future[None]
    ) -> None:
        """Done-callback of a batch's publish: its PUBACK came, or the connection failed
        (every publish in flight then fails at once; the batch stays in the spool)."""
        room.release()
        self.in_flight -= 1
        if fut.cancelled() or fut.exception() is not None:
            return
        self._spool.ack([row.id])
        self.published += 1
        self.readings_acked += row.n
        if backlog:
            self.backlog_acked += 1
        self.last_acked = (row.epoch, row.seq)

    async def _send_gaps(self, client: MqttClient, room: asyncio.Semaphore) -> None:
        assert self._gap_signer is not None
        try:
            rows = await self._spool.gaps()
            if not rows:
                return
            data = self._gap_signer([g for _, g in rows])
            await client.publish(gap_topic(self._s.gateway, self._s.prefix), data, qos=1)
            await self._spool.gaps_sent([i for i, _ in rows])
            self.gap_notices += 1
            log.info("uplink: gap notice for %d dropped ranges acknowledged", len(rows))
            if self._spool.has_gaps:
                self._spool.gaps_added.set()
                self._spool.added.set()
        finally:
            self._gap_busy = False
            room.release()
