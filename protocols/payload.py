"""Payload codecs of signed messages: readings of a batch, the point table (sans-IO).

The byte layout is specified in ``docs/envelope.md``. A readings payload has
one of two layouts; the encoder picks one per batch (:func:`choose_layout`),
the decoder reads both.

Layout 2, *columns* (for batches in which most points appear once: one poll
of many devices) is ``[-2, base_ts, block...]``; a block holds readings whose
values share one kind, as columns::

    [kind, points, times, values]                # every reading GOOD with a value
    [kind, points, times, values, flags]

``points`` and ``times`` are deltas (the first point absolute, the first time
from ``base_ts``); ``values`` are laid out as in layout 1 below but as they
are, not as deltas (neighbours are different points); ``flags`` as below.

Layout 1, *series* (for batches in which points repeat) is the msgpack array
``[base_ts, series...]`` where each series holds every reading of one point::

    [point, kind, times, values]                 # every reading GOOD with a value
    [point, kind, times, values, flags]          # ``flags`` is never empty

* ``times`` is either an array of delta-of-deltas (``t[-1] = base_ts``,
  ``delta[-1] = 0``) or the integer index of an earlier series that has exactly
  the same timestamps (all points of one device poll share them).
* ``values`` holds the values that are not ``None``, in order; its layout is
  set by ``kind`` (see :class:`Kind`): integer mantissas as deltas for short
  decimals, ints and decimals of float32; raw booleans; packed IEEE 754
  big-endian floats; or raw msgpack values.
* ``flags`` is a flat array ``[index, flag, index, flag...]`` (index strictly
  increasing) for every reading that is not GOOD or has no value:
  ``flag = quality | 16 * (value is None)``.

Decoding is bit-exact: floats come back with the same bits (NaN, infinities
and -0.0 included), ints as ints, bools as bools. Layout 1 gives readings back
grouped by point, points in order of first appearance, each point's readings
in their original order; layout 2 block by block, each block in the batch's
order (a batch whose values are all of one kind is one block: its order).

``enc`` is ``"msgpack"`` (the msgpack bytes as they are) or
``"msgpack+zlib"`` (zlib, RFC 1950, over them). Decoding caps the decoded size
at :data:`MAX_PAYLOAD_BYTES` and the number of readings at
:data:`MAX_READINGS`, so a small hostile message cannot exhaust memory.
"""

from __future__ import annotations

import enum
import math
import struct
import zlib
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate, islice, pairwise, repeat
from operator import itemgetter, mul, sub, truediv
from typing import Any, Final, Literal, TypeAlias, cast, get_args

import msgpack

from protocols.errors import DecodeError, LocalError
from protocols.reading import Columns, Quality, Reading, Value

__all__ = [
    "COLUMNS_MAX_REPEAT",
    "COLUMNS_TAG",
    "ENCODINGS",
    "LAYOUTS",
    "MAX_PAYLOAD_BYTES",
    "MAX_POINT_ID",
    "MAX_READINGS",
    "MAX_TS",
    "Encoding",
    "Kind",
    "PointInfo",
    "choose_layout",
    "decode_points",
    "decode_readings",
    "encode_points",
    "encode_readings",
    "encode_readings_span",
]

Encoding: TypeAlias = Literal["msgpack", "msgpack+zlib"]
ENCODINGS: Final[tuple[Encoding, ...]] = get_args(Encoding)
LAYOUTS: Final = (1, 2)
"""Readings payload layouts: 1 series by point, 2 columns (docs/envelope.md section 3)."""
COLUMNS_TAG: Final = -2
"""The first item of a layout 2 payload (layout 1's first item, base_ts, is never negative)."""
COLUMNS_MAX_REPEAT: Final = 2
"""Layout 2 when the readings per distinct point are at most this (``bench.payload``)."""
MAX_READINGS: Final = 100_000
"""Most readings one payload may hold (encoder and decoder)."""
MAX_PAYLOAD_BYTES: Final = 4 * 1024 * 1024
"""Most bytes of a payload, before and after decompression."""
MAX_POINT_ID: Final = 2**32 - 1
MAX_TS: Final = 2**53 - 1
"""Timestamps are ms since the Unix epoch in ``[0, MAX_TS]`` (exact as a double)."""

# Measured on 500-reading batches (one poll of 17 devices x 30 points, and
# tests/test_payload.py::realistic_batch): level 1 is 4.5x faster than 9 (91 vs
# 417 us) and no bigger (2471 vs 2563 bytes; 1628 vs 1629). The level is the
# sender's choice: any zlib stream decodes the same.
ZLIB_LEVEL: Final = 1

_MAX_MANTISSA: Final = 2**53  # |m| <= 2**53: m is exact as a double, so m / 10**e is portable
_MAX_E: Final = 6
_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1  # msgpack's integer range
_I64_MAX: Final = 2**63 - 1
_NO_VALUE: Final = 16
_POW10: Final = tuple(10**e for e in range(_MAX_E + 1))
_E_RANGE: Final = range(_MAX_E + 1)
_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")


class Kind(enum.IntEnum):
    """How the values of a series are laid out (the integer is on the wire)."""

    DEC = 0  # 0..6: floats, mantissa deltas, value = m / 10**kind (float64 division)
    INT = 7  # ints, deltas
    BOOL = 8  # raw msgpack booleans
    F32 = 9  # one bin: big-endian IEEE 754 binary32, 4 bytes a value
    F64 = 10  # one bin: big-endian IEEE 754 binary64, 8 bytes a value
    RAW = 11  # raw msgpack values (str, mixed types, ints beyond int64)
    DEC32 = 16  # 16..22: floats of float32, mantissa deltas, value = f32(m / 10**(kind-16))


