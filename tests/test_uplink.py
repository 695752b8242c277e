"""The uplink against a real Mosquitto: backlog and live shares, gap notices,
an unreachable broker at start."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import aiomqtt
import pytest

from agent.spool import Spool
from agent.uplink import Uplink, UplinkSettings, gap_topic
from protocols import envelope, topics
from protocols.ed25519 import PrivateKey
from protocols.gap import parse_gap, seal_gap
from protocols.reading import Reading
from simulator.broker import MosquittoBroker, free_port, mosquitto_path

pytestmark = pytest.mark.mosquitto

GW = "gw-up-1"
KEY = PrivateKey.from_private_bytes(bytes(range(1, 33)))


def _row(epoch: int, seq: int) -> tuple[int, int, int, int, bytes]:
    data = envelope.seal(
        [Reading(0, 1000 + seq, float(seq))], gateway=GW, key=KEY, epoch=epoch, seq=seq
    )
    return (epoch, seq, 1, 1000 + seq, data)


async def _listen(
    broker: MosquittoBroker, got: list[tuple[str, bytes]], ready: asyncio.Event
) -> None:
    async with aiomqtt.Client(broker.host, broker.port, identifier="listener") as c:
        await c.subscribe(f"{topics.DEFAULT_PREFIX}/{GW}/#", qos=1)
        ready.set()
        async for m in c.messages:
            assert isinstance(m.payload, bytes)
            got.append((str(m.topic), m.payload))


def _seqs(got: list[tuple[str, bytes]]) -> list[tuple[int, int]]:
    out = []
    for t, p in got:
        if t.endswith("/batch"):
            h = envelope.parse(p).header
            out.append((h.epoch, h.seq))
    return out


async def _until(cond: object, within: float = 20.0) -> None:
    assert callable(cond)
    for _ in range(int(within / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_backlog_oldest_first_while_live_batches_get_their_share(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    spool = await Spool.open(tmp_path / "s.sqlite3", durability="off")
    await spool.append([_row(1, s) for s in range(400)])  # the backlog of an outage
    got: list[tuple[str, bytes]] = []
    ready = asyncio.Event()
    up = Uplink(
        UplinkSettings(
            gateway=GW, host=mosquitto.host, port=mosquitto.port, window=1, backlog_share=0.5
        ),
        spool,
    )
    async with asyncio.TaskGroup() as tg:
        listener = tg.create_task(_listen(mosquitto, got, ready))
        await ready.wait()
        acks = tg.create_task(spool.run_acks())
        task = tg.create_task(up.run())
        await up.connected.wait()
        for s in range(20):  # live batches of the new epoch while the backlog drains
            await spool.append([_row(2, s)])
        await _until(lambda: len(_seqs(got)) >= 420)
        task.cancel()
        acks.cancel()
        listener.cancel()
    seqs = _seqs(got)
    backlog = [s for e, s in seqs if e == 1]
    live = [s for e, s in seqs if e == 2]
    assert backlog == list(range(400)), "backlog oldest first, each once"
    assert live == list(range(20))
    # live batches did not wait for the whole backlog: the last one went out
    # while at least a third of the backlog was still to come
    last_live = seqs.index((2, 19))
    assert last_live < 400 * 2 / 3 + 20
    assert up.statistics()["live_batches_sent"] == 20
    assert spool.empty.is_set()
    await spool.close()


async def test_unreachable_broker_at_start_is_normal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if not mosquitto_path():
        pytest.skip("needs mosquitto")
    port = free_port()
    spool = await Spool.open(tmp_path / "s.sqlite3", durability="off")
    await spool.append([_row(1, s) for s in range(5)])
    up = Uplink(UplinkSettings(gateway=GW, port=port, backoff_min_s=0.05, backoff_max_s=0.2), spool)
    broker = MosquittoBroker(port)
    got: list[tuple[str, bytes]] = []
    ready = asyncio.Event()
    with caplog.at_level(logging.INFO, logger="agent.uplink"):
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(up.run())
            await _until(lambda: up.connect_failures >= 3)
            assert not up.connected.is_set()
            await broker.start()
            try:
                listener = tg.create_task(_listen(broker, got, ready))
                await ready.wait()
                await up.connected.wait()
                # batches the listener missed stay acknowledged: resend them for it
                await _until(lambda: spool.empty.is_set())
                await spool.append([_row(1, 5)])
                await _until(lambda: (1, 5) in _seqs(got))
            finally:
                task.cancel()
                listener.cancel()
                await broker.stop()
    first = [r for r in caplog.records if "not reachable yet" in r.getMessage()]
    assert len(first) == 1 and first[0].levelno == logging.INFO
    # ours: no warning, no error (aiomqtt 2.5 may log an asyncio "add_writer ... Bad file
    # descriptor" callback error of its own when a connect races a closing socket)
    assert not [
        r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("agent")
    ]
    await spool.close()


async def test_dropped_batches_reach_the_hub_as_a_signed_gap_notice(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    spool = await Spool.open(
        tmp_path / "s.sqlite3", durability="off", max_bytes=len(_row(1, 0)[4]) * 7 // 2
    )
    await spool.append([_row(1, s) for s in range(6)])  # the three oldest are dropped
    assert spool.has_gaps

    def sign(ranges: object) -> bytes:
        return seal_gap(list(ranges), gateway=GW, key=KEY, epoch=2)  # type: ignore[call-overload]

    up = Uplink(
        UplinkSettings(gateway=GW, host=mosquitto.host, port=mosquitto.port), spool, gap_signer=sign
    )
    got: list[tuple[str, bytes]] = []
    ready = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        listener = tg.create_task(_listen(mosquitto, got, ready))
        await ready.wait()
        task = tg.create_task(up.run())
        await _until(lambda: up.gap_notices == 1 and len(_seqs(got)) == 3)
        task.cancel()
        listener.cancel()
    notices = [p for t, p in got if t == gap_topic(GW)]
    assert len(notices) == 1
    g = parse_gap(notices[0])
    g.verify(KEY.public_key())
    assert [(r.epoch, r.first, r.last, r.reason) for r in g.ranges()] == [(1, 0, 2, "spool_full")]
    assert sorted(_seqs(got)) == [(1, 3), (1, 4), (1, 5)]
    assert not spool.has_gaps
    await spool.close()


async def test_a_broker_that_accepts_tcp_but_never_answers_connect_is_retried(
    tmp_path: Path,
) -> None:
    """A NAT, proxy or wedged broker that takes the TCP connection and says nothing
    must not hold the uplink for the publish timeout: it gives up and backs off."""
    held: list[asyncio.StreamWriter] = []

    async def mute(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accept, keep open, never send CONNACK

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    spool = await Spool.open(tmp_path / "s.sqlite3", durability="off")
    settings = UplinkSettings(
        gateway=GW,
        port=port,
        connect_timeout_s=0.3,
        publish_timeout_s=60.0,
        backoff_min_s=0.05,
        backoff_max_s=0.1,
    )
    up = Uplink(settings, spool)
    task = asyncio.create_task(up.run())
    try:
        await _until(lambda: up.connect_failures >= 3)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()
        await spool.close()
    assert len(held) >= 3, "each attempt opened a new connection"
    assert not up.connected.is_set()
