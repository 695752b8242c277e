"""One task per bus: the poll scheduler.

A bus is half-duplex: one transaction at a time, in the order the schedule
says (the task awaits each transaction before it starts the next, so on a
serial line two requests are never in flight). Every device's points are
grouped by poll interval and each group planned once (``protocols.modbus.plan``)
into the fewest read requests: a *job* with a due time on the monotonic clock.
What is due when, retries, back-off and the device states (online, degraded,
offline) are the sans-IO machine of ``protocols.poll`` (its tables say every
transition); this module carries its transactions and turns replies into
readings, handed on as columns (:class:`protocols.reading.Columns`: a reply's
point ids, its one time, its values; decisions 47). The loop runs the earliest due job, then moves its due time on by
exactly one interval, so intervals do not drift however long a transaction
took; when it fell behind by whole intervals it skips them (counted as
``overruns``) rather than bursting to catch up. A dead device costs its bus
at most one timeout per back-off period, and its neighbours keep their
intervals. "Silent" means :class:`~agent.fieldbus.links.TransportError`: no reply,
a garbled reply, or the link down.

Quality of readings:

* ``GOOD``: decoded and inside the point's valid range;
* ``OUT_OF_RANGE``: decoded but outside the valid range (the value is kept,
  never dropped), or a float that is NaN or infinite (sent without value);
* ``STALE``: this poll failed but the device is only ``degraded``: the last
  good value is repeated, flagged;
* ``COMM_ERROR``: no value: the device is offline, never answered this point,
  answered it with an exception, or sent registers that do not decode.

One bad point does not lose the others: each point of a reply is decoded on
its own.

A late reply never answers the next request: on RTU the link keeps the line
quiet after a timeout and takes only a reply it can tie to the request on the
wire (``agent.fieldbus.rtu.RtuLink``); on TCP the transaction id must match.

A bus whose link is down (a port missing, lost, busy or refusing its
settings; a connection refused) is ``offline`` with the reason
(``BusPoller.link_error``, in ``vitals status``), logged once as a WARNING
when it goes down and at INFO when it is back; the link retries with
back-off, and the agent never stops for it.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import logging
import math
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter, le

from agent.clock import Clock
from agent.fieldbus.links import LinkDown, ModbusLink, TransportError
from drivers.profiles import Point
from protocols.errors import DecodeError, DeviceException
from protocols.modbus import (
    DataType,
    Order,
    PointSpec,
    PointValue,
    ReadRequest,
    decimals,
    decode,
    plan,
    register_count,
)
from protocols.poll import Answer, DeviceState, DeviceStatus, Failed, Job, Poll, Schedule
from protocols.reading import Columns, Quality

__all__ = ["ActivePoll", "BusPoller", "DeviceState", "PolledDevice", "Sink"]

log = logging.getLogger(__name__)

# the readings of one or more polls, as columns (decisions 47)
Sink = Callable[[Columns], Awaitable[None]]

_GOOD = Quality.GOOD
_OUT = Quality.OUT_OF_RANGE
_STALE = Quality.STALE
_COMM = Quality.COMM_ERROR
#: upper bounds of the reply-time histogram's buckets (seconds), counted per bus in
#: ``BusPoller.reply_counts`` (one more: above the last), exposed per protocol by
#: agent/ops/metrics.py. Modbus TCP on a LAN answers in 1-5 ms; a TCP-to-RTU gateway or an
#: RTU line at 9600-19200 baud in 20-100 ms; timeouts are 1 s unless configured
REPLY_BUCKETS_S = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
_bucket = functools.partial(bisect.bisect_left, REPLY_BUCKETS_S)


@dataclass
class PolledDevice(DeviceStatus):
    """A device of a bus with its planned requests; its live state is the schedule's."""

    name: str
    slave: int
    interval_s: float
    max_registers: int
    max_gap: int
    points: Sequence[tuple[int, Point]]  # (gateway point id, point)
    last_error: str = ""
    last_rtt_ms: float = 0.0
    # the values of the points decoded as read, by name (the poller's slow path, sensors)
    decoded: dict[str, object] = field(default_factory=dict, repr=False)
    # set by the poller: writes the values it keeps as raw registers into the dict
    refresh: Callable[[dict[str, object]], None] | None = field(default=None, repr=False)

    @property
    def last_values(self) -> dict[str, object]:
        """The last value read of each point, by name (for status and diagnostics).

        The poller keeps the last good reply of each request rather than 15,000
        values a second: they are decoded here, when someone asks.
        """
        if self.refresh is not None:
            self.refresh(self.decoded)
        return self.decoded

    def set_state(self, state: DeviceState) -> None:
        """Move to ``state`` (counted, logged): for devices that no schedule polls."""
        self.said(self.enter(state))

    def said(self, old: DeviceState | None) -> None:
        """Log a move from ``old`` to the current state (None: no move)."""
        if old is not None and old is not DeviceState.UNKNOWN:
            log.info("device %s: %s -> %s", self.name, old, self.state)


