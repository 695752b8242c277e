"""The unit of data that flows from a bus to the hub."""

from __future__ import annotations

import enum
import functools
import operator
from collections.abc import Iterable, Iterator, Sequence
from itertools import repeat
from typing import NamedTuple, overload

__all__ = ["Columns", "Quality", "Reading", "Value"]

Value = float | int | bool | str | None


class Quality(enum.IntEnum):
    """How far a reading can be trusted. The integer is what goes on the wire."""

    GOOD = 0
    OUT_OF_RANGE = 1  # the device answered, the value is outside the point's valid range
    STALE = 2  # the last good value repeated because this poll failed
    COMM_ERROR = 3  # no value: the device did not answer or answered garbage


class Reading(NamedTuple):
    """One value of one point at one instant.

    ``point`` is the gateway-wide integer id of the point (assigned from the
    configuration, see ``agent.ops.config``); ``ts`` is milliseconds since the Unix
    epoch, UTC.

    A named tuple (immutable, ``==`` and hash by value, like the frozen
    dataclass it was). The buses do not build one a reading: they hand on
    :class:`Columns` (15,000 readings a second on a busy gateway), which make
    a Reading for whoever reads them one by one (the edge rules, tests).
    """

    point: int
    ts: int
    value: Value
    quality: Quality = Quality.GOOD


_reading = functools.partial(tuple.__new__, Reading)  # a Reading from a 4-tuple, in C


def _divided(mants: list[int], exp: int) -> list[Value]:
    """The values of mantissas over ``10**exp``: the division the poller's decoders make."""
    return list(map(operator.truediv, mants, repeat(10**exp, len(mants))))


class Columns(Sequence[Reading]):
    """Readings held as four columns: point ids, times, values, qualities.

    What a bus hands on (decisions 47): a poll's reply adds its point ids, one
    time for all, and the values it decoded, a few list extends instead of a
    tuple a reading; the batcher keeps the columns, the payload's layout 2
    encodes them as they are. Whoever wants readings one by one gets them:
    indexing and iteration build each :class:`Reading` when asked.

    The decimals as the device sent them (decisions 51): a poller that decodes
    a reply of scaled registers (``raw * 0.1``) knows each value as an integer
    mantissa over ``10**exp``, and hands the mantissas on instead of the values
    (:meth:`add`'s ``mants``). While every reading of the columns came that way,
    with one ``exp``, :attr:`mants` holds them and the payload encodes them as
    they are, with no search for the exponent; any other reading sets
    :attr:`mants` to None for good (the encoder then finds the decimals itself,
    as before). The values of such readings are made only when someone asks
    (:attr:`values`, an index, iteration: ``mants[i] / 10**exp``, the division
    the poller's decoders make), not a float a reading on the way to the payload
    (decisions 52).
    """

    __slots__ = ("_values", "exp", "mants", "points", "quals", "stamps")

    def __init__(self) -> None:
        self.points: list[int] = []
        self.stamps: list[int] = []
        self.quals: list[Quality] = []
        #: the values' mantissas over ``10**exp``, or None (a reading came without)
        self.mants: list[int] | None = []
        self.exp = -1  # -1: no mantissa yet (empty columns take any exponent)
        # the values; None while each is its mantissa over 10**exp (made when asked)
        self._values: list[Value] | None = None

    @property
    def values(self) -> list[Value]:
        """The values, one a reading (those of mantissas made now, once)."""
        v = self._values
        if v is None:
            assert self.mants is not None  # None only with the values made
            v = self._values = _divided(self.mants, self.exp)
        return v

    @classmethod
    def of(cls, readings: Iterable[Reading]) -> Columns:
        """Columns of ``readings`` (the same object if they are already)."""
        if isinstance(readings, Columns):
            return readings
        out = cls()
        for point, ts, value, quality in readings:
            out.append(point, ts, value, quality)
        return out

    def append(self, point: int, ts: int, value: Value, quality: Quality) -> None:
        self.values.append(value)
        self.points.append(point)
        self.stamps.append(ts)
        self.quals.append(quality)
        self.mants = None

    def add(
        self,
        points: Sequence[int],
        ts: int,
        values: list[Value] | None,
        quals: Iterable[Quality],
        mants: list[int] | None = None,
        exp: int = -1,
    ) -> None:
        """Readings of ``points`` at one time ``ts`` (a poll's reply): their ``values``,
        or (None) their ``mants`` over ``10**exp`` (``exp`` >= 1)."""
        self.points += points
        self.stamps += repeat(ts, len(points))
        self.quals += quals
        self._more(values, mants, exp)

    def extend(self, other: Columns) -> None:
        self.points += other.points
        self.stamps += other.stamps
        self.quals += other.quals
        self._more(other._values, other.mants, other.exp)

    def _more(self, values: list[Value] | None, mants: list[int] | None, exp: int) -> None:
        """The values of readings just added: ``values``, or (None) ``mants`` over
        ``10**exp``. The mantissas are kept while they share one exponent (-1: none
        yet, as in empty columns), else None for good; the values are made then."""
        own = self.mants
        keep = (
            own is not None and mants is not None and (exp < 0 or self.exp < 0 or exp == self.exp)
        )
        if not keep or self._values is not None:
            if values is None:
                assert mants is not None
                values = _divided(mants, exp)
            self.values.extend(values)  # the values so far made first, if they were not
        if not keep:
            self.mants = None
            return
        assert own is not None and mants is not None
        own += mants
        if self.exp < 0:
            self.exp = exp

    def __len__(self) -> int:
        return len(self.points)

    def __iter__(self) -> Iterator[Reading]:
        return map(_reading, zip(self.points, self.stamps, self.values, self.quals, strict=True))

    @overload
    def __getitem__(self, i: int) -> Reading: ...
    @overload
    def __getitem__(self, i: slice) -> Columns: ...
    def __getitem__(self, i: int | slice) -> Reading | Columns:
        if isinstance(i, slice):
            out = Columns()
            out.points, out.stamps = self.points[i], self.stamps[i]
            out.quals = self.quals[i]
            out._values = None if self._values is None else self._values[i]
            out.mants = None if self.mants is None else self.mants[i]
            out.exp = self.exp
            return out
        v = self._values
        value = v[i] if v is not None else self.mants[i] / 10**self.exp  # type: ignore[index]
        return Reading(self.points[i], self.stamps[i], value, self.quals[i])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return len(self) == len(other) and all(map(operator.eq, self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, like a list

    def __repr__(self) -> str:
        return f"Columns({list(self)!r})"
