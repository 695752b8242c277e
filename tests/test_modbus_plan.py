"""Request planning of protocols.modbus: plan, ReadRequest, decode_response, write_request."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import DecodeError, LocalError
from protocols.modbus import (
    DataType,
    Order,
    PointSpec,
    ReadRequest,
    Space,
    decode_response,
    encode,
    plan,
    register_count,
    write_request,
)

T = DataType
H = Space.HOLDING
I = Space.INPUT  # noqa: E741 - matches the Modbus name
C = Space.COIL
D = Space.DISCRETE


def pt(
    name: str,
    address: int,
    type_: DataType = T.U16,
    space: Space = H,
    *,
    length: int = 1,
    order: Order = Order.ABCD,
    bit: int = 0,
) -> PointSpec:
    if space.is_bits:
        type_ = T.BOOL
    return PointSpec(
        name=name, space=space, address=address, type=type_, length=length, order=order, bit=bit
    )


def shape(reqs: Sequence[ReadRequest]) -> list[tuple[int, int, int, list[str]]]:
    return [(r.function, r.address, r.count, [p.name for p in r.points]) for r in reqs]


# --- plan: examples ---------------------------------------------------------------------


def test_empty() -> None:
    assert plan([]) == []


def test_contiguous_points_merge() -> None:
    points = [pt("a", 0, T.F32), pt("b", 2), pt("c", 3, T.F64)]
    assert shape(plan(points)) == [(3, 0, 7, ["a", "b", "c"])]


def test_hole_splits_by_default() -> None:
    points = [pt("a", 0), pt("b", 2)]
    assert shape(plan(points)) == [(3, 0, 1, ["a"]), (3, 2, 1, ["b"])]


def test_max_gap_bridges_holes_up_to_it() -> None:
    points = [pt("a", 0), pt("b", 3), pt("c", 7)]  # holes of 2 then 3
    assert shape(plan(points, max_gap=2)) == [(3, 0, 4, ["a", "b"]), (3, 7, 1, ["c"])]
    assert shape(plan(points, max_gap=3)) == [(3, 0, 8, ["a", "b", "c"])]


def test_max_registers_splits() -> None:
    points = [pt(f"p{i:03}", i) for i in range(126)]
    reqs = plan(points)
    assert shape(reqs)[0][:3] == (3, 0, 125)
    assert shape(reqs)[1] == (3, 125, 1, ["p125"])


def test_limit_counts_the_whole_hull() -> None:
    points = [pt("a", 0, T.F32), pt("b", 2, T.F32), pt("c", 4, T.F32)]
    assert shape(plan(points, max_registers=4)) == [(3, 0, 4, ["a", "b"]), (3, 4, 2, ["c"])]


def test_overlapping_views_share_a_request() -> None:
    points = [
        pt("word", 1),
        pt("float", 0, T.F32),
        pt("high-bit", 0, T.BIT, bit=15),
        pt("inside", 0),
    ]
    reqs = plan(points)
    assert len(reqs) == 1
    assert (reqs[0].address, reqs[0].count) == (0, 2)
    assert sorted(p.name for p in reqs[0].points) == ["float", "high-bit", "inside", "word"]


def test_wide_point_covering_later_ones_bridges_their_holes() -> None:
    points = [pt("wide", 0, T.STRING, length=10), pt("x", 2), pt("y", 8)]
    assert shape(plan(points)) == [(3, 0, 10, ["wide", "x", "y"])]


def test_spaces_never_mix_and_come_by_function_code() -> None:
    points = [pt("i", 0, space=I), pt("h", 0), pt("d", 0, space=D), pt("c", 0, space=C)]
    assert shape(plan(points)) == [
        (1, 0, 1, ["c"]),
        (2, 0, 1, ["d"]),
        (3, 0, 1, ["h"]),
        (4, 0, 1, ["i"]),
    ]


def test_bits_use_max_bits() -> None:
    coils = [pt(f"c{i:04}", i, space=C) for i in range(2001)]
    reqs = plan(coils)
    assert [(r.address, r.count) for r in reqs] == [(0, 2000), (2000, 1)]
    reqs = plan(coils[:100], max_bits=64, max_registers=1)
    assert [(r.address, r.count) for r in reqs] == [(0, 64), (64, 36)]


def test_input_order_does_not_matter() -> None:
    points = [
        pt("a", 0, T.F32),
        pt("b", 1),
        pt("b2", 1),
        pt("c", 9, T.U64),
        pt("d", 4, space=C),
        pt("e", 5, space=C),
        pt("f", 40, T.STRING, length=3),
    ]
    expected = plan(points, max_gap=3)
    rng = random.Random(1)
    for _ in range(20):
        shuffled = points[:]
        rng.shuffle(shuffled)
        assert plan(shuffled, max_gap=3) == expected


@pytest.mark.parametrize(
    ("points", "kwargs"),
    [
        ([pt("s", 0, T.STRING, length=126)], {}),
        ([pt("f", 0, T.F32)], {"max_registers": 1}),
        ([pt("x", 65535, T.F32)], {}),  # past the last address
        ([pt("x", -1)], {}),
        ([pt("bad", 0, T.BIT, bit=16)], {}),
        ([pt("a", 0)], {"max_registers": 0}),
        ([pt("a", 0)], {"max_registers": 126}),
        ([pt("a", 0)], {"max_bits": 2001}),
        ([pt("a", 0)], {"max_bits": 0}),
        ([pt("a", 0)], {"max_gap": -1}),
        ([PointSpec("u", C, 0, T.U16)], {}),
    ],
)
def test_plan_local_errors(points: list[PointSpec], kwargs: dict[str, int]) -> None:
    with pytest.raises(LocalError):
        plan(points, **kwargs)


def test_last_address_is_usable() -> None:
    assert shape(plan([pt("x", 65534, T.F32)])) == [(3, 65534, 2, ["x"])]


# --- ReadRequest ------------------------------------------------------------------------


def test_read_request_function_and_end() -> None:
    req = ReadRequest(I, 10, 4, (pt("a", 10, T.F32, space=I),))
    assert req.function == 4
    assert req.end == 14


@pytest.mark.parametrize(
    ("space", "address", "count", "points"),
    [
        (H, 0, 0, ()),
        (H, -1, 1, ()),
        (H, 65535, 2, ()),
        (H, 0, 1, (pt("f", 0, T.F32),)),  # sticks out
        (H, 1, 1, (pt("a", 0),)),  # before the start
        (I, 0, 1, (pt("a", 0),)),  # wrong space
    ],
)
def test_read_request_rejects_inconsistency(
    space: Space, address: int, count: int, points: tuple[PointSpec, ...]
) -> None:
    with pytest.raises(LocalError):
        ReadRequest(space, address, count, points)


# --- decode_response --------------------------------------------------------------------


def test_decode_response_slices_each_point() -> None:
    points = [
        pt("f", 0, T.F32),
        pt("lo", 1),
        pt("gap-bridged", 4, T.I16),
        pt("s", 5, T.STRING, length=2),
    ]
    (req,) = plan(points, max_gap=2)
    words = [0x42F6, 0xE979, 0xDEAD, 0xBEEF, 0xFFFE, 0x4F4B, 0x0000]
    got = {p.name: v for p, v in decode_response(req, words)}
    assert got == {"f": 123.45600128173828, "lo": 0xE979, "gap-bridged": -2, "s": "OK"}


def test_decode_response_keeps_request_order() -> None:
    (req,) = plan([pt("b", 1), pt("a", 0)])
    assert [p.name for p, _ in decode_response(req, [1, 2])] == ["a", "b"]


def test_one_bad_point_does_not_lose_the_others() -> None:
    points = [pt("n", 0), pt("s", 1, T.STRING, length=1), pt("m", 2)]
    (req,) = plan(points)
    results = decode_response(req, [7, 0x41FF, 9])
    assert [p.name for p, _ in results] == ["n", "s", "m"]
    assert results[0][1] == 7
    assert isinstance(results[1][1], DecodeError)
    assert "'s'" in str(results[1][1])
    assert results[2][1] == 9


def test_out_of_range_word_fails_only_its_points() -> None:
    (req,) = plan([pt("a", 0), pt("b", 1), pt("ab", 0, T.U32)])
    results = dict((p.name, v) for p, v in decode_response(req, [5, 70000]))
    assert results["a"] == 5
    assert isinstance(results["b"], DecodeError)
    assert isinstance(results["ab"], DecodeError)


@pytest.mark.parametrize("n", [0, 2, 4])
def test_decode_response_wrong_register_count(n: int) -> None:
    (req,) = plan([pt("a", 0, T.U16), pt("b", 1, T.U16), pt("c", 2)])
    with pytest.raises(DecodeError):
        decode_response(req, [0] * n)


def test_decode_response_bits_accepts_byte_padding() -> None:
    (req,) = plan([pt(f"c{i}", i, space=C) for i in range(10)])
    bits = [True, False] * 5
    exact = decode_response(req, bits)
    padded = decode_response(req, [*bits, False, False, False, False, False, False])
    assert exact == padded
    assert [v for _, v in exact] == bits
    for n in (9, 11, 15, 17):
        with pytest.raises(DecodeError):
            decode_response(req, [False] * n)


# --- write_request ----------------------------------------------------------------------


def test_write_requests() -> None:
    assert write_request(pt("c", 7, space=C), True) == (5, 7, True)
    assert write_request(pt("c", 7, space=C), False, multiple=True) == (15, 7, [0])
    assert write_request(pt("h", 3), 70) == (6, 3, [70])
    assert write_request(pt("h", 3), 70, multiple=True) == (16, 3, [70])
    assert write_request(pt("f", 10, T.F32), 123.456) == (16, 10, [0x42F6, 0xE979])
    assert write_request(pt("s", 1, T.STRING, length=2), "AB") == (16, 1, [0x4142, 0])
    assert write_request(pt("b", 0, T.BOOL), True) == (6, 0, [1])


@pytest.mark.parametrize(
    ("point", "value"),
    [
        (pt("d", 0, space=D), True),
        (pt("i", 0, space=I), 1),
        (pt("bit", 0, T.BIT, bit=3), True),
        (pt("h", 0), 70000),
        (pt("c", 0, space=C), 2),
    ],
)
def test_write_request_local_errors(point: PointSpec, value: int | bool) -> None:
    with pytest.raises(LocalError):
        write_request(point, value)


# --- properties -------------------------------------------------------------------------

WIDTHS = {T.U16: 1, T.F32: 2, T.U64: 4}


@st.composite
def point_lists(
    draw: st.DrawFn, max_size: int = 12, spaces: Sequence[Space] = tuple(Space)
) -> list[PointSpec]:
    n = draw(st.integers(0, max_size))
    points = []
    for i in range(n):
        space = draw(st.sampled_from(spaces))
        address = draw(st.integers(0, 30))
        if space.is_bits:
            points.append(pt(f"p{i}", address, space=space))
        else:
            kind = draw(st.sampled_from([T.U16, T.F32, T.U64, T.STRING]))
            length = draw(st.integers(1, 5))
            points.append(pt(f"p{i}", address, kind, space, length=length))
    return points


def holes(points: Sequence[PointSpec], start: int, end: int) -> list[int]:
    """Lengths of the runs of [start, end) no point covers."""
    used = [False] * (end - start)
    for p in points:
        for a in range(p.address, p.address + register_count(p)):
            used[a - start] = True
    runs, run = [], 0
    for u in used:
        if u:
            if run:
                runs.append(run)
            run = 0
        else:
            run += 1
    if run:
        runs.append(run)
    return runs


def feasible(points: Sequence[PointSpec], limit: int, max_gap: int) -> bool:
    start = min(p.address for p in points)
    end = max(p.address + register_count(p) for p in points)
    return end - start <= limit and all(h <= max_gap for h in holes(points, start, end))


limits = st.fixed_dictionaries(
    {
        "max_registers": st.integers(5, 20),
        "max_bits": st.integers(1, 20),
        "max_gap": st.integers(0, 4),
    }
)


@given(points=point_lists(), kw=limits)
def test_plan_invariants(points: list[PointSpec], kw: dict[str, int]) -> None:
    reqs = plan(points, **kw)
    # every point in exactly one request, inside it
    served = [id(p) for r in reqs for p in r.points]
    assert sorted(served) == sorted(id(p) for p in points)
    assert len(reqs) <= len(points)
    for r in reqs:
        limit = kw["max_bits"] if r.space.is_bits else kw["max_registers"]
        assert 1 <= r.count <= limit
        assert r.function == r.space.read_function
        assert all(p.space is r.space for p in r.points)
        # the request is exactly the hull of its points, with no hole over max_gap
        assert r.address == min(p.address for p in r.points)
        assert r.end == max(p.address + register_count(p) for p in r.points)
        assert all(h <= kw["max_gap"] for h in holes(r.points, r.address, r.end))
        assert list(r.points) == sorted(r.points, key=lambda p: p.address)
    # deterministic, whatever the input order
    assert plan(list(reversed(points)), **kw) == reqs


@given(points=point_lists(), kw=limits)
def test_decode_response_yields_every_point(points: list[PointSpec], kw: dict[str, int]) -> None:
    for r in plan(points, **kw):
        results = decode_response(r, [0] * r.count)
        assert [p for p, _ in results] == list(r.points)
        for p, v in results:
            expected = False if p.space.is_bits else ("" if p.type is T.STRING else 0)
            assert v == expected


def partitions(items: list[PointSpec]) -> Iterator[list[list[PointSpec]]]:
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in partitions(rest):
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1 :]]
        yield [[first], *part]


def brute_force_minimum(points: list[PointSpec], limit: int, max_gap: int) -> int:
    return min(
        len(part)
        for part in partitions(points)
        if all(feasible(block, limit, max_gap) for block in part)
    )


def test_partitions_enumerates_bell_numbers() -> None:
    points = [pt(str(i), i) for i in range(6)]
    assert sum(1 for _ in partitions(points)) == 203


@settings(deadline=None, max_examples=300)
@given(
    points=point_lists(max_size=7, spaces=(H,)),
    max_registers=st.integers(5, 12),
    max_gap=st.integers(0, 3),
)
def test_plan_is_minimal(points: list[PointSpec], max_registers: int, max_gap: int) -> None:
    reqs = plan(points, max_registers=max_registers, max_gap=max_gap)
    expected = brute_force_minimum(points, max_registers, max_gap) if points else 0
    assert len(reqs) == expected


def test_plan_is_minimal_on_a_tricky_case() -> None:
    # a wide point that covers later ones must not be split from them
    points = [pt("a", 0), pt("wide", 1, T.STRING, length=4), pt("x", 2), pt("y", 4), pt("z", 6)]
    assert len(plan(points, max_registers=5)) == brute_force_minimum(points, 5, 0) == 2


@given(points=point_lists(max_size=5), kw=limits)
def test_write_then_read_back_through_a_plan(points: list[PointSpec], kw: dict[str, int]) -> None:
    # a simulated register file: write each holding/coil point, read it back via its plan
    regs: dict[tuple[Space, int], int] = {}
    written = {}
    for p in points:
        if p.space not in (H, C):
            continue
        value: bool | int | float | str = (
            True if p.space is C else ("OK" if p.type is T.STRING else 42)
        )
        function, address, payload = write_request(p, value)
        assert address == p.address
        words = [int(payload)] if isinstance(payload, bool) else payload
        assert function in (5, 6, 16)
        for k, w in enumerate(words):
            regs[(p.space, address + k)] = w
        written[p.name] = value
    for r in plan(points, **kw):
        data = [regs.get((r.space, a), 0) for a in range(r.address, r.end)]
        for p, v in decode_response(r, data):
            if p.name in written and all(
                q is p or not _overlaps(p, q) for q in points if q.name in written
            ):
                assert v == written[p.name]


def _overlaps(p: PointSpec, q: PointSpec) -> bool:
    return p.space is q.space and (
        p.address < q.address + register_count(q) and q.address < p.address + register_count(p)
    )


def test_encode_matches_decode_response() -> None:
    p = pt("f", 3, T.F32, order=Order.CDAB)
    (req,) = plan([p])
    assert decode_response(req, encode(p, 1.5)) == [(p, 1.5)]
