"""Value codecs of protocols.modbus: one golden table drives encode and decode."""

from __future__ import annotations

import ast
import math
import struct
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import protocols.modbus as modbus_module
from protocols.errors import DecodeError, LocalError
from protocols.modbus import (
    DataType,
    Order,
    PointSpec,
    PointValue,
    Space,
    decode,
    encode,
    register_count,
)

T = DataType
O = Order  # noqa: E741 - short alias keeps the table readable
H = Space.HOLDING


def spec(
    type_: DataType,
    order: Order = Order.ABCD,
    *,
    space: Space = H,
    length: int = 1,
    bit: int = 0,
    scale: float = 1.0,
    offset: float = 0.0,
) -> PointSpec:
    return PointSpec(
        name="p",
        space=space,
        address=0,
        type=type_,
        order=order,
        length=length,
        bit=bit,
        scale=scale,
        offset=offset,
    )


# (case, spec, value, registers): encode(spec, value) == registers and
# decode(spec, registers) == value, with the value's Python type preserved.
GOLDEN: list[tuple[str, PointSpec, PointValue, list[int]]] = [
    # f32 123.456 = 42 F6 E9 79 (the vectors from the module docstring)
    ("f32-abcd", spec(T.F32, O.ABCD), 123.45600128173828, [0x42F6, 0xE979]),
    ("f32-cdab", spec(T.F32, O.CDAB), 123.45600128173828, [0xE979, 0x42F6]),
    ("f32-badc", spec(T.F32, O.BADC), 123.45600128173828, [0xF642, 0x79E9]),
    ("f32-dcba", spec(T.F32, O.DCBA), 123.45600128173828, [0x79E9, 0xF642]),
    ("f32-neg", spec(T.F32), -1.5, [0xBFC0, 0x0000]),
    ("f32-inf", spec(T.F32), math.inf, [0x7F80, 0x0000]),
    ("f32-ninf", spec(T.F32, O.CDAB), -math.inf, [0x0000, 0xFF80]),
    # i32 -2 = FF FF FF FE
    ("i32-abcd", spec(T.I32, O.ABCD), -2, [0xFFFF, 0xFFFE]),
    ("i32-cdab", spec(T.I32, O.CDAB), -2, [0xFFFE, 0xFFFF]),
    ("i32-badc", spec(T.I32, O.BADC), -2, [0xFFFF, 0xFEFF]),
    ("i32-dcba", spec(T.I32, O.DCBA), -2, [0xFEFF, 0xFFFF]),
    ("i32-min", spec(T.I32), -(2**31), [0x8000, 0x0000]),
    # u32 0x12345678
    ("u32-abcd", spec(T.U32, O.ABCD), 0x12345678, [0x1234, 0x5678]),
    ("u32-cdab", spec(T.U32, O.CDAB), 0x12345678, [0x5678, 0x1234]),
    ("u32-badc", spec(T.U32, O.BADC), 0x12345678, [0x3412, 0x7856]),
    ("u32-dcba", spec(T.U32, O.DCBA), 0x12345678, [0x7856, 0x3412]),
    ("u32-max", spec(T.U32), 2**32 - 1, [0xFFFF, 0xFFFF]),
    # u64 0x0102030405060708 = bytes A..H = 01..08
    ("u64-abcd", spec(T.U64, O.ABCD), 0x0102030405060708, [0x0102, 0x0304, 0x0506, 0x0708]),
    ("u64-cdab", spec(T.U64, O.CDAB), 0x0102030405060708, [0x0708, 0x0506, 0x0304, 0x0102]),
    ("u64-badc", spec(T.U64, O.BADC), 0x0102030405060708, [0x0201, 0x0403, 0x0605, 0x0807]),
    ("u64-dcba", spec(T.U64, O.DCBA), 0x0102030405060708, [0x0807, 0x0605, 0x0403, 0x0201]),
    ("u64-max", spec(T.U64), 2**64 - 1, [0xFFFF] * 4),
    # i64
    ("i64-abcd", spec(T.I64, O.ABCD), -2, [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE]),
    ("i64-cdab", spec(T.I64, O.CDAB), -2, [0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF]),
    ("i64-badc", spec(T.I64, O.BADC), -2, [0xFFFF, 0xFFFF, 0xFFFF, 0xFEFF]),
    ("i64-dcba", spec(T.I64, O.DCBA), -2, [0xFEFF, 0xFFFF, 0xFFFF, 0xFFFF]),
    ("i64-min", spec(T.I64), -(2**63), [0x8000, 0, 0, 0]),
    # f64 1.0 = 3F F0 00 .. 00; -2.5 = C0 04 00 .. 00
    ("f64-abcd", spec(T.F64, O.ABCD), 1.0, [0x3FF0, 0, 0, 0]),
    ("f64-cdab", spec(T.F64, O.CDAB), 1.0, [0, 0, 0, 0x3FF0]),
    ("f64-badc", spec(T.F64, O.BADC), 1.0, [0xF03F, 0, 0, 0]),
    ("f64-dcba", spec(T.F64, O.DCBA), 1.0, [0, 0, 0, 0xF03F]),
    ("f64-neg", spec(T.F64), -2.5, [0xC004, 0, 0, 0]),
    ("f64-pi-cdab", spec(T.F64, O.CDAB), math.pi, [0x2D18, 0x5444, 0x21FB, 0x4009]),
    # 16-bit: only the byte swap applies
    ("u16-abcd", spec(T.U16, O.ABCD), 0x1234, [0x1234]),
    ("u16-cdab", spec(T.U16, O.CDAB), 0x1234, [0x1234]),
    ("u16-badc", spec(T.U16, O.BADC), 0x1234, [0x3412]),
    ("u16-dcba", spec(T.U16, O.DCBA), 0x1234, [0x3412]),
    ("u16-max", spec(T.U16), 65535, [0xFFFF]),
    ("i16-neg", spec(T.I16), -1, [0xFFFF]),
    ("i16-min", spec(T.I16), -32768, [0x8000]),
    ("i16-badc", spec(T.I16, O.BADC), -2, [0xFEFF]),
    # scale and offset: value = raw * scale + offset, rounded to their decimals
    ("u16-deci", spec(T.U16, scale=0.1), 52.3, [523]),
    ("u16-deci-zero", spec(T.U16, scale=0.1), 0.0, [0]),
    ("i16-centi-offset", spec(T.I16, scale=0.01, offset=-40.0), 12.34, [5234]),
    ("i16-centi-offset-neg", spec(T.I16, scale=0.01, offset=-40.0), -40.01, [0xFFFF]),
    ("i32-milli", spec(T.I32, scale=0.001), -1.5, [0xFFFF, 0xFA24]),
    ("u16-kelvin", spec(T.U16, scale=0.01, offset=-273.15), 20.0, [29315]),
    ("u16-times-ten", spec(T.U16, scale=10.0), 1230.0, [123]),
    ("u16-half", spec(T.U16, scale=0.5), 7.5, [15]),
    ("u32-deci-cdab", spec(T.U32, O.CDAB, scale=0.1), 6553.6, [0x0000, 0x0001]),
    ("f32-scaled", spec(T.F32, scale=2.0, offset=1.0), -2.0, [0xBFC0, 0x0000]),
    # strings: two ASCII characters per register, NUL padded
    ("str-abcd", spec(T.STRING, O.ABCD, length=1), "AB", [0x4142]),
    ("str-badc", spec(T.STRING, O.BADC, length=1), "AB", [0x4241]),
    ("str-dcba", spec(T.STRING, O.DCBA, length=1), "AB", [0x4241]),
    ("str-cdab", spec(T.STRING, O.CDAB, length=1), "AB", [0x4142]),
    ("str-pad", spec(T.STRING, length=3), "HELLO", [0x4845, 0x4C4C, 0x4F00]),
    ("str-pad-badc", spec(T.STRING, O.BADC, length=3), "HELLO", [0x4548, 0x4C4C, 0x004F]),
    ("str-empty", spec(T.STRING, length=2), "", [0, 0]),
    ("str-inner-space", spec(T.STRING, length=2), "A B", [0x4120, 0x4200]),
    # bool on a register, bit of a register, bits of the bit spaces
    ("bool-true", spec(T.BOOL), True, [1]),
    ("bool-false", spec(T.BOOL), False, [0]),
    ("bit-3", spec(T.BIT, bit=3), True, [0x0008]),
    ("bit-15", spec(T.BIT, bit=15), True, [0x8000]),
    ("bit-off", spec(T.BIT, bit=7), False, [0]),
    ("coil-on", spec(T.BOOL, space=Space.COIL), True, [1]),
    ("coil-off", spec(T.BOOL, space=Space.COIL), False, [0]),
    ("discrete-on", spec(T.BOOL, space=Space.DISCRETE), True, [1]),
]


