"""protocols.payload: readings and point-table codecs."""

from __future__ import annotations

import math
import random
import re
import struct
import zlib
from collections import Counter
from collections.abc import Sequence
from itertools import pairwise

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import DecodeError, LocalError
from protocols.payload import (
    COLUMNS_TAG,
    ENCODINGS,
    LAYOUTS,
    MAX_PAYLOAD_BYTES,
    MAX_READINGS,
    MAX_TS,
    Kind,
    PointInfo,
    choose_layout,
    decode_points,
    decode_readings,
    encode_points,
    encode_readings,
    encode_readings_span,
)
from protocols.reading import Columns, Quality, Reading, Value

T = 1_767_225_600_000


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def bits(v: Value) -> object:
    """A value as something whose == is bit-exact and type-exact."""
    if isinstance(v, float):
        return ("f", struct.pack(">d", v))
    return (type(v).__name__, v)


def key(rs: Sequence[Reading]) -> list[tuple[object, ...]]:
    return [(r.point, r.ts, bits(r.value), type(r.quality), int(r.quality)) for r in rs]


def grouped(rs: Sequence[Reading]) -> list[Reading]:
    """The order decode_readings promises: by point of first appearance, stable."""
    first: dict[int, int] = {}
    for r in rs:
        first.setdefault(r.point, len(first))
    return sorted(rs, key=lambda r: first[r.point])


def roundtrip(
    rs: Sequence[Reading], enc: str = "msgpack+zlib", layout: int | None = None
) -> list[Reading]:
    """Every reading back bit for bit; in layout 1's order (grouped by point) for
    layout 1, and for layout 2 in the batch's order when its values share a kind."""
    out = decode_readings(encode_readings(rs, enc=enc, layout=layout), enc=enc)
    if (layout or choose_layout(rs)) == 1:
        assert key(out) == key(grouped(rs))
    else:
        assert Counter(key(out)) == Counter(key(rs))
        if len(msgpack.unpackb(encode_readings(rs, enc="msgpack", layout=2))) == 3:
            assert key(out) == key(rs)  # one block: the batch's order
    return out


def f32(x: float) -> float:
    return float(struct.unpack(">f", struct.pack(">f", x))[0])


# --------------------------------------------------------------------------- golden table

# (case, readings, the payload as msgpack objects)
GOLDEN: list[tuple[str, list[Reading], list[object]]] = [
    ("one int", [Reading(5, T, 42)], [T, [5, Kind.INT, [0], [42]]]),
    (
        "decimal e=1, deltas",
        [Reading(1, T, 52.3), Reading(1, T + 1000, 52.9), Reading(1, T + 2001, 61.0)],
        [T, [1, 1, [0, 1000, 1], [523, 6, 81]]],
    ),
    ("whole float is e=0", [Reading(1, T, 3.0)], [T, [1, 0, [0], [3]]]),
    ("negative decimal e=2", [Reading(1, T, -0.05)], [T, [1, 2, [0], [-5]]]),
    (
        "bools and shared times",
        [Reading(1, T, 1), Reading(2, T, True), Reading(1, T + 5, 2), Reading(2, T + 5, False)],
        [T, [1, Kind.INT, [0, 5], [1, 1]], [2, Kind.BOOL, 0, [True, False]]],
    ),
    (
        "float32 decimal",
        [Reading(1, T, f32(1013.2))],
        [T, [1, Kind.DEC32 + 1, [0], [10132]]],
    ),
    (
        "float32 not decimal",
        [Reading(1, T, f32(1 / 3))],
        [T, [1, Kind.F32, [0], struct.pack(">f", 1 / 3)]],
    ),
    ("float64", [Reading(1, T, 1 / 3)], [T, [1, Kind.F64, [0], struct.pack(">d", 1 / 3)]]),
    ("nan is f32", [Reading(1, T, math.nan)], [T, [1, Kind.F32, [0], struct.pack(">f", math.nan)]]),
    ("-0.0 is f32", [Reading(1, T, -0.0)], [T, [1, Kind.F32, [0], b"\x80\x00\x00\x00"]]),
    ("str is raw", [Reading(1, T, "NE")], [T, [1, Kind.RAW, [0], ["NE"]]]),
    ("mixed is raw", [Reading(1, T, 1), Reading(1, T, 1.5)], [T, [1, Kind.RAW, [0, 0], [1, 1.5]]]),
    ("int beyond int64 is raw", [Reading(1, T, 2**64 - 1)], [T, [1, Kind.RAW, [0], [2**64 - 1]]]),
    (
        "no value, comm error",
        [Reading(1, T, 7), Reading(1, T + 1, None, Quality.COMM_ERROR)],
        [T, [1, Kind.INT, [0, 1], [7], [1, 3 | 16]]],
    ),
    (
        "stale value, no value with good quality",
        [Reading(1, T, 7, Quality.STALE), Reading(1, T + 1, None)],
        [T, [1, Kind.INT, [0, 1], [7], [0, 2, 1, 16]]],
    ),
    ("all none is raw []", [Reading(1, T, None)], [T, [1, Kind.RAW, [0], [], [0, 16]]]),
    (
        "base is the earliest",
        [Reading(1, T + 10, 1), Reading(2, T, 1)],
        [T, [1, Kind.INT, [10], [1]], [2, Kind.INT, [0], [1]]],
    ),
]


