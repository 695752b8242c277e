"""One task per bus: the poll scheduler.

A bus is half-duplex: one transaction at a time, in the order the schedule
says. Every device's points are planned once (``protocols.modbus.plan``) into
the fewest read requests, grouped by poll interval. Each group is a *job* with
a due time on the monotonic clock; the loop runs the earliest due job, then
moves its due time on by exactly one interval (no drift), skipping whole
intervals when it fell behind (counted as ``overruns``).

A device that stops answering goes ``degraded`` after one failed poll and
``offline`` after ``offline_after`` failed polls in a row; an offline device is
tried again after a back-off that doubles up to ``max_backoff_s``, so a dead
device costs its bus at most one timeout per back-off period. Every failed poll
still yields readings, flagged ``COMM_ERROR`` with no value, so the hub can see
the hole; values outside a point's valid range are flagged ``OUT_OF_RANGE``,
never dropped.
"""

from __future__ import annotations

import enum
import heapq
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from agent.clock import Clock
from agent.transport import LinkDown, ModbusLink, TransportError
from drivers.profiles import Point
from protocols.errors import DecodeError, DeviceException, RemoteError
from protocols.modbus import PointSpec, ReadRequest, decode_response, plan
from protocols.reading import Quality, Reading

__all__ = ["BusPoller", "DeviceState", "PolledDevice"]

log = logging.getLogger(__name__)

Sink = Callable[[list[Reading]], Awaitable[None]]


class DeviceState(enum.StrEnum):
    UNKNOWN = "unknown"
    ONLINE = "online"
    DEGRADED = "degraded"
    OFFLINE = "offline"


@dataclass
class PolledDevice:
    """A device of a bus with its planned requests and its live state."""

    name: str
    slave: int
    interval_s: float
    max_registers: int
    max_gap: int
    points: Sequence[tuple[int, Point]]  # (gateway point id, point)
    state: DeviceState = DeviceState.UNKNOWN
    transitions: int = 0
    failures_in_row: int = 0
    polls: int = 0
    polls_failed: int = 0
    last_error: str = ""
    last_values: dict[str, object] = field(default_factory=dict)
    last_rtt_ms: float = 0.0
    retry_at: float = 0.0
    backoff_s: float = 0.0

    def _set(self, state: DeviceState) -> None:
        if state is not self.state:
            if self.state is not DeviceState.UNKNOWN:
                log.info("device %s: %s -> %s", self.name, self.state, state)
            self.state = state
            self.transitions += 1


@dataclass
class _Job:
    device: PolledDevice
    interval_s: float
    requests: list[ReadRequest]
    due: float = 0.0

    def __lt__(self, other: _Job) -> bool:
        return self.due < other.due


