"""The agent's MQTT adapter on aiomqtt (agent/mqtt.py): its promises, against a real
Mosquitto (MQTT 5), the embedded amqtt broker (3.1.1 only) and a listener that never
answers.

- every waiting publish fails at once when the connection drops (a Mosquitto killed
  mid-publish), none waits for a timeout of its own;
- in-flight publishes are bounded (``max_in_flight``), the rest wait in order;
- MQTT 5 where the broker speaks it, 3.1.1 where it does not, silently;
- the broker's Maximum Packet Size (MQTT 5 CONNACK) is known before sending;
- our close (``MqttClosed``, a LocalError) is not their fault (``MqttError``).
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

# the TLS broker (a CA, a server certificate for 127.0.0.1, mTLS) of test_tls
from test_tls import Pki, pki  # noqa: F401

from agent.mqtt import Message, MqttClient, MqttClosed, MqttError, MqttRefused, topic_matches
from agent.ops.config import TlsConfig
from agent.ops.tls import tls_context
from protocols.errors import LocalError, RemoteError
from simulator.broker import HOST, EmbeddedBroker, MosquittoBroker, free_port, mosquitto_path

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


async def _take(client: MqttClient, n: int, within: float = 5.0) -> list[Message]:
    got: list[Message] = []
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
async def test_mqtt5_with_mosquitto_and_qos1_returns_on_puback(
    mosquitto: MosquittoBroker,
) -> None:
    async with (
        MqttClient(mosquitto.host, mosquitto.port, client_id="sub") as sub,
        MqttClient(mosquitto.host, mosquitto.port, client_id="pub") as pub,
    ):
        assert pub.protocol == 5 and pub.max_packet_size is None
        assert await sub.subscribe("t/#", qos=1) == 1
        await pub.publish("t/a", b"one", qos=1)
        assert pub.in_flight == 0 and pub.statistics()["acked"] == 1
        await pub.publish("t/b", b"two", qos=0, retain=False)
        got = await _take(sub, 2)
    assert got == [Message("t/a", b"one", 1, False), Message("t/b", b"two", 0, False)]


@pytest.mark.mosquitto
async def test_in_flight_is_bounded_and_the_rest_go_in_order(mosquitto: MosquittoBroker) -> None:
    async with (
        MqttClient(mosquitto.host, mosquitto.port, client_id="sub") as sub,
        MqttClient(mosquitto.host, mosquitto.port, client_id="pub", max_in_flight=8) as pub,
    ):
        await sub.subscribe("batch", qos=1)
        futs = [pub.publish_nowait("batch", b"%d" % i, qos=1) for i in range(40)]
        assert pub.in_flight == 40 and not any(f.done() for f in futs), "none acked yet"
        # paho holds what is over the bound: 8 on the wire, 32 queued in order
        assert pub._session is not None and pub._session.wire._inflight_messages == 8
        await asyncio.gather(*futs)
        assert pub.in_flight == 0
        got = await _take(sub, 40)
    assert [m.payload for m in got] == [b"%d" % i for i in range(40)], "in order"


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
        assert gw._session is not None
        gw._abort(gw._session)
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
    assert topic_matches("vitals/v1/+/broadcast", got[1].topic)
    assert not topic_matches("vitals/v1/+/broadcast", "vitals/v1/a/b/broadcast")


@pytest.mark.mosquitto
async def test_our_close_is_not_their_fault(mosquitto: MosquittoBroker) -> None:
    """Closed by us: what waits ends quietly (messages) or fails with MqttClosed, a
    LocalError; broken by them: MqttError, a RemoteError (trio's split)."""
    client = MqttClient(mosquitto.host, mosquitto.port, client_id="c")
    await client.connect()

    async def consume() -> list[Message]:
        return [m async for m in client.messages]

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    await client.disconnect()
    assert await asyncio.wait_for(task, 2) == []
    with pytest.raises(MqttClosed, match="the client disconnected") as closed:
        await client.publish("t", b"")
    assert isinstance(closed.value, LocalError) and not isinstance(closed.value, MqttError)
    assert not client.connected


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
            # MQTT 5 says "bad user name or password" or "not authorized": both are 3.1.1's
            # credentials codes (the uplink's hint names the credentials for both)
            assert info.value.return_code in (4, 5), info.value
            assert "refused the connection" in str(info.value)
    finally:
        await broker.stop()


@pytest.mark.mosquitto
async def test_broker_killed_mid_publish_fails_every_waiting_publish_at_once(
    mosquitto: MosquittoBroker,
) -> None:
    """No acknowledgement timeout and a keepalive of a minute: only the lost connection
    can end these publishes, and it ends all of them, and the reader of the messages."""
    proc = mosquitto._proc
    assert proc is not None
    client = MqttClient(mosquitto.host, mosquitto.port, client_id="gw", keepalive=60)
    await client.connect()
    proc.send_signal(signal.SIGSTOP)  # frozen: nothing is acknowledged any more
    futs = [client.publish_nowait("batch", b"x" * 700) for _ in range(32)]
    messages = asyncio.create_task(anext(aiter(client.messages)))
    await asyncio.sleep(0.2)
    assert not any(f.done() for f in futs)
    proc.kill()  # the kernel closes its sockets
    done, _ = await asyncio.wait(futs, timeout=10.0)
    assert len(done) == 32
    for f in futs:
        with pytest.raises(MqttError, match="lost") as info:
            f.result()
        assert isinstance(info.value, RemoteError)
    with pytest.raises(MqttError, match="lost"):
        await messages  # a reader learns it too
    with pytest.raises(MqttError, match="lost"):
        client.publish_nowait("batch", b"late")
    await client.disconnect()


@pytest.mark.mosquitto
async def test_an_acknowledgement_too_late_declares_the_connection_dead(
    mosquitto: MosquittoBroker,
) -> None:
    proc = mosquitto._proc
    assert proc is not None
    async with MqttClient(
        mosquitto.host, mosquitto.port, client_id="gw", keepalive=60, ack_timeout=0.4
    ) as c:
        proc.send_signal(signal.SIGSTOP)
        try:
            futs = [c.publish_nowait("batch", b"x") for _ in range(3)]
            done, _ = await asyncio.wait(futs, timeout=10.0)
            assert len(done) == 3
            for f in futs:
                with pytest.raises(MqttError, match=r"no acknowledgement .* within 0.4 s"):
                    f.result()
            assert not c.connected
        finally:
            proc.send_signal(signal.SIGCONT)


@pytest.mark.mosquitto
async def test_keepalive_notices_a_silent_broker_while_idle(mosquitto: MosquittoBroker) -> None:
    """Nothing to publish, nothing received: a frozen broker is still noticed (events
    promise it, docs/events.md), by the keepalive's unanswered PINGREQ."""
    proc = mosquitto._proc
    assert proc is not None
    async with MqttClient(mosquitto.host, mosquitto.port, client_id="idle", keepalive=1) as c:
        await asyncio.sleep(1.5)
        assert c.connected, "pinged and answered"
        proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(MqttError, match="lost"):
                await _take(c, 1, within=10.0)
        finally:
            proc.send_signal(signal.SIGCONT)
        assert not c.connected


def _acl_dir(text: str) -> Path:
    """A directory with an ACL file ``acl``, outside pytest's (root-only) tmp tree:
    Mosquitto started as root reads it as its own user."""
    d = Path(tempfile.mkdtemp(prefix="vitals-acl-"))
    d.chmod(0o755)
    (d / "acl").write_text(text)
    (d / "acl").chmod(0o644)
    return d


@needs_mosquitto
async def test_a_message_the_broker_refuses_fails_alone() -> None:
    """MQTT 5: Mosquitto's ACL denies a topic with a PUBACK saying so (3.1.1 could only
    acknowledge and drop): that publish fails with MqttRefused, the connection stays."""
    d = _acl_dir("topic deny gw/batch\ntopic readwrite #\n")
    broker = MosquittoBroker(extra_config=f"acl_file {d / 'acl'}\n")
    await broker.start()
    try:
        async with MqttClient(broker.host, broker.port, client_id="gw") as c:
            with pytest.raises(MqttRefused, match="refused the message: Not authorized"):
                await c.publish("gw/batch", b"denied", qos=1)
            await c.publish("gw/meta", b"allowed", qos=1)
            assert c.connected
    finally:
        await broker.stop()
        shutil.rmtree(d, ignore_errors=True)


@needs_mosquitto
async def test_the_brokers_maximum_packet_size_is_known_before_sending() -> None:
    broker = MosquittoBroker(extra_config="max_packet_size 2000\n")
    await broker.start()
    try:
        async with MqttClient(broker.host, broker.port, client_id="gw") as c:
            assert c.protocol == 5 and c.max_packet_size == 2000
            # 1 + 2 (fixed header) + 2 + 5 (topic) + 2 (packet id) + 1 (no properties)
            assert c.fits("batch", 1987) and not c.fits("batch", 1988)
            await c.publish("batch", b"x" * 1987, qos=1)  # exactly the limit passes
            assert c.connected
            # over it, Mosquitto hangs up (it counts 2 bytes short of the spec's size:
            # 1988 and 1989 still pass there, so this is a bound, not Mosquitto's count)
            with pytest.raises(MqttError, match=r"lost: .*Packet too large"):
                await c.publish("batch", b"x" * 2100, qos=1)
    finally:
        await broker.stop()


# amqtt leaks the server side of simulator.broker's readiness probe (a connect that
# sends nothing: "No data to decode"); the autouse fixture's gc.collect() finds it
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_mqtt311_with_a_broker_that_has_no_mqtt5() -> None:
    """amqtt 0.12 (the demo's embedded broker) speaks 3.1.1 only: the client asks again
    in 3.1.1, says nothing, and works; no maximum packet size is known there."""
    pytest.importorskip("amqtt", reason="the embedded broker is the demo extra")
    async with (
        EmbeddedBroker() as b,
        MqttClient(b.host, b.port, client_id="sub") as sub,
        MqttClient(b.host, b.port, client_id="pub") as pub,
    ):
        assert (pub.protocol, sub.protocol) == (4, 4)
        assert pub.max_packet_size is None and pub.fits("t", 10_000_000)
        await sub.subscribe("t/#", qos=1)
        await pub.publish("t/a", b"over 3.1.1", qos=1)
        assert [m.payload for m in await _take(sub, 1)] == [b"over 3.1.1"]


async def test_refused_port_is_an_mqtt_error() -> None:
    with pytest.raises(MqttError, match=f"cannot connect to {HOST}:") as info:
        async with MqttClient(HOST, free_port(), client_id="c"):
            pass
    # the cause stays reachable for the uplink's explanation (agent.uplink.explain)
    assert isinstance(info.value.__context__ or info.value.__cause__, BaseException)


async def test_a_server_that_never_answers_connect_times_out() -> None:
    writers: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda r, w: writers.append(w), HOST, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(MqttError, match=r"no CONNACK from .* within 0.3 s"):
            async with MqttClient(HOST, port, client_id="c", connect_timeout=0.3):
                pass
    finally:
        for w in writers:
            w.close()
        server.close()
        await server.wait_closed()


def test_misuse_is_local() -> None:
    with pytest.raises(LocalError, match="password needs a user name"):
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
        with pytest.raises(LocalError, match="bad topic filter"):
            await c.subscribe("a+", qos=1)
        await c.publish("a", b"fine", qos=1)
        assert c.connected


@pytest.mark.mosquitto
async def test_a_flood_nobody_takes_never_holds_back_our_pubacks(
    mosquitto: MosquittoBroker,
) -> None:
    """The consumer of the messages awaits a QoS 1 publish of its own for each, while a
    flood (small and 900 KB messages) arrives faster than it takes them: the socket is
    always read, what the queue cannot hold is dropped and counted (issue 19). Under
    MQTT 5 the broker knows our Maximum Packet Size and does not send the large ones."""
    drops: list[str] = []
    async with MqttClient(
        mosquitto.host,
        mosquitto.port,
        client_id="gw",
        max_queued_messages=8,
        max_message_size=4096,
        topic_caps={"gw/cfg": 100},
        on_drop=lambda why, *_: drops.append(why),
    ) as c:
        await c.subscribe("gw/cmd", qos=1)
        await c.subscribe("gw/cfg", qos=1)
        answered = 0

        async def consume() -> None:
            nonlocal answered
            async for _ in c.messages:
                await c.publish("gw/result", b"r", qos=1)
                answered += 1

        consumer = asyncio.create_task(consume())
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="flood") as f:
            await f.publish("gw/cfg", b"z" * 101, qos=1)  # over its topic's cap
            for i in range(600):  # QoS 0 is the quickest flood; the large ones at QoS 1
                big = i % 50 == 0
                payload = b"y" * 900_000 if big else os.urandom(200)
                await f.publish("gw/cmd", payload, qos=1 if big else 0)
        # every message taken is answered: wait until all 588 small ones are either
        # taken or dropped (the broker may still be forwarding QoS 0 after the flood's
        # client is gone) and the consumer has answered each (30 s: a loaded CI
        # machine took more than 10 s for the 588 answers)
        deadline = asyncio.get_running_loop().time() + 30
        while asyncio.get_running_loop().time() < deadline:
            seen = c.counters["received"] + c.counters["overflow"]
            if seen == 588 and c.counters["received"] == answered and c.in_flight == 0:
                break
            await asyncio.sleep(0.02)
        await asyncio.wait_for(c.publish("gw/after", b"ok", qos=1), 5)
        consumer.cancel()
        assert c.connected
        assert answered == c.counters["received"] > 0
        assert c.counters["received"] + c.counters["overflow"] == 588
        assert c.counters["oversized"] == 1 == drops.count("oversized")
        assert c.counters["overflow"] == drops.count("overflow")


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