@pytest.mark.parametrize(("case", "readings", "obj"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_encode(case: str, readings: list[Reading], obj: list[object]) -> None:
    assert encode_readings(readings, enc="msgpack", layout=1) == pack(obj)


@pytest.mark.parametrize(("case", "readings", "obj"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_decode(case: str, readings: list[Reading], obj: list[object]) -> None:
    for enc in ENCODINGS:
        roundtrip(readings, enc, layout=1)
    assert key(decode_readings(pack(obj), enc="msgpack")) == key(grouped(readings))


def test_types_come_back() -> None:
    out = roundtrip([Reading(1, T, True), Reading(2, T, 1), Reading(3, T, 1.0)])
    assert [type(r.value) for r in out] == [bool, int, float]
    assert all(type(r.quality) is Quality for r in out)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_subclass_values_are_flattened(layout: int) -> None:
    data = encode_readings([Reading(1, T, Quality.STALE)], layout=layout)  # IntEnum is an int
    out = decode_readings(data)
    assert type(out[0].value) is int and out[0].value == 2


def test_zlib_is_smaller_and_capped_decompressor_accepts_it() -> None:
    rs = realistic_batch()
    plain, packed = (encode_readings(rs, enc=e) for e in ("msgpack", "msgpack+zlib"))
    assert len(packed) < len(plain)
    assert zlib.decompress(packed) == plain


# --------------------------------------------------------------------------- size


def realistic_batch(seconds: int = 4, seed: int = 1) -> list[Reading]:
    """16 devices × 8 points at 1 Hz, jittered poll times: 512 readings."""
    rnd = random.Random(seed)
    rs: list[Reading] = []
    for k in range(seconds):
        for d in range(16):
            ts = T + k * 1000 + d * 37 + rnd.randint(0, 3)
            for p in range(8):
                v: Value
                if p < 3:
                    v = round(rnd.uniform(35, 80), 1)  # noise dB(A), LAeq/LAmax/LAmin
                elif p == 3:
                    v = round(rnd.uniform(-5, 30), 1)  # temperature °C
                elif p == 4:
                    v = round(rnd.uniform(0, 20), 1)  # wind m/s
                elif p == 5:
                    v = f32(round(rnd.uniform(900, 1100), 1))  # pressure hPa, f32 register
                elif p == 6:
                    v = f32(rnd.uniform(0, 1))  # a raw f32 ratio
                else:
                    v = rnd.randint(0, 360)  # wind direction
                rs.append(Reading(d * 8 + p, ts, v))
    return rs


def test_realistic_batch_is_small() -> None:
    rs = realistic_batch()
    size = len(encode_readings(rs))
    assert size / len(rs) < 4.5  # payload only; the envelope adds ~0.3 byte/reading
    roundtrip(rs)


# --------------------------------------------------------------------------- hypothesis

values_of_one_kind = st.one_of(
    st.lists(st.integers(-(2**63), 2**64 - 1), min_size=1),
    st.lists(st.booleans(), min_size=1),
    st.lists(st.floats(), min_size=1),
    st.lists(st.floats(width=32), min_size=1),
    st.lists(st.integers(-(10**9), 10**9).map(lambda m: m / 100), min_size=1),
    st.lists(st.integers(-(10**7), 10**7).map(lambda m: f32(m / 10)), min_size=1),
    st.lists(st.text(max_size=5), min_size=1),
    st.lists(
        st.one_of(
            st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text()
        ),
        min_size=1,
    ),
)


@st.composite
def batches(draw: st.DrawFn) -> list[Reading]:
    npoints = draw(st.integers(1, 6))
    base = draw(st.integers(0, MAX_TS))
    ts_s = st.one_of(st.integers(0, MAX_TS), st.integers(base, min(base + 10_000, MAX_TS)))
    shared = draw(st.lists(ts_s, min_size=1, max_size=8))
    rs: list[Reading] = []
    for point in draw(st.lists(st.integers(0, 2**32 - 1), min_size=npoints, unique=True)):
        vals = draw(values_of_one_kind)
        if draw(st.booleans()):
            vals = (vals * len(shared))[: len(shared)]
            times = shared
        else:
            times = draw(st.lists(ts_s, min_size=len(vals), max_size=len(vals)))
        for t, v in zip(times, vals, strict=True):
            q = draw(st.sampled_from(Quality))
            rs.append(Reading(point, t, None if draw(st.integers(0, 9)) == 0 else v, q))
    draw(st.randoms()).shuffle(rs)
    return rs


# 120 examples (300 took 15-45 s of the suite): 20 batches for each of the 6
# encodings x layouts, every reading checked bit for bit, a failure shrunk as before
@settings(max_examples=120)
@given(batches(), st.sampled_from(ENCODINGS), st.sampled_from([1, 2, None]))
def test_roundtrip_any_readings(rs: list[Reading], enc: str, layout: int | None) -> None:
    out = roundtrip(rs, enc, layout)  # checks every reading bit for bit
    assert len(out) == len(rs)


@given(st.binary(max_size=300), st.sampled_from(ENCODINGS))
def test_fuzz_bytes_decode_or_decode_error(data: bytes, enc: str) -> None:
    try:
        out = decode_readings(data, enc=enc)
    except DecodeError:
        return
    assert all(isinstance(r, Reading) for r in out)


msgpack_objects = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=4),
        st.binary(max_size=9),
        st.sampled_from([0, 1, 7, 8, 9, 10, 11, 16, 17, 19, 23, -1, 2**53]),
    ),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=2), inner),
    max_leaves=30,
)


@given(st.integers(0, MAX_TS) | msgpack_objects, st.lists(msgpack_objects, max_size=4))
def test_fuzz_structure_decode_or_decode_error(base: object, series: list[object]) -> None:
    """Well-formed msgpack of the wrong shape: only DecodeError, never a stray error."""
    try:
        out = decode_readings(pack([base, *series]), enc="msgpack")
    except DecodeError:
        return
    assert all(isinstance(r, Reading) for r in out)


@given(batches(), st.data(), st.sampled_from(LAYOUTS))
def test_fuzz_mutated_payload(rs: list[Reading], data: st.DataObject, layout: int) -> None:
    """Flip one byte of a valid plain payload: a value or DecodeError."""
    raw = bytearray(encode_readings(rs, enc="msgpack", layout=layout))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    try:
        out = decode_readings(bytes(raw), enc="msgpack")
    except DecodeError:
        return
    assert len(out) <= MAX_READINGS


# --------------------------------------------------------------------------- strict decoder


def S(*series: object) -> bytes:
    return pack([T, *series])


