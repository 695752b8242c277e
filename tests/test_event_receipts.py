"""Edge events confirmed by the hub's signed receipts (issue 15, the events' part).

An event waits in a durable outbox (the ``events`` table of the spool's file)
until a receipt of kind "event", signed by the hub key and addressed to the
gateway, covers its (epoch, seq); a PUBACK only marks it sent, and a sent event
with no receipt after ``confirm_timeout_s`` goes again (the hub drops the
duplicate). Real Mosquitto, the real hub worker (``vitals hub`` as a subprocess
where kill -9 matters), ``vitals run`` or its Agent, the lying proxy of
tests/mqtt_proxy.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.edge.rules import EdgeEvents
from agent.ops.config import UplinkConfig
from agent.pipeline.spool import Spool
from agent.pipeline.uplink import Uplink
from hub.core import HubCore, Outcome
from protocols import envelope, topics
from protocols.ed25519 import PrivateKey
from protocols.event import Event, event_topic, seal_event
from protocols.reading import Reading
from protocols.receipt import EpochReceipt, seal_receipt
from simulator.broker import MosquittoBroker

sys.path.insert(0, str(Path(__file__).parent))
from mqtt_proxy import lie_on, pass_all
from pg_cluster import pg_bindir, private_cluster

GW = "gw-evr-1"
KEY = PrivateKey.from_private_bytes(bytes([5]) * 32)
HUB_KEY = PrivateKey.from_private_bytes(bytes([6]) * 32)
EPOCH = 3
NOW = time.time_ns() // 1_000_000


def event(seq: int, epoch: int = EPOCH) -> bytes:
    e = Event("gas", "threshold", "fired", "gas-1", "co", 7, 40.0, NOW, NOW, "40 above 35")
    return seal_event(e, gateway=GW, key=KEY, epoch=epoch, seq=seq)


async def until(pred: Callable[[], object], what: str, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------ the hub


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[str | None]:
    if pg_bindir() is None:
        yield None
        return
    with private_cluster(settings={"fsync": "off", "full_page_writes": "off"}) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "hub.sqlite3")
    cluster = request.getfixturevalue("pg_cluster")
    if cluster is None:
        pytest.skip("needs PostgreSQL's initdb and postgres (apt-get install postgresql)")
    psycopg = pytest.importorskip("psycopg", reason="needs psycopg: pip install '.[postgresql]'")
    name = f"ev{os.getpid()}_{time.time_ns() % 10**9}"
    with psycopg.connect(cluster, autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    return cluster.rsplit("/", 1)[0] + "/" + name


def test_the_hub_accounts_for_events_per_epoch_and_receipts_them(db: str) -> None:
    core = HubCore(db, flush_readings=1_000_000)
    core.enroll(GW, KEY.public_key().public_bytes_raw())
    t = event_topic(GW)
    try:
        for seq in (0, 1, 3):
            assert core.handle(t, event(seq)) == Outcome.EVENT
        assert core.handle(t, event(0, epoch=EPOCH + 1)) == Outcome.EVENT
        # written as they come: due at once, both epochs, in their own series
        assert core.event_receipts_due(now=100.0) == [
            (GW, [EpochReceipt(EPOCH, 1, ((3, 3),)), EpochReceipt(EPOCH + 1, 0)])
        ]
        assert core.receipts_due(now=100.0) == []  # no batch was stored: no batch receipt
        # a duplicate (its sender missed the receipt) is receipted again, after 1 s
        assert core.handle(t, event(1)) == Outcome.DUPLICATE
        assert core.event_receipts_due(now=100.5) == []
        [(_, entries)] = core.event_receipts_due(now=101.0)
        assert entries[0] == EpochReceipt(EPOCH, 1, ((3, 3),))
        assert core.event_receipts_due(now=105.0) == []  # nothing new: nothing said
    finally:
        core.close()
    # a hub restarted knows nothing of them until the gateway sends them again: the
    # store's unique key finds the duplicate, which is receipted
    core = HubCore(db, flush_readings=1_000_000)
    try:
        assert core.handle(t, event(3)) == Outcome.DUPLICATE
        assert core.event_receipts_due(now=1.0) == [(GW, [EpochReceipt(EPOCH, -1, ((3, 3),))])]
    finally:
        core.close()


# ------------------------------------------------------------------------------ the gateway


def outbox_rows(state: Path) -> list[tuple[int, int]]:
    """The events the spool's file holds, read as another process would."""
    path = state / "spool.sqlite3"
    if not path.exists():
        return []
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [(int(e), int(s)) for e, s in con.execute("SELECT epoch, seq FROM events")]
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        con.close()


