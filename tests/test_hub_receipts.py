"""The hub's side of receipts (issue 15): accounting per (gateway, epoch), receipts
after the durable write, holes asked for with a signed resend, the tail from a
heartbeat counted missing, and accounting reloaded from the store after a restart.

The core's tests run on both stores (SQLite, and PostgreSQL in a private cluster
when its binaries are installed); the worker's through a real Mosquitto, with a
test client playing the gateway (signed batches and heartbeats in, receipts and
resend commands out, each verified with the hub key).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import msgpack
import pytest

from hub.core import HubCore, Outcome, SeqRanges
from hub.stats import hub_stats
from hub.store import open_readings
from protocols import command, envelope, topics
from protocols.ed25519 import PrivateKey
from protocols.gap import GapRange, seal_gap
from protocols.reading import Reading
from protocols.receipt import (
    EpochReceipt,
    HeldRange,
    RefusedRange,
    parse_receipt,
    seal_heartbeat,
)
from simulator.broker import MosquittoBroker, mosquitto_path

sys.path.insert(0, str(Path(__file__).parent))
from pg_cluster import pg_bindir, private_cluster

GW = "gw-rcpt-1"
KEY = PrivateKey.from_private_bytes(bytes([7]) * 32)
HUB_KEY = PrivateKey.from_private_bytes(bytes([9]) * 32)
T0 = time.time_ns() // 1_000_000 - 3_600_000  # an hour ago: inside the hub's age window
_names = itertools.count()


def batch(epoch: int, seq: int, n: int = 3) -> bytes:
    rs = [Reading(point=i, ts=T0 + seq * 1000 + i, value=float(i)) for i in range(n)]
    return envelope.seal(rs, gateway=GW, key=KEY, epoch=epoch, seq=seq)


def heartbeat(epoch: int, sealed: int, held: list[HeldRange] | None = None) -> bytes:
    return seal_heartbeat(
        KEY, GW, epoch=epoch, sealed=sealed, held=held or [], t_ms=time.time_ns() // 10**6
    )


def gap(epoch: int, first: int, last: int, reason: str, readings: int = 9) -> bytes:
    return seal_gap(
        [GapRange(epoch, first, last, readings, reason)], gateway=GW, key=KEY, epoch=epoch
    )


# ------------------------------------------------------------------------------ stores


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[str | None]:
    if pg_bindir() is None:
        yield None
        return
    with private_cluster(settings={"fsync": "off", "full_page_writes": "off"}) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The hub database: an SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "hub.sqlite3")
    cluster = request.getfixturevalue("pg_cluster")
    if cluster is None:
        pytest.skip("needs PostgreSQL's initdb and postgres (apt-get install postgresql)")
    psycopg = pytest.importorskip("psycopg", reason="needs psycopg: pip install '.[postgresql]'")
    name = f"r{os.getpid()}_{next(_names)}"
    with psycopg.connect(cluster, autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    return cluster.rsplit("/", 1)[0] + "/" + name


def new_core(db: str, **kw: float) -> HubCore:
    core = HubCore(db, flush_readings=1_000_000, **kw)  # type: ignore[arg-type]
    core.enroll(GW, KEY.public_key().public_bytes_raw())
    return core


# ------------------------------------------------------------------------------ core


def test_seq_ranges_merge_and_holes() -> None:
    r = SeqRanges()
    for lo, hi in [(5, 5), (0, 1), (3, 3), (2, 2), (9, 12), (7, 7), (6, 6), (20, 21)]:
        r.add(lo, hi)
    assert r.r == [(0, 3), (5, 7), (9, 12), (20, 21)]
    assert r.missing(0, 25) == [(4, 4), (8, 8), (13, 19), (22, 25)]
    assert (r.missing(0, 3), r.missing(6, 10), r.missing(30, 31)) == ([], [(8, 8)], [(30, 31)])
    r.add(0, 30)
    assert (r.r, r.top) == ([(0, 30)], 30)


def test_receipts_only_after_the_write_and_for_duplicates(db: str) -> None:
    core = new_core(db)
    t = topics.batch(GW)
    try:
        # a heartbeat is answered even before anything is stored: "nothing yet"
        core.handle(topics.heartbeat(GW), heartbeat(3, -1, [HeldRange(3, 0, 0)]))
        assert core.receipts_due(now=99.0) == [(GW, [EpochReceipt(3, -1)])]
        for seq in (0, 1, 2, 4):
            assert core.handle(t, batch(3, seq)) == Outcome.STORED
        assert core.receipts_due(now=100.0) == []  # buffered, not durable: nothing said
        core.flush()
        [(gw, entries)] = core.receipts_due(now=100.0)
        assert (gw, entries) == (GW, [EpochReceipt(3, 2, ((4, 4),))])
        assert core.receipts_due(now=100.5) == []  # nothing new
        assert core.handle(t, batch(3, 1)) == Outcome.DUPLICATE
        assert core.receipts_due(now=100.5) == []  # at most one a second
        assert core.receipts_due(now=101.0) == [(GW, entries)]  # the duplicate's
        # a heartbeat asks for one now, whatever the rate
        assert core.handle(topics.heartbeat(GW), heartbeat(3, 4)) == Outcome.HEARTBEAT
        assert core.receipts_due(now=101.1) == [(GW, entries)]
    finally:
        core.close()


def test_holes_and_the_tail_are_asked_for_after_the_grace(db: str) -> None:
    core = new_core(db, hole_grace_s=30.0)
    t = topics.batch(GW)
    try:
        for seq in (0, 1, 3):
            core.handle(t, batch(5, seq))
        core.flush()
        assert core.asks_due(now=0.0) == []  # no heartbeat yet: it may not resend
        # it still holds 10..11 of its last epoch, and 2, 4..7 of this one (0, 1, 3
        # were receipted); 4..7 are the tail: nothing above 3 reached the hub
        held = [HeldRange(4, 10, 11), HeldRange(5, 2, 2), HeldRange(5, 4, 7)]
        core.handle(topics.heartbeat(GW), heartbeat(5, 7, held))
        assert core.holes(GW) == {5: [(2, 2), (4, 7)], 4: [(10, 11)]}
        assert core.asks_due(now=1000.0) == []  # seen missing now: grace starts
        assert core.asks_due(now=1029.0) == []
        core.handle(t, batch(5, 4))  # arrives (buffered, then written): the hole shrinks
        core.flush()
        asks = core.asks_due(now=1030.0)  # the shrunk hole keeps its age
        assert asks == [(GW, 4, [(10, 11)]), (GW, 5, [(2, 2), (5, 7)])]
        assert core.asks_due(now=1040.0) == []  # asked: not again within the grace
        assert core.asks_due(now=1060.0) == asks
        assert core.counters["resend_asks"] == 4
        assert core.hole_batches() == 1 + 3 + 2
        stats = hub_stats(db)["gateways"][GW]
        # the tails from the heartbeat: all of epoch 4 up to 11 is missing at the hub
        assert stats["missing_batches"] == 1 + 3 + 12
        assert stats["epochs"]["5"]["missing"] == [[2, 2], [5, 7]]
        assert stats["epochs"]["5"]["last_seq"] == 7
        assert core.missing() == {GW: 16}
    finally:
        core.close()


def test_gap_notices_account_and_split_is_not_lost(db: str) -> None:
    core = new_core(db)
    t = topics.batch(GW)
    try:
        for seq in (0, 1, 2, 5):
            core.handle(t, batch(2, seq))
        core.flush()
        # the gateway no longer holds 1..4 (1, 2 were receipted and deleted meanwhile);
        # seq 4 it re-sealed as smaller batches (6, 7), which arrive
        assert core.handle(topics.gap(GW), gap(2, 1, 3, "not_held")) == Outcome.GAP
        assert core.handle(topics.gap(GW), gap(2, 4, 4, "split")) == Outcome.GAP
        for seq in (6, 7):
            core.handle(t, batch(2, seq))
        core.flush()
        assert core.receipt(GW) == [EpochReceipt(2, 7)]
        # the original of the split batch, late (a broker that held it): its readings
        # are in 6 and 7 already, so it is a duplicate, not stored twice
        assert core.handle(t, batch(2, 4)) == Outcome.DUPLICATE
        core.flush()
        g = hub_stats(db)["gateways"][GW]
        assert (g["batches"], g["missing_batches"], g["dropped_batches"]) == (6, 0, 1)
        assert g["split_batches"] == 1
        dropped = g["epochs"]["2"]["dropped_by_gateway"]
        # only seq 3 is dropped: 1 and 2 are stored, never counted twice
        assert [(d["first"], d["last"], d["reason"]) for d in dropped] == [
            (3, 3, "not_held"),
            (4, 4, "split"),
        ]
    finally:
        core.close()


def test_a_receipt_names_the_epochs_the_gateway_holds_first(db: str) -> None:
    core = new_core(db)
    try:
        for epoch in range(1, 71):  # a gateway that restarted 70 times
            core.handle(topics.batch(GW), batch(epoch, 0))
        core.flush()
        assert [e.epoch for e in core.receipt(GW)] == list(range(7, 71))  # the newest 64
        # its spool still holds a batch of epoch 2: that epoch is in the receipt
        core.handle(topics.heartbeat(GW), heartbeat(70, 0, [HeldRange(2, 0, 0)]))
        assert [e.epoch for e in core.receipt(GW)] == [2, *range(8, 71)]
    finally:
        core.close()


def test_a_restarted_hub_reloads_its_accounting_from_the_store(db: str) -> None:
    core = new_core(db)
    t = topics.batch(GW)
    for seq in [*range(0, 40), *range(45, 50)]:
        core.handle(t, batch(1, seq))
    core.handle(topics.gap(GW), gap(1, 40, 41, "spool_full"))
    core.handle(topics.heartbeat(GW), heartbeat(1, 60))
    core.close()
    again = new_core(db)
    try:
        assert again.receipt(GW) == []  # nothing read yet: a receipt says only what it knows
        # the gateway's heartbeat names what it waits a receipt for: read from the store
        again.handle(topics.heartbeat(GW), heartbeat(1, 60, [HeldRange(1, 0, 60)]))
        assert again.receipt(GW) == [EpochReceipt(1, 41, ((45, 49),))]
        assert again.holes(GW) == {1: [(42, 44), (50, 60)]}
        assert hub_stats(db)["gateways"][GW]["missing_batches"] == 3 + 11
    finally:
        again.close()


def test_a_second_worker_learns_from_the_store_before_asking(db: str) -> None:
    a, b = new_core(db, hole_grace_s=1.0), new_core(db, hole_grace_s=1.0)
    t = topics.batch(GW)
    try:
        a.handle(t, batch(1, 0))
        a.flush()
        a.handle(topics.heartbeat(GW), heartbeat(1, 1, [HeldRange(1, 1, 1)]))
        assert a.holes(GW) == {1: [(1, 1)]}
        assert a.asks_due(now=0.0) == []
        b.handle(t, batch(1, 1))  # the shared subscription gave seq 1 to the other worker
        b.flush()
        assert a.asks_due(now=5.0) == []  # read again from the store: no hole left
        assert a.receipt(GW) == [EpochReceipt(1, 1)]
    finally:
        a.close()
        b.close()


# ------------------------------------------------------------------------------ worker


@pytest.fixture
async def mosquitto_log() -> AsyncIterator[MosquittoBroker]:
    if not mosquitto_path():
        pytest.skip("needs the mosquitto binary (apt-get install mosquitto); .ci/run installs it")
    b = MosquittoBroker(extra_config="log_type subscribe\n")
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


async def _hub_subscribed(broker: MosquittoBroker, client_id: str) -> None:
    log = broker._dir / "mosquitto.log"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if any(f" {client_id} " in ln and ln.endswith("/+/hb") for ln in text.splitlines()):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{client_id} never subscribed to heartbeats")


async def test_the_worker_sends_receipts_after_the_write_and_asks_for_holes(
    mosquitto_log: MosquittoBroker, tmp_path: Path
) -> None:
    aiomqtt = pytest.importorskip("aiomqtt", reason="the hub needs aiomqtt (the hub extra)")
    from hub.worker import Hub

    dbfile = tmp_path / "hub.sqlite3"
    core = new_core(str(dbfile), hole_grace_s=1.0)
    hub = Hub(
        core,
        host=mosquitto_log.host,
        port=mosquitto_log.port,
        client_id="hub-rcpt",
        hub_key=HUB_KEY,
        flush_interval_s=0.05,
    )
    stored = sqlite3.connect(f"file:{dbfile}?mode=ro", uri=True)
    receipts: list[EpochReceipt] = []
    asks: list[dict[str, object]] = []
    early: list[int] = []  # seqs a receipt covered before they were in the database
    got = asyncio.Event()

    async def gateway(client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            assert isinstance(msg.payload, bytes)
            if msg.topic.matches(topics.receipt(GW)):
                r = parse_receipt(msg.payload)
                r.verify(HUB_KEY.public_key())  # the hub's word, signed
                assert r.header.gw == GW
                [e] = r.epochs()
                on_disk = {s for (s,) in stored.execute("SELECT seq FROM batches")}
                early.extend(s for s in range(0, 50) if e.covers(s) and s not in on_disk)
                receipts.append(e)
            else:
                c = command.parse_command(msg.payload)
                c.verify(HUB_KEY.public_key())
                assert c.op == "resend"
                asks.append(c.args())
            got.set()

    async def until(pred: Callable[[], object], what: str, within_s: float = 20.0) -> None:
        deadline = time.monotonic() + within_s
        while not pred():
            if listener is not None and listener.done():
                raise AssertionError(f"the gateway's listener ended: {listener.exception()!r}")
            got.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what}: receipts {receipts[-3:]}, asks {asks}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(got.wait(), left)

    hub_task = asyncio.create_task(hub.run())
    listener: asyncio.Task[None] | None = None
    try:
        await _hub_subscribed(mosquitto_log, "hub-rcpt")
        async with aiomqtt.Client(mosquitto_log.host, mosquitto_log.port) as client:
            await client.subscribe(topics.receipt(GW), qos=1)
            await client.subscribe(topics.cmd(GW), qos=1)
            listener = asyncio.create_task(gateway(client))
            for seq in (0, 1, 3):
                await client.publish(topics.batch(GW), batch(1, seq), qos=1)
            await until(
                lambda: receipts and receipts[-1] == EpochReceipt(1, 1, ((3, 3),)), "receipt"
            )
            # a duplicate is receipted again (its sender missed the first)
            n = len(receipts)
            await client.publish(topics.batch(GW), batch(1, 3), qos=1)
            await until(lambda: len(receipts) > n, "receipt for a duplicate")
            # the heartbeat names the tail: 2 and 4..5 are missing, asked after the grace
            held = [HeldRange(1, 2, 2), HeldRange(1, 4, 5)]
            await client.publish(topics.heartbeat(GW), heartbeat(1, 5, held), qos=1)
            await until(lambda: asks, "resend ask")
            assert asks[0] == {"epoch": 1, "ranges": [[2, 2], [4, 5]]}
            assert hub_stats(dbfile)["gateways"][GW]["missing_batches"] == 3
            for seq in (2, 4, 5):  # the gateway resends
                await client.publish(topics.batch(GW), batch(1, seq), qos=1)
            await until(lambda: receipts[-1] == EpochReceipt(1, 5), "full receipt")
    finally:
        if listener is not None:
            listener.cancel()
            await asyncio.wait({listener})
        while not hub_task.done():  # its reconnect loop can miss one cancellation
            hub_task.cancel()
            await asyncio.wait({hub_task}, timeout=1.0)
        stored.close()
    assert early == []  # never a receipt for what was not yet written
    assert hub_stats(dbfile)["gateways"][GW]["missing_batches"] == 0
    assert core.counters["receipts_sent"] >= 4
    pytest.importorskip("prometheus_client", reason="the metrics need the hub extra")
    from hub.metrics import Metrics

    text = Metrics(core).text().decode()
    sent = next(ln for ln in text.splitlines() if ln.startswith("vitals_hub_receipts_sent_total"))
    assert float(sent.split()[-1]) == core.counters["receipts_sent"]
    assert "vitals_hub_resend_asks_total 1.0" in text
    assert "vitals_hub_hole_batches 0.0" in text
    core.close()


# ------------------------------------------------------------ settled: refused for good


def _undecodable(epoch: int, seq: int) -> bytes:
    """A batch the gateway signed whose payload disagrees with its header (n); its
    clock unsynced, so its times are not what refuses it."""
    good = envelope.parse(batch(epoch, seq))
    protected = dict(msgpack.unpackb(good.protected))
    protected["n"] += 1
    protected["clock"] = "unsynced"
    return envelope.sign_message(envelope.BATCH_DOMAIN, protected, good.payload, KEY)


def test_an_authentic_batch_refused_for_good_is_settled_not_missing(db: str) -> None:
    """A hub whose window is 1 s: a batch of an hour ago is too old, an undecodable
    one a bad payload; both are recorded at once, owed a receipt of kind "refused",
    never asked for, and counted refused, not missing. An unsynced batch is never
    refused for its times."""
    core = new_core(db, window_ms=1000)
    t = topics.batch(GW)
    try:
        assert core.handle(t, batch(1, 0)) == Outcome.TOO_OLD
        old = [Reading(point=1, ts=T0 - 86_400_000, value=1.0)]
        unsynced = envelope.seal(old, gateway=GW, key=KEY, epoch=1, seq=1, unsynced=True)
        assert core.handle(t, unsynced) == Outcome.STORED
        assert core.handle(t, _undecodable(1, 2)) == Outcome.BAD_PAYLOAD
        assert core.refusals_due() == [
            (GW, [RefusedRange(1, 2, 2, "bad_payload"), RefusedRange(1, 0, 0, "too_old")])
        ]
        assert core.refusals_due() == []  # said once
        core.flush()
        # the gateway still holds all three: the refused ones are no hole to ask for,
        # and the batch receipt covers only what is stored
        core.handle(topics.heartbeat(GW), heartbeat(1, 2, [HeldRange(1, 0, 2)]))
        assert core.holes(GW) == {} and core.missing() == {GW: 0}
        assert core.receipt(GW) == [EpochReceipt(1, -1, ((1, 1),))]
        # sent again (the refusal was lost): owed again, recorded and counted once
        assert core.handle(t, batch(1, 0)) == Outcome.TOO_OLD
        assert core.refusals_due() == [(GW, [RefusedRange(1, 0, 0, "too_old")])]
        core.flush()
        g = hub_stats(db)["gateways"][GW]
        assert (g["batches"], g["missing_batches"], g["dropped_batches"]) == (1, 0, 0)
        assert g["refused_batches"] == 2
        assert g["epochs"]["1"]["refused_by_hub"] == [
            {"first": 0, "last": 0, "readings": 3, "reason": "too_old"},
            {"first": 2, "last": 2, "readings": 4, "reason": "bad_payload"},  # as its header says
        ]
        assert g["epochs"]["1"]["dropped_by_gateway"] == []
        assert hub_stats(db)["rejected"] == {"too_old": 1, "bad_payload": 1}
    finally:
        core.close()


def test_a_stored_batch_sent_again_after_the_window_is_a_duplicate(db: str) -> None:
    """Dedup comes before the age window: a batch the hub has is receipted again,
    never refused (and so never both stored and refused)."""
    core = new_core(db)
    try:
        assert core.handle(topics.batch(GW), batch(1, 0)) == Outcome.STORED
        core.flush()
        core.window_ms = 1000
        assert core.handle(topics.batch(GW), batch(1, 0)) == Outcome.DUPLICATE
        assert core.refusals_due() == []
        assert hub_stats(db)["gateways"][GW]["refused_batches"] == 0
    finally:
        core.close()


def test_a_refusal_is_answered_from_the_store_after_a_restart_and_by_another_worker(
    db: str,
) -> None:
    """Refused for good, then the hub restarts: the store says so (loaded at start), so
    the gateway's heartbeat naming them asks for nothing, and the batches sent again
    get the same refusal without a second count or log line. A second worker on the
    same database that had started before the refusal (``--shared``) finds the row
    there: it answers, and counts nothing either."""
    core = new_core(db, window_ms=1000)
    other = new_core(db, window_ms=1000, worker="w1")  # type: ignore[arg-type]
    t = topics.batch(GW)
    assert core.handle(t, batch(1, 0)) == Outcome.TOO_OLD
    assert core.handle(t, _undecodable(1, 1)) == Outcome.BAD_PAYLOAD
    assert len(core.refusals_due()) == 1
    core.close()
    again = new_core(db, window_ms=1000)
    try:
        again.handle(topics.heartbeat(GW), heartbeat(1, 1, [HeldRange(1, 0, 1)]))
        assert again.holes(GW) == {} and again.missing() == {GW: 0}
        assert again.handle(t, batch(1, 0)) == Outcome.TOO_OLD
        assert again.handle(t, _undecodable(1, 1)) == Outcome.BAD_PAYLOAD
        owed = [RefusedRange(1, 1, 1, "bad_payload"), RefusedRange(1, 0, 0, "too_old")]
        assert again.refusals_due() == [(GW, owed)]
        assert other.handle(t, batch(1, 0)) == Outcome.TOO_OLD
        assert other.handle(t, _undecodable(1, 1)) == Outcome.BAD_PAYLOAD
        assert other.refusals_due() == [(GW, owed)]
        again.flush()
        other.flush()
        assert hub_stats(db)["rejected"] == {"too_old": 1, "bad_payload": 1}
        assert hub_stats(db)["gateways"][GW]["refused_batches"] == 2
    finally:
        again.close()
        other.close()


async def test_a_restarted_worker_answers_a_refused_batch_sent_again(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """A real worker refuses a batch for good (too old for its 1 s window) and says so
    in a signed receipt of kind "refused"; it stops, a new worker starts on the same
    database, the gateway (which lost that receipt) sends the batch again: a refused
    receipt again, and `vitals hub stats` counts one refusal."""
    aiomqtt = pytest.importorskip("aiomqtt", reason="the hub needs aiomqtt (the hub extra)")
    from hub.worker import Hub

    dbfile = tmp_path / "hub.sqlite3"
    refused: list[RefusedRange] = []
    got = asyncio.Event()

    async def gateway(client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            assert isinstance(msg.payload, bytes)
            r = parse_receipt(msg.payload)
            r.verify(HUB_KEY.public_key())
            if r.header.kind == "refused":
                refused.extend(r.refused())
                got.set()

    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
        await client.subscribe(topics.receipt(GW), qos=1)
        listener = asyncio.create_task(gateway(client))
        try:
            for run in range(2):  # the first worker, then one restarted on its database
                core = new_core(str(dbfile), window_ms=1000)
                hub = Hub(
                    core,
                    host=mosquitto.host,
                    port=mosquitto.port,
                    hub_key=HUB_KEY,
                    flush_interval_s=0.05,
                )
                hub_task = asyncio.create_task(hub.run())
                try:
                    await asyncio.wait_for(hub.subscribed.wait(), 20)
                    got.clear()
                    await client.publish(topics.batch(GW), batch(4, 7), qos=1)
                    await asyncio.wait_for(got.wait(), 20)
                finally:
                    while not hub_task.done():  # its reconnect loop can miss one cancellation
                        hub_task.cancel()
                        await asyncio.wait({hub_task}, timeout=1.0)
                    core.close()
                assert refused == [RefusedRange(4, 7, 7, "too_old")] * (run + 1)
                assert hub.results == {Outcome.TOO_OLD: 1}
        finally:
            listener.cancel()
            await asyncio.wait({listener})
    s = hub_stats(dbfile)
    assert s["rejected"] == {"too_old": 1}
    assert s["gateways"][GW]["refused_batches"] == 1


# ------------------------------------------------------------ a split stored once


def _original(epoch: int, seq: int) -> tuple[bytes, list[Reading]]:
    rs = [Reading(point=9, ts=T0 + 500_000 + 100 * seq + i, value=float(i)) for i in range(6)]
    return envelope.seal(rs, gateway=GW, key=KEY, epoch=epoch, seq=seq), rs


def _parts(rs: list[Reading], epoch: int, first: int, of: tuple[int, int]) -> list[bytes]:
    """The original's readings re-sealed as two batches naming it (agent.pipeline.batcher.reseal)."""
    halves = [rs[: len(rs) // 2], rs[len(rs) // 2 :]]
    return [
        envelope.seal(h, gateway=GW, key=KEY, epoch=epoch, seq=first + i, split_of=of)
        for i, h in enumerate(halves)
    ]


def _stored_readings(db: str) -> int:
    return int(hub_stats(db)["gateways"][GW]["readings"])


def _reading_rows(db: str) -> tuple[int, int]:
    """The readings table itself (GW's only): (rows, distinct stamps)."""
    q = "SELECT count(*), count(DISTINCT ts) FROM readings"
    if not db.startswith("postgresql://"):
        with contextlib.closing(open_readings(Path(db))) as con:
            rows, stamps = con.execute(q).fetchone()
            return int(rows), int(stamps)
    import psycopg

    with psycopg.connect(db) as pg:
        row = pg.execute(q).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])


