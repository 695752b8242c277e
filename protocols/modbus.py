"""Modbus data model, value codecs and request planning (sans-IO).

A point of a device is a :class:`PointSpec`: where it lives (register space and
address), how its registers turn into a value (type, byte/word order, scale and
offset). :func:`decode` and :func:`encode` convert between register words and
values; :func:`plan` merges the points of a device into the fewest read
requests the device accepts.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "DataType",
    "Order",
    "PointSpec",
    "Space",
]


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
        return {"coil": 1, "discrete": 2, "holding": 3, "input": 4}[self.value]


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
