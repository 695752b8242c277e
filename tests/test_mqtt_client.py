"""The agent's MQTT client (agent/mqtt.py) against a real Mosquitto, and against fake
brokers on a loopback socket for what a real one will not do on demand (stay
silent, send garbage, never acknowledge)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

# the TLS broker (a CA, a server certificate for 127.0.0.1, mTLS) of test_tls
from test_tls import Pki, pki  # noqa: F401

from agent.config import TlsConfig
from agent.mqtt import MqttClient, MqttError
from agent.tls import tls_context
from protocols import mqtt
from protocols.errors import LocalError
from simulator.broker import HOST, MosquittoBroker, free_port, mosquitto_path

needs_mosquitto = pytest.mark.skipif(
    mosquitto_path() is None, reason="needs the mosquitto binary (apt-get install mosquitto)"
)


@pytest.fixture(autouse=True)
async def _every_failure_is_retrieved() -> AsyncIterator[None]:
    """No Future the client made is left with an exception nobody retrieved (asyncio would
    log "Future exception was never retrieved" when it is collected)."""
    loop = asyncio.get_running_loop()
    reports: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: reports.append(context))
    yield
    gc.collect()
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert not reports, reports


async def _take(client: MqttClient, n: int, within: float = 5.0) -> list[mqtt.Publish]:
    got: list[mqtt.Publish] = []
    async with asyncio.timeout(within):
        async for m in client.messages:
            got.append(m)
            if len(got) == n:
                break
    return got


async def _nothing(client: MqttClient, within: float) -> None:
    with pytest.raises(TimeoutError):
        await _take(client, 1, within)


# --------------------------------------------------------------------------- Mosquitto


@pytest.mark.mosquitto
async def test_qos1_publish_returns_on_puback(mosquitto: MosquittoBroker) -> None:
    async with (
        MqttClient(mosquitto.host, mosquitto.port, client_id="sub") as sub,
        MqttClient(mosquitto.host, mosquitto.port, client_id="pub") as pub,
    ):
        assert await sub.subscribe("t/#", qos=1) == 1
        await pub.publish("t/a", b"one", qos=1)
        assert pub.in_flight == 0 and pub.statistics()["acked"] == 1
        await pub.publish("t/b", b"two", qos=0, retain=False)
        got = await _take(sub, 2)
    assert [(m.topic, m.payload, m.qos) for m in got] == [("t/a", b"one", 1), ("t/b", b"two", 0)]
    assert got[0].packet_id != 0 and not got[0].retain


@pytest.mark.mosquitto
async def test_32_publishes_in_flight(mosquitto: MosquittoBroker) -> None:
    async with (
        MqttClient(mosquitto.host, mosquitto.port, client_id="sub") as sub,
        MqttClient(mosquitto.host, mosquitto.port, client_id="pub") as pub,
    ):
        await sub.subscribe("batch", qos=1)
        futs = [pub.publish_nowait("batch", b"%d" % i, qos=1) for i in range(32)]
        assert pub.in_flight == 32, "all 32 written before any PUBACK is read"
        assert len({id(f) for f in futs}) == 32 and not any(f.done() for f in futs)
        await asyncio.gather(*futs)
        assert pub.in_flight == 0
        # packet ids go round: many more than 65535 would reuse them; 200 more here
        for _ in range(5):
            await asyncio.gather(*[pub.publish_nowait("batch", b"x") for _ in range(40)])
        got = await _take(sub, 232)
    assert [m.payload for m in got[:32]] == [b"%d" % i for i in range(32)], "in order"


@pytest.mark.mosquitto
async def test_will_is_published_when_the_connection_drops(mosquitto: MosquittoBroker) -> None:
    will = ("gw/status", b"offline", 1, True)
    async with MqttClient(mosquitto.host, mosquitto.port, client_id="watcher") as watcher:
        await watcher.subscribe("gw/status", qos=1)
        # a clean exit sends DISCONNECT: no will
        async with MqttClient(mosquitto.host, mosquitto.port, client_id="gw", will=will) as gw:
            await gw.publish("gw/status", b"online", qos=1, retain=True)
        assert [m.payload for m in await _take(watcher, 1)] == [b"online"]
        await _nothing(watcher, 0.5)
        # the socket dies without DISCONNECT (a power cut, a modem gone): the will
        gw = MqttClient(mosquitto.host, mosquitto.port, client_id="gw", will=will)
        await gw.connect()
        assert gw._transport is not None
        gw._transport.abort()
        (m,) = await _take(watcher, 1)
        assert (m.topic, m.payload, m.qos) == ("gw/status", b"offline", 1)
        await gw.disconnect()
    # and it stays, retained, for whoever looks later
    async with MqttClient(mosquitto.host, mosquitto.port, client_id="later") as later:
        await later.subscribe("gw/status", qos=1)
        (m,) = await _take(later, 1)
    assert m.payload == b"offline" and m.retain


@pytest.mark.mosquitto
async def test_a_clean_stop_says_its_farewell_retained(mosquitto: MosquittoBroker) -> None:
    """DISCONNECT drops the will: the farewell leaves "offline" retained anyway."""
    will = ("gw/status", b"offline", 1, True)
    async with MqttClient(
        mosquitto.host, mosquitto.port, client_id="gw", will=will, farewell=will
    ) as gw:
        await gw.publish("gw/status", b"online", qos=1, retain=True)
    async with MqttClient(mosquitto.host, mosquitto.port, client_id="later") as later:
        await later.subscribe("gw/status", qos=1)
        (m,) = await _take(later, 1)
    assert (m.payload, m.retain) == (b"offline", True)


@pytest.mark.mosquitto
async def test_subscription_delivery_and_filters(mosquitto: MosquittoBroker) -> None:
    async with (
        MqttClient(mosquitto.host, mosquitto.port, client_id="gw") as gw,
        MqttClient(mosquitto.host, mosquitto.port, client_id="hub") as hub,
    ):
        assert await gw.subscribe("vitals/v1/gw-1/cmd", qos=1) == 1
        assert await gw.subscribe("vitals/v1/+/broadcast", qos=0) == 0
        await hub.publish("vitals/v1/gw-1/cmd", b"\x01\x02", qos=1)
        await hub.publish("vitals/v1/gw-2/cmd", b"not ours", qos=1)
        await hub.publish("vitals/v1/all/broadcast", b"hello", qos=1)  # granted QoS 0
        got = await _take(gw, 2)
        await _nothing(gw, 0.3)
    assert [(m.topic, m.payload, m.qos) for m in got] == [
        ("vitals/v1/gw-1/cmd", b"\x01\x02", 1),
        ("vitals/v1/all/broadcast", b"hello", 0),
    ]
    assert mqtt.topic_matches("vitals/v1/+/broadcast", got[1].topic)


@pytest.mark.mosquitto
async def test_messages_end_on_disconnect(mosquitto: MosquittoBroker) -> None:
    client = MqttClient(mosquitto.host, mosquitto.port, client_id="c")
    await client.connect()

    async def consume() -> list[mqtt.Publish]:
        return [m async for m in client.messages]

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    await client.disconnect()
    assert await asyncio.wait_for(task, 2) == []
    with pytest.raises(MqttError, match="the client disconnected"):
        await client.publish("t", b"")


@needs_mosquitto
@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="needs mosquitto_passwd")
async def test_bad_credentials_are_refused_with_the_reason(tmp_path: Path) -> None:
    pw = tmp_path / "passwd"
    pw.touch(mode=0o600)
    cmd = ["mosquitto_passwd", "-b", str(pw), "gw-1", "right"]
    await asyncio.to_thread(subprocess.run, cmd, check=True)
    extra = ("user root\n" if os.geteuid() == 0 else "") + (
        f"password_file {pw}\nallow_anonymous false\n"
    )
    broker = MosquittoBroker(extra_config=extra)
    await broker.start()
    try:
        async with MqttClient(
            broker.host, broker.port, client_id="gw-1", username="gw-1", password="right"
        ) as c:
            await c.publish("t", b"in", qos=1)
        for user, password in [("gw-1", "wrong"), (None, None)]:
            with pytest.raises(MqttError) as info:
                async with MqttClient(
                    broker.host, broker.port, client_id="gw-1", username=user, password=password
                ):
                    pass
            assert info.value.return_code == 5 and info.value.reason == "not authorized"
            assert "refused the connection: not authorized (CONNACK return code 5)" in str(
                info.value
            )
    finally:
        await broker.stop()


@pytest.mark.mosquitto
async def test_broker_killed_mid_flight_fails_every_pending_publish_at_once(
    mosquitto: MosquittoBroker,
) -> None:
    proc = mosquitto._proc
    assert proc is not None
    client = MqttClient(mosquitto.host, mosquitto.port, client_id="gw", keepalive=60)
    await client.connect()
    proc.send_signal(signal.SIGSTOP)  # frozen: nothing is acknowledged any more
    futs = [client.publish_nowait("batch", b"x" * 700) for _ in range(32)]
    messages = asyncio.create_task(anext(aiter(client.messages)))
    await asyncio.sleep(0.2)
    assert not any(f.done() for f in futs)
    t0 = time.monotonic()
    proc.kill()  # the kernel closes its sockets
    done, _ = await asyncio.wait(futs, timeout=2.0)
    elapsed = time.monotonic() - t0
    assert len(done) == 32 and elapsed < 1.0, f"{len(done)} failed in {elapsed:.2f} s"
    for f in futs:
        with pytest.raises(MqttError, match="lost"):
            f.result()
    with pytest.raises(MqttError, match="lost"):
        await messages  # a reader learns it too
    with pytest.raises(MqttError, match="lost"):
        client.publish_nowait("batch", b"late")
    await client.disconnect()


@pytest.mark.mosquitto
async def test_keepalive_pings_an_idle_connection(mosquitto: MosquittoBroker) -> None:
    async with MqttClient(mosquitto.host, mosquitto.port, client_id="idle", keepalive=1) as c:
        await asyncio.sleep(2.5)
        assert c.connected and c.statistics()["pings"] >= 2
        await c.publish("t", b"still here", qos=1)


async def test_refused_port_is_an_mqtt_error() -> None:
    with pytest.raises(MqttError, match=f"cannot connect to {HOST}:"):
        async with MqttClient(HOST, free_port(), client_id="c"):
            pass


def test_misuse_is_local() -> None:
    with pytest.raises(LocalError, match="password only with a user name"):
        MqttClient(HOST, 1, client_id="c", password="p")
    with pytest.raises(LocalError, match="wildcard"):
        MqttClient(HOST, 1, client_id="c", will=("a/#", b"", 0, False))


@pytest.mark.mosquitto
async def test_misuse_leaves_the_connection_alone(mosquitto: MosquittoBroker) -> None:
    async with MqttClient(mosquitto.host, mosquitto.port, client_id="c") as c:
        with pytest.raises(LocalError, match="wildcard"):
            c.publish_nowait("a/+", b"")
        with pytest.raises(LocalError, match="QoS 0 or 1"):
            await c.subscribe("a", qos=2)
        with pytest.raises(LocalError, match="whole level"):
            await c.subscribe("a+", qos=1)
        await c.publish("a", b"fine", qos=1)
        assert c.connected


# --------------------------------------------------------------------------- TLS


@needs_mosquitto
async def test_tls_with_the_right_ca_and_mutual_tls(pki: Pki) -> None:  # noqa: F811
    ctx = tls_context(TlsConfig(enabled=True, ca_file=pki.ca))
    async with MqttClient(HOST, pki.tls_port, client_id="gw-tls-1", tls=ctx) as c:
        await c.subscribe("gw/tls", qos=1)
        await c.publish("gw/tls", b"over TLS", qos=1)
        assert [m.payload for m in await _take(c, 1)] == [b"over TLS"]
    mtls = tls_context(
        TlsConfig(enabled=True, ca_file=pki.ca, cert_file=pki.client_crt, key_file=pki.client_key)
    )
    async with MqttClient(HOST, pki.mtls_port, client_id="gw-tls-1", tls=mtls) as c:
        await c.publish("gw/tls", b"mutual", qos=1)


@needs_mosquitto
async def test_tls_with_the_wrong_ca_is_refused(pki: Pki) -> None:  # noqa: F811
    ctx = tls_context(TlsConfig(enabled=True, ca_file=pki.wrong_ca))
    with pytest.raises(MqttError, match="certificate verify failed"):
        async with MqttClient(HOST, pki.tls_port, client_id="gw-tls-1", tls=ctx):
            pass


# --------------------------------------------------------------------------- fake brokers

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_packet(reader: asyncio.StreamReader) -> bytes:
    """One whole MQTT packet from a client (fixed header included)."""
    first = await reader.readexactly(1)
    length, shift, header = 0, 0, first
    while True:
        b = await reader.readexactly(1)
        header += b
        length |= (b[0] & 0x7F) << shift
        shift += 7
        if not b[0] & 0x80:
            break
    return header + await reader.readexactly(length)


@contextlib.asynccontextmanager
async def _fake_broker(script: Script) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A server on a loopback port running ``script`` for each connection; yields
    the port and the packets the script recorded."""
    seen: list[bytes] = []
    handlers: list[asyncio.Task[None]] = []
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)  # type: ignore[arg-type]
        writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await script(reader, writer)

    server = await asyncio.start_server(handle, HOST, 0)
    try:
        yield server.sockets[0].getsockname()[1], seen
    finally:
        # the client has closed: let each script see the end of its stream, then stop
        if handlers:
            await asyncio.wait(handlers, timeout=2.0)
        for t in handlers:
            t.cancel()
        for w in writers:
            w.close()
        server.close()
        await server.wait_closed()