_DEC_KINDS: Final = range(Kind.DEC, Kind.DEC + _MAX_E + 1)
_DEC32_KINDS: Final = range(Kind.DEC32, Kind.DEC32 + _MAX_E + 1)


@dataclass(frozen=True, slots=True)
class PointInfo:
    """What the hub needs to name a point id: one row of the point table."""

    id: int
    device: str
    name: str
    unit: str
    domain: str
    cls: str
    indicator: str


# --------------------------------------------------------------------------- encoding


def _pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def _compress(raw: bytes, enc: Encoding) -> bytes:
    if enc == "msgpack":
        return raw
    if enc == "msgpack+zlib":
        return zlib.compress(raw, ZLIB_LEVEL)
    raise LocalError(f"unknown payload encoding {enc!r}: expected one of {ENCODINGS}")


def _plain(value: Value) -> Value:
    """The value as a plain bool/int/float/str (subclasses such as IntEnum flattened)."""
    t = type(value)
    if t is float or t is int or t is bool or t is str or value is None:
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    raise LocalError(f"reading value {value!r} of type {t.__name__} cannot be encoded")


def _deltas(ms: Sequence[int]) -> list[int]:
    out = [ms[0]]
    out.extend(b - a for a, b in pairwise(ms))
    return out


def _decimal(values: Sequence[float]) -> tuple[int, list[int]] | None:
    """(e, mantissas) with value == m / 10**e bit for bit and the smallest e, or None."""
    found: list[tuple[int, int]] = []
    top = 0
    for v in values:
        if not abs(v) <= _MAX_MANTISSA or (v == 0.0 and math.copysign(1.0, v) < 0.0):
            return None  # NaN, infinities, huge values and -0.0 are not decimals
        for e in range(top, _MAX_E + 1):
            p = _POW10[e]
            m = round(v * p)
            if m / p == v:
                break
        else:
            return None
        found.append((e, m))
        top = e  # a larger e for later values only; earlier ones are rescaled below
    ms = [m * _POW10[top - e] for e, m in found]
    if max(map(abs, ms)) > _MAX_MANTISSA:
        return None
    return top, ms


def _decimal32(values: Sequence[float]) -> tuple[int, list[int]] | None:
    """Like :func:`_decimal` for values of float32: value == f32(m / 10**e)."""
    found: list[tuple[int, int]] = []
    top = 0
    pack, unpack = _F32.pack, _F32.unpack
    for v in values:
        if not abs(v) <= 3.4e38 or (v == 0.0 and math.copysign(1.0, v) < 0.0):
            return None
        for e in range(top, _MAX_E + 1):
            p = _POW10[e]
            m = round(v * p)
            if abs(m) <= _MAX_MANTISSA and unpack(pack(m / p))[0] == v:
                break
        else:
            return None
        found.append((e, m))
        top = e
    ms = [m * _POW10[top - e] for e, m in found]
    if max(map(abs, ms)) > _MAX_MANTISSA:
        return None
    return top, ms


def _same_bits32(values: Sequence[float]) -> bool:
    try:
        packed = struct.pack(f">{len(values)}f", *values)
    except OverflowError:
        return False
    return struct.pack(f">{len(values)}d", *values) == struct.pack(
        f">{len(values)}d", *struct.unpack(f">{len(values)}f", packed)
    )


def _int_size(x: int) -> int:
    """Bytes of ``x`` packed by msgpack (the shortest encoding, as msgpack-python packs)."""
    if x >= 0:
        return 1 if x < 0x80 else 2 if x < 0x100 else 3 if x < 0x10000 else 5 if x < 2**32 else 9
    return 1 if x >= -32 else 2 if x >= -128 else 3 if x >= -32768 else 5 if x >= -(2**31) else 9


def _ints_size(xs: Sequence[int]) -> int:
    """Bytes of the msgpack array of ints ``xs``."""
    n = len(xs)
    return (1 if n < 16 else 3 if n < 0x10000 else 5) + sum(map(_int_size, xs))


def _bin_size(n: int) -> int:
    """Bytes of a msgpack bin of ``n`` bytes."""
    return n + (2 if n < 0x100 else 3 if n < 0x10000 else 5)


def _float_series(values: Sequence[float]) -> tuple[int, object]:
    """The smallest lossless layout of floats (the first of the smallest on a tie).

    Candidates, in order: ``DEC e`` if the values are short decimals, else
    ``DEC32 e`` if they are float32 short decimals; then ``F32`` if every value is
    a float32, else ``F64``. Sizes are counted, not packed (``_ints_size``).
    """
    n = len(values)
    dec = _decimal(values)
    if dec is not None:
        deltas = _deltas(dec[1])
        size = _ints_size(deltas)
        # F32 is the smallest other candidate: if it cannot win, do not look further
        if size <= _bin_size(4 * n):
            return Kind.DEC + dec[0], deltas
        if _same_bits32(values):
            return Kind.F32, struct.pack(f">{n}f", *values)
        if size <= _bin_size(8 * n):
            return Kind.DEC + dec[0], deltas
        return Kind.F64, struct.pack(f">{n}d", *values)
    if not _same_bits32(values):
        return Kind.F64, struct.pack(f">{n}d", *values)
    dec32 = _decimal32(values)
    if dec32 is not None:
        deltas = _deltas(dec32[1])
        if _ints_size(deltas) <= _bin_size(4 * n):
            return Kind.DEC32 + dec32[0], deltas
    return Kind.F32, struct.pack(f">{n}f", *values)


