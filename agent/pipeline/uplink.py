"""The uplink: spooled batches to the broker over MQTT QoS 1, confirmed by the hub.

With the hub's key (receipts on, docs/reliability.md "Hub receipts"): a PUBACK
marks a batch sent; the hub's signed receipt on ``{prefix}/{gateway}/receipt``
deletes it; a sent batch with no receipt after ``confirm_timeout_s`` is
published again; a signed heartbeat (the last seq sealed, what the spool
holds) goes out on connect, every ``heartbeat_s`` and at a clean stop; the
hub's ``resend`` command is :meth:`Uplink.resend`; a batch that cannot pass is
split (before sending when the broker's MQTT 5 CONNACK names a maximum packet
size below it; :meth:`Uplink._after_failure`, :meth:`Uplink._overdue`). Without the
key a batch leaves the spool when its PUBACK arrives. Either way a lost
connection simply restarts from the oldest unsent batch (the hub drops the
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
(aiomqtt, MQTT 5 where the broker speaks it: docs/decisions.md, 38): a publish is
a Future and a done-callback, no task.
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
from dataclasses import dataclass
from typing import Any

from agent.edge.commands import MAX_COMMAND_BYTES, CommandExecutor, CommandRefused, on_message
from agent.mqtt import Message, MqttClient, MqttError, MqttRefused
from agent.ops.config import UplinkConfig
from agent.ops.confpush import ConfigReceiver
from agent.pipeline.spool import Row, Spool, SpoolRow
from protocols import topics
from protocols.command import MAX_RESEND_RANGES
from protocols.confpush import MAX_CONFIG_BYTES
from protocols.errors import ProtocolError
from protocols.gap import GapRange
from protocols.receipt import MAX_HEARTBEAT_RANGES, EpochReceipt, RefusedRange, parse_receipt

__all__ = [
    "Failure",
    "GapSigner",
    "HeartbeatSigner",
    "Splitter",
    "Uplink",
    "explain",
    "gap_topic",
    "mqtt_client",
]

log = logging.getLogger(__name__)

GapSigner = Callable[[Sequence[GapRange]], bytes]
#: the signed heartbeat naming the spool's unconfirmed ``(epoch, first, last)`` runs
HeartbeatSigner = Callable[[Sequence[tuple[int, int, int]]], bytes]
#: a batch's readings re-sealed as two or more batches with new seqs (spool rows)
Splitter = Callable[[SpoolRow], list[Row]]

#: what to check when the hub refuses batches for good, by its reason
_REFUSAL_HINTS: dict[str, str] = {
    "too_old": "older than the hub takes (8 days): the spool kept them long, or the clock was wrong",
    "bad_payload": "the gateway's software and the hub's disagree on the batch format",
}
#: receipts and commands share the connection: a receipt is larger than a command
#: (up to 256 ranges per epoch), and anything larger is dropped unread
MAX_RECEIVED_BYTES = 64 << 10
#: a batch whose publish failed with the connection this often is split
SPLIT_AFTER_RESETS = 2
#: a batch sent again this often without a receipt, while later ones got theirs, is split
SPLIT_AFTER_TRIES = 3


gap_topic = topics.gap  # signed gap notices, QoS 1


def mqtt_client(
    config: UplinkConfig, tls: ssl.SSLContext | None, *, role: str = "", **options: Any
) -> MqttClient:
    """A connection to the uplink's broker as this gateway: the host, port, user,
    keepalive, TLS context and connect timeout of ``config``, whoever connects (the
    uplink, the edge events, enrollment, ``vitals diag uplink``). ``role`` names a
    connection beside the uplink's (``events``, ``enroll``, ``diag-1a2b3c``): the
    client id gets it as a suffix, so the broker never drops the uplink's session for
    it. ``options``: the rest of :class:`MqttClient`'s (the will, the ack timeout, caps)."""
    client_id = config.client_id or f"vitals-{config.gateway}"
    return MqttClient(
        config.host,
        config.port,
        client_id=f"{client_id}-{role}" if role else client_id,
        username=config.username or None,
        password=config.password or None,
        keepalive=config.keepalive_s,
        tls=tls,
        connect_timeout=config.connect_timeout_s,
        **options,
    )


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