@pytest.mark.parametrize(
    "order",
    ["original, notice, parts", "parts, notice, original", "original, parts, notice"],
)
def test_a_split_batch_is_stored_once_whatever_arrives_first(db: str, order: str) -> None:
    """Seq 1 (6 readings) could not pass and was re-sealed as seqs 3 and 4 (naming
    seq 1 in their headers), with a gap notice "split"; the broker delivered the
    original late, or not. Whatever came first is stored, the rest settled: the hub
    holds the 6 readings once, and accounts every seq."""
    core = new_core(db)
    t = topics.batch(GW)
    original, rs = _original(2, 1)
    parts = _parts(rs, 2, 3, of=(2, 1))
    try:
        for seq in (0, 2):
            core.handle(t, batch(2, seq))  # 3 readings each
        outcomes = []
        for step in order.split(", "):
            if step == "original":
                outcomes.append(core.handle(t, original))
            elif step == "notice":
                assert core.handle(topics.gap(GW), gap(2, 1, 1, "split", readings=6)) == "gap"
            else:
                outcomes.extend(core.handle(t, p) for p in parts)
        core.flush()
        first_stored = order.startswith("original")
        assert outcomes.count(Outcome.STORED) == (1 if first_stored else 2)
        assert outcomes.count(Outcome.DUPLICATE) == (2 if first_stored else 1)
        assert _stored_readings(db) == 2 * 3 + 6
        assert core.receipt(GW) == [EpochReceipt(2, 4)]
        g = hub_stats(db)["gateways"][GW]
        assert (g["missing_batches"], g["dropped_batches"]) == (0, 0)
        assert g["batches"] + g["split_batches"] == 5  # every seq, once
        # sent again, late: still once
        for again in (original, *parts):
            assert core.handle(t, again) == Outcome.DUPLICATE
        core.flush()
        assert _stored_readings(db) == 2 * 3 + 6
    finally:
        core.close()