BAD: list[tuple[str, bytes, str]] = [
    ("not msgpack", b"\xc1", "not valid msgpack"),
    ("trailing bytes", S([1, 7, [0], [1]]) + b"\x00", "not valid msgpack"),
    ("not an array", pack({"a": 1}), "must be an array"),
    ("no series", pack([T]), "2+ items"),
    ("base not int", pack([1.5, [1, 7, [0], [1]]]), "base_ts"),
    ("base negative", pack([-1, [1, 7, [0], [1]]]), "base_ts"),
    ("series not array", S(5), "series 0 must be an array of 4 or 5"),
    ("series too short", S([1, 7, [0]]), "series 0 must be an array of 4 or 5"),
    ("series too long", S([1, 7, [0], [1], [0, 1], 0]), "series 0 must be an array of 4 or 5"),
    ("point negative", S([-1, 7, [0], [1]]), "point id -1"),
    ("point too big", S([2**32, 7, [0], [1]]), "point id"),
    ("point bool", S([True, 7, [0], [1]]), "point id True"),
    ("point twice", S([1, 7, [0], [1]], [1, 7, [0], [1]]), "point 1 appears in two series"),
    ("times empty", S([1, 7, [], []]), "times must not be empty"),
    ("times of floats", S([1, 7, [0.0], [1]]), "series 0 times must be an array of ints"),
    ("times forward ref", S([1, 7, 0, [1]]), "not an earlier one"),
    ("times ref negative", S([1, 7, [0], [1]], [2, 7, -1, [1]]), "not an earlier one"),
    ("ts negative", S([1, 7, [-T - 1], [1]]), "timestamp is outside"),
    ("ts too big", S([1, 7, [MAX_TS], [1]]), "timestamp is outside"),
    ("kind not int", S([1, "int", [0], [1]]), "kind must be an int"),
    ("kind unknown", S([1, 12, [0], [1]]), "unknown kind 12"),
    ("kind negative", S([1, -1, [0], [1]]), "unknown kind -1"),
    ("too few values", S([1, 7, [0, 1], [1]]), "1 values for 2 readings"),
    ("too many values", S([1, 7, [0], [1, 2]]), "2 values for 1 readings"),
    ("int values of floats", S([1, 7, [0], [1.0]]), "values must be an array of ints"),
    ("int beyond int64", S([1, 7, [0, 0], [2**63 - 1, 1]]), "beyond int64"),
    ("mantissa beyond 2**53", S([1, 1, [0], [2**53 + 1]]), "mantissa is beyond"),
    ("bool values of ints", S([1, 8, [0], [1]]), "array of booleans"),
    ("f32 not bin", S([1, 9, [0], [1.0]]), "multiple of 4 bytes"),
    ("f32 ragged", S([1, 9, [0], b"\x00\x00\x00"]), "multiple of 4 bytes"),
    ("f64 ragged", S([1, 10, [0], b"\x00" * 4]), "multiple of 8 bytes"),
    ("raw bin value", S([1, 11, [0], [b"x"]]), "array of bool/int/float/str"),
    ("raw nil value", S([1, 11, [0], [None]]), "array of bool/int/float/str"),
    ("dec32 mantissa beyond 2**53", S([1, 16, [0], [-(2**53) - 1]]), "mantissa is beyond"),
    ("flags empty", S([1, 7, [0], [1], []]), "non-empty array of [index, flag]"),
    ("flags odd", S([1, 7, [0], [1], [0]]), "non-empty array of [index, flag]"),
    ("flags not ints", S([1, 7, [0], [1], ["0", 2]]), "flags must be an array of ints"),
    ("flag index beyond", S([1, 7, [0], [1], [1, 2]]), "index 1 out of order or beyond 1"),
    ("flag index repeated", S([1, 7, [0, 1], [1], [0, 2, 0, 19]]), "index 0 out of order"),
    ("flag zero", S([1, 7, [0], [1], [0, 0]]), "invalid flag 0"),
    ("flag unknown quality", S([1, 7, [0], [1], [0, 5]]), "invalid flag 5"),
    ("flag unknown bit", S([1, 7, [0], [1], [0, 34]]), "invalid flag 34"),
    ("flag negative", S([1, 7, [0], [1], [0, -1]]), "invalid flag -1"),
]


@pytest.mark.parametrize(("case", "data", "message"), BAD, ids=[b[0] for b in BAD])
def test_strict_decoder(case: str, data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=re.escape(message)):
        decode_readings(data, enc="msgpack")


def test_each_bad_case_has_its_own_message() -> None:
    seen: dict[str, str] = {}
    for case, data, _ in BAD:
        with pytest.raises(DecodeError) as info:
            decode_readings(data, enc="msgpack")
        seen.setdefault(str(info.value), case)
    assert len(seen) >= len(BAD) - 12  # a few cases share one rule (and one message)


def test_unknown_encoding() -> None:
    with pytest.raises(DecodeError, match="unknown payload encoding 'gzip'"):
        decode_readings(S([1, 7, [0], [1]]), enc="gzip")
    with pytest.raises(LocalError, match="unknown payload encoding"):
        encode_readings([Reading(1, T, 1)], enc="gzip")


def test_zlib_bomb_is_capped() -> None:
    bomb = zlib.compress(b"\x00" * (MAX_PAYLOAD_BYTES + 1), 9)
    assert len(bomb) < 10_000
    with pytest.raises(DecodeError, match="inflates beyond"):
        decode_readings(bomb)


def test_zlib_damage() -> None:
    good = encode_readings([Reading(1, T, 1)])
    with pytest.raises(DecodeError, match="not valid zlib"):
        decode_readings(b"\x00" + good)
    with pytest.raises(DecodeError, match="truncated"):
        decode_readings(good[:-3])
    with pytest.raises(DecodeError, match="1 trailing bytes after the zlib payload"):
        decode_readings(good + b"\x00")


def test_oversized_payload_refused_before_inflating() -> None:
    with pytest.raises(DecodeError, match="exceeds"):
        decode_readings(b"\x00" * (MAX_PAYLOAD_BYTES + 1), enc="msgpack")


