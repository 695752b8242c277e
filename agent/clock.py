"""Injected time, so the scheduler and the batcher can be tested instantly; and
whether the wall clock can be believed.

A Raspberry Pi has no real-time clock: after a power cut it boots with the
time ``fake-hwclock`` saved, often weeks behind, until NTP syncs. So
:class:`SystemClock` asks the kernel whether its clock is synchronised
(:func:`kernel_synced`: ``adjtimex``, the flag ``timedatectl`` shows as
"System clock synchronized"). Until it is, readings are stamped from the
monotonic clock mapped to the wall clock at start (:meth:`SystemClock.now_ms`),
so a step of the wall clock (forward or back) never reorders them; the batches
say so (``"clock": "unsynced"``, :mod:`protocols.envelope`). The moment the
kernel says synchronised, the clock measures how far its stamps were from the
true time (:class:`ClockFix`) and stamps true time from then on; the batcher
carries that correction to the hub, which re-stamps the earlier readings.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Clock", "ClockFix", "SystemClock", "kernel_synced", "libc"]

log = logging.getLogger(__name__)

_TIME_ERROR = 5  # adjtimex's answer while the kernel's clock is not synchronised
_CHECK_EVERY_NS = 1_000_000_000  # ask the kernel at most once a second
_JUMP_NS = 2_000_000_000  # a wall clock this far off the monotonic one has been stepped


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


@dataclass(frozen=True, slots=True)
class ClockFix:
    """What the stamps of this run were worth, measured when the clock synchronised.

    Readings stamped before the sync (``ts < until``) are ``offset_ms`` off the
    true time: their true time is ``ts + offset_ms``.
    """

    offset_ms: int
    until: int


_unavailable_logged = False


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library of this process, loaded once (raises ``OSError`` where there is none).

    Every ``ctypes.CDLL`` defines a new ctypes class, which only the cyclic
    garbage collector frees, and the running agent's collector seldom runs
    (:mod:`agent.service` freezes the start-up objects and raises the
    thresholds): loaded once a second by :func:`kernel_synced` while the clock
    was unsynchronised, it grew the agent's RSS ~3 KB a second (decisions 45).
    """
    return ctypes.CDLL(None, use_errno=True)


def kernel_synced() -> bool:
    """Whether the kernel's clock is synchronised (``adjtimex``: not ``TIME_ERROR``).

    Where the kernel cannot be asked (not Linux, no libc), the clock is
    believed, as every program believes it: logged once at INFO.
    """
    global _unavailable_logged
    try:
        buf = ctypes.create_string_buffer(512)  # struct timex, modes 0: read only
        state = int(libc().adjtimex(buf))
    except (OSError, AttributeError):
        state = -1
    if state < 0:
        if not _unavailable_logged:
            _unavailable_logged = True
            log.info("clock: cannot ask the kernel whether the clock is synchronised; trusting it")
        return True
    return state != _TIME_ERROR


class SystemClock:
    """The system's clocks. ``wall_ns`` and ``kernel_synced`` are injectable: a test
    starts a gateway weeks behind and syncs it when it likes, through this class."""

    def __init__(
        self,
        *,
        wall_ns: Callable[[], int] = time.time_ns,
        synced: Callable[[], bool] = kernel_synced,
    ) -> None:
        self._sleepers: dict[
            tuple[asyncio.AbstractEventLoop, float], list[asyncio.Future[None]]
        ] = {}
        self._wall_ns = wall_ns
        self._ask = synced
        mono = time.monotonic_ns()
        self.synced = bool(synced())
        # wall = _base + monotonic: the mapping the stamps use while unsynchronised,
        # and the one a step of the wall clock is measured against
        self._base = wall_ns() - mono
        self._asked = mono
        self.fix: ClockFix | None = None
        self.jumps = 0
        self._stepped_ns = 0  # the wall clock's last seen step while unsynchronised
        if not self.synced:
            log.info(
                "clock: the system clock is not synchronised (no NTP yet): readings are"
                " stamped from the monotonic clock and corrected when it syncs"
            )

    def now_ms(self) -> int:
        mono = time.monotonic_ns()
        if self.synced:
            wall = self._wall_ns()
            if abs(wall - mono - self._base) > _JUMP_NS:
                self._jumped(wall - mono)
            return wall // 1_000_000
        stamp = self._base + mono
        if mono - self._asked >= _CHECK_EVERY_NS:  # a system call: once a second
            self._asked = mono
            if self._ask():
                wall = self._wall_ns()
                self.fix = ClockFix((wall - stamp) // 1_000_000, stamp // 1_000_000 + 1)
                (log.warning if abs(self.fix.offset_ms) > _JUMP_NS // 10**6 else log.info)(
                    "clock: the system clock is synchronised now; the readings of this run"
                    " so far were stamped %+.3f s off the true time (the hub corrects them)",
                    self.fix.offset_ms / 1000,
                )
                self._base = wall - mono
                self.synced = True
                return wall // 1_000_000
        wall = self._wall_ns()
        if abs(wall - stamp - self._stepped_ns) > _JUMP_NS:
            step = (wall - stamp - self._stepped_ns) / 1e9
            self._stepped_ns = wall - stamp
            self.jumps += 1
            (log.warning if self.jumps == 1 else log.info)(
                "clock: the unsynchronised system clock was stepped by %+.0f s;"
                " readings keep the monotonic clock's time",
                step,
            )
        return stamp // 1_000_000

    def _jumped(self, base: int) -> None:
        step = (base - self._base) / 1e9
        self._base = base
        self.jumps += 1
        (log.warning if self.jumps == 1 else log.info)(
            "clock: the system clock was stepped by %+.0f s while running; batches keep"
            " their order (sequence numbers), only the readings' times jump",
            step,
        )

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
