"""The agent's MQTT connection: a thin adapter on aiomqtt (paho-mqtt underneath).

One MQTT client in the project (docs/decisions.md, 38): aiomqtt, which the
hub uses too. This module adds what a gateway needs on top of it:

- **MQTT 5 where the broker speaks it**, 3.1.1 where it does not (the embedded
  amqtt broker): the first CONNECT says 5; a broker that refuses the version
  (CONNACK "unsupported protocol version", or a close before any CONNACK) is
  asked again in 3.1.1, silently, and remembered for this host and port.
  :attr:`MqttClient.max_packet_size` is the CONNACK's Maximum Packet Size when
  the broker names one (MQTT 5): the uplink splits a batch that would exceed
  it before sending (agent/pipeline/uplink.py).
- **Every waiting publish fails at once when the connection does** (aiomqtt
  leaves each to its own timeout): a publish is a Future in a dict keyed by
  packet id, done on its PUBACK; no task per publish.
- **Our close vs theirs** (trio's split): a connection the broker or the
  network broke raises :class:`MqttError` (a :class:`RemoteError`); one we
  closed ourselves raises :class:`MqttClosed` (a :class:`LocalError`), and
  :attr:`MqttClient.messages` simply ends.
- An acknowledgement later than ``ack_timeout`` declares the connection dead;
  a silent broker is noticed by the keepalive (paho pings after ``keepalive``
  s of silence and closes when the PINGRESP does not come within another
  ``keepalive``: a dead broker is noticed within 2 keepalives, idle or not).
- Inbound size caps: a message over ``max_message_size`` (or its topic's cap in
  ``topic_caps``), or one that finds ``max_queued_messages`` waiting, is dropped,
  counted (``oversized``, ``overflow``) and told to ``on_drop``. Under MQTT 5 the
  CONNECT also tells the broker our Maximum Packet Size, so it does not send
  larger ones at all.

    async with MqttClient(host, port, client_id="gw-1", will=(topic, b"offline", 1, True)) as c:
        await c.publish("a/b", b"...", qos=1)         # returns on PUBACK
        fut = c.publish_nowait("a/b", b"...", qos=1)  # a Future, done on PUBACK
        await c.subscribe("a/cmd", qos=1)
        async for message in c.messages: ...

One connection per instance: reconnecting is the caller's loop (the uplink's
back-off), with a new :class:`MqttClient`.

What of aiomqtt and paho is private and reached here (decisions 38): aiomqtt's
``Client._client`` (the paho client: its ``publish``/``subscribe`` give the
packet id our Futures are keyed by), its callbacks ``_on_connect``,
``_on_disconnect``, ``_on_publish``, ``_on_subscribe``, ``_on_message``
(overridden: CONNACK properties, fail-all-at-once, our Futures, our caps) and
its ``_connected``/``_disconnected`` futures.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import socket
import ssl
import sys
import types
import urllib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any


def _lazy_urllib_request() -> None:
    """paho imports urllib.request (http.client, email: 3 MB of a gateway's 48) for
    proxy settings it reads only when PySocks is installed: a stand-in module imports
    the real one on first use (anyone who uses it gets the real thing)."""
    if "urllib.request" in sys.modules:
        return
    stand_in = types.ModuleType("urllib.request")

    def real(name: str) -> Any:
        if sys.modules.get("urllib.request") is stand_in:
            del sys.modules["urllib.request"]
        module = importlib.import_module("urllib.request")  # binds urllib.request too
        return getattr(module, name)

    stand_in.__getattr__ = real  # type: ignore[method-assign]
    sys.modules["urllib.request"] = stand_in
    urllib.request = stand_in  # what `import urllib.request` binds on the package


_lazy_urllib_request()

# after the stand-in above
import aiomqtt  # noqa: E402
import paho.mqtt.client as paho  # noqa: E402
from aiomqtt.exceptions import MqttConnectError  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402
from paho.mqtt.reasoncodes import ReasonCode  # noqa: E402

from protocols.errors import LocalError, RemoteError  # noqa: E402

__all__ = [
    "MAX_PACKET_SIZE",
    "Message",
    "MqttClient",
    "MqttClosed",
    "MqttError",
    "MqttRefused",
    "OnDrop",
    "Will",
    "topic_matches",
]

log = logging.getLogger(__name__)

#: the will: (topic, payload, qos, retain), published by the broker if we vanish
Will = tuple[str, bytes, int, bool]
#: told of each inbound message dropped: (why: "oversized" | "overflow", topic, payload size)
OnDrop = Callable[[str, str, int], None]
#: the largest MQTT packet there is (a 4-byte remaining length)
MAX_PACKET_SIZE = 268_435_455

#: CONNACK return codes of MQTT 3.1.1 (MQTT 5 reason codes name themselves)
_REFUSALS = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}
#: MQTT 5 CONNACK reason codes, mapped to the 3.1.1 code of the same meaning (the
#: uplink's hints and the tests speak 3.1.1: 4 and 5 are credentials)
_V5_TO_V3 = {0x84: 1, 0x85: 2, 0x88: 3, 0x86: 4, 0x8C: 4, 0x87: 5, 0x8A: 5}
#: host:port pairs whose broker refused MQTT 5: asked in 3.1.1 at once from then on
_NO_V5: set[tuple[str, int]] = set()


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` (``+`` and ``#`` wildcards)."""
    return bool(paho.topic_matches_sub(topic_filter, topic))


@dataclass(frozen=True, slots=True)
class Message:
    """A message the broker delivered to us."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


class MqttError(RemoteError):
    """The broker or the network broke the connection, or refused it: ``return_code``
    is the CONNACK's (3.1.1 numbering; ``reason`` its meaning) when the broker
    refused the connection, else None."""

    def __init__(self, message: str, *, return_code: int | None = None) -> None:
        super().__init__(message)
        self.return_code = return_code

    @property
    def reason(self) -> str | None:
        if self.return_code is None:
            return None
        return _REFUSALS.get(self.return_code, f"refused (code {self.return_code})")


class MqttRefused(MqttError):
    """The broker refused one message (an MQTT 5 PUBACK reason code of 0x80 or more:
    not authorized, quota exceeded, ...); the connection stays."""


class MqttClosed(LocalError):
    """The connection was closed by us (:meth:`MqttClient.disconnect`): not a fault of
    the broker's; what still waited on it fails with this."""


class _Session(aiomqtt.Client):
    """aiomqtt's client with its paho callbacks routed to the :class:`MqttClient`."""

    def __init__(self, owner: MqttClient, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.owner = owner
        self.connack_properties: Properties | None = None
        self.socket_closed = asyncio.Event()

    @property
    def wire(self) -> paho.Client:
        """aiomqtt's paho client (private to aiomqtt: see the module's docstring)."""
        return self._client

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        self.connack_properties = properties
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        if self._connected.cancelled():  # our connect timed out or was cancelled
            return
        if not self._connected.done():  # closed before any CONNACK: aiomqtt would wait
            self._connected.set_exception(_ClosedEarly(reason_code, "closed before CONNACK"))
            return
        super()._on_disconnect(client, userdata, flags, reason_code, properties)

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        self.owner._acked(mid, reason_code)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None = None,
    ) -> None:
        self.owner._subacked(mid, reason_codes)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self.owner._received(message)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        super()._on_socket_close(client, userdata, sock)
        self._loop.call_soon_threadsafe(self.socket_closed.set)

    async def closed(self, within: float) -> None:
        """Wait until paho closed its socket (the peer closed it), ``within`` s at most."""
        if self._client.socket() is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self.socket_closed.wait()


class _Messages:
    """``async for message in client.messages``: received messages, in order.

    Ends when we disconnect; raises :class:`MqttError` when the connection
    fails (after the messages received before the failure).
    """

    def __init__(self, client: MqttClient) -> None:
        self._c = client

    def __aiter__(self) -> _Messages:
        return self

    async def __anext__(self) -> Message:
        c = self._c
        while not c._inbox:
            if c._error is not None:
                if isinstance(c._error, MqttClosed):
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
    """One MQTT connection (see the module's docstring).

    ``keepalive`` (s, 0: off). ``ack_timeout`` (s, None: none): the connection
    is declared dead when the oldest unacknowledged publish or subscribe waited
    that long. ``connect_timeout`` bounds the TCP connection, the TLS handshake
    and the CONNACK together. ``tls`` checks the broker's name against ``host``.
    ``max_in_flight`` QoS 1 publishes are on the wire at once; more wait in
    paho's queue, in order, until PUBACKs free their place. ``farewell`` is
    published (QoS 0) just before a clean DISCONNECT, which makes the broker
    drop the will: a clean stop still leaves "offline" retained.
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
        will: Will | None = None,
        farewell: Will | None = None,
        clean_session: bool = True,
        connect_timeout: float = 10.0,
        ack_timeout: float | None = None,
        max_message_size: int = MAX_PACKET_SIZE,
        max_queued_messages: int = 256,
        max_in_flight: int = 128,
        on_drop: OnDrop | None = None,
        topic_caps: Mapping[str, int] | None = None,
    ) -> None:
        if password is not None and username is None:
            raise LocalError("an MQTT password needs a user name")
        if len(client_id.encode()) > 65535:
            raise LocalError("the MQTT client id is longer than 65535 bytes")
        if will is not None:
            _check_topic(will[0])
            if will[2] not in (0, 1):
                raise LocalError(f"the will's QoS is 0 or 1, not {will[2]}")
        self.host = host
        self.port = port
        self.client_id = client_id
        self.keepalive = keepalive
        self._username = username
        self._password = password
        self._tls = tls
        self._will = will
        self._farewell = farewell
        self._clean_session = clean_session
        self._connect_timeout = connect_timeout
        self._ack_timeout = ack_timeout
        self._max_message_size = max_message_size
        self._topic_caps = dict(topic_caps or {})
        self._max_queued = max(1, max_queued_messages)
        self._max_in_flight = max(1, max_in_flight)
        self._on_drop = on_drop
        self._session: _Session | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: MqttError | MqttClosed | None = None  # set once: why it is over
        # packet id -> (Future, loop time sent); dicts keep the oldest first
        self._pending: dict[int, tuple[asyncio.Future[None], float]] = {}
        self._subs: dict[int, tuple[asyncio.Future[int], float]] = {}
        self._inbox: deque[Message] = deque()
        self._inbox_waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: the MQTT version spoken on this connection (5 or 4: 3.1.1), once connected
        self.protocol = 0
        #: the broker's Maximum Packet Size (MQTT 5 CONNACK), None when it names none
        self.max_packet_size: int | None = None
        self.counters = {
            "published": 0,
            "acked": 0,
            "received": 0,
            "oversized": 0,
            "overflow": 0,
        }

    # -- public API -----------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the broker accepted the connection and it has not failed or closed."""
        return self._session is not None and self._error is None

    @property
    def in_flight(self) -> int:
        """QoS 1 publishes waiting for their PUBACK."""
        return len(self._pending)

    @property
    def messages(self) -> _Messages:
        """Received messages, ``async for``; one consumer at a time."""
        return _Messages(self)

    def statistics(self) -> dict[str, int]:
        return {**self.counters, "in_flight": len(self._pending), "queued": len(self._inbox)}

    def packet_size(self, topic: str, payload_size: int, qos: int = 1) -> int:
        """The size of the PUBLISH packet carrying ``payload_size`` bytes on ``topic``."""
        rest = 2 + len(topic.encode()) + (2 if qos else 0) + (1 if self.protocol == 5 else 0)
        rest += payload_size
        head = 2
        while rest >= 128 ** (head - 1) and head < 5:
            head += 1
        return head + rest

    def fits(self, topic: str, payload_size: int) -> bool:
        """Whether a QoS 1 publish of ``payload_size`` bytes on ``topic`` is within the
        broker's Maximum Packet Size (always, when the broker names none)."""
        limit = self.max_packet_size
        return limit is None or self.packet_size(topic, payload_size) <= limit

    async def __aenter__(self) -> MqttClient:
        await self.connect()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.disconnect()

    async def connect(self) -> None:
        """Open the connection and wait for the broker's CONNACK (``connect_timeout`` in all):
        MQTT 5 first, 3.1.1 if the broker refuses the version."""
        if self._loop is not None:
            raise LocalError("an MqttClient connects once; make a new one to reconnect")
        self._loop = asyncio.get_running_loop()
        where = (self.host, self.port)
        if where not in _NO_V5:
            try:
                await self._connect(5)
                return
            except _VersionRefused:
                log.debug("mqtt %s:%d: no MQTT 5, asking in 3.1.1", *where)
        try:
            await self._connect(4)
            _NO_V5.add(where)  # 3.1.1 only: from now on asked in 3.1.1 at once
        except _VersionRefused as exc:
            raise MqttError(
                f"broker {self.host}:{self.port} refused the connection: "
                "unacceptable protocol version (CONNACK return code 1)",
                return_code=1,
            ) from exc

    async def disconnect(self) -> None:
        """Send the farewell if any, then DISCONNECT (the broker drops the will), and close.

        Publishes still waiting for their PUBACK fail with :class:`MqttClosed`.
        """
        session = self._session
        if session is None or self._error is not None:
            if session is not None:
                self._abort(session)
            return
        self._fail(MqttClosed(f"the client disconnected from {self.host}:{self.port}"))
        if self._farewell is not None:
            topic, payload, _, retain = self._farewell
            session.wire.publish(topic, payload, 0, retain)
        try:
            async with asyncio.timeout(1.0):
                await session.__aexit__(None, None, None)
        except (TimeoutError, aiomqtt.MqttError):  # a broker that does not read: drop it
            self._abort(session)

    def publish_nowait(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None]:
        """Queue a PUBLISH now; the Future is done on its PUBACK (QoS 1) or at once (QoS 0).

        The Future fails with :class:`MqttError` if the connection does (at once,
        with every other one waiting), or with :class:`MqttRefused` if the broker
        refuses the message (an MQTT 5 PUBACK reason code of 0x80 or more).
        """
        session = self._session
        if self._error is not None or session is None or self._loop is None:
            raise self._failure()
        if qos not in (0, 1):
            raise LocalError(f"this client publishes at QoS 0 or 1, not {qos}")
        _check_topic(topic)
        fut: asyncio.Future[None] = self._loop.create_future()
        info = session.wire.publish(topic, payload, qos, retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:  # paho lost the socket already
            raise MqttError(
                f"connection to {self.host}:{self.port} lost: {paho.error_string(info.rc)}"
            )
        self.counters["published"] += 1
        if qos == 0:
            fut.set_result(None)
            return fut
        self._pending[info.mid] = (fut, self._loop.time())
        self._arm()
        return fut

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish; return once the PUBACK arrived (QoS 1) or the packet was queued (QoS 0)."""
        await self.publish_nowait(topic, payload, qos=qos, retain=retain)

    async def drain(self) -> None:
        """Raise the connection's failure if it failed; let the socket's writer run."""
        if self._error is not None:
            raise self._failure()
        await asyncio.sleep(0)

    async def subscribe(self, topic_filter: str, qos: int = 1) -> int:
        """Subscribe and wait for the SUBACK; the granted QoS.

        :class:`MqttError` when the broker refuses the filter.
        """
        if qos not in (0, 1):
            raise LocalError(f"this client subscribes at QoS 0 or 1, not {qos}")
        session = self._session
        if self._error is not None or session is None or self._loop is None:
            raise self._failure()
        try:
            rc, mid = session.wire.subscribe(topic_filter, qos)
        except ValueError as exc:
            raise LocalError(f"bad topic filter {topic_filter!r}: {exc}") from None
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            raise MqttError(f"connection to {self.host}:{self.port} lost: {paho.error_string(rc)}")
        fut: asyncio.Future[int] = self._loop.create_future()
        self._subs[mid] = (fut, self._loop.time())
        self._arm()
        code = await fut
        if code >= 0x80:
            raise MqttError(
                f"broker {self.host}:{self.port} refused the subscription "
                f"to {topic_filter!r} (SUBACK 0x{code:02X})"
            )
        return code

    # -- connecting -------------------------------------------------------------

    async def _connect(self, version: int) -> None:
        v5 = version == 5
        will = None
        if self._will is not None:
            topic, payload, qos, retain = self._will
            will = aiomqtt.Will(topic, payload, qos, retain)
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            # the broker sends us nothing larger than what we would keep (a little
            # over the largest cap: topic and header)
            biggest = max([self._max_message_size, *self._topic_caps.values()])
            if biggest + 1024 < MAX_PACKET_SIZE:
                properties.MaximumPacketSize = biggest + 1024
            if not self._clean_session:
                properties.SessionExpiryInterval = 0xFFFFFFFF
        session = _Session(
            self,
            hostname=self.host,
            port=self.port,
            username=self._username,
            password=self._password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            will=will,
            clean_session=None if v5 else self._clean_session,
            clean_start=self._clean_session if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            keepalive=self.keepalive,
            timeout=self._connect_timeout,
            max_inflight_messages=self._max_in_flight,
            properties=properties,
            tls_context=self._tls,
        )
        session.wire.connect_timeout = self._connect_timeout
        if self._tls is not None:
            session.wire._ssl_wrap_socket = self._tls_wrapper()  # type: ignore[method-assign,assignment]
        where = f"{self.host}:{self.port}"
        try:
            async with asyncio.timeout(self._connect_timeout):
                await session.__aenter__()
        except TimeoutError as exc:
            self._abort(session)
            step = "CONNACK" if session.wire.socket() is not None else "TCP/TLS connection"
            raise MqttError(f"no {step} from {where} within {self._connect_timeout:g} s") from exc
        except aiomqtt.MqttError as exc:
            # a refusing broker closes the connection itself: let it (amqtt leaks its
            # socket when we are quicker), then drop ours if it did not
            await session.closed(0.5)
            self._abort(session)
            raise self._refusal(exc, v5) from exc
        except BaseException:  # cancelled: leave no socket behind
            self._abort(session)
            raise
        self._session = session
        self.protocol = version
        props = session.connack_properties
        if v5 and props is not None and hasattr(props, "MaximumPacketSize"):
            self.max_packet_size = int(props.MaximumPacketSize)
        session._disconnected.add_done_callback(self._lost)

    def _tls_wrapper(self) -> Callable[[socket.socket], ssl.SSLSocket]:
        """paho's TLS handshake, closing the socket when it fails (paho 2.2 leaves it to
        the garbage collector: one file descriptor per failed attempt, a ResourceWarning).
        The context decides everything (the name is checked against ``host``)."""
        ctx, host, timeout = self._tls, self.host, self._connect_timeout
        assert ctx is not None

        def wrap(tcp: socket.socket) -> ssl.SSLSocket:
            sock = ctx.wrap_socket(tcp, server_hostname=host, do_handshake_on_connect=False)
            try:
                sock.settimeout(timeout)
                sock.do_handshake()
            except BaseException:
                sock.close()
                raise
            return sock

        return wrap

    def _refusal(self, exc: aiomqtt.MqttError, v5: bool) -> MqttError | _VersionRefused:
        """Our error for a failed aiomqtt connect (its cause is kept as ``__context__``)."""
        where = f"{self.host}:{self.port}"
        rc = exc.rc if isinstance(exc, aiomqtt.MqttCodeError) else None
        if isinstance(exc, MqttConnectError) and rc is not None:
            code = int(rc.value) if isinstance(rc, ReasonCode) else int(rc)
            code = _V5_TO_V3.get(code, code)  # paho names 3.1.1 codes in MQTT 5 terms
            if code == 1:
                return _VersionRefused(str(exc))
            name = _REFUSALS.get(code) or (str(rc) if isinstance(rc, ReasonCode) else "")
            err = MqttError(
                f"broker {where} refused the connection: {name} (CONNACK return code {code})",
                return_code=code,
            )
            return err
        if isinstance(exc, _ClosedEarly):
            # a 3.1.1 broker may close on a version it does not know, or answer in 3.1.1
            # (paho reads that as a protocol error under MQTT 5): ask in 3.1.1
            if v5:
                return _VersionRefused(str(exc))
            return MqttError(f"connection to {where} lost: closed by the broker before CONNACK")
        cause = exc.__context__
        if isinstance(cause, OSError):
            return MqttError(f"cannot connect to {where}: {cause}")
        return MqttError(f"cannot connect to {where}: {exc}")

    # -- paho's callbacks (through _Session) ----------------------------------

    def _acked(self, mid: int, reason: ReasonCode) -> None:
        entry = self._pending.pop(mid, None)
        if entry is None:
            return
        fut = entry[0]
        if fut.done():
            return
        self.counters["acked"] += 1
        if reason.is_failure:
            fut.set_exception(
                MqttRefused(f"broker {self.host}:{self.port} refused the message: {reason}")
            )
        else:
            fut.set_result(None)

    def _subacked(self, mid: int, codes: list[ReasonCode]) -> None:
        entry = self._subs.pop(mid, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(int(codes[0].value) if codes else 0x80)

    def _received(self, m: paho.MQTTMessage) -> None:
        topic = m.topic
        size = len(m.payload)
        if size > self._topic_caps.get(topic, self._max_message_size):
            self._drop("oversized", topic, size)
        elif len(self._inbox) >= self._max_queued:
            self._drop("overflow", topic, size)
        else:
            self.counters["received"] += 1
            self._inbox.append(Message(topic, bytes(m.payload), m.qos, bool(m.retain)))
            waiter = self._inbox_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _drop(self, why: str, topic: str, size: int) -> None:
        self.counters[why] += 1
        if self._on_drop is not None:
            self._on_drop(why, topic, size)

    def _lost(self, done: asyncio.Future[None]) -> None:
        """aiomqtt's ``_disconnected`` is done: the connection is over."""
        exc = None if done.cancelled() else done.exception()
        if exc is None:
            why = "closed by the broker"
        elif isinstance(exc, aiomqtt.MqttCodeError) and isinstance(exc.rc, int):
            why = paho.error_string(exc.rc).rstrip(".").lower()
        else:
            why = str(exc)
        err = MqttError(f"connection to {self.host}:{self.port} lost: {why}")
        err.__cause__ = exc
        self._fail(err)

    # -- failing ----------------------------------------------------------------

    def _failure(self) -> MqttError | MqttClosed:
        """A fresh error saying why the connection is over (one per waiter: an exception
        instance raised in several tasks would collect all their tracebacks)."""
        err = self._error
        if err is None:
            return MqttError(f"not connected to {self.host}:{self.port}")
        if isinstance(err, MqttClosed):
            return MqttClosed(str(err))
        copy = MqttError(str(err), return_code=err.return_code)
        copy.__cause__ = err.__cause__
        return copy

    def _fail(self, err: MqttError | MqttClosed) -> None:
        """The connection is over: remember why (the first reason), fail every waiter."""
        if self._error is None:
            self._error = err
            if isinstance(err, MqttError):
                log.debug("mqtt %s:%d: %s", self.host, self.port, err)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting: list[asyncio.Future[None] | asyncio.Future[int]] = []
        waiting += [f for f, _ in self._pending.values()]
        waiting += [f for f, _ in self._subs.values()]
        self._pending.clear()
        self._subs.clear()
        for fut in waiting:
            if not fut.done():
                fut.set_exception(self._failure())
        waiter = self._inbox_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # it looks at _error when it wakes

    def _abort(self, session: _Session) -> None:
        """Drop the socket without a DISCONNECT (the broker publishes the will): paho
        reads the end of the stream and closes its side, as for any lost connection."""
        sock = session.wire.socket()
        if not isinstance(sock, socket.socket):  # none (never opened, or closed already)
            return
        with contextlib.suppress(OSError):  # already closed
            sock.shutdown(socket.SHUT_RDWR)

    # -- acknowledgement timeout ------------------------------------------------

    def _arm(self) -> None:
        if self._ack_timeout is None or self._timer is not None or self._loop is None:
            return
        sent = [next(iter(d.values()))[1] for d in (self._pending, self._subs) if d]
        if sent:
            self._timer = self._loop.call_at(min(sent) + self._ack_timeout, self._tick)

    def _tick(self) -> None:
        self._timer = None
        loop, t, session = self._loop, self._ack_timeout, self._session
        if self._error is not None or loop is None or t is None or session is None:
            return
        sent = [next(iter(d.values()))[1] for d in (self._pending, self._subs) if d]
        if sent and loop.time() - min(sent) >= t - 1e-3:
            self._fail(
                MqttError(
                    f"no acknowledgement from {self.host}:{self.port} within {t:g} s: "
                    "connection declared dead"
                )
            )
            self._abort(session)
            return
        self._arm()


class _ClosedEarly(aiomqtt.MqttCodeError):
    """The connection ended before any CONNACK (internal)."""


class _VersionRefused(Exception):
    """The broker does not speak the MQTT version we asked for (internal: retried)."""


def _check_topic(topic: str) -> None:
    if not topic or "+" in topic or "#" in topic or len(topic.encode()) > 65535:
        raise LocalError(f"bad MQTT topic name {topic!r} (empty, too long, or a wildcard)")
