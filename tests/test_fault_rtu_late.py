"""Fault: an RTU slave that answers after the timeout, with another value.

Issue 12 item 3: the late reply of a slave was published as the value of the
next request, marked GOOD (22 of 25 polls of a point whose true value was 0
came out as 48879); a late reply of another length made the genuine reply
behind it fail as a CRC error.

The slave here is a small one of our own on a real pty (a thread), so the
test decides exactly when each reply goes out and what it carries: every
third request is answered late with ``LATE`` (0xBEEF), every other one at
once with the true value ``TRUE``. The real agent poller and the real serial
link poll it many times; no ``LATE`` may ever come out, as GOOD or otherwise,
and the genuine values must. Two kinds of late slave:

* ``timed``: the late reply goes out ``late_s`` after the request, past the
  master's timeout (a busy slave);
* ``racing``: the late reply is held back until the *next* request arrives,
  then sent right before the genuine reply to that request: the worst case,
  which no silence after a timeout can catch (the late reply starts after
  the next request ended).

Each runs with a late reply of the same length as the next one's (the case
where RTU has nothing but timing to tell them apart) and of another length
(the case that made the genuine reply fail as a CRC error).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import select
import threading
import time
import tty
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.clock import SystemClock
from agent.fieldbus.links import ModbusLink, TransportError
from agent.fieldbus.poller import BusPoller, PolledDevice
from agent.fieldbus.rtu import RtuLink
from drivers.profiles import Point
from protocols.errors import DeviceException
from protocols.modbus import DataType, PointSpec, Space
from protocols.modbus.rtu import crc16
from protocols.reading import Quality, Reading

TRUE = 7
LATE = 0xBEEF  # 48879, the value of the issue
# the master's timeout: long enough that a loaded machine (the suite on four workers
# on two cores) does not make a genuine reply (GENUINE_S after its request) late too:
# at 50 ms it did, and the link rightly counted more late replies than the slave sent
TIMEOUT_S = 0.15
# the slave's genuine turnaround: the master holds a reply after a timeout for twice
# the slowest reply it heard + 20 ms and counts what comes later as late (rightly: it
# cannot tell); at 4 ms that left ~25 ms to a loaded machine, which a stall of the
# event loop overran (a genuine reply counted late: 20 counted, 19 sent); at 30 ms, ~50
GENUINE_S = 0.03


def _reply(slave: int, words: list[int]) -> bytes:
    body = bytes([slave, 3, 2 * len(words)]) + b"".join(w.to_bytes(2, "big") for w in words)
    return body + crc16(body).to_bytes(2, "little")


class LateSlave:
    """Slave 1 on a pty: every ``every``-th request answered late with ``LATE``.

    ``mode`` is ``timed`` (``late_s`` after the request) or ``racing`` (just
    before the reply to the next request). ``late_words`` is the length of
    the late reply in registers (the requests read one).
    """

    def __init__(self, *, mode: str, late_words: int, every: int = 3, late_s: float = 0.0) -> None:
        self.mode, self.late_words, self.every, self.late_s = mode, late_words, every, late_s
        self.master, self._slave_fd = os.openpty()
        tty.setraw(self._slave_fd)
        os.set_blocking(self.master, False)
        self.port = os.ttyname(self._slave_fd)
        self.requests = 0
        self.late_sent = 0
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LateSlave:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join()
        for fd in (self.master, self._slave_fd, self._stop_r, self._stop_w):
            os.close(fd)

    def _run(self) -> None:
        rx = bytearray()
        queue: list[tuple[float, bytes]] = []  # (when, frame), sent in order of time
        held: bytes | None = None  # racing: the late reply, waiting for the next request
        while True:
            now = time.monotonic()
            wait = max(0.0, queue[0][0] - now) if queue else None
            r, _, _ = select.select([self.master, self._stop_r], [], [], wait)
            if self._stop_r in r:
                return
            if self.master in r:
                with contextlib.suppress(BlockingIOError, OSError):
                    rx += os.read(self.master, 4096)
            now = time.monotonic()
            while len(rx) >= 8:
                frame = bytes(rx[:8])
                if crc16(frame[:6]) != int.from_bytes(frame[6:], "little") or frame[0] != 1:
                    del rx[:1]  # not a request of ours: resync on the next byte
                    continue
                del rx[:8]
                self.requests += 1
                late = _reply(1, [LATE] * self.late_words)
                if held is not None:  # racing: the old reply first, then the genuine one
                    queue.append((now, held))
                    held = None
                if self.mode == "always" or self.requests % self.every == 0:
                    if self.mode == "racing":
                        held = late
                    else:
                        queue.append((now + self.late_s, late))
                else:
                    queue.append((now + GENUINE_S, _reply(1, [TRUE])))
                queue.sort(key=lambda q: q[0])
            while queue and queue[0][0] <= time.monotonic():
                frame = queue.pop(0)[1]
                with contextlib.suppress(OSError):
                    os.write(self.master, frame)
                    self.late_sent += LATE.to_bytes(2, "big") in frame


POINT = Point(PointSpec("level", Space.HOLDING, 10, DataType.U16))


@pytest.fixture(params=["same-length", "other-length"])
def late_words(request: pytest.FixtureRequest) -> Iterator[int]:
    yield 1 if request.param == "same-length" else 2


async def _poll(slave: LateSlave, polls: int) -> tuple[list[Reading], BusPoller]:
    readings: list[Reading] = []
    enough = asyncio.Event()

    async def sink(rs: list[Reading]) -> None:
        readings.extend(rs)
        if dev.polls >= polls:
            enough.set()

    link = ModbusLink.serial(slave.port, baud=115200, parity="N", timeout_s=TIMEOUT_S)
    dev = PolledDevice(
        name="level", slave=1, interval_s=0.02, max_registers=8, max_gap=0, points=[(1, POINT)]
    )
    poller = BusPoller("rs485-1", link, [dev], sink, SystemClock(), retries=1, offline_after=1000)
    task = asyncio.create_task(poller.run())
    try:
        await asyncio.wait_for(enough.wait(), 60)  # a safety limit, not a measure
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return readings, poller


def _check(readings: list[Reading], poller: BusPoller, slave: LateSlave) -> None:
    values = [r.value for r in readings]
    assert LATE not in values, f"a late reply was published: {values.count(LATE)} of {len(values)}"
    good = [r for r in readings if r.quality is Quality.GOOD]
    assert all(r.value == TRUE for r in good)
    # the genuine replies behind the late ones come through: most polls are good
    assert len(good) >= len(readings) // 2, [r.quality for r in readings]
    assert slave.late_sent >= 10  # the late replies did go out on the wire
    # each seen, counted and dropped (the last may still have been on its way); a reply
    # is late only to a request that timed out: on a loaded machine a genuine reply can
    # miss its request's timeout too, and is then rightly counted late as well
    late = poller.link.statistics()["late_replies"]
    assert slave.late_sent - 1 <= late <= poller.schedule.timeouts


async def test_timed_late_reply_is_never_published(late_words: int) -> None:
    """The late reply lands 1.5 timeouts after its request: in the silence the
    master keeps after a timeout (or, before the fix, after the retry went out)."""
    with LateSlave(mode="timed", late_words=late_words, late_s=TIMEOUT_S * 1.5) as slave:
        readings, poller = await _poll(slave, 40)
    _check(readings, poller, slave)


async def test_racing_late_reply_is_never_published(late_words: int) -> None:
    """The late reply comes right before the genuine reply to the next request:
    the master takes the last of the two, never the first."""
    with LateSlave(mode="racing", late_words=late_words) as slave:
        readings, poller = await _poll(slave, 40)
    _check(readings, poller, slave)
    if late_words == 2:  # the genuine reply behind a longer late one is no CRC error
        assert "CRC" not in poller.devices[0].last_error


async def test_always_late_slave_is_never_published() -> None:
    """The issue's case: every reply comes 2.5 timeouts late, past the first
    late window, while the next request to the same slave waits for its own.
    Not one of them may be taken: the device is silent, not wrong."""
    with LateSlave(mode="always", late_words=1, late_s=TIMEOUT_S * 2.5) as slave:
        readings, poller = await _poll(slave, 25)
    assert slave.late_sent >= 20
    assert all(r.value != LATE for r in readings), [r.value for r in readings]
    assert not [r for r in readings if r.quality is Quality.GOOD]
    assert slave.late_sent - 1 <= poller.link.statistics()["late_replies"] <= slave.late_sent


class _WireLink(RtuLink):
    """The RTU master on an in-memory line: what it sends is answered by ``chunks``."""

    def __init__(self, chunks: list[bytes]) -> None:
        super().__init__("mem", timeout_s=0.02, inter_frame_s=0.0, char_s=0.0)
        self.chunks = chunks

    @property
    def connected(self) -> bool:
        return True

    async def _open(self) -> None:
        pass

    def _send(self, frame: bytes) -> None:
        loop = asyncio.get_running_loop()
        for chunk in self.chunks:
            loop.call_soon(self._received, chunk)


@settings(max_examples=150, deadline=None)
@given(
    before=st.binary(max_size=40),
    after=st.binary(max_size=40),
    cuts=st.lists(st.integers(0, 120), max_size=6),
)
def test_any_line_noise_around_the_reply(before: bytes, after: bytes, cuts: list[int]) -> None:
    """Noise before and after the genuine reply, cut anywhere: the master takes
    the reply or fails with one of its own errors, never anything else."""
    wire = before + _reply(1, [TRUE]) + after
    points = sorted({0, len(wire), *(c for c in cuts if c < len(wire))})
    link = _WireLink([wire[a:b] for a, b in itertools.pairwise(points)])

    async def read() -> list[int] | TransportError | DeviceException:
        try:
            return list(await link.read(Space.HOLDING, 10, 1, 1))
        except (TransportError, DeviceException) as exc:
            return exc

    got = asyncio.run(read())
    assert got == [TRUE] or isinstance(got, (TransportError, DeviceException))
