"""Signed messages, and the signed batch of readings (sans-IO).

Every signed message of vitals has one shape, after COSE_Sign1 (RFC 9052)
encoded with msgpack; the full specification is ``docs/envelope.md``::

    message   = msgpack [1, protected: bin, payload: bin, signature: bin]
    protected = msgpack map of str keys, fixed per message kind
    signature = Ed25519(private key,
                        msgpack [domain: str, protected: bin, payload: bin])

The ``domain`` string names the message kind and its version
(``"vitals/batch/v1"``, ``"vitals/meta/v1"``...); it is not sent, the receiver
knows it from the topic, and it keeps a signature of one kind from ever
verifying as another. :func:`sign_message` and :func:`parse_message` are the
generic part; the batch (:func:`seal`, :func:`parse`) and the point table
(:func:`seal_meta`, :func:`parse_meta`) are its first specialisations.

Parsing checks structure only and never touches a key: the hub first looks the
key up by ``gw`` and ``kid``, then calls ``verify``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Generic, Protocol, TypeAlias, TypeVar, cast

import msgpack

from protocols import ed25519
from protocols.errors import DecodeError, FrameError, InvalidSignature, LocalError, SignatureError
from protocols.payload import (
    ENCODINGS,
    MAX_PAYLOAD_BYTES,
    MAX_READINGS,
    MAX_TS,
    Encoding,
    PointInfo,
    decode_points,
    decode_readings,
    encode_points,
    encode_readings_span,
)
from protocols.reading import Reading

__all__ = [
    "BATCH_DOMAIN",
    "CLOCK_UNSYNCED",
    "META_DOMAIN",
    "VERSION",
    "BatchHeader",
    "MetaHeader",
    "PublicKeyLike",
    "Sealed",
    "SealedBatch",
    "SealedMeta",
    "SignedMessage",
    "check_sender",
    "key_id",
    "pack",
    "parse",
    "parse_message",
    "parse_meta",
    "seal",
    "seal_meta",
    "sign_message",
    "signed_bytes",
    "unpack",
]

VERSION: Final = 1
BATCH_DOMAIN: Final = "vitals/batch/v1"
META_DOMAIN: Final = "vitals/meta/v1"
MAX_GATEWAY_LEN: Final = 64
MAX_MESSAGE_BYTES: Final = MAX_PAYLOAD_BYTES + 64 * 1024

ProtectedValue: TypeAlias = str | bytes | int
PublicKeyLike: TypeAlias = ed25519.PublicKey | bytes

_SIGNATURE_LEN: Final = 64
_KID_LEN: Final = 8
#: the largest epoch, seq or count on the wire (msgpack's signed 64-bit int, not negative)
MAX_U63: Final = 2**63 - 1


def pack(obj: object) -> bytes:
    """msgpack with bin and str apart: how every protected map and payload is packed."""
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


_pack = pack  # the old private name (tests/test_commands.py, bench/cmd_flood.py)


def unpack(payload: bytes, what: str, **limits: int | bool) -> Any:
    """One msgpack value (str as str), read with msgpack's ``limits``
    (``max_array_len``...); :class:`DecodeError` naming ``what`` if it is not one."""
    try:
        return msgpack.unpackb(payload, raw=False, **limits)
    except (ValueError, msgpack.UnpackException) as exc:
        raise DecodeError(f"{what} is not msgpack: {exc}") from exc


def _public(public_key: PublicKeyLike) -> ed25519.PublicKey:
    if isinstance(public_key, ed25519.PublicKey):
        return public_key
    if type(public_key) is bytes and len(public_key) == 32:
        return ed25519.PublicKey.from_public_bytes(public_key)
    raise LocalError("a public key is an ed25519.PublicKey or its 32 raw bytes")


def key_id(public_key: PublicKeyLike | ed25519.PrivateKey) -> bytes:
    """The 8-byte key id: the first 8 bytes of SHA-256 of the raw 32-byte public key.

    A private key is accepted for its public half.
    """
    if isinstance(public_key, ed25519.PrivateKey):
        public_key = public_key.public_key()
    if type(public_key) is bytes and len(public_key) == 32:
        raw = public_key  # no key object needed for a hash of its bytes
    else:
        raw = _public(public_key).public_bytes_raw()
    return hashlib.sha256(raw).digest()[:_KID_LEN]


# --------------------------------------------------------------------------- generic


def signed_bytes(domain: str, protected: bytes, payload: bytes) -> bytes:
    """The bytes the signature covers: msgpack ``[domain, protected, payload]``."""
    return _pack([domain, protected, payload])


def sign_message(
    domain: str,
    protected: Mapping[str, ProtectedValue],
    payload: bytes,
    key: ed25519.PrivateKey,
) -> bytes:
    """The wire bytes of a signed message: ``[1, protected, payload, signature]``.

    ``protected`` is packed as a msgpack map in its iteration order.
    """
    if not all(type(k) is str for k in protected):
        raise LocalError("protected map keys must be str")
    if not all(type(v) in (str, bytes, int) for v in protected.values()):
        raise LocalError("protected map values must be str, bytes or int")
    prot = _pack(dict(protected))
    signature = key.sign(signed_bytes(domain, prot, payload))
    return _pack([VERSION, prot, payload, signature])


@dataclass(frozen=True, slots=True)
class SignedMessage:
    """A parsed ``[1, protected, payload, signature]``: well formed, not yet verified."""

    protected: bytes
    payload: bytes
    signature: bytes

    def verify(self, domain: str, public_key: PublicKeyLike, *, kid: bytes | None = None) -> None:
        """Raise :class:`SignatureError` unless the signature verifies for ``domain``.

        With ``kid`` (the key id the message names), a key with another id is
        refused first: a message must be checked with the key it says signed it.
        """
        if kid is not None and key_id(public_key) != kid:
            raise SignatureError(f"{domain}: kid {kid.hex()} does not match the public key")
        try:
            _public(public_key).verify(
                self.signature, signed_bytes(domain, self.protected, self.payload)
            )
        except InvalidSignature as exc:
            raise SignatureError(f"{domain} signature does not verify") from exc

    def fields(
        self, schema: Mapping[str, type], optional: Mapping[str, type] | None = None
    ) -> dict[str, ProtectedValue]:
        """The protected map, checked against ``schema`` (key -> exact type).

        Exactly the schema's keys (and any of ``optional``'s), each once, each of
        its exact type (a bool is not an int), no trailing bytes: anything else
        raises :class:`FrameError`.
        """
        optional = optional or {}
        try:
            pairs = msgpack.unpackb(
                self.protected, raw=False, strict_map_key=True, object_pairs_hook=list
            )
        except (ValueError, msgpack.UnpackException) as exc:
            raise FrameError(f"protected header is not valid msgpack: {exc}") from exc
        if type(pairs) is not list or not all(type(p) is tuple for p in pairs):
            raise FrameError("protected header must be a msgpack map")
        out: dict[str, ProtectedValue] = {}
        for name, value in pairs:
            if name in out:
                raise FrameError(f"protected header: key {name!r} appears twice")
            want = schema.get(name) or optional.get(name)
            if want is None:
                raise FrameError(f"protected header: unknown key {name!r}")
            if type(value) is not want:
                raise FrameError(
                    f"protected header: {name!r} must be {want.__name__}, "
                    f"got {type(value).__name__}"
                )
            out[name] = cast(ProtectedValue, value)
        missing = [k for k in schema if k not in out]
        if missing:
            raise FrameError(f"protected header: missing key(s) {', '.join(missing)}")
        return out


def parse_message(data: bytes) -> SignedMessage:
    """The parts of a signed message, checked for structure only (no crypto).

    The message must be exactly ``[1, bin, bin, bin(64)]`` in msgpack's
    shortest encoding, with nothing after it; else :class:`FrameError`.
    """
    if type(data) is not bytes:
        raise FrameError(f"a signed message is bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise FrameError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        obj = msgpack.unpackb(data, raw=False, max_array_len=4, max_map_len=0, max_ext_len=0)
    except (ValueError, msgpack.UnpackException) as exc:
        raise FrameError(f"message is not one msgpack value: {exc}") from exc
    if type(obj) is not list:
        raise FrameError(f"message must be a msgpack array, got {type(obj).__name__}")
    if len(obj) != 4:
        raise FrameError(f"message must be an array of 4 items, got {len(obj)}")
    version, protected, payload, signature = obj
    if type(version) is not int:
        raise FrameError(f"message version must be an int, got {type(version).__name__}")
    if version != VERSION:
        raise FrameError(f"unknown message version {version}")
    for name, part in (("protected", protected), ("payload", payload), ("signature", signature)):
        if type(part) is not bytes:
            raise FrameError(f"message {name} must be bin, got {type(part).__name__}")
    if len(signature) != _SIGNATURE_LEN:
        raise FrameError(f"signature must be {_SIGNATURE_LEN} bytes, got {len(signature)}")
    if _pack(obj) != data:
        raise FrameError("message is not in msgpack's shortest encoding")
    return SignedMessage(protected, payload, signature)


class _Header(Protocol):
    @property
    def kid(self) -> bytes: ...


H = TypeVar("H", bound=_Header)


@dataclass(frozen=True, slots=True)
class Sealed(Generic[H]):
    """A parsed message of one kind (its ``DOMAIN``): the ``header`` checked, the
    signature not yet (the receiver looks the key up by ``header.kid`` first)."""

    DOMAIN: ClassVar[str]
    header: H
    message: SignedMessage

    def verify(self, public_key: PublicKeyLike) -> None:
        """:class:`SignatureError` unless ``public_key``, the one ``kid`` names, signed it."""
        self.message.verify(self.DOMAIN, public_key, kid=self.header.kid)


def _check_range(what: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise FrameError(f"protected header: {what} {value} is outside [{low}, {high}]")


def check_sender(gw: str, kid: bytes) -> None:
    """:class:`FrameError` unless ``gw`` is 1 to 64 chars and ``kid`` 8 bytes (every kind)."""
    if not 1 <= len(gw) <= MAX_GATEWAY_LEN:
        raise FrameError(f"protected header: gw must be 1 to {MAX_GATEWAY_LEN} chars")
    if len(kid) != _KID_LEN:
        raise FrameError(f"protected header: kid must be {_KID_LEN} bytes, got {len(kid)}")


def _check_common(gw: str, kid: bytes, epoch: int, enc: str) -> None:
    check_sender(gw, kid)
    if enc not in ENCODINGS:
        raise FrameError(f"protected header: unknown enc {enc!r}")
    _check_range("epoch", epoch, 0, MAX_U63)


def _check_gateway(gateway: str) -> None:
    if type(gateway) is not str or not 1 <= len(gateway) <= MAX_GATEWAY_LEN:
        raise LocalError(f"gateway id must be a str of 1 to {MAX_GATEWAY_LEN} chars")


def _check_counter(name: str, value: int) -> None:
    if type(value) is not int or not 0 <= value <= MAX_U63:
        raise LocalError(f"{name} must be an int in [0, 2**63-1], got {value!r}")


# --------------------------------------------------------------------------- batch


@dataclass(frozen=True, slots=True)
class BatchHeader:
    """The protected header of a batch.

    ``t0``/``t1`` are the earliest and latest reading times (ms, UTC), ``n``
    the number of readings, ``enc`` the payload encoding. Optional:
    ``clock`` is ``"unsynced"`` when the gateway's clock was not synchronised
    (its readings are stamped from its monotonic clock); ``fix_offset_ms``,
    ``fix_until`` and ``fix_last_seq`` (all three or none) are the gateway's clock
    correction for this epoch: readings of batches ``seq <= fix_last_seq`` stamped
    ``ts < fix_until`` are truly at ``ts + fix_offset_ms``. ``split_epoch`` and
    ``split_seq`` (both or none) name the batch this one is a part of: its readings
    re-sealed smaller because it could not pass the broker (the hub stores the
    original or its parts, never both).
    """

    gw: str
    kid: bytes
    epoch: int
    seq: int
    t0: int
    t1: int
    n: int
    enc: Encoding
    clock: str = ""
    fix_offset_ms: int | None = None
    fix_until: int | None = None
    fix_last_seq: int | None = None
    split_epoch: int | None = None
    split_seq: int | None = None

    @property
    def split_of(self) -> tuple[int, int] | None:
        """(epoch, seq) of the batch this one is a part of, or None."""
        if self.split_epoch is None or self.split_seq is None:
            return None
        return self.split_epoch, self.split_seq

    @property
    def unsynced(self) -> bool:
        """The gateway said its clock was not synchronised when it stamped these."""
        return self.clock == CLOCK_UNSYNCED


_BATCH_SCHEMA: Final[Mapping[str, type]] = {
    "gw": str,
    "kid": bytes,
    "epoch": int,
    "seq": int,
    "t0": int,
    "t1": int,
    "n": int,
    "enc": str,
}
_BATCH_OPTIONAL: Final[Mapping[str, type]] = {
    "clock": str,
    "fix_offset_ms": int,
    "fix_until": int,
    "fix_last_seq": int,
    "split_epoch": int,
    "split_seq": int,
}
CLOCK_UNSYNCED: Final = "unsynced"
_FIX_KEYS: Final = ("fix_offset_ms", "fix_until", "fix_last_seq")
_SPLIT_KEYS: Final = ("split_epoch", "split_seq")
_MAX_OFFSET_MS: Final = 100 * 366 * 86_400_000  # a century either way


@dataclass(frozen=True, slots=True)
class SealedBatch:
    """A parsed batch: header checked, signature and payload not yet."""

    header: BatchHeader
    protected: bytes
    payload: bytes
    signature: bytes

    def verify(self, public_key: PublicKeyLike) -> None:
        """Raise :class:`SignatureError` unless ``public_key`` (matching ``kid``) signed it."""
        SignedMessage(self.protected, self.payload, self.signature).verify(
            BATCH_DOMAIN, public_key, kid=self.header.kid
        )

    def readings(self) -> list[Reading]:
        """The readings, checked against the header's ``n``, ``t0`` and ``t1``.

        Grouped by point in order of first appearance, each point's readings in
        their original order. :class:`DecodeError` if anything disagrees.
        """
        h = self.header
        out = decode_readings(self.payload, enc=h.enc)
        if len(out) != h.n:
            raise DecodeError(f"batch header says n={h.n}, payload holds {len(out)} readings")
        ts = [r.ts for r in out]
        t0, t1 = min(ts), max(ts)
        if (t0, t1) != (h.t0, h.t1):
            raise DecodeError(f"batch header says t0={h.t0} t1={h.t1}, readings span {t0} to {t1}")
        return out


def seal(
    readings: Sequence[Reading],
    *,
    gateway: str,
    key: ed25519.PrivateKey,
    epoch: int,
    seq: int,
    enc: Encoding = "msgpack+zlib",
    unsynced: bool = False,
    fix: tuple[int, int, int] | None = None,
    split_of: tuple[int, int] | None = None,
) -> bytes:
    """The wire bytes of a signed batch of ``readings`` (1 to MAX_READINGS of them).

    ``unsynced``: stamped while the gateway's clock was not synchronised.
    ``fix``: the epoch's clock correction ``(offset_ms, until, last_seq)``.
    ``split_of``: ``(epoch, seq)`` of the batch these readings were re-sealed from.
    Raises :class:`LocalError` for arguments or readings that cannot be encoded.
    """
    _check_gateway(gateway)
    _check_counter("epoch", epoch)
    _check_counter("seq", seq)
    if fix is not None:
        offset_ms, until, last_seq = fix
        if not (abs(offset_ms) <= _MAX_OFFSET_MS and 0 <= until <= MAX_TS and last_seq >= 0):
            raise LocalError(f"clock correction {fix!r} is out of range")
    payload, t0, t1 = encode_readings_span(readings, enc=enc)
    protected: dict[str, ProtectedValue] = {
        "gw": gateway,
        "kid": key_id(key),
        "epoch": epoch,
        "seq": seq,
        "t0": t0,
        "t1": t1,
        "n": len(readings),
        "enc": enc,
    }
    if unsynced:
        protected["clock"] = CLOCK_UNSYNCED
    if fix is not None:
        protected.update(zip(_FIX_KEYS, fix, strict=True))
    if split_of is not None:
        _check_counter("split_epoch", split_of[0])
        _check_counter("split_seq", split_of[1])
        protected.update(zip(_SPLIT_KEYS, split_of, strict=True))
    return sign_message(BATCH_DOMAIN, protected, payload, key)


def parse(data: bytes) -> SealedBatch:
    """A batch's parts and checked header; no crypto, payload not decoded.

    :class:`FrameError` names what is malformed.
    """
    msg = parse_message(data)
    f = msg.fields(_BATCH_SCHEMA, _BATCH_OPTIONAL)
    header = BatchHeader(**f)  # type: ignore[arg-type]  # types checked by fields()
    _check_common(header.gw, header.kid, header.epoch, header.enc)
    _check_range("seq", header.seq, 0, MAX_U63)
    _check_range("n", header.n, 1, MAX_READINGS)
    _check_range("t0", header.t0, 0, MAX_TS)
    _check_range("t1", header.t1, header.t0, MAX_TS)
    if "clock" in f and header.clock != CLOCK_UNSYNCED:
        raise FrameError(f"protected header: clock must be {CLOCK_UNSYNCED!r}")
    has_fix = [k in f for k in _FIX_KEYS]
    if any(has_fix):
        if not all(has_fix):
            raise FrameError("protected header: fix_offset_ms, fix_until, fix_last_seq go together")
        for name, low, high in zip(
            _FIX_KEYS, (-_MAX_OFFSET_MS, 0, 0), (_MAX_OFFSET_MS, MAX_TS, MAX_U63), strict=True
        ):
            _check_range(name, cast(int, f[name]), low, high)
    has_split = [k in f for k in _SPLIT_KEYS]
    if any(has_split):
        if not all(has_split):
            raise FrameError("protected header: split_epoch and split_seq go together")
        for name in _SPLIT_KEYS:
            _check_range(name, cast(int, f[name]), 0, MAX_U63)
    return SealedBatch(header, msg.protected, msg.payload, msg.signature)


# --------------------------------------------------------------------------- meta


@dataclass(frozen=True, slots=True)
class MetaHeader:
    """The protected header of a point table: valid for the gateway's ``epoch``."""

    gw: str
    kid: bytes
    epoch: int
    n: int
    enc: Encoding


