"""The MQTT 3.1.1 codec (protocols/mqtt.py, sans-IO).

One golden table of ``(case, value, bytes)`` derived by hand from the standard
drives the encoders and the decoder (whole, byte by byte, every split); amqtt's
packet classes, an independent implementation, cross-check the same bytes;
hypothesis checks round trips, that any input yields packets or our
ProtocolError, and that a split stream leaves the decoder as the whole one does.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import mqtt
from protocols.errors import DecodeError, FrameError, LocalError, ProtocolError

H = bytes.fromhex

# ------------------------------------------------------------------ golden table
# Client packets: (case, encoder call, exact bytes). Derived from the standard:
# fixed header (type << 4 | flags, Remaining Length), then the fields of §3.x.
CLIENT: list[tuple[str, Callable[[], bytes], bytes]] = [
    (
        # 10 | len 16 | "MQTT" level 4 | flags 0x02 clean | keepalive 60 | "gw-1"
        "connect minimal",
        lambda: mqtt.encode_connect("gw-1", keepalive=60),
        H("10 10 0004 4d515454 04 02 003c 0004 67772d31"),
    ),
    (
        # flags 0xee: user 0x80 | password 0x40 | will retain 0x20 | will QoS 1 0x08
        #             | will 0x04 | clean 0x02; payload order: id, will topic,
        #             will message, user name, password (§3.1.3)
        "connect with will and credentials",
        lambda: mqtt.encode_connect(
            "gw",
            keepalive=30,
            username="u",
            password="p",
            will_topic="s",
            will_payload=b"off",
            will_qos=1,
            will_retain=True,
        ),
        H("10 1c 0004 4d515454 04 ee 001e 0002 6777 0001 73 0003 6f6666 0001 75 0001 70"),
    ),
    (
        "connect persistent session, keepalive off",
        lambda: mqtt.encode_connect("x", keepalive=0, clean_session=False),
        H("10 0d 0004 4d515454 04 00 0000 0001 78"),
    ),
    (
        "publish qos 0",
        lambda: mqtt.encode_publish("a/b", b"hi"),
        H("30 07 0003 612f62 6869"),
    ),
    (
        # 0x33 = PUBLISH | QoS 1 (0x02) | retain (0x01); packet id after the topic
        "publish qos 1 retained",
        lambda: mqtt.encode_publish("a/b", b"hi", qos=1, retain=True, packet_id=10),
        H("33 09 0003 612f62 000a 6869"),
    ),
    (
        "publish qos 1 dup",
        lambda: mqtt.encode_publish("a/b", b"", qos=1, dup=True, packet_id=0xFFFF),
        H("3a 07 0003 612f62 ffff"),
    ),
    (
        # 205 bytes remaining (5 of topic, 200 of payload): 0xcd 0x01 (0x4d + 1 * 128)
        "publish two-byte remaining length",
        lambda: mqtt.encode_publish("a/b", b"\x00" * 200),
        H("30 cd01 0003 612f62") + b"\x00" * 200,
    ),
    ("puback", lambda: mqtt.encode_puback(7), H("40 02 0007")),
    (
        # 0x82: SUBSCRIBE with its mandatory flags 0b0010; filter then requested QoS
        "subscribe one filter",
        lambda: mqtt.encode_subscribe(1, [("vitals/v1/gw-1/cmd", 1)]),
        H("82 17 0001 0012") + b"vitals/v1/gw-1/cmd" + H("01"),
    ),
    (
        "subscribe two filters",
        lambda: mqtt.encode_subscribe(258, [("a/+", 0), ("#", 2)]),
        H("82 0c 0102 0003 612f2b 00 0001 23 02"),
    ),
    ("pingreq", mqtt.encode_pingreq, H("c0 00")),
    ("disconnect", mqtt.encode_disconnect, H("e0 00")),
]

# Server packets: (case, decoded value, exact bytes)
SERVER: list[tuple[str, mqtt.Packet, bytes]] = [
    ("connack accepted", mqtt.ConnAck(False, 0), H("20 02 00 00")),
    ("connack session present", mqtt.ConnAck(True, 0), H("20 02 01 00")),
    ("connack not authorized", mqtt.ConnAck(False, 5), H("20 02 00 05")),
    ("connack bad credentials", mqtt.ConnAck(False, 4), H("20 02 00 04")),
    ("publish qos 0", mqtt.Publish("a/b", b"hi"), H("30 07 0003 612f62 6869")),
    (
        "publish qos 1 retained",
        mqtt.Publish("a/b", b"hi", 1, True, False, 10),
        H("33 09 0003 612f62 000a 6869"),
    ),
    (
        # QoS 2 inbound: 0x34; the fields are decoded like QoS 1
        "publish qos 2 dup",
        mqtt.Publish("t", b"\x00\xff", 2, False, True, 3),
        H("3c 07 0001 74 0003 00ff"),
    ),
    (
        "publish utf-8 topic, empty payload",
        mqtt.Publish("é/ü", b""),
        H("30 07 0005 c3a92fc3bc"),
    ),
    ("puback", mqtt.PubAck(7), H("40 02 0007")),
    ("pubrec", mqtt.PubRec(8), H("50 02 0008")),
    ("pubrel", mqtt.PubRel(9), H("62 02 0009")),  # PUBREL's flags are 0b0010
    ("pubcomp", mqtt.PubComp(10), H("70 02 000a")),
    ("suback granted 1", mqtt.SubAck(1, (1,)), H("90 03 0001 01")),
    ("suback one refused", mqtt.SubAck(2, (0, 0x80)), H("90 04 0002 00 80")),
    ("unsuback", mqtt.UnsubAck(11), H("b0 02 000b")),
    ("pingresp", mqtt.PingResp(), H("d0 00")),
]

# §2.2.3 Table 2.4: the boundaries of each Remaining Length size
REMAINING = [
    (0, "00"),
    (127, "7f"),
    (128, "8001"),
    (16_383, "ff7f"),
    (16_384, "808001"),
    (2_097_151, "ffff7f"),
    (2_097_152, "80808001"),
    (268_435_455, "ffffff7f"),
]


@pytest.mark.parametrize(("case", "encode", "wire"), CLIENT, ids=[c[0] for c in CLIENT])
def test_encoders_give_the_golden_bytes(
    case: str, encode: Callable[[], bytes], wire: bytes
) -> None:
    assert encode() == wire


@pytest.mark.parametrize(("case", "value", "wire"), SERVER, ids=[c[0] for c in SERVER])
def test_decoder_whole_byte_by_byte_and_every_split(
    case: str, value: mqtt.Packet, wire: bytes
) -> None:
    assert mqtt.Decoder().feed(wire) == [value]
    dec = mqtt.Decoder()
    got: list[mqtt.Packet] = []
    for b in wire:
        got += dec.feed(bytes([b]))
    assert got == [value] and dec.buffered == b""
    for i in range(len(wire) + 1):
        dec = mqtt.Decoder()
        assert dec.feed(wire[:i]) + dec.feed(wire[i:]) == [value]


def test_two_way_packets_round_trip() -> None:
    """PUBLISH and PUBACK go both ways: what we encode, we decode."""
    for case, value, wire in SERVER:
        if isinstance(value, mqtt.Publish) and value.qos < 2:
            enc = mqtt.encode_publish(
                value.topic,
                value.payload,
                qos=value.qos,
                retain=value.retain,
                dup=value.dup,
                packet_id=value.packet_id,
            )
            assert enc == wire, case
        elif isinstance(value, mqtt.PubAck):
            assert mqtt.encode_puback(value.packet_id) == wire


@pytest.mark.parametrize(("n", "hexed"), REMAINING)
def test_remaining_length_boundaries(n: int, hexed: str) -> None:
    assert mqtt._remaining(n) == H(hexed)
    # the decoder reads it back: a PUBLISH header with that length, body not yet there
    dec = mqtt.Decoder(max_packet_size=1 << 30)
    dec.receive(H("30" + hexed))
    if n < 2:
        with pytest.raises(DecodeError, match="truncated"):
            dec.next_packet()
    else:
        assert dec.next_packet() is None
        assert dec.state()[1] == 1 + len(hexed) // 2 + n  # header parsed, total known


def test_connack_reasons_are_named() -> None:
    assert mqtt.ConnAck(False, 0).accepted
    assert [mqtt.ConnAck(False, rc).reason for rc in range(1, 6)] == [
        "unacceptable protocol version",
        "client identifier rejected",
        "server unavailable",
        "bad user name or password",
        "not authorized",
    ]
    assert mqtt.ConnAck(False, 9).reason == "unknown return code 9"
    assert mqtt.SubAck(1, (1, 0x80)).failed and not mqtt.SubAck(1, (0, 1, 2)).failed


# ------------------------------------------------------------------ malformed input
MALFORMED: list[tuple[str, bytes, type[ProtocolError], str]] = [
    ("remaining length of 5 bytes", H("30 ff ff ff ff 01"), FrameError, "longer than 4 bytes"),
    ("reserved type 0", H("00 00"), FrameError, "unknown packet type 0"),
    ("reserved type 15", H("f0 00"), FrameError, "unknown packet type 15"),
    ("a client's packet", H("10 00"), FrameError, "CONNECT .* never sent by a server"),
    ("pingreq from a server", H("c0 00"), FrameError, "PINGREQ"),
    ("bad flags", H("41 02 0001"), FrameError, "PUBACK with fixed-header flags 0x1"),
    ("pubrel without its flags", H("60 02 0001"), FrameError, "PUBREL .* expected 0x2"),
    ("publish qos 3", H("36 05 0001 74 0001"), FrameError, "QoS 3"),
    ("connack too long", H("20 03 00 00 00"), FrameError, "CONNACK remaining length 3"),
    ("puback too short", H("40 01 00"), FrameError, "PUBACK remaining length 1"),
    ("pingresp with a body", H("d0 01 00"), FrameError, "PINGRESP remaining length 1"),
    ("suback without a code", H("90 02 0001"), FrameError, "SUBACK remaining length 2"),
    ("connack reserved flags", H("20 02 02 00"), DecodeError, "reserved acknowledge flags"),
    ("puback id 0", H("40 02 0000"), DecodeError, "packet id 0"),
    ("suback bad code", H("90 03 0001 03"), DecodeError, "SUBACK return code 0x03"),
    ("publish topic past the end", H("30 04 0009 6162"), DecodeError, "truncated: a topic of 9"),
    ("publish no packet id", H("32 04 0002 6162"), DecodeError, "truncated.*packet id"),
    ("publish no topic length", H("30 01 00"), DecodeError, "no topic length"),
    ("publish empty topic", H("30 02 0000"), DecodeError, "empty topic"),
    ("publish bad utf-8 topic", H("30 04 0002 c328"), DecodeError, "not valid UTF-8"),
    ("publish surrogate in topic", H("30 05 0003 eda080"), DecodeError, "not valid UTF-8"),
    ("publish wildcard topic", H("30 05 0003 612f23"), DecodeError, "wildcard"),
    ("publish qos 1 id 0", H("32 07 0003 612f62 0000"), DecodeError, "packet id 0"),
]


@pytest.mark.parametrize(
    ("case", "wire", "error", "match"), MALFORMED, ids=[m[0] for m in MALFORMED]
)
def test_malformed_input_names_what_is_wrong(
    case: str, wire: bytes, error: type[ProtocolError], match: str
) -> None:
    dec = mqtt.Decoder()
    with pytest.raises(error, match=match):
        dec.feed(wire)
    # the stream cannot be resynchronised: the decoder keeps refusing
    with pytest.raises(error, match=match):
        dec.feed(H("d0 00"))


def test_oversize_packet_is_refused_from_its_header() -> None:
    dec = mqtt.Decoder(max_packet_size=5)
    assert dec.feed(H("90 03 00 07 01")) == [mqtt.SubAck(7, (1,))]
    # 5 bytes pass, 6 do not, refused from the header
    with pytest.raises(FrameError, match="SUBACK of 6 bytes is larger than the limit of 5"):
        dec.feed(H("90 04"))
    dec = mqtt.Decoder()
    with pytest.raises(FrameError, match="larger than the limit of 1048576"):
        dec.feed(H("90 ffff7f"))


def test_an_oversize_publish_is_skipped_unbuffered() -> None:
    """A PUBLISH over max_payload is no error: its head is read, its payload dropped as it
    arrives (never buffered), and the packets after it decode as usual."""
    dec = mqtt.Decoder(max_payload=100)
    assert dec.feed(mqtt.encode_publish("t", b"x" * 100)) == [mqtt.Publish("t", b"x" * 100)]
    big = mqtt.encode_publish("gw/cmd", b"y" * 900_000, qos=1, packet_id=9)
    head = len(big) - 900_000
    assert dec.feed(big[: head - 1]) == []  # the packet id is not in yet
    assert dec.feed(big[head - 1 : head + 10]) == [mqtt.Skipped("gw/cmd", 900_000, 1, 9)]
    assert dec.buffered == b"" and dec.state()[3] == 900_000 - 10  # bytes still to drop
    for at in range(head + 10, len(big), 65536):
        assert dec.feed(big[at : at + 65536]) == []
        assert dec.buffered == b""  # nothing of it kept
    after = mqtt.encode_publish("gw/cmd", b"small") + mqtt.encode_puback(3)
    assert dec.feed(after) == [mqtt.Publish("gw/cmd", b"small"), mqtt.PubAck(3)]
    # in one chunk with what follows, and at QoS 0 (no packet id)
    dec = mqtt.Decoder(max_payload=10)
    packets = dec.feed(mqtt.encode_publish("a", b"z" * 11) + mqtt.encode_puback(4))
    assert packets == [mqtt.Skipped("a", 11), mqtt.PubAck(4)]
    assert dec.buffered == b"" and dec.state()[3] == 0
    # a long topic does not make a small payload too large
    assert mqtt.Decoder(max_payload=10).feed(mqtt.encode_publish("t" * 500, b"p")) == [
        mqtt.Publish("t" * 500, b"p")
    ]
    # a malformed head is still an error
    with pytest.raises(DecodeError, match="truncated"):
        mqtt.Decoder(max_payload=1).feed(H("30 05 00 09 61 62 63"))


def test_packets_before_a_malformed_one_are_returned_first() -> None:
    dec = mqtt.Decoder()
    dec.receive(H("40 02 0001 40 02 0002 00 00"))
    assert dec.next_packet() == mqtt.PubAck(1)
    assert dec.next_packet() == mqtt.PubAck(2)
    with pytest.raises(FrameError, match="unknown packet type 0"):
        dec.next_packet()


def test_many_packets_in_one_chunk_and_a_partial_tail() -> None:
    acks = b"".join(mqtt.encode_puback(i) for i in range(1, 33))
    dec = mqtt.Decoder()
    assert dec.feed(acks + H("90 03 00")) == [mqtt.PubAck(i) for i in range(1, 33)]
    assert dec.buffered == H("90 03 00")
    assert dec.feed(H("05 01")) == [mqtt.SubAck(5, (1,))]
    assert dec.buffered == b""


# ------------------------------------------------------------------ our own mistakes
@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: mqtt.encode_publish("a/+", b""), "wildcard"),
        (lambda: mqtt.encode_publish("a/#", b""), "wildcard"),
        (lambda: mqtt.encode_publish("", b""), "at least one character"),
        (lambda: mqtt.encode_publish("a\0b", b""), "U\\+0000"),
        (lambda: mqtt.encode_publish("t", b"", qos=1), "packet id 0"),
        (lambda: mqtt.encode_publish("t", b"", qos=1, packet_id=65536), "packet id 65536"),
        (lambda: mqtt.encode_publish("t", b"", qos=2, packet_id=1), "QoS 0 or 1"),
        (lambda: mqtt.encode_publish("t", b"", dup=True), "DUP"),
        (lambda: mqtt.encode_publish("t" * 65536, b""), "65535"),
        (lambda: mqtt.encode_publish("\ud800", b""), "not valid Unicode"),
        (lambda: mqtt.encode_connect("c", password="p"), "user name"),
        (lambda: mqtt.encode_connect("", clean_session=False), "clean_session"),
        (lambda: mqtt.encode_connect("c", keepalive=70000), "keepalive"),
        (lambda: mqtt.encode_connect("c", will_topic="s", will_qos=3), "will QoS 3"),
        (lambda: mqtt.encode_connect("c", will_retain=True), "need a will topic"),
        (lambda: mqtt.encode_connect("c", will_topic="s/#"), "wildcard"),
        (lambda: mqtt.encode_connect("c", will_topic="s", will_payload=b"x" * 65536), "65535"),
        (lambda: mqtt.encode_subscribe(1, []), "at least one"),
        (lambda: mqtt.encode_subscribe(1, [("a/#/b", 0)]), "whole last level"),
        (lambda: mqtt.encode_subscribe(1, [("a/b#", 0)]), "whole last level"),
        (lambda: mqtt.encode_subscribe(1, [("a/b+", 0)]), "whole level"),
        (lambda: mqtt.encode_subscribe(1, [("", 0)]), "at least one character"),
        (lambda: mqtt.encode_subscribe(1, [("a", 3)]), "QoS 3"),
        (lambda: mqtt.encode_subscribe(0, [("a", 0)]), "packet id 0"),
        (lambda: mqtt._remaining(268_435_456), "at most"),
        (lambda: mqtt.Decoder(max_packet_size=1), "at least 2"),
    ],
)
def test_misuse_is_a_local_error(call: Callable[[], object], match: str) -> None:
    with pytest.raises(LocalError, match=match):
        call()


# ------------------------------------------------------------------ topic filters
@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        # §4.7.1.2 and §4.7.1.3 examples
        ("sport/tennis/player1/#", "sport/tennis/player1", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
        ("sport/#", "sport", True),
        ("#", "a/b/c", True),
        ("sport/tennis/+", "sport/tennis/player1", True),
        ("sport/tennis/+", "sport/tennis/player1/ranking", False),
        ("sport/+", "sport", False),
        ("sport/+", "sport/", True),
        ("+/+", "/finance", True),
        ("/+", "/finance", True),
        ("+", "/finance", False),
        # §4.7.2 topics starting with $
        ("#", "$SYS/broker", False),
        ("+/monitor/Clients", "$SYS/monitor/Clients", False),
        ("$SYS/#", "$SYS/monitor/Clients", True),
        ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
        # exact, case-sensitive
        ("vitals/v1/gw-1/cmd", "vitals/v1/gw-1/cmd", True),
        ("vitals/v1/gw-1/cmd", "vitals/v1/gw-1/cmd/result", False),
        ("vitals/v1/gw-1/cmd", "vitals/v1/GW-1/cmd", False),
        ("a/b", "a", False),
        # shared subscriptions match like their filter
        ("$share/hub/vitals/v1/+/batch", "vitals/v1/gw-1/batch", True),
        ("$share/hub/vitals/v1/+/batch", "vitals/v1/gw-1/meta", False),
        ("$share/hub", "hub", False),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, matches: bool) -> None:
    assert mqtt.topic_matches(topic_filter, topic) is matches


# ------------------------------------------------------------------ amqtt cross-check
# amqtt (the demo's embedded broker, a dev dependency) is an independent codec:
# our client packets decode there with the same fields, and its server packets
# are byte for byte the golden ones.


async def _amqtt_decode(cls: Any, wire: bytes) -> Any:
    from amqtt.adapters import BufferReader

    return await cls.from_stream(BufferReader(wire))


async def test_amqtt_reads_our_connect() -> None:
    from amqtt.mqtt.connect import ConnectPacket

    wire = mqtt.encode_connect(
        "gw-7",
        keepalive=45,
        username="user",
        password="secret",
        will_topic="vitals/v1/gw-7/status",
        will_payload=b"offline",
        will_qos=1,
        will_retain=True,
    )
    p = await _amqtt_decode(ConnectPacket, wire)
    vh, pl = p.variable_header, p.payload
    assert (vh.proto_name, vh.proto_level, vh.keep_alive) == ("MQTT", 4, 45)
    assert vh.clean_session_flag and vh.will_flag and vh.will_retain_flag and vh.will_qos == 1
    assert not vh.reserved_flag
    assert (pl.client_id, pl.will_topic, pl.will_message) == (
        "gw-7",
        "vitals/v1/gw-7/status",
        b"offline",
    )
    assert (pl.username, pl.password) == ("user", "secret")
    assert p.fixed_header.remaining_length == len(wire) - 2


async def test_amqtt_reads_our_publish_and_subscribe() -> None:
    from amqtt.mqtt.publish import PublishPacket
    from amqtt.mqtt.subscribe import SubscribePacket

    wire = mqtt.encode_publish("vitals/v1/gw-7/batch", b"\x93\x01", qos=1, packet_id=513)
    p = await _amqtt_decode(PublishPacket, wire)
    assert (p.topic_name, p.packet_id, p.qos, p.retain_flag, p.dup_flag) == (
        "vitals/v1/gw-7/batch",
        513,
        1,
        False,
        False,
    )
    assert p.data == b"\x93\x01"
    s = await _amqtt_decode(SubscribePacket, mqtt.encode_subscribe(9, [("a/+", 1), ("b/#", 0)]))
    assert s.variable_header.packet_id == 9
    assert s.payload.topics == [("a/+", 1), ("b/#", 0)]


def test_amqtt_server_packets_are_the_golden_bytes() -> None:
    from amqtt.mqtt.connack import ConnackPacket
    from amqtt.mqtt.pingresp import PingRespPacket
    from amqtt.mqtt.puback import PubackPacket
    from amqtt.mqtt.publish import PublishPacket
    from amqtt.mqtt.suback import SubackPacket

    built = {
        "connack accepted": ConnackPacket.build(0, 0),
        "connack session present": ConnackPacket.build(1, 0),
        "connack not authorized": ConnackPacket.build(0, 5),
        "publish qos 1 retained": PublishPacket.build("a/b", b"hi", 10, False, 1, True),
        "publish qos 2 dup": PublishPacket.build("t", b"\x00\xff", 3, True, 2, False),
        "puback": PubackPacket.build(7),
        "suback one refused": SubackPacket.build(2, [0, 0x80]),
        "pingresp": PingRespPacket.build(),
    }
    golden = {case: wire for case, _, wire in SERVER}
    for case, packet in built.items():
        assert packet.to_bytes() == golden[case], case


# ------------------------------------------------------------------ hypothesis
topic_names = st.text(
    st.characters(exclude_characters="+#\0", exclude_categories=("Cs",)),
    min_size=1,
    max_size=40,
)


@st.composite
def publishes(draw: st.DrawFn) -> mqtt.Publish:
    qos = draw(st.integers(0, 1))
    return mqtt.Publish(
        draw(topic_names),
        draw(st.binary(max_size=300)),
        qos,
        draw(st.booleans()),
        draw(st.booleans()) if qos else False,
        draw(st.integers(1, 65535)) if qos else 0,
    )


def _encode(p: mqtt.Publish) -> bytes:
    return mqtt.encode_publish(
        p.topic, p.payload, qos=p.qos, retain=p.retain, dup=p.dup, packet_id=p.packet_id
    )


server_packets = st.one_of(
    publishes(),
    st.builds(mqtt.PubAck, st.integers(1, 65535)),
    st.builds(mqtt.ConnAck, st.booleans(), st.integers(0, 255)),
    st.builds(
        mqtt.SubAck,
        st.integers(1, 65535),
        st.lists(st.sampled_from([0, 1, 2, 0x80]), min_size=1, max_size=5).map(tuple),
    ),
    st.just(mqtt.PingResp()),
)


def _server_bytes(p: mqtt.Packet) -> bytes:
    if isinstance(p, mqtt.Publish):
        return _encode(p)
    if isinstance(p, mqtt.PubAck):
        return mqtt.encode_puback(p.packet_id)
    if isinstance(p, mqtt.ConnAck):
        return bytes((0x20, 2, int(p.session_present), p.return_code))
    if isinstance(p, mqtt.SubAck):
        body = p.packet_id.to_bytes(2, "big") + bytes(p.return_codes)
        return bytes((0x90,)) + mqtt._remaining(len(body)) + body
    return b"\xd0\x00"


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@given(publishes())
def test_publish_round_trip(p: mqtt.Publish) -> None:
    assert mqtt.Decoder().feed(_encode(p)) == [p]


@given(st.lists(server_packets, max_size=12), st.lists(st.integers(0, 10_000), max_size=20))
def test_any_chunking_gives_the_same_packets_and_state(
    packets: list[mqtt.Packet], cuts: list[int]
) -> None:
    stream = b"".join(_server_bytes(p) for p in packets)
    stream += _server_bytes(mqtt.Publish("t/u", b"partial"))[:-3]  # an incomplete packet last
    whole = mqtt.Decoder()
    assert whole.feed(stream) == packets
    split = mqtt.Decoder()
    got: list[mqtt.Packet] = []
    for chunk in _chunks(stream, cuts):
        got += split.feed(chunk)
    assert got == packets
    assert split.state() == whole.state()
    assert split.buffered == stream[-11:]


def _run(dec: mqtt.Decoder, chunks: list[bytes]) -> tuple[list[mqtt.Packet], str | None]:
    out: list[mqtt.Packet] = []
    for chunk in chunks:
        dec.receive(chunk)
        try:
            while (p := dec.next_packet()) is not None:
                out.append(p)
        except ProtocolError as exc:
            return out, str(exc)
    return out, None


garbage = st.lists(st.one_of(st.binary(max_size=40), server_packets.map(_server_bytes)), max_size=8)


@settings(max_examples=400)
@given(garbage, st.lists(st.integers(0, 500), max_size=12), st.integers(2, 400))
def test_any_bytes_in_any_chunks_give_packets_or_our_error(
    parts: list[bytes], cuts: list[int], limit: int
) -> None:
    """Never IndexError, struct.error, UnicodeDecodeError: packets, then at most our error;
    the same packets and the same error however the bytes are cut."""
    data = b"".join(parts)
    whole = _run(mqtt.Decoder(max_packet_size=limit, max_payload=limit // 2), [data])
    split_dec = mqtt.Decoder(max_packet_size=limit, max_payload=limit // 2)
    split = _run(split_dec, _chunks(data, cuts))
    assert split == whole
    if whole[1] is not None:
        with pytest.raises(ProtocolError):
            split_dec.next_packet()


@given(st.integers(0, 268_435_455))
def test_remaining_length_round_trip(n: int) -> None:
    enc = mqtt._remaining(n)
    assert 1 <= len(enc) <= 4
    dec = mqtt.Decoder(max_packet_size=1 << 29)
    dec.receive(b"\x30" + enc)
    if n >= 2:
        assert dec.next_packet() is None and dec.state()[1] == 1 + len(enc) + n


@given(
    st.lists(st.sampled_from(["a", "b", "+", "", "$x"]), min_size=1, max_size=4),
    st.lists(st.sampled_from(["a", "b", "", "$x"]), min_size=1, max_size=4),
    st.booleans(),
)
def test_topic_matches_agrees_with_a_reference(f: list[str], t: list[str], hashed: bool) -> None:
    """Against a direct reading of §4.7: level by level, '#' for any tail."""
    topic_filter = "/".join([*f, "#"] if hashed else f)
    topic = "/".join(t)
    if topic_filter[:1] in ("+", "#") and topic.startswith("$"):
        expected = False
    elif hashed:
        expected = len(t) >= len(f) and all(w in ("+", lv) for w, lv in zip(f, t, strict=False))
    else:
        expected = len(t) == len(f) and all(w in ("+", lv) for w, lv in zip(f, t, strict=True))
    assert mqtt.topic_matches(topic_filter, topic) is expected