# --------------------------------------------------------------------------- decoding

# A compiled point: (its index k among the device's points, point, offset in the
# reply, fast decoder or None, lo, hi); the device's job maps k to the point id.
# The fast decoders cover the common register types and give exactly what
# protocols.modbus.decode gives (tests/test_bus.py checks it); others use decode.
_Item = tuple[int, Point, int, "Callable[[Sequence[int], int], PointValue] | None", float, float]
# the hot path: (k, offset, fast decoder, lo, hi); never NaN, never a DecodeError
_FastItem = tuple[int, int, "Callable[[Sequence[int], int], PointValue]", float, float]


def _fast(spec: PointSpec) -> Callable[[Sequence[int], int], PointValue] | None:
    """The fast decoder of a point, or None; one function shared by all points alike."""
    return _fast_for(spec.space.is_bits, spec.type, spec.bit, spec.order, spec.scale, spec.offset)


@functools.lru_cache(maxsize=512, typed=True)
def _fast_for(
    bits: bool, kind: DataType, bit: int, order: Order, scale: float, offset: float
) -> Callable[[Sequence[int], int], PointValue] | None:
    # cached: 15,000 points of 500 devices of one model need a handful of functions
    if bits:
        return None
    if kind is DataType.BIT:
        return lambda w, o: bool(w[o] >> bit & 1)
    if kind is DataType.BOOL:
        return lambda w, o: w[o] != 0
    if kind not in (DataType.U16, DataType.I16) or order not in (Order.ABCD, Order.CDAB):
        return None  # byte-swapped words and wider types: the codec
    signed = kind is DataType.I16
    if scale == 1 and offset == 0:
        if signed:
            return lambda w, o: w[o] - 0x10000 if w[o] & 0x8000 else w[o]
        return lambda w, o: w[o]
    dec = _decimal(scale, offset)
    if dec is None:  # too many decimals: not rounded (as protocols.modbus.decode)
        if signed:
            return lambda w, o: (w[o] - 0x10000 if w[o] & 0x8000 else w[o]) * scale + offset
        return lambda w, o: w[o] * scale + offset
    big_s, big_o, places = dec
    p10 = 10**places
    if signed:
        return lambda w, o: ((w[o] - 0x10000 if w[o] & 0x8000 else w[o]) * big_s + big_o) / p10
    return lambda w, o: (w[o] * big_s + big_o) / p10


def _decimal(scale: float, offset: float) -> tuple[int, int, int] | None:
    """``(S, O, places)``: ``raw * scale + offset`` rounded to the decimals of scale
    and offset (as protocols.modbus.decode rounds) is exactly the integer
    ``raw * S + O`` over ``10**places``, and dividing exact integers rounds once,
    correctly: the same double, 6x faster. None: too many decimals."""
    places = decimals(scale, offset)
    if places is None:
        return None
    p10 = 10**places
    big_s, big_o = round(scale * p10), round(offset * p10)
    if abs(big_s - scale * p10) > 1e-6 or abs(big_o - offset * p10) > 1e-6:
        return None  # pragma: no cover - decimals said they are whole
    return big_s, big_o, places


