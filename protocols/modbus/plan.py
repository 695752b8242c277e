"""Request planning (sans-IO): the points of a device in the fewest reads.

:func:`plan` merges the points of a device into the fewest read requests the
device accepts (see it for the algorithm and the proof that it is optimal);
:func:`decode_response` turns the answer to one request back into values,
point by point; :func:`write_request` builds the write for one writable
point. Nothing here does IO: the bus scheduler (``agent``) sends the requests.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from protocols.errors import DecodeError, LocalError
from protocols.modbus.values import (
    ADDRESS_SPACE,
    READ_BITS_LIMIT,
    READ_REGISTERS_LIMIT,
    DataType,
    PointSpec,
    PointValue,
    Space,
    decode,
    encode,
    register_count,
)

__all__ = ["ReadRequest", "decode_response", "plan", "write_request"]


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One read of ``count`` registers (or bits) of ``space`` from ``address``.

    ``points`` are the points it serves, by address; each lies inside
    ``[address, address + count)``. The function code is :attr:`function`.
    """

    space: Space
    address: int
    count: int
    points: tuple[PointSpec, ...]

    def __post_init__(self) -> None:
        if self.count < 1 or self.address < 0 or self.end > ADDRESS_SPACE:
            raise LocalError(f"bad read request: address {self.address}, count {self.count}")
        for p in self.points:
            if p.space is not self.space:
                raise LocalError(f"point {p.name!r} is in {p.space}, not {self.space}")
            if p.address < self.address or p.address + register_count(p) > self.end:
                raise LocalError(
                    f"point {p.name!r} lies outside the request "
                    f"{self.address}..{self.end - 1} of {self.space}"
                )

    @property
    def function(self) -> int:
        """The Modbus read function code: 1 coils, 2 discrete, 3 holding, 4 input."""
        return self.space.read_function

    @property
    def end(self) -> int:
        """The first address after the request."""
        return self.address + self.count


def _sort_key(p: PointSpec) -> tuple[int, int, str, str, str, int, int, float, float]:
    # total over the fields, so the plan does not depend on the input order
    return (
        p.address,
        p.address + register_count(p),
        p.name,
        p.type.value,
        p.order.value,
        p.length,
        p.bit,
        p.scale,
        p.offset,
    )


def plan(
    points: Iterable[PointSpec],
    *,
    max_registers: int = READ_REGISTERS_LIMIT,
    max_bits: int = READ_BITS_LIMIT,
    max_gap: int = 0,
) -> list[ReadRequest]:
    """The fewest read requests that serve every point; each point in exactly one.

    A request spans from its first point's address to the last register of
    its points (the hull), covers at most ``max_registers`` registers
    (``max_bits`` bits for coils and discrete inputs), and leaves no run of
    more than ``max_gap`` registers in it that no point of it uses (reading a
    hole may make a device answer "illegal data address", so the default is
    0). Points may overlap. Requests never mix spaces; they come ordered by
    function code, then address; the result does not depend on the order of
    ``points``.

    Algorithm: sort the points of a space by (address, end) and sweep; the
    current request takes the next point unless that would open a hole of
    more than ``max_gap`` (its address minus the largest end so far) or stretch
    the request past the limit (its end minus the request's address); then a
    new request starts at that point.

    Why greedy is optimal: let ``q1 .. qm`` be the points where the sweep
    starts its m requests. No two of them can share a request in any valid
    plan, so every plan needs at least m requests. Take ``j < k``. If the
    sweep cut before ``qk`` for the limit, then ``qk.end - q(k-1).address >
    limit``, and ``qj.address <= q(k-1).address``, so a request holding ``qj``
    and ``qk`` is too long. If it cut for a hole, then every point sorted
    before ``qk`` ends at or before ``E`` (the running largest end, which only
    grows across cuts) and every point sorted after it starts at or after
    ``qk.address > E + max_gap``; so ``[E, qk.address)`` is a hole longer than
    ``max_gap`` in any request holding ``qk`` and ``qj`` (whose address is
    below E). Hence m is the minimum. (The test suite checks this against a
    brute-force planner.)

    Raises :class:`LocalError` for limits outside the protocol's (1..125
    registers, 1..2000 bits), a negative ``max_gap``, a point wider than the
    limit or past address 65535, or an impossible spec.
    """
    if not 1 <= max_registers <= READ_REGISTERS_LIMIT:
        raise LocalError(f"max_registers must be 1..{READ_REGISTERS_LIMIT}, not {max_registers}")
    if not 1 <= max_bits <= READ_BITS_LIMIT:
        raise LocalError(f"max_bits must be 1..{READ_BITS_LIMIT}, not {max_bits}")
    if max_gap < 0:
        raise LocalError(f"max_gap must be >= 0, not {max_gap}")

    by_space: dict[Space, list[PointSpec]] = {}
    for p in points:
        by_space.setdefault(p.space, []).append(p)

    requests: list[ReadRequest] = []
    for space in sorted(by_space, key=lambda s: s.read_function):
        limit = max_bits if space.is_bits else max_registers
        unit = "bits" if space.is_bits else "registers"
        group = sorted(by_space[space], key=_sort_key)
        start = end = -1
        members: list[PointSpec] = []
        for p in group:
            n = register_count(p)
            if p.address < 0 or p.address + n > ADDRESS_SPACE:
                raise LocalError(f"point {p.name!r}: address {p.address} (+{n}) out of 0..65535")
            if n > limit:
                raise LocalError(f"point {p.name!r} spans {n} {unit}, more than the limit {limit}")
            p_end = p.address + n
            if members and p.address - end <= max_gap and max(end, p_end) - start <= limit:
                members.append(p)
                end = max(end, p_end)
                continue
            if members:
                requests.append(ReadRequest(space, start, end - start, tuple(members)))
            start, end, members = p.address, p_end, [p]
        if members:
            requests.append(ReadRequest(space, start, end - start, tuple(members)))
    return requests


