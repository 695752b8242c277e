"""The poll schedule (protocols/poll.py) alone: instants and answers in, what it asks for next out.

No event loop, no link, no sleep: every instant is an argument. The bus's
drivers (agent/fieldbus/poller.py) are tested on virtual time and real sockets in
test_bus.py and test_engine.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from protocols.poll import Answer, DeviceState, DeviceStatus, Failed, Job, Schedule

T0 = 1000.0  # on the 100 ms grid

ONLINE, DEGRADED, OFFLINE = DeviceState.ONLINE, DeviceState.DEGRADED, DeviceState.OFFLINE
REPLY, PARTIAL, EXCEPTION = Answer.REPLY, Answer.PARTIAL, Answer.EXCEPTION
SILENCE, LINK_DOWN = Answer.SILENCE, Answer.LINK_DOWN


def _bus(
    *intervals: float,
    requests: int = 1,
    cost: float = 0.0,
    backoff_first_s: float = 2.0,
    retries: int = 1,
    offline_after: int = 3,
    max_backoff_s: float = 60.0,
) -> tuple[Schedule[Job], list[Job]]:
    """A bus of one device per interval, each job of ``requests`` requests.

    ``cost``: what a suspect device's poll may cost (its timeout and the silences).
    """
    jobs = [
        Job(DeviceStatus(backoff_first_s=backoff_first_s), iv, requests, order=k)
        for k, iv in enumerate(intervals)
    ]
    s = Schedule(
        jobs,
        retries=retries,
        offline_after=offline_after,
        max_backoff_s=max_backoff_s,
        suspect_cost=lambda job: cost,
    )
    return s, jobs


def _poll(
    s: Schedule[Job], job: Job, answers: Sequence[Answer], now: float, *, took: float = 0.0
) -> tuple[list[Failed], DeviceState | None]:
    """Poll ``job`` at ``now``: feed ``answers`` while it asks; what failed, the state it left."""
    poll = s.poll(job)
    failed = []
    feed = iter(answers)
    while poll.request is not None:
        poll.sent()
        f = poll.feed(next(feed), "port gone")
        if f is not None:
            failed.append(f)
    assert next(feed, None) is None, "the poll ended before every answer was fed"
    left = poll.finish(now + took)
    s.done(job, now + took)
    return failed, left


def _due(s: Schedule[Job], now: float) -> Job:
    job = s.next(now)
    assert isinstance(job, Job), f"nothing due at {now}: next at {job}"
    return job


# --------------------------------------------------------------------------- timing


def test_start_puts_every_job_on_the_100ms_grid() -> None:
    s, jobs = _bus(1.0, 5.0)
    assert s.start(T0 + 0.03) == pytest.approx(T0 + 0.1)
    assert s.next(T0 + 0.05) == pytest.approx(T0 + 0.1)  # not yet: when to look again
    assert _due(s, T0 + 0.1) is jobs[0]  # ties by the order given
    assert Schedule([]).start(T0) is None


def test_one_poll_at_a_time_then_whole_intervals_on_without_drift() -> None:
    s, (job,) = _bus(1.0)
    s.start(T0)
    starts = []
    now = T0
    for _ in range(1000):
        job_now = s.next(now)
        if isinstance(job_now, float):
            now = job_now
            continue
        assert s.next(now + 0.5) is job  # still due until done: one poll at a time
        starts.append(now)
        _poll(s, job, [REPLY], now, took=0.0137)
        now += 0.0137
    assert [round(t - T0, 6) for t in starts[:3]] == [0.0, 1.0, 2.0]
    assert starts[-1] - starts[0] == pytest.approx(len(starts) - 1, abs=1e-6)
    assert s.overruns == 0 and s.transactions == len(starts)


def test_a_bus_that_falls_behind_skips_whole_intervals() -> None:
    s, (job,) = _bus(1.0)
    s.start(T0)
    _poll(s, _due(s, T0), [REPLY], T0, took=2.5)  # the poll took 2.5 intervals
    assert s.overruns == 2
    assert job.due == pytest.approx(T0 + 3.0)  # the next slot on the grid, no burst
    assert s.next(T0 + 2.5) == job.due


# --------------------------------------------------------------------------- one poll's steps


def test_a_reply_moves_to_the_next_request_and_the_device_online() -> None:
    s, (job,) = _bus(1.0, requests=3)
    s.start(T0)
    poll = s.poll(_due(s, T0))
    assert [poll.request, poll.feed(REPLY), poll.request] == [0, None, 1]
    assert poll.feed(PARTIAL) is None  # a point did not decode: the others are readings
    assert poll.feed(REPLY) is None and poll.request is None
    assert poll.finish(T0) is DeviceState.UNKNOWN  # the state it left
    assert job.device.state is DEGRADED and job.device.polls_failed == 1


def test_an_exception_fails_its_request_only_and_is_an_answer() -> None:
    s, (job,) = _bus(1.0, requests=3)
    s.start(T0)
    poll = s.poll(_due(s, T0))
    poll.feed(REPLY)
    assert poll.feed(EXCEPTION) == Failed(1, 2, stale=False)
    assert poll.request == 2 and poll.feed(REPLY) is None
    poll.finish(T0)
    dev = job.device
    assert (dev.state, dev.failures_in_row, dev.backoff_s) == (DEGRADED, 0, 0.0)
    assert s.timeouts == 0


def test_silence_is_retried_then_fails_every_request_left() -> None:
    s, (job,) = _bus(1.0, requests=3, retries=2)
    s.start(T0)
    poll = s.poll(_due(s, T0))
    poll.feed(REPLY)
    assert poll.feed(SILENCE) is None and poll.request == 1  # again
    assert poll.feed(SILENCE) is None and poll.request == 1  # and again
    # then it and the one after: a silent device will not answer that either
    assert poll.feed(SILENCE) == Failed(1, 3, stale=True)
    assert poll.request is None and s.timeouts == 3
    poll.finish(T0)
    assert (job.device.state, job.device.failures_in_row) == (DEGRADED, 1)


def test_a_device_that_failed_its_last_poll_gets_no_retry() -> None:
    s, (job,) = _bus(1.0, retries=3)
    s.start(T0)
    _poll(s, job, [SILENCE] * 4, T0)  # an attempt and three retries
    assert _poll(s, _due(s, T0 + 1), [SILENCE], T0 + 1)[0] == [Failed(0, 1, stale=True)]
    assert s.transactions == 5


def test_a_link_down_fails_at_once_and_is_said_once() -> None:
    s, (a, b) = _bus(1.0, 1.0, retries=3)
    s.start(T0)
    for job in (a, b):
        poll = s.poll(_due(s, T0))
        assert poll.job is job
        assert poll.feed(LINK_DOWN, "/dev/ttyUSB0: unplugged") == Failed(0, 1, stale=True)
        poll.finish(T0)
        s.done(job, T0)
    assert (s.link_error, s.link_downs, s.timeouts) == ("/dev/ttyUSB0: unplugged", 1, 0)
    assert a.device.state is DEGRADED  # as silent as a device that does not answer
    poll = s.poll(_due(s, T0 + 1.5))
    poll.feed(SILENCE)  # the link carried the request: it is up, the device silent
    assert (s.link_error, s.link_downs) == ("", 1)


# --------------------------------------------------------------------------- device states


@pytest.mark.parametrize(
    ("polls", "states"),
    [
        ([[REPLY]], [ONLINE]),
        ([[PARTIAL]], [DEGRADED]),
        ([[EXCEPTION]], [DEGRADED]),
        (
            [[REPLY], [SILENCE, SILENCE], [SILENCE], [SILENCE]],
            [ONLINE, DEGRADED, DEGRADED, OFFLINE],
        ),
        (
            [[SILENCE, SILENCE], [SILENCE], [SILENCE], [REPLY]],
            [DEGRADED, DEGRADED, OFFLINE, ONLINE],
        ),
        ([[LINK_DOWN], [LINK_DOWN], [LINK_DOWN]], [DEGRADED, DEGRADED, OFFLINE]),
        ([[SILENCE, SILENCE], [EXCEPTION], [SILENCE, SILENCE]], [DEGRADED, DEGRADED, DEGRADED]),
    ],
    ids=["reply", "partial", "exception", "silent-3", "back", "link-down-3", "answer-resets"],
)
def test_device_states(polls: list[list[Answer]], states: list[DeviceState]) -> None:
    s, (job,) = _bus(1.0, retries=1, offline_after=3, max_backoff_s=1.0, backoff_first_s=1.0)
    s.start(T0)
    got = []
    for k, answers in enumerate(polls):
        _poll(s, _due(s, T0 + 1.0 * k), answers, T0 + 1.0 * k)
        got.append(job.device.state)
    assert got == states


def test_transitions_are_counted_by_kind() -> None:
    dev = DeviceStatus()
    assert dev.enter(ONLINE) is DeviceState.UNKNOWN
    assert dev.enter(ONLINE) is None  # no move
    dev.enter(DEGRADED)
    dev.enter(ONLINE)
    dev.enter(DEGRADED)
    assert dev.transitions == {"unknown->online": 1, "online->degraded": 2, "degraded->online": 1}


def test_the_failure_that_takes_a_device_offline_reads_without_value() -> None:
    s, (job,) = _bus(1.0, retries=0, offline_after=2)
    s.start(T0)
    assert _poll(s, _due(s, T0), [SILENCE], T0)[0] == [Failed(0, 1, stale=True)]
    assert _poll(s, _due(s, T0 + 1), [SILENCE], T0 + 1)[0] == [Failed(0, 1, stale=False)]
    assert job.device.state is OFFLINE


def test_an_offline_device_is_probed_once_per_backoff_period_doubling_to_the_cap() -> None:
    s, (job,) = _bus(1.0, retries=0, offline_after=1, max_backoff_s=8.0, backoff_first_s=2.0)
    dev = job.device
    s.start(T0)
    now = T0
    probes = []
    while now < T0 + 60:
        due = s.next(now)
        if isinstance(due, float):
            now = due
            continue
        probes.append(now - T0)
        _poll(s, due, [SILENCE], now, took=0.5)  # each probe costs a whole timeout
        now += 0.5
    # offline after the first silence; then back-off 2, 4, 8, 8... from each probe's end,
    # each probe on the job's 1 s grid: the first slot at or after the end of its back-off
    assert probes[:5] == [0.0, 3.0, 8.0, 17.0, 26.0]
    assert dev.state is OFFLINE and dev.backoff_s == 8.0
    # every slot of the job so far was either a probe or skipped, counted
    assert dev.polls == len(probes) and dev.polls + dev.polls_skipped == round(job.due - T0)
    _poll(s, _due(s, T0 + 62), [REPLY], T0 + 62)
    assert (dev.state, dev.backoff_s, dev.failures_in_row) == (ONLINE, 0.0, 0)


# --------------------------------------------------------------------------- deferral


def test_a_suspect_poll_waits_for_idle_time_but_at_most_one_interval() -> None:
    """A device that failed its last poll may cost a timeout: it goes when that fits."""
    s, (suspect, busy) = _bus(1.0, 0.2, cost=0.5, retries=0)
    s.start(T0)
    _poll(s, _due(s, T0), [SILENCE], T0, took=0.5)  # suspect from now on
    _poll(s, _due(s, T0 + 0.5), [REPLY], T0 + 0.5, took=0.01)  # (its 0.2 and 0.4 skipped)
    now = T0 + 0.6
    order = []
    while now < T0 + 3.0:
        job = s.next(now)
        if isinstance(job, float):
            now = job
            continue
        order.append((round(now - T0, 6), job))
        took = 0.5 if job is suspect else 0.01
        _poll(s, job, [SILENCE if job is suspect else REPLY], now, took=took)
        now += took
    # the busy neighbour never leaves 0.5 s free: the suspect's slot at 1.0 is deferred,
    # again and again, until one interval after it; then it takes its turn anyway
    suspects = [t for t, job in order if job is suspect]
    assert suspects[0] == pytest.approx(2.01) and s.deferred > 0
    # meanwhile its neighbour kept every slot
    busy_slots = [t for t, job in order if job is busy and t < 2.01]
    assert busy_slots == pytest.approx([0.6 + 0.2 * k for k in range(8)])
    # and it stays on its own grid: from the slot it was deferred from, whole intervals on
    assert suspect.due == pytest.approx(T0 + 3.0) and suspect.slot is None


def test_a_suspect_poll_runs_in_its_slot_when_the_bus_has_the_time() -> None:
    s, (suspect, other) = _bus(1.0, 2.0, cost=0.5, retries=0)
    s.start(T0)
    _poll(s, _due(s, T0), [SILENCE], T0)
    _poll(s, _due(s, T0), [REPLY], T0, took=0.01)
    assert other.due == T0 + 2.0
    assert s.next(T0 + 1) is suspect  # 1 s free before the next job: no need to wait
    assert s.deferred == 0


def test_two_suspects_do_not_make_way_for_each_other() -> None:
    """Each would wait for the other's slot: they took turns a microsecond at a time,
    a million looks at the schedule a second, until one interval was over."""
    s, jobs = _bus(1.0, 1.0, 1.0, cost=0.5, retries=0, offline_after=3)
    s.start(T0)
    now, looks, polls = T0, 0, 0
    while now < T0 + 30:
        looks += 1
        job = s.next(now)
        if isinstance(job, float):
            now = job
            continue
        polls += 1
        _poll(s, job, [SILENCE], now, took=0.5)
        now += 0.5
    assert looks <= 2 * polls + 1  # each poll: found due, then at most one look to wait
    assert all(j.device.state is OFFLINE for j in jobs)
