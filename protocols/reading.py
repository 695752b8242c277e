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


class Columns(Sequence[Reading]):
    """Readings held as four columns: point ids, times, values, qualities.

    What a bus hands on (decisions 47): a poll's reply adds its point ids, one
    time for all, and the values it decoded, a few list extends instead of a
    tuple a reading; the batcher keeps the columns, the payload's layout 2
    encodes them as they are. Whoever wants readings one by one gets them:
    indexing and iteration build each :class:`Reading` when asked.
    """

    __slots__ = ("points", "quals", "stamps", "values")

    def __init__(self) -> None:
        self.points: list[int] = []
        self.stamps: list[int] = []
        self.values: list[Value] = []
        self.quals: list[Quality] = []

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
        self.points.append(point)
        self.stamps.append(ts)
        self.values.append(value)
        self.quals.append(quality)

    def add(
        self, points: Sequence[int], ts: int, values: list[Value], quals: Iterable[Quality]
    ) -> None:
        """Readings of ``points`` at one time ``ts`` (a poll's reply)."""
        self.points += points
        self.stamps += repeat(ts, len(points))
        self.values += values
        self.quals += quals

    def extend(self, other: Columns) -> None:
        self.points += other.points
        self.stamps += other.stamps
        self.values += other.values
        self.quals += other.quals

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
            out.values, out.quals = self.values[i], self.quals[i]
            return out
        return Reading(self.points[i], self.stamps[i], self.values[i], self.quals[i])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return len(self) == len(other) and all(map(operator.eq, self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, like a list

    def __repr__(self) -> str:
        return f"Columns({list(self)!r})"
