"""The uplink against a real Mosquitto: backlog and live shares, gap notices,
an unreachable broker at start."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from pathlib import Path

import aiomqtt
import pytest

from agent.ops.config import UplinkConfig
from agent.pipeline.spool import Spool
from agent.pipeline.uplink import Uplink, gap_topic
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
        UplinkConfig(
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
    up = Uplink(UplinkConfig(gateway=GW, port=port, backoff_min_s=0.05, backoff_max_s=0.2), spool)
    broker = MosquittoBroker(port)
    got: list[tuple[str, bytes]] = []
    ready = asyncio.Event()
    with caplog.at_level(logging.INFO, logger="agent.pipeline.uplink"):
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
    # max_bytes bounds the spool's files on disk: six batches of ~200 kB are over 1 MiB
    spool = await Spool.open(tmp_path / "s.sqlite3", durability="off", max_bytes=1 << 20)
    rng = random.Random(3)
    for s in range(6):  # the oldest are dropped
        data = envelope.seal(
            [Reading(p, 1000 + s, rng.random()) for p in range(20_000)],
            gateway=GW,
            key=KEY,
            epoch=1,
            seq=s,
        )
        await spool.append([(1, s, 20_000, 1000 + s, data)])
    assert spool.has_gaps
    dropped = spool.statistics()["dropped_batches"]
    assert 1 <= dropped < 6

    def sign(ranges: object) -> bytes:
        return seal_gap(list(ranges), gateway=GW, key=KEY, epoch=2)  # type: ignore[call-overload]

    up = Uplink(
        UplinkConfig(gateway=GW, host=mosquitto.host, port=mosquitto.port), spool, gap_signer=sign
    )
    got: list[tuple[str, bytes]] = []
    ready = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        listener = tg.create_task(_listen(mosquitto, got, ready))
        await ready.wait()
        task = tg.create_task(up.run())
        await _until(lambda: up.gap_notices == 1 and len(_seqs(got)) == 6 - dropped)
        task.cancel()
        listener.cancel()
    notices = [p for t, p in got if t == gap_topic(GW)]
    assert len(notices) == 1
    g = parse_gap(notices[0])
    g.verify(KEY.public_key())
    named = [(r.epoch, s, r.reason) for r in g.ranges() for s in range(r.first, r.last + 1)]
    assert named == [(1, s, "spool_full") for s in range(dropped)]
    assert sorted(_seqs(got)) == [(1, s) for s in range(dropped, 6)]
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
    settings = UplinkConfig(
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


# ---------------------------------------------------------------- failures that last


async def _run_until(up: Uplink, cond: object, within: float = 20.0) -> None:
    task = asyncio.create_task(up.run())
    try:
        await _until(cond, within)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _ours(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "agent.pipeline.uplink"]


def _quick(**kw: object) -> UplinkConfig:
    """Settings that retry and re-warn within a fraction of a second."""
    base: dict[str, object] = dict(
        gateway=GW, backoff_min_s=0.02, backoff_max_s=0.05, warn_after_s=0.3, warn_every_s=0.6
    )
    return UplinkConfig(**{**base, **kw})  # type: ignore[arg-type]


async def test_an_untrusted_broker_certificate_reaches_warning_at_once_and_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real Mosquitto with TLS; the gateway trusts another CA (install.md §7:
    `journalctl -p warning` must show it)."""
    if not mosquitto_path():
        pytest.skip("needs the mosquitto binary (apt-get install mosquitto)")
    from test_tls import _ca, _leaf  # the certificates of the TLS tests

    from agent.ops.config import TlsConfig
    from agent.ops.tls import tls_context

    ca = _ca(tmp_path, "vitals-test-ca")
    wrong = _ca(tmp_path, "attacker-ca")
    crt, key = _leaf(tmp_path, "broker", ca, server=True)
    tls_port = free_port()
    extra = ("user root\n" if os.geteuid() == 0 else "") + (
        f"listener {tls_port} 127.0.0.1\ncafile {ca[2]}\ncertfile {crt}\nkeyfile {key}\n"
    )
    broker = MosquittoBroker(extra_config=extra)
    await broker.start()
    spool = await Spool.open(tmp_path / "s.sqlite3", durability="off")
    await spool.append([_row(1, 0)])
    ctx = tls_context(TlsConfig(enabled=True, ca_file=wrong[2]))
    up = Uplink(_quick(host="127.0.0.1", port=tls_port), spool, tls=ctx)
    try:
        with caplog.at_level(logging.INFO, logger="agent.pipeline.uplink"):
            await _run_until(
                up,
                lambda: len([r for r in _ours(caplog) if "still cannot" in r.getMessage()]) >= 2,
            )
    finally:
        await broker.stop()
        await spool.close()
    records = _ours(caplog)
    first = records[0]
    assert first.levelno == logging.WARNING, "the first failure of a kind that lasts"
    assert "cannot be verified" in first.getMessage()
    assert "hint: set [uplink.tls] ca_file" in first.getMessage()
    again = [r for r in records if "still cannot" in r.getMessage()]
    assert all(r.levelno == logging.WARNING for r in again)
    assert "1 batches waiting" in again[0].getMessage()
    # counted, and re-logged with back-off, not at every attempt
    assert up.connect_failures > len(records) >= 3
    assert not any("Errno" in r.getMessage() for r in records)
    stats = up.statistics()
    assert "cannot be verified" in str(stats["last_error"]) and stats["last_hint"]


