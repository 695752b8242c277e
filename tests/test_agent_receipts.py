"""Receipts, gateway side (issue 15), against a real Mosquitto: a batch leaves the
spool only on the hub's signed receipt; a batch acknowledged by the broker and
never receipted goes out again; a forged receipt deletes nothing; a spool file
written before receipts opens with its backlog; a batch that resets the
connection is split and the hub gets all its readings."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import aiomqtt
import pytest
from typer.testing import CliRunner

from agent.cli.main import app
from agent.clock import SystemClock
from agent.edge.commands import CommandExecutor
from agent.edge.rules import EdgeEvents
from agent.ops.config import UplinkConfig
from agent.ops.status import build_status
from agent.pipeline.batcher import Batcher
from agent.pipeline.spool import Row, Spool, SpoolRow
from agent.pipeline.uplink import Uplink
from hub.core import HubCore
from hub.worker import Hub
from protocols import command as cmdproto
from protocols import envelope, topics
from protocols.ed25519 import PrivateKey
from protocols.event import Event
from protocols.gap import parse_gap, seal_gap
from protocols.reading import Reading
from protocols.receipt import EpochReceipt, HeldRange, parse_heartbeat, seal_heartbeat, seal_receipt
from simulator.broker import MosquittoBroker, free_port, mosquitto_path

pytestmark = pytest.mark.mosquitto

GW = "gw-rcpt-1"
KEY = PrivateKey.from_private_bytes(bytes(range(1, 33)))
HUB_KEY = PrivateKey.from_private_bytes(bytes(range(40, 72)))
HUB_PUB = HUB_KEY.public_key().public_bytes_raw()
EPOCH = 7


def _batcher() -> Batcher:
    return Batcher(
        gateway=GW,
        key=KEY,
        epoch=EPOCH,
        max_readings=10_000,
        max_age_s=3600.0,
        encoding="msgpack+zlib",
        clock=SystemClock(),
    )


async def _seal(b: Batcher, readings: list[Reading]) -> Row:
    await b.add(readings)
    await b.flush()
    (s,) = b.take(1)
    return (s.epoch, s.seq, s.n, s.t0, s.data)


def _readings(n: int, point: int = 0, seed: int = 0) -> list[Reading]:
    rnd = random.Random(seed)  # values that do not compress: a batch of a known size
    return [Reading(point, 1_700_000_000_000 + i, rnd.random()) for i in range(n)]


def _uplink(
    spool: Spool, broker: MosquittoBroker, b: Batcher | None = None, **kw: object
) -> Uplink:
    settings = UplinkConfig(
        gateway=GW,
        host=broker.host,
        port=broker.port,
        backoff_min_s=0.05,
        backoff_max_s=0.2,
        heartbeat_s=0.5,
        **kw,  # type: ignore[arg-type]
    )

    def heartbeat(held: object) -> bytes:
        assert isinstance(held, list)
        sealed = b.next_seq - 1 if b is not None else -1
        return seal_heartbeat(
            KEY,
            GW,
            epoch=EPOCH,
            sealed=sealed,
            held=[HeldRange(*h) for h in held],
            t_ms=int(time.time() * 1000),
        )

    def split(row: SpoolRow) -> list[Row]:  # what agent.service does with the batcher
        assert b is not None
        batch = envelope.parse(row.data)
        parts = b.reseal(
            batch.readings(), unsynced=batch.header.unsynced, split_of=(row.epoch, row.seq)
        )
        return [(p.epoch, p.seq, p.n, p.t0, p.data) for p in parts]

    return Uplink(
        settings,
        spool,
        gap_signer=lambda ranges: seal_gap(ranges, gateway=GW, key=KEY, epoch=EPOCH),
        hub_key=HUB_PUB,
        heartbeat=heartbeat,
        splitter=split,
        sealed=(lambda: (EPOCH, b.next_seq - 1)) if b is not None else None,
    )


async def _until(cond: object, within: float = 20.0) -> None:
    assert callable(cond)
    for _ in range(int(within / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


@contextlib.asynccontextmanager
async def _running(up: Uplink, spool: Spool) -> AsyncIterator[None]:
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(spool.run_acks()), tg.create_task(up.run())]
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()


@contextlib.asynccontextmanager
async def _listener(broker: MosquittoBroker, got: list[tuple[str, bytes]]) -> AsyncIterator[None]:
    ready = asyncio.Event()

    async def listen() -> None:
        async with aiomqtt.Client(broker.host, broker.port, identifier="listener") as c:
            await c.subscribe(f"{topics.DEFAULT_PREFIX}/{GW}/#", qos=1)
            ready.set()
            async for m in c.messages:
                assert isinstance(m.payload, bytes)
                got.append((str(m.topic), m.payload))

    task = asyncio.create_task(listen())
    await asyncio.wait_for(ready.wait(), 10)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _batches(got: list[tuple[str, bytes]]) -> list[int]:
    return [envelope.parse(p).header.seq for t, p in got if t.endswith("/batch")]


async def _publish(broker: MosquittoBroker, topic: str, payload: bytes) -> None:
    async with aiomqtt.Client(broker.host, broker.port, identifier="fake-hub") as c:
        await c.publish(topic, payload, qos=1)


def _status(tmp_path: Path, spool: Spool, up: Uplink) -> str:
    """What `vitals status` prints for this spool and uplink."""
    stats = {
        "gateway": GW,
        "epoch": EPOCH,
        "uptime_s": 1.0,
        "spool": spool.statistics(),
        "uplink": up.statistics(),
        "buses": {},
    }
    agent = SimpleNamespace(
        statistics=lambda: stats,
        config=SimpleNamespace(
            source=tmp_path / "gw.toml", gateway=SimpleNamespace(state_dir=tmp_path)
        ),
    )
    path = tmp_path / "status.json"
    path.write_text(json.dumps(build_status(agent)))
    r = CliRunner().invoke(app, ["status", "--status-file", str(path)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    return r.output


async def test_acknowledged_batch_is_sent_again_until_a_receipt_deletes_it(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """No hub listens: the broker PUBACKs every batch and they stay; after the confirm
    timeout they go out again; only a signed receipt deletes them, and only those it
    covers."""
    b = _batcher()
    spool = await Spool.open(tmp_path / "s.sqlite3", durability="off")
    await spool.append([await _seal(b, _readings(5, seed=i)) for i in range(3)])
    up = _uplink(spool, mosquitto, b, confirm_timeout_s=0.4)
    got: list[tuple[str, bytes]] = []
    async with _listener(mosquitto, got), _running(up, spool):
        await _until(lambda: sorted(_batches(got)).count(2) >= 2)  # each sent twice at least
        assert spool.statistics()["depth_batches"] == 3, "a PUBACK deletes nothing"
        assert spool.statistics()["sent_unconfirmed"] == 3
        assert spool.republished >= 3
        out = _status(tmp_path, spool, up)
        assert "receipts on: sent " in out and "unconfirmed 3 batches (waiting longest" in out
        # the heartbeat names what the spool holds and the last seq sealed
        hb = parse_heartbeat([p for t, p in got if t.endswith("/hb")][-1])
        hb.verify(KEY.public_key())
        assert (hb.header.epoch, hb.header.sealed) == (EPOCH, 2)
        assert [(h.epoch, h.first, h.last) for h in hb.held()] == [(EPOCH, 0, 2)]
        # the hub's receipt: 0..0 and 2..2 stored, 1 not
        receipt = seal_receipt(HUB_KEY, GW, [EpochReceipt(EPOCH, 0, ((2, 2),))], 1)
        await _publish(mosquitto, topics.receipt(GW), receipt)
        await _until(lambda: spool.statistics()["depth_batches"] == 1)
        left = await spool.pending(0, 10)
        assert [r.seq for r in left] == [] and spool.statistics()["sent_unconfirmed"] == 1
        assert await spool.held_ranges() == [(EPOCH, 1, 1)]
        # a receipt again (replayed) changes nothing; the one for seq 1 empties the spool
        await _publish(mosquitto, topics.receipt(GW), receipt)
        await _publish(
            mosquitto, topics.receipt(GW), seal_receipt(HUB_KEY, GW, [EpochReceipt(EPOCH, 2)], 2)
        )
        await _until(lambda: spool.empty.is_set())
    assert up.receipts == 3 and up.receipts_refused == 0
    assert spool.confirmed == 3
    await spool.close()


async def test_forged_or_misaddressed_receipt_deletes_nothing(
    mosquitto: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    b = _batcher()
    spool = await Spool.open(tmp_path / "s.sqlite3", durability="off")
    await spool.append([await _seal(b, _readings(3, seed=i)) for i in range(4)])
    up = _uplink(spool, mosquitto, b, confirm_timeout_s=60.0)
    everything = [EpochReceipt(EPOCH, 3)]
    other_key = PrivateKey.from_private_bytes(bytes(range(100, 132)))
    async with _running(up, spool):
        await _until(lambda: spool.statistics()["sent_unconfirmed"] == 4)
        forged = [
            seal_receipt(other_key, GW, everything, 1),  # not the hub's key
            seal_receipt(HUB_KEY, "gw-other", everything, 1),  # the hub's, for another gateway
            b"\x00garbage",
            # the hub's signature over another gateway's receipt, relabelled for us
            seal_receipt(HUB_KEY, "gw-rcpt-2", everything, 1).replace(b"gw-rcpt-2", GW.encode()),
        ]
        for data in forged:
            await _publish(mosquitto, topics.receipt(GW), data)
        await _until(lambda: up.receipts_refused == len(forged))
        assert spool.statistics()["depth_batches"] == 4 and spool.confirmed == 0
        await _publish(mosquitto, topics.receipt(GW), seal_receipt(HUB_KEY, GW, everything, 2))
        await _until(lambda: spool.empty.is_set())
    warned = [r for r in caplog.records if "not the hub's" in r.getMessage()]
    assert len(warned) == 1, "one line, the rest counted"
    await spool.close()


_OLD_SCHEMA = """
CREATE TABLE batches (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    epoch   INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    n       INTEGER NOT NULL,
    t0      INTEGER NOT NULL,
    created REAL    NOT NULL,
    data    BLOB    NOT NULL
);
CREATE TABLE gaps (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    epoch    INTEGER NOT NULL,
    first    INTEGER NOT NULL,
    last     INTEGER NOT NULL,
    readings INTEGER NOT NULL,
    reason   TEXT    NOT NULL
);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@contextlib.asynccontextmanager
async def _hub(broker: MosquittoBroker, db: Path) -> AsyncIterator[HubCore]:
    core = HubCore(db)
    core.enroll(GW, KEY.public_key().public_bytes_raw())
    hub = Hub(core, host=broker.host, port=broker.port, hub_key=HUB_KEY)
    task = asyncio.create_task(hub.run())
    try:
        await asyncio.wait_for(hub.subscribed.wait(), 15)
        yield core
    finally:
        while not task.done():  # its reconnect loop can miss one cancellation
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        core.close()