@pytest.mark.parametrize(("case", "sp", "value", "regs"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_decode(case: str, sp: PointSpec, value: PointValue, regs: list[int]) -> None:
    got = decode(sp, regs)
    assert got == value
    assert type(got) is type(value)
    if isinstance(value, float):
        assert repr(got) == repr(value)


@pytest.mark.parametrize(("case", "sp", "value", "regs"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_encode(case: str, sp: PointSpec, value: PointValue, regs: list[int]) -> None:
    assert encode(sp, value) == regs
    assert len(regs) == register_count(sp)


def test_f32_exact_input_encodes_to_known_vector() -> None:
    # 123.456 itself (not its f32 rounding) encodes to the published vector
    assert encode(spec(T.F32), 123.456) == [0x42F6, 0xE979]
    assert encode(spec(T.F32, O.DCBA), 123.456) == [0x79E9, 0xF642]


# decode-only cases: inputs a device may send that encode never produces
DECODE_ONLY: list[tuple[str, PointSpec, list[int], PointValue]] = [
    ("bool-nonzero", spec(T.BOOL), [0x0500], True),
    ("bit-among-others", spec(T.BIT, bit=1), [0xFFFD], False),
    ("bit-ignores-order", spec(T.BIT, O.DCBA, bit=0), [0x0001], True),
    ("str-trailing-spaces", spec(T.STRING, length=3), [0x4142, 0x2020, 0x2020], "AB"),
    ("str-spaces-then-nul", spec(T.STRING, length=2), [0x4120, 0x2000], "A"),
    ("str-garbage-after-nul", spec(T.STRING, length=2), [0x4100, 0xFFFF], "A"),
    ("str-leading-space-kept", spec(T.STRING, length=1), [0x2041], " A"),
    ("coil-as-bool", spec(T.BOOL, space=Space.COIL), [True], True),
    ("f32-nan", spec(T.F32), [0x7FC0, 0x0000], math.nan),
    ("f64-nan-dcba", spec(T.F64, O.DCBA), [0, 0, 0, 0xF87F], math.nan),
    ("f32-nan-scaled", spec(T.F32, scale=0.1), [0x7FC0, 0x0000], math.nan),
]


@pytest.mark.parametrize(
    ("case", "sp", "regs", "value"), DECODE_ONLY, ids=[d[0] for d in DECODE_ONLY]
)
def test_decode_only(case: str, sp: PointSpec, regs: list[int], value: PointValue) -> None:
    got = decode(sp, regs)
    if isinstance(value, float) and math.isnan(value):
        assert isinstance(got, float)
        assert math.isnan(got)
    else:
        assert got == value
        assert type(got) is type(value)


@pytest.mark.parametrize(
    ("sp", "count"),
    [
        (spec(T.BOOL), 1),
        (spec(T.U16), 1),
        (spec(T.I16), 1),
        (spec(T.BIT, bit=9), 1),
        (spec(T.U32), 2),
        (spec(T.I32), 2),
        (spec(T.F32), 2),
        (spec(T.U64), 4),
        (spec(T.I64), 4),
        (spec(T.F64), 4),
        (spec(T.STRING, length=7), 7),
        (spec(T.BOOL, space=Space.COIL), 1),
        (spec(T.BOOL, space=Space.DISCRETE), 1),
    ],
)
def test_register_count(sp: PointSpec, count: int) -> None:
    assert register_count(sp) == count


@pytest.mark.parametrize(
    "sp",
    [
        spec(T.U16, space=Space.COIL),
        spec(T.F32, space=Space.DISCRETE),
        spec(T.STRING, length=0),
        spec(T.BIT, bit=16),
        spec(T.BIT, bit=-1),
    ],
)
def test_impossible_spec_is_local_error(sp: PointSpec) -> None:
    with pytest.raises(LocalError):
        register_count(sp)
    with pytest.raises(LocalError):
        decode(sp, [0])


@pytest.mark.parametrize(
    ("sp", "regs"),
    [
        (spec(T.U16), []),
        (spec(T.F32), [0x42F6]),  # too few
        (spec(T.F32), [0x42F6, 0xE979, 0]),  # too many
        (spec(T.U64), [0, 0, 0]),
        (spec(T.STRING, length=2), [0x4142]),
        (spec(T.U16), [65536]),
        (spec(T.U16), [-1]),
        (spec(T.I32), [0, 0x1_0000]),
        (spec(T.BOOL, space=Space.COIL), [2]),
        (spec(T.STRING, length=1), [0x41C3]),  # not ASCII
        (spec(T.STRING, O.BADC, length=1), [0x8041]),
    ],
)
def test_bad_words_are_decode_errors(sp: PointSpec, regs: list[int]) -> None:
    with pytest.raises(DecodeError):
        decode(sp, regs)


def test_decode_error_names_the_point_and_keeps_cause() -> None:
    with pytest.raises(DecodeError, match="'p'") as info:
        decode(spec(T.STRING, length=1), [0x41FF])
    assert isinstance(info.value.__cause__, UnicodeDecodeError)


@pytest.mark.parametrize(
    ("sp", "value"),
    [
        (spec(T.U16), 70000),
        (spec(T.U16), -1),
        (spec(T.I16), 32768),
        (spec(T.U32), 2**32),
        (spec(T.I64), 2**63),
        (spec(T.U64), -1),
        (spec(T.U16), 1.5),  # not an integer
        (spec(T.U16), math.nan),
        (spec(T.I32), math.inf),
        (spec(T.U16), "12"),
        (spec(T.F32), "1.0"),
        (spec(T.F32), 1e39),  # beyond f32
        (spec(T.U16, scale=0.1), 52.35),  # finer than the resolution
        (spec(T.U16, scale=0.1), 6553.6),  # raw 65536
        (spec(T.U16, scale=0.1), -0.1),  # raw -1
        (spec(T.U16, scale=0.0), 1.0),  # scale cannot be inverted
        (spec(T.STRING, length=1), "ABC"),  # too long
        (spec(T.STRING, length=2), "é"),  # not ASCII
        (spec(T.STRING, length=2), "A\x00B"),  # unreadable NUL
        (spec(T.STRING, length=2), 12),
        (spec(T.BOOL), 2),
        (spec(T.BOOL), "on"),
        (spec(T.BOOL, space=Space.COIL), 0.5),
        (spec(T.BIT, bit=2), 3),
    ],
)
def test_bad_values_are_local_errors(sp: PointSpec, value: PointValue) -> None:
    with pytest.raises(LocalError):
        encode(sp, value)


def test_encode_accepts_equivalent_inputs() -> None:
    assert encode(spec(T.U16), 7.0) == [7]
    assert encode(spec(T.BOOL), 1) == [1]
    assert encode(spec(T.BOOL, space=Space.COIL), 0) == [0]
    assert encode(spec(T.F32), 2) == [0x4000, 0]


def test_out_of_range_error_keeps_cause() -> None:
    with pytest.raises(LocalError) as info:
        encode(spec(T.F32), 1e39)
    assert info.value.__cause__ is not None


# --- scale: exact decimal results -----------------------------------------------------


@given(raw=st.integers(0, 65535), k=st.integers(1, 6))
def test_decimal_scale_gives_shortest_decimal(raw: int, k: int) -> None:
    sp = spec(T.U16, scale=float(f"1e-{k}"))
    got = decode(sp, [raw])
    assert isinstance(got, float)
    assert Decimal(repr(got)) == Decimal(raw).scaleb(-k)


@given(raw=st.integers(-(2**31), 2**31 - 1))
def test_decimal_scale_with_offset_is_exact(raw: int) -> None:
    sp = spec(T.I32, scale=0.01, offset=-273.15)
    got = decode(sp, encode(spec(T.I32), raw))
    assert Decimal(repr(got)) == Decimal(raw).scaleb(-2) - Decimal("273.15")


def test_unscaled_integers_stay_int() -> None:
    assert type(decode(spec(T.U16), [523])) is int
    assert type(decode(spec(T.U16, scale=1.0, offset=1.0), [523])) is float
    assert decode(spec(T.U16, scale=1.0, offset=1.0), [523]) == 524.0


# --- round trips and fuzz ---------------------------------------------------------------

INT_TYPES = [T.U16, T.I16, T.U32, T.I32, T.U64, T.I64]
RANGES = {
    T.U16: (0, 2**16 - 1),
    T.I16: (-(2**15), 2**15 - 1),
    T.U32: (0, 2**32 - 1),
    T.I32: (-(2**31), 2**31 - 1),
    T.U64: (0, 2**64 - 1),
    T.I64: (-(2**63), 2**63 - 1),
}
orders = st.sampled_from(list(Order))


@given(data=st.data(), type_=st.sampled_from(INT_TYPES), order=orders)
def test_int_round_trip(data: st.DataObject, type_: DataType, order: Order) -> None:
    value = data.draw(st.integers(*RANGES[type_]))
    sp = spec(type_, order)
    words = encode(sp, value)
    assert len(words) == register_count(sp)
    assert all(0 <= w <= 0xFFFF for w in words)
    assert decode(sp, words) == value


@given(value=st.floats(width=32), order=orders)
def test_f32_round_trip(value: float, order: Order) -> None:
    sp = spec(T.F32, order)
    got = decode(sp, encode(sp, value))
    assert isinstance(got, float)
    assert got == value or (math.isnan(got) and math.isnan(value))


@given(value=st.floats(), order=orders)
def test_f64_round_trip_bit_exact(value: float, order: Order) -> None:
    sp = spec(T.F64, order)
    got = decode(sp, encode(sp, value))
    assert isinstance(got, float)
    assert struct.pack(">d", got) == struct.pack(">d", value) or math.isnan(value)


@given(
    data=st.data(),
    type_=st.sampled_from([T.U16, T.I16, T.U32, T.I32, T.U64, T.I64, T.F32, T.F64]),
    order=orders,
)
def test_words_round_trip(data: st.DataObject, type_: DataType, order: Order) -> None:
    sp = spec(type_, order)
    words = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=4))
    words = (words * 4)[: register_count(sp)]
    value = decode(sp, words)
    if isinstance(value, float) and math.isnan(value):
        return  # NaN payloads are not preserved; the value round trip covers NaN
    assert encode(sp, value) == words


@given(
    raw=st.integers(-(2**31), 2**31 - 1),
    type_=st.sampled_from([T.I16, T.U16, T.I32, T.U32]),
    scale=st.sampled_from([0.1, 0.01, 0.001, 0.5, 0.25, 10.0, 100.0]),
    offset=st.sampled_from([0.0, -40.0, 273.15, 0.5]),
    order=orders,
)
def test_scaled_raw_round_trip(
    raw: int, type_: DataType, scale: float, offset: float, order: Order
) -> None:
    low, high = RANGES[type_]
    raw = low + (raw - low) % (high - low + 1)
    sp = spec(type_, order, scale=scale, offset=offset)
    words = encode(spec(type_, order), raw)
    value = decode(sp, words)
    assert isinstance(value, float)
    assert encode(sp, value) == words


ascii_text = st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=10)


@given(text=ascii_text, order=orders, length=st.integers(1, 6))
def test_string_round_trip(text: str, order: Order, length: int) -> None:
    sp = spec(T.STRING, order, length=length)
    if len(text) > 2 * length:
        with pytest.raises(LocalError):
            encode(sp, text)
        return
    words = encode(sp, text)
    assert len(words) == length
    assert decode(sp, words) == text.rstrip(" ")


@given(value=st.booleans(), bit=st.integers(0, 15), order=orders)
def test_bit_and_bool_round_trip(value: bool, bit: int, order: Order) -> None:
    for sp in (
        spec(T.BIT, order, bit=bit),
        spec(T.BOOL, order),
        spec(T.BOOL, space=Space.COIL),
        spec(T.BOOL, space=Space.DISCRETE),
    ):
        assert decode(sp, encode(sp, value)) is value


any_spec = st.builds(
    spec,
    st.sampled_from(list(DataType)),
    orders,
    space=st.sampled_from(list(Space)),
    length=st.integers(-1, 5),
    bit=st.integers(-2, 17),
    scale=st.sampled_from([1.0, 0.1, 0.0, -2.0, 1e-15, math.inf, math.nan]),
    offset=st.sampled_from([0.0, 1.5, -1e300]),
)
any_word = st.one_of(
    st.integers(0, 0xFFFF), st.integers(), st.booleans(), st.floats(), st.none(), st.text()
)


@given(sp=any_spec, words=st.lists(any_word, max_size=8))
def test_decode_fuzz_value_or_our_error(sp: PointSpec, words: list[int]) -> None:
    try:
        value = decode(sp, words)
    except (DecodeError, LocalError):
        return
    assert isinstance(value, float | int | bool | str)


any_value = st.one_of(
    st.integers(),
    st.floats(),
    st.booleans(),
    st.text(max_size=12),
    st.integers(-(2**70), 2**70),
)


@given(sp=any_spec, value=any_value)
def test_encode_fuzz_words_or_local_error(sp: PointSpec, value: PointValue) -> None:
    try:
        words = encode(sp, value)
    except LocalError:
        return
    assert len(words) == register_count(sp)
    assert all(isinstance(w, int) and 0 <= w <= 0xFFFF for w in words)


def test_package_is_sans_io() -> None:
    """No module of protocols/modbus/ (values, plan, pdu, rtu, mbap) does IO."""
    imported: set[str] = set()
    files = sorted(Path(modbus_module.__file__).parent.glob("*.py"))
    assert len(files) >= 6, files
    nodes = [n for f in files for n in ast.walk(ast.parse(f.read_text(encoding="utf-8")))]
    for node in nodes:
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported, "the walk found the imports"
    assert not imported & {"asyncio", "serial", "socket", "selectors", "pymodbus"}
