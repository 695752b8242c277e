"""Signed remote configuration: the messages, the per-topic MQTT cap, the gateway's
store of versions, and pushes through a real Mosquitto to a real ``vitals run``."""

from __future__ import annotations

import pytest

from protocols import confpush, ed25519, mqtt
from protocols.errors import FrameError, LocalError, SignatureError

HUB = ed25519.PrivateKey.from_private_bytes(bytes(range(32)))
GWKEY = ed25519.PrivateKey.from_private_bytes(bytes(range(1, 33)))
OTHER = ed25519.PrivateKey.from_private_bytes(bytes(range(2, 34)))
HUB_PUB = HUB.public_key().public_bytes_raw()


# --------------------------------------------------------------------------- messages


def test_push_round_trip_and_forgeries() -> None:
    wire = confpush.push(
        "[gateway]\nid = 'gw-1'\n", gateway="gw-1", version=3, hub_key=HUB, now_ms=5
    )
    p = confpush.parse_push(wire)
    p.verify(HUB_PUB)
    assert (p.gw, p.v, p.trial, p.text()) == ("gw-1", 3, 120, "[gateway]\nid = 'gw-1'\n")
    forged = confpush.push("x", gateway="gw-1", version=4, hub_key=OTHER, now_ms=5)
    with pytest.raises(SignatureError):
        confpush.parse_push(forged).verify(HUB_PUB)
    # the payload swapped under a valid header: the hash says so before any signature check
    tampered = wire.replace(b"gw-1'", b"gw-2'")
    with pytest.raises(FrameError, match="SHA-256"):
        confpush.parse_push(tampered)
    with pytest.raises(LocalError, match="reads at most"):
        confpush.push(
            "#" * confpush.MAX_CONFIG_BYTES, gateway="g", version=1, hub_key=HUB, now_ms=0
        )


def test_report_round_trip() -> None:
    wire = confpush.report(
        gateway="gw-1",
        key=GWKEY,
        version=3,
        status="rolled_back",
        running=2,
        reason="noise-1 is offline",
        now_ms=9,
        details={"checks": ["x"]},
    )
    r = confpush.parse_report(wire)
    r.verify(GWKEY.public_key().public_bytes_raw())
    assert (r.v, r.status, r.running, r.details()) == (3, "rolled_back", 2, {"checks": ["x"]})
    with pytest.raises(SignatureError):
        r.verify(HUB_PUB)


def _publish(topic: str, payload: bytes) -> bytes:
    return mqtt.encode_publish(topic, payload, qos=1, packet_id=7)


def test_decoder_caps_per_topic_byte_by_byte() -> None:
    """Commands keep their 4 KiB cap; the config topic takes 256 KiB; both fed a byte
    at a time, and an oversized command is skipped without being buffered."""
    big = b"c" * 100_000
    stream = _publish("vitals/v1/gw/cmd", big) + _publish("vitals/v1/gw/config", big)
    d = mqtt.Decoder(max_payload=4096, topic_caps={"vitals/v1/gw/config": 256 * 1024})
    out: list[mqtt.Packet] = []
    for i in range(len(stream)):
        out += d.feed(stream[i : i + 1])
        assert len(d.buffered) <= 100_100
    assert isinstance(out[0], mqtt.Skipped) and out[0].topic == "vitals/v1/gw/cmd"
    assert isinstance(out[1], mqtt.Publish) and out[1].payload == big
