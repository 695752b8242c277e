"""The poll schedule of one bus as a sans-IO machine: what to poll when, and what the answers make of it.

No I/O, no asyncio, no clock: every instant is an argument (seconds on a
monotonic clock). ``agent.fieldbus`` drives it: :class:`~agent.fieldbus.poller.BusPoller` (one
task per bus, awaiting each transaction) and :class:`~agent.fieldbus.engine.TcpEngine`
(every Modbus TCP bus from one task, replies from the transport's reactor),
both through the public methods below only. tests/test_poll.py feeds it
instants and answers and checks what it asks for next.

A *job* is a group of a device's points read at one interval, planned into
``n_requests`` read requests. :class:`Schedule` keeps a bus's jobs by due time:

* :meth:`Schedule.start` puts every job on a common 100 ms grid, so the polls
  of many buses at the same interval fall due at the same instants
  (docs/decisions.md 18).
* :meth:`Schedule.next` gives the job to poll now, or the instant to look
  again. It skips the slots of an offline device in back-off, and moves the
  poll of a *suspect* device (it failed its last poll) into the bus's idle
  time when its likely timeout does not fit before the next job (never more
  than one interval, or back-off period, after its slot).
* :meth:`Schedule.poll` starts a :class:`Poll`: its requests in turn
  (:attr:`Poll.request`), each answer fed back (:meth:`Poll.feed`), then
  :meth:`Poll.finish` moves the device's state and :meth:`Schedule.done` the
  job's due time on by exactly one interval (whole intervals missed are
  skipped and counted as ``overruns``, never caught up in a burst).

What one request gets back (:class:`Answer`), one row each in
:meth:`Poll.feed`:

=========== ============================================ =====================================
answer      the request                                  the poll
=========== ============================================ =====================================
REPLY       answered: next request                       -
PARTIAL     answered, a point did not decode: next       answered in part
EXCEPTION   refused: it fails (no value), next request   answered in part
SILENCE     retried ``retries`` times (not for a         silent: it and every later request
            suspect device), then fails                  fail (STALE while only degraded)
LINK_DOWN   fails at once: retrying a dead link is       silent, as above; the bus's link is
            pointless                                    down until any answer comes
=========== ============================================ =====================================

How a poll moves its device (:class:`DeviceState`), one row each in
:meth:`Poll.finish`:

============================ =========== ===========================================
the poll                     next state  the schedule
============================ =========== ===========================================
answered in full             ONLINE      at its interval; back-off reset
answered in part             DEGRADED    at its interval; back-off reset
silent, fewer than           DEGRADED    suspect: its next poll waits for idle time,
``offline_after`` in a row               its readings repeat the last value, STALE
silent ``offline_after``     OFFLINE     one probe per back-off period (twice its
times in a row (or more)                 interval, doubling up to ``max_backoff_s``),
                                         no retry; the slots between are skipped
============================ =========== ===========================================

A device starts UNKNOWN (never polled). So a dead device costs its bus at most
one timeout per back-off period, and its neighbours keep their slots.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

__all__ = ["Answer", "DeviceState", "DeviceStatus", "Failed", "Job", "Poll", "Schedule"]

#: every bus starts on this grid (seconds)
PHASE_GRID_S = 0.1


class DeviceState(enum.StrEnum):
    UNKNOWN = "unknown"  # not polled yet
    ONLINE = "online"  # the last poll was answered in full
    DEGRADED = "degraded"  # answered in part, or silent fewer than offline_after polls in a row
    OFFLINE = "offline"  # silent offline_after polls in a row: probed once per back-off period


class Answer(enum.Enum):
    """What one request got back."""

    REPLY = "reply"  # every point of it decoded
    PARTIAL = "partial"  # a reply, but a point of it did not decode
    EXCEPTION = "exception"  # an exception response: the device answered, and refused
    SILENCE = "silence"  # no usable reply: a timeout, a garbled frame
    LINK_DOWN = "link down"  # the link could not carry the request (port, connection)


@dataclass(kw_only=True, eq=False)
class DeviceStatus:
    """A device's live state, as the schedule keeps it."""

    state: DeviceState = DeviceState.UNKNOWN
    transitions: Counter[str] = field(default_factory=Counter)  # "online->degraded": n
    failures_in_row: int = 0
    polls: int = 0
    polls_failed: int = 0
    polls_skipped: int = 0  # slots skipped while offline, in back-off
    retry_at: float = 0.0  # offline: the instant of the next probe
    backoff_s: float = 0.0
    backoff_first_s: float = 1.0  # the first back-off period (twice the device's interval)

    def enter(self, state: DeviceState) -> DeviceState | None:
        """Move to ``state``, counted; the state it left, or None if it stayed."""
        old = self.state
        if state is old:
            return None
        self.transitions[f"{old}->{state}"] += 1
        self.state = state
        return old


