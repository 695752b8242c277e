"""One task for every Modbus TCP bus of the gateway: :class:`TcpEngine`.

Each bus keeps its :class:`~agent.fieldbus.poller.BusPoller` (schedule, states, the
steps of a poll and the decode); the engine only carries the transactions, through
the links' :meth:`~agent.fieldbus.links.ModbusLink.start_read` and the reactor of
:mod:`agent.fieldbus.tcp`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
from collections.abc import Sequence

from agent.clock import Clock
from agent.fieldbus.links import TransportError, wake
from agent.fieldbus.poller import ActivePoll, BusPoller, Sink
from agent.fieldbus.tcp import drain_input
from protocols.errors import DeviceException
from protocols.modbus import ReadRequest
from protocols.reading import Columns

__all__ = ["TcpEngine"]


class TcpEngine:
    """Polls many Modbus TCP buses from one task: no task, no coroutine chain per bus.

    A gateway with hundreds of TCP terminals would otherwise run a task per
    bus that wakes, sends, sleeps on a future and wakes again for each poll;
    on a small board (and on a VM) each of those wake-ups costs more than the
    work. Here one task starts every poll that is due, the links send at once
    (:meth:`ModbusLink.start_read`), and the replies come back from the TCP
    links' reactor (:mod:`agent.fieldbus.tcp`) in batches, each moving its poll
    on to its next request, retry or end. Each bus keeps its own schedule,
    states, back-off and deferral (its :class:`protocols.poll.Schedule`, and the
    poll steps of :class:`BusPoller` its task would use), and its
    one-transaction-at-a-time rule. The answers add their readings straight
    to the columns the sink gets next (no copy a poll), and the readings of
    all the replies that came together go to the sink in one call.

    A poll whose link cannot start a read at once (not connected yet, or a
    command holds it) goes through :meth:`ModbusLink.read` in a short task,
    and comes back.
    """

    def __init__(self, pollers: Sequence[BusPoller], sink: Sink, clock: Clock) -> None:
        self.pollers = list(pollers)
        self._sink = sink
        self._clock = clock
        self._heap: list[tuple[float, int, BusPoller]] = []
        self._out = Columns()
        self._wake: asyncio.Future[None] | None = None
        self._slow: set[asyncio.Task[None]] = set()
        self._running = False
        self._stopping = False  # finish(): no new polls
        self._in_flight = 0
        self._quiet = asyncio.Event()  # set when stopping and nothing is on the wire
        self._error: BaseException | None = None  # a bug in a callback: the task raises it

    async def run(self) -> None:
        """Poll forever. Cancel to stop."""
        clock = self._clock
        loop = asyncio.get_running_loop()
        now = clock.monotonic()
        for i, p in enumerate(self.pollers):
            due = p.schedule.start(now)
            if due is not None:
                heapq.heappush(self._heap, (due, i, p))
        self._running = True
        heap = self._heap
        try:
            while True:
                if self._error is not None:
                    raise self._error
                now = clock.monotonic()
                if heap and heap[0][0] <= now:
                    drain_input()  # late replies, closed connections: before the burst
                while heap and heap[0][0] <= now and not self._stopping:
                    _, i, p = heapq.heappop(heap)
                    self._next(i, p, now)
                if self._out:
                    out, self._out = self._out, Columns()
                    await self._sink(out)
                    continue
                sleep = self._wake = loop.create_future()
                # stopping: no timer (the heap's top may be due: it would spin)
                timer = (
                    loop.call_at(heap[0][0], wake, sleep) if heap and not self._stopping else None
                )
                try:
                    await sleep
                finally:
                    self._wake = None
                    if timer is not None:
                        timer.cancel()
        finally:
            self._running = False
            for t in self._slow:
                t.cancel()
            for p in self.pollers:
                p.link.close()

    async def finish(self, timeout_s: float) -> None:
        """Start no more polls; let those on the wire end (at most ``timeout_s``), deliver them.

        So a stop loses no reading a terminal has already been asked for.
        """
        self._stopping = True
        if self._in_flight and self._error is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._quiet.wait(), timeout_s)
        if self._out:
            out, self._out = self._out, Columns()
            await self._sink(out)

    def _next(self, i: int, p: BusPoller, now: float) -> None:
        """Start the bus's next poll if it is due, else put the bus back in the heap."""
        if self._stopping:
            return
        job = p.schedule.next(now)
        if isinstance(job, float):
            heapq.heappush(self._heap, (job, i, p))
            w = self._wake
            if w is not None and self._heap[0][1] == i and not w.done():
                w.set_result(None)  # earlier than the engine sleeps for
            return
        self._in_flight += 1
        self._send(i, p, p.begin(job, self._out))

    def _send(self, i: int, p: BusPoller, poll: ActivePoll) -> None:
        """Send the poll's request in turn, or end the poll."""
        req = poll.request
        if req is None:
            self._in_flight -= 1
            if self._stopping and not self._in_flight:
                self._quiet.set()
            now = self._clock.monotonic()
            p.end(poll, now)  # its readings are in the columns the sink gets next
            p.schedule.done(poll.job, now)
            w = self._wake
            if w is not None and not w.done():
                w.set_result(None)
            self._next(i, p, now)
            return
        poll.sent(self._clock.monotonic())
        done = functools.partial(self._answer, i, p, poll)
        if not p.link.start_read(req.space, req.address, req.count, poll.job.device.slave, done):
            task = asyncio.get_running_loop().create_task(self._read(i, p, poll, req))
            self._slow.add(task)
            task.add_done_callback(self._slow.discard)

    async def _read(self, i: int, p: BusPoller, poll: ActivePoll, req: ReadRequest) -> None:
        try:
            regs: Sequence[int] | Sequence[bool] | Exception = await p.link.read(
                req.space, req.address, req.count, poll.job.device.slave
            )
        except (TransportError, DeviceException) as exc:
            regs = exc
        except Exception as exc:
            self._fail(exc)
            return
        self._answer(i, p, poll, regs)

    def _answer(
        self,
        i: int,
        p: BusPoller,
        poll: ActivePoll,
        result: Sequence[int] | Sequence[bool] | Exception,
    ) -> None:
        if not self._running:
            return  # stopped while the read was on the wire
        clock = self._clock
        poll.out = self._out  # handed on since the poll began: into the next ones
        try:
            p.answer(poll, result, clock.monotonic(), clock.now_ms())
            self._send(i, p, poll)
        except Exception as exc:  # a bug: not to be lost in the reactor's callback
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self._quiet.set()
        w = self._wake
        if w is not None and not w.done():
            w.set_result(None)