def _publish_id(packet: bytes) -> bytes:
    """The packet id of a QoS 1 PUBLISH packet, as its two bytes."""
    i = 1
    while packet[i] & 0x80:  # the Remaining Length
        i += 1
    at = i + 1 + 2 + int.from_bytes(packet[i + 1 : i + 3], "big")  # after the topic
    return packet[at : at + 2]


def _accept(seen: list[bytes], then: bytes = b"", *, hold: bool = True) -> Script:
    """Read CONNECT, answer CONNACK 0 and ``then``, record every later packet."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await _read_packet(reader))
        writer.write(b"\x20\x02\x00\x00" + then)
        while hold:
            seen.append(await _read_packet(reader))

    return script


async def test_refused_connack_names_the_reason() -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_packet(reader)
        writer.write(b"\x20\x02\x00\x04")  # bad user name or password

    async with _fake_broker(refuse) as (port, _):
        with pytest.raises(MqttError, match=r"bad user name or password \(CONNACK return code 4\)"):
            async with MqttClient(HOST, port, client_id="c", username="u", password="p"):
                pass


async def test_keepalive_against_a_silent_server() -> None:
    """CONNACK, then silence (PINGREQ unanswered): dead within 1.5 keepalives."""
    seen: list[bytes] = []
    async with (
        _fake_broker(_accept(seen)) as (port, _),
        MqttClient(HOST, port, client_id="c", keepalive=1) as c,
    ):
        t0 = time.monotonic()
        with pytest.raises(MqttError, match=r"silent for 1\.\d s \(keepalive 1 s\)"):
            await _take(c, 1, within=5)
        elapsed = time.monotonic() - t0
    assert 1.4 <= elapsed <= 2.2, elapsed
    assert mqtt.encode_pingreq() in seen, "a PINGREQ went out after 1 s idle"
    assert seen[0][:1] == b"\x10", "the first packet is CONNECT"


async def test_a_server_that_never_answers_connect_times_out() -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up

    async with _fake_broker(mute) as (port, _):
        t0 = time.monotonic()
        with pytest.raises(MqttError, match=r"no CONNACK from .* within 0\.3 s"):
            async with MqttClient(HOST, port, client_id="c", connect_timeout=0.3):
                pass
        assert time.monotonic() - t0 < 1.0


async def test_unacknowledged_publishes_time_out() -> None:
    seen: list[bytes] = []
    async with (
        _fake_broker(_accept(seen)) as (port, _),
        MqttClient(HOST, port, client_id="c", ack_timeout=0.4, keepalive=60) as c,
    ):
        t0 = time.monotonic()
        with pytest.raises(MqttError, match=r"no acknowledgement .* within 0\.4 s"):
            await c.publish("t", b"x", qos=1)
        assert 0.35 <= time.monotonic() - t0 < 1.0
    assert seen[1][:1] == b"\x32"


async def test_malformed_packet_from_the_broker() -> None:
    seen: list[bytes] = []
    async with (
        _fake_broker(_accept(seen, b"\x00\x00")) as (port, _),
        MqttClient(HOST, port, client_id="c") as c,
    ):
        with pytest.raises(MqttError, match=r"malformed packet .* unknown packet type 0"):
            await _take(c, 1)
        with pytest.raises(MqttError, match="malformed"):
            await c.publish("t", b"x")


async def test_a_puback_arriving_before_connack_is_a_protocol_error() -> None:
    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_packet(reader)
        writer.write(b"\x40\x02\x00\x01")
        await reader.read()

    async with _fake_broker(early) as (port, _):
        with pytest.raises(MqttError, match="PubAck before CONNACK"):
            await MqttClient(HOST, port, client_id="c").connect()


async def test_refused_subscription_raises_and_the_connection_stays() -> None:
    async def refuse_sub(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_packet(reader)
        writer.write(b"\x20\x02\x00\x00")
        sub = await _read_packet(reader)
        writer.write(b"\x90\x03" + sub[2:4] + b"\x80")  # same packet id, failure
        pub = await _read_packet(reader)
        writer.write(b"\x40\x02" + _publish_id(pub))
        await reader.read()

    async with (
        _fake_broker(refuse_sub) as (port, _),
        MqttClient(HOST, port, client_id="c") as c,
    ):
        with pytest.raises(MqttError, match=r"refused the subscription to 'secret/#'"):
            await c.subscribe("secret/#", qos=1)
        assert c.connected
        await asyncio.wait_for(c.publish("t/x", b"", qos=1), 2)


async def test_inbound_qos1_is_acknowledged_once_queued() -> None:
    seen: list[bytes] = []
    inbound = mqtt.encode_publish("gw/cmd", b"do it", qos=1, packet_id=5)
    async with (
        _fake_broker(_accept(seen, inbound)) as (port, _),
        MqttClient(HOST, port, client_id="c") as c,
    ):
        (m,) = await _take(c, 1)
        assert (m.topic, m.payload, m.qos, m.packet_id) == ("gw/cmd", b"do it", 1, 5)
        for _ in range(100):
            if len(seen) >= 2:
                break
            await asyncio.sleep(0.01)
    assert seen[1] == b"\x40\x02\x00\x05"
    assert seen[-1] == b"\xe0\x00", "a clean exit ends with DISCONNECT"


async def test_a_qos2_message_is_refused() -> None:
    seen: list[bytes] = []
    inbound = b"\x34\x05\x00\x01t\x00\x01"
    async with (
        _fake_broker(_accept(seen, inbound)) as (port, _),
        MqttClient(HOST, port, client_id="c") as c,
    ):
        with pytest.raises(MqttError, match="QoS 2"):
            await _take(c, 1)


async def test_messages_nobody_takes_are_dropped_counted_and_acknowledged() -> None:
    seen: list[bytes] = []
    drops: list[tuple[str, str, int]] = []
    many = b"".join(mqtt.encode_publish("t", b"%d" % i, qos=1, packet_id=i + 1) for i in range(10))
    big = mqtt.encode_publish("t", b"x" * 5000, qos=1, packet_id=99)
    async with (
        _fake_broker(_accept(seen, many + big)) as (port, _),
        MqttClient(
            HOST,
            port,
            client_id="c",
            max_queued_messages=4,
            max_message_size=4096,
            on_drop=lambda *a: drops.append(a),
        ) as c,
    ):
        for _ in range(200):
            if len(seen) >= 12:
                break
            await asyncio.sleep(0.01)
        got = await _take(c, 4)
        assert c.counters["received"] == 4
        assert (c.counters["overflow"], c.counters["oversized"]) == (6, 1)
    assert [m.payload for m in got] == [b"%d" % i for i in range(4)]
    assert drops == [("overflow", "t", 1)] * 6 + [("oversized", "t", 5000)]
    # every one acknowledged, dropped or not: the broker's window to us stays open
    assert seen[1:12] == [b"\x40\x02" + i.to_bytes(2, "big") for i in [*range(1, 11), 99]]


@pytest.mark.mosquitto
async def test_a_flood_nobody_takes_never_holds_back_our_pubacks(
    mosquitto: MosquittoBroker,
) -> None:
    """The consumer of the messages awaits a QoS 1 publish of its own for each, while a
    flood (small and 900 KB messages) arrives faster than it takes them. When the client
    stopped reading the socket with its queue full, that PUBACK could never arrive: the
    consumer waited forever and the connection was declared dead (issue 19)."""
    import aiomqtt

    drops: list[str] = []
    async with MqttClient(
        mosquitto.host,
        mosquitto.port,
        client_id="gw",
        max_queued_messages=8,
        max_message_size=4096,
        on_drop=lambda why, *_: drops.append(why),
    ) as c:
        await c.subscribe("gw/cmd", qos=1)
        answered = 0

        async def consume() -> None:
            nonlocal answered
            async for _ in c.messages:
                await c.publish("gw/result", b"r", qos=1)
                answered += 1

        consumer = asyncio.create_task(consume())
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="flood") as f:
            for i in range(600):  # QoS 0 is the quickest flood; the large ones at QoS 1
                big = i % 50 == 0
                payload = b"y" * 900_000 if big else os.urandom(200)
                await f.publish("gw/cmd", payload, qos=1 if big else 0)
        for _ in range(500):
            if c.counters["received"] == answered and c.in_flight == 0 and answered:
                break
            await asyncio.sleep(0.02)
        await asyncio.wait_for(c.publish("gw/after", b"ok", qos=1), 5)
        consumer.cancel()
        assert c.connected
        assert answered == c.counters["received"] > 0
        assert c.counters["received"] + c.counters["overflow"] == 588
        assert c.counters["oversized"] == 12 == drops.count("oversized")
        assert c.counters["overflow"] == drops.count("overflow")


async def test_flow_control_pauses_writes_and_drains() -> None:
    """A broker that does not read: the kernel's buffers fill, then the transport's;
    ``writing_paused`` says so and ``drain`` returns once the broker reads again."""
    reading = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_packet(reader)
        writer.write(b"\x20\x02\x00\x00")
        await reading.wait()
        while True:
            packet = await _read_packet(reader)
            writer.write(b"\x40\x02" + _publish_id(packet))

    async with _fake_broker(slow) as (port, _), MqttClient(HOST, port, client_id="c") as c:
        assert c._transport is not None
        c._transport.set_write_buffer_limits(high=65536)
        futs = [c.publish_nowait("t", b"x" * (1 << 20)) for _ in range(16)]
        assert c.writing_paused, "16 MiB to a broker that does not read"
        drained = asyncio.create_task(c.drain())
        await asyncio.sleep(0.1)
        assert not drained.done()
        reading.set()
        await asyncio.wait_for(drained, 10)
        assert not c.writing_paused
        await asyncio.wait_for(asyncio.gather(*futs), 10)
        await asyncio.wait_for(c.publish("t", b"after", qos=1), 5)