def test_times_references_cannot_multiply_readings() -> None:
    times = list(range(MAX_READINGS // 2))
    ones = [1] * len(times)
    big = S([0, 7, times, ones], [1, 7, 0, ones], [2, 7, 0, ones])
    with pytest.raises(DecodeError, match=f"more than {MAX_READINGS} readings"):
        decode_readings(big, enc="msgpack")


def test_many_empty_arrays_are_refused() -> None:
    data = pack([T, [1, 11, [0], [[]] * (MAX_READINGS + 2)]])
    with pytest.raises(DecodeError, match="not valid msgpack"):
        decode_readings(data, enc="msgpack")
    nested = pack([T, *([[[]] * MAX_READINGS] * 5)])  # 500 005 arrays, each allowed
    with pytest.raises(DecodeError, match="too many arrays"):
        decode_readings(nested, enc="msgpack")


# --------------------------------------------------------------------------- encoder refusals

REFUSED: list[tuple[str, list[Reading], str]] = [
    ("empty", [], "at least one reading"),
    ("ts negative", [Reading(1, -1, 1)], "timestamp -1"),
    ("ts too big", [Reading(1, MAX_TS + 1, 1)], "timestamp"),
    ("ts float", [Reading(1, 1.5, 1)], "timestamp 1.5"),  # type: ignore[arg-type]
    ("point negative", [Reading(-1, T, 1)], "point id -1"),
    ("point str", [Reading("a", T, 1)], "point id 'a'"),  # type: ignore[arg-type]
    ("int too big", [Reading(1, T, 2**64)], "outside msgpack's range"),
    ("int too big mixed", [Reading(1, T, 2**64), Reading(1, T, "x")], "outside msgpack"),
    ("bytes value", [Reading(1, T, b"x")], "cannot be encoded"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("case", "readings", "message"), REFUSED, ids=[r[0] for r in REFUSED])
def test_encoder_refuses(case: str, readings: list[Reading], message: str, layout: int) -> None:
    with pytest.raises(LocalError, match=message.replace("'", ".")):
        encode_readings(readings, layout=layout)


def test_encoder_refuses_unknown_layout() -> None:
    with pytest.raises(LocalError, match="unknown payload layout 3"):
        encode_readings([Reading(1, T, 1)], layout=3)


def test_encoder_refuses_too_many() -> None:
    with pytest.raises(LocalError, match="exceed the limit"):
        encode_readings([Reading(1, T, 1)] * (MAX_READINGS + 1))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_encoder_refuses_unknown_quality(layout: int) -> None:
    with pytest.raises(ValueError, match="is not a valid Quality"):
        encode_readings([Reading(1, T, 1, 9)], layout=layout)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- point table

POINTS = [
    PointInfo(1, "nm-01", "LAeq", "dB(A)", "noise", "sound_level_meter", "laeq_1s"),
    PointInfo(10, "ws-02", "temperature", "°C", "weather", "weather_station", "air_temp"),
]


@pytest.mark.parametrize("enc", ENCODINGS)
def test_points_roundtrip(enc: str) -> None:
    data = encode_points(POINTS, enc=enc)
    assert decode_points(data, enc=enc) == POINTS
    if enc == "msgpack":
        assert msgpack.unpackb(data) == [
            [1, "nm-01", "LAeq", "dB(A)", "noise", "sound_level_meter", "laeq_1s"],
            [10, "ws-02", "temperature", "°C", "weather", "weather_station", "air_temp"],
        ]


@given(
    st.lists(
        st.builds(PointInfo, st.integers(0, 2**32 - 1), *[st.text(max_size=8)] * 6),
        unique_by=lambda p: p.id,
        max_size=10,
    )
)
def test_points_roundtrip_any(points: list[PointInfo]) -> None:
    assert decode_points(encode_points(points)) == points


BAD_POINTS: list[tuple[str, object, str]] = [
    ("not array", {"a": 1}, "must be an array of rows"),
    ("row short", [[1, "a"]], "row 0 must be an array of 7"),
    ("id str", [["1", "a", "b", "c", "d", "e", "f"]], "row 0: id '1'"),
    ("id twice", [[1, *"abcdef"], [1, *"abcdef"]], "row 1: id 1 appears twice"),
    ("field int", [[1, "a", "b", 3, "d", "e", "f"]], "every field but id must be a str"),
]


@pytest.mark.parametrize(("case", "obj", "message"), BAD_POINTS, ids=[b[0] for b in BAD_POINTS])
def test_points_strict(case: str, obj: object, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_points(pack(obj), enc="msgpack")


def test_points_encoder_refuses() -> None:
    with pytest.raises(LocalError, match="appears twice"):
        encode_points([POINTS[0], POINTS[0]])
    with pytest.raises(LocalError, match="must be a str"):
        encode_points([PointInfo(1, "a", "b", None, "d", "e", "f")])  # type: ignore[arg-type]


@given(st.binary(max_size=200), st.sampled_from(ENCODINGS))
def test_points_fuzz(data: bytes, enc: str) -> None:
    try:
        out = decode_points(data, enc=enc)
    except DecodeError:
        return
    assert all(isinstance(p, PointInfo) for p in out)


# --------------------------------------------------------------------------- the encoder's choices
#
# encode_readings used to pack every candidate layout of a float series with
# msgpack and keep the shortest; it now counts the bytes, and takes a short path
# for a series of one reading. REFERENCE is that first encoder, kept here so the
# bytes are proven the same (tests/vectors pins them too).


def _ref_decimal(values: Sequence[float], f32_only: bool) -> tuple[int, list[int]] | None:
    found: list[tuple[int, int]] = []
    top = 0
    for v in values:
        limit = 3.4e38 if f32_only else 2.0**53
        if not abs(v) <= limit or (v == 0.0 and math.copysign(1.0, v) < 0.0):
            return None
        for e in range(top, 7):
            m = round(v * 10**e)
            if f32_only:
                if abs(m) <= 2**53 and f32(m / 10**e) == v:
                    break
            elif m / 10**e == v:
                break
        else:
            return None
        found.append((e, m))
        top = e
    ms = [m * 10 ** (top - e) for e, m in found]
    return None if max(map(abs, ms)) > 2**53 else (top, ms)


def _ref_deltas(ms: Sequence[int]) -> list[int]:
    return [ms[0], *(b - a for a, b in pairwise(ms))]


def _ref_float_series(values: Sequence[float]) -> tuple[int, object]:
    n = len(values)
    candidates: list[tuple[int, object]] = []
    dec = _ref_decimal(values, False)
    if dec is not None:
        candidates.append((Kind.DEC + dec[0], _ref_deltas(dec[1])))
    try:
        same32 = [f32(v) for v in values] == list(values) or all(
            struct.pack(">d", v) == struct.pack(">d", f32(v)) for v in values
        )
    except OverflowError:
        same32 = False
    if same32:
        if dec is None:
            dec32 = _ref_decimal(values, True)
            if dec32 is not None:
                candidates.append((Kind.DEC32 + dec32[0], _ref_deltas(dec32[1])))
        candidates.append((Kind.F32, struct.pack(f">{n}f", *values)))
    else:
        candidates.append((Kind.F64, struct.pack(f">{n}d", *values)))
    return min(candidates, key=lambda c: len(pack(c[1])))


def reference_encode(readings: Sequence[Reading]) -> bytes:
    """The first encoder, for plain values (no refusals): msgpack bytes."""
    groups: dict[int, list[Reading]] = {}
    for r in readings:
        groups.setdefault(r.point, []).append(r)
    base = min(r.ts for r in readings)
    seen: dict[tuple[int, ...], int] = {}
    out: list[object] = [base]
    for index, (point, rs) in enumerate(groups.items()):
        ts = tuple(r.ts for r in rs)
        times: object = seen.get(ts)
        if times is None:
            seen[ts] = index
            times, prev_t, prev_d = [], base, 0
            for t in ts:
                times.append(t - prev_t - prev_d)  # type: ignore[attr-defined]
                prev_t, prev_d = t, t - prev_t
        flags: list[int] = []
        values: list[Value] = []
        for i, r in enumerate(rs):
            if r.value is None:
                flags += (i, int(r.quality) | 16)
            else:
                values.append(r.value)
                if r.quality:
                    flags += (i, int(r.quality))
        types = set(map(type, values))
        kind: int
        packed: object
        if not values:
            kind, packed = Kind.RAW, []
        elif types == {float}:
            kind, packed = _ref_float_series(values)  # type: ignore[arg-type]
        elif types == {bool}:
            kind, packed = Kind.BOOL, values
        elif types == {int} and min(values) >= -(2**63) and max(values) <= 2**63 - 1:  # type: ignore[type-var,operator]
            deltas = _ref_deltas(values)  # type: ignore[arg-type]
            kind, packed = (Kind.INT, deltas) if min(deltas) >= -(2**63) else (Kind.RAW, values)
        else:
            kind, packed = Kind.RAW, values
        out.append([point, kind, times, packed, *([flags] if flags else [])])
    return pack(out)


@given(st.integers(-(2**63), 2**64 - 1))
def test_int_size_is_msgpacks(x: int) -> None:
    from protocols.payload import _int_size

    assert _int_size(x) == len(pack(x))


EDGE_FLOATS = [
    0.0, -0.0, 0.5, 1.0, 12.5, 123.4, -45.5, 1e-6, 1.5e-7, 2.0**31, 2.0**31 + 0.5, 2.0**32,
    2.0**32 - 1, -(2.0**31), -(2.0**31) - 1, 2.0**53, 2.0**53 + 2, 2.0**52 + 0.5, 1e15 + 0.5,
    3.4e38, 3.5e38, math.inf, -math.inf, math.nan, 1 / 3, f32(1 / 3), f32(1013.2), f32(0.1),
    f32(123456.7), 65535.0, 6553.5, 4294967295.0, 429496729.5, 42949672.95, -2147483648.5,
    199999999.9, -199999999.9, 2e8, -2e8, 214748364.8, -214748364.9, 5e-324, 1e-300, 0.1, -0.1,
]  # fmt: skip


@pytest.mark.parametrize("v", EDGE_FLOATS)
def test_one_float_same_bytes_as_reference(v: float) -> None:
    for rs in ([Reading(1, T, v)], [Reading(1, T, v), Reading(1, T + 1000, v)]):
        assert encode_readings(rs, enc="msgpack", layout=1) == reference_encode(rs)


def test_realistic_batches_same_bytes_as_reference() -> None:
    for seed in range(5):
        rs = realistic_batch(seed=seed)
        assert encode_readings(rs, enc="msgpack", layout=1) == reference_encode(rs)
        one_poll = [r for r in rs if r.ts < T + 1000]  # every point once: the short path
        assert encode_readings(one_poll, enc="msgpack", layout=1) == reference_encode(one_poll)


# 120 examples (300 took 12-30 s of the suite): byte for byte against the second
# encoder; the realistic batches above and the vectors keep the fixed cases
@settings(max_examples=120)
@given(batches())
def test_same_bytes_as_reference(rs: list[Reading]) -> None:
    assert encode_readings(rs, enc="msgpack", layout=1) == reference_encode(rs)


@settings(max_examples=300)
@given(
    st.lists(
        st.one_of(
            st.floats(),
            st.floats(width=32),
            st.integers(-(10**12), 10**12).map(lambda m: m / 10),
            st.integers(-(2**40), 2**40).map(lambda m: m / 1000),
            st.integers(-(10**7), 10**7).map(lambda m: f32(m / 100)),
        ),
        min_size=1,
        max_size=4,
    ),
    st.booleans(),
)
def test_float_series_same_bytes_as_reference(values: list[float], one_each: bool) -> None:
    rs = [Reading(i if one_each else 0, T + i, v) for i, v in enumerate(values)]
    assert encode_readings(rs, enc="msgpack", layout=1) == reference_encode(rs)


# --------------------------------------------------------------------------- layout 2: columns

# (case, readings, the payload as msgpack objects): [-2, base_ts, [kind, points, times, values(, flags)]...]
COLUMNS: list[tuple[str, list[Reading], list[object]]] = [
    (
        "a poll of 0.1 floats is one block",
        [
            Reading(30, T + 2, 26.7), Reading(31, T + 2, 28.9), Reading(32, T + 2, -9.6),
            Reading(60, T + 102, 1.0),
        ],
        [-2, T + 2, [1, [30, 1, 1, 28], [0, 0, 0, 100], [267, 289, -96, 10]]],
    ),
    ("whole floats are e=0", [Reading(1, T, 3.0), Reading(2, T, 4.0)], [-2, T, [0, [1, 1], [0, 0], [3, 4]]]),
    ("ints as they are", [Reading(5, T, 42), Reading(6, T, -7)], [-2, T, [7, [5, 1], [0, 0], [42, -7]]]),
    ("points go down", [Reading(9, T, 1), Reading(2, T + 1, 2)], [-2, T, [7, [9, -7], [0, 1], [1, 2]]]),
    ("bools", [Reading(1, T, True), Reading(2, T, False)], [-2, T, [8, [1, 1], [0, 0], [True, False]]]),
    ("strs are raw", [Reading(1, T, "NE"), Reading(2, T, "SW")], [-2, T, [11, [1, 1], [0, 0], ["NE", "SW"]]]),
    (
        "float32 decimals",
        [Reading(1, T, f32(1013.2)), Reading(2, T, f32(1013.3))],
        [-2, T, [17, [1, 1], [0, 0], [10132, 10133]]],
    ),
    (
        "float32 not decimal",
        [Reading(1, T, f32(1 / 3)), Reading(2, T, f32(0.1))],
        [-2, T, [9, [1, 1], [0, 0], struct.pack(">2f", 1 / 3, 0.1)]],
    ),
    (
        "nan and -0.0 are f32",
        [Reading(1, T, math.nan), Reading(2, T, -0.0)],
        [-2, T, [9, [1, 1], [0, 0], struct.pack(">2f", math.nan, -0.0)]],
    ),
    ("float64", [Reading(1, T, 1 / 3)], [-2, T, [10, [1], [0], struct.pack(">d", 1 / 3)]]),
    ("decimal of int32 mantissa", [Reading(1, T, 123456.7)], [-2, T, [1, [1], [0], [1234567]]]),
    ("int beyond int64 is raw", [Reading(1, T, 2**64 - 1)], [-2, T, [11, [1], [0], [2**64 - 1]]]),
    (
        "no value and stale in the block",
        [
            Reading(1, T, 21.5), Reading(2, T, None, Quality.COMM_ERROR),
            Reading(3, T, 21.6, Quality.STALE),
        ],
        [-2, T, [1, [1, 1, 1], [0, 0, 0], [215, 216], [1, 19, 2, 2]]],
    ),
    ("all none", [Reading(1, T, None, Quality.COMM_ERROR)], [-2, T, [11, [1], [0], [], [0, 19]]]),
    (
        "a block a type, in order of first appearance",
        [
            Reading(1, T, 1.5), Reading(2, T, 7), Reading(3, T + 5, "x"), Reading(4, T + 5, 2.5),
            Reading(5, T, None),
        ],
        [
            -2,
            T,
            [1, [1, 3], [0, 5], [15, 25]],
            [7, [2], [0], [7]],
            [11, [3], [5], ["x"]],
            [11, [5], [0], [], [0, 16]],
        ],
    ),
    (
        "floats that need kinds of their own",
        [Reading(1, T, 52.3), Reading(2, T, math.nan), Reading(3, T, 61.4), Reading(4, T, 1 / 3)],
        [
            -2,
            T,
            [1, [1, 2], [0, 0], [523, 614]],
            [9, [2], [0], struct.pack(">f", math.nan)],
            [10, [4], [0], struct.pack(">d", 1 / 3)],
        ],
    ),
]  # fmt: skip


@pytest.mark.parametrize(("case", "readings", "obj"), COLUMNS, ids=[c[0] for c in COLUMNS])
def test_columns_golden_encode(case: str, readings: list[Reading], obj: list[object]) -> None:
    assert encode_readings(readings, enc="msgpack", layout=2) == pack(obj)


@pytest.mark.parametrize(("case", "readings", "obj"), COLUMNS, ids=[c[0] for c in COLUMNS])
def test_columns_golden_decode(case: str, readings: list[Reading], obj: list[object]) -> None:
    out = decode_readings(pack(obj), enc="msgpack")
    assert Counter(key(out)) == Counter(key(readings))
    if len(obj) == 3:
        assert key(out) == key(readings)  # one block: the batch's order
    for enc in ENCODINGS:
        assert key(roundtrip(readings, enc, layout=2)) == key(out)


def test_layout_is_chosen_by_repeats() -> None:
    once = [Reading(p, T, 1.5) for p in range(10)]
    assert choose_layout(once) == 2
    assert choose_layout(once + [Reading(p, T + 1000, 1.5) for p in range(10)]) == 2  # twice
    thrice = once + [Reading(p, T + k * 1000, 1.5) for k in (1, 2) for p in range(10)]
    assert choose_layout(thrice) == 1
    assert msgpack.unpackb(encode_readings(once, enc="msgpack"))[0] == COLUMNS_TAG
    assert msgpack.unpackb(encode_readings(thrice, enc="msgpack"))[0] == T


def fleet_poll(devices: int = 100, points: int = 30, seed: int = 3) -> list[Reading]:
    """One poll of many devices: 0.1-scaled registers, each point once."""
    rnd = random.Random(seed)
    return [
        Reading(d * points + p, T + 100 * (d % 10) + rnd.randint(1, 4), rnd.randint(0, 9999) / 10)
        for d in range(devices)
        for p in range(points)
    ]


def test_columns_fleet_poll_is_one_block_and_smaller() -> None:
    rs = fleet_poll()
    plain = msgpack.unpackb(encode_readings(rs, enc="msgpack", layout=2))
    assert len(plain) == 3 and plain[2][0] == Kind.DEC + 1
    for enc in ENCODINGS:
        assert len(encode_readings(rs, enc=enc, layout=2)) < len(
            encode_readings(rs, enc=enc, layout=1)
        )
    assert key(roundtrip(rs, layout=2)) == key(rs)


any_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.floats(width=32),
    st.integers(-(10**9), 10**9).map(lambda m: m / 10),
    st.text(max_size=5),
)


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(st.integers(0, MAX_TS), any_value, st.sampled_from(Quality)),
        min_size=1,
        max_size=40,
    ),
    st.booleans(),
    st.sampled_from(ENCODINGS),
)
def test_columns_roundtrip_each_point_once(
    rows: list[tuple[int, Value, Quality]], one_kind: bool, enc: str
) -> None:
    """Every value kind (None included) with every quality, each point once."""
    if one_kind:  # the fast path: the first row's type for all, None kept
        t = type(rows[0][1])
        rows = [row for row in rows if row[1] is None or type(row[1]) is t]
    rs = [Reading(i * 7, ts, v, q) for i, (ts, v, q) in enumerate(rows)]
    assert choose_layout(rs) == 2
    out = roundtrip(rs, enc)
    assert len(out) == len(rs)


def C(*blocks: object) -> bytes:
    return pack([-2, T, *blocks])


BAD_COLUMNS: list[tuple[str, bytes, str]] = [
    ("no block", pack([-2, T]), "columns payload must be an array [-2, base_ts, block...]"),
    ("base not int", pack([-2, 1.5, [7, [1], [0], [1]]]), "columns payload: base_ts 1.5"),
    ("base negative", pack([-2, -1, [7, [1], [0], [1]]]), "columns payload: base_ts -1"),
    ("block not array", C(5), "block 0 must be an array of 4 or 5"),
    ("block too short", C([7, [1], [0]]), "block 0 must be an array of 4 or 5"),
    ("block too long", C([7, [1], [0], [1], [0, 2], 0]), "block 0 must be an array of 4 or 5"),
    ("points empty", C([7, [], [], []]), "block 0 points must not be empty"),
    ("points not ints", C([7, [1.0], [0], [1]]), "block 0 points must be an array of ints"),
    ("point negative", C([7, [-1], [0], [1]]), "block 0: a point id is outside"),
    ("point too big", C([7, [2**32 - 1, 1], [0, 0], [1, 1]]), "block 0: a point id is outside"),
    ("times not ints", C([7, [1], ["0"], [1]]), "block 0 times must be an array of ints"),
    ("times count", C([7, [1, 1], [0], [1, 1]]), "block 0: 1 times for 2 points"),
    ("ts negative", C([7, [1], [-T - 1], [1]]), "block 0: a timestamp is outside"),
    ("ts too big", C([7, [1], [MAX_TS], [1]]), "block 0: a timestamp is outside"),
    ("kind not int", C(["int", [1], [0], [1]]), "block 0: kind must be an int"),
    ("kind unknown", C([12, [1], [0], [1]]), "block 0: unknown kind 12"),
    ("too few values", C([7, [1, 1], [0, 0], [1]]), "block 0: 1 values for 2 readings"),
    ("int beyond int64", C([7, [1], [0], [2**63]]), "block 0: an int value is beyond int64"),
    ("mantissa beyond", C([1, [1], [0], [2**53 + 1]]), "block 0 values: a mantissa is beyond"),
    ("f64 ragged", C([10, [1], [0], b"\x00" * 4]), "block 0 values must be a bin of a multiple"),
    ("raw nil value", C([11, [1], [0], [None]]), "block 0 values must be an array of bool"),
    ("flags empty", C([7, [1], [0], [1], []]), "block 0 flags must be a non-empty array"),
    ("flag zero", C([7, [1], [0], [1], [0, 0]]), "block 0 flags: invalid flag 0"),
    ("flag index beyond", C([7, [1], [0], [1], [1, 2]]), "block 0 flags: index 1 out of order"),
    ("second block bad", C([7, [1], [0], [1]], [7, [1], [0], []]), "block 1: 0 values for 1"),
]


@pytest.mark.parametrize(("case", "data", "message"), BAD_COLUMNS, ids=[b[0] for b in BAD_COLUMNS])
def test_columns_strict_decoder(case: str, data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=re.escape(message)):
        decode_readings(data, enc="msgpack")


def test_columns_cannot_exceed_max_readings() -> None:
    half = MAX_READINGS // 2 + 1
    block = [7, [1] * half, [0] * half, [0] * half]
    with pytest.raises(DecodeError, match=f"more than {MAX_READINGS} readings"):
        decode_readings(C(block, block), enc="msgpack")


column_like = st.lists(
    st.one_of(
        st.sampled_from([0, 1, 7, 8, 9, 10, 11, 17, 23]),
        st.lists(st.integers(-3, 3), max_size=4),
        st.lists(st.sampled_from([0, 1, 2, 3, 16, 19, 20]), max_size=4),
        msgpack_objects,
    ),
    min_size=3,
    max_size=6,
)


@given(
    st.integers(0, MAX_TS) | msgpack_objects,
    st.lists(column_like | msgpack_objects, max_size=4),
)
def test_columns_fuzz_structure(base: object, blocks: list[object]) -> None:
    """Well-formed msgpack of nearly the right shape: only DecodeError, never a stray error."""
    try:
        out = decode_readings(pack([COLUMNS_TAG, base, *blocks]), enc="msgpack")
    except DecodeError:
        return
    assert all(isinstance(r, Reading) and type(r.quality) is Quality for r in out)


def test_columns_bool_ids_go_out_as_ints() -> None:
    """Layout 2 checks ids and times with array() (a bool passes as the int it is):
    the wire must still hold ints, never msgpack booleans."""
    data, t0, t1 = encode_readings_span([Reading(True, True, 1.5)], enc="msgpack", layout=2)  # type: ignore[arg-type]
    assert msgpack.unpackb(data) == [COLUMNS_TAG, 1, [1, [1], [0], [15]]]
    assert (type(t0), type(t1)) == (int, int)
    out = decode_readings(data, enc="msgpack")
    assert key(out) == key([Reading(1, 1, 1.5)])


# -- columns: what the batcher holds (decisions 47) -----------------------------------


def test_columns_encode_to_the_same_bytes_as_readings() -> None:
    for seed in range(3):
        rs = realistic_batch(seed=seed)
        one_poll = [r for r in rs if r.ts < T + 1000]  # every point once: layout 2
        for batch in (rs, one_poll):
            cols = Columns.of(batch)
            assert list(cols) == batch and cols == batch
            for layout in (1, 2, None):
                assert encode_readings(cols, layout=layout) == encode_readings(batch, layout=layout)


@settings(max_examples=100)
@given(batches(), st.sampled_from([1, 2, None]))
def test_columns_any_readings_same_bytes(rs: list[Reading], layout: int | None) -> None:
    cols = Columns.of(rs)
    assert encode_readings(cols, enc="msgpack", layout=layout) == encode_readings(
        rs, enc="msgpack", layout=layout
    )
    assert key(list(cols)) == key(rs)  # the same readings back, bit for bit (NaN too)


def test_columns_of_polls_and_slices() -> None:
    cols = Columns()
    cols.add(range(10, 13), T, [1.5, 2, None], [Quality.GOOD, Quality.GOOD, Quality.COMM_ERROR])
    cols.append(20, T + 5, "on", Quality.STALE)
    assert list(cols) == [
        Reading(10, T, 1.5),
        Reading(11, T, 2),
        Reading(12, T, None, Quality.COMM_ERROR),
        Reading(20, T + 5, "on", Quality.STALE),
    ]
    assert cols[1:3] == [Reading(11, T, 2), Reading(12, T, None, Quality.COMM_ERROR)]
    assert cols[-1] == Reading(20, T + 5, "on", Quality.STALE)
    assert decode_readings(encode_readings(cols, layout=2)) == list(cols)


# --------------------------------------------------------------------------- the poller's mantissas


@st.composite
def decimal_polls(draw: st.DrawFn) -> list[tuple[int, list[int], list[int], int]]:
    """Polls as a poller hands them on (decisions 51): point ids, a time, mantissas, exp."""
    polls = []
    pid = draw(st.integers(0, 1000))
    ts = T
    small = st.integers(-(2**15), 2**16 - 1)
    for _ in range(draw(st.integers(1, 6))):
        n = draw(st.integers(1, 8))
        exp = draw(st.sampled_from([1, 1, 1, 2, 3, 6, 7]))  # 7: beyond the payload's
        ms = draw(st.lists(st.one_of(small, st.integers(-(2**40), 2**40)), min_size=n,
                           max_size=n))  # fmt: skip
        polls.append((pid, ms, [], exp))
        pid += n + draw(st.integers(0, 3))
        ts += draw(st.integers(0, 1000))
        polls[-1][2].append(ts)
    return polls


@settings(max_examples=300)
@given(decimal_polls(), st.booleans(), st.booleans())
def test_the_pollers_mantissas_give_the_same_bytes(
    polls: list[tuple[int, list[int], list[int], int]], out_of_range: bool, lazy: bool
) -> None:
    """Columns that carry the mantissas (with their values, or, as the poller hands
    them on, without) encode to the bytes the search for the decimals gives
    (whether the known ones are used or not), and decode back."""
    known, searched = Columns(), Columns()
    for pid, ms, (ts,), exp in polls:
        values = [m / 10**exp for m in ms]
        quals = [Quality.OUT_OF_RANGE if out_of_range and m % 7 == 0 else Quality.GOOD
                 for m in ms]  # fmt: skip
        ids = range(pid, pid + len(ms))
        known.add(ids, ts, None if lazy else values, quals, ms, exp)
        searched.add(ids, ts, list(values), quals)
    assert searched.mants is None
    for layout in (2, None):
        assert encode_readings(known, layout=layout) == encode_readings(searched, layout=layout)
    # (a batch of mixed kinds decodes block by block: compare as sets of readings)
    assert sorted(decode_readings(encode_readings(known, layout=2))) == sorted(searched)


def test_columns_keep_mantissas_only_while_every_reading_has_one() -> None:
    a = Columns()
    a.add(range(3), T, [0.1, 0.2, 0.3], [Quality.GOOD] * 3, [1, 2, 3], 1)
    b = Columns()
    b.add(range(3, 5), T, [0.4, 0.5], [Quality.GOOD] * 2, [4, 5], 1)
    a.extend(b)
    assert (a.mants, a.exp) == ([1, 2, 3, 4, 5], 1)
    assert (a[1:3].mants, a[1:3].exp) == ([2, 3], 1)
    c = Columns()
    c.extend(a)  # empty columns take the other's exponent
    assert (c.mants, c.exp) == ([1, 2, 3, 4, 5], 1)
    other = Columns()
    other.add(range(9, 10), T, [0.01], [Quality.GOOD], [1], 2)
    c.extend(other)  # another exponent: the search for the decimals, as before
    assert c.mants is None
    a.append(7, T, None, Quality.COMM_ERROR)
    assert a.mants is None
    d = Columns()
    d.add(range(2), T, [0.1, 0.2], [Quality.GOOD] * 2, [1, 2], 1)
    d.add(range(2, 3), T, [4], [Quality.GOOD])
    assert d.mants is None


# one step on columns: add with mantissas only (as the poller), with values only,
# with both; append one reading; extend by columns of one such add
_steps = st.lists(
    st.tuples(
        st.sampled_from(["mants", "values", "both", "append", "extend"]),
        st.lists(st.integers(-(2**17), 2**17), min_size=0, max_size=5),
        st.sampled_from([1, 2, 3]),
    ),
    max_size=12,
)


@settings(max_examples=300)
@given(_steps, st.integers(-8, 8), st.integers(-8, 8))
def test_columns_made_of_mantissas_read_as_if_made_of_values(
    steps: list[tuple[str, list[int], int]], lo: int, hi: int
) -> None:
    """Columns whose values are made only when asked (decisions 52) hold what
    columns given every value hold: readings, values, slices; the mantissas
    only while every reading had one of one exponent."""
    cols, want, exps = Columns(), Columns(), set()
    every = True  # every reading came with a mantissa
    for i, (how, ms, exp) in enumerate(steps):
        ids = range(100 * i, 100 * i + len(ms))
        values: list[Value] = [m / 10**exp for m in ms]
        quals = [Quality.GOOD] * len(ms)
        want.add(ids, T + i, list(values), quals)
        if how == "append":
            for pid, v in zip(ids, values, strict=True):
                cols.append(pid, T + i, v, Quality.GOOD)
            every = every and not ms
            continue
        part = Columns() if how == "extend" else cols
        if how == "values":
            part.add(ids, T + i, values, quals)
            every = False  # (even none: an add without mantissas)
        else:
            part.add(ids, T + i, values if how == "both" else None, quals, ms, exp)
            exps.add(exp)  # (even of none: empty columns take the first exponent given)
        if how == "extend":
            cols.extend(part)
    every = every and len(exps) <= 1
    assert cols.values == want.values and list(cols) == list(want)
    assert [cols[k] for k in range(len(want))] == [cols[k - len(want)] for k in range(len(want))]
    assert [cols[k] for k in range(len(want))] == list(want)
    assert cols[lo:hi] == want[lo:hi] and cols[lo:hi].values == want[lo:hi].values
    assert (cols.mants is not None) == every
    if cols.mants is not None:
        assert [m / 10**cols.exp for m in cols.mants] == want.values
