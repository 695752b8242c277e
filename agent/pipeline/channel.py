"""Closable channels: how the pipeline's tasks hand work on (batcher → spool → uplink).

trio's memory channels are the model: one side sends, the other receives, a
closed channel ends the receiver's loop once it has taken what was in it, and
nobody outside a channel touches its state (no Event that one class sets and
another clears). Two kinds:

- :class:`Channel`, a bounded FIFO of items (the batcher's sealed batches on
  their way to the spool writer). Unlike trio's, :meth:`Channel.send` puts
  the item in the channel *at once* and only then waits for room: an item is
  never held by a cancellable await (docs/decisions.md 3), and a full channel
  still slows the sender down.
- :class:`Notify`, a channel of one token that drops extra tokens: "something
  new" (the spool's news for the uplink) without a queue that grows while the
  receiver is busy.

This lives in ``agent/``, not ``protocols/``: it waits, so it needs the event
loop, and ``protocols/`` is sans-IO.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

from protocols.errors import LocalError

__all__ = ["Channel", "ChannelClosed", "Notify"]

T = TypeVar("T")


class ChannelClosed(LocalError):
    """Something was sent into a channel its sender had closed (our own misuse:
    trio's ClosedResourceError)."""


class Channel(Generic[T]):
    """A bounded FIFO from one sending task to one receiving task.

    ``send`` adds the item, then waits while ``capacity`` or more wait in the
    channel; ``receive`` waits for items and hands up to ``limit`` of them at
    once (a group commit takes everything that waits); ``close`` (the sender's)
    lets the receiver take what is left, then ``receive`` answers ``[]`` and
    ``async for`` ends.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise LocalError(f"a channel holds at least one item, not {capacity}")
        self._capacity = capacity
        self._items: deque[T] = deque()
        self._closed = False
        self._readable = asyncio.Event()  # items wait, or the channel is closed
        self._room = asyncio.Event()  # fewer than capacity wait, or the channel is closed
        self._room.set()
        self.sent = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> dict[str, int]:
        return {
            "buffered": len(self._items),
            "capacity": self._capacity,
            "sent": self.sent,
            "closed": int(self._closed),
        }

    async def send(self, item: T) -> None:
        """Put ``item`` in the channel (at once: cancelling the wait that follows
        never loses it), then wait until the channel has room again."""
        if self._closed:
            raise ChannelClosed("send on a closed channel")
        self._items.append(item)
        self.sent += 1
        self._readable.set()
        if len(self._items) >= self._capacity:
            self._room.clear()
            await self._room.wait()

    def take(self, limit: int) -> list[T]:
        """Up to ``limit`` items, oldest first, without waiting (``[]``: none now)."""
        items = self._items
        out = [items.popleft() for _ in range(min(limit, len(items)))]
        if not items and not self._closed:
            self._readable.clear()
        if len(items) < self._capacity:
            self._room.set()
        return out

    async def receive(self, limit: int) -> list[T]:
        """Wait for items; up to ``limit`` of them, oldest first. ``[]`` only once the
        channel is closed and empty: the receiver's loop ends there."""
        while not self._items and not self._closed:
            await self._readable.wait()
        return self.take(limit)

    def close(self) -> None:
        """No more sends; the receiver takes what is left, then its loop ends."""
        self._closed = True
        self._readable.set()
        self._room.set()  # a sender waiting for room: its item is in, let it go

    async def __aiter__(self) -> AsyncIterator[T]:
        while items := await self.receive(1):
            yield items[0]


class Notify:
    """A channel of one token: ``send`` never waits and drops the token when one is
    already there, so news sent while the receiver is busy coalesces."""

    def __init__(self) -> None:
        self._pending = False
        self._wake = asyncio.Event()  # a token waits, or the channel is closed
        self._closed = False
        self.sent = 0
        self.dropped = 0  # tokens that found one waiting

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> dict[str, int]:
        return {"sent": self.sent, "dropped": self.dropped, "closed": int(self._closed)}

    def send(self) -> None:
        """Leave a token (one waits at most). After ``close`` nobody listens: ignored."""
        if self._closed:
            return
        self.sent += 1
        if self._pending:
            self.dropped += 1
        self._pending = True
        self._wake.set()

    def take(self) -> bool:
        """Take the token if one waits, without waiting."""
        had, self._pending = self._pending, False
        if not self._closed:
            self._wake.clear()
        return had

    async def wait(self) -> bool:
        """Wait for the token and take it: True; False once closed with no token left."""
        while not self._pending and not self._closed:
            await self._wake.wait()
        return self.take()

    def close(self) -> None:
        """No more tokens; the receiver takes the one left, then ``wait`` answers False."""
        self._closed = True
        self._wake.set()
