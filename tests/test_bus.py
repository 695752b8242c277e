"""The bus scheduler on virtual time: a fake link, an autojump event loop.

:class:`VirtualLoop` is an asyncio event loop whose clock only moves when
every task is waiting: then it jumps straight to the next timer (trio's
``MockClock(autojump_threshold=0)``). The fake link spends virtual time like
a wire (a round trip for an answer, the whole timeout for silence), so a
thousand poll intervals run in milliseconds and every instant is exact.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.clock import SystemClock
from agent.fieldbus.links import BadResponse, LinkDown, ModbusLink, NoResponse
from agent.fieldbus.poller import (
    BusPoller,
    DeviceState,
    PolledDevice,
    _fast,
    _mantissa_range,
    _mantissas,
)
from drivers.profiles import Point, load_profile
from protocols.errors import DecodeError, DeviceException
from protocols.modbus import DataType, Order, PointSpec, Space, decimals, decode, encode
from protocols.reading import Columns, Quality, Reading
from tests.virtual_time import VirtualClock, run_virtual

# --------------------------------------------------------------------------- doubles


class FakeLink(ModbusLink):
    """Registers per slave; each read costs ``rtt`` (or ``timeout`` when silent)."""

    def __init__(self, clock: VirtualClock, *, rtt: float = 0.01, timeout: float = 0.5) -> None:
        super().__init__("fake://", timeout_s=timeout)
        self.clock = clock
        self.rtt = rtt
        self.regs: dict[int, dict[tuple[Space, int], int]] = {}
        self.dead: set[int] = set()
        self.garbled: set[int] = set()
        self.exceptions: dict[tuple[int, Space], int] = {}
        self.link_down = False
        self.log: list[
            tuple[float, int, Space, int, int, str]
        ] = []  # t, slave, space, addr, n, outcome
        self.in_flight = 0
        self.max_in_flight = 0
        self.closed = False

    @property
    def connected(self) -> bool:
        return True

    async def read(
        self, space: Space, address: int, count: int, slave: int
    ) -> Sequence[int] | Sequence[bool]:
        t = self.clock.monotonic()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.link_down:
                self.log.append((t, slave, space, address, count, "down"))
                raise LinkDown("fake: down")
            if slave in self.dead:
                await asyncio.sleep(self.timeout_s)
                self.log.append((t, slave, space, address, count, "silent"))
                raise NoResponse(f"fake: slave {slave} silent")
            await asyncio.sleep(self.rtt)
            if slave in self.garbled:
                self.log.append((t, slave, space, address, count, "garbled"))
                raise BadResponse("fake: CRC error")
            code = self.exceptions.get((slave, space))
            if code is not None:
                self.log.append((t, slave, space, address, count, "exception"))
                raise DeviceException(code, space.read_function)
            self.log.append((t, slave, space, address, count, "ok"))
            regs = self.regs.get(slave, {})
            return [regs.get((space, address + i), 0) for i in range(count)]
        finally:
            self.in_flight -= 1

    def close(self) -> None:
        self.closed = True

    def polls_of(self, slave: int) -> list[float]:
        return [t for t, s, *_ in self.log if s == slave]


class Sink:
    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.batches: list[Columns] = []

    async def __call__(self, readings: Columns) -> None:
        assert type(readings) is Columns  # a poll's readings as columns (decisions 47)
        self.readings.extend(readings)
        self.batches.append(readings)

    def of(self, pid: int) -> list[Reading]:
        return [r for r in self.readings if r.point == pid]


def _point(
    name: str,
    address: int,
    *,
    type: DataType = DataType.U16,
    scale: float = 1.0,
    range: tuple[float, float] | None = None,
    interval: float | None = None,
    space: Space = Space.INPUT,
) -> Point:
    return Point(
        PointSpec(name, space, address, type, scale=scale), range=range, interval_s=interval
    )


def _device(
    name: str, slave: int, points: Sequence[Point], interval: float = 1.0, first_id: int = 0
) -> PolledDevice:
    return PolledDevice(
        name=name,
        slave=slave,
        interval_s=interval,
        max_registers=125,
        max_gap=4,
        points=[(first_id + i, p) for i, p in enumerate(points)],
    )


async def _run_for(poller: BusPoller, seconds: float) -> None:
    task = asyncio.create_task(poller.run())
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --------------------------------------------------------------------------- scheduling


def test_no_drift_over_1000_intervals() -> None:
    async def body(clock: VirtualClock) -> None:
        link = FakeLink(clock, rtt=0.0137)  # an awkward round trip, never a whole ms
        devs = [
            _device(f"d{i}", i, [_point("a", 0), _point("b", 1)], interval=1.0) for i in (1, 2, 3)
        ]
        poller = BusPoller("b", link, devs, Sink(), clock)
        t0 = clock.monotonic()
        await _run_for(poller, 1000.5)
        for i in (1, 2, 3):
            polls = link.polls_of(i)
            assert len(polls) == 1001
            # the k-th poll starts at t0 + k + (its place in the queue), never later
            offset = polls[0] - t0
            worst = max(abs(t - (t0 + k + offset)) for k, t in enumerate(polls))
            assert worst < 1e-6
        assert poller.overruns == 0

    run_virtual(body)


def test_one_transaction_at_a_time_and_jobs_by_interval() -> None:
    async def body(clock: VirtualClock) -> None:
        link = FakeLink(clock, rtt=0.02)
        pts = [_point("fast", 0), _point("slow", 10, interval=10.0)]
        poller = BusPoller("b", link, [_device("d", 1, pts, interval=1.0)], Sink(), clock)
        await _run_for(poller, 30.5)
        assert link.max_in_flight == 1
        fast = [e for e in link.log if e[3] == 0]
        slow = [e for e in link.log if e[3] == 10]
        assert len(fast) == 31 and len(slow) == 4
        assert link.closed  # the poller closes its link when it stops

    run_virtual(body)


def test_overrun_skips_whole_intervals_instead_of_bursting() -> None:
    async def body(clock: VirtualClock) -> None:
        link = FakeLink(clock, rtt=0.35)  # 3 requests of 0.35 s per 1 s interval: too slow
        pts = [_point("a", 0), _point("b", 20), _point("c", 40)]
        poller = BusPoller("b", link, [_device("d", 1, pts)], Sink(), clock)
        await _run_for(poller, 20)
        starts = [t for t, _, _, a, _, _ in link.log if a == 0]
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert all(math.isclose(g, 2.0) for g in gaps)  # every other slot, on the grid
        assert poller.overruns >= 9

    run_virtual(body)


# --------------------------------------------------------------------------- dead devices


def test_dead_device_costs_at_most_one_timeout_per_backoff_period() -> None:
    async def body(clock: VirtualClock) -> None:
        link = FakeLink(clock, rtt=0.01, timeout=0.5)
        link.dead.add(1)  # first in the round: its probes must make way
        devs = [_device(f"d{i}", i, [_point("a", 0), _point("b", 30)]) for i in range(1, 9)]
        poller = BusPoller("b", link, devs, Sink(), clock, retries=1, max_backoff_s=16.0)
        t0 = clock.monotonic()
        await _run_for(poller, 300)
        dead = devs[0]
        assert dead.state is DeviceState.OFFLINE
        attempts = [t for t, s, *_ in link.log if s == 1]
        # before offline: the first failed poll is retried once, the next two are not
        assert attempts[1] - attempts[0] == pytest.approx(0.5)
        probes = attempts[4:]
        gaps = [b - a for a, b in itertools.pairwise(probes)]
        # back-off doubles 2, 4, 8, 16, then stays capped (each rounded up to the 1 s grid);
        # never two timeouts inside one period
        assert gaps[:3] == pytest.approx([4.0, 8.0, 16.0], abs=1.01)
        assert all(g >= 16.0 for g in gaps[3:])
        # so the dead one spent at most one timeout per back-off period of the bus's time
        assert len(probes) <= 300 / 16 + 4
        # and its probes ran in the bus's idle time: the seven others kept their slots
        # (the k-th poll within the 8 x 2 x 10 ms of the round, never a timeout later),
        # except the round after its first silence (an attempt and a retry: unforeseeable)
        for i in range(2, 9):
            polls = [t - t0 for t, s, _, a, _, _ in link.log if s == i and a == 0]
            assert len(polls) >= 299  # the first round may lose its slot to two timeouts
            assert max(t % 1.0 for t in polls if t > 2) < 0.2
            assert polls[0] < 2 * 0.5 + 0.2  # behind the dead one's attempt and retry
        assert poller.deferred > 0
        assert dead.polls_skipped > 0

    run_virtual(body)


def test_a_suspect_poll_waits_for_idle_time_but_not_forever() -> None:
    """A busy neighbour never leaves 0.25 s free: the suspect's poll is deferred,
    then runs anyway one interval after its slot."""

    async def body(clock: VirtualClock) -> None:
        link = FakeLink(clock, rtt=0.01, timeout=0.25)
        link.dead.add(2)
        busy = _device("busy", 1, [_point("a", 0)], interval=0.2)
        dead = _device("dead", 2, [_point("a", 0)], interval=1.0, first_id=10)
        poller = BusPoller("b", link, [busy, dead], Sink(), clock, max_backoff_s=4.0)
        t0 = clock.monotonic()
        await _run_for(poller, 40)
        attempts = [t - t0 for t, s, *_ in link.log if s == 2]
        assert poller.deferred > 0
        assert len(attempts) >= 40 / (4.0 + 1.0 + 1.0)  # probed at least once per back-off + wait
        assert dead.state is DeviceState.OFFLINE

    run_virtual(body)


def test_state_transitions_are_counted() -> None:
    async def body(clock: VirtualClock) -> None:
        link = FakeLink(clock)
        dev = _device("d", 1, [_point("a", 0)])
        poller = BusPoller("b", link, [dev], Sink(), clock, retries=0, offline_after=3)
        task = asyncio.create_task(poller.run())
        await asyncio.sleep(2.5)
        assert dev.state is DeviceState.ONLINE
        link.dead.add(1)
        await asyncio.sleep(1.2)
        assert dev.state is DeviceState.DEGRADED
        await asyncio.sleep(2.0)
        assert dev.state is DeviceState.OFFLINE
        link.dead.clear()
        await asyncio.sleep(dev.backoff_s + 1.0)
        assert dev.state is DeviceState.ONLINE
        link.exceptions[(1, Space.INPUT)] = 2
        await asyncio.sleep(1.0)
        assert dev.state is DeviceState.DEGRADED  # answers, but not all of it
        assert dev.failures_in_row == 0  # an exception is an answer: no back-off
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert dev.transitions == {
            "unknown->online": 1,
            "online->degraded": 2,
            "degraded->offline": 1,
            "offline->online": 1,
        }
        stats = poller.statistics()
        assert stats["devices"]["d"]["transitions"]["degraded->offline"] == 1  # type: ignore[index]

    run_virtual(body)


def test_link_down_fails_every_device_without_retries() -> None:
    async def body(clock: VirtualClock) -> None:
        link = FakeLink(clock)
        link.link_down = True
        devs = [_device(f"d{i}", i, [_point("a", 0)], first_id=10 * i) for i in (1, 2)]
        sink = Sink()
        poller = BusPoller("b", link, devs, sink, clock, retries=3)
        await _run_for(poller, 0.5)
        assert len(link.log) == 2  # one attempt each: retrying a dead link is pointless
        assert [r.quality for r in sink.readings] == [Quality.COMM_ERROR] * 2
        assert all(d.state is DeviceState.DEGRADED for d in devs)

    run_virtual(body)


# --------------------------------------------------------------------------- quality


def test_quality_flags() -> None:
    async def body(clock: VirtualClock) -> None:
        link = FakeLink(clock)
        pts = [
            _point("level", 0, scale=0.1, range=(20.0, 140.0)),
            _point("temp", 1, type=DataType.I16, scale=0.1, range=(-40.0, 60.0)),
            _point("flow", 2, type=DataType.F32),
        ]
        link.regs[1] = {(Space.INPUT, 0): 523, (Space.INPUT, 1): encode(pts[1].spec, -45.5)[0]}
        link.regs[1].update(
            {(Space.INPUT, 2 + i): w for i, w in enumerate(encode(pts[2].spec, math.nan))}
        )
        sink = Sink()
        dev = _device("d", 1, pts)
        poller = BusPoller("b", link, [dev], sink, clock, retries=0, offline_after=3)
        task = asyncio.create_task(poller.run())
        await asyncio.sleep(0.5)
        assert sink.of(0)[-1] == Reading(0, sink.of(0)[-1].ts, 52.3, Quality.GOOD)
        # outside the valid range: kept, flagged
        assert (sink.of(1)[-1].value, sink.of(1)[-1].quality) == (-45.5, Quality.OUT_OF_RANGE)
        # NaN: flagged, sent without a value
        assert (sink.of(2)[-1].value, sink.of(2)[-1].quality) == (None, Quality.OUT_OF_RANGE)
        # the last values by name, for status and diagnostics (the NaN as read)
        values = dev.last_values
        assert (values["level"], values["temp"]) == (52.3, -45.5)
        assert math.isnan(values["flow"])  # type: ignore[arg-type]
        link.regs[1][(Space.INPUT, 0)] = 524
        await asyncio.sleep(1.0)
        assert dev.last_values["level"] == 52.4 and dev.last_values is values
        link.regs[1][(Space.INPUT, 0)] = 523
        await asyncio.sleep(1.0)
        link.garbled.add(1)
        await asyncio.sleep(1.0)
        # first failure: degraded, the last good value repeats as STALE
        assert (sink.of(0)[-1].value, sink.of(0)[-1].quality) == (52.3, Quality.STALE)
        assert (sink.of(2)[-1].value, sink.of(2)[-1].quality) == (None, Quality.COMM_ERROR)
        await asyncio.sleep(2.0)
        # third failure in a row: offline, no value
        assert dev.state is DeviceState.OFFLINE
        assert (sink.of(0)[-1].value, sink.of(0)[-1].quality) == (None, Quality.COMM_ERROR)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # one reading per point per poll, whatever happened
        assert len(sink.of(0)) == len(sink.of(1)) == len(sink.of(2)) == dev.polls

    run_virtual(body)


def test_one_bad_point_does_not_lose_the_others() -> None:
    async def body(clock: VirtualClock) -> None:
        link = FakeLink(clock)
        pts = [
            _point("a", 0),
            Point(PointSpec("name", Space.INPUT, 1, DataType.STRING, length=2)),
            _point("b", 3),
        ]
        link.regs[1] = {
            (Space.INPUT, 0): 7,
            (Space.INPUT, 1): 0x41FF,  # 0xFF is not ASCII: this point cannot decode
            (Space.INPUT, 2): 0x4300,
            (Space.INPUT, 3): 9,
        }
        sink = Sink()
        dev = _device("d", 1, pts)
        poller = BusPoller("b", link, [dev], sink, clock)
        await _run_for(poller, 0.5)
        assert len(link.log) == 1  # one request for all three
        got = {r.point: (r.value, r.quality) for r in sink.readings}
        assert got == {0: (7, Quality.GOOD), 1: (None, Quality.COMM_ERROR), 2: (9, Quality.GOOD)}
        assert dev.state is DeviceState.DEGRADED

    run_virtual(body)


def test_exception_on_one_request_keeps_the_other_requests() -> None:
    async def body(clock: VirtualClock) -> None:
        link = FakeLink(clock)
        pts = [_point("m", 0), _point("cfg", 5, space=Space.HOLDING)]
        link.regs[1] = {(Space.INPUT, 0): 42}
        link.exceptions[(1, Space.HOLDING)] = 2
        sink = Sink()
        poller = BusPoller("b", link, [_device("d", 1, pts)], sink, clock)
        await _run_for(poller, 0.5)
        got = {r.point: (r.value, r.quality) for r in sink.readings}
        assert got == {0: (42, Quality.GOOD), 1: (None, Quality.COMM_ERROR)}
        assert "exception 02" in poller.devices[0].last_error

    run_virtual(body)


def test_devices_of_one_model_share_a_plan_and_keep_their_own_ids() -> None:
    """One compiled plan for all devices of a model; each reading has its device's id."""

    async def body(clock: VirtualClock) -> None:
        link = FakeLink(clock)
        pts = [_point("a", 0, range=(0, 50)), _point("b", 1), _point("c", 7, type=DataType.I32)]
        first = _device("d1", 1, pts, first_id=100)
        # ids need not be consecutive: any mapping from a device's points to ids holds
        second = _device("d2", 2, pts)
        second.points = [(7, pts[0]), (3, pts[1]), (900, pts[2])]
        link.regs[1] = {(Space.INPUT, 0): 60, (Space.INPUT, 1): 2, (Space.INPUT, 8): 5}
        link.regs[2] = {(Space.INPUT, 0): 10, (Space.INPUT, 1): 4, (Space.INPUT, 8): 6}
        sink = Sink()
        poller = BusPoller("b", link, [first, second], sink, clock)
        jobs = poller._jobs
        assert len(jobs) == 2 and jobs[0].requests is jobs[1].requests
        await _run_for(poller, 0.5)
        got = {r.point: (r.value, r.quality) for r in sink.readings}
        assert got == {
            100: (60, Quality.OUT_OF_RANGE),
            101: (2, Quality.GOOD),
            102: (5, Quality.GOOD),
            7: (10, Quality.GOOD),
            3: (4, Quality.GOOD),
            900: (6, Quality.GOOD),
        }
        assert first.last_values == {"a": 60, "b": 2, "c": 5}
        assert second.last_values == {"a": 10, "b": 4, "c": 6}

    run_virtual(body)


