"""Virtual time for scheduling tests: an asyncio loop whose clock jumps.

:class:`VirtualLoop` is an asyncio event loop whose clock only moves when
every task is waiting: then it jumps straight to the next timer (trio's
``MockClock(autojump_threshold=0)``). Code that takes its time from the loop
(``asyncio.sleep``, ``loop.time()``, ``call_later``, ``asyncio.timeout``) runs
a thousand intervals in milliseconds, and every instant is exact, so a test
asserts the exact instant instead of a wall-clock window.

Two ways in:

- an async test marked ``@pytest.mark.virtual_time`` runs on a
  :class:`VirtualLoop` (tests/conftest.py); the ``virtual_clock`` fixture gives
  it the agent's Clock protocol on that loop;
- a sync test calls ``run_virtual(body)`` with ``async def body(clock)``.

Real sockets, subprocesses and files still work on the loop (the selector is
polled before every jump), but their time is wall time: a test that waits on
a real process or broker does not belong on virtual time.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from typing import Any

START = 1000.0  # the loop's clock at creation (virtual seconds)
EPOCH_MS = 1_780_000_000_000  # VirtualClock.now_ms() at loop time 0


class _JumpSelector(selectors.DefaultSelector):
    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise RuntimeError("deadlock: every task waits and no timer is set")
        assert self.loop is not None
        self.loop.virtual += timeout  # nothing can happen before the next timer: jump there
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time that jumps to the next timer when idle."""

    def __init__(self) -> None:
        sel = _JumpSelector()
        super().__init__(sel)
        sel.loop = self
        self.virtual = START

    def time(self) -> float:
        return self.virtual


class VirtualClock:
    """The agent's Clock protocol on a :class:`VirtualLoop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def now_ms(self) -> int:
        return EPOCH_MS + round(self.loop.time() * 1000)

    def monotonic(self) -> float:
        return self.loop.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def sleep_until(self, when: float) -> None:
        await asyncio.sleep(max(0.0, when - self.loop.time()))


def run_virtual(factory: Callable[[VirtualClock], Coroutine[Any, Any, None]]) -> None:
    """Run ``factory(clock)`` to completion on a fresh :class:`VirtualLoop`."""
    loop = VirtualLoop()
    try:
        loop.run_until_complete(factory(VirtualClock(loop)))
    finally:
        loop.close()