_META_SCHEMA: Final[Mapping[str, type]] = {
    "gw": str,
    "kid": bytes,
    "epoch": int,
    "n": int,
    "enc": str,
}


@dataclass(frozen=True, slots=True)
class SealedMeta(Sealed[MetaHeader]):
    """A parsed point table: header checked, signature and payload not yet."""

    DOMAIN = META_DOMAIN

    def points(self) -> list[PointInfo]:
        """The point table, checked against the header's ``n``."""
        out = decode_points(self.message.payload, enc=self.header.enc)
        if len(out) != self.header.n:
            raise DecodeError(f"meta header says n={self.header.n}, payload holds {len(out)}")
        return out


def seal_meta(
    points: Sequence[PointInfo],
    *,
    gateway: str,
    key: ed25519.PrivateKey,
    epoch: int,
    enc: Encoding = "msgpack+zlib",
) -> bytes:
    """The wire bytes of the signed point table of ``gateway`` for ``epoch``."""
    _check_gateway(gateway)
    _check_counter("epoch", epoch)
    payload = encode_points(points, enc=enc)
    protected: dict[str, ProtectedValue] = {
        "gw": gateway,
        "kid": key_id(key),
        "epoch": epoch,
        "n": len(points),
        "enc": enc,
    }
    return sign_message(META_DOMAIN, protected, payload, key)


def parse_meta(data: bytes) -> SealedMeta:
    """A point table's parts and checked header; no crypto, payload not decoded."""
    msg = parse_message(data)
    f = msg.fields(_META_SCHEMA)
    header = MetaHeader(**f)  # type: ignore[arg-type]  # types checked by fields()
    _check_common(header.gw, header.kid, header.epoch, header.enc)
    _check_range("n", header.n, 0, MAX_READINGS)
    return SealedMeta(header, msg)