def decode_response(
    request: ReadRequest, words_or_bits: Sequence[int] | Sequence[bool]
) -> list[tuple[PointSpec, PointValue | DecodeError]]:
    """Each point of ``request`` with its value, or the :class:`DecodeError` it gave.

    One bad point (a string with a byte above 0x7F, an out-of-range word)
    does not lose the others: its error stands in place of its value, in the
    order of ``request.points``. The response as a whole must hold
    ``request.count`` words, or for bit spaces ``request.count`` bits possibly
    padded to a whole number of bytes (as function 1 and 2 answers carry and
    pymodbus returns them); otherwise it raises :class:`DecodeError`.
    """
    n = len(words_or_bits)
    # function 1 and 2 answers carry whole bytes: accept the padding bits too
    padded = -(-request.count // 8) * 8 if request.space.is_bits else request.count
    if n not in (request.count, padded):
        raise DecodeError(
            f"response to {request.space} {request.address}+{request.count} holds {n} "
            f"{'bits' if request.space.is_bits else 'registers'}"
        )
    out: list[tuple[PointSpec, PointValue | DecodeError]] = []
    for p in request.points:
        at = p.address - request.address
        chunk = words_or_bits[at : at + register_count(p)]
        try:
            out.append((p, decode(p, chunk)))
        except DecodeError as exc:
            out.append((p, exc))
    return out


def write_request(
    spec: PointSpec, value: PointValue, *, multiple: bool = False
) -> tuple[int, int, list[int] | bool]:
    """``(function, address, payload)`` that writes ``value`` to ``spec``.

    A coil is written with function 5 and a ``bool`` payload; a one-register
    holding point with function 6 and a one-word list; a wider one with
    function 16. ``multiple=True`` forces the "multiple" functions for
    devices that only implement those: 15 (payload ``[0]`` or ``[1]``, one bit)
    and 16. Raises :class:`LocalError` for read-only spaces (discrete, input),
    ``bit`` points (writing the word would clear its other bits) and values
    :func:`encode` refuses.
    """
    if spec.space is Space.COIL:
        (bit,) = encode(spec, value)
        return (15, spec.address, [bit]) if multiple else (5, spec.address, bool(bit))
    if spec.space is not Space.HOLDING:
        raise LocalError(f"point {spec.name!r}: {spec.space} is read only")
    if spec.type is DataType.BIT:
        raise LocalError(
            f"point {spec.name!r}: a bit point cannot be written alone "
            "(it needs a read-modify-write of its register)"
        )
    words = encode(spec, value)
    if len(words) == 1 and not multiple:
        return 6, spec.address, words
    return 16, spec.address, words