@pytest.mark.parametrize("first", ["original", "parts"])
def test_a_split_is_stored_once_across_a_restart(db: str, first: str) -> None:
    """The hub restarts between the first arrival and the rest (no gap notice yet):
    what it stored, or the split a part named, is read back from the store."""
    core = new_core(db)
    t = topics.batch(GW)
    original, rs = _original(2, 1)
    parts = _parts(rs, 2, 3, of=(2, 1))
    earlier, later = ([original], parts) if first == "original" else (parts, [original])
    for data in earlier:
        assert core.handle(t, data) == Outcome.STORED
    core.close()
    again = new_core(db)
    try:
        for data in later:
            assert again.handle(t, data) == Outcome.DUPLICATE
        again.flush()
        assert _stored_readings(db) == 6
        assert hub_stats(db)["gateways"][GW]["missing_batches"] == 2  # 0 and 2 never came
    finally:
        again.close()


def test_a_part_and_its_original_at_two_workers_are_stored_once(db: str) -> None:
    """``--shared``: the original reaches worker A and a part worker B before either
    writes. B's part asks the store, which records the original split; A's claim of
    the original then fails (a duplicate across workers). And the other way: A's
    original written first, B's part finds it and is settled. The readings, once."""
    a = new_core(db, worker="a")  # type: ignore[arg-type]
    b = new_core(db, worker="b")  # type: ignore[arg-type]
    t = topics.batch(GW)
    try:
        original, rs = _original(2, 1)
        parts = _parts(rs, 2, 3, of=(2, 1))
        assert a.handle(t, original) == Outcome.STORED  # buffered, not written
        assert b.handle(t, parts[0]) == Outcome.STORED  # the store: the original is split
        a.flush()
        assert b.handle(t, parts[1]) == Outcome.STORED
        b.flush()
        assert a.counters["duplicates_across_workers"] == 1
        original, rs = _original(2, 10)
        parts = _parts(rs, 2, 11, of=(2, 10))
        assert a.handle(t, original) == Outcome.STORED
        a.flush()
        assert [b.handle(t, p) for p in parts] == [Outcome.DUPLICATE] * 2
        b.flush()
        assert _stored_readings(db) == 12
        assert _reading_rows(db) == (12, 12)
        g = hub_stats(db)["gateways"][GW]
        assert (g["batches"], g["split_batches"]) == (3, 3)  # seqs 3, 4, 10 and 1, 11, 12
    finally:
        a.close()
        b.close()


