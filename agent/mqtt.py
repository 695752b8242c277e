"""The agent's MQTT 3.1.1 client: asyncio plumbing around :mod:`protocols.mqtt`.

What a gateway needs and nothing more (docs/decisions.md, 17): connect with
credentials, TLS and a will; publish at QoS 0 or 1 with many QoS 1 messages in
flight; subscribe; receive messages; keep the connection alive; disconnect.
One connection per instance: reconnecting is the caller's loop (the uplink's
back-off), with a new :class:`MqttClient`.

    async with MqttClient(host, port, client_id="gw-1", will=(topic, b"offline", 1, True)) as c:
        await c.publish("a/b", b"...", qos=1)         # returns on PUBACK
        fut = c.publish_nowait("a/b", b"...", qos=1)  # a Future, done on PUBACK
        await c.subscribe("a/cmd", qos=1)
        async for message in c.messages: ...

Every failure of the connection raises :class:`MqttError`: a refused CONNACK
(``return_code`` and its meaning), a connect that times out, a lost
connection, a broker silent for 1.5 keepalives, an acknowledgement that does
not come within ``ack_timeout``, a malformed packet from the broker. When the
connection fails, every publish and subscribe still waiting fails with it at
once, so nothing waits for a timeout. A misuse (a wildcard in a topic name, QoS
2) raises :class:`LocalError` and leaves the connection alone.

Costs, per QoS 1 publish: one encoded packet, one ``transport.write``, one
Future and a dict entry keyed by packet id until the PUBACK; no task.

Inbound messages never hold back the acknowledgements of our own publishes:
the socket is always read. A message whose payload is over
``max_message_size`` is dropped unread (never buffered whole), one that finds
``max_queued_messages`` waiting for :attr:`messages` is dropped too; both are
counted (``oversized``, ``overflow``) and reported to ``on_drop``. Every
inbound QoS 1 message is answered with PUBACK at once, dropped or queued: it
is ours, and the broker's window of messages in flight to us stays open.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Final

from protocols import mqtt
from protocols.errors import LocalError, ProtocolError, RemoteError

__all__ = ["MqttClient", "MqttError", "OnDrop", "Will"]

log = logging.getLogger(__name__)

#: the will: (topic, payload, qos, retain), published by the broker if we vanish
Will = tuple[str, bytes, int, bool]
#: told of each inbound message dropped: (why: "oversized" | "overflow", topic, payload size)
OnDrop = Callable[[str, str, int], None]

_PINGREQ: Final = mqtt.encode_pingreq()
_DISCONNECT: Final = mqtt.encode_disconnect()


class MqttError(RemoteError):
    """The MQTT connection failed or was refused; ``return_code`` is the CONNACK's
    when the broker refused the connection (``reason`` its meaning), else None."""

    def __init__(self, message: str, *, return_code: int | None = None) -> None:
        super().__init__(message)
        self.return_code = return_code

    @property
    def reason(self) -> str | None:
        if self.return_code is None:
            return None
        return mqtt.ConnAck(False, self.return_code).reason


class _Wire(asyncio.Protocol):
    """The transport's callbacks, handed to the client (which is not a Protocol itself)."""

    def __init__(self, client: MqttClient) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.client._transport = transport

    def data_received(self, data: bytes) -> None:
        self.client._data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._connection_lost(exc)

    def pause_writing(self) -> None:
        self.client._writing_paused = True

    def resume_writing(self) -> None:
        self.client._resume_writing()


class _Messages:
    """``async for message in client.messages``: received PUBLISH packets, in order.

    Ends when the client disconnects; raises :class:`MqttError` when the
    connection fails (after the messages received before the failure).
    """

    def __init__(self, client: MqttClient) -> None:
        self._c = client

    def __aiter__(self) -> _Messages:
        return self

    async def __anext__(self) -> mqtt.Publish:
        c = self._c
        while not c._inbox:
            if c._error is not None:
                if c._closing:
                    raise StopAsyncIteration
                raise c._failure()
            if c._loop is None:
                raise LocalError("the client is not connected")
            waiter = c._loop.create_future()
            c._inbox_waiter = waiter
            try:
                await waiter
            finally:
                c._inbox_waiter = None
        return c._inbox.popleft()