class BusPoller:
    """Polls the devices of one bus, forever, through one :class:`ModbusLink`."""

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
        self._retries = retries
        self._gap = inter_frame_s
        self._offline_after = offline_after
        self._max_backoff = max_backoff_s
        self._ids: dict[tuple[str, PointSpec], tuple[int, Point]] = {}
        self._jobs: list[_Job] = []
        self.transactions = 0
        self.timeouts = 0
        self.overruns = 0
        self.readings = 0
        for dev in self.devices:
            groups: dict[float, list[PointSpec]] = {}
            for pid, point in dev.points:
                self._ids[(dev.name, point.spec)] = (pid, point)
                groups.setdefault(point.interval_s or dev.interval_s, []).append(point.spec)
            for interval, specs in sorted(groups.items()):
                reqs = plan(specs, max_registers=dev.max_registers, max_gap=dev.max_gap)
                self._jobs.append(_Job(dev, interval, reqs))

    def statistics(self) -> dict[str, object]:
        return {
            "transactions": self.transactions,
            "timeouts": self.timeouts,
            "overruns": self.overruns,
            "readings": self.readings,
            "devices": {
                d.name: {
                    "state": str(d.state),
                    "polls": d.polls,
                    "polls_failed": d.polls_failed,
                    "transitions": d.transitions,
                    "last_error": d.last_error,
                    "rtt_ms": round(d.last_rtt_ms, 2),
                }
                for d in self.devices
            },
        }

    async def run(self) -> None:
        start = self._clock.monotonic()
        heap = list(self._jobs)
        for job in heap:
            job.due = start
        heapq.heapify(heap)
        try:
            while heap:
                job = heap[0]
                now = self._clock.monotonic()
                if job.due > now:
                    await self._clock.sleep(job.due - now)
                    continue
                await self._run_job(job)
                now = self._clock.monotonic()
                job.due += job.interval_s
                if job.due <= now:
                    missed = math.floor((now - job.due) / job.interval_s) + 1
                    self.overruns += missed
                    job.due += missed * job.interval_s
                dev = job.device
                if dev.state is DeviceState.OFFLINE and dev.retry_at > job.due:
                    job.due = dev.retry_at
                heapq.heapreplace(heap, job)
        finally:
            self.link.close()

    async def _run_job(self, job: _Job) -> None:
        dev = job.device
        out: list[Reading] = []
        ok = True
        for req in job.requests:
            t_start = self._clock.monotonic()
            try:
                values = await self._transact(dev, req)
            except (TransportError, DeviceException, DecodeError) as exc:
                ok = False
                dev.last_error = str(exc)
                ts = self._clock.now_ms()
                for spec in req.points:
                    pid, _ = self._ids[(dev.name, spec)]
                    out.append(Reading(pid, ts, None, Quality.COMM_ERROR))
                if isinstance(exc, TransportError):
                    # a silent device will not answer the next request either
                    for rest in job.requests[job.requests.index(req) + 1 :]:
                        for spec in rest.points:
                            pid, _ = self._ids[(dev.name, spec)]
                            out.append(Reading(pid, ts, None, Quality.COMM_ERROR))
                    break
                continue
            dev.last_rtt_ms = (self._clock.monotonic() - t_start) * 1000
            ts = self._clock.now_ms()
            for spec, value in values:
                pid, point = self._ids[(dev.name, spec)]
                out.append(self._reading(pid, point, ts, value, dev))
        self._account(dev, ok)
        self.readings += len(out)
        if out:
            await self._sink(out)

    async def _transact(
        self, dev: PolledDevice, req: ReadRequest
    ) -> list[tuple[PointSpec, object]]:
        attempt = 0
        while True:
            if self._gap:
                await self._clock.sleep(self._gap)
            self.transactions += 1
            try:
                regs = await self.link.read(req.space, req.address, req.count, dev.slave)
                return list(decode_response(req, regs))
            except LinkDown:
                raise
            except TransportError:
                self.timeouts += 1
                attempt += 1
                if attempt > self._retries or dev.state is DeviceState.OFFLINE:
                    raise

    def _reading(
        self, pid: int, point: Point, ts: int, value: object, dev: PolledDevice
    ) -> Reading:
        if isinstance(value, RemoteError):
            return Reading(pid, ts, None, Quality.COMM_ERROR)
        assert isinstance(value, (int, float, bool, str))
        dev.last_values[point.spec.name] = value
        if isinstance(value, float) and not math.isfinite(value):
            return Reading(pid, ts, None, Quality.OUT_OF_RANGE)
        if point.range is not None and not isinstance(value, (str, bool)):
            lo, hi = point.range
            if not lo <= value <= hi:
                return Reading(pid, ts, value, Quality.OUT_OF_RANGE)
        return Reading(pid, ts, value, Quality.GOOD)

    def _account(self, dev: PolledDevice, ok: bool) -> None:
        dev.polls += 1
        if ok:
            dev.failures_in_row = 0
            dev.backoff_s = 0.0
            dev._set(DeviceState.ONLINE)
            return
        dev.polls_failed += 1
        dev.failures_in_row += 1
        if dev.failures_in_row >= self._offline_after:
            dev.backoff_s = min(
                self._max_backoff, max(1.0, dev.backoff_s * 2 or dev.interval_s * 2)
            )
            dev.retry_at = self._clock.monotonic() + dev.backoff_s
            dev._set(DeviceState.OFFLINE)
        else:
            dev._set(DeviceState.DEGRADED)