async def test_two_shared_workers_store_a_split_once_whatever_the_interleaving(
    mosquitto: MosquittoBroker, db: str
) -> None:
    """Two real workers on one database share the batch topic (``$share``); 40 batches
    that were split are published with their parts right behind them (half of them
    parts first), so the original and its parts land on both workers in the same
    flush. Each group's readings are stored once: the original's or its parts'."""
    pytest.importorskip("aiomqtt", reason="the hub needs aiomqtt (the hub extra)")
    import aiomqtt

    from hub.worker import Hub

    groups = 40
    wire: list[bytes] = []
    for i in range(groups):
        rs = [Reading(point=9, ts=T0 + 100 * i + j, value=float(j)) for j in range(6)]
        original = envelope.seal(rs, gateway=GW, key=KEY, epoch=2, seq=3 * i)
        parts = _parts(rs, 2, 3 * i + 1, of=(2, 3 * i))
        wire += [original, *parts] if i % 2 else [parts[0], original, parts[1]]
    cores = [new_core(db, worker=f"w{k}") for k in range(2)]  # type: ignore[arg-type]
    hubs = [
        Hub(c, host=mosquitto.host, port=mosquitto.port, shared=True, flush_interval_s=0.05)
        for c in cores
    ]
    tasks = [asyncio.create_task(h.run()) for h in hubs]
    try:
        for h in hubs:
            await asyncio.wait_for(h.subscribed.wait(), 20)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
            for data in wire:
                await client.publish(topics.batch(GW), data, qos=1)
        deadline = time.monotonic() + 30
        while sum(sum(h.results.values()) for h in hubs) < len(wire) or any(
            c.buffered for c in cores
        ):
            assert time.monotonic() < deadline, [h.results for h in hubs]
            await asyncio.sleep(0.05)
    finally:
        for task in tasks:
            while not task.done():  # its reconnect loop can miss one cancellation
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
        for c in cores:
            c.close()
    assert all(sum(h.results.values()) > 0 for h in hubs)  # both workers took a share
    g = hub_stats(db)["gateways"][GW]
    assert _stored_readings(db) == 6 * groups
    assert _reading_rows(db) == (6 * groups, 6 * groups)  # each reading once
    assert g["batches"] + g["split_batches"] == 3 * groups  # every seq settled
    assert g["missing_batches"] == 0


