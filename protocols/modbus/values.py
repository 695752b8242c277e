"""Modbus data model and value codecs (sans-IO).

A point of a device is a :class:`PointSpec`: where it lives (register space and
address), how its registers turn into a value (type, byte/word order, scale and
offset). :func:`decode` and :func:`encode` convert between register words and
values. Planning the reads of many points is :mod:`protocols.modbus.plan`.

Byte and word order
-------------------
A value's bytes in big-endian order are named A B C D ... (A = most
significant). A register (word) carries two bytes, high byte first on the
wire. One rule covers every width:

* ``CDAB`` and ``DCBA`` reverse the order of the words;
* ``BADC`` and ``DCBA`` swap the two bytes inside each word.

Where the bytes land, register by register (``reg0`` is at the point's
address)::

    width   order  reg0  reg1  reg2  reg3
    16 bit  ABCD   A B
            BADC   B A
            CDAB   A B                       (one word: nothing to reverse)
            DCBA   B A
    32 bit  ABCD   A B   C D
            BADC   B A   D C
            CDAB   C D   A B
            DCBA   D C   B A
    64 bit  ABCD   A B   C D   E F   G H
            BADC   B A   D C   F E   H G
            CDAB   G H   E F   C D   A B
            DCBA   H G   F E   D C   B A

So f32 123.456 (bytes 42 F6 E9 79) reads ``[0x42F6, 0xE979]`` in ABCD,
``[0xE979, 0x42F6]`` in CDAB, ``[0xF642, 0x79E9]`` in BADC and
``[0x79E9, 0xF642]`` in DCBA.

Other types:

* ``string``: ``length`` registers, two ASCII characters each. ABCD and CDAB
  put the first character in the high byte, BADC and DCBA in the low byte
  (a string is a sequence, not a number: its words are never reversed).
  Decoding stops at the first NUL (devices often leave garbage after the
  terminator) and strips trailing spaces; a byte above 0x7F is a
  :class:`DecodeError`. Encoding pads with NULs and refuses a NUL inside the
  value (it could not be read back).
* ``bool`` on a register: non-zero is True (encoded as 0 / 1). In the bit
  spaces (coil, discrete) a point is one bit and must be ``bool``.
* ``bit``: ``(word >> bit) & 1`` on the register as received; the order does
  not apply. :func:`encode` yields the word with only that bit set, so
  :func:`write_request` refuses ``bit`` points (it would clear the others;
  that needs a read-modify-write).

Scale and offset
----------------
``value = raw * scale + offset``. An integer point with scale 1 and offset 0
decodes to an ``int``; otherwise to a ``float``, rounded to the number of
decimals of scale and offset (at most 12): with scale 0.1, raw 523 gives
52.3, not 52.300000000000004. That keeps values short and exact on the wire;
since raw is an integer the exact result has no more decimals than that, so
the rounding only removes binary noise. Float points (f32, f64) are scaled
without rounding; NaN and infinities pass through (the scheduler flags them).
:func:`encode` inverts the scaling and raises :class:`LocalError` when the raw
value does not fit the type (70000 into a u16) or is not an integer at the
point's resolution (52.35 into a 0.1-scaled point).
"""

from __future__ import annotations

import enum
import functools
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from protocols.errors import DecodeError, LocalError

__all__ = [
    "ADDRESS_SPACE",
    "READ_BITS_LIMIT",
    "READ_REGISTERS_LIMIT",
    "DataType",
    "Order",
    "PointSpec",
    "PointValue",
    "Space",
    "decimals",
    "decode",
    "encode",
    "register_count",
]

PointValue = float | int | bool | str
"""What a point decodes to."""


class Space(enum.StrEnum):
    """The four Modbus data spaces, named as in profiles and configs."""

    COIL = "coil"  # function 1, 1 bit, read/write
    DISCRETE = "discrete"  # function 2, 1 bit, read only
    INPUT = "input"  # function 4, 16-bit registers, read only
    HOLDING = "holding"  # function 3, 16-bit registers, read/write

    @property
    def is_bits(self) -> bool:
        return self in (Space.COIL, Space.DISCRETE)

    @property
    def read_function(self) -> int:
        return _READ_FUNCTION[self]