def _int_in_range(v: int) -> int:
    if not _INT_MIN <= v <= _INT_MAX:
        raise LocalError(f"int value {v} is outside msgpack's range [-2**63, 2**64-1]")
    return v


def _value_series(values: list[Value]) -> tuple[int, object]:
    if not values:
        return Kind.RAW, []
    types = set(map(type, values))
    if len(types) == 1:
        t = types.pop()
        if t is float:
            return _float_series(values)  # type: ignore[arg-type]
        if t is bool:
            return Kind.BOOL, values
        if t is int:
            ints: list[int] = values  # type: ignore[assignment]
            if min(ints) >= _INT_MIN and max(ints) <= _I64_MAX:
                deltas = _deltas(ints)
                if min(deltas) >= _INT_MIN:  # a fall from 2**63-1 to -2**63 does not fit
                    return Kind.INT, deltas
            return Kind.RAW, [_int_in_range(v) for v in ints]
    for v in values:
        if type(v) is int:
            _int_in_range(v)
    return Kind.RAW, values


def _one_float(v: float) -> tuple[int, object]:
    """:func:`_float_series` of one value, without the lists (the common case)."""
    if -_MAX_MANTISSA <= v <= _MAX_MANTISSA and (v or math.copysign(1.0, v) > 0.0):
        for e in _E_RANGE:
            p = _POW10[e]
            m = round(v * p)
            if m / p == v:
                # DEC is [m]: 1 + size(m) bytes, F32 6, F64 10; a tie goes to DEC
                if -(2**31) <= m < 2**32 or (-_MAX_MANTISSA <= m <= _MAX_MANTISSA and not _is32(v)):
                    return Kind.DEC + e, [m]
                break
    return _float_series([v])


def _is32(v: float) -> bool:
    try:
        return bool(_F32.unpack(_F32.pack(v))[0] == v)
    except OverflowError:
        return False


_QUALITY_INT: Final = {q: int(q) for q in Quality}
_INT_ONLY: Final = {int}
# the kinds of the short path as plain ints (msgpack packs them the same, faster)
_DEC0, _DEC1, _BOOL, _INT, _RAW = (
    int(Kind.DEC),
    int(Kind.DEC) + 1,
    int(Kind.BOOL),
    int(Kind.INT),
    int(Kind.RAW),
)


def _quality(q: Quality) -> int:
    try:
        return _QUALITY_INT[q]
    except (KeyError, TypeError):
        return int(Quality(q))  # ValueError for what is not a quality


def _bad_reading(readings: Sequence[Reading]) -> LocalError:
    """The error for the first reading with a bad point id or timestamp."""
    for r in readings:
        if type(r.point) is not int or not 0 <= r.point <= MAX_POINT_ID:
            return LocalError(f"point id {r.point!r} is not an int in [0, {MAX_POINT_ID}]")
    for r in readings:
        if type(r.ts) is not int or not 0 <= r.ts <= MAX_TS:
            return LocalError(f"reading timestamp {r.ts!r} is not an int in [0, 2**53-1] ms")
    raise AssertionError("no bad reading")  # pragma: no cover


def encode_readings(
    readings: Sequence[Reading], *, enc: Encoding = "msgpack+zlib", layout: int | None = None
) -> bytes:
    """The payload bytes of ``readings``: see :func:`encode_readings_span`."""
    return encode_readings_span(readings, enc=enc, layout=layout)[0]


def choose_layout(readings: Sequence[Reading]) -> int:
    """2 (columns) when points appear at most :data:`COLUMNS_MAX_REPEAT` times on
    average, else 1 (series by point).

    Measured by ``python -m bench.payload``: where each point appears once (one
    poll of many devices) layout 2 is several times smaller and faster; where
    points repeat (a few devices over seconds) layout 1's per-point deltas of
    times and values are smaller.
    """
    return 2 if _few_repeats(list(map(_point, readings))) else 1


def _few_repeats(points: Sequence[int]) -> bool:
    return len(points) <= COLUMNS_MAX_REPEAT * len(set(points))