def hub_events(dbfile: Path) -> list[tuple[int, int]]:
    if not dbfile.exists():
        return []
    con = sqlite3.connect(f"file:{dbfile}?mode=ro", uri=True)
    try:
        return [(int(e), int(s)) for e, s in con.execute("SELECT epoch, seq FROM events")]
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


@pytest.mark.mosquitto
async def test_forged_receipts_delete_nothing(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    """Only the hub's signed receipt of kind "event", for this gateway, deletes an
    event; a batch receipt never does, and an event receipt never deletes a batch."""
    aiomqtt = pytest.importorskip("aiomqtt", reason="the test's hub client needs aiomqtt")
    spool = await Spool.open(tmp_path / "spool.sqlite3", durability="off")
    settings = UplinkConfig(gateway=GW, host=mosquitto.host, port=mosquitto.port)
    uplink = Uplink(settings, spool, hub_key=HUB_KEY.public_key().public_bytes_raw())
    events = EdgeEvents([], gateway=GW, key=KEY, epoch=EPOCH)
    await events.load(spool)
    events.receipts = uplink.receipts_on
    uplink.on_event_receipt = events.confirm
    rs = [Reading(point=1, ts=NOW, value=1.0)]
    await spool.append(
        [(EPOCH, 0, 1, NOW, envelope.seal(rs, gateway=GW, key=KEY, epoch=EPOCH, seq=0))]
    )
    tasks = [
        asyncio.create_task(uplink.run()),
        asyncio.create_task(events.publish(UplinkConfig(host=mosquitto.host, port=mosquitto.port))),
    ]
    try:
        events._queue([Event("r", "threshold", "fired", "d", "p", 1, 1.0, NOW, NOW, "x")])
        # no hub: the broker's PUBACKs mark both sent, nothing confirms them
        await until(
            lambda: (
                events.published == 1
                and spool.statistics()["depth_batches"] == 1
                and uplink.published == 1
            ),
            "the PUBACKs",
        )
        await events.flush()
        assert outbox_rows(tmp_path) == [(EPOCH, 0)]
        whole = [EpochReceipt(EPOCH, 0)]
        other = PrivateKey.from_private_bytes(bytes([8]) * 32)
        forged = [
            seal_receipt(other, GW, whole, NOW, kind="event"),  # not the hub's key
            seal_receipt(HUB_KEY, "gw-other", whole, NOW, kind="event"),  # not for us
            seal_receipt(
                HUB_KEY, GW, [EpochReceipt(EPOCH + 1, 0)], NOW, kind="event"
            ),  # not its epoch
            b"\x94\x01garbage",
        ]
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as hub:
            for data in forged:
                await hub.publish(topics.receipt(GW), data, qos=1)
            # the hub's genuine receipt of the batches covers (EPOCH, 0) too: not the event
            await hub.publish(topics.receipt(GW), seal_receipt(HUB_KEY, GW, whole, NOW), qos=1)
            await until(lambda: spool.statistics()["depth_batches"] == 0, "the batch receipt")
            assert uplink.receipts_refused == 3 and uplink.event_receipts == 1
            assert list(events.outbox) == [(EPOCH, 0)] and events.confirmed == 0
            await events.flush()
            assert outbox_rows(tmp_path) == [(EPOCH, 0)]
            # the genuine event receipt deletes it, from memory and from disk
            await hub.publish(
                topics.receipt(GW), seal_receipt(HUB_KEY, GW, whole, NOW, kind="event"), qos=1
            )
            await until(lambda: events.confirmed == 1, "the event receipt")
        assert events.outbox == {}
        await events.flush()
        assert outbox_rows(tmp_path) == []
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks)
        await spool.close()


# ------------------------------------------------------------------------------ the whole

# a rule that fires on the sound level meter's first good reading, and never clears
RULE = """
[[rules]]
id = "loud"
kind = "threshold"
device = "dev-0"
point = "laeq"
above = -1000.0
"""


