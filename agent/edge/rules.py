"""Edge events: the ``[[rules]]`` of the gateway configuration, evaluated on every reading.

:class:`RuleEngine` is sans-IO and clock-injected: ``feed(reading)`` returns
the events that reading caused (almost always none), ``tick()`` the events of
time passing with no reading (a device gone offline). Cost per reading is one
dict lookup when no rule watches its point: rules are indexed by point id.

Decisions are made on *reading time* (``Reading.ts``, ms UTC), not on arrival
time, so replaying stored readings (the fleet report does, from the hub) gives
the same events the gateway raised. Only good readings count: a comm error or
an out-of-range value neither fires nor clears a rule (an offline rule is what
watches a silent device).

:class:`EdgeEvents` is the agent's side: engine + signer + a bounded outbox of
sealed event messages, and :meth:`EdgeEvents.publish` sends them over MQTT QoS 1
on their own connection, so an event never queues behind the batch backlog.
The outbox is durable (a table in the spool's file, :meth:`Spool.event_put`):
an event leaves it on the hub's signed receipt of kind "event" (which the
uplink's connection receives and hands over: :meth:`EdgeEvents.confirm`), or
on its PUBACK when the gateway does not know the hub key; one the broker
acknowledged with no receipt after ``confirm_timeout_s`` is sent again, and
the hub drops the duplicate by (gateway, epoch, seq). docs/events.md,
"Delivery and durability".
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any

from agent.clock import Clock, SystemClock
from agent.mqtt import MqttClient, MqttError
from agent.ops.config import RuleConfig, RuleTarget, UplinkConfig
from agent.pipeline.spool import Spool
from agent.pipeline.uplink import explain, mqtt_client
from protocols.ed25519 import PrivateKey
from protocols.event import Event, EventState, event_topic, seal_event
from protocols.reading import Columns, Quality, Reading
from protocols.receipt import EpochReceipt

__all__ = ["EdgeEvents", "RuleEngine"]

log = logging.getLogger(__name__)

Number = int | float | bool


class _LocalMinutes:
    """Minutes after local midnight of a ms timestamp; the UTC offset is cached per hour."""

    def __init__(self, timezone: str) -> None:
        self._tz: datetime.tzinfo | None = None
        if timezone:
            import zoneinfo  # only a rule with a time zone needs it (~0.2 MB resident)

            self._tz = zoneinfo.ZoneInfo(timezone)
        self._hour = -1
        self._offset_ms = 0

    def __call__(self, ts: int) -> int:
        hour = ts // 3_600_000
        if hour != self._hour:
            utc = datetime.datetime.fromtimestamp(hour * 3600, datetime.UTC)
            local = utc.astimezone(self._tz) if self._tz else utc.astimezone()
            off = local.utcoffset()
            self._offset_ms = int(off.total_seconds() * 1000) if off else 0
            self._hour = hour
        return ((ts + self._offset_ms) // 60_000) % 1440


class _State:
    """One rule on one target: the part of the engine that remembers."""

    __slots__ = ("fired", "rule", "since", "target")

    def __init__(self, rule: RuleConfig, target: RuleTarget) -> None:
        self.rule = rule
        self.target = target
        self.fired = False
        self.since = 0  # ms: when the current condition began

    def event(self, state: EventState, value: Number | None, ts: int, detail: str) -> Event:
        self.fired = state == "fired"
        since = min(self.since, ts) if self.since else ts
        t = self.target
        return Event(
            self.rule.id, self.rule.kind, state, t.device, t.point, t.pid, value, ts, since, detail
        )

    def feed(self, r: Reading) -> Event | None:
        raise NotImplementedError


class _Threshold(_State):
    __slots__ = ("_above", "_clear", "_for_ms", "_level", "_local", "_pending", "_window")

    def __init__(self, rule: RuleConfig, target: RuleTarget) -> None:
        super().__init__(rule, target)
        self._above = rule.above is not None
        level = rule.above if rule.above is not None else rule.below
        assert level is not None and rule.clear is not None
        self._level = level
        self._clear = rule.clear
        self._for_ms = int(rule.for_s * 1000)
        self._window = rule.window
        self._local = _LocalMinutes(rule.timezone) if rule.window else None
        self._pending = False

    def _in_window(self, ts: int) -> bool:
        if self._window is None or self._local is None:
            return True
        m = self._local(ts)
        a, b = self._window
        return a <= m < b if a < b else (m >= a or m < b)

    def feed(self, r: Reading) -> Event | None:
        v = r.value
        if r.quality is not Quality.GOOD or not isinstance(v, int | float):
            return None
        rule = self.rule
        if not self._in_window(r.ts):
            self._pending = False
            if self.fired:
                return self.event("cleared", v, r.ts, "time window ended")
            return None
        if self.fired:
            back = v <= self._clear if self._above else v >= self._clear
            if back:
                self._pending = False
                return self.event(
                    "cleared",
                    v,
                    r.ts,
                    f"{v:g} back {'below' if self._above else 'above'} {self._clear:g}",
                )
            return None
        on = v > self._level if self._above else v < self._level
        if not on:
            self._pending = False
            return None
        if not self._pending:
            self._pending = True
            self.since = r.ts
        if r.ts - self.since >= self._for_ms:
            word = "above" if self._above else "below"
            held = f" for {(r.ts - self.since) / 1000:g} s" if self._for_ms else ""
            return self.event("fired", v, r.ts, f"{v:g} {word} {self._level:g}{held} ({rule.id})")
        return None


class _Rate(_State):
    """Change within a sliding window, with a monotonic deque (amortised O(1))."""

    __slots__ = ("_clear", "_sign", "_step", "_window", "_within_ms")

    def __init__(self, rule: RuleConfig, target: RuleTarget) -> None:
        super().__init__(rule, target)
        self._sign = 1.0 if rule.rise is not None else -1.0
        step = rule.rise if rule.rise is not None else rule.fall
        assert step is not None and rule.clear is not None
        self._step = step
        self._clear = rule.clear
        self._within_ms = int(rule.within_s * 1000)
        # (ts, signed value), signed values increasing: the front is the window's minimum
        self._window: deque[tuple[int, float]] = deque()

    def feed(self, r: Reading) -> Event | None:
        v = r.value
        if r.quality is not Quality.GOOD or not isinstance(v, int | float):
            return None
        x = self._sign * float(v)
        w = self._window
        while w and w[-1][1] >= x:
            w.pop()
        w.append((r.ts, x))
        horizon = r.ts - self._within_ms
        while w[0][0] < horizon:
            w.popleft()
        change = x - w[0][1]
        word = "rose" if self._sign > 0 else "fell"
        if not self.fired:
            if change >= self._step:
                self.since = w[0][0]
                return self.event(
                    "fired",
                    v,
                    r.ts,
                    f"{word} {change:g} in {(r.ts - w[0][0]) / 1000:g} s"
                    f" (limit {self._step:g} in {self._within_ms / 1000:g} s)",
                )
        elif change < self._clear:
            return self.event(
                "cleared",
                v,
                r.ts,
                f"{word} only {change:g} in the last {self._within_ms / 1000:g} s",
            )
        return None


class _Stuck(_State):
    __slots__ = ("_for_ms", "_ref", "_tol")

    def __init__(self, rule: RuleConfig, target: RuleTarget) -> None:
        super().__init__(rule, target)
        self._for_ms = int(rule.for_s * 1000)
        self._tol = rule.tolerance
        self._ref: object = None

    def feed(self, r: Reading) -> Event | None:
        v = r.value
        if r.quality is not Quality.GOOD or v is None:
            return None
        ref = self._ref
        if ref is None:
            self._ref, self.since = v, r.ts
            return None
        if isinstance(v, int | float) and isinstance(ref, int | float):
            same = abs(v - ref) <= self._tol
        else:
            same = v == ref
        if not same:
            self._ref, self.since = v, r.ts
            if self.fired:
                return self.event("cleared", _num(v), r.ts, "value moves again")
            return None
        if not self.fired and r.ts - self.since >= self._for_ms:
            return self.event(
                "fired", _num(v), r.ts, f"value has not moved for {(r.ts - self.since) / 1000:g} s"
            )
        return None


class _Offline(_State):
    __slots__ = ("_after_ms", "last_good")

    def __init__(self, rule: RuleConfig, target: RuleTarget, start_ms: int) -> None:
        super().__init__(rule, target)
        self._after_ms = int(rule.after_s * 1000)
        self.last_good = start_ms

    def feed(self, r: Reading) -> Event | None:
        if r.quality is not Quality.GOOD:
            return None
        if r.ts > self.last_good:
            self.last_good = r.ts
        if self.fired:
            self.since = self.last_good
            return self.event("cleared", None, r.ts, "device answers again")
        return None

    def tick(self, now_ms: int) -> Event | None:
        if not self.fired and now_ms - self.last_good >= self._after_ms:
            self.since = self.last_good
            return self.event(
                "fired",
                None,
                now_ms,
                f"no good reading for {(now_ms - self.last_good) / 1000:g} s",
            )
        return None


def _num(v: object) -> Number | None:
    return v if isinstance(v, int | float | bool) else None


class RuleEngine:
    """Every rule of a configuration on every one of its targets."""

    def __init__(
        self,
        rules: Sequence[RuleConfig],
        *,
        clock: Clock | None = None,
        start_ms: int | None = None,
    ) -> None:
        self.clock = clock or SystemClock()
        start = self.clock.now_ms() if start_ms is None else start_ms
        self._by_pid: dict[int, list[_State]] = {}
        self._offline: list[_Offline] = []
        self.states: list[_State] = []
        for rule in rules:
            for target in rule.targets:
                state: _State
                if rule.kind == "threshold":
                    state = _Threshold(rule, target)
                elif rule.kind == "rate":
                    state = _Rate(rule, target)
                elif rule.kind == "stuck":
                    state = _Stuck(rule, target)
                else:
                    state = _Offline(rule, target, start)
                    self._offline.append(state)
                self.states.append(state)
                for pid in target.pids:
                    self._by_pid.setdefault(pid, []).append(state)
        self.readings = 0
        self.fired = 0
        self.cleared = 0

    @property
    def watched_points(self) -> frozenset[int]:
        return frozenset(self._by_pid)

    def _count(self, e: Event) -> Event:
        if e.fired:
            self.fired += 1
        else:
            self.cleared += 1
        return e

    def feed(self, r: Reading) -> list[Event] | None:
        """The events caused by ``r``, or None (the common case: no rule on its point)."""
        states = self._by_pid.get(r.point)
        if states is None:
            return None
        self.readings += 1
        out: list[Event] | None = None
        for s in states:
            e = s.feed(r)
            if e is not None:
                if out is None:
                    out = []
                out.append(self._count(e))
        return out

    def feed_many(self, readings: Iterable[Reading]) -> list[Event]:
        out: list[Event] = []
        by_pid = self._by_pid
        if isinstance(readings, Columns):
            # what a bus hands on: a Reading is built only for a point with a rule
            for i, pid in enumerate(readings.points):
                if pid in by_pid:
                    events = self.feed(readings[i])
                    if events:
                        out.extend(events)
            return out
        for r in readings:
            if r.point in by_pid:
                events = self.feed(r)
                if events:
                    out.extend(events)
        return out

    def tick(self, now_ms: int | None = None) -> list[Event]:
        """Events of time passing (offline rules); ``now_ms`` defaults to the clock."""
        now = self.clock.now_ms() if now_ms is None else now_ms
        out: list[Event] = []
        for s in self._offline:
            e = s.tick(now)
            if e is not None:
                out.append(self._count(e))
        return out

    def active(self) -> list[tuple[str, str, str]]:
        """(rule id, device, point) of every rule that is fired now."""
        return [(s.rule.id, s.target.device, s.target.point) for s in self.states if s.fired]

    def statistics(self) -> dict[str, int]:
        return {
            "rules": len(self.states),
            "readings_evaluated": self.readings,
            "fired": self.fired,
            "cleared": self.cleared,
            "active": sum(1 for s in self.states if s.fired),
        }


# --------------------------------------------------------------------------- agent side


class EdgeEvents:
    """Rules, signer and outbox of one agent.

    ``observe(readings)`` runs the rules and seals what fires into the outbox
    (it never waits; the write to disk goes to the spool's thread); ``run_ticks()``
    raises offline events and sends overdue ones again once a second;
    ``publish(link)`` sends the outbox, oldest first, QoS 1, reconnecting with
    jittered back-off; ``confirm(entries)`` deletes what an event receipt covers.
    With ``receipts`` off (no hub key) the PUBACK deletes.
    """

    def __init__(
        self,
        rules: Sequence[RuleConfig],
        *,
        gateway: str,
        key: PrivateKey,
        epoch: int,
        clock: Clock | None = None,
        max_outbox: int = 1024,
        confirm_timeout_s: float = 60.0,
    ) -> None:
        self.engine = RuleEngine(rules, clock=clock)
        self.gateway = gateway
        self._key = key
        self._epoch = epoch
        self._seq = 0
        #: (epoch, seq) -> sealed event, oldest first, until confirmed
        self.outbox: dict[tuple[int, int], bytes] = {}
        #: acknowledged by the broker, no receipt yet: (epoch, seq) -> when (monotonic)
        self._sent: dict[tuple[int, int], float] = {}
        self._max_outbox = max_outbox
        self.confirm_timeout_s = confirm_timeout_s
        self.receipts = False  # the agent sets it: the uplink knows the hub key
        self.store: Spool | None = None
        self._writes: set[asyncio.Future[Any]] = set()
        self.has_events = asyncio.Event()
        self.dropped = 0
        self.published = 0  # PUBACKs (an event sent again counts again)
        self.confirmed = 0  # deleted by a hub receipt
        self.republished = 0  # sent again: no receipt in time
        self.memory_only = 0  # could not be written (the disk is full): kept in memory
        self.connects = 0  # connections made by publish()
        self.on_event: Callable[[Event], None] | None = None

    async def load(self, store: Spool) -> None:
        """Keep the outbox in ``store`` from now on; what an earlier run left there
        (killed, or stopped before its receipt) goes out first."""
        self.store = store
        held = await store.events_held()
        earlier = {(e, s): d for e, s, d in held if (e, s) not in self.outbox}
        self.outbox = {**earlier, **self.outbox}
        over = list(self.outbox)[: max(0, len(self.outbox) - self._max_outbox)]
        if over:
            self.dropped += len(over)
            self._remove(over)
        if earlier:
            log.info("%d edge events from before wait for the hub: sending them", len(earlier))
            self.has_events.set()

    def _disk(self, work: Coroutine[Any, Any, Any]) -> None:
        fut = asyncio.ensure_future(work)
        self._writes.add(fut)
        fut.add_done_callback(self._written)

    def _written(self, fut: asyncio.Future[Any]) -> None:
        self._writes.discard(fut)
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:  # not a full disk (that is False): a spool that fails
            log.error("edge events: the outbox on disk failed (%s); kept in memory", exc)
        elif fut.result() is False:
            self.memory_only += 1
            if self.memory_only == 1:
                log.warning(
                    "edge events: the disk is full: an event is kept in memory only (lost "
                    "if the agent stops before the hub confirms it); hint: free space under "
                    "the state directory"
                )

    async def flush(self) -> None:
        """Wait for the outbox's writes to disk (tests, and a clean stop)."""
        while self._writes:
            await asyncio.wait(set(self._writes))

    def _remove(self, keys: Sequence[tuple[int, int]]) -> None:
        for k in keys:
            self.outbox.pop(k, None)
            self._sent.pop(k, None)
        if keys and self.store is not None:
            self._disk(self.store.event_delete(keys))

    def _queue(self, events: Iterable[Event]) -> None:
        for e in events:
            seq = self._seq
            self._seq += 1
            data = seal_event(e, gateway=self.gateway, key=self._key, epoch=self._epoch, seq=seq)
            drop: list[tuple[int, int]] = []
            while len(self.outbox) >= self._max_outbox:
                k = next(iter(self.outbox))
                del self.outbox[k]
                self._sent.pop(k, None)
                drop.append(k)
                self.dropped += 1
            self.outbox[(self._epoch, seq)] = data
            if self.store is not None:
                self._disk(self.store.event_put((self._epoch, seq, data), drop))
            log.info(
                "event %s %s on %s%s: %s",
                e.rule,
                e.state,
                e.device,
                f".{e.point}" if e.point else "",
                e.detail,
            )
            if self.on_event is not None:
                self.on_event(e)
            self.has_events.set()

    def confirm(self, entries: Sequence[EpochReceipt]) -> int:
        """Delete the events a verified event receipt covers (the uplink calls this);
        the number deleted."""
        by_epoch = {e.epoch: e for e in entries}
        done = [k for k in self.outbox if (r := by_epoch.get(k[0])) is not None and r.covers(k[1])]
        self._remove(done)
        self.confirmed += len(done)
        if done:
            log.debug("edge events: a hub receipt confirmed %d events", len(done))
        return len(done)

    def overdue(self, now: float | None = None) -> int:
        """Send again what the broker acknowledged and the hub did not confirm within
        ``confirm_timeout_s``; the number."""
        limit = (time.monotonic() if now is None else now) - self.confirm_timeout_s
        late = [k for k, t in self._sent.items() if t <= limit]
        for k in late:
            del self._sent[k]
        if late:
            self.republished += len(late)
            log.info(
                "edge events: %d had no hub receipt in %.0f s: sending again",
                len(late),
                self.confirm_timeout_s,
            )
            self.has_events.set()
        return len(late)

    def observe(self, readings: Iterable[Reading]) -> None:
        """Run the rules on ``readings`` (call it for every batch a bus yields)."""
        events = self.engine.feed_many(readings)
        if events:
            self._queue(events)

    def tick(self) -> None:
        events = self.engine.tick()
        if events:
            self._queue(events)

    async def run_ticks(self, interval_s: float = 1.0) -> None:
        while True:
            await self.engine.clock.sleep(interval_s)
            self.tick()
            if self._sent:
                self.overdue()

    def statistics(self) -> dict[str, int]:
        return {
            **self.engine.statistics(),
            "next_seq": self._seq,
            "outbox": len(self.outbox),
            "unconfirmed": len(self._sent),
            "published": self.published,
            "confirmed": self.confirmed,
            "republished": self.republished,
            "dropped": self.dropped,
            "memory_only": self.memory_only,
        }

    def _next(self) -> tuple[int, int] | None:
        """The oldest event not sent (or sent again), if any."""
        sent = self._sent
        return next((k for k in self.outbox if k not in sent), None)

    async def publish(self, link: UplinkConfig, tls: ssl.SSLContext | None = None) -> None:
        """Send the outbox forever on a connection of its own to the uplink's broker
        (``link``, passed whole; its client id with ``-events``). Cancel to stop."""
        topic = event_topic(self.gateway, link.topic_prefix)
        attempt = 0
        while True:
            try:
                # the uplink's connection (link whole), as <client id>-events
                async with mqtt_client(
                    link,
                    tls,
                    role="events",
                    ack_timeout=10.0,  # a PUBACK that late: reconnect and resend
                ) as client:
                    attempt = 0
                    self.connects += 1
                    # idle, the connection is watched: a broker restarted while no event
                    # is due is noticed at once and the connection made again, so the
                    # next event does not first fail on a dead socket and back off
                    lost = asyncio.ensure_future(_until_lost(client))
                    try:
                        while True:
                            key = self._next()
                            if key is None:
                                self.has_events.clear()
                                due = asyncio.ensure_future(self.has_events.wait())
                                await asyncio.wait({due, lost}, return_when=asyncio.FIRST_COMPLETED)
                                due.cancel()
                                if lost.done():
                                    lost.result()  # raises the connection's MqttError
                                continue
                            await client.publish(topic, self.outbox[key], qos=1)
                            self.published += 1
                            if key not in self.outbox:  # confirmed meanwhile
                                continue
                            if self.receipts:  # it waits for the hub's receipt
                                self._sent[key] = time.monotonic()
                            else:  # no hub key: the PUBACK is all we get
                                self._remove([key])
                    finally:
                        lost.cancel()
                        if lost.done() and not lost.cancelled():
                            lost.exception()  # retrieved: the publish saw the same failure
            except MqttError as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from exc  # stopping: no reconnect (uplink.py)
                if attempt == 0:  # once per outage, in the uplink's words (no raw errno)
                    why = explain(exc, link.host, link.port)
                    log.warning("event uplink: %s (hint: %s)", why.message, why.hint)
            attempt += 1
            # the first attempts come quickly (a broker restart takes a second or so)
            await asyncio.sleep(random.uniform(0.05, min(30.0, 0.1 * 2 ** min(attempt, 9))))


async def _until_lost(client: MqttClient) -> None:
    """Return never; raise :class:`MqttError` when the connection fails (nothing is
    received on the event connection: it subscribes to nothing)."""
    async for _ in client.messages:
        pass
    await asyncio.get_running_loop().create_future()  # a clean disconnect: ours, at a stop
