"""The uplink: spooled batches to the broker over MQTT QoS 1.

The uplink reads the spool oldest first and keeps up to ``window`` batches in
flight. A batch leaves the spool only when its PUBACK arrives; a lost
connection simply restarts the read from the oldest unacknowledged batch (the
hub drops the duplicates by (gateway, epoch, seq)). Reconnects back off with
full jitter up to a cap; a broker that is unreachable at start is normal.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from dataclasses import dataclass, field

import aiomqtt

from agent.spool import Spool, SpoolRow
from protocols import topics

__all__ = ["Uplink", "UplinkSettings"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UplinkSettings:
    gateway: str
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    keepalive_s: int = 30
    prefix: str = topics.DEFAULT_PREFIX
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = field(default=None, repr=False)
    window: int = 16
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0
    publish_timeout_s: float = 30.0


class Uplink:
    def __init__(
        self, settings: UplinkSettings, spool: Spool, *, meta: bytes | None = None
    ) -> None:
        self._s = settings
        self._spool = spool
        self._meta = meta
        self.connected = asyncio.Event()
        self.connects = 0
        self.connect_failures = 0
        self.published = 0
        self.readings_acked = 0
        self.last_acked: tuple[int, int] | None = None
        self.last_error = ""

    def statistics(self) -> dict[str, object]:
        return {
            "connected": self.connected.is_set(),
            "connects": self.connects,
            "connect_failures": self.connect_failures,
            "batches_acked": self.published,
            "readings_acked": self.readings_acked,
            "last_acked": list(self.last_acked) if self.last_acked else None,
            "last_error": self.last_error,
        }

    def _client(self) -> aiomqtt.Client:
        s = self._s
        client = aiomqtt.Client(
            s.host,
            s.port,
            identifier=s.client_id or f"vitals-{s.gateway}",
            username=s.username,
            password=s.password,
            keepalive=s.keepalive_s,
            tls_context=s.tls,
            will=aiomqtt.Will(topics.status(s.gateway, s.prefix), b"offline", qos=1, retain=True),
            max_inflight_messages=s.window,
            timeout=s.publish_timeout_s,
        )
        client.pending_calls_threshold = s.window * 2 + 8
        return client

    async def run(self) -> None:
        """Publish forever, reconnecting as needed. Cancel to stop."""
        attempt = 0
        while True:
            try:
                async with self._client() as client:
                    attempt = 0
                    self.connects += 1
                    self.connected.set()
                    log.info("uplink connected to %s:%d", self._s.host, self._s.port)
                    await self._session(client)
            except* aiomqtt.MqttError as group:
                self.last_error = str(group.exceptions[0])
            if self.connected.is_set():
                log.warning("uplink to %s:%d lost: %s", self._s.host, self._s.port, self.last_error)
            else:
                self.connect_failures += 1
                if attempt == 0:
                    log.warning(
                        "uplink cannot reach %s:%d: %s (will retry)",
                        self._s.host,
                        self._s.port,
                        self.last_error,
                    )
            self.connected.clear()
            attempt += 1
            cap = min(self._s.backoff_max_s, self._s.backoff_min_s * 2 ** min(attempt, 16))
            await asyncio.sleep(random.uniform(self._s.backoff_min_s / 2, cap))

    async def _session(self, client: aiomqtt.Client) -> None:
        s = self._s
        await client.publish(topics.status(s.gateway, s.prefix), b"online", qos=1, retain=True)
        if self._meta is not None:
            await client.publish(topics.meta(s.gateway, s.prefix), self._meta, qos=1, retain=True)
        topic = topics.batch(s.gateway, s.prefix)
        room = asyncio.Semaphore(s.window)
        cursor = 0
        async with asyncio.TaskGroup() as tg:
            while True:
                self._spool.added.clear()
                rows = await self._spool.pending(cursor, s.window)
                if not rows:
                    await self._spool.added.wait()
                    continue
                for row in rows:
                    await room.acquire()
                    cursor = row.id
                    tg.create_task(
                        self._publish(client, topic, row, room), name=f"uplink.publish[{row.seq}]"
                    )

    async def _publish(
        self, client: aiomqtt.Client, topic: str, row: SpoolRow, room: asyncio.Semaphore
    ) -> None:
        try:
            await client.publish(topic, row.data, qos=1)
            await self._spool.ack([row.id])
        finally:
            room.release()
        self.published += 1
        self.readings_acked += row.n
        self.last_acked = (row.epoch, row.seq)