def encode_readings_span(
    readings: Sequence[Reading], *, enc: Encoding = "msgpack+zlib", layout: int | None = None
) -> tuple[bytes, int, int]:
    """The payload bytes of ``readings`` (1 to :data:`MAX_READINGS` of them), and
    their earliest and latest timestamps.

    ``layout`` is 1 (series by point), 2 (columns) or None: the layout
    :func:`choose_layout` picks for these readings.

    Raises :class:`LocalError` for what cannot be encoded: no readings, too
    many, a timestamp outside ``[0, MAX_TS]``, a point id outside
    ``[0, MAX_POINT_ID]``, a value that is not bool/int/float/str/None or an
    int outside msgpack's range, a payload over :data:`MAX_PAYLOAD_BYTES`.
    """
    if not readings:
        raise LocalError("a payload holds at least one reading")
    if len(readings) > MAX_READINGS:
        raise LocalError(f"{len(readings)} readings exceed the limit of {MAX_READINGS}")
    if layout not in (None, *LAYOUTS):
        raise LocalError(f"unknown payload layout {layout!r}: expected one of {LAYOUTS}")
    columns = None if layout == 1 else _columns_payload(readings, choose=layout is None)
    out, base, last = _series_payload(readings) if columns is None else columns
    raw = _pack(out)
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise LocalError(f"payload of {len(raw)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return _compress(raw, enc), base, last


def _series_payload(readings: Sequence[Reading]) -> tuple[list[object], int, int]:
    """Layout 1: ``[base_ts, series...]``, the earliest and the latest timestamp.

    Costs about 1 µs a reading when each point appears once (a batch of one
    poll of many devices): a series of one reading takes a short path that
    gives the same bytes as the general one.
    """
    points = [r[0] for r in readings]
    series: Sequence[Reading | list[Reading]]
    if len(set(points)) == len(points):
        series = readings  # each point once (one poll of many devices): a series each
    else:
        groups: dict[int, list[Reading]] = {}
        get = groups.get
        for r in readings:
            g = get(r[0])
            if g is None:
                groups[r[0]] = [r]
            else:
                g.append(r)
        points = list(groups)
        series = [rs[0] if len(rs) == 1 else rs for rs in groups.values()]
    if set(map(type, points)) != _INT_ONLY or min(points) < 0 or max(points) > MAX_POINT_ID:
        raise _bad_reading(readings)
    stamps = [r[1] for r in readings]
    if set(map(type, stamps)) != _INT_ONLY:
        raise _bad_reading(readings)
    base, last = min(stamps), max(stamps)
    if base < 0 or last > MAX_TS:
        raise _bad_reading(readings)
    seen_one: dict[int, int] = {}  # the time of a series of one reading -> its index
    seen_times: dict[tuple[int, ...], int] = {}
    out: list[object] = [base]
    append = out.append
    dec0, dec1, k_bool, k_int, k_raw = _DEC0, _DEC1, _BOOL, _INT, _RAW
    quality_int = _QUALITY_INT
    for index, item in enumerate(series):
        if type(item) is Reading:
            point, t, value, quality = item
            # tuples, not lists, in this path: msgpack packs both as arrays (the same
            # bytes), a tuple is cheaper to make, and the collector skips it
            times: object = seen_one.get(t)
            if times is None:
                seen_one[t] = index
                times = (t - base,)
            try:
                q = quality_int[quality]
            except (KeyError, TypeError):
                q = int(Quality(quality))  # ValueError for what is not a quality
            kind: int
            packed: object
            if type(value) is float:
                # inline, what a register scaled by 1 or 0.1 gives (same as _one_float):
                # not +-0.0, NaN or inf; the mantissa fits int32, so DEC is at most 6 bytes.
                # A whole number gives m % 10 == 0: DEC 0 with m // 10, as _one_float's e=0
                if -2e8 < value < 2e8 and value and (m := round(value * 10)) / 10 == value:
                    if m % 10:
                        kind, packed = dec1, (m,)
                    else:
                        kind, packed = dec0, (m // 10,)
                else:
                    kind, packed = _one_float(value)
            elif value is None:
                append([point, k_raw, times, [], [0, q | _NO_VALUE]])
                continue
            elif type(value) is bool:
                kind, packed = k_bool, [value]
            elif type(value) is int and _INT_MIN <= value <= _I64_MAX:
                kind, packed = k_int, [value]
            else:
                kind, packed = _value_series([_plain(value)])
            append((point, kind, times, packed, (0, q)) if q else (point, kind, times, packed))
            continue
        rs = cast(list[Reading], item)  # not a Reading: a list of them
        point = rs[0][0]
        ts = tuple(r[1] for r in rs)
        times = seen_times.get(ts)
        if times is None:
            seen_times[ts] = index
            dods: list[int] = []
            prev_t, prev_d = base, 0
            for t in ts:
                d = t - prev_t
                dods.append(d - prev_d)
                prev_t, prev_d = t, d
            times = dods
        flags: list[int] = []
        values: list[Value] = []
        for i, r in enumerate(rs):
            q = _quality(r[3])
            if r[2] is None:
                flags += (i, q | _NO_VALUE)
            else:
                values.append(_plain(r[2]))
                if q:
                    flags += (i, q)
        kind, packed = _value_series(values)
        append([point, kind, times, packed, flags] if flags else [point, kind, times, packed])
    return out, base, last


# --------------------------------------------------------------------------- layout 2


_GOOD: Final = Quality.GOOD
_U32: Final = "I" if array("I").itemsize == 4 else "L"  # the array type of C uint32
_point = itemgetter(0)  # Reading.point
_NONE_TYPE: Final = type(None)
_SAMPLE: Final = 32  # values tried first when looking for a decimal exponent
_FPOW10: Final = tuple(map(float, _POW10))  # v * 10.0 is v * 10, a conversion less
_SMALL: Final = (-(2**15), 2**16 - 1)  # ints of at most 3 msgpack bytes (a float32 is 4)
_INT32: Final = (-(2**31), 2**32 - 1)  # ints of at most 5 msgpack bytes (a float64 is 8)


def _exact(ms: list[int], e: int, f32: bool) -> list[float]:
    """The floats the decoder makes of mantissas ``ms`` with exponent ``e``."""
    back = list(map(truediv, ms, repeat(_POW10[e])))
    if f32:
        n = len(back)
        return list(struct.unpack(f">{n}f", struct.pack(f">{n}f", *back)))
    return back


def _decimal_column(values: list[float], f32: bool) -> tuple[int, list[int]] | None:
    """``(e, mantissas)`` of floats that are all short decimals (of float32 if
    ``f32``) with one exponent ``e``, the smallest, and ``|m| <= 2**53``; else None.

    The work is done by ``map`` over the whole column (no Python loop a value): the
    smallest ``e`` that fits the first values, then up to ``_MAX_E`` on all of them.
    """
    if 0.0 in values and any(math.copysign(1.0, v) < 0.0 for v in values if not v):
        return None  # -0.0 is not a decimal
    sample = values[:_SAMPLE]
    try:
        for e in _E_RANGE:
            ms = list(map(round, map(mul, sample, repeat(_FPOW10[e]))))
            if _exact(ms, e, f32) == sample:
                break
        else:
            return None
        first = e
        if len(sample) < len(values):
            for e in range(first, _MAX_E + 1):
                ms = list(map(round, map(mul, values, repeat(_FPOW10[e]))))
                if _exact(ms, e, f32) == values:
                    break
            else:
                return None
    except (ValueError, OverflowError):  # NaN or an infinity; beyond float32
        return None
    if min(ms) < -_MAX_MANTISSA or max(ms) > _MAX_MANTISSA:
        return None
    return e, ms


def _fits(ms: list[int], low: int, high: int) -> bool:
    return low <= min(ms) and max(ms) <= high


def _float_column(values: list[float]) -> tuple[int, object] | None:
    """``(kind, packed)`` of floats in one block, no bigger a value than the kind
    each would take alone, or None (then each value finds its own kind).

    Short decimals of at most 3 bytes a mantissa: ``DEC``; else, all float32:
    ``DEC32`` likewise, else ``F32`` (4 bytes); else decimals of int32
    mantissas (at most 5 bytes, ``F64`` is 8): ``DEC``.
    """
    dec = _decimal_column(values, f32=False)
    if dec is not None and _fits(dec[1], *_SMALL):
        return Kind.DEC + dec[0], dec[1]
    n = len(values)
    try:
        f32 = struct.pack(f">{n}f", *values)
    except OverflowError:
        f32 = b""
    if f32 and struct.pack(f">{n}d", *struct.unpack(f">{n}f", f32)) == struct.pack(
        f">{n}d", *values
    ):
        dec32 = _decimal_column(values, f32=True)
        if dec32 is not None and _fits(dec32[1], *_SMALL):
            return Kind.DEC32 + dec32[0], dec32[1]
        return Kind.F32, f32
    if dec is not None and _fits(dec[1], *_INT32):
        return Kind.DEC + dec[0], dec[1]
    return None


def _known_decimals(readings: Sequence[Reading]) -> tuple[int, object] | None:
    """``(DEC + e, mantissas)`` of columns whose poller handed on each value's
    mantissa over ``10**e`` (:attr:`Columns.mants`, decisions 51) when that is the
    block :func:`_float_column` would choose (the smallest ``e``, mantissas of at
    most 3 bytes): the same bytes without the search; else None."""
    if not isinstance(readings, Columns):
        return None
    ms, e = readings.mants, readings.exp
    if ms is None or not 1 <= e <= _MAX_E or len(ms) != len(readings.points):
        return None
    if not any(m % 10 for m in ms[:_SAMPLE]):
        return None  # the first values might all hold at a smaller exponent: search
    if not _fits(ms, *_SMALL):
        return None
    return Kind.DEC + e, ms


def _one_kind_column(values: list[Value], types: set[type]) -> tuple[int, object] | None:
    """``(kind, packed values)`` when one kind holds all ``values`` (not None, of
    ``types``) at the size :func:`_value_kind` would give each, else None."""
    if not values:
        return Kind.RAW, []
    if len(types) != 1:
        return None
    t = next(iter(types))
    if t is float:
        return _float_column(values)  # type: ignore[arg-type]
    if t is int:
        ints = cast(list[int], values)
        return (Kind.INT, ints) if min(ints) >= _INT_MIN and max(ints) <= _I64_MAX else None
    if t is bool:
        return Kind.BOOL, values
    if t is str:
        return Kind.RAW, values
    return None


def _value_kind(value: Value) -> int:
    """The kind of one value (not None) in layout 2: its smallest lossless one."""
    value = _plain(value)
    if isinstance(value, float):
        return _one_float(value)[0]
    if isinstance(value, bool):
        return Kind.BOOL
    if isinstance(value, int):
        return Kind.INT if _INT_MIN <= _int_in_range(value) <= _I64_MAX else Kind.RAW
    return Kind.RAW


def _pack_values(kind: int, values: list[Value]) -> object:
    """The values of a block of ``kind`` (each value's own kind is ``kind``)."""
    if kind in _DEC_KINDS:
        p = _POW10[kind - Kind.DEC]
        return [round(v * p) for v in values]
    if kind in _DEC32_KINDS:
        p = _POW10[kind - Kind.DEC32]
        return [round(v * p) for v in values]
    if kind == Kind.F32:
        return struct.pack(f">{len(values)}f", *values)
    if kind == Kind.F64:
        return struct.pack(f">{len(values)}d", *values)
    return values  # INT, BOOL, RAW: as they are


def _block(
    kind: int,
    points: Sequence[int],
    stamps: Sequence[int],
    base: int,
    packed: object,
    flags: list[int],
) -> list[object]:
    pd = [int(points[0]), *map(sub, islice(points, 1, None), points)]  # int(): bool, IntEnum
    td = [stamps[0] - base, *map(sub, islice(stamps, 1, None), stamps)]
    return [kind, pd, td, packed, flags] if flags else [kind, pd, td, packed]


def _flags_of(values: Iterable[Value], quals: Iterable[Quality]) -> list[int]:
    flags: list[int] = []
    for i, (v, q) in enumerate(zip(values, quals, strict=True)):
        f = _quality(q) | (_NO_VALUE if v is None else 0)
        if f:
            flags += (i, f)
    return flags


def _columns_payload(
    readings: Sequence[Reading], *, choose: bool
) -> tuple[list[object], int, int] | None:
    """Layout 2: ``[-2, base_ts, block...]``, the earliest and the latest timestamp;
    None if ``choose`` and :func:`choose_layout` would choose layout 1.

    A batch whose values are all of one type (the fleet: floats of 0.1) is one
    block, built by ``zip``/``map`` over whole columns, in the batch's order.
    Else the readings are grouped by the type of their value (None apart), in
    order of first appearance, each group one block when one kind holds it,
    else a block per kind of value (:func:`_value_kind`).
    """
    points: Sequence[int]
    stamps: Sequence[int]
    values: Sequence[Value]
    quals: Sequence[Quality]
    if isinstance(readings, Columns):  # what the batcher holds: the columns as they are
        points, stamps, quals = readings.points, readings.stamps, readings.quals
    else:
        points, stamps, values, quals = cast(
            tuple[tuple[int, ...], tuple[int, ...], tuple[Value, ...], tuple[Quality, ...]],
            tuple(zip(*readings, strict=True)),
        )
    if choose and not _few_repeats(points):
        return None
    try:  # one pass of C each: ints in [0, 2**32-1] (== MAX_POINT_ID), ints >= 0
        array(_U32, points)
        array("Q", stamps)
    except (TypeError, OverflowError):
        raise _bad_reading(readings) from None
    base, last = int(min(stamps)), int(max(stamps))  # int(): a bool is an int for array
    if last > MAX_TS:
        raise _bad_reading(readings)
    out: list[object] = [COLUMNS_TAG, base]
    # the poller's mantissas: every value a float (the mantissa divided), none missing
    one = _known_decimals(readings)
    if one is not None:
        good = quals.count(_GOOD) == len(quals)
        flags = [] if good else _flags_of(repeat(0, len(quals)), quals)
        out.append(_block(one[0], points, stamps, base, one[1], flags))
        return out, base, last
    if isinstance(readings, Columns):
        values = readings.values
    types = set(map(type, values))
    if len(types) == 1 or (len(types) == 2 and _NONE_TYPE in types):
        present: list[Value] = list(values)
        if _NONE_TYPE in types:
            present = [v for v in present if v is not None]
            types.discard(_NONE_TYPE)
        one = _one_kind_column(present, types)
        if one is not None:
            good = len(present) == len(values) and quals.count(_GOOD) == len(quals)
            flags = [] if good else _flags_of(values, quals)
            out.append(_block(one[0], points, stamps, base, one[1], flags))
            return out, base, last
    by_type: dict[type, list[int]] = {}  # type of the value -> indexes of its readings
    for i, t in enumerate(map(type, values)):
        by_type.setdefault(t, []).append(i)
    for t, idx in by_type.items():
        present = [values[i] for i in idx]
        one = None if t is _NONE_TYPE else _one_kind_column(present, {t})
        if t is _NONE_TYPE or one is not None:
            packed = [] if one is None else one[1]
            out.append(_sub_block(Kind.RAW if one is None else one[0], idx, packed, readings, base))
            continue
        by_kind: dict[int, list[int]] = {}
        for i in idx:
            by_kind.setdefault(_value_kind(values[i]), []).append(i)
        for kind, kidx in by_kind.items():
            packed = _pack_values(kind, [_plain(values[i]) for i in kidx])
            out.append(_sub_block(kind, kidx, packed, readings, base))
    return out, base, last


def _sub_block(
    kind: int, idx: list[int], packed: object, readings: Sequence[Reading], base: int
) -> list[object]:
    """The block of ``kind`` of the readings at ``idx`` (their values ``packed``)."""
    rs = [readings[i] for i in idx]
    return _block(
        kind,
        [r[0] for r in rs],
        [r[1] for r in rs],
        base,
        packed,
        _flags_of([r[2] for r in rs], [r[3] for r in rs]),
    )


def encode_points(points: Sequence[PointInfo], *, enc: Encoding = "msgpack+zlib") -> bytes:
    """The point-table payload: ``[[id, device, name, unit, domain, cls, indicator]...]``."""
    rows: list[list[object]] = []
    seen: set[int] = set()
    for p in points:
        if type(p.id) is not int or not 0 <= p.id <= MAX_POINT_ID:
            raise LocalError(f"point id {p.id!r} is not an int in [0, {MAX_POINT_ID}]")
        if p.id in seen:
            raise LocalError(f"point id {p.id} appears twice in the point table")
        seen.add(p.id)
        row: list[object] = [p.id, p.device, p.name, p.unit, p.domain, p.cls, p.indicator]
        if not all(type(s) is str for s in row[1:]):
            raise LocalError(f"point {p.id}: every field but id must be a str")
        rows.append(row)
    raw = _pack(rows)
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise LocalError(f"point table of {len(raw)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return _compress(raw, enc)


# --------------------------------------------------------------------------- decoding


def _decompress(data: bytes, enc: Encoding) -> bytes:
    if len(data) > MAX_PAYLOAD_BYTES:
        raise DecodeError(f"payload of {len(data)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    if enc == "msgpack":
        return data
    if enc != "msgpack+zlib":
        raise DecodeError(f"unknown payload encoding {enc!r}")
    d = zlib.decompressobj()
    try:
        raw = d.decompress(data, MAX_PAYLOAD_BYTES)
        if d.unconsumed_tail:
            raise DecodeError(f"payload inflates beyond {MAX_PAYLOAD_BYTES} bytes")
        raw += d.flush()
    except zlib.error as exc:
        raise DecodeError(f"payload is not valid zlib data: {exc}") from exc
    if not d.eof:
        raise DecodeError("zlib payload is truncated")
    if d.unused_data:
        raise DecodeError(f"{len(d.unused_data)} trailing bytes after the zlib payload")
    return raw


class _TooManyArrays(Exception):
    pass


def _unpack(raw: bytes, what: str) -> object:
    """msgpack.unpackb with every failure as DecodeError, and a cap on arrays.

    The cap keeps a payload of a few MiB of empty arrays (56 bytes of Python
    object each) from costing gigabytes.
    """
    budget = [4 * MAX_READINGS + 8]

    def count(lst: list[Any]) -> list[Any]:
        budget[0] -= 1
        if budget[0] < 0:
            raise _TooManyArrays
        return lst

    try:
        return msgpack.unpackb(
            raw,
            raw=False,
            use_list=True,
            strict_map_key=True,
            list_hook=count,
            max_array_len=MAX_READINGS + 1,
        )
    except _TooManyArrays as exc:
        raise DecodeError(f"{what} holds too many arrays") from exc
    except (ValueError, msgpack.UnpackException) as exc:
        raise DecodeError(f"{what} is not valid msgpack: {exc}") from exc


def _int_list(obj: object, where: str) -> list[int]:
    if type(obj) is not list or not all(type(x) is int for x in obj):
        raise DecodeError(f"{where} must be an array of ints")
    return obj


def _f_decimal(e: int) -> Callable[[list[int]], list[float]]:
    p = _POW10[e]

    def conv(ms: list[int]) -> list[float]:
        return [m / p for m in ms]

    return conv


def _f_decimal32(e: int) -> Callable[[list[int]], list[float]]:
    p = _POW10[e]
    pack, unpack = _F32.pack, _F32.unpack

    def conv(ms: list[int]) -> list[float]:
        return [unpack(pack(m / p))[0] for m in ms]  # |m| <= 2**53: no float32 overflow

    return conv


def _mantissas(raw: object, where: str, deltas: bool) -> list[int]:
    ms = _int_list(raw, where)
    if deltas:
        ms = list(accumulate(ms))
    if ms and (min(ms) < -_MAX_MANTISSA or max(ms) > _MAX_MANTISSA):
        raise DecodeError(f"{where}: a mantissa is beyond ±2**53")
    return ms


def _values(kind: object, raw: object, count: int, where: str, deltas: bool = True) -> list[Any]:
    """The values of a series (``deltas``: DEC, DEC32 and INT as deltas) or a block."""
    values: list[Any]
    if type(kind) is not int:
        raise DecodeError(f"{where}: kind must be an int, got {type(kind).__name__}")
    if kind in _DEC_KINDS:
        values = _f_decimal(kind - Kind.DEC)(_mantissas(raw, f"{where} values", deltas))
    elif kind in _DEC32_KINDS:
        values = _f_decimal32(kind - Kind.DEC32)(_mantissas(raw, f"{where} values", deltas))
    elif kind == Kind.INT:
        values = _int_list(raw, f"{where} values")
        if deltas:
            values = list(accumulate(values))
        if values and (min(values) < _INT_MIN or max(values) > _I64_MAX):
            raise DecodeError(f"{where}: an int value is beyond int64")
    elif kind == Kind.BOOL:
        if type(raw) is not list or not all(type(x) is bool for x in raw):
            raise DecodeError(f"{where} values must be an array of booleans")
        values = raw
    elif kind in (Kind.F32, Kind.F64):
        size = 4 if kind == Kind.F32 else 8
        if type(raw) is not bytes or len(raw) % size:
            raise DecodeError(f"{where} values must be a bin of a multiple of {size} bytes")
        values = list(struct.unpack(f">{len(raw) // size}{'f' if size == 4 else 'd'}", raw))
    elif kind == Kind.RAW:
        if type(raw) is not list or not all(type(x) in (bool, int, float, str) for x in raw):
            raise DecodeError(f"{where} values must be an array of bool/int/float/str")
        values = raw
    else:
        raise DecodeError(f"{where}: unknown kind {kind}")
    if len(values) != count:
        raise DecodeError(f"{where}: {len(values)} values for {count} readings with a value")
    return values


_QUALITIES: Final = {int(q): q for q in Quality}


def _flags(raw: object, count: int, where: str) -> dict[int, int]:
    flat = _int_list(raw, f"{where} flags")
    if not flat or len(flat) % 2:
        raise DecodeError(f"{where} flags must be a non-empty array of [index, flag] pairs")
    out: dict[int, int] = {}
    last = -1
    for i in range(0, len(flat), 2):
        index, flag = flat[i], flat[i + 1]
        if not last < index < count:
            raise DecodeError(f"{where} flags: index {index} out of order or beyond {count}")
        if flag & ~_NO_VALUE not in _QUALITIES or flag < 0 or flag == 0:
            raise DecodeError(f"{where} flags: invalid flag {flag} at index {index}")
        out[index] = flag
        last = index
    return out


def decode_readings(data: bytes, *, enc: Encoding = "msgpack+zlib") -> list[Reading]:
    """The readings of a payload made by :func:`encode_readings`.

    Raises :class:`DecodeError` naming what is wrong, for any input.
    """
    obj = _unpack(_decompress(data, enc), "readings payload")
    if type(obj) is list and obj and type(obj[0]) is int and obj[0] == COLUMNS_TAG:
        return _decode_columns(obj)
    if type(obj) is not list or len(obj) < 2:
        raise DecodeError("readings payload must be an array [base_ts, series...] of 2+ items")
    base = obj[0]
    if type(base) is not int or not 0 <= base <= MAX_TS:
        raise DecodeError(f"readings payload: base_ts {base!r} is not an int in [0, 2**53-1]")
    out: list[Reading] = []
    times_of: list[list[int]] = []
    points: set[int] = set()
    for index, series in enumerate(obj[1:]):
        where = f"series {index}"
        if type(series) is not list or len(series) not in (4, 5):
            raise DecodeError(f"{where} must be an array of 4 or 5 items")
        point, kind, times_raw = series[0], series[1], series[2]
        if type(point) is not int or not 0 <= point <= MAX_POINT_ID:
            raise DecodeError(f"{where}: point id {point!r} is not an int in [0, {MAX_POINT_ID}]")
        if point in points:
            raise DecodeError(f"{where}: point {point} appears in two series")
        points.add(point)
        if type(times_raw) is int:
            if not 0 <= times_raw < index:
                raise DecodeError(f"{where}: times refer to series {times_raw}, not an earlier one")
            ts = times_of[times_raw]
        else:
            dods = _int_list(times_raw, f"{where} times")
            if not dods:
                raise DecodeError(f"{where} times must not be empty")
            ts = list(accumulate(accumulate(dods), initial=base))[1:]
            if min(ts) < 0 or max(ts) > MAX_TS:
                raise DecodeError(f"{where}: a timestamp is outside [0, 2**53-1]")
        times_of.append(ts)
        count = len(ts)
        if len(out) + count > MAX_READINGS:
            raise DecodeError(f"payload holds more than {MAX_READINGS} readings")
        flags = _flags(series[4], count, where) if len(series) == 5 else None
        if flags is None:
            values = _values(kind, series[3], count, where)
            out.extend(map(Reading, [point] * count, ts, values))
            continue
        missing = sum(1 for f in flags.values() if f & _NO_VALUE)
        values = _values(kind, series[3], count - missing, where)
        it = iter(values)
        for i, t in enumerate(ts):
            f = flags.get(i, 0)
            value = None if f & _NO_VALUE else next(it)
            out.append(Reading(point, t, value, _QUALITIES[f & ~_NO_VALUE]))
    return out


_new_tuple: Final = cast(Callable[[type[Reading], tuple[Any, ...]], Reading], tuple.__new__)


def _decode_columns(obj: list[Any]) -> list[Reading]:
    """The readings of a layout 2 payload ``[-2, base_ts, block...]``."""
    if len(obj) < 3:
        raise DecodeError("columns payload must be an array [-2, base_ts, block...] of 3+ items")
    base = obj[1]
    if type(base) is not int or not 0 <= base <= MAX_TS:
        raise DecodeError(f"columns payload: base_ts {base!r} is not an int in [0, 2**53-1]")
    out: list[Reading] = []
    for index, block in enumerate(obj[2:]):
        where = f"block {index}"
        if type(block) is not list or len(block) not in (4, 5):
            raise DecodeError(f"{where} must be an array of 4 or 5 items")
        points = list(accumulate(_int_list(block[1], f"{where} points")))
        count = len(points)
        if not count:
            raise DecodeError(f"{where} points must not be empty")
        if min(points) < 0 or max(points) > MAX_POINT_ID:
            raise DecodeError(f"{where}: a point id is outside [0, {MAX_POINT_ID}]")
        deltas = _int_list(block[2], f"{where} times")
        if len(deltas) != count:
            raise DecodeError(f"{where}: {len(deltas)} times for {count} points")
        ts = list(accumulate(deltas, initial=base))
        del ts[0]
        if min(ts) < 0 or max(ts) > MAX_TS:
            raise DecodeError(f"{where}: a timestamp is outside [0, 2**53-1]")
        if len(out) + count > MAX_READINGS:
            raise DecodeError(f"payload holds more than {MAX_READINGS} readings")
        kind = block[0]
        if len(block) == 4:
            values = _values(kind, block[3], count, where, deltas=False)
            out += map(_new_tuple, repeat(Reading), zip(points, ts, values, repeat(_GOOD)))
            continue
        flags = _flags(block[4], count, where)
        missing = sum(1 for f in flags.values() if f & _NO_VALUE)
        it = iter(_values(kind, block[3], count - missing, where, deltas=False))
        for i, (point, t) in enumerate(zip(points, ts, strict=True)):
            f = flags.get(i, 0)
            value = None if f & _NO_VALUE else next(it)
            out.append(Reading(point, t, value, _QUALITIES[f & ~_NO_VALUE]))
    return out


def decode_points(data: bytes, *, enc: Encoding = "msgpack+zlib") -> list[PointInfo]:
    """The rows of a point-table payload made by :func:`encode_points`."""
    obj = _unpack(_decompress(data, enc), "point table")
    if type(obj) is not list:
        raise DecodeError("point table must be an array of rows")
    out: list[PointInfo] = []
    seen: set[int] = set()
    for i, row in enumerate(obj):
        if type(row) is not list or len(row) != 7:
            raise DecodeError(f"point table row {i} must be an array of 7 items")
        pid = row[0]
        if type(pid) is not int or not 0 <= pid <= MAX_POINT_ID:
            raise DecodeError(f"point table row {i}: id {pid!r} is not an int in range")
        if pid in seen:
            raise DecodeError(f"point table row {i}: id {pid} appears twice")
        seen.add(pid)
        if not all(type(s) is str for s in row[1:]):
            raise DecodeError(f"point table row {i}: every field but id must be a str")
        out.append(PointInfo(*row))
    return out