def test_retry_recovers_a_single_lost_reply() -> None:
    async def body(clock: VirtualClock) -> None:
        link = FakeLink(clock)
        link.regs[1] = {(Space.INPUT, 0): 5}
        real_read = link.read
        calls = 0

        async def flaky(
            space: Space, address: int, count: int, slave: int
        ) -> Sequence[int] | Sequence[bool]:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise NoResponse("lost once")
            return await real_read(space, address, count, slave)

        link.read = flaky  # type: ignore[method-assign]
        sink = Sink()
        dev = _device("d", 1, [_point("a", 0)])
        poller = BusPoller("b", link, [dev], sink, clock, retries=1)
        await _run_for(poller, 0.5)
        assert [(r.value, r.quality) for r in sink.readings] == [(5, Quality.GOOD)]
        assert dev.state is DeviceState.ONLINE and poller.timeouts == 1

    run_virtual(body)


def test_poller_hands_its_inter_frame_delay_to_the_link() -> None:
    async def body(clock: VirtualClock) -> None:
        link = FakeLink(clock)
        BusPoller(
            "b", link, [_device("d", 1, [_point("a", 0)])], Sink(), clock, inter_frame_s=0.004
        )
        assert link.inter_frame_s == 0.004

    run_virtual(body)


# --------------------------------------------------------------------------- fast decoders