@pytest.mark.mosquitto
async def test_an_event_the_broker_lied_about_reaches_the_hub_by_a_resend(tmp_path: Path) -> None:
    """The proxy acknowledges the event and drops it: the agent keeps it (on disk),
    sends it again after confirm_timeout_s, and deletes it only when the hub's event
    receipt comes, which is after the hub stored it."""
    from test_lying_broker import GW as GW_L
    from test_lying_broker import world

    async with world(tmp_path, proxy=True, overrides={"confirm_timeout_s": 1.0}) as (w, proxy):
        assert proxy is not None
        with (w.dir / "gateway.toml").open("a") as f:
            f.write(RULE)
        proxy.rule = lie_on("/event")
        await w.start_agent()
        await until(lambda: proxy.lied[topics.event(GW_L)] >= 2, "the event lied about twice")
        assert hub_events(w.db) == []
        assert len(outbox_rows(w.state)) == 1  # still held, on disk
        proxy.rule = pass_all
        left: list[tuple[int, int]] = []
        while True:  # until the outbox is empty; whenever it is, the hub has the event
            rows = outbox_rows(w.state)
            if not rows:
                break
            left = rows
            await asyncio.sleep(0.05)
        assert hub_events(w.db) == left
        log = w.agent_logs[-1].read_text()
        assert "had no hub receipt in 1 s: sending again" in log
        await w.stop_agent()
        ev = w.status()["events"]
        assert ev["confirmed"] == 1 and ev["outbox"] == 0 and ev["republished"] >= 2, ev


@pytest.mark.mosquitto
async def test_the_event_outbox_survives_kill_9(tmp_path: Path) -> None:
    """``vitals run`` killed with kill -9 while its event waits for the hub's receipt
    (the broker lied about it): the next run sends it first, and it leaves the outbox
    once the hub has it, exactly once."""
    from test_lying_broker import GW as GW_L
    from test_lying_broker import world

    async with world(tmp_path, proxy=True) as (w, proxy):
        assert proxy is not None
        with (w.dir / "gateway.toml").open("a") as f:
            f.write(RULE)
        proxy.rule = lie_on("/event")
        await w.start_agent()
        await until(lambda: proxy.lied[topics.event(GW_L)] >= 1, "the event lied about")
        await until(lambda: outbox_rows(w.state), "the event on disk")
        held = outbox_rows(w.state)
        assert w.agent is not None
        w.agent.kill()
        assert await w.agent.wait() == -signal.SIGKILL
        w.agent = None
        assert outbox_rows(w.state) == held and hub_events(w.db) == []
        proxy.rule = pass_all
        await w.start_agent()  # a new epoch; the old event goes first
        await until(lambda: not outbox_rows(w.state), "the outbox emptied by the receipt")
        stored = hub_events(w.db)
        assert held[0] in stored  # the event of the killed run, stored once (its key)
        assert "edge events from before wait for the hub" in w.agent_logs[-1].read_text()
        await w.stop_agent()


# ------------------------------------------------------------------------------ a full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs, mounted for this test (as tests/test_fault_disk.py does)."""
    from test_fault_disk import _mount, _umount

    disk = tmp_path / "disk"
    _mount(disk, "3m")
    try:
        yield disk
    finally:
        _umount(disk)


async def test_a_full_disk_keeps_events_in_memory_and_never_raises(small_disk: Path) -> None:
    """Decisions 21 for the outbox: on a real full disk an event is kept the way an
    append is (the reserve, then the oldest batches, make room); with nothing left
    to free it lives in memory only, counted and said once; deletes never raise."""
    from test_fault_disk import _fill

    spool = await Spool.open(small_disk / "spool.sqlite3", durability="full")
    rows = [(1, s, 10, NOW, os.urandom(2000)) for s in range(200)]
    await spool.append(rows)
    await spool.close()
    spool = await Spool.open(small_disk / "spool.sqlite3", durability="full")
    events = EdgeEvents([], gateway=GW, key=KEY, epoch=EPOCH)
    await events.load(spool)
    _fill(small_disk)  # not one byte left
    e = Event("r", "threshold", "fired", "d", "p", 1, 1.0, NOW, NOW, "x")
    events._queue([e] * 50)
    await events.flush()
    assert len(events.outbox) == 50
    kept = len(await spool.events_held())
    assert kept + events.memory_only == 50 and kept > 0, (kept, events.memory_only)
    assert spool.statistics()["disk_full"] == 1  # it met ENOSPC, and made room as an append does
    events.confirm([EpochReceipt(EPOCH, 49)])
    await events.flush()
    assert events.outbox == {} and events.confirmed == 50
    await spool.close()
    # a new spool on the full disk (opened without a byte, no reserve): nothing to free
    empty = small_disk / "empty.sqlite3"
    await (await Spool.open(empty, durability="full")).close()  # made while there was room
    _fill(small_disk, name="ballast2")
    spool = await Spool.open(empty, durability="full")
    events = EdgeEvents([], gateway=GW, key=KEY, epoch=EPOCH)
    await events.load(spool)
    events._queue([e] * 20)
    await events.flush()
    assert len(events.outbox) == 20 and events.memory_only > 0, events.statistics()
    events.confirm([EpochReceipt(EPOCH, 19)])  # deletes on the full disk do not raise
    await events.flush()
    assert events.outbox == {}
    await spool.close()
