"""A hub worker: :class:`~hub.core.HubCore` fed from MQTT.

Several workers split the load of one broker through a shared subscription
(``$share/hub/...``) and share one database.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

from hub.core import HubCore
from protocols import topics

if TYPE_CHECKING:
    import aiomqtt

__all__ = ["Hub"]

log = logging.getLogger(__name__)


class Hub:
    """A hub worker: :class:`HubCore` fed from MQTT through a shared subscription.

    With ``persistent=True`` the hub keeps a broker session (clean session off,
    fixed client id): what gateways publish while the hub is away is queued
    for it by the broker. Without it, a batch the broker acknowledged while no
    hub was subscribed is gone, whatever the gateway does.
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
        flush_interval_s: float = 0.2,
    ) -> None:
        self.core = core
        self.host, self.port, self.group = host, port, group
        self.prefix = core.prefix if prefix is None else prefix
        self.shared = shared  # amqtt (the demo's embedded broker) has no shared subscriptions
        self.client_id = client_id or f"vitals-hub-{id(self):x}"
        self.persistent = persistent
        self.flush_interval_s = flush_interval_s
        self.subscribed = asyncio.Event()
        self.results: Counter[str] = Counter()

    def _filters(self) -> list[str]:
        out = []
        for kind in ("batch", "gap", "event"):
            f = topics.subscription(kind, self.prefix)
            out.append(topics.shared(self.group, f) if self.shared else f)
        out.append(topics.subscription("meta", self.prefix))
        return out

    async def run(self) -> None:
        """Receive until cancelled, reconnecting when the broker goes away."""
        import aiomqtt  # the demo extra: `vitals hub stats` and `token` work without it

        try:
            while True:
                try:
                    async with aiomqtt.Client(
                        self.host,
                        self.port,
                        identifier=self.client_id,
                        clean_session=not self.persistent,
                        max_queued_incoming_messages=100_000,
                    ) as client:
                        for f in self._filters():
                            await client.subscribe(f, qos=1)
                        self.subscribed.set()
                        async with asyncio.TaskGroup() as tg:
                            tg.create_task(self._flusher(), name="hub.flush")
                            tg.create_task(self._receive(client), name="hub.receive")
                            tg.create_task(self._clock(client), name="hub.time")
                except* aiomqtt.MqttError as group:
                    self.subscribed.clear()
                    self.core.flush()
                    log.warning(
                        "hub lost the broker %s:%d: %s; retrying",
                        self.host,
                        self.port,
                        group.exceptions[0],
                    )
                    await asyncio.sleep(0.5)
        finally:
            self.core.flush()

    async def _receive(self, client: aiomqtt.Client) -> None:
        core, results = self.core, self.results
        async for msg in client.messages:
            payload = msg.payload
            if isinstance(payload, (bytes, bytearray)):
                results[core.handle(msg.topic.value, bytes(payload))] += 1
            if core.buffered and not len(client.messages):
                # one turn of the loop lets the client read what the socket holds; if
                # nothing came, the broker has nothing more queued: write now rather
                # than at the flusher's next tick (under load the queue is never empty)
                await asyncio.sleep(0)
                if not len(client.messages):
                    core.flush()

    async def _clock(self, client: aiomqtt.Client, every_s: float = 1.0) -> None:
        """The hub's time, each second, retained: ``vitals diag uplink`` checks a
        gateway's clock against it (MQTT itself carries no time)."""
        topic = topics.hub_time(self.prefix)
        while True:
            await client.publish(topic, f"{time.time():.3f}".encode(), qos=0, retain=True)
            await asyncio.sleep(every_s)

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            if self.core.buffered:
                self.core.flush()