_FAST_SPECS = [
    PointSpec("u", Space.INPUT, 0, DataType.U16),
    PointSpec("i", Space.INPUT, 0, DataType.I16),
    PointSpec("us", Space.INPUT, 0, DataType.U16, scale=0.1),
    PointSpec("is", Space.INPUT, 0, DataType.I16, scale=0.01, offset=-40.0),
    PointSpec("uo", Space.HOLDING, 0, DataType.U16, scale=0.5, offset=3.25),
    PointSpec("u3", Space.INPUT, 0, DataType.U16, scale=0.3),
    PointSpec("kelvin", Space.INPUT, 0, DataType.I16, scale=0.01, offset=273.15),
    PointSpec("milli", Space.INPUT, 0, DataType.U16, scale=0.001, offset=-1.5),
    PointSpec("ten", Space.INPUT, 0, DataType.I16, scale=10.0, offset=5.0),
    PointSpec("big", Space.INPUT, 0, DataType.I16, scale=1e-15),  # too many decimals: no rounding
    PointSpec("bool", Space.INPUT, 0, DataType.BOOL),
    PointSpec("bit", Space.INPUT, 0, DataType.BIT, bit=13),
    PointSpec("cd", Space.INPUT, 0, DataType.U16, order=Order.BADC),  # byte-swapped: no fast path
]