@dataclass(slots=True, eq=False)
class Job:
    """A device's points of one interval, planned into ``n_requests`` read requests."""

    device: DeviceStatus
    interval_s: float
    n_requests: int
    due: float = 0.0
    order: int = 0  # ties of due times: the order the jobs were given
    slot: float | None = None  # the grid slot of a deferred poll (``due`` is then later)

    def __lt__(self, other: Job) -> bool:
        return (self.due, self.order) < (other.due, other.order)


J = TypeVar("J", bound=Job)


class Failed(NamedTuple):
    """Requests of a poll that got no usable answer: their points read without a fresh value."""

    first: int
    end: int  # requests first..end-1
    stale: bool  # repeat each point's last good value as STALE (the device is only degraded)


class Schedule(Generic[J]):
    """The poll schedule of one bus: its jobs by due time, its devices' states, its link.

    ``suspect_cost(job)``: the seconds a poll of ``job``'s device may cost if it
    stays silent (timeout, the silence kept after it, the frame gap), to fit a
    suspect's poll into idle time; 0 defers nothing.
    """

    def __init__(
        self,
        jobs: Sequence[J],
        *,
        retries: int = 1,
        offline_after: int = 3,
        max_backoff_s: float = 60.0,
        suspect_cost: Callable[[J], float] = lambda job: 0.0,
    ) -> None:
        self.jobs = list(jobs)
        self.retries = retries
        self.offline_after = max(1, offline_after)
        self.max_backoff_s = max_backoff_s
        self.suspect_cost = suspect_cost
        self._heap: list[J] = []
        self.transactions = 0  # requests sent, retries included
        self.timeouts = 0  # requests that got no usable reply (not counting a link down)
        self.overruns = 0  # slots skipped because the bus fell behind
        self.deferred = 0  # suspect polls moved into idle time
        self.link_error = ""  # why the link is down; "" while it is up
        self.link_downs = 0

    def start(self, now: float) -> float | None:
        """Every job due at the first grid instant at or after ``now``; that instant (None: no jobs)."""
        start = math.ceil(now / PHASE_GRID_S) * PHASE_GRID_S
        self._heap = list(self.jobs)
        for job in self._heap:
            job.due = start
        heapq.heapify(self._heap)
        return start if self._heap else None

    def next(self, now: float) -> J | float:
        """The job to poll now, or the instant to look again.

        The job stays first until :meth:`done`: a bus runs one poll at a time.
        """
        heap = self._heap
        while True:
            job = heap[0]
            if job.due > now:
                return job.due
            dev = job.device
            if dev.state is DeviceState.OFFLINE and now < dev.retry_at:
                # in back-off: stay on the job's grid, first slot at or after retry_at
                skip = math.ceil((dev.retry_at - job.due) / job.interval_s)
                dev.polls_skipped += skip
                job.due += skip * job.interval_s
                heapq.heapreplace(heap, job)
                continue
            if dev.failures_in_row and len(heap) > 1 and self._defer(job, now):
                heapq.heapreplace(heap, job)
                continue
            return job

    def _defer(self, job: J, now: float) -> bool:
        """Move a suspect device's poll into the bus's idle time, if the bus has some.

        A device that failed its last poll will likely cost a whole timeout: run
        it when that fits before the next job falls due, so its neighbours keep
        their slots. Never later than one interval (or back-off period) after
        its slot: on a bus without idle time it takes its turn anyway. Never
        behind another suspect: two would make way for each other, a
        microsecond at a time, until that interval was over.
        """
        following = min(self._heap[1:3])  # the job due after this one
        if following.device.failures_in_row:
            return False
        nxt = following.due
        if nxt - now >= self.suspect_cost(job) + 0.002:
            return False
        slot = job.due if job.slot is None else job.slot
        if now - slot >= max(job.interval_s, job.device.backoff_s):
            return False
        job.slot = slot
        job.due = max(nxt, now) + 1e-6
        self.deferred += 1
        return True

    def poll(self, job: J) -> Poll[J]:
        """A poll of ``job`` (from :meth:`next`), to feed with its answers."""
        return Poll(self, job)

    def done(self, job: J, now: float) -> None:
        """``job`` (from :meth:`next`) was polled: due again whole intervals on."""
        if job.slot is not None:
            job.due, job.slot = job.slot, None
        job.due += job.interval_s
        if job.due <= now:
            missed = math.floor((now - job.due) / job.interval_s) + 1
            self.overruns += missed
            job.due += missed * job.interval_s
        heapq.heapreplace(self._heap, job)