def _mantissa_range(lo: float, hi: float, div: int) -> tuple[float, float]:
    """The mantissas ``m`` whose value ``m / div`` lies in ``[lo, hi]``, as the range
    ``[m_lo, m_hi]``: the same test on the integer, exact (``m / div`` rounds once,
    so it never falls as ``m`` grows); infinite bounds stay infinite."""
    if math.isnan(lo) or math.isnan(hi):
        return math.inf, -math.inf  # no value is in range (nan compares false)

    def least(holds: Callable[[int], bool]) -> int:  # the least m where holds() turns true
        a, b = -(2**80), 2**80
        while a < b:
            mid = (a + b) // 2
            a, b = (a, mid) if holds(mid) else (mid + 1, b)
        return a

    m_lo = lo if lo == -math.inf else least(lambda m: m / div >= lo)
    m_hi = hi if hi == math.inf else least(lambda m: m / div > hi) - 1
    return m_lo, m_hi


def _mantissas(
    specs: Sequence[PointSpec], offsets: Sequence[int]
) -> tuple[int, Callable[[Sequence[int]], list[int]]] | None:
    """For a request whose points are all u16/i16 of one scale's ``places`` >= 1
    (values ``(raw * S + O) / 10**places``, :func:`_decimal`): ``(places, f)`` where
    ``f(registers)`` gives their mantissas ``raw * S + O`` in order (decisions 51);
    else None.

    The common case (scale ``10**-places``, no offset) is taken by C: an
    ``itemgetter`` over the reply's registers, or, with i16 points, one ``struct``
    unpack of them each with its point's type.
    """
    calls: list[tuple[int, bool, int, int]] = []  # (offset, signed, S, O)
    places = set()
    for spec, off in zip(specs, offsets, strict=True):
        if _fast(spec) is None or spec.type not in (DataType.U16, DataType.I16):
            return None
        dec = None if spec.scale == 1 and spec.offset == 0 else _decimal(spec.scale, spec.offset)
        if dec is None or dec[2] < 1:
            return None
        calls.append((off, spec.type is DataType.I16, dec[0], dec[1]))
        places.add(dec[2])
    if len(places) != 1:
        return None
    exp = places.pop()
    if any(big_s != 1 or big_o != 0 for _, _, big_s, big_o in calls):

        def each(w: Sequence[int]) -> list[int]:
            return [
                (w[o] - 0x10000 if signed and w[o] & 0x8000 else w[o]) * big_s + big_o
                for o, signed, big_s, big_o in calls
            ]

        return exp, each
    if not any(signed for _, signed, _, _ in calls):
        get = itemgetter(*offsets)
        return exp, (lambda w: [get(w)]) if len(calls) == 1 else (lambda w: list(get(w)))
    if any(a >= b for a, b in itertools.pairwise(offsets)):
        return None  # two points of one register, one signed (rare): their values are searched
    # the plan orders the points by address: the registers packed, then unpacked each
    # as its point's type ('2x': a register no point reads)
    span = max(offsets) + 1
    u16 = struct.Struct(f">{span}H")
    kinds = dict.fromkeys(range(span), "2x") | {o: "h" if s else "H" for o, s, _, _ in calls}
    mixed = struct.Struct(">" + "".join(kinds.values()))
    return exp, lambda w: list(mixed.unpack(u16.pack(*(w[:span] if len(w) != span else w))))


