"""protocols.receipt: the hub's signed receipt and the gateway's signed heartbeat."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols import command, gap, topics
from protocols.ed25519 import PrivateKey
from protocols.envelope import key_id, sign_message
from protocols.errors import DecodeError, FrameError, LocalError, ProtocolError, SignatureError
from protocols.receipt import (
    HEARTBEAT_DOMAIN,
    RECEIPT_DOMAIN,
    EpochReceipt,
    HeldRange,
    RefusedRange,
    parse_heartbeat,
    parse_receipt,
    seal_heartbeat,
    seal_receipt,
    seal_refusal,
)

HUB = PrivateKey.from_private_bytes(bytes(range(32)))
GW = PrivateKey.from_private_bytes(bytes(range(1, 33)))
T = 1_767_225_600_000


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def test_receipt_round_trip_verifies_with_the_hub_key_only() -> None:
    entries = [EpochReceipt(3, 41, ((43, 50), (60, 60))), EpochReceipt(4, -1, ((2, 5),))]
    wire = seal_receipt(HUB, "gw-1", entries, T)
    r = parse_receipt(wire)
    assert (r.header.gw, r.header.kid, r.header.t, r.header.n) == ("gw-1", key_id(HUB), T, 2)
    r.verify(HUB.public_key())
    assert r.epochs() == entries
    with pytest.raises(SignatureError):
        r.verify(GW.public_key())
    # a gateway's signature over the same bytes is not a receipt
    forged = sign_message(
        RECEIPT_DOMAIN,
        {"gw": "gw-1", "kid": key_id(HUB), "t": T, "n": 1, "enc": "msgpack"},
        pack([[3, 1, []]]),
        GW,
    )
    with pytest.raises(SignatureError):
        parse_receipt(forged).verify(HUB.public_key())


def test_event_receipt_is_its_own_series_under_the_same_signature() -> None:
    entries = [EpochReceipt(7, 4, ((6, 9),))]
    batches = parse_receipt(seal_receipt(HUB, "gw-1", entries, T))
    events = parse_receipt(seal_receipt(HUB, "gw-1", entries, T, kind="event"))
    assert (batches.header.kind, events.header.kind) == ("batch", "event")
    events.verify(HUB.public_key())
    assert events.epochs() == entries
    # the kind is signed: the header of an event receipt cannot be swapped for a batch's
    forged = type(events.message)(
        batches.message.protected, events.message.payload, events.message.signature
    )
    with pytest.raises(SignatureError):
        forged.verify(RECEIPT_DOMAIN, HUB.public_key(), kid=key_id(HUB))
    with pytest.raises(LocalError):
        seal_receipt(HUB, "gw-1", entries, T, kind="meta")


def test_refusal_settles_ranges_with_the_hubs_reason() -> None:
    """A receipt of kind "refused": batches the hub will never store, each range with
    its reason, signed like any receipt; it lists no epochs, a batch receipt no
    refused ranges (one encoding per meaning)."""
    ranges = [RefusedRange(5, 0, 0, "too_old"), RefusedRange(5, 2, 9, "bad_payload")]
    r = parse_receipt(seal_refusal(HUB, "gw-1", ranges, T))
    r.verify(HUB.public_key())
    assert (r.header.kind, r.header.n, r.refused()) == ("refused", 2, ranges)
    with pytest.raises(DecodeError, match="refused"):
        r.epochs()
    with pytest.raises(DecodeError, match="no refused ranges"):
        parse_receipt(seal_receipt(HUB, "gw-1", [EpochReceipt(5, 3)], T)).refused()
    with pytest.raises(SignatureError):
        r.verify(GW.public_key())
    # a reason the gateway does not know yet is still the hub's word: taken as it is
    later = parse_receipt(seal_refusal(HUB, "gw-1", [RefusedRange(1, 4, 4, "quota")], T))
    assert later.refused() == [RefusedRange(1, 4, 4, "quota")]


@pytest.mark.parametrize(
    "ranges",
    [
        [],
        [RefusedRange(1, 0, 0, "too_old")] * 65,
        [RefusedRange(1, 3, 2, "too_old")],
        [RefusedRange(1, 0, 0, "Too-Old")],
        [RefusedRange(1, 0, 0, "")],
        [RefusedRange(-1, 0, 0, "too_old")],
    ],
)
def test_seal_refusal_refuses_bad_values(ranges: list[RefusedRange]) -> None:
    with pytest.raises(LocalError):
        seal_refusal(HUB, "gw-1", ranges, T)


@pytest.mark.parametrize(
    ("payload", "word"),
    [
        ([[1, 0, 0]], "range 0 must be"),
        ([[1, 3, 2, "too_old"]], "first > last"),
        ([[1, 0, 0, "x" * 33]], "reason"),
        ([[1, 0, 0, 7]], "reason"),
        ([[1, -1, 0, "too_old"]], "out of range"),
        ([[1, 0, 0, "too_old"], [1, 1, 1, "too_old"]], "n=1"),
    ],
)
def test_refusal_payloads_refused(payload: object, word: str) -> None:
    prot = {"gw": "gw-1", "kid": key_id(HUB), "t": T, "n": 1, "enc": "msgpack", "kind": "refused"}
    r = parse_receipt(sign_message(RECEIPT_DOMAIN, prot, pack(payload), HUB))
    with pytest.raises(DecodeError, match=word):
        r.refused()


def test_covers() -> None:
    e = EpochReceipt(3, 41, ((43, 50), (60, 60)))
    assert all(e.covers(s) for s in (0, 41, 43, 50, 60))
    assert not any(e.covers(s) for s in (-1, 42, 51, 59, 61))
    assert not EpochReceipt(0, -1).covers(0)


def test_a_heartbeat_is_not_a_receipt() -> None:
    hb = seal_heartbeat(GW, "gw-1", epoch=2, sealed=9, held=[HeldRange(2, 3, 9)], t_ms=T)
    with pytest.raises(FrameError):
        parse_receipt(hb)
    h = parse_heartbeat(hb)
    with pytest.raises(SignatureError):  # same key, other domain
        h.message.verify(RECEIPT_DOMAIN, GW.public_key())


def test_heartbeat_round_trip() -> None:
    held = [HeldRange(1, 7, 7), HeldRange(2, 0, 9)]
    wire = seal_heartbeat(GW, "gw-1", epoch=2, sealed=9, held=held, t_ms=T)
    h = parse_heartbeat(wire)
    h.verify(GW.public_key())
    assert (h.header.epoch, h.header.sealed, h.header.kid) == (2, 9, key_id(GW))
    assert h.held() == held
    empty = parse_heartbeat(seal_heartbeat(GW, "gw-1", epoch=0, sealed=-1, held=[], t_ms=T))
    assert (empty.header.sealed, empty.held()) == (-1, [])
    with pytest.raises(SignatureError):
        h.verify(HUB.public_key())
    h.message.verify(HEARTBEAT_DOMAIN, GW.public_key())


@pytest.mark.parametrize(
    ("entries", "word"),
    [
        ([], "1 to"),
        ([EpochReceipt(1, 5, ((6, 8),))], "above upto"),  # touches upto+1: it would be upto
        ([EpochReceipt(1, 5, ((9, 10), (8, 8)))], "sorted"),
        ([EpochReceipt(1, 5, ((8, 10), (11, 12)))], "disjoint"),  # touching: one range
        ([EpochReceipt(1, -2)], "upto"),
        ([EpochReceipt(1, 0), EpochReceipt(1, 2)], "once"),
        ([EpochReceipt(1, 0, tuple((i, i) for i in range(2, 600, 2)))], "256"),
    ],
)
def test_seal_receipt_refuses_what_is_not_a_fact(entries: list[EpochReceipt], word: str) -> None:
    with pytest.raises(LocalError, match=word):
        seal_receipt(HUB, "gw-1", entries, T)


def test_seal_heartbeat_refuses_bad_values() -> None:
    with pytest.raises(LocalError, match="sealed"):
        seal_heartbeat(GW, "gw-1", epoch=1, sealed=-2, held=[], t_ms=T)
    with pytest.raises(LocalError, match="held"):
        seal_heartbeat(GW, "gw-1", epoch=1, sealed=3, held=[HeldRange(1, 4, 3)], t_ms=T)
    with pytest.raises(LocalError, match="64"):
        seal_heartbeat(GW, "gw-1", epoch=1, sealed=3, held=[HeldRange(1, 0, 0)] * 65, t_ms=T)


def _receipt_with(payload: object, n: int = 1) -> bytes:
    prot: dict[str, str | bytes | int] = {
        "gw": "gw-1",
        "kid": key_id(HUB),
        "t": T,
        "n": n,
        "enc": "msgpack",
    }
    return sign_message(RECEIPT_DOMAIN, prot, pack(payload), HUB)


@pytest.mark.parametrize(
    ("payload", "word"),
    [
        ({"a": 1}, "msgpack|array"),
        ([[1, 2]], "entry 0"),
        ([[1, 2, [[5, 4]]]], "above upto"),
        ([[1, 2, [[4]]]], "range is"),
        ([[1, True, []]], "ints"),
        ([[-1, 2, []]], "epoch"),
        ([[1, 2, []], [2, 3, []]], "n=1"),
    ],
)
def test_receipt_payloads_refused(payload: object, word: str) -> None:
    with pytest.raises(DecodeError, match=word):
        parse_receipt(_receipt_with(payload)).epochs()


def test_receipt_epoch_twice_refused() -> None:
    with pytest.raises(DecodeError, match="twice"):
        parse_receipt(_receipt_with([[1, 2, []], [1, 3, []]], n=2)).epochs()


@pytest.mark.parametrize(
    "prot",
    [
        {"gw": "gw-1", "kid": b"12345678", "t": T, "n": 0, "enc": "msgpack"},
        {"gw": "gw-1", "kid": b"1234", "t": T, "n": 1, "enc": "msgpack"},
        {"gw": "gw-1", "kid": b"12345678", "t": T, "n": 1, "enc": "zlib"},
        {"gw": "gw-1", "kid": b"12345678", "t": T, "n": 1},
        {"gw": "gw-1", "kid": b"12345678", "t": -1, "n": 1, "enc": "msgpack"},
    ],
)
def test_receipt_headers_refused(prot: dict[str, str | bytes | int]) -> None:
    with pytest.raises(FrameError):
        parse_receipt(sign_message(RECEIPT_DOMAIN, prot, pack([]), HUB))


@pytest.mark.parametrize(
    "prot",
    [
        {"gw": "gw-1", "kid": b"12345678", "epoch": 1, "sealed": -2, "t": T, "enc": "msgpack"},
        {"gw": "", "kid": b"12345678", "epoch": 1, "sealed": 0, "t": T, "enc": "msgpack"},
        {"gw": "gw-1", "kid": b"12345678", "epoch": -1, "sealed": 0, "t": T, "enc": "msgpack"},
        {"gw": "gw-1", "kid": b"12345678", "epoch": 1, "sealed": 0, "t": T, "enc": "x"},
    ],
)
def test_heartbeat_headers_refused(prot: dict[str, str | bytes | int]) -> None:
    with pytest.raises(FrameError):
        parse_heartbeat(sign_message(HEARTBEAT_DOMAIN, prot, pack([]), GW))


def _hb_with(payload: object) -> bytes:
    prot: dict[str, str | bytes | int] = {"gw": "gw-1", "kid": key_id(GW), "epoch": 1}
    prot.update({"sealed": 3, "t": T, "enc": "msgpack"})
    return sign_message(HEARTBEAT_DOMAIN, prot, pack(payload), GW)


@pytest.mark.parametrize("payload", [{}, [[1, 2]], [[1, 3, 2]], [[1, -1, 2]], [[1, 2, "3"]]])
def test_heartbeat_payloads_refused(payload: object) -> None:
    with pytest.raises(DecodeError):
        parse_heartbeat(_hb_with(payload)).held()


# ------------------------------------------------------------------------------ fuzzing

_ranges = st.lists(st.integers(0, 1000), max_size=20).map(
    lambda xs: tuple((a, a + 1) for a in sorted({x * 3 + 10 for x in xs}))
)
_entries = st.lists(
    st.builds(EpochReceipt, st.integers(0, 2**63 - 1), st.integers(-1, 8), _ranges),
    min_size=1,
    max_size=8,
    unique_by=lambda e: e.epoch,
)


@given(_entries, st.sampled_from(["batch", "event"]))
def test_fuzz_receipts_round_trip(entries: list[EpochReceipt], kind: str) -> None:
    r = parse_receipt(seal_receipt(HUB, "gw-1", entries, T, kind=kind))
    r.verify(HUB.public_key())
    assert r.epochs() == entries
    assert r.header.kind == kind


@given(st.text(max_size=12).filter(lambda k: k not in ("event", "refused")))
def test_fuzz_receipt_kinds_other_than_event_refused(kind: str) -> None:
    """A batch receipt has no "kind" (one encoding per meaning): an explicit
    "batch", and every other word, is refused before any signature check."""
    prot = {"gw": "gw-1", "kid": key_id(HUB), "t": T, "n": 1, "enc": "msgpack", "kind": kind}
    with pytest.raises(FrameError):
        parse_receipt(sign_message(RECEIPT_DOMAIN, prot, pack([[3, 1, []]]), HUB))


@given(st.binary(max_size=400))
def test_fuzz_bytes_give_a_receipt_or_our_error(data: bytes) -> None:
    try:
        epochs = parse_receipt(data).epochs()
    except ProtocolError:  # FrameError or DecodeError, nothing else
        return
    assert all(e.check() is None for e in epochs)


@given(st.binary(max_size=400))
def test_fuzz_bytes_give_a_heartbeat_or_our_error(data: bytes) -> None:
    try:
        held = parse_heartbeat(data).held()
    except ProtocolError:
        return
    assert all(h.first <= h.last for h in held)


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=20,
)


@given(st.lists(_values, min_size=1, max_size=3))
def test_fuzz_receipt_payloads_decode_or_refuse(payload: list[object]) -> None:
    try:
        out = parse_receipt(_receipt_with(payload, n=len(payload))).epochs()
    except DecodeError:
        return
    for e in out:  # whatever decodes is a fact the sealer would also sign
        assert e.check() is None


@given(st.lists(_values, max_size=4))
def test_fuzz_heartbeat_payloads_decode_or_refuse(payload: list[object]) -> None:
    try:
        out = parse_heartbeat(_hb_with(payload)).held()
    except DecodeError:
        return
    assert all(0 <= h.first <= h.last for h in out)


# ------------------------------------------------------------------------------ neighbours


def test_topics_and_kinds() -> None:
    assert topics.receipt("gw-1") == "vitals/v1/gw-1/receipt"
    assert topics.heartbeat("gw-1", "p") == "p/gw-1/hb"
    assert topics.parse("vitals/v1/gw-1/hb") == ("gw-1", "hb")
    assert topics.parse("vitals/v1/gw-1/receipt") == ("gw-1", "receipt")
    assert topics.subscription("hb") == "vitals/v1/+/hb"


def test_resend_command_and_new_gap_reasons() -> None:
    wire, _ = command.command(
        "resend",
        {"epoch": 3, "ranges": [[lo, lo + 1] for lo in range(0, 128, 2)]},
        gateway="gw-1",
        hub_key=HUB,
        now_ms=T,
    )
    c = command.parse_command(wire)
    assert (c.op, c.args()["epoch"], len(c.args()["ranges"])) == ("resend", 3, 64)
    g = [gap.GapRange(3, 4, 4, 10, "not_held"), gap.GapRange(3, 5, 5, 20, "split")]
    assert gap.parse_gap(seal_gap_of(g)).ranges() == g


def seal_gap_of(ranges: list[gap.GapRange]) -> bytes:
    return gap.seal_gap(ranges, gateway="gw-1", key=GW, epoch=3)