def _hub_readings(db: Path) -> int:
    con = sqlite3.connect(db)
    try:
        return int(con.execute("SELECT count(*) FROM readings").fetchone()[0])
    finally:
        con.close()


async def test_spool_written_before_receipts_opens_with_its_backlog(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """A gateway upgraded in the field: its old spool file (no sent column) keeps every
    batch, which the real hub then stores and receipts."""
    path = tmp_path / "spool.sqlite3"
    b = _batcher()
    rows = [await _seal(b, _readings(4, point=i, seed=i)) for i in range(6)]
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(_OLD_SCHEMA)
    con.executemany(
        "INSERT INTO batches (epoch, seq, n, t0, created, data) VALUES (?, ?, ?, ?, ?, ?)",
        [(e, s, n, t0, time.time(), d) for e, s, n, t0, d in rows],
    )
    con.commit()
    con.close()
    spool = await Spool.open(path, durability="normal")
    assert spool.statistics()["depth_batches"] == 6
    assert [r.seq for r in await spool.pending(0, 10)] == list(range(6))
    up = _uplink(spool, mosquitto, b, confirm_timeout_s=5.0)
    async with _hub(mosquitto, tmp_path / "hub.sqlite3"), _running(up, spool):
        await _until(lambda: spool.empty.is_set())
    assert spool.confirmed == 6 and _hub_readings(tmp_path / "hub.sqlite3") == 24
    await spool.close()
    con = sqlite3.connect(path)
    cols = [r[1] for r in con.execute("PRAGMA table_info(batches)")]
    con.close()
    assert "sent" in cols


async def test_batch_that_resets_the_connection_is_split_and_reaches_the_hub(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker whose packet limit is below one batch's size drops the connection at
    each attempt (MQTT 3.1.1 says nothing else): after the second, the batch is
    re-sealed as smaller ones, the hub stores every reading, and the queue behind it
    moves on."""
    if not mosquitto_path():
        pytest.skip("needs the mosquitto binary (apt-get install mosquitto)")
    broker = MosquittoBroker(extra_config="max_packet_size 6000\n")
    await broker.start()
    try:
        b = _batcher()
        small = [await _seal(b, _readings(20, point=1, seed=i)) for i in range(3)]
        big = await _seal(b, _readings(1000, point=2, seed=99))
        after = [await _seal(b, _readings(20, point=3, seed=10 + i)) for i in range(3)]
        assert len(big[4]) > 6000 > 2 * max(len(r[4]) for r in small + after)
        spool = await Spool.open(tmp_path / "s.sqlite3", durability="off")
        await spool.append([*small, big, *after])
        up = _uplink(spool, broker, b, confirm_timeout_s=5.0)
        db = tmp_path / "hub.sqlite3"
        async with _hub(broker, db), _running(up, spool):
            await _until(lambda: spool.empty.is_set(), within=60)
            await _until(lambda: _hub_readings(db) == 3 * 20 + 1000 + 3 * 20)
        assert spool.split_batches >= 1
        assert any("re-sealed as seq" in r.getMessage() for r in caplog.records)
        # the original seq is named to the hub (reason split), not lost
        con = sqlite3.connect(db)
        try:
            reasons = {r[0] for r in con.execute("SELECT reason FROM gaps")}
        finally:
            con.close()
        assert "split" in reasons
        await spool.close()
    finally:
        await broker.stop()


async def test_event_connection_notices_a_broker_restart_while_idle(tmp_path: Path) -> None:
    """The event publisher watches its idle connection: a broker restarted while no
    event is due is noticed and the connection made again before the next event, which
    then goes out on a live connection (docs/events.md)."""
    if not mosquitto_path():
        pytest.skip("needs the mosquitto binary (apt-get install mosquitto)")
    port = free_port()
    broker = MosquittoBroker(port)
    await broker.start()
    events = EdgeEvents([], gateway=GW, key=KEY, epoch=EPOCH)
    link = UplinkConfig(host=broker.host, port=port, keepalive_s=30)
    task = asyncio.create_task(events.publish(link))
    try:
        await _until(lambda: events.connects == 1)
        await broker.stop()
        await broker.start()  # the same port, no persistence: the session is gone
        # no event is due, yet the publisher is connected again (keepalive 30 s: it
        # did not wait for a ping to find the old connection dead)
        await _until(lambda: events.connects == 2)
        got: list[tuple[str, bytes]] = []
        async with _listener(broker, got):
            events._queue(
                [Event("r1", "threshold", "fired", "dev", "p", 0, 1.0, 1, 1, "1.0 above 0")]
            )
            await _until(lambda: any(t.endswith("/event") for t, _ in got))
        assert events.published == 1 and events.connects == 2
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await broker.stop()


async def test_hub_asks_again_held_batches_go_out_the_rest_is_named_not_held(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """The hub's signed ``resend`` over the real command path: what the spool holds is
    published again, what it does not (or never sealed) is named in a gap notice with
    reason ``not_held``, and the signed answer says both."""
    b = _batcher()
    spool = await Spool.open(tmp_path / "s.sqlite3", durability="off")
    rows = [await _seal(b, _readings(2, seed=i)) for i in range(6)]
    await spool.append(rows)
    up = _uplink(spool, mosquitto, b, confirm_timeout_s=600.0)
    up.commands = CommandExecutor(GW, HUB_PUB, KEY, {"resend": up.resend})
    got: list[tuple[str, bytes]] = []
    async with _listener(mosquitto, got), _running(up, spool):
        await _until(
            lambda: spool.statistics()["sent_unconfirmed"] == 6 and len(_batches(got)) == 6
        )
        # the hub stored 0..1 and 3: the receipt deletes them; 2, 4, 5 stay
        receipt = seal_receipt(HUB_KEY, GW, [EpochReceipt(EPOCH, 1, ((3, 3),))], 1)
        await _publish(mosquitto, topics.receipt(GW), receipt)
        await _until(lambda: spool.statistics()["depth_batches"] == 3)
        sent_before = len(_batches(got))
        wire, _ = cmdproto.command(
            "resend",
            {"epoch": EPOCH, "ranges": [[0, 2], [4, 9]]},
            gateway=GW,
            hub_key=HUB_KEY,
            now_ms=int(time.time() * 1000),
        )
        await _publish(mosquitto, topics.cmd(GW), wire)
        await _until(lambda: any(t.endswith("/cmd/result") for t, _ in got))
        answer = cmdproto.parse_result(next(p for t, p in got if t.endswith("/cmd/result")))
        answer.verify(KEY.public_key())
        assert answer.status == "ok"
        # 9 was never sealed (the last seq is 5): never named, whatever the hub asks
        assert answer.value() == {"resent": 3, "not_held": [[EPOCH, 0, 1]]}
        await _until(lambda: any(t.endswith("/gap") for t, _ in got))
        await _until(lambda: len(_batches(got)) == sent_before + 3)
    assert sorted(_batches(got)[sent_before:]) == [2, 4, 5]
    gap = parse_gap(next(p for t, p in got if t.endswith("/gap")))
    gap.verify(KEY.public_key())
    assert [(g.first, g.last, g.reason) for g in gap.ranges()] == [(0, 1, "not_held")]
    await spool.close()
