"""Signed edge events: round trip, strict header and payload, domain separation, fuzz."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols import envelope
from protocols.ed25519 import PrivateKey
from protocols.errors import DecodeError, FrameError, LocalError, ProtocolError, SignatureError
from protocols.event import EVENT_DOMAIN, Event, event_topic, parse_event, seal_event

KEY = PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = PrivateKey.from_private_bytes(bytes(range(1, 33)))
EV = Event(
    rule="night-noise",
    kind="threshold",
    state="fired",
    device="noise-1",
    point="laeq",
    pid=0,
    value=57.3,
    ts=1_767_225_900_000,
    since=1_767_225_600_000,
    detail="57.3 above 55 for 300 s",
)


def test_round_trip_and_header() -> None:
    data = seal_event(EV, gateway="gw-0001", key=KEY, epoch=3, seq=7)
    sealed = parse_event(data)
    assert (sealed.header.gw, sealed.header.epoch, sealed.header.seq) == ("gw-0001", 3, 7)
    assert sealed.header.kid == envelope.key_id(KEY)
    sealed.verify(KEY.public_key())
    assert sealed.event() == EV
    assert sealed.event().fired


@pytest.mark.parametrize(
    "event",
    [
        EV,
        Event("gw-offline", "offline", "cleared", "weather-1", "", -1, None, 5, 0),
        Event("gas", "threshold", "fired", "gas-1", "co_alarm", 12, True, 10, 10),
        Event("stuck", "stuck", "fired", "pm-1", "pm25", 3, 42, 10, 1),
    ],
)
def test_every_kind_of_value_round_trips(event: Event) -> None:
    data = seal_event(event, gateway="g", key=KEY, epoch=0, seq=0)
    assert parse_event(data).event() == event


def test_topic() -> None:
    assert event_topic("gw-0001") == "vitals/v1/gw-0001/event"
    assert event_topic("gw-0001", "city/x") == "city/x/gw-0001/event"


def test_signature_is_bound_to_key_and_domain() -> None:
    data = seal_event(EV, gateway="gw-0001", key=KEY, epoch=0, seq=0)
    sealed = parse_event(data)
    with pytest.raises(SignatureError, match="kid"):
        sealed.verify(OTHER.public_key())
    # the same bytes never verify as a batch or another kind
    with pytest.raises(SignatureError):
        sealed.message.verify(envelope.BATCH_DOMAIN, KEY.public_key())
    sealed.message.verify(EVENT_DOMAIN, KEY.public_key())
    # a batch does not parse as an event (different protected schema)
    from protocols.reading import Reading

    batch = envelope.seal([Reading(0, 1, 1.0)], gateway="gw-0001", key=KEY, epoch=0, seq=0)
    with pytest.raises(FrameError, match="unknown key"):
        parse_event(batch)


def test_flipped_payload_bit_fails_verification() -> None:
    data = bytearray(seal_event(EV, gateway="gw-0001", key=KEY, epoch=0, seq=0))
    i = data.index(b"night-noise")
    data[i] ^= 0x01
    sealed = parse_event(bytes(data))
    with pytest.raises(SignatureError):
        sealed.verify(KEY.public_key())


BAD_EVENTS = [
    ("empty rule", {"rule": ""}, "rule"),
    ("bad kind", {"kind": "spike"}, "kind"),
    ("bad state", {"state": "on"}, "state"),
    ("pid below -1", {"pid": -2}, "pid"),
    ("string value", {"value": "57"}, "value"),
    ("nan value", {"value": float("nan")}, "finite"),
    ("since after ts", {"since": EV.ts + 1}, "since"),
    ("negative ts", {"ts": -1, "since": -1}, "ts"),
]


@pytest.mark.parametrize(("case", "change", "word"), BAD_EVENTS, ids=[c[0] for c in BAD_EVENTS])
def test_sealing_refuses_bad_events(case: str, change: dict[str, object], word: str) -> None:
    fields = {f: getattr(EV, f) for f in EV.__slots__}
    fields.update(change)
    with pytest.raises(LocalError, match=word):
        seal_event(Event(**fields), gateway="g", key=KEY, epoch=0, seq=0)  # type: ignore[arg-type]


def _signed(payload: object, **prot: object) -> bytes:
    header = {"gw": "g", "kid": envelope.key_id(KEY), "epoch": 0, "seq": 0, "enc": "msgpack"}
    header.update(prot)
    raw = msgpack.packb(payload, use_bin_type=True)
    return envelope.sign_message(EVENT_DOMAIN, header, raw, KEY)  # type: ignore[arg-type]


GOOD_PAYLOAD = ["r", "threshold", "fired", "d", "p", 0, 1.5, 10, 5, ""]


@pytest.mark.parametrize(
    ("payload", "word"),
    [
        (GOOD_PAYLOAD[:9], "10 items"),
        ({"rule": "r"}, "msgpack|10 items"),
        (["r", "threshold", "fired", "d", "p", "0", 1.5, 10, 5, ""], "pid must be int"),
        (["r", "threshold", "fired", "d", 1, 0, 1.5, 10, 5, ""], "point must be str"),
        (["r", "threshold", "boom", "d", "p", 0, 1.5, 10, 5, ""], "state"),
        (["r", "threshold", "fired", "d", "p", 0, [1], 10, 5, ""], "value"),
    ],
)
def test_decoder_refuses_bad_payloads(payload: object, word: str) -> None:
    sealed = parse_event(_signed(payload))
    sealed.verify(KEY.public_key())
    with pytest.raises(DecodeError, match=word):
        sealed.event()


@pytest.mark.parametrize(
    ("prot", "word"),
    [({"enc": "cbor"}, "enc"), ({"kid": b"1234"}, "kid"), ({"seq": -1}, "seq"), ({"gw": ""}, "gw")],
)
def test_parser_refuses_bad_headers(prot: dict[str, object], word: str) -> None:
    with pytest.raises(FrameError, match=word):
        parse_event(_signed(GOOD_PAYLOAD, **prot))


@given(st.binary(max_size=300))
def test_fuzz_bytes_give_an_event_or_our_error(data: bytes) -> None:
    try:
        event = parse_event(data).event()
    except ProtocolError:
        return
    assert isinstance(event, Event)


@given(
    st.lists(
        st.one_of(st.text(max_size=5), st.integers(-(2**63), 2**63 - 1), st.floats(), st.none()),
        max_size=11,
    )
)
def test_fuzz_payloads_give_an_event_or_decode_error(payload: list[object]) -> None:
    try:
        e = parse_event(_signed(payload)).event()
    except DecodeError:
        return
    assert isinstance(e, Event)