@pytest.mark.parametrize("spec", _FAST_SPECS, ids=lambda s: s.name)
def test_fast_decoders_agree_with_the_codec(spec: PointSpec) -> None:
    fast = _fast(spec)
    if spec.order is not Order.ABCD:
        assert fast is None
        return
    assert fast is not None
    rng = random.Random(spec.name)
    words = [0, 1, 0x7FFF, 0x8000, 0xFFFF, *(rng.randrange(0x10000) for _ in range(2000))]
    for w in words:
        want = decode(spec, [w])
        got = fast([9, w], 1)
        assert got == want and type(got) is type(want), (spec, w)


def test_decode_error_type_is_ours() -> None:
    # the fallback path raises DecodeError for a non-ASCII string (what the poller catches)
    spec = PointSpec("s", Space.INPUT, 0, DataType.STRING, length=1)
    with pytest.raises(DecodeError):
        decode(spec, [0xFF41])


def test_shipped_profiles_poll_cleanly() -> None:
    """Every shipped profile, on zeroed registers, yields one reading per point."""

    async def body(clock: VirtualClock) -> None:
        from drivers.profiles import available_profiles

        for i, name in enumerate(available_profiles()):
            prof = load_profile(name)
            link = FakeLink(clock)
            dev = PolledDevice(
                name=name,
                slave=1,
                interval_s=prof.interval_s,
                max_registers=prof.max_registers,
                max_gap=prof.max_gap,
                points=[(j, p) for j, p in enumerate(prof.points)],
            )
            sink = Sink()
            poller = BusPoller(f"b{i}", link, [dev], sink, clock)
            await _run_for(poller, 0.5)
            assert sorted(r.point for r in sink.readings) == list(range(len(prof.points))), name
            assert all(r.quality is not Quality.COMM_ERROR for r in sink.readings), name

    run_virtual(body)


