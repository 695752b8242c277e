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
at start is normal (one INFO line, then quiet retries). A failure that will
not fix itself (the broker's certificate is not trusted, the broker refuses
our credentials, the host name does not resolve: :func:`explain`) is logged
at WARNING at once, with a hint; any failure that lasts is counted and logged
again at WARNING, after ``warn_after_s`` and then at doubling intervals up to
``warn_every_s``, so ``journalctl -p warning`` shows a gateway that cannot
deliver. A connection that
fails (lost, refused, a broker silent for 1.5 keepalives, a PUBACK later than
``publish_timeout_s``) fails every publish in flight at once: the session ends
and the next one resends them. The connection is :class:`agent.mqtt.MqttClient`
(docs/decisions.md, 17): a publish is a Future and a done-callback, no task.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent.commands import MAX_COMMAND_BYTES, CommandExecutor, on_message
from agent.mqtt import MqttClient, MqttError
from agent.spool import Spool, SpoolRow
from protocols import topics
from protocols.gap import GapRange

__all__ = ["Failure", "GapSigner", "Uplink", "UplinkSettings", "explain", "gap_topic"]

log = logging.getLogger(__name__)

GapSigner = Callable[[Sequence[GapRange]], bytes]


gap_topic = topics.gap  # signed gap notices, QoS 1


@dataclass(frozen=True)
class Failure:
    """Why a connection to the broker failed, in words an installer can act on.

    ``kind`` groups failures (``tls-verify``, ``tls``, ``auth``, ``dns``,
    ``refused``, ``unreachable``, ``timeout``, ``lost``, ``other``);
    ``lasting`` is true for those that will not fix themselves by waiting.
    """

    kind: str
    message: str
    hint: str
    lasting: bool


