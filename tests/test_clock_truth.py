"""Clock truth: readings survive a gateway without a clock, and a clock that jumps.

The gateway's wall clock and the kernel's "synchronised" flag are injected into
the real :class:`agent.clock.SystemClock`; everything else is real: emulated
Modbus TCP terminals, the agent (batcher, envelope, spool, uplink), a real
Mosquitto, the hub core and its SQLite store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from agent.clock import ClockFix, SystemClock, kernel_synced
from agent.ops.state import create_identity
from agent.pipeline.batcher import FIX_BATCHES, Batcher
from agent.service import Agent
from drivers.profiles import load_profile
from hub.core import HubCore, Outcome
from hub.store import open_readings
from hub.worker import Hub
from protocols import envelope, topics
from protocols.ed25519 import PrivateKey
from protocols.errors import FrameError, SignatureError
from protocols.reading import Quality, Reading
from simulator.broker import MosquittoBroker
from simulator.demo import demo_config
from simulator.tcp import TcpTerminal
from tests.virtual_time import VirtualClock

DAY_NS = 86_400 * 10**9
TERMINALS = {"noise-1": "sound_level_meter", "weather-1": "weather_station"}


class InjectedTime:
    """The gateway's wall clock (true time minus ``behind_ns``) and kernel flag."""

    def __init__(self, behind_ns: int, synced: bool) -> None:
        self.behind_ns = behind_ns
        self.synced = synced

    def wall_ns(self) -> int:
        return time.time_ns() - self.behind_ns

    def is_synced(self) -> bool:
        return self.synced


@asynccontextmanager
async def gateway_and_hub(
    tmp_path: Path, broker: MosquittoBroker, clock: SystemClock, polled: list[tuple[Reading, int]]
) -> AsyncIterator[HubCore]:
    """Terminals, an agent on ``clock`` and a hub; ``polled``: each reading handed to the
    batcher with the true time (ms) it was handed over."""
    terms = {
        name: TcpTerminal(load_profile(p), seed=i) for i, (name, p) in enumerate(TERMINALS.items())
    }
    for t in terms.values():
        await t.start()
    config = demo_config(
        tmp_path / "gw",
        (broker.host, broker.port),
        {n: t.port for n, t in terms.items()},
        max_age_s=0.5,
        rules=[],
    )
    identity = create_identity(config.gateway.state_dir)
    core = HubCore(tmp_path / "hub.sqlite3")
    core.enroll(config.gateway.id, identity.public_raw)
    hub = Hub(core, host=broker.host, port=broker.port, shared=True)
    agent = Agent(config, identity=identity, clock=clock)
    real_add = Batcher.add

    async def tap(self: Batcher, readings: list[Reading]) -> None:
        now = time.time_ns() // 1_000_000
        polled.extend((r, now) for r in readings)
        await real_add(self, readings)

    stop = asyncio.Event()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Batcher, "add", tap)
            async with asyncio.TaskGroup() as tg:
                hub_task = tg.create_task(hub.run())
                await asyncio.wait_for(hub.subscribed.wait(), 15)
                agent_task = tg.create_task(agent.run(stop))
                yield core
                stop.set()
                await agent_task
                deadline = time.monotonic() + 15
                while core.counters["readings"] < len(polled) and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
                hub_task.cancel()
        core.flush()
    finally:
        for t in terms.values():
            await t.stop()


def _hub_readings(db: Path) -> list[tuple[int, int, int, object, int, int, int]]:
    """(seq, point, true ts, value, stamped ts, corrected, epoch), by batch, and in a
    batch by true time (the view has no row order of its own)."""
    con = open_readings(db)
    try:
        return list(
            con.execute(
                "SELECT seq, point, ts, value, stamped, corrected, epoch FROM true_readings"
                " ORDER BY epoch, seq, ts"
            )
        )
    finally:
        con.close()


def _check_delivery(core: HubCore, polled: list[tuple[Reading, int]]) -> None:
    """Nothing lost, nothing twice, no refusal, every batch of the epoch once."""
    assert polled, "the agent polled nothing"
    assert not [k for k in core.counters if k.startswith("rejected.")], core.counters
    assert core.counters["readings"] == len(polled)
    assert core.counters["duplicates"] == 0
    seqs = sorted(s for (_, s) in core.delivered("demo-gw-1"))
    assert seqs == list(range(len(seqs)))


def _check_true_times(rows: list[tuple[int, ...]], polled: list[tuple[Reading, int]]) -> int:
    """Every reading at the hub at its true time (within 1 s of when it was handed to
    the batcher: the injected sync is exact), and per point in the order polled.
    Returns how many the hub corrected."""
    handed = {(r.point, r.ts): at for r, at in polled}
    assert len(handed) == len(polled)  # (point, stamp) names one reading
    last: dict[int, int] = defaultdict(int)
    for seq, point, ts, _value, stamped, _corrected, _epoch in rows:
        assert abs(ts - handed[(point, stamped)]) < 1000, (seq, point, ts, stamped)
        assert ts >= last[point], (seq, point)
        last[point] = ts
    return sum(row[5] for row in rows)