class Poll(Generic[J]):
    """One poll of a job: its requests in turn, with retries; see the module's tables."""

    __slots__ = ("attempt", "job", "n", "partial", "schedule", "silent")

    def __init__(self, schedule: Schedule[J], job: J) -> None:
        self.schedule, self.job = schedule, job
        self.n = 0  # the request in turn
        self.attempt = 0  # retries of it so far
        self.silent = False  # a request got no usable answer: the device did not answer
        self.partial = False  # it answered, but not all of it

    @property
    def request(self) -> int | None:
        """The index of the request to send now (again, after a silence); None: the poll is over."""
        return self.n if self.n < self.job.n_requests else None

    def sent(self) -> None:
        self.schedule.transactions += 1

    def feed(self, answer: Answer, why: str = "") -> Failed | None:
        """The answer to the request in turn; the requests that failed by it, if any.

        ``why``: for LINK_DOWN, the reason (``Schedule.link_error``).
        """
        s, n = self.schedule, self.n
        if answer is Answer.LINK_DOWN:
            if not s.link_error:
                s.link_downs += 1
            s.link_error = why or "link down"
        else:
            s.link_error = ""  # it carried the request: the link is up
        match answer:
            case Answer.REPLY:
                failed = None
            case Answer.PARTIAL:
                self.partial = True
                failed = None
            case Answer.EXCEPTION:
                self.partial = True
                failed = Failed(n, n + 1, stale=False)
            case Answer.SILENCE | Answer.LINK_DOWN:
                dev = self.job.device
                if answer is Answer.SILENCE:
                    s.timeouts += 1
                    self.attempt += 1
                    # a device that failed its last poll too gets no retry
                    if self.attempt <= s.retries and not dev.failures_in_row:
                        return None
                self.silent = True
                # a silent device will not answer the next request either
                end = self.job.n_requests
                stale = (
                    dev.state is not DeviceState.OFFLINE
                    and dev.failures_in_row + 1 < s.offline_after
                )
                self.n, self.attempt = end, 0
                return Failed(n, end, stale)
        self.n, self.attempt = n + 1, 0
        return failed

    def finish(self, now: float) -> DeviceState | None:
        """The poll is over: its device's next state; the state it left, None if it stayed."""
        dev, s = self.job.device, self.schedule
        dev.polls += 1
        if self.silent or self.partial:
            dev.polls_failed += 1
        match self.silent, self.partial:
            case False, False:
                state = DeviceState.ONLINE
                dev.failures_in_row, dev.backoff_s = 0, 0.0
            case False, True:
                state = DeviceState.DEGRADED
                dev.failures_in_row, dev.backoff_s = 0, 0.0
            case True, _ if dev.failures_in_row + 1 < s.offline_after:
                state = DeviceState.DEGRADED
                dev.failures_in_row += 1
            case _:
                state = DeviceState.OFFLINE
                dev.failures_in_row += 1
                dev.backoff_s = min(s.max_backoff_s, dev.backoff_s * 2 or dev.backoff_first_s)
                dev.retry_at = now + dev.backoff_s
        return dev.enter(state)
