"""The signed gap notice: "I dropped these batches, do not wait for them" (sans-IO).

When a gateway's spool drops batches (over its byte or age bound, or because
the disk is full), it tells the hub which ones, so the hub can tell a hole the
gateway knows about from a batch lost on the way. The notice is a signed
message of the common envelope (:func:`protocols.envelope.sign_message`) with
domain ``vitals/gap/v1``, published QoS 1 on ``{prefix}/{gateway}/gap``::

    protected = {"gw": str, "kid": bin(8), "epoch": int, "n": int, "enc": "msgpack"}
    payload   = msgpack [[epoch, first_seq, last_seq, readings, reason], ...]

``epoch`` in the header is the sender's current boot epoch (the notice may
name ranges of earlier epochs); ``n`` is the number of ranges; ``reason`` is
``"spool_full"``, ``"too_old"``, ``"disk_full"``, ``"not_held"`` (the hub asked
for batches with a resend command the spool no longer holds) or ``"split"``
(the batch could not pass the broker and was re-sealed as smaller batches with
new seqs: its readings are not lost). Notices are idempotent:
receiving one twice changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias, get_args

from protocols import ed25519
from protocols.envelope import (
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
    "GAP_DOMAIN",
    "MAX_RANGES",
    "NOT_LOST",
    "REASONS",
    "GapHeader",
    "GapRange",
    "GapReason",
    "SealedGap",
    "parse_gap",
    "seal_gap",
]

GAP_DOMAIN: Final = "vitals/gap/v1"
MAX_RANGES: Final = 4096
GapReason: TypeAlias = Literal["spool_full", "too_old", "disk_full", "not_held", "split"]
REASONS: Final[tuple[GapReason, ...]] = get_args(GapReason)
#: reasons whose readings are not lost: "split" names a batch re-sealed as smaller ones
NOT_LOST: Final[frozenset[GapReason]] = frozenset({"split"})

_SCHEMA: Final = {"gw": str, "kid": bytes, "epoch": int, "n": int, "enc": str}


@dataclass(frozen=True, slots=True)
class GapRange:
    """Batches ``first..last`` (inclusive) of ``epoch``, ``readings`` readings in all."""

    epoch: int
    first: int
    last: int
    readings: int
    reason: GapReason


@dataclass(frozen=True, slots=True)
class GapHeader:
    gw: str
    kid: bytes
    epoch: int
    n: int
    enc: str


@dataclass(frozen=True, slots=True)
class SealedGap(Sealed[GapHeader]):
    """A parsed gap notice: header checked, signature not yet."""

    DOMAIN = GAP_DOMAIN

    def ranges(self) -> list[GapRange]:
        """The dropped ranges, each checked; :class:`DecodeError` if anything is off."""
        obj = unpack(self.message.payload, "gap payload", max_array_len=MAX_RANGES)
        if type(obj) is not list or len(obj) != self.header.n:
            raise DecodeError(f"gap payload must be an array of n={self.header.n} ranges")
        out: list[GapRange] = []
        for i, item in enumerate(obj):
            if type(item) is not list or len(item) != 5:
                raise DecodeError(f"gap range {i} must be [epoch, first, last, readings, reason]")
            epoch, first, last, readings, reason = item
            if not all(type(v) is int for v in (epoch, first, last, readings)):
                raise DecodeError(f"gap range {i}: epoch, first, last, readings are ints")
            if not (
                0 <= epoch <= MAX_U63 and 0 <= first <= last <= MAX_U63 and 0 <= readings <= MAX_U63
            ):
                raise DecodeError(f"gap range {i}: values out of range or first > last")
            if reason not in REASONS:
                raise DecodeError(f"gap range {i}: unknown reason {reason!r}")
            out.append(GapRange(epoch, first, last, readings, reason))
        return out


def seal_gap(
    ranges: Sequence[GapRange], *, gateway: str, key: ed25519.PrivateKey, epoch: int
) -> bytes:
    """The wire bytes of a signed gap notice naming ``ranges`` (1 to MAX_RANGES)."""
    if not 1 <= len(ranges) <= MAX_RANGES:
        raise LocalError(f"a gap notice names 1 to {MAX_RANGES} ranges, got {len(ranges)}")
    for g in ranges:
        if g.reason not in REASONS or not 0 <= g.first <= g.last:
            raise LocalError(f"bad gap range {g!r}")
    payload = pack([[g.epoch, g.first, g.last, g.readings, g.reason] for g in ranges])
    protected: dict[str, str | bytes | int] = {
        "gw": gateway,
        "kid": key_id(key),
        "epoch": epoch,
        "n": len(ranges),
        "enc": "msgpack",
    }
    return sign_message(GAP_DOMAIN, protected, payload, key)


def parse_gap(data: bytes) -> SealedGap:
    """A gap notice's parts and checked header; no crypto. :class:`FrameError` if malformed."""
    msg = parse_message(data)
    f = msg.fields(_SCHEMA)
    header = GapHeader(**f)  # type: ignore[arg-type]  # types checked by fields()
    check_sender(header.gw, header.kid)
    if header.enc != "msgpack":
        raise FrameError(f"gap header: unknown enc {header.enc!r}")
    if not 1 <= header.n <= MAX_RANGES or not 0 <= header.epoch <= MAX_U63:
        raise FrameError("gap header: n or epoch out of range")
    return SealedGap(header, msg)