class MqttClient:
    """One MQTT 3.1.1 connection (see the module's docstring).

    ``keepalive`` (s, 0: off): a PINGREQ goes out when nothing was sent or
    received for that long, and the connection is declared dead when nothing
    at all was received for 1.5 times that long. ``ack_timeout`` (s, None:
    none): the connection is declared dead when the oldest unacknowledged
    publish or subscribe waited that long. ``connect_timeout`` bounds the TCP
    connection, the TLS handshake and the CONNACK together. ``tls`` checks the
    broker's name against ``server_hostname`` (default ``host``).
    ``max_queued_messages`` received messages wait for :attr:`messages`; past
    that, new ones are dropped (the socket is still read: the PUBACKs of our
    publishes must not wait behind messages nobody takes). ``max_message_size``
    bounds a received message's payload: larger ones are dropped unread;
    ``topic_caps`` gives topics (exact names) a bound of their own.
    ``on_drop(why, topic, size)`` hears of every drop.
    """

    def __init__(
        self,
        host: str,
        port: int = 1883,
        *,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 60,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        will: Will | None = None,
        farewell: Will | None = None,
        clean_session: bool = True,
        connect_timeout: float = 10.0,
        ack_timeout: float | None = None,
        max_message_size: int = mqtt.MAX_PACKET_SIZE,
        max_queued_messages: int = 256,
        on_drop: OnDrop | None = None,
        topic_caps: Mapping[str, int] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.client_id = client_id
        self.keepalive = keepalive
        self._tls = tls
        self._server_hostname = server_hostname
        self._connect_timeout = connect_timeout
        self._ack_timeout = ack_timeout
        self._max_queued = max(1, max_queued_messages)
        self._on_drop = on_drop
        will_topic, will_payload, will_qos, will_retain = will or (None, b"", 0, False)
        # encoded now: a bad will or an overlong client id is a LocalError before any I/O
        self._connect_packet = mqtt.encode_connect(
            client_id,
            keepalive=keepalive,
            clean_session=clean_session,
            username=username,
            password=password,
            will_topic=will_topic,
            will_payload=will_payload,
            will_qos=will_qos,
            will_retain=will_retain,
        )
        # said by the client itself (QoS 0) just before a clean DISCONNECT, which makes
        # the broker drop the will: so a clean stop still leaves "offline" retained
        self._farewell = (
            b""
            if farewell is None
            else mqtt.encode_publish(farewell[0], farewell[1], retain=farewell[3])
        )
        self._decoder = mqtt.Decoder(max_payload=max_message_size, topic_caps=topic_caps)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.Transport | None = None
        self._connack: asyncio.Future[mqtt.ConnAck] | None = None
        self._connected = False
        self._closing = False  # we are disconnecting on purpose
        self._closed: asyncio.Future[None] | None = None  # done at connection_lost
        self._error: MqttError | None = None  # set once: why the connection is over
        # packet id -> (Future, loop time sent); dicts keep the oldest first
        self._pending: dict[int, tuple[asyncio.Future[None], float]] = {}
        self._subs: dict[int, tuple[asyncio.Future[mqtt.SubAck], float]] = {}
        self._next_id = 0
        self._writing_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._inbox: deque[mqtt.Publish] = deque()
        self._inbox_waiter: asyncio.Future[None] | None = None
        self._last_rx = self._last_tx = 0.0
        self._ping_sent = False
        self._timer: asyncio.TimerHandle | None = None
        self.counters = {
            "published": 0,
            "acked": 0,
            "received": 0,
            "oversized": 0,
            "overflow": 0,
            "pings": 0,
        }

    # -- public API -----------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the broker accepted the connection and it has not failed or closed."""
        return self._connected and self._error is None

    @property
    def in_flight(self) -> int:
        """QoS 1 publishes waiting for their PUBACK."""
        return len(self._pending)

    @property
    def writing_paused(self) -> bool:
        """Whether the transport's write buffer is over its high-water mark (see :meth:`drain`)."""
        return self._writing_paused

    @property
    def messages(self) -> _Messages:
        """Received messages, ``async for``; one consumer at a time."""
        return _Messages(self)

    def statistics(self) -> dict[str, int]:
        return {**self.counters, "in_flight": len(self._pending), "queued": len(self._inbox)}

    async def __aenter__(self) -> MqttClient:
        await self.connect()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.disconnect()

    async def connect(self) -> None:
        """Open the connection and wait for the broker's CONNACK (``connect_timeout`` in all)."""
        if self._loop is not None:
            raise LocalError("an MqttClient connects once; make a new one to reconnect")
        loop = self._loop = asyncio.get_running_loop()
        self._connack = loop.create_future()
        self._closed = loop.create_future()
        where = f"{self.host}:{self.port}"
        try:
            async with asyncio.timeout(self._connect_timeout):
                try:
                    await loop.create_connection(
                        lambda: _Wire(self),
                        self.host,
                        self.port,
                        ssl=self._tls,
                        server_hostname=(self._server_hostname or self.host) if self._tls else None,
                    )
                except OSError as exc:  # refused, unreachable, DNS, TLS verification
                    raise MqttError(f"cannot connect to {where}: {exc}") from exc
                self._last_rx = loop.time()
                self._write(self._connect_packet)
                ack = await self._connack
        except TimeoutError as exc:
            step = "CONNACK" if self._transport is not None else "TCP/TLS connection"
            err = MqttError(f"no {step} from {where} within {self._connect_timeout:g} s")
            self._fail(err)
            raise err from exc
        except MqttError as exc:
            self._fail(exc)
            raise
        except BaseException:  # cancelled: leave no socket behind
            self._fail(MqttError(f"connect to {where} cancelled"))
            raise
        finally:
            if self._connack.done() and not self._connack.cancelled():
                self._connack.exception()  # retrieved: connect raises the failure itself
        if not ack.accepted:
            err = MqttError(
                f"broker {where} refused the connection: {ack.reason} "
                f"(CONNACK return code {ack.return_code})",
                return_code=ack.return_code,
            )
            self._fail(err)
            raise err
        self._schedule(loop.time())

    async def disconnect(self) -> None:
        """Send the farewell if any, then DISCONNECT (the broker drops the will), and close.

        Publishes still waiting for their PUBACK fail with :class:`MqttError`.
        """
        transport = self._transport
        if self._closing or transport is None or self._closed is None:
            return
        self._closing = True
        if self._error is None:
            if self._farewell:
                transport.write(self._farewell)
            transport.write(_DISCONNECT)
            self._fail(MqttError("the client disconnected"), abort=False)
        transport.close()  # after the buffered bytes (DISCONNECT last) are written
        try:
            await asyncio.wait({self._closed}, timeout=1.0)
        finally:  # a broker that does not read, or we are cancelled: drop the socket
            if not self._closed.done():
                transport.abort()

    def publish_nowait(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None]:
        """Write a PUBLISH now; the Future is done on its PUBACK (QoS 1) or at once (QoS 0).

        The Future fails with :class:`MqttError` if the connection does. Await
        :meth:`drain` between publishes to respect the transport's flow control.
        """
        if self._error is not None or not self._connected or self._loop is None:
            raise self._failure()
        fut: asyncio.Future[None] = self._loop.create_future()
        if qos == 0:
            self._write(mqtt.encode_publish(topic, payload, retain=retain))
            fut.set_result(None)
        else:
            pid = self._new_id()
            data = mqtt.encode_publish(topic, payload, qos=qos, retain=retain, packet_id=pid)
            self._pending[pid] = (fut, self._loop.time())
            self._write(data)
        self.counters["published"] += 1
        return fut

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish; return once the PUBACK arrived (QoS 1) or the packet was written (QoS 0)."""
        if self._writing_paused:
            await self.drain()
        await self.publish_nowait(topic, payload, qos=qos, retain=retain)

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        if self._error is not None:
            raise self._failure()
        if not self._writing_paused or self._loop is None:
            return
        waiter = self._loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter
        if self._error is not None:
            raise self._failure()

    async def subscribe(self, topic_filter: str, qos: int = 1) -> int:
        """Subscribe and wait for the SUBACK; the granted QoS.

        :class:`MqttError` when the broker refuses the filter (SUBACK 0x80).
        """
        if qos not in (0, 1):
            raise LocalError(f"this client subscribes at QoS 0 or 1, not {qos}")
        if self._error is not None or not self._connected or self._loop is None:
            raise self._failure()
        pid = self._new_id()
        data = mqtt.encode_subscribe(pid, [(topic_filter, qos)])
        fut: asyncio.Future[mqtt.SubAck] = self._loop.create_future()
        self._subs[pid] = (fut, self._loop.time())
        self._write(data)
        ack = await fut
        code = ack.return_codes[0]
        if code == mqtt.SUBACK_FAILURE:
            raise MqttError(
                f"broker {self.host}:{self.port} refused the subscription "
                f"to {topic_filter!r} (SUBACK 0x80)"
            )
        return code

    # -- internals ------------------------------------------------------------

    def _failure(self) -> MqttError:
        """A fresh MqttError saying why the connection is over (one per waiter: an
        exception instance raised in several tasks would collect all their tracebacks)."""
        err = self._error
        if err is None:
            return MqttError(f"not connected to {self.host}:{self.port}")
        copy = MqttError(str(err), return_code=err.return_code)
        copy.__cause__ = err.__cause__
        return copy

    def _new_id(self) -> int:
        if len(self._pending) + len(self._subs) >= 65535:
            raise LocalError("65535 packets in flight: every MQTT packet id is taken")
        pid = self._next_id
        while True:
            pid = pid % 65535 + 1
            if pid not in self._pending and pid not in self._subs:
                self._next_id = pid
                return pid

    def _write(self, data: bytes) -> None:
        assert self._transport is not None and self._loop is not None
        self._transport.write(data)
        self._last_tx = self._loop.time()

    def _resume_writing(self) -> None:
        self._writing_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _data_received(self, data: bytes) -> None:
        assert self._loop is not None
        self._last_rx = self._loop.time()
        dec = self._decoder
        dec.receive(data)
        pending = self._pending
        try:
            while (p := dec.next_packet()) is not None:
                if type(p) is mqtt.PubAck and self._connected:  # the hot path: one per batch
                    entry = pending.pop(p.packet_id, None)
                    if entry is not None:
                        self.counters["acked"] += 1
                        if not entry[0].done():
                            entry[0].set_result(None)
                else:
                    self._dispatch(p)
        except ProtocolError as exc:
            err = MqttError(f"malformed packet from {self.host}:{self.port}: {exc}")
            err.__cause__ = exc
            self._fail(err)
        except MqttError as err:
            self._fail(err)

    def _dispatch(self, p: mqtt.Packet) -> None:
        if not self._connected:
            if isinstance(p, mqtt.ConnAck) and self._connack and not self._connack.done():
                # accepted: what follows in the same chunk is already part of the session
                self._connected = p.accepted
                self._connack.set_result(p)
                return
            raise MqttError(f"broker sent {type(p).__name__} before CONNACK")
        if isinstance(p, mqtt.Publish | mqtt.Skipped):
            if p.qos == 2:
                raise MqttError(
                    f"broker sent a QoS 2 message on {p.topic!r}; "
                    "this client subscribes at QoS 0 or 1"
                )
            if p.qos == 1:
                self._write(mqtt.encode_puback(p.packet_id))  # queued or dropped: ours now
            if isinstance(p, mqtt.Skipped):
                self._drop("oversized", p.topic, p.size)
            elif len(self._inbox) >= self._max_queued:
                self._drop("overflow", p.topic, len(p.payload))
            else:
                self.counters["received"] += 1
                self._inbox.append(p)
                waiter = self._inbox_waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
        elif isinstance(p, mqtt.PingResp):
            self._ping_sent = False
        elif isinstance(p, mqtt.SubAck):
            entry = self._subs.pop(p.packet_id, None)
            if entry is not None and not entry[0].done():
                entry[0].set_result(p)
        elif isinstance(p, mqtt.PubAck):
            pass  # handled in _data_received
        elif isinstance(p, mqtt.ConnAck):
            raise MqttError("broker sent a second CONNACK")
        else:  # PUBREC, PUBREL, PUBCOMP, UNSUBACK: answers to what we never send
            raise MqttError(f"broker sent an unexpected {type(p).__name__}")

    def _drop(self, why: str, topic: str, size: int) -> None:
        self.counters[why] += 1
        if self._on_drop is not None:
            self._on_drop(why, topic, size)

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._error is None:
            why = f"{exc}" if exc else "closed by the broker"
            err = MqttError(f"connection to {self.host}:{self.port} lost: {why}")
            err.__cause__ = exc
            self._fail(err, abort=False)
        self._transport = None
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def _fail(self, err: MqttError, *, abort: bool = True) -> None:
        """The connection is over: remember why, fail every waiter, drop the socket."""
        if self._error is None:
            self._error = err
            if not self._closing:
                log.debug("mqtt %s:%d: %s", self.host, self.port, err)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if abort and self._transport is not None:
            self._transport.abort()
        waiting: list[asyncio.Future[None] | asyncio.Future[mqtt.SubAck]] = []
        waiting += [f for f, _ in self._pending.values()]
        waiting += [f for f, _ in self._subs.values()]
        self._pending.clear()
        self._subs.clear()
        for fut in waiting:
            if not fut.done():
                fut.set_exception(self._failure())
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(self._failure())
        for w in [*self._drain_waiters, *([self._inbox_waiter] if self._inbox_waiter else [])]:
            if not w.done():
                w.set_result(None)  # they look at _error when they wake
        self._drain_waiters.clear()

    # -- keepalive and acknowledgement timeouts -------------------------------

    def _oldest_unacked(self) -> float | None:
        """When the oldest publish or subscribe still waiting was sent (dicts keep order)."""
        sent = [next(iter(d.values()))[1] for d in (self._pending, self._subs) if d]
        return min(sent) if sent else None

    def _schedule(self, at: float) -> None:
        assert self._loop is not None
        self._timer = self._loop.call_at(at, self._tick)

    def _tick(self) -> None:
        """Ping when idle, declare the connection dead when the broker is silent or an
        acknowledgement is late, then sleep until the next thing that may be due."""
        self._timer = None
        loop = self._loop
        if self._error is not None or self._transport is None or loop is None:
            return
        now = loop.time()
        due = now + 3600.0
        k = self.keepalive
        if k:
            silent = now - self._last_rx
            if silent >= 1.5 * k:
                self._fail(
                    MqttError(
                        f"broker {self.host}:{self.port} silent for {silent:.1f} s "
                        f"(keepalive {k} s): connection declared dead"
                    )
                )
                return
            if not self._ping_sent and (now - self._last_tx >= k or silent >= k):
                self._write(_PINGREQ)
                self._ping_sent = True
                self.counters["pings"] += 1
            due = self._last_rx + 1.5 * k
            if not self._ping_sent:
                due = min(due, min(self._last_tx, self._last_rx) + k)
        t = self._ack_timeout
        if t is not None:
            oldest = self._oldest_unacked()
            if oldest is not None and now - oldest >= t:
                self._fail(
                    MqttError(
                        f"no acknowledgement from {self.host}:{self.port} within {t:g} s: "
                        "connection declared dead"
                    )
                )
                return
            due = min(due, (now if oldest is None else oldest) + t)
        self._schedule(max(due, now + 0.001))