_READ_FUNCTION = {Space.COIL: 1, Space.DISCRETE: 2, Space.HOLDING: 3, Space.INPUT: 4}


class DataType(enum.StrEnum):
    """How the registers of a point are read as a value."""

    BOOL = "bool"  # a coil or discrete input, or a register that is 0 / non-zero
    U16 = "u16"
    I16 = "i16"
    U32 = "u32"
    I32 = "i32"
    U64 = "u64"
    I64 = "i64"
    F32 = "f32"
    F64 = "f64"
    STRING = "string"  # ``length`` registers, 2 ASCII bytes each, NUL padded
    BIT = "bit"  # bit ``bit`` (0 = least significant) of one register


class Order(enum.StrEnum):
    """Byte and word order of a multi-byte value, named by where bytes A B C D
    (A = most significant) appear on the wire. ABCD is Modbus' big-endian."""

    ABCD = "ABCD"  # big-endian words, big-endian bytes in each word
    DCBA = "DCBA"  # fully little-endian
    BADC = "BADC"  # big-endian words, bytes swapped inside each word
    CDAB = "CDAB"  # word-swapped ("little-endian word order"), common on meters


@dataclass(frozen=True, slots=True)
class PointSpec:
    """Where a point lives and how to decode it. Validated by its loader."""

    name: str
    space: Space
    address: int  # 0-based protocol address
    type: DataType
    order: Order = Order.ABCD
    length: int = 1  # registers, for STRING only
    bit: int = 0  # for BIT only
    scale: float = 1.0
    offset: float = 0.0


# --------------------------------------------------------------------------- codecs

_MAX_WORD = 0xFFFF
_MAX_DECIMALS = 12
READ_REGISTERS_LIMIT = 125  # Modbus application protocol, functions 3 and 4
READ_BITS_LIMIT = 2000  # functions 1 and 2
ADDRESS_SPACE = 0x10000

# struct format and register count of the fixed-width numeric types
_NUMERIC: dict[DataType, tuple[struct.Struct, int]] = {
    DataType.U16: (struct.Struct(">H"), 1),
    DataType.I16: (struct.Struct(">h"), 1),
    DataType.U32: (struct.Struct(">I"), 2),
    DataType.I32: (struct.Struct(">i"), 2),
    DataType.U64: (struct.Struct(">Q"), 4),
    DataType.I64: (struct.Struct(">q"), 4),
    DataType.F32: (struct.Struct(">f"), 2),
    DataType.F64: (struct.Struct(">d"), 4),
}
_FLOATS = frozenset({DataType.F32, DataType.F64})
_INT_RANGE: dict[DataType, tuple[int, int]] = {
    DataType.U16: (0, 2**16 - 1),
    DataType.I16: (-(2**15), 2**15 - 1),
    DataType.U32: (0, 2**32 - 1),
    DataType.I32: (-(2**31), 2**31 - 1),
    DataType.U64: (0, 2**64 - 1),
    DataType.I64: (-(2**63), 2**63 - 1),
}
_SWAPS_BYTES = frozenset({Order.BADC, Order.DCBA})
_REVERSES_WORDS = frozenset({Order.CDAB, Order.DCBA})


def register_count(spec: PointSpec) -> int:
    """How many registers (or bits, in the coil and discrete spaces) ``spec`` spans.

    Raises :class:`LocalError` for a spec no device could serve (a non-bool
    point in a bit space, a string of no registers, a bit outside 0..15).
    """
    if spec.space.is_bits:
        if spec.type is not DataType.BOOL:
            raise LocalError(
                f"point {spec.name!r}: a {spec.space} point is one bit and must be bool, "
                f"not {spec.type}"
            )
        return 1
    if spec.type is DataType.STRING:
        if spec.length < 1:
            raise LocalError(f"point {spec.name!r}: string length must be >= 1")
        return spec.length
    if spec.type is DataType.BIT:
        if not 0 <= spec.bit <= 15:
            raise LocalError(f"point {spec.name!r}: bit must be 0..15, not {spec.bit}")
        return 1
    if spec.type is DataType.BOOL:
        return 1
    return _NUMERIC[spec.type][1]