def _causes(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


_DIAG = "`vitals diag uplink` checks DNS, TCP, TLS and MQTT one by one"


def explain(exc: BaseException, host: str, port: int) -> Failure:
    """The :class:`Failure` behind a failed connection to ``host:port`` (no raw errno)."""
    where = f"{host}:{port}"
    for cause in _causes(exc):
        if isinstance(cause, MqttError) and cause.return_code in (4, 5):
            return Failure(
                "auth",
                f"the broker {where} refused our credentials: {cause.reason}",
                "check [uplink] username and password (or the client certificate, "
                "[uplink.tls] cert_file) with the hub operator",
                True,
            )
        if isinstance(cause, MqttError) and cause.return_code is not None:
            return Failure(
                "refused-mqtt",
                f"the broker {where} refused the connection: {cause.reason}",
                "ask the hub operator whether this gateway is allowed on the broker",
                cause.return_code in (1, 2),
            )
        if isinstance(cause, ssl.SSLCertVerificationError):
            return Failure(
                "tls-verify",
                f"the certificate of {where} cannot be verified: "
                f"{cause.verify_message or cause.reason}",
                "set [uplink.tls] ca_file to the CA that signed the broker's certificate, and "
                f"[uplink] host to a name in that certificate; {_DIAG}",
                True,
            )
        if isinstance(cause, ssl.SSLError):
            return Failure(
                "tls",
                f"the TLS handshake with {where} failed: {cause.reason or cause.strerror}",
                "does the broker speak TLS on this port (8883), and does it want a client "
                f"certificate ([uplink.tls] cert_file, key_file)? {_DIAG}",
                True,
            )
        if isinstance(cause, socket.gaierror):
            return Failure(
                "dns",
                f"cannot resolve the broker's name {host!r}: {cause.strerror}",
                f"check [uplink] host and the cabinet's DNS (/etc/resolv.conf); {_DIAG}",
                True,
            )
        if isinstance(cause, ConnectionRefusedError):
            return Failure(
                "refused",
                f"nothing accepts connections on {where} (connection refused)",
                "is the broker running, and is [uplink] port its MQTT port (1883, TLS 8883)?",
                False,
            )
        if isinstance(cause, OSError) and cause.errno in (
            errno.ENETUNREACH,
            errno.EHOSTUNREACH,
            errno.ENETDOWN,
        ):
            return Failure(
                "unreachable",
                f"no route to {where} ({cause.strerror})",
                "is the cabinet's network up (modem, cable, `ip route`)?",
                False,
            )
        if isinstance(cause, TimeoutError):
            return Failure(
                "timeout",
                f"{where} did not answer in time",
                f"a firewall dropping the port, or the wrong host; {_DIAG}",
                False,
            )
    text = str(exc)
    if isinstance(exc, MqttError) and " within " in text:  # no CONNACK / no TCP in time
        return Failure(
            "timeout", text, f"a firewall dropping the port, or the wrong host; {_DIAG}", False
        )
    if isinstance(exc, MqttError) and " lost" in text:
        return Failure("lost", text, "the broker or the network dropped the connection", False)
    return Failure("other", text, _DIAG, False)


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
    # a failure that lasts is logged again at WARNING: first after warn_after_s,
    # then at doubling intervals up to warn_every_s
    warn_after_s: float = 60.0
    warn_every_s: float = 600.0


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
        self.last_hint = ""
        self._last_exc: BaseException | None = None
        self._gap_busy = False
        self._reset_failures()

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
            "last_hint": self.last_hint,
            "failed_attempts": self._failures,
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
            # commands are the only messages we receive: larger ones are dropped unread
            max_message_size=MAX_COMMAND_BYTES,
            on_drop=self.commands.on_drop if self.commands is not None else None,
        )

    async def run(self) -> None:
        """Publish forever, reconnecting as needed. Cancel to stop."""
        s = self._s
        attempt = 0
        down_since = time.monotonic()
        self._reset_failures()
        while True:
            mark = self._spool.last_id  # older: backlog; appended from now on: live
            try:
                async with self._client() as client:
                    attempt = 0
                    self.connects += 1
                    self.connected.set()
                    how = (
                        f"down {time.monotonic() - down_since:.1f} s"
                        if self.connects > 1
                        else "first"
                    )
                    if self._failures:
                        how += f", after {self._failures} failed attempts"
                    log.info(
                        "uplink connected to %s:%d (%s); %d batches to send",
                        s.host,
                        s.port,
                        how,
                        self._spool.statistics()["depth_batches"],
                    )
                    self._reset_failures()
                    await self._session(client, mark)
            except* MqttError as group:
                self._last_exc = group.exceptions[0]
                self.last_error = str(self._last_exc)
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # cancelled while the connection failed: the session's TaskGroup raised
                # the MqttError and dropped the cancellation (Python 3.11); stop anyway
                raise asyncio.CancelledError
            if self.connected.is_set():
                down_since = time.monotonic()
                why = explain(self._last_exc, s.host, s.port) if self._last_exc else None
                log.warning(
                    "uplink to %s:%d lost: %s",
                    s.host,
                    s.port,
                    why.message if why else self.last_error,
                )
            else:
                self.connect_failures += 1
                if self._last_exc is not None:
                    self._connect_failed(explain(self._last_exc, s.host, s.port))
            self.connected.clear()
            attempt += 1
            cap = min(s.backoff_max_s, s.backoff_min_s * 2 ** min(attempt, 16))
            await asyncio.sleep(random.uniform(s.backoff_min_s / 2, cap))

    def _reset_failures(self) -> None:
        self._failures = 0
        self._failing_since = 0.0
        self._failure_kind = ""
        self._next_warning = 0.0
        self._warn_interval = self._s.warn_after_s

    def _connect_failed(self, why: Failure) -> None:
        """Log a failed connect: the first of its kind at once (INFO for a broker not up
        yet at boot, WARNING otherwise, with a hint), then again at WARNING while it lasts."""
        s = self._s
        now = time.monotonic()
        self._failures += 1
        if self._failures == 1:
            self._failing_since = now
        self.last_error = why.message
        self.last_hint = why.hint
        if why.kind != self._failure_kind:
            self._failure_kind = why.kind
            self._next_warning = now + self._warn_interval
            if why.lasting or self.connects:
                log.warning("uplink cannot connect: %s; hint: %s", why.message, why.hint)
            else:  # normal at boot (the cabinet's modem may still be dialling)
                log.info(
                    "broker %s:%d not reachable yet (%s); spooling, will keep trying",
                    s.host,
                    s.port,
                    why.message,
                )
            return
        if now >= self._next_warning:
            self._warn_interval = min(self._warn_interval * 2, s.warn_every_s)
            self._next_warning = now + self._warn_interval
            log.warning(
                "uplink still cannot connect after %d attempts in %s: %s; hint: %s "
                "(%d batches waiting in the spool)",
                self._failures,
                _duration(now - self._failing_since),
                why.message,
                why.hint,
                self._spool.statistics()["depth_batches"],
            )

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