async def test_five_weeks_behind_then_synced_loses_nothing_and_ends_true(
    mosquitto: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # fake-hwclock's time after five weeks without power; the kernel not synchronised.
    # Three seconds stand for the ten minutes: the offset is measured at the
    # sync and the monotonic clock does not drift in between, so the time unsynced
    # does not enter the arithmetic
    injected = InjectedTime(35 * DAY_NS, synced=False)
    clock = SystemClock(wall_ns=injected.wall_ns, synced=injected.is_synced)
    polled: list[tuple[Reading, int]] = []
    caplog.set_level(logging.INFO, logger="agent.clock")
    async with gateway_and_hub(tmp_path, mosquitto, clock, polled) as core:
        await asyncio.sleep(3)
        n_before = len(polled)
        injected.behind_ns, injected.synced = 0, True  # NTP steps the clock and syncs
        await asyncio.sleep(3)
    assert 0 < n_before < len(polled)
    _check_delivery(core, polled)
    assert core.counters["clock_fixes"] == 1
    rows = _hub_readings(tmp_path / "hub.sqlite3")
    assert len(rows) == len(polled)
    assert _check_true_times(rows, polled) >= n_before  # all stamped before the sync
    assert clock.fix is not None and abs(clock.fix.offset_ms - 35 * DAY_NS // 10**6) < 1000
    synced_now = [
        r
        for r in caplog.records
        if r.name == "agent.clock" and "synchronised now" in r.getMessage()
    ]
    assert len(synced_now) == 1 and synced_now[0].levelno == logging.WARNING
    core.close()


@pytest.mark.parametrize("synced", [True, False], ids=["synced", "unsynced"])
async def test_clock_stepped_back_an_hour_and_forward_a_day(
    mosquitto: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture, synced: bool
) -> None:
    injected = InjectedTime(0, synced=synced)
    clock = SystemClock(wall_ns=injected.wall_ns, synced=injected.is_synced)
    polled: list[tuple[Reading, int]] = []
    caplog.set_level(logging.INFO, logger="agent.clock")
    async with gateway_and_hub(tmp_path, mosquitto, clock, polled) as core:
        await asyncio.sleep(1.5)
        injected.behind_ns = 3600 * 10**9  # back an hour
        await asyncio.sleep(1.5)
        injected.behind_ns = -DAY_NS + 3600 * 10**9  # forward a day from there
        await asyncio.sleep(1.5)
    _check_delivery(core, polled)
    rows = _hub_readings(tmp_path / "hub.sqlite3")
    assert len(rows) == len(polled)
    # every reading once, and per point in the order the batcher was handed them
    order = {(r.point, r.ts): i for i, (r, _) in enumerate(polled)}
    assert len(order) == len(polled) == len({(row[1], row[4]) for row in rows})
    # (a stepped clock can reorder stamps inside a batch: compare whole batches)
    spans: dict[tuple[int, int], list[int]] = defaultdict(list)  # (point, seq) -> indexes
    for seq, point, _ts, _value, stamped, _corrected, _epoch in rows:
        spans[(point, seq)].append(order[(point, stamped)])
    last: dict[int, int] = defaultdict(lambda: -1)
    for (point, seq), idx in sorted(spans.items(), key=lambda kv: kv[0][1]):
        assert min(idx) > last[point], (point, seq)
        last[point] = max(idx)
    # the clock's own records: another logger's may name this test's directory,
    # "test_clock_stepped_back...", when an earlier test left the root logger at INFO
    steps = [r for r in caplog.records if r.name == "agent.clock" and "stepped" in r.getMessage()]
    assert len(steps) == 2, [r.getMessage() for r in steps]  # each step logged once
    assert [r.levelno for r in steps] == [logging.WARNING, logging.INFO]
    if not synced:
        # unsynchronised: the stamps kept the monotonic clock, true within 1 s
        _check_true_times(rows, polled)
    core.close()


# --------------------------------------------------------------------------- units


def _batch(**kw: object) -> bytes:
    r = Reading(point=1, ts=1_000, value=1.0, quality=Quality.GOOD)
    return envelope.seal([r], gateway="gw-1", key=KEY, epoch=3, seq=7, **kw)


KEY = PrivateKey.generate()


def test_header_clock_state_and_fix_are_signed_and_optional() -> None:
    plain = envelope.parse(_batch())
    assert not plain.header.unsynced and plain.header.fix_offset_ms is None
    b = envelope.parse(_batch(unsynced=True, fix=(86_400_000, 5_000, 9)))
    b.verify(KEY.public_key())
    h = b.header
    assert h.unsynced and (h.fix_offset_ms, h.fix_until, h.fix_last_seq) == (86_400_000, 5_000, 9)
    # the flag is under the signature: the same header without it does not verify
    forged = envelope.SealedBatch(plain.header, plain.protected, b.payload, b.signature)
    with pytest.raises(SignatureError):
        forged.verify(KEY.public_key())


def test_header_fix_keys_go_together() -> None:
    prot = {
        "gw": "gw-1",
        "kid": envelope.key_id(KEY),
        "epoch": 0,
        "seq": 0,
        "t0": 1,
        "t1": 1,
        "n": 1,
        "enc": "msgpack",
        "fix_offset_ms": 5,
    }
    data = envelope.sign_message(envelope.BATCH_DOMAIN, prot, b"", KEY)
    with pytest.raises(FrameError, match="go together"):
        envelope.parse(data)
    prot.pop("fix_offset_ms")
    prot["clock"] = "maybe"
    with pytest.raises(FrameError, match="clock must be"):
        envelope.parse(envelope.sign_message(envelope.BATCH_DOMAIN, prot, b"", KEY))


def test_hub_takes_weeks_old_batches_only_from_an_unsynced_gateway(tmp_path: Path) -> None:
    core = HubCore(tmp_path / "hub.sqlite3")
    core.enroll("gw-1", KEY.public_key().public_bytes_raw())
    old = time.time_ns() // 10**6 - 35 * 86_400_000
    r = Reading(point=1, ts=old, value=1.0, quality=Quality.GOOD)
    topic = topics.batch("gw-1")

    def seal(seq: int, unsynced: bool) -> bytes:
        return envelope.seal([r], gateway="gw-1", key=KEY, epoch=0, seq=seq, unsynced=unsynced)

    assert core.handle(topic, seal(0, unsynced=False)) is Outcome.TOO_OLD
    assert core.handle(topic, seal(1, unsynced=True)) is Outcome.STORED
    assert core.handle(topic, seal(1, unsynced=True)) is Outcome.DUPLICATE  # replay: still caught
    core.close()


def test_kernel_synced_answers() -> None:
    assert isinstance(kernel_synced(), bool)


class WallOnVirtualTime(VirtualClock):
    """Monotonic time and sleeps from the VirtualLoop; the wall clock set by the test."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(clock.loop)
        self.synced = True
        self.fix: ClockFix | None = None
        self.wall_ms = 1_000

    def now_ms(self) -> int:
        return self.wall_ms


def _batcher(clock: VirtualClock) -> Batcher:
    return Batcher(
        gateway="gw-1",
        key=KEY,
        epoch=0,
        max_readings=100,
        max_age_s=5.0,
        encoding="msgpack",
        clock=clock,
    )


@pytest.mark.virtual_time
@pytest.mark.parametrize("offset_ms", [35 * 86_400_000, -3_600_000], ids=["behind", "ahead"])
async def test_batcher_seals_at_the_sync_and_carries_the_fix(
    offset_ms: int, virtual_clock: VirtualClock
) -> None:
    clock = WallOnVirtualTime(virtual_clock)
    clock.synced = False
    b = _batcher(clock)

    def reading(ts: int) -> Reading:  # ms after 2023-11-14
        return Reading(point=1, ts=1_700_000_000_000 + ts, value=1.0, quality=Quality.GOOD)

    await b.add([reading(1_000)])
    await b.flush()  # seq 0, unsynced
    await b.add([reading(2_000)])  # open when the clock syncs
    clock.synced, clock.fix = True, ClockFix(offset_ms, 1_700_000_002_001)
    await b.add([reading(2_000 + offset_ms)])  # seals seq 1 first
    await b.flush()  # seq 2
    sealed = b.take(1000)
    for _ in range(FIX_BATCHES + 1):
        await b.add([reading(3_000 + offset_ms)])
        await b.flush()
        sealed += b.take(1000)
    headers = [envelope.parse(s.data).header for s in sealed]
    assert [h.unsynced for h in headers[:3]] == [True, True, False]
    assert not any(h.unsynced for h in headers[2:])
    fixes = [(h.fix_offset_ms, h.fix_until, h.fix_last_seq) for h in headers]
    # behind: the first batch after the sync is covered too (its stamps >= until)
    last = 2 if offset_ms > 0 else 1
    assert fixes[:2] == [(None, None, None)] * 2
    assert fixes[2 : 2 + FIX_BATCHES] == [(offset_ms, 1_700_000_002_001, last)] * FIX_BATCHES
    assert fixes[2 + FIX_BATCHES :] == [(None, None, None)] * 2


@pytest.mark.virtual_time
async def test_sealing_age_is_monotonic_whatever_the_wall_clock_does(
    virtual_clock: VirtualClock,
) -> None:
    clock = WallOnVirtualTime(virtual_clock)
    b = _batcher(clock)  # max_age_s=5.0
    runner = asyncio.create_task(b.run())
    try:
        await b.add([Reading(point=1, ts=1_000, value=1.0, quality=Quality.GOOD)])
        clock.wall_ms += 86_400_000  # forward a day: nothing to seal yet
        await asyncio.sleep(2.0)
        clock.wall_ms -= 2 * 86_400_000  # back two days: still nothing
        await asyncio.sleep(2.999)
        assert b.batches_sealed == 0
        await asyncio.sleep(0.002)  # five seconds on the monotonic clock: sealed
        assert b.batches_sealed == 1
    finally:
        runner.cancel()