class Uplink:
    """Publishes what ``spool`` holds to the broker ``settings`` names (passed whole,
    :class:`agent.ops.config.UplinkConfig`), over ``tls`` when given."""

    def __init__(
        self,
        settings: UplinkConfig,
        spool: Spool,
        *,
        tls: ssl.SSLContext | None = None,
        meta: bytes | None = None,
        gap_signer: GapSigner | None = None,
        hub_key: bytes | None = None,
        heartbeat: HeartbeatSigner | None = None,
        splitter: Splitter | None = None,
        sealed: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        if not 0.0 <= settings.backlog_share <= 1.0:
            raise ValueError("backlog_share must be within [0, 1]")
        if settings.confirm not in ("receipt", "puback"):
            raise ValueError("confirm must be 'receipt' or 'puback'")
        #: receipts on: a batch leaves the spool only on the hub's signed receipt
        self.receipts_on = settings.confirm == "receipt" and hub_key is not None
        self._hub_key = hub_key
        self._heartbeat_signer = heartbeat
        self._splitter = splitter
        self._sealed = sealed  # (current epoch, last seq sealed in it)
        self.receipts = 0  # receipts accepted
        self.receipts_refused = 0  # forged, misaddressed or malformed: ignored
        # receipts of kind "event" arrive here too (one subscription, one check of the
        # hub's signature) and are handed to the edge events' outbox
        self.event_receipts = 0
        self.on_event_receipt: Callable[[list[EpochReceipt]], object] | None = None
        self.heartbeats = 0
        self.resend_asks = 0
        self._refused_logged = False
        self._batch_refused_logged = False
        self._failed: list[SpoolRow] = []  # this session's batches the connection failed
        self._careful = 0  # publishes to make one at a time (after a failure: who did it?)
        self._resets: dict[int, int] = {}  # id -> connections that failed with it alone
        self._client_now: MqttClient | None = None
        self._receipt_at = -float("inf")  # when the last receipt came (monotonic)
        self._s = settings
        self._tls = tls
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
        self.confpush: ConfigReceiver | None = None  # signed configurations from the hub
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
            "confirm": "receipt" if self.receipts_on else "puback",
            "receipts": self.receipts,
            "receipts_refused": self.receipts_refused,
            "event_receipts": self.event_receipts,
            "heartbeats": self.heartbeats,
            "resend_asks": self.resend_asks,
        }

    def _client(self) -> MqttClient:
        s = self._s
        return mqtt_client(
            s,
            self._tls,
            will=(topics.status(s.gateway, s.topic_prefix), b"offline", 1, True),
            farewell=(topics.status(s.gateway, s.topic_prefix), b"offline", 0, True),
            ack_timeout=s.publish_timeout_s,
            # commands (and receipts) are the only messages we receive: larger ones are
            # dropped (under MQTT 5 the broker is told, and does not send them)
            max_message_size=MAX_RECEIVED_BYTES if self.receipts_on else MAX_COMMAND_BYTES,
            on_drop=self.commands.on_drop if self.commands is not None else None,
            # a pushed configuration has a cap of its own
            topic_caps={topics.config(s.gateway, s.topic_prefix): MAX_CONFIG_BYTES}
            if self.confpush is not None
            else None,
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
                    self._client_now = client
                    await self._session(client, mark)
            except* MqttError as group:
                self._last_exc = group.exceptions[0]
                self.last_error = str(self._last_exc)
            finally:
                self._client_now = None
            await self._after_failure()
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
        await client.publish(
            topics.status(s.gateway, s.topic_prefix), b"online", qos=1, retain=True
        )
        if self.commands is not None:
            await client.subscribe(topics.cmd(s.gateway, s.topic_prefix), qos=1)
        if self.receipts_on:
            await client.subscribe(topics.receipt(s.gateway, s.topic_prefix), qos=1)
        if self._meta is not None:
            await client.publish(
                topics.meta(s.gateway, s.topic_prefix), self._meta, qos=1, retain=True
            )
        await spool.flush_acks()
        topic = topics.batch(s.gateway, s.topic_prefix)
        room = asyncio.Semaphore(s.window)
        back_cursor, live_cursor = 0, mark
        back: deque[SpoolRow] = deque()
        live: deque[SpoolRow] = deque()
        back_done = False
        back_sent = live_sent = 0
        read = s.window * 4
        again: deque[SpoolRow] = deque()
        self._failed = []
        one = asyncio.Semaphore(1)  # careful: one batch in flight, to know which fails
        look = True  # read new batches: at the start, on the spool's news, while pages come full
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch(client), name="uplink.watch")
            if self.receipts_on:
                tg.create_task(self._heartbeats(client), name="uplink.heartbeat")
                tg.create_task(self._overdue(), name="uplink.overdue")
            while True:
                if spool.has_gaps and self._gap_signer and not self._gap_busy:
                    self._gap_busy = True
                    await room.acquire()
                    tg.create_task(self._send_gaps(client, room), name="uplink.gap")
                if not live and (look or spool.news.take()):
                    rows = await spool.pending(live_cursor, read)
                    if rows:
                        live.extend(rows)
                        live_cursor = rows[-1].id
                    look = len(rows) == read  # more where these came from
                if not back and not back_done:
                    rows = await spool.pending(back_cursor, read, upto_id=mark)
                    if rows:
                        back.extend(rows)
                        back_cursor = rows[-1].id
                    else:
                        back_done = True
                        if back_sent:
                            log.info("uplink: backlog of %d batches sent", back_sent)
                if not again and (due := spool.due(read)):
                    again.extend(await spool.rows(due))
                if not live and not back and not again:
                    look = await spool.news.wait()
                    continue
                await room.acquire()
                await client.drain()  # the socket's buffer is over its mark: wait
                take_back = not again and (
                    bool(back)
                    and (not live or back_sent <= s.backlog_share * (back_sent + live_sent))
                )
                row = (again or (back if take_back else live)).popleft()
                if not client.fits(topic, len(row.data)):  # MQTT 5: the broker said its limit
                    room.release()
                    await self._split(
                        row,
                        f"{client.packet_size(topic, len(row.data))} bytes, over the broker's "
                        f"maximum packet size of {client.max_packet_size}",
                    )
                    continue
                release: tuple[asyncio.Semaphore, ...] = (room,)
                if self._careful > 0:  # alone in flight: a failure is this batch's
                    self._careful -= 1
                    await one.acquire()
                    release = (room, one)
                try:
                    acked = client.publish_nowait(topic, row.data, qos=1)
                except MqttError:  # the connection failed already: this one never went out
                    for sem in release:
                        sem.release()
                    raise
                acked.add_done_callback(functools.partial(self._acked, row, release, take_back))
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
        receipts = topics.receipt(self._s.gateway, self._s.topic_prefix)
        if self.confpush is not None:  # subscribes, publishes its last report
            await self.confpush.attach(client)
        async for msg in client.messages:
            if self.confpush is not None and await self.confpush.on_message(client, msg):
                continue
            if self.receipts_on and msg.topic == receipts:
                await self._on_receipt(msg)
            elif self.commands is not None:
                await on_message(client, msg, self.commands, prefix=self._s.topic_prefix)

    def _acked(
        self,
        row: SpoolRow,
        release: tuple[asyncio.Semaphore, ...],
        backlog: bool,
        fut: asyncio.Future[None],
    ) -> None:
        """Done-callback of a batch's publish: its PUBACK came, or the connection failed
        (every publish in flight then fails at once; the batch stays in the spool)."""
        for sem in release:
            sem.release()
        self.in_flight -= 1
        exc = None if fut.cancelled() else fut.exception()
        if isinstance(exc, MqttRefused):  # MQTT 5: the broker said no (its ACL, a quota)
            self._refused(row, exc)
            return
        if fut.cancelled() or exc is not None:
            self._failed.append(row)
            return
        if self.receipts_on:
            self._spool.mark_sent([row.id])
        else:
            self._spool.ack([row.id])
        self.published += 1
        self.readings_acked += row.n
        if backlog:
            self.backlog_acked += 1
        self.last_acked = (row.epoch, row.seq)

    def _refused(self, row: SpoolRow, exc: MqttRefused) -> None:
        """The broker refused a batch (an MQTT 5 PUBACK reason code; a 3.1.1 broker
        acknowledges and drops it instead). It stays in the spool: with receipts it
        counts as sent, so the receipt rules (sent again, split after 3 tries) apply as
        to a PUBACK that lied; without, the next connection sends it again."""
        if self.receipts_on:
            self._spool.mark_sent([row.id])
        if not self._batch_refused_logged:
            self._batch_refused_logged = True
            log.warning(
                "uplink: %s (batch epoch %d seq %d); it stays in the spool (further "
                "refusals not logged); hint: the broker's ACL must let this gateway publish "
                "on %s",
                exc,
                row.epoch,
                row.seq,
                topics.batch(self._s.gateway, self._s.topic_prefix),
            )

    async def _send_gaps(self, client: MqttClient, room: asyncio.Semaphore) -> None:
        assert self._gap_signer is not None
        try:
            rows = await self._spool.gaps()
            if not rows:
                return
            data = self._gap_signer([g for _, g in rows])
            await client.publish(gap_topic(self._s.gateway, self._s.topic_prefix), data, qos=1)
            await self._spool.gaps_sent([i for i, _ in rows])
            self.gap_notices += 1
            log.info("uplink: gap notice for %d dropped ranges acknowledged", len(rows))
        finally:
            self._gap_busy = False
            room.release()

    # -- receipts ----------------------------------------------------------------

    async def _on_receipt(self, msg: Message) -> None:
        """Delete what a receipt covers, if the hub signed it for us; anything else is
        counted and ignored (it deletes nothing)."""
        s = self._s
        assert self._hub_key is not None
        try:
            receipt = parse_receipt(msg.payload)
            if receipt.header.gw != s.gateway:
                raise ProtocolError(f"receipt for {receipt.header.gw!r}, not for us")
            receipt.verify(self._hub_key)
            refused = receipt.refused() if receipt.header.kind == "refused" else None
            epochs = receipt.epochs() if refused is None else []
        except ProtocolError as exc:
            self.receipts_refused += 1
            if not self._refused_logged:
                self._refused_logged = True
                log.warning(
                    "uplink: ignored a receipt that is not the hub's for this gateway (%s); "
                    "it deletes nothing (further ones only counted); hint: if the hub was "
                    "re-installed, enroll again with `vitals provision`",
                    exc,
                )
            return
        self._receipt_at = time.monotonic()
        if refused is not None:  # settled: the hub will never store these
            self.receipts += 1
            await self._on_refused(refused)
            return
        if receipt.header.kind == "event":  # the edge events' series, not the batches'
            self.event_receipts += 1
            if self.on_event_receipt is not None:
                self.on_event_receipt(epochs)
            return
        spans: list[tuple[int, int, int]] = []
        for e in epochs:
            if e.upto >= 0:
                spans.append((e.epoch, 0, e.upto))
            spans.extend((e.epoch, lo, hi) for lo, hi in e.ranges)
        self.receipts += 1
        done = await self._spool.confirm(spans)
        if done:
            log.debug("uplink: receipt confirmed %d batches", done)

    async def _on_refused(self, refused: list[RefusedRange]) -> None:
        """Delete the batches the hub refused for good; one line per reason."""
        by_reason: dict[str, list[RefusedRange]] = {}
        for r in refused:
            by_reason.setdefault(r.reason, []).append(r)
        for reason, ranges in sorted(by_reason.items()):
            done = await self._spool.confirm(
                [(r.epoch, r.first, r.last) for r in ranges], refused=True
            )
            if done:
                log.warning(
                    "uplink: the hub refused %d batches for good (%s: epoch/seq %s); deleted "
                    "from the spool; hint: %s",
                    done,
                    reason,
                    ", ".join(f"{r.epoch}/{r.first}-{r.last}" for r in ranges[:4])
                    + (" ..." if len(ranges) > 4 else ""),
                    _REFUSAL_HINTS.get(reason, "see the hub's log"),
                )

    async def heartbeat(self) -> bool:
        """Publish a heartbeat now if connected (the agent does at a clean stop)."""
        client = self._client_now
        if client is None or not client.connected or not self.receipts_on:
            return False
        try:
            await self._heartbeat(client)
        except MqttError:  # the connection failed meanwhile: the session says so
            return False
        return True

    async def _heartbeat(self, client: MqttClient) -> None:
        s = self._s
        assert self._heartbeat_signer is not None
        held = await self._spool.held_ranges(MAX_HEARTBEAT_RANGES)
        done = client.publish_nowait(
            topics.heartbeat(s.gateway, s.topic_prefix), self._heartbeat_signer(held), qos=1
        )
        done.add_done_callback(_retrieved)
        self.heartbeats += 1

    async def _heartbeats(self, client: MqttClient) -> None:
        """On connect and every ``heartbeat_s``: the hub answers each with a receipt."""
        if self._heartbeat_signer is None:
            return
        while True:
            await self._heartbeat(client)
            await asyncio.sleep(self._s.heartbeat_s)

    async def _overdue(self) -> None:
        """Send again what the broker acknowledged but the hub did not confirm in time;
        split a batch sent again 3 times while the hub answers (its receipts, to the
        heartbeats at least, arrive) but never names it: something on the way drops it.

        While no receipt comes at all (the hub is down), the wait doubles after each
        round, up to 16 times ``confirm_timeout_s``: the backlog is not sent over the
        modem again every minute for nothing. The heartbeat's receipt, once the hub is
        back, deletes what it has, and it asks for the rest."""
        spool = self._spool
        s = self._s
        base = s.confirm_timeout_s
        quiet = 0  # rounds sent again while the hub said nothing
        while True:
            await asyncio.sleep(min(5.0, max(0.05, base / 4)))
            # the hub answers every heartbeat: silence for 3 of them means it is away
            alive = time.monotonic() - self._receipt_at < 3 * s.heartbeat_s + base
            if alive:
                quiet = 0
            timeout = base * 2 ** min(quiet, 4)
            ids = spool.overdue(timeout)
            if not ids:
                continue
            if not alive:
                quiet += 1
                log.info(
                    "uplink: %d batches had no receipt in %.0f s and the hub says nothing: "
                    "sending again, next time after %.0f s",
                    len(ids),
                    timeout,
                    base * 2 ** min(quiet, 4),
                )
                spool.send_again(ids)
                continue
            stuck = [i for i in ids if spool.tries(i) > SPLIT_AFTER_TRIES]
            for row in await spool.rows(stuck):
                if await self._split(row, f"sent {SPLIT_AFTER_TRIES} times with no receipt"):
                    ids.remove(row.id)
            if not ids:  # every one was split: its parts go out as new batches
                continue
            log.info(
                "uplink: %d batches had no receipt in %.0f s: sending again", len(ids), timeout
            )
            spool.send_again(ids)

    async def _after_failure(self) -> None:
        """A connection failed with batches in flight. With several, the next session
        sends that many one at a time; a batch alone in flight when the connection
        fails, twice, is split (a broker limit below its size resets the connection,
        and a broker that names no maximum packet size, as MQTT 3.1.1 cannot, says
        nothing else). Under MQTT 5 a broker that names its limit has the batches over
        it split before they are sent (:meth:`_session`)."""
        failed, self._failed = self._failed, []
        if not failed:
            return
        self._careful = max(self._careful, len(failed))
        if len(failed) > 1:
            return
        row = failed[0]
        n = self._resets[row.id] = self._resets.get(row.id, 0) + 1
        if len(self._resets) > 1024:  # old suspects: forget (they were sent since)
            for k in list(self._resets)[:512]:
                del self._resets[k]
        if n >= SPLIT_AFTER_RESETS:
            del self._resets[row.id]
            await self._split(row, f"the connection failed {n} times on it")

    async def _split(self, row: SpoolRow, why: str) -> bool:
        """Re-seal ``row``'s readings as smaller batches with new seqs; the hub is told
        by a gap notice (reason ``split``) not to wait for the original."""
        if self._splitter is None or row.n < 2:
            log.warning(
                "uplink: batch epoch %d seq %d (%d bytes) cannot pass (%s) and cannot be "
                "split: it stays in the spool; hint: raise the broker's message size limit",
                row.epoch,
                row.seq,
                len(row.data),
                why,
            )
            return False
        try:
            parts = self._splitter(row)
        except ProtocolError as exc:  # our own batch: never expected
            log.error("uplink: cannot split batch epoch %d seq %d: %s", row.epoch, row.seq, exc)
            return False
        if not await self._spool.split(row, parts):
            return False
        log.warning(
            "uplink: batch epoch %d seq %d (%d readings, %d bytes) did not pass (%s): "
            "re-sealed as seq %s; hint: the broker's message size limit may be below the "
            "batch size ([batch] max_readings)",
            row.epoch,
            row.seq,
            row.n,
            len(row.data),
            why,
            ", ".join(str(p[1]) for p in parts),
        )
        return True

    async def resend(self, args: dict[str, Any]) -> object:
        """The ``resend`` command: the hub misses these seqs of an epoch. What the spool
        holds goes out again; what it does not is named in a gap notice (``not_held``)."""
        epoch, ranges = args.get("epoch"), args.get("ranges")
        if (
            type(epoch) is not int
            or epoch < 0
            or type(ranges) is not list
            or not 1 <= len(ranges) <= MAX_RESEND_RANGES
            or not all(
                type(r) is list
                and len(r) == 2
                and all(type(v) is int for v in r)
                and 0 <= r[0] <= r[1]
                for r in ranges
            )
        ):
            raise CommandRefused(
                "bad_args", f"epoch: int, ranges: 1 to {MAX_RESEND_RANGES} [lo, hi] seq ranges"
            )
        asked = sorted((int(r[0]), int(r[1])) for r in ranges)
        if self._sealed is not None:  # never name a seq not sealed yet
            current, last = self._sealed()
            if epoch > current:
                asked = []
            elif epoch == current:
                asked = [(lo, min(hi, last)) for lo, hi in asked if lo <= last]
        self.resend_asks += 1
        held = await self._spool.held(epoch, asked)
        again = self._spool.resend([i for i, _ in held])  # the spool hands them out again
        seqs = sorted({q for _, q in held})
        not_held: list[tuple[int, int]] = []
        k = 0
        for lo, hi in asked:
            cur = lo
            while k < len(seqs) and seqs[k] < lo:
                k += 1
            while k < len(seqs) and seqs[k] <= hi:
                if seqs[k] > cur:
                    not_held.append((cur, seqs[k] - 1))
                cur = seqs[k] + 1
                k += 1
            if cur <= hi:
                not_held.append((cur, hi))
        if not_held:
            await self._spool.note_gaps(
                [GapRange(epoch, lo, hi, 0, "not_held") for lo, hi in not_held]
            )
        log.info(
            "uplink: the hub asked for %d ranges of epoch %d: %d batches held (%d sent again), "
            "%d ranges no longer held",
            len(asked),
            epoch,
            len(held),
            len(again),
            len(not_held),
        )
        return {"resent": len(held), "not_held": [[epoch, lo, hi] for lo, hi in not_held]}


def _retrieved(fut: asyncio.Future[None]) -> None:
    """A heartbeat's PUBACK came, or the connection failed (which the session handles)."""
    if not fut.cancelled():
        fut.exception()
