"""The hub's signed receipt, and the gateway's signed heartbeat (sans-IO).

Two message kinds on the common envelope (:func:`protocols.envelope.sign_message`),
specified in ``docs/envelope.md``.

``vitals/receipt/v1`` — hub -> gateway, signed by the HUB key, QoS 1, on
``{prefix}/{gw}/receipt``::

    protected = {"gw": str, "kid": bin(8), "t": int, "n": int, "enc": "msgpack",
                 ["kind": "event"]}
    payload   = msgpack [[epoch, upto, [[lo, hi], ...]], ...]     (n entries)

``kind`` names the seq series: absent, the gateway's batches (``"batch"`` is
never written); ``"event"``, its edge events (:mod:`protocols.event`, their own
seq per epoch); ``"refused"``, batches the hub refused for good (below). Any
other value is refused.

A receipt of kind ``"refused"`` settles authentic batches the hub will never
store (a batch behind its age window, a payload that does not decode): the
gateway deletes them and counts them refused. Its payload is a list of ranges
with the hub's reason (``[a-z_]``, 1 to 32 characters: ``"too_old"``,
``"bad_payload"``; a gateway takes any such word)::

    payload   = msgpack [[epoch, first, last, reason], ...]     (n ranges)

For each epoch the hub accounts for, ``upto`` is the highest seq such that
every seq ``0..upto`` is durably accounted for (a batch stored, or named by a
gap notice), ``-1`` when seq 0 is not; the ranges (inclusive, sorted, disjoint,
not touching, all above ``upto + 1``, at most :data:`MAX_RECEIPT_RANGES`) are
what is accounted for above it. A receipt is a statement of fact: idempotent,
and harmless when replayed (it never covers a seq the hub did not store).

``vitals/heartbeat/v1`` — gateway -> hub, signed by the GATEWAY key, QoS 1, on
``{prefix}/{gw}/hb``::

    protected = {"gw": str, "kid": bin(8), "epoch": int, "sealed": int, "t": int,
                 "enc": "msgpack"}
    payload   = msgpack [[epoch, first_seq, last_seq], ...]

``epoch`` is the gateway's current boot epoch, ``sealed`` the last seq it sealed
in it (``-1`` before the first); the payload lists the seq ranges its spool
still holds unconfirmed (at most :data:`MAX_HEARTBEAT_RANGES`, oldest first,
possibly none). The hub answers each heartbeat with a receipt.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias, get_args

from protocols import ed25519
from protocols.envelope import (
    MAX_GATEWAY_LEN,
    MAX_U63,
    Sealed,
    check_sender,
    key_id,
    pack,
    parse_message,
    sign_message,
    unpack,
)
from protocols.errors import DecodeError, FrameError, LocalError

__all__ = [
    "HEARTBEAT_DOMAIN",
    "MAX_HEARTBEAT_RANGES",
    "MAX_RECEIPT_EPOCHS",
    "MAX_RECEIPT_RANGES",
    "RECEIPT_DOMAIN",
    "RECEIPT_KINDS",
    "EpochReceipt",
    "HeartbeatHeader",
    "HeldRange",
    "ReceiptHeader",
    "ReceiptKind",
    "RefusedRange",
    "SealedHeartbeat",
    "SealedReceipt",
    "parse_heartbeat",
    "parse_receipt",
    "seal_heartbeat",
    "seal_receipt",
    "seal_refusal",
]

RECEIPT_DOMAIN: Final = "vitals/receipt/v1"
HEARTBEAT_DOMAIN: Final = "vitals/heartbeat/v1"
#: ranges above ``upto`` per epoch in a receipt
MAX_RECEIPT_RANGES: Final = 256
#: epochs in one receipt
MAX_RECEIPT_EPOCHS: Final = 64
#: unconfirmed ranges in one heartbeat
MAX_HEARTBEAT_RANGES: Final = 64
#: the seq series a receipt names: batches (the header has no ``kind``), edge events,
#: or batches the hub refused for good
ReceiptKind: TypeAlias = Literal["batch", "event", "refused"]
RECEIPT_KINDS: Final[tuple[ReceiptKind, ...]] = get_args(ReceiptKind)

_RECEIPT_SCHEMA: Final = {"gw": str, "kid": bytes, "t": int, "n": int, "enc": str}
_HB_SCHEMA: Final = {
    "gw": str,
    "kid": bytes,
    "epoch": int,
    "sealed": int,
    "t": int,
    "enc": str,
}


_REASON: Final = re.compile(r"[a-z_]{1,32}")


def _is_u63(v: object) -> bool:
    return type(v) is int and 0 <= v <= MAX_U63


# --------------------------------------------------------------------------- receipt


@dataclass(frozen=True, slots=True)
class EpochReceipt:
    """What the hub accounts for in one epoch: ``0..upto`` and the ``ranges`` above."""

    epoch: int
    upto: int
    ranges: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, epoch: int, ranges: Sequence[tuple[int, int]]) -> EpochReceipt:
        """The entry for ``ranges`` (sorted, disjoint, not touching): a range from seq 0
        becomes ``upto``; of the rest the first :data:`MAX_RECEIPT_RANGES` are kept."""
        if ranges and ranges[0][0] == 0:
            return cls(epoch, ranges[0][1], tuple(ranges[1 : 1 + MAX_RECEIPT_RANGES]))
        return cls(epoch, -1, tuple(ranges[:MAX_RECEIPT_RANGES]))

    def covers(self, seq: int) -> bool:
        """True if the hub accounts for batch ``seq`` of this epoch."""
        if seq <= self.upto:
            return seq >= 0
        return any(lo <= seq <= hi for lo, hi in self.ranges)

    def check(self) -> str | None:
        """What is wrong with this entry, or None."""
        if not _is_u63(self.epoch):
            return "epoch out of range"
        if type(self.upto) is not int or not -1 <= self.upto < MAX_U63:
            return "upto out of range"
        if len(self.ranges) > MAX_RECEIPT_RANGES:
            return f"more than {MAX_RECEIPT_RANGES} ranges"
        floor = self.upto + 1  # every range starts above this, not touching the one before
        for lo, hi in self.ranges:
            if not (_is_u63(lo) and _is_u63(hi)) or not floor < lo <= hi:
                return "ranges must be sorted, disjoint, above upto+1"
            floor = hi + 1
        return None


@dataclass(frozen=True, slots=True)
class RefusedRange:
    """Batches ``first..last`` (inclusive) of ``epoch`` the hub refused for good, and why."""

    epoch: int
    first: int
    last: int
    reason: str

    def check(self) -> str | None:
        """What is wrong with this range, or None."""
        if not (_is_u63(self.epoch) and _is_u63(self.first) and _is_u63(self.last)):
            return "epoch, first, last out of range"
        if self.first > self.last:
            return "first > last"
        if type(self.reason) is not str or not _REASON.fullmatch(self.reason):
            return "reason must be 1 to 32 of a-z and _"
        return None


@dataclass(frozen=True, slots=True)
class ReceiptHeader:
    gw: str
    kid: bytes
    t: int
    n: int
    enc: str
    kind: ReceiptKind = "batch"


@dataclass(frozen=True, slots=True)
class SealedReceipt(Sealed[ReceiptHeader]):
    """A parsed receipt: header checked, signature (the hub's) not yet."""

    DOMAIN = RECEIPT_DOMAIN

    def epochs(self) -> list[EpochReceipt]:
        """The per-epoch entries, each checked; :class:`DecodeError` if anything is off."""
        if self.header.kind == "refused":
            raise DecodeError("a receipt of kind 'refused' lists refused ranges, not epochs")
        obj = unpack(
            self.message.payload,
            "receipt payload",
            max_array_len=max(MAX_RECEIPT_RANGES, MAX_RECEIPT_EPOCHS),
            max_map_len=0,
            max_ext_len=0,
        )
        if type(obj) is not list or len(obj) != self.header.n:
            raise DecodeError(f"receipt payload must be an array of n={self.header.n} epochs")
        out: list[EpochReceipt] = []
        seen: set[int] = set()
        for i, item in enumerate(obj):
            if type(item) is not list or len(item) != 3 or type(item[2]) is not list:
                raise DecodeError(f"receipt entry {i} must be [epoch, upto, [[lo, hi], ...]]")
            epoch, upto, raw = item
            ranges: list[tuple[int, int]] = []
            for r in raw:
                if type(r) is not list or len(r) != 2:
                    raise DecodeError(f"receipt entry {i}: a range is [lo, hi]")
                ranges.append((r[0], r[1]))
            e = EpochReceipt(epoch, upto, tuple(ranges))
            problem = e.check() if type(epoch) is int and type(upto) is int else "ints expected"
            if problem is not None:
                raise DecodeError(f"receipt entry {i}: {problem}")
            if epoch in seen:
                raise DecodeError(f"receipt entry {i}: epoch {epoch} appears twice")
            seen.add(epoch)
            out.append(e)
        return out

    def refused(self) -> list[RefusedRange]:
        """The refused ranges of a receipt of kind "refused", each checked;
        :class:`DecodeError` if anything is off."""
        if self.header.kind != "refused":
            raise DecodeError(f"a receipt of kind {self.header.kind!r} lists no refused ranges")
        obj = unpack(
            self.message.payload,
            "refusal payload",
            max_array_len=MAX_RECEIPT_EPOCHS,
            max_map_len=0,
            max_ext_len=0,
        )
        if type(obj) is not list or len(obj) != self.header.n:
            raise DecodeError(f"refusal payload must be an array of n={self.header.n} ranges")
        out: list[RefusedRange] = []
        for i, item in enumerate(obj):
            if type(item) is not list or len(item) != 4:
                raise DecodeError(f"refused range {i} must be [epoch, first, last, reason]")
            r = RefusedRange(*item)
            problem = r.check()
            if problem is not None:
                raise DecodeError(f"refused range {i}: {problem}")
            out.append(r)
        return out


def seal_receipt(
    hub_key: ed25519.PrivateKey,
    gw: str,
    epochs: Sequence[EpochReceipt],
    t_ms: int,
    *,
    kind: ReceiptKind = "batch",
) -> bytes:
    """The wire bytes of the hub's signed receipt to ``gw`` (1 to MAX_RECEIPT_EPOCHS
    epochs) for its batches, or (``kind="event"``) for its edge events."""
    if kind not in ("batch", "event"):
        raise LocalError(f"a receipt names batches or events, not {kind!r}")
    if not 1 <= len(epochs) <= MAX_RECEIPT_EPOCHS:
        raise LocalError(f"a receipt names 1 to {MAX_RECEIPT_EPOCHS} epochs, got {len(epochs)}")
    if len({e.epoch for e in epochs}) != len(epochs):
        raise LocalError("a receipt names each epoch once")
    for e in epochs:
        problem = e.check()
        if problem is not None:
            raise LocalError(f"bad receipt entry {e!r}: {problem}")
    payload = [[e.epoch, e.upto, [list(r) for r in e.ranges]] for e in epochs]
    return _seal(hub_key, gw, payload, t_ms, kind)


def seal_refusal(
    hub_key: ed25519.PrivateKey, gw: str, ranges: Sequence[RefusedRange], t_ms: int
) -> bytes:
    """The wire bytes of the hub's signed receipt of kind "refused": ``ranges`` (1 to
    MAX_RECEIPT_EPOCHS) of ``gw``'s batches it will never store, each with its reason."""
    if not 1 <= len(ranges) <= MAX_RECEIPT_EPOCHS:
        raise LocalError(f"a refusal names 1 to {MAX_RECEIPT_EPOCHS} ranges, got {len(ranges)}")
    for r in ranges:
        problem = r.check()
        if problem is not None:
            raise LocalError(f"bad refused range {r!r}: {problem}")
    payload = [[r.epoch, r.first, r.last, r.reason] for r in ranges]
    return _seal(hub_key, gw, payload, t_ms, "refused")


def _seal(
    hub_key: ed25519.PrivateKey, gw: str, payload: list[list[Any]], t_ms: int, kind: ReceiptKind
) -> bytes:
    if not 1 <= len(gw) <= MAX_GATEWAY_LEN or not _is_u63(t_ms):
        raise LocalError("bad gateway id or time for a receipt")
    protected: dict[str, str | bytes | int] = {
        "gw": gw,
        "kid": key_id(hub_key),
        "t": t_ms,
        "n": len(payload),
        "enc": "msgpack",
    }
    if kind != "batch":
        protected["kind"] = kind
    return sign_message(RECEIPT_DOMAIN, protected, pack(payload), hub_key)


def parse_receipt(data: bytes) -> SealedReceipt:
    """A receipt's parts and checked header; no crypto. :class:`FrameError` if malformed."""
    msg = parse_message(data)
    fields = msg.fields(_RECEIPT_SCHEMA, {"kind": str})
    # one encoding per meaning: batches have no "kind", events "event", refusals "refused"
    if fields.get("kind", "event") not in ("event", "refused"):
        raise FrameError(f"receipt header: unknown kind {fields['kind']!r}")
    header = ReceiptHeader(**fields)  # type: ignore[arg-type]
    check_sender(header.gw, header.kid)
    if header.enc != "msgpack":
        raise FrameError(f"receipt header: unknown enc {header.enc!r}")
    if not 1 <= header.n <= MAX_RECEIPT_EPOCHS or not _is_u63(header.t):
        raise FrameError("receipt header: n or t out of range")
    return SealedReceipt(header, msg)


# --------------------------------------------------------------------------- heartbeat


@dataclass(frozen=True, slots=True)
class HeldRange:
    """Batches ``first..last`` (inclusive) of ``epoch`` the gateway still holds unconfirmed."""

    epoch: int
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class HeartbeatHeader:
    gw: str
    kid: bytes
    epoch: int
    sealed: int
    t: int
    enc: str


@dataclass(frozen=True, slots=True)
class SealedHeartbeat(Sealed[HeartbeatHeader]):
    """A parsed heartbeat: header checked, signature (the gateway's) not yet."""

    DOMAIN = HEARTBEAT_DOMAIN

    def held(self) -> list[HeldRange]:
        """The unconfirmed ranges, each checked; :class:`DecodeError` if anything is off."""
        obj = unpack(
            self.message.payload,
            "heartbeat payload",
            max_array_len=MAX_HEARTBEAT_RANGES,
            max_map_len=0,
            max_ext_len=0,
        )
        if type(obj) is not list:
            raise DecodeError("heartbeat payload must be an array")
        out: list[HeldRange] = []
        for i, item in enumerate(obj):
            if type(item) is not list or len(item) != 3 or not all(_is_u63(v) for v in item):
                raise DecodeError(f"heartbeat range {i} must be [epoch, first, last]")
            epoch, first, last = item
            if first > last:
                raise DecodeError(f"heartbeat range {i}: first > last")
            out.append(HeldRange(epoch, first, last))
        return out


def seal_heartbeat(
    key: ed25519.PrivateKey,
    gw: str,
    *,
    epoch: int,
    sealed: int,
    held: Sequence[HeldRange],
    t_ms: int,
) -> bytes:
    """The wire bytes of the gateway's signed heartbeat (``held``: at most 64 ranges)."""
    if len(held) > MAX_HEARTBEAT_RANGES:
        raise LocalError(f"a heartbeat names at most {MAX_HEARTBEAT_RANGES} ranges")
    for h in held:
        if not (_is_u63(h.epoch) and _is_u63(h.first) and _is_u63(h.last) and h.first <= h.last):
            raise LocalError(f"bad held range {h!r}")
    if not 1 <= len(gw) <= MAX_GATEWAY_LEN or not _is_u63(epoch) or not _is_u63(t_ms):
        raise LocalError("bad gateway id, epoch or time for a heartbeat")
    if type(sealed) is not int or not -1 <= sealed < MAX_U63:
        raise LocalError(f"sealed must be -1 or a seq, got {sealed!r}")
    payload = pack([[h.epoch, h.first, h.last] for h in held])
    protected: dict[str, str | bytes | int] = {
        "gw": gw,
        "kid": key_id(key),
        "epoch": epoch,
        "sealed": sealed,
        "t": t_ms,
        "enc": "msgpack",
    }
    return sign_message(HEARTBEAT_DOMAIN, protected, payload, key)


def parse_heartbeat(data: bytes) -> SealedHeartbeat:
    """A heartbeat's parts and checked header; no crypto. :class:`FrameError` if malformed."""
    msg = parse_message(data)
    header = HeartbeatHeader(**msg.fields(_HB_SCHEMA))  # type: ignore[arg-type]
    check_sender(header.gw, header.kid)
    if header.enc != "msgpack":
        raise FrameError(f"heartbeat header: unknown enc {header.enc!r}")
    if not _is_u63(header.epoch) or not _is_u63(header.t) or not -1 <= header.sealed < MAX_U63:
        raise FrameError("heartbeat header: epoch, sealed or t out of range")
    return SealedHeartbeat(header, msg)
