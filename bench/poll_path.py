"""One Modbus TCP poll through the agent's code, in one process: ``python -m bench.poll_path``.

What ``bench.acquisition`` measures with real terminals, loopback TCP and an
event loop, without their noise: 500 buses of the fleet's profile (30 input
registers, u16/i16 at 0.1 with ranges), each a :class:`~agent.fieldbus.tcp.TcpLink`
on one end of a socket pair, polled by a :class:`~agent.fieldbus.engine.TcpEngine`
and their :class:`~agent.fieldbus.poller.BusPoller`. A round starts every bus's
poll (the engine's burst: schedule, request, ``send``), then this process
answers every request from the other ends (not measured), then the reactor
reads the replies (``recv``, the transaction check, the decode, the readings
into the engine's columns, the poll's end, the next due time). The CPU time of
this thread (``time.thread_time``: user and system) in those two parts, per
poll, is the figure: the fastest of ``--rounds`` rounds, and the quartile and
median, since a shared machine slows some rounds down by half. Socket pairs
(AF_UNIX) cost the kernel less than loopback TCP; the Python path is the
same.

Used to judge changes of decisions 52 and 53 (bench/README.md); compare two
trees by running it in each, alternately.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import socket
import statistics
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bus import machine
from bench.tcp_fleet import POINTS, profile_toml
from drivers.collector import STEADY_THRESHOLDS

# the reply of every terminal: unit 1, function 4, 60 bytes, 30 registers in range
_BODY = bytes([1, 4, 2 * POINTS]) + struct.pack(f">{POINTS}H", *range(100, 100 + POINTS))
_HEAD = struct.Struct(">HH")  # protocol id 0, the length of unit id and PDU


async def measure(buses: int, rounds: int) -> dict[str, Any]:
    from agent.clock import SystemClock
    from agent.fieldbus import tcp
    from agent.fieldbus.engine import TcpEngine
    from agent.fieldbus.poller import BusPoller, PolledDevice
    from drivers.profiles import load_profile
    from protocols.reading import Columns

    with tempfile.TemporaryDirectory(prefix="vitals-poll-path-") as tmp:
        path = Path(tmp) / "fleet30.toml"
        path.write_text(profile_toml())
        profile = load_profile(path)
    loop = asyncio.get_running_loop()
    clock = SystemClock()
    readings = 0

    async def sink(out: Columns) -> None:
        nonlocal readings
        readings += len(out)

    reactor = tcp._reactor(loop)
    pollers, peers = [], []
    for i in range(buses):
        points = [(i * POINTS + k, p) for k, p in enumerate(profile.points)]
        dev = PolledDevice(name=f"t{i}", slave=1, interval_s=1.0, max_registers=125,
                           max_gap=0, points=points)  # fmt: skip
        link = tcp.TcpLink("127.0.0.1", 502, timeout_s=1.0, inter_frame_s=0.0)
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        # connected as TcpLink._open connects, on a socket pair instead of TCP
        link._sock, link._loop, link._rx_len, link._used = ours, loop, 0, False
        link._tx.open()
        link._reactor = reactor
        reactor.add(link, ours.fileno())
        peers.append(theirs)
        pollers.append(BusPoller(f"tcp-{i}", link, [dev], sink, clock))
    engine = TcpEngine(pollers, sink, clock)
    engine._running = True
    start = clock.monotonic()
    for p in pollers:
        p.schedule.start(start - 10)
    gc.collect()
    gc.freeze()  # as the agent does once started (drivers.collector.steady_gc)
    gc.set_threshold(*STEADY_THRESHOLDS)
    per_poll: list[float] = []
    sends: list[float] = []
    try:
        for r in range(rounds):
            now = clock.monotonic() + 10 + r  # every bus due
            t0 = time.thread_time()
            tcp.drain_input()
            for i, p in enumerate(pollers):  # the engine's burst: every bus is due
                engine._next(i, p, now)
            t_send = time.thread_time() - t0
            for peer in peers:  # the terminals answer: not measured
                req = peer.recv(64)
                peer.send(req[:2] + _HEAD.pack(0, len(_BODY)) + _BODY)
            t0 = time.thread_time()
            reactor.read_ready()
            out, engine._out = engine._out, Columns()
            await sink(out)
            t_reply = time.thread_time() - t0
            per_poll.append(1e6 * (t_send + t_reply) / buses)
            sends.append(1e6 * t_send / buses)
            engine._heap.clear()  # the next round makes every bus due again
    finally:
        gc.unfreeze()
        for p in pollers:
            p.link.close()
        for peer in peers:
            peer.close()
    if readings != rounds * buses * POINTS:
        raise SystemExit(f"bench.poll_path: {readings} readings, not {rounds * buses * POINTS}")
    ordered = sorted(per_poll)
    return {
        "bench": "poll_path",
        "buses": buses,
        "rounds": rounds,
        "points": POINTS,
        "us_per_poll_min": round(ordered[0], 2),
        "us_per_poll_p25": round(ordered[len(ordered) // 4], 2),
        "us_per_poll_median": round(statistics.median(ordered), 2),
        "us_send_median": round(statistics.median(sends), 2),
        "readings": readings,
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.poll_path", description=__doc__)
    ap.add_argument("--buses", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args(argv)
    r = asyncio.run(measure(args.buses, args.rounds))
    m = r["machine"]
    print(f"machine: {m['nproc']} cores, {m['cpu']}, Python {m['python']}")
    print(f"{r['buses']} buses x {r['points']} registers, {r['rounds']} rounds, socket pairs\n")
    print(f"{'CPU of this thread per poll, µs':36} {'fastest':>8} {'p25':>8} {'median':>8}")
    print(
        f"{'  burst and replies':36} {r['us_per_poll_min']:8.2f} {r['us_per_poll_p25']:8.2f}"
        f" {r['us_per_poll_median']:8.2f}"
    )
    print(f"{'  of it the burst (median)':36} {'':8} {'':8} {r['us_send_median']:8.2f}")
    print(f"readings decoded: {r['readings']} (every one)")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
