"""A lying MQTT broker for the tests: a TCP proxy in front of a real one.

Clients connect to the proxy (127.0.0.1, a free port); it connects each of them
to the real broker and relays whole MQTT packets (3.1.1 or 5) both ways, cut by their
fixed headers. Every QoS 1 PUBLISH a client sends is decided by ``rule(topic,
size)`` (``size``: the whole packet, header included):

- ``PASS``: relayed to the broker, which answers as it does;
- ``LIE``: answered with a PUBACK by the proxy itself and dropped, the way
  Mosquitto treats a publish its ACL denies or one over ``message_size_limit``
  (the client cannot tell: a PUBACK is a PUBACK);
- ``CUT``: the connection is closed before the packet is relayed, the way a
  broker closes it on a packet over ``max_packet_size``.

The proxy reads the packets itself (:func:`split_packets`, :func:`_publish`):
it is the tests' independent peer, so it shares no code with the client under
test (paho, through agent/mqtt.py). It needs only a PUBLISH's type, QoS, topic
and packet id, which MQTT 3.1.1 and 5 lay out alike (MQTT 5's properties come
after the packet id), and its PUBACK is the 4 bytes both versions accept.

    async with MqttProxy(broker.host, broker.port) as proxy:
        proxy.rule = lie_on("/batch")   # agents connect to proxy.port
        ...
        proxy.rule = pass_all
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from simulator.broker import HOST

__all__ = [
    "CUT",
    "LIE",
    "PASS",
    "Action",
    "MqttProxy",
    "Publish",
    "lie_on",
    "pass_all",
    "puback",
    "split_packets",
]

log = logging.getLogger(__name__)


class Action(enum.Enum):
    PASS = "pass"
    LIE = "lie"
    CUT = "cut"


PASS, LIE, CUT = Action.PASS, Action.LIE, Action.CUT

Rule = Callable[[str, int], Action]


def pass_all(topic: str, size: int) -> Action:
    return PASS


def lie_on(suffix: str) -> Rule:
    """A rule acknowledging and dropping every QoS 1 publish to a topic ending in ``suffix``."""

    def rule(topic: str, size: int) -> Action:
        return LIE if topic.endswith(suffix) else PASS

    return rule


def split_packets(buf: bytearray) -> list[bytes]:
    """Take the complete MQTT packets off the front of ``buf`` (§2.2: a type and
    flags byte, then the Remaining Length, 7 bits a byte, at most four bytes)."""
    out: list[bytes] = []
    while len(buf) >= 2:
        length = 0
        i = 1
        while True:
            if i >= len(buf):
                return out
            digit = buf[i]
            length |= (digit & 0x7F) << (7 * (i - 1))
            i += 1
            if not digit & 0x80:
                break
            if i > 4:
                raise ValueError("MQTT remaining length longer than 4 bytes")
        total = i + length
        if len(buf) < total:
            return out
        out.append(bytes(buf[:total]))
        del buf[:total]
    return out


@dataclass(frozen=True)
class Publish:
    topic: str
    qos: int
    packet_id: int


def _publish(packet: bytes) -> Publish | None:
    """The PUBLISH ``packet``'s topic, QoS and packet id, or None for another packet
    type (§3.3: the topic, then the packet id when QoS > 0)."""
    if packet[0] >> 4 != 3:
        return None
    qos = (packet[0] >> 1) & 3
    i = 1
    while packet[i] & 0x80:  # the Remaining Length
        i += 1
    i += 1
    n = int.from_bytes(packet[i : i + 2], "big")
    topic = packet[i + 2 : i + 2 + n].decode()
    pid = int.from_bytes(packet[i + 2 + n : i + 4 + n], "big") if qos else 0
    return Publish(topic, qos, pid)


def puback(packet_id: int) -> bytes:
    """A PUBACK for ``packet_id`` (success: MQTT 5 allows the reason code left out)."""
    return b"\x40\x02" + packet_id.to_bytes(2, "big")


class MqttProxy:
    """A proxy on ``(host, port)`` in front of the broker at ``upstream``.

    ``rule`` may be changed at any time; it applies to QoS 1 publishes from then
    on. ``lied``, ``passed`` and ``cut`` count publishes per topic;
    ``sizes`` keeps the largest packet seen per topic. ``cut_all()`` closes every
    connection now (an outage of the network, not of the broker).
    """

    def __init__(
        self, upstream_host: str, upstream_port: int, *, rule: Rule = pass_all, port: int = 0
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = HOST
        self.port = port
        self.rule: Rule = rule
        self.lied: Counter[str] = Counter()
        self.passed: Counter[str] = Counter()
        self.cut: Counter[str] = Counter()
        self.sizes: dict[str, int] = {}
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self.cut_all()
        for task in list(self._pipes):
            task.cancel()
        if self._pipes:
            await asyncio.wait(self._pipes, timeout=5)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> MqttProxy:
        await self.start()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def cut_all(self) -> None:
        for w in list(self._writers):
            w.close()

    async def _client(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self._writers.add(c_writer)
        try:
            b_reader, b_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            c_writer.close()  # the broker is down: the client sees a refused session
            self._writers.discard(c_writer)
            return
        self.connections += 1
        self._writers.add(b_writer)
        # the proxy's PUBACKs and the broker's packets share the client's stream:
        # one lock so that a packet is never written into the middle of another
        lock = asyncio.Lock()
        up = asyncio.create_task(self._upstream(c_reader, b_writer, c_writer, lock))
        down = asyncio.create_task(self._downstream(b_reader, c_writer, lock))
        for task in (up, down):
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up, down):
                task.cancel()
            for w in (c_writer, b_writer):
                w.close()
                self._writers.discard(w)
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    await w.wait_closed()

    async def _upstream(
        self,
        reader: asyncio.StreamReader,
        broker: asyncio.StreamWriter,
        client: asyncio.StreamWriter,
        lock: asyncio.Lock,
    ) -> None:
        buf = bytearray()
        with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):
            while data := await reader.read(65536):
                buf += data
                for packet in split_packets(buf):
                    pub = _publish(packet)
                    if pub is not None and pub.qos == 1:
                        self.sizes[pub.topic] = max(self.sizes.get(pub.topic, 0), len(packet))
                        action = self.rule(pub.topic, len(packet))
                        if action is LIE:
                            self.lied[pub.topic] += 1
                            async with lock:
                                client.write(puback(pub.packet_id))
                            continue
                        if action is CUT:
                            self.cut[pub.topic] += 1
                            return
                        self.passed[pub.topic] += 1
                    broker.write(packet)
                await broker.drain()

    async def _downstream(
        self, reader: asyncio.StreamReader, client: asyncio.StreamWriter, lock: asyncio.Lock
    ) -> None:
        buf = bytearray()
        with contextlib.suppress(OSError, ValueError):
            while data := await reader.read(65536):
                buf += data
                packets = split_packets(buf)
                if packets:
                    async with lock:
                        client.write(b"".join(packets))
                    await client.drain()
