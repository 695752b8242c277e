"""Injected time, so the scheduler and the batcher can be tested instantly."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    def now_ms(self) -> int:
        """Wall-clock time, ms since the Unix epoch, UTC (timestamps of readings)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps (schedules and ages)."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    async def sleep_until(self, when: float) -> None:
        """Sleep until :meth:`monotonic` reaches ``when``."""
        ...


class SystemClock:
    def __init__(self) -> None:
        self._sleepers: dict[
            tuple[asyncio.AbstractEventLoop, float], list[asyncio.Future[None]]
        ] = {}

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    # time.monotonic itself, not a method calling it: read several times per poll
    monotonic = staticmethod(time.monotonic)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def sleep_until(self, when: float) -> None:
        """Sleep until ``time.monotonic()`` (the event loop's clock) reaches ``when``.

        Sleepers of the same instant share one timer: 500 pollers due at the
        same second cost the loop one timer, not 500 (each ``asyncio.sleep`` is
        a handle pushed onto and popped off the loop's heap, compared in Python).
        """
        loop = asyncio.get_running_loop()
        if when <= loop.time():
            await asyncio.sleep(0)
            return
        key = (loop, when)
        group = self._sleepers.get(key)
        if group is None:
            group = self._sleepers[key] = []
            loop.call_at(when, self._ring, key)
        fut: asyncio.Future[None] = loop.create_future()
        group.append(fut)
        await fut

    def _ring(self, key: tuple[asyncio.AbstractEventLoop, float]) -> None:
        for fut in self._sleepers.pop(key, ()):
            if not fut.done():
                fut.set_result(None)
