"""A bounded byte buffer with commit/rollback, and the base of the serial-sensor framers.

The idea is wsproto's ``Buffer``: a parser *takes* bytes from a read cursor while it
tries to recognise a frame; if the frame is not complete yet it *rolls back* (the
cursor returns to the start, nothing is copied or lost) and waits for more bytes; once
a frame is recognised it *commits* (the consumed bytes are dropped). A frame that
arrives one byte at a time therefore costs one header peek per byte, not a re-parse
of everything buffered.

Unlike wsproto's, this buffer is bounded: a stream of garbage never grows it past
``max_size`` (the oldest bytes are dropped and counted), and :class:`StreamParser`
feeds it in slices so that even a single huge ``feed`` stays within the bound.
"""

from __future__ import annotations

import abc
from typing import Generic, TypeVar

from protocols.errors import LocalError

__all__ = ["Buffer", "StreamParser"]

F = TypeVar("F")


class Buffer:
    """Bytes received but not yet consumed, with a read cursor.

    ``len(buffer)`` is the number of bytes after the cursor (not yet taken).
    Offsets given to :meth:`peek` and returned by :meth:`find` are relative to the
    cursor.
    """

    __slots__ = ("_data", "_pos", "dropped", "max_size")

    def __init__(self, *, max_size: int = 4096) -> None:
        if max_size < 1:
            raise LocalError("max_size must be positive")
        self._data = bytearray()
        self._pos = 0
        self.max_size = max_size
        self.dropped = 0  # bytes thrown away because the buffer was full

    def feed(self, data: bytes) -> int:
        """Append ``data``; return how many of the oldest bytes were dropped to stay bounded."""
        self._data += data
        excess = len(self._data) - self.max_size
        if excess <= 0:
            return 0
        del self._data[:excess]
        self._pos = max(0, self._pos - excess)
        self.dropped += excess
        return excess

    def __len__(self) -> int:
        return len(self._data) - self._pos

    @property
    def held(self) -> int:
        """All bytes held, taken-but-uncommitted ones included."""
        return len(self._data)

    def peek(self, n: int, offset: int = 0) -> bytes | None:
        """The ``n`` bytes at ``offset`` after the cursor, or None if not all have arrived."""
        start = self._pos + offset
        if n < 0 or offset < 0 or start + n > len(self._data):
            return None
        return bytes(self._data[start : start + n])

    def take(self, n: int) -> bytes | None:
        """Consume ``n`` bytes from the cursor, or return None (consuming nothing)."""
        data = self.peek(n)
        if data is not None:
            self._pos += n
        return data

    def find(self, sep: bytes, start: int = 0) -> int:
        """Offset of ``sep`` after the cursor (searching from ``start``), or -1."""
        i = self._data.find(sep, self._pos + start)
        return -1 if i < 0 else i - self._pos

    def commit(self) -> None:
        """Forget the bytes taken so far."""
        del self._data[: self._pos]
        self._pos = 0

    def rollback(self) -> None:
        """Put the bytes taken since the last commit back."""
        self._pos = 0

    def discard(self, n: int) -> int:
        """Roll back, then drop up to ``n`` bytes at the start: garbage the parser gave up
        on (typically 1 byte, so a frame starting inside a bad candidate is still found).
        Return how many were dropped."""
        self._pos = 0
        n = max(0, min(n, len(self._data)))
        del self._data[:n]
        return n


class StreamParser(Generic[F], abc.ABC):
    """Base of the serial-sensor framers: ``feed(bytes) -> list[frame]``, never raising.

    Subclasses implement :meth:`_parse`, which appends every complete frame at the
    head of ``self._buf`` to ``out`` and leaves at most one incomplete frame in it
    (strictly fewer than ``MAX_FRAME`` bytes). Bytes that cannot start a valid frame
    are dropped through :meth:`_skip`, which counts them.
    """

    MAX_FRAME: int = 256  # longest frame a subclass recognises, in bytes

    def __init__(self, *, max_buffer: int = 1024) -> None:
        if max_buffer < 2 * self.MAX_FRAME:
            raise LocalError(f"max_buffer must be at least {2 * self.MAX_FRAME}")
        self._buf = Buffer(max_size=max_buffer)
        self._counters: dict[str, int] = {"frames": 0, "bytes_skipped": 0, "checksum_errors": 0}

    def feed(self, data: bytes) -> list[F]:
        """Take more bytes; return every frame they complete, in order."""
        out: list[F] = []
        # Slices of at most max_size - MAX_FRAME keep the buffer within its bound even
        # when one call brings megabytes: after each _parse fewer than MAX_FRAME remain.
        step = self._buf.max_size - self.MAX_FRAME
        for i in range(0, len(data), step):
            self._counters["bytes_skipped"] += self._buf.feed(data[i : i + step])
            self._parse(out)
        self._counters["frames"] += len(out)
        return out

    def statistics(self) -> dict[str, int]:
        """Counters since creation, plus ``buffered`` (bytes waiting for the rest of a frame)."""
        return {**self._counters, "buffered": self._buf.held}

    def _count(self, name: str, n: int = 1) -> None:
        self._counters[name] = self._counters.get(name, 0) + n

    def _skip(self, n: int) -> None:
        self._counters["bytes_skipped"] += self._buf.discard(n)

    @abc.abstractmethod
    def _parse(self, out: list[F]) -> None: ...