async def test_sleepers_of_one_instant_share_one_timer_and_are_cancelled_alone() -> None:
    clock = SystemClock()
    loop = asyncio.get_running_loop()
    when = loop.time() + 0.05
    sleepers = [asyncio.create_task(clock.sleep_until(when)) for _ in range(50)]
    await asyncio.sleep(0)
    assert [len(group) for group in clock._sleepers.values()] == [50]  # one timer for all
    sleepers[0].cancel()
    await asyncio.gather(*sleepers[1:])
    assert loop.time() >= when
    assert sleepers[0].cancelled() and not any(t.cancelled() for t in sleepers[1:])
    assert clock._sleepers == {}
    await clock.sleep_until(loop.time() - 1)  # the past: returns at once


# --------------------------------------------------------------------------- mantissas (decisions 51)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.booleans(),  # i16
            st.sampled_from([(0.1, 0.0), (0.5, 0.0), (0.01, -40.0), (0.3, 0.0), (0.2, 1.4)]),
        ),
        min_size=1,
        max_size=12,
    ),
    st.data(),
)
def test_mantissas_are_the_fast_decoders_values(
    points: list[tuple[bool, tuple[float, float]]], data: st.DataObject
) -> None:
    """A request's mantissas over 10**places are exactly what its fast decoders give,
    whatever the mix of u16/i16, scales and offsets (when one ``places`` holds them all)."""
    specs = [
        PointSpec(f"p{k}", Space.INPUT, 2 * k, DataType.I16 if signed else DataType.U16,
                  scale=scale, offset=offset)
        for k, (signed, (scale, offset)) in enumerate(points)
    ]  # fmt: skip
    offsets = [s.address for s in specs]
    words = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=2 * len(specs) + 1,
                               max_size=2 * len(specs) + 1))  # fmt: skip
    got = _mantissas(specs, offsets)
    places = {decimals(s.scale, s.offset) for s in specs}
    if len(places) != 1:
        assert got is None
        return
    assert got is not None
    exp, mants = got
    ms = mants(words)
    assert [m / 10**exp for m in ms] == [
        decode(s, words[o : o + 1]) for s, o in zip(specs, offsets, strict=True)
    ]
    assert all(type(m) is int for m in ms)