class _Request:
    """One planned read request, compiled: what to do with each register of the reply.

    Immutable and shared by every device of the same model on the gateway
    (:func:`_compiled`): 500 devices of one profile hold one plan, not 500.
    """

    __slots__ = ("bounds", "calls", "dec", "fast", "fast_k", "highs", "idx", "lows",
                 "names", "request", "slow")  # fmt: skip

    def __init__(self, request: ReadRequest, items: list[_Item]) -> None:
        self.request = request
        self.idx = tuple(item[0] for item in items)  # every point, in reply order
        self.fast: tuple[_FastItem, ...] = tuple(
            (k, off, fast, lo, hi) for k, _, off, fast, lo, hi in items if fast is not None
        )
        # the hot path's columns: k of each fast point, (decoder, offset), and the
        # valid ranges (None when no fast point has one: every value is GOOD)
        self.fast_k = tuple(k for k, *_ in self.fast)
        self.calls = tuple((fast, off) for _, off, fast, _, _ in self.fast)
        self.bounds: tuple[tuple[float, float], ...] | None = tuple(
            (lo, hi) for *_, lo, hi in self.fast
        )
        if all(lo == -math.inf and hi == math.inf for lo, hi in self.bounds):
            self.bounds = None
        # the same ranges as two columns: "all values in range" is two map()s of C
        self.lows = tuple(lo for lo, _ in self.bounds or ())
        self.highs = tuple(hi for _, hi in self.bounds or ())
        self.names = tuple(point.spec.name for _, point, _, fast, _, _ in items if fast)
        self.slow: tuple[_Item, ...] = tuple(item for item in items if item[3] is None)
        # every point a scaled u16/i16 of one number of decimals: (places, mantissas of
        # the registers), handed on instead of the values (decisions 51, 52), their
        # ranges checked on the mantissas
        self.dec = None
        if not self.slow:
            self.dec = _mantissas([item[1].spec for item in items], [item[2] for item in items])
        if self.dec is not None and self.bounds is not None:
            div = 10 ** self.dec[0]
            self.bounds = tuple(_mantissa_range(lo, hi, div) for lo, hi in self.bounds)
            self.lows = tuple(lo for lo, _ in self.bounds)
            self.highs = tuple(hi for _, hi in self.bounds)


@functools.lru_cache(maxsize=256)
def _compiled(
    members: tuple[tuple[int, Point], ...], max_registers: int, max_gap: int
) -> tuple[_Request, ...]:
    """The planned and compiled requests of a group of points ``(k, point)``."""
    by_spec = {p.spec: (k, p) for k, p in members}
    out = []
    for req in plan(by_spec, max_registers=max_registers, max_gap=max_gap):
        items: list[_Item] = []
        for spec in req.points:
            k, point = by_spec[spec]
            lo, hi = point.range if point.range is not None else (-math.inf, math.inf)
            items.append((k, point, spec.address - req.address, _fast(spec), lo, hi))
        out.append(_Request(req, items))
    return tuple(out)


def _point_ids(points: Sequence[tuple[int, Point]]) -> Sequence[int]:
    """k -> point id: a ``range`` when the ids are consecutive (as the config gives them)."""
    ids = [pid for pid, _ in points]
    if ids and ids == list(range(ids[0], ids[0] + len(ids))):
        return range(ids[0], ids[0] + len(ids))
    return tuple(ids)


def _fast_ids(pids: Sequence[int], ks: tuple[int, ...]) -> tuple[int, ...]:
    """The point ids of ``ks``, made once: every reply hands on these very ints (a
    ``range`` slice would make 30 new ones a poll, freed again with the batch;
    decisions 53)."""
    return tuple(pids[k] for k in ks)


@dataclass(slots=True, eq=False, kw_only=True)
class _Job(Job):
    """A job of the schedule with what its polls need: the compiled requests, the point ids."""

    device: PolledDevice
    requests: tuple[_Request, ...]
    pids: Sequence[int]  # k -> point id
    fast_ids: tuple[tuple[int, ...], ...]  # per request: the point ids of its fast points
    # the last good reply of each request: the last values of its fast points,
    # decoded only when someone asks
    regs: list[Sequence[int] | None]


class ActivePoll:
    """One poll of a job in progress: the machine's steps, and where its readings go.

    The same steps whoever carries the transactions: :meth:`BusPoller._run_job`
    awaits them one by one, :class:`~agent.fieldbus.engine.TcpEngine` gets them back from the reactor;
    both hand each result to :meth:`BusPoller.answer`. ``out``: the columns the
    answers add their readings to, the poll's own unless given (the engine gives
    the columns it hands on next, shared by every poll: no copy a poll).
    """

    __slots__ = ("job", "out", "step", "t_start")

    def __init__(self, step: Poll[_Job], out: Columns | None = None) -> None:
        self.step = step
        self.job = step.job
        self.out = Columns() if out is None else out
        self.t_start = 0.0  # of the try in turn: the reply time is the answered request's

    @property
    def request(self) -> ReadRequest | None:
        """The request to send now; None when the poll is over."""
        n = self.step.request
        return None if n is None else self.job.requests[n].request

    def sent(self, now: float) -> None:
        self.step.sent()
        self.t_start = now