def _swap(word: int) -> int:
    return ((word & 0xFF) << 8) | (word >> 8)


def _bytes_to_words(data: bytes, order: Order) -> list[int]:
    words = [(data[i] << 8) | data[i + 1] for i in range(0, len(data), 2)]
    if order in _SWAPS_BYTES:
        words = [_swap(w) for w in words]
    if order in _REVERSES_WORDS:
        words.reverse()
    return words


def _words_to_bytes(words: Sequence[int], order: Order) -> bytes:
    ws = list(words)
    if order in _REVERSES_WORDS:
        ws.reverse()
    if order in _SWAPS_BYTES:
        ws = [_swap(w) for w in ws]
    return b"".join(w.to_bytes(2, "big") for w in ws)


@functools.lru_cache(maxsize=256)
def decimals(scale: float, offset: float) -> int | None:
    """Decimals of the exact result of ``int * scale + offset``, or None if too many."""
    places = 0
    for x in (scale, offset):
        if not math.isfinite(x):
            return None
        places = max(places, -_exponent(x))
    return places if places <= _MAX_DECIMALS else None


def _exponent(x: float) -> int:
    """The exponent of finite ``x``'s shortest repr with trailing zeros dropped (what
    ``Decimal(repr(x)).normalize()`` gives, without loading decimal at every start)."""
    mantissa, _, exp = repr(x).lstrip("-").partition("e")
    whole, _, frac = mantissa.partition(".")
    digits = whole + frac
    kept = digits.rstrip("0")
    if not kept:
        return 0  # zero
    return int(exp or 0) - len(frac) + len(digits) - len(kept)


def _is_identity(spec: PointSpec) -> bool:
    return spec.scale == 1 and spec.offset == 0


def _check_words(spec: PointSpec, words: Sequence[int], count: int) -> None:
    if len(words) != count:
        raise DecodeError(
            f"point {spec.name!r}: {spec.type} needs {count} "
            f"{'bit' if spec.space.is_bits else 'register'}(s), got {len(words)}"
        )
    for w in words:
        if not isinstance(w, int) or not 0 <= w <= _MAX_WORD:
            raise DecodeError(f"point {spec.name!r}: {w!r} is not a 16-bit register value")


def decode(spec: PointSpec, words: Sequence[int]) -> PointValue:
    """The value of ``spec`` from exactly its :func:`register_count` words.

    For the bit spaces ``words`` holds one bit (``bool`` or 0 / 1). Raises
    :class:`DecodeError` for the wrong number of words, a word outside
    0..65535 or a string byte above 0x7F; :class:`LocalError` for an
    impossible spec.
    """
    count = register_count(spec)
    _check_words(spec, words, count)
    if spec.space.is_bits:
        if words[0] not in (0, 1):
            raise DecodeError(f"point {spec.name!r}: {words[0]!r} is not a bit")
        return bool(words[0])
    kind = spec.type
    if kind is DataType.BOOL:
        return words[0] != 0
    if kind is DataType.BIT:
        return bool((words[0] >> spec.bit) & 1)
    if kind is DataType.STRING:
        return _decode_string(spec, words)
    fmt, _ = _NUMERIC[kind]
    raw: int | float = fmt.unpack(_words_to_bytes(words, spec.order))[0]
    if _is_identity(spec):
        return raw
    value = raw * spec.scale + spec.offset
    if kind in _FLOATS:
        return value
    places = decimals(spec.scale, spec.offset)
    return value if places is None else round(value, places)


def _decode_string(spec: PointSpec, words: Sequence[int]) -> str:
    swapped = spec.order in _SWAPS_BYTES
    data = b"".join((_swap(w) if swapped else w).to_bytes(2, "big") for w in words)
    data = data.split(b"\x00", 1)[0].rstrip(b" ")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"point {spec.name!r}: string is not ASCII: {data!r}") from exc