_bound = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-1e6, 1e6).map(lambda x: round(x, 3)),  # ranges as profiles write them
    st.integers(-70_000, 70_000).map(lambda k: k / 10),
)


@settings(max_examples=500)
@given(_bound, _bound, st.integers(1, 9), st.data())
def test_a_range_checked_on_the_mantissas_is_the_range_of_the_values(
    lo: float, hi: float, places: int, data: st.DataObject
) -> None:
    """``lo <= m / 10**places <= hi`` exactly when ``m`` is in :func:`_mantissa_range`
    (decisions 52): the poller checks the mantissas and makes no value; near the
    bounds, at them, and anywhere."""
    div = 10**places
    m_lo, m_hi = _mantissa_range(lo, hi, div)
    near = [int(b * div) + d for b in (lo, hi) if math.isfinite(b) and abs(b * div) < 2**70
            for d in range(-3, 4)]  # fmt: skip
    wide = data.draw(st.lists(st.integers(-(2**40), 2**40), max_size=20))
    for m in [*near, *wide, 0, -1, 1, 65535, -32768]:
        assert (m_lo <= m <= m_hi) == (lo <= m / div <= hi), (m, lo, hi, div, m_lo, m_hi)


def test_two_points_of_one_register_one_signed_get_no_mantissas() -> None:
    """The mantissas are one struct unpack, a type a register: a register read as
    u16 and as i16 is left to the fast decoders (its values are searched)."""
    both = [PointSpec("u", Space.INPUT, 3, DataType.U16, scale=0.1),
            PointSpec("s", Space.INPUT, 3, DataType.I16, scale=0.1)]  # fmt: skip
    assert _mantissas(both, [0, 0]) is None
    unsigned = [both[0], PointSpec("v", Space.INPUT, 3, DataType.U16, scale=0.1)]
    got = _mantissas(unsigned, [0, 0])
    assert got is not None and got[0] == 1 and got[1]([0xFFF6]) == [0xFFF6, 0xFFF6]