class BusPoller:
    """Polls the devices of one bus, forever, through one :class:`ModbusLink`.

    ``inter_frame_s`` is the silence to keep between transactions (t3.5 on
    RTU): handed to the link, which counts it from the last byte on the line.
    ``retries``, ``offline_after`` and ``max_backoff_s`` are the schedule's
    (:class:`protocols.poll.Schedule`, public as ``schedule``).
    """

    def __init__(
        self,
        name: str,
        link: ModbusLink,
        devices: Sequence[PolledDevice],
        sink: Sink,
        clock: Clock,
        *,
        retries: int = 1,
        inter_frame_s: float = 0.0,
        offline_after: int = 3,
        max_backoff_s: float = 60.0,
    ) -> None:
        self.name = name
        self.link = link
        self.devices = list(devices)
        self._sink = sink
        self._clock = clock
        if inter_frame_s > link.inter_frame_s:
            link.inter_frame_s = inter_frame_s
        self._jobs: list[_Job] = []
        self._last: dict[int, PointValue] = {}  # point id -> last good value
        self.readings = 0
        self.reply_counts = [0] * (len(REPLY_BUCKETS_S) + 1)  # replies per bucket
        self.reply_sum_s = 0.0
        for dev in self.devices:
            dev.backoff_first_s = max(1.0, dev.interval_s * 2)
            pids = _point_ids(dev.points)
            groups: dict[float, list[tuple[int, Point]]] = {}
            for k, (_, point) in enumerate(dev.points):
                groups.setdefault(point.interval_s or dev.interval_s, []).append((k, point))
            for interval, members in sorted(groups.items()):
                reqs = _compiled(tuple(members), dev.max_registers, dev.max_gap)
                self._jobs.append(
                    _Job(
                        interval,
                        len(reqs),
                        order=len(self._jobs),
                        device=dev,
                        requests=reqs,
                        pids=pids,
                        fast_ids=tuple(_fast_ids(pids, r.fast_k) for r in reqs),
                        regs=[None] * len(reqs),
                    )
                )
            dev.refresh = functools.partial(self._refresh_values, dev)
        self.schedule = Schedule(
            self._jobs,
            retries=retries,
            offline_after=offline_after,
            max_backoff_s=max_backoff_s,
            suspect_cost=self._suspect_cost,
        )

    # the schedule's counters, for statistics() and tests
    @property
    def transactions(self) -> int:
        return self.schedule.transactions

    @property
    def timeouts(self) -> int:
        return self.schedule.timeouts

    @property
    def overruns(self) -> int:
        return self.schedule.overruns

    @property
    def deferred(self) -> int:
        return self.schedule.deferred

    @property
    def link_error(self) -> str:
        return self.schedule.link_error

    def _suspect_cost(self, job: _Job) -> float:
        """What a poll of a device that may stay silent costs the bus: timeout, silence, gap."""
        link = self.link
        return link.timeout_s + link.late_window(job.device.slave) + link.inter_frame_s

    def _refresh_values(self, dev: PolledDevice, values: dict[str, object]) -> None:
        for job in self._jobs:
            if job.device is dev:
                for creq, regs in zip(job.requests, job.regs, strict=True):
                    if regs is not None:
                        for (_, off, fast, _, _), name in zip(creq.fast, creq.names, strict=True):
                            values[name] = fast(regs, off)

    def _last_values(self, job: _Job, n: int) -> dict[int, PointValue]:
        """Point id -> last good value of the points of request ``n`` (for STALE readings)."""
        out: dict[int, PointValue] = {}
        creq, regs, pids = job.requests[n], job.regs[n], job.pids
        if regs is not None:
            for k, off, fast, _, _ in creq.fast:
                out[pids[k]] = fast(regs, off)
        last = self._last
        for k, *_ in creq.slow:
            pid = pids[k]
            if pid in last:
                out[pid] = last[pid]
        return out

    def statistics(self) -> dict[str, object]:
        s = self.schedule
        return {
            "state": "offline" if s.link_error else "online",
            "last_error": s.link_error,
            "link_downs": s.link_downs,
            "transactions": s.transactions,
            "timeouts": s.timeouts,
            "overruns": s.overruns,
            "deferred": s.deferred,
            "readings": self.readings,
            "reply_counts": list(self.reply_counts),  # per REPLY_BUCKETS_S, then above
            "reply_sum_s": self.reply_sum_s,
            "link": self.link.statistics(),
            "devices": {
                d.name: {
                    "state": str(d.state),
                    "polls": d.polls,
                    "polls_failed": d.polls_failed,
                    "polls_skipped": d.polls_skipped,
                    "transitions": dict(d.transitions),
                    "backoff_s": d.backoff_s,
                    "last_error": d.last_error,
                    "rtt_ms": round(d.last_rtt_ms, 2),
                }
                for d in self.devices
            },
        }

    # a side job's transactions in the bus's idle time (agent.ops.fwupdate.BusTurns): called
    # with the instant the next poll falls due, it runs what fits before it; True when
    # time went by
    idle: Callable[[float], Awaitable[bool]] | None = None

    async def run(self) -> None:
        """Poll forever, one transaction at a time (a task of its own). Cancel to stop."""
        clock, schedule = self._clock, self.schedule
        try:
            if schedule.start(clock.monotonic()) is None:
                return  # no jobs
            while True:
                job = schedule.next(clock.monotonic())
                if isinstance(job, float):
                    if self.idle is not None and await self.idle(job):
                        continue
                    await clock.sleep_until(job)
                    continue
                await self._run_job(job)
                schedule.done(job, clock.monotonic())
        finally:
            self.link.close()

    # A poll's steps, shared by this bus's task (run) and the TcpEngine that polls
    # every Modbus TCP bus from one task: begin, answer each request, end.

    def begin(self, job: _Job, out: Columns | None = None) -> ActivePoll:
        """A poll of ``job``, which the schedule said is due; its readings into ``out``
        (its own columns if None)."""
        return ActivePoll(self.schedule.poll(job), out)

    def answer(
        self,
        poll: ActivePoll,
        result: Sequence[int] | Sequence[bool] | Exception,
        now: float,
        ts: int,
    ) -> None:
        """What the request in turn got (registers or bits, or the error): its readings
        into ``poll.out``, the next step.

        ``result`` is a reply, a :class:`DeviceException` or a
        :class:`TransportError`; any other exception is a bug, raised here.
        """
        job, step, out = poll.job, poll.step, poll.out
        had = len(out)
        if not isinstance(result, Exception):  # registers or bits: the common case
            rtt = now - poll.t_start
            job.device.last_rtt_ms = rtt * 1000
            self.reply_counts[_bucket(rtt)] += 1  # the histogram: two additions per reply
            self.reply_sum_s += rtt
            ok = self._decode(job, step.n, result, ts, out)
            answer = Answer.REPLY if ok else Answer.PARTIAL
        elif isinstance(result, DeviceException):
            answer = Answer.EXCEPTION
        elif isinstance(result, LinkDown):
            answer = Answer.LINK_DOWN
        elif isinstance(result, TransportError):
            answer = Answer.SILENCE
        else:
            raise result
        was_down = self.schedule.link_error
        failed = step.feed(answer, str(result) if answer is Answer.LINK_DOWN else "")
        if was_down or answer is Answer.LINK_DOWN:
            self._link_said(was_down)
        if failed is not None:
            job.device.last_error = str(result)
            self._failed(job, failed, out, ts)
        self.readings += len(out) - had

    def end(self, poll: ActivePoll, now: float) -> Columns:
        """The poll is over: its device's state moves on; the columns of its readings."""
        poll.job.device.said(poll.step.finish(now))
        return poll.out

    def _link_said(self, was_down: str) -> None:
        """The link went down (said once, at WARNING, with the reason) or came back."""
        down = self.schedule.link_error
        if down and not was_down:
            log.warning("bus %s offline: %s", self.name, down)
        elif was_down and not down:
            log.info("bus %s online again (%s)", self.name, self.link.describe)

    async def _run_job(self, job: _Job) -> None:
        poll = self.begin(job)
        clock, link, slave = self._clock, self.link, job.device.slave
        while (req := poll.request) is not None:
            poll.sent(clock.monotonic())
            result: Sequence[int] | Sequence[bool] | Exception
            try:
                result = await link.read(req.space, req.address, req.count, slave)
            except (TransportError, DeviceException) as exc:
                result = exc
            self.answer(poll, result, clock.monotonic(), clock.now_ms())
        out = self.end(poll, clock.monotonic())
        if out:
            await self._sink(out)

    def _decode(
        self,
        job: _Job,
        n: int,
        regs: Sequence[int] | Sequence[bool],
        ts: int,
        out: Columns,
    ) -> bool:
        """Readings of the reply to request ``n`` into ``out``; False if a point did not decode."""
        creq, pids, dev = job.requests[n], job.pids, job.device
        req = creq.request
        # function 1/2 replies carry whole bytes: a link may hand the padding too
        if len(regs) != req.count and not (
            req.space.is_bits and len(regs) == -(-req.count // 8) * 8
        ):
            for k in creq.idx:
                out.append(pids[k], ts, None, _COMM)
            dev.last_error = f"reply of {len(regs)} items to a read of {req.count}"
            return False
        append = out.append
        if creq.fast:
            job.regs[n] = regs  # the fast points are registers
            ms: list[int] | None = None
            exp = -1
            values: list[PointValue] | None = None
            checked: Sequence[PointValue]  # what the bounds bound: the mantissas if any
            if creq.dec is None:
                checked = values = [fast(regs, off) for fast, off in creq.calls]
            else:  # scaled registers: their mantissas, the values made when asked
                exp, mants_of = creq.dec
                checked = ms = mants_of(regs)
            bounds = creq.bounds
            out.add(
                job.fast_ids[n],
                ts,
                values,  # type: ignore[arg-type]  # PointValue is a Value
                repeat(_GOOD, len(checked))
                if bounds is None
                # all in range (the common case): two map()s of C
                or (all(map(le, creq.lows, checked)) and all(map(le, checked, creq.highs)))
                else [
                    _GOOD if lo <= v <= hi else _OUT  # type: ignore[operator]
                    for v, (lo, hi) in zip(checked, bounds, strict=True)
                ],
                ms,
                exp,
            )
        last = self._last
        names = dev.decoded
        ok = True
        for k, point, off, _, lo, hi in creq.slow:
            pid = pids[k]
            try:
                value = decode(point.spec, regs[off : off + register_count(point.spec)])
            except DecodeError:
                ok = False
                append(pid, ts, None, _COMM)
                continue
            names[point.spec.name] = value
            if isinstance(value, float) and not math.isfinite(value):
                append(pid, ts, None, _OUT)
                continue
            last[pid] = value
            if isinstance(value, (str, bool)) or lo <= value <= hi:
                append(pid, ts, value, _GOOD)
            else:
                append(pid, ts, value, _OUT)
        return ok

    def _failed(self, job: _Job, failed: Failed, out: Columns, ts: int) -> None:
        """Readings for requests that got no usable reply.

        STALE, the last good value repeated, when the schedule says the device
        is only degraded; otherwise COMM_ERROR without a value.
        """
        pids = job.pids
        for n in range(failed.first, failed.end):
            last = self._last_values(job, n) if failed.stale else {}
            for k in job.requests[n].idx:
                pid = pids[k]
                value = last.get(pid)
                if value is None:
                    out.append(pid, ts, None, _COMM)
                else:
                    out.append(pid, ts, value, _STALE)