async def test_a_name_that_does_not_resolve_warns_with_a_hint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = await Spool.open(tmp_path / "s.sqlite3", durability="off")
    up = Uplink(_quick(host="broker.nosuch.invalid", port=1883), spool)
    with caplog.at_level(logging.INFO, logger="agent.pipeline.uplink"):
        await _run_until(up, lambda: up.connect_failures >= 2)
    await spool.close()
    first = _ours(caplog)[0]
    assert first.levelno == logging.WARNING
    assert "cannot resolve the broker's name 'broker.nosuch.invalid'" in first.getMessage()
    assert "hint: check [uplink] host" in first.getMessage()


async def test_refused_credentials_warn_with_a_hint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker on a real socket that answers CONNECT with return code 5 (not authorised)."""

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # CONNECT
        writer.write(bytes([0x20, 0x02, 0x00, 0x05]))  # CONNACK, not authorised
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    spool = await Spool.open(tmp_path / "s.sqlite3", durability="off")
    up = Uplink(_quick(port=port), spool)
    try:
        with caplog.at_level(logging.INFO, logger="agent.pipeline.uplink"):
            await _run_until(up, lambda: up.connect_failures >= 2)
    finally:
        server.close()
        await server.wait_closed()
        await spool.close()
    first = _ours(caplog)[0]
    assert first.levelno == logging.WARNING
    assert "refused our credentials: not authorized" in first.getMessage()
    assert "hint: check [uplink] username and password" in first.getMessage()


async def test_a_broker_down_for_long_reaches_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not up at boot is normal (INFO); still not up after warn_after_s is a WARNING."""
    spool = await Spool.open(tmp_path / "s.sqlite3", durability="off")
    up = Uplink(_quick(port=free_port()), spool)
    with caplog.at_level(logging.INFO, logger="agent.pipeline.uplink"):
        await _run_until(
            up, lambda: any(r.levelno == logging.WARNING for r in _ours(caplog)), within=10
        )
    await spool.close()
    records = _ours(caplog)
    assert records[0].levelno == logging.INFO and "not reachable yet" in records[0].getMessage()
    warning = next(r for r in records if r.levelno == logging.WARNING).getMessage()
    assert "still cannot connect" in warning and "connection refused" in warning
    assert "hint: is the broker running" in warning
    assert not any("Errno" in r.getMessage() for r in records)