def encode(spec: PointSpec, value: PointValue) -> list[int]:
    """The words that make ``spec`` read ``value``; the inverse of :func:`decode`.

    For the bit spaces the result is one bit, ``[0]`` or ``[1]``. Raises
    :class:`LocalError` when ``value`` has the wrong type, does not fit the
    point's type, or is not a whole raw value at the point's resolution.
    """
    count = register_count(spec)
    kind = spec.type
    if spec.space.is_bits or kind in (DataType.BOOL, DataType.BIT):
        bit = _as_bit(spec, value)
        return [bit << spec.bit] if kind is DataType.BIT else [bit]
    if kind is DataType.STRING:
        return _encode_string(spec, value, count)
    if isinstance(value, str):
        raise LocalError(f"point {spec.name!r}: {spec.type} cannot hold the string {value!r}")
    fmt, _ = _NUMERIC[kind]
    raw: int | float
    if kind in _FLOATS:
        raw = value if _is_identity(spec) else (value - spec.offset) / _scale(spec)
    else:
        raw = _raw_int(spec, value)
    try:
        data = fmt.pack(raw)
    except (struct.error, OverflowError) as exc:
        raise LocalError(f"point {spec.name!r}: {value!r} does not fit a {spec.type}") from exc
    return _bytes_to_words(data, spec.order)


def _as_bit(spec: PointSpec, value: PointValue) -> int:
    if isinstance(value, bool) or (isinstance(value, int | float) and value in (0, 1)):
        return int(value)
    raise LocalError(f"point {spec.name!r}: {value!r} is not a bool")


def _scale(spec: PointSpec) -> float:
    if spec.scale == 0 or not math.isfinite(spec.scale):
        raise LocalError(f"point {spec.name!r}: cannot invert scale {spec.scale!r}")
    return spec.scale


def _raw_int(spec: PointSpec, value: int | float) -> int:
    if isinstance(value, float) and not math.isfinite(value):
        raise LocalError(f"point {spec.name!r}: {value!r} does not fit a {spec.type}")
    if _is_identity(spec):
        if isinstance(value, float) and not value.is_integer():
            raise LocalError(f"point {spec.name!r}: {value!r} is not an integer")
        raw = int(value)
    else:
        exact = (value - spec.offset) / _scale(spec)
        if not math.isfinite(exact):
            raise LocalError(f"point {spec.name!r}: {value!r} does not fit a {spec.type}")
        raw = round(exact)
        if abs(exact - raw) > 1e-6 * max(1.0, abs(exact)):
            raise LocalError(
                f"point {spec.name!r}: {value!r} is not a multiple of the resolution "
                f"{spec.scale!r} (offset {spec.offset!r})"
            )
    low, high = _INT_RANGE[spec.type]
    if not low <= raw <= high:
        raise LocalError(
            f"point {spec.name!r}: raw value {raw} for {value!r} is outside "
            f"{spec.type} range {low}..{high}"
        )
    return raw


def _encode_string(spec: PointSpec, value: PointValue, count: int) -> list[int]:
    if not isinstance(value, str):
        raise LocalError(f"point {spec.name!r}: {value!r} is not a string")
    try:
        data = value.encode("ascii")
    except UnicodeEncodeError as exc:
        raise LocalError(f"point {spec.name!r}: {value!r} is not ASCII") from exc
    if b"\x00" in data:
        raise LocalError(f"point {spec.name!r}: a NUL inside {value!r} could not be read back")
    if len(data) > 2 * count:
        raise LocalError(f"point {spec.name!r}: {value!r} is longer than {2 * count} characters")
    data = data.ljust(2 * count, b"\x00")
    words = [(data[i] << 8) | data[i + 1] for i in range(0, len(data), 2)]
    if spec.order in _SWAPS_BYTES:
        words = [_swap(w) for w in words]
    return words