def test_a_poll_of_scaled_registers_hands_on_its_mantissas() -> None:
    """The shipped fleet shape (u16 and i16 at 0.1): the poller's columns carry the
    mantissas, and a point that is not a scaled register (an int) drops them."""

    async def body(clock: VirtualClock) -> None:
        link = FakeLink(clock)
        link.regs = {1: {(Space.INPUT, 0): 573, (Space.INPUT, 1): 0xFFF6, (Space.INPUT, 2): 7}}
        scaled = [
            _point("a", 0, scale=0.1),
            _point("b", 1, type=DataType.I16, scale=0.1),
        ]
        sink = Sink()
        poller = BusPoller("b", link, [_device("d", 1, scaled)], sink, clock)
        await _run_for(poller, 0.5)
        cols = sink.batches[0]
        assert isinstance(cols, Columns)
        assert cols.values == [57.3, -1.0] and cols.mants == [573, -10] and cols.exp == 1
        sink2 = Sink()
        mixed = [*scaled, _point("c", 2)]
        poller = BusPoller("b", link, [_device("d", 1, mixed)], sink2, clock)
        await _run_for(poller, 0.5)
        cols = sink2.batches[0]
        assert cols.values == [57.3, -1.0, 7] and cols.mants is None
        # a valid range: in range GOOD, out of it OUT_OF_RANGE, mantissas kept
        sink3 = Sink()
        ranged = [_point("a", 0, scale=0.1, range=(0.0, 50.0)),
                  _point("b", 1, type=DataType.I16, scale=0.1, range=(-5.0, 5.0))]  # fmt: skip
        poller = BusPoller("b", link, [_device("d", 1, ranged)], sink3, clock)
        await _run_for(poller, 0.5)
        cols = sink3.batches[0]
        assert cols.quals == [Quality.OUT_OF_RANGE, Quality.GOOD] and cols.mants == [573, -10]
        link.regs[1][(Space.INPUT, 0)] = 500  # 50.0: on the bound is in range
        sink4 = Sink()
        poller = BusPoller("b", link, [_device("d", 1, ranged)], sink4, clock)
        await _run_for(poller, 0.5)
        assert sink4.batches[0].quals == [Quality.GOOD, Quality.GOOD]

    run_virtual(body)