async def test_a_real_gateway_deletes_what_the_hub_refused_for_good(
    mosquitto_log: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real hub worker whose window is 1 s and a real gateway (spool, uplink) whose
    spool holds two batches of an hour ago, one with a clock not synchronised (never
    refused for its times) and one the hub cannot decode: the refusals are the hub's
    final word, signed; the gateway deletes them at once (no resend for a minute),
    one log line per reason, and `vitals status` and `vitals hub stats` agree."""
    pytest.importorskip("aiomqtt", reason="the hub needs aiomqtt (the hub extra)")
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from agent.cli.main import app
    from agent.ops.config import UplinkConfig
    from agent.ops.status import build_status
    from agent.pipeline.spool import Spool
    from agent.pipeline.uplink import Uplink
    from hub.worker import Hub

    dbfile = tmp_path / "hub.sqlite3"
    core = new_core(str(dbfile), window_ms=1000)
    hub = Hub(
        core,
        host=mosquitto_log.host,
        port=mosquitto_log.port,
        client_id="hub-refuse",
        hub_key=HUB_KEY,
        flush_interval_s=0.05,
    )
    old = [Reading(point=1, ts=T0 - 86_400_000, value=1.0)]
    wire = [
        batch(5, 0),  # an hour ago, clock synchronised: too old for this hub
        envelope.seal(old, gateway=GW, key=KEY, epoch=5, seq=1, unsynced=True),
        _undecodable(5, 2),
        batch(5, 3),
    ]
    spool = await Spool.open(tmp_path / "spool.sqlite3", durability="off")
    await spool.append([(5, seq, 3, T0, data) for seq, data in enumerate(wire)])
    settings = UplinkConfig(
        gateway=GW,
        host=mosquitto_log.host,
        port=mosquitto_log.port,
        backoff_min_s=0.05,
        backoff_max_s=0.2,
        heartbeat_s=0.5,
        confirm_timeout_s=60.0,  # nothing is sent twice in this test: the hub settles it
    )

    def sign_heartbeat(held: object) -> bytes:
        assert isinstance(held, list)
        return seal_heartbeat(
            KEY,
            GW,
            epoch=5,
            sealed=3,
            held=[HeldRange(*h) for h in held],
            t_ms=time.time_ns() // 10**6,
        )

    up = Uplink(
        settings,
        spool,
        gap_signer=lambda ranges: seal_gap(ranges, gateway=GW, key=KEY, epoch=5),
        hub_key=HUB_KEY.public_key().public_bytes_raw(),
        heartbeat=sign_heartbeat,
    )
    hub_task = asyncio.create_task(hub.run())
    try:
        await _hub_subscribed(mosquitto_log, "hub-refuse")
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(spool.run_acks()), tg.create_task(up.run())]
            try:
                await asyncio.wait_for(spool.empty.wait(), 30)
            finally:
                for task in tasks:
                    task.cancel()
    finally:
        while not hub_task.done():  # its reconnect loop can miss one cancellation
            hub_task.cancel()
            await asyncio.wait({hub_task}, timeout=1.0)
        core.close()
    assert (spool.refused_by_hub, spool.confirmed, spool.republished) == (3, 1, 0)
    lines = [r.getMessage() for r in caplog.records if "the hub refused" in r.getMessage()]
    assert {ln.split("(")[1].split(":")[0] for ln in lines} == {"too_old", "bad_payload"}
    assert len(lines) <= 3  # one per reason in each receipt of kind "refused"
    # vitals status says so
    stats = {"gateway": GW, "epoch": 5, "uptime_s": 1.0, "buses": {}}
    stats |= {"spool": spool.statistics(), "uplink": up.statistics()}
    agent = SimpleNamespace(
        statistics=lambda: stats,
        config=SimpleNamespace(
            source=tmp_path / "gw.toml", gateway=SimpleNamespace(state_dir=tmp_path)
        ),
    )
    (tmp_path / "status.json").write_text(json.dumps(build_status(agent)))
    r = CliRunner().invoke(
        app, ["status", "--status-file", str(tmp_path / "status.json")], env={"COLUMNS": "200"}
    )
    assert r.exit_code == 0, r.output
    assert "refused by the hub 3" in r.output
    await spool.close()
    # and the hub's stats: the same three refused, one stored, nothing missing
    g = hub_stats(dbfile)["gateways"][GW]
    assert (g["batches"], g["refused_batches"], g["missing_batches"]) == (1, 3, 0)
    assert core.counters["refusals_sent"] >= 1
