"""The acquisition alone: ``python -m bench.acquisition``.

500 emulated Modbus TCP terminals (30 input registers each, the fleet
bench's profile) in a child process; in this process the agent's pollers
(``agent.fieldbus.poller``, one TCP bus per terminal, 1 Hz) with a sink that only counts
the readings. After ``--warmup`` seconds this process's ``utime + stime`` is
sampled, again ``--duration`` seconds later: the CPU that acquisition costs
(timers, requests, replies, decoding, scheduling), without batching, signing,
spooling or publishing. This is the piece ``bench.tcp_fleet`` measures with
everything else, isolated so that a change to it can be judged outside the
fleet bench's noise.

Drivers (``--driver``, repeatable): ``TcpEngine`` (the agent's: one task for
every TCP bus), ``task per bus`` (``BusPoller.run``, what serial buses use)
and ``bare``, the floor: pymodbus's async client, a task per terminal, each
reply turned into 30 plain tuples, nothing checked. The drivers run one after
the other against the same emulators, ``--rounds`` times, and the medians are
compared: on a shared machine one driver's run against another's from another
minute says little.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.bus import machine
from bench.tcp_fleet import POINTS, profile_toml
from drivers.collector import STEADY_THRESHOLDS

DRIVERS = ("TcpEngine", "task per bus", "bare")


def _wakeups() -> int:
    """Times this process went to sleep and was woken (voluntary context switches)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    return 0


async def _bare(ports: list[int], interval: float, count: Callable[[int], None]) -> None:
    """The floor: pymodbus's async client, a task per terminal, nothing else.

    Each reply's 30 registers become 30 ``(point id, ms, value x 0.1)`` tuples,
    what the sink of the agent's pollers gets (without ranges or quality).
    """
    from pymodbus.client import AsyncModbusTcpClient

    loop = asyncio.get_running_loop()
    clients = [AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1.0) for port in ports]
    for c in clients:
        await c.connect()

    async def poll(i: int, client: AsyncModbusTcpClient) -> None:
        due = float(math.ceil(loop.time()))
        base = i * POINTS
        while True:
            await asyncio.sleep(due - loop.time())
            due += interval
            rr = await client.read_input_registers(0, count=POINTS, device_id=1)
            ts = time.time_ns() // 1_000_000
            out = [(base + k, ts, r * 0.1) for k, r in enumerate(rr.registers)]
            count(len(out))

    try:
        async with asyncio.TaskGroup() as tg:
            for i, c in enumerate(clients):
                tg.create_task(poll(i, c))
    finally:
        for c in clients:
            c.close()


async def _round(
    driver: str, ports: list[int], profile: Any, args: argparse.Namespace
) -> dict[str, Any]:
    from agent.clock import SystemClock
    from agent.fieldbus.engine import TcpEngine
    from agent.fieldbus.links import ModbusLink
    from agent.fieldbus.poller import BusPoller, PolledDevice
    from protocols.reading import Columns

    readings = 0

    def count(n: int) -> None:
        nonlocal readings
        readings += n

    async def sink(out: Columns) -> None:
        count(len(out))

    clock = SystemClock()
    pollers = []
    pid = 0
    for i, port in enumerate(ports):
        points = []
        for p in profile.points:
            points.append((pid, p))
            pid += 1
        dev = PolledDevice(
            name=f"t{i}",
            slave=1,
            interval_s=args.interval,
            max_registers=profile.max_registers,
            max_gap=profile.max_gap,
            points=points,
        )
        link = ModbusLink.tcp("127.0.0.1", port, timeout_s=1.0)
        pollers.append(BusPoller(f"tcp-{i}", link, [dev], sink, clock))
    gc.collect()
    async with asyncio.TaskGroup() as tg:
        if driver == "bare":
            tasks = [tg.create_task(_bare(ports, args.interval, count))]
        elif driver == "task per bus":
            tasks = [tg.create_task(p.run()) for p in pollers]
        else:
            tasks = [tg.create_task(TcpEngine(pollers, sink, clock).run())]
        await asyncio.sleep(args.warmup)
        t0, (u0, s0), r0, w0 = time.monotonic(), os.times()[:2], readings, _wakeups()
        await asyncio.sleep(args.duration)
        t1, (u1, s1), r1, w1 = time.monotonic(), os.times()[:2], readings, _wakeups()
        c0, c1 = u0 + s0, u1 + s1
        for t in tasks:
            t.cancel()
    wall = t1 - t0
    polls = (r1 - r0) / POINTS
    offline = 0
    if driver != "bare":
        offline = sum(1 for p in pollers for d in p.devices if d.state != "online")
    expected = len(ports) * wall / args.interval
    return {
        "driver": driver,
        "duration_s": round(wall, 1),
        "readings_per_s": round((r1 - r0) / wall),
        "polls_per_s": round(polls / wall, 1),
        "cpu_pct": round(100 * (c1 - c0) / wall, 2),
        "user_pct": round(100 * (u1 - u0) / wall, 2),
        "system_pct": round(100 * (s1 - s0) / wall, 2),
        "cpu_us_per_poll": round(1e6 * (c1 - c0) / polls, 1) if polls else None,
        "wakeups_per_s": round((w1 - w0) / wall),
        # a driver that falls behind polls less and so costs less: it must keep up
        "kept_up": polls >= 0.98 * expected,
        "devices_not_online": offline,
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    from drivers.profiles import load_profile

    tmp = Path(tempfile.mkdtemp(prefix="vitals-acq-"))
    profile_path = tmp / "fleet30.toml"
    profile_path.write_text(profile_toml())
    profile = load_profile(profile_path)
    emu = subprocess.Popen(  # noqa: ASYNC220 (once, before anything is measured)
        [sys.executable, "-m", "bench.tcp_fleet", "--role", "emulators",
         "--count", str(args.terminals), "--profile", str(profile_path)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert emu.stdout is not None
    ports = json.loads(emu.stdout.readline())["ports"]
    # as the agent does once started (agent.service): the start-up objects frozen
    gc.collect()
    gc.freeze()
    gc.set_threshold(*STEADY_THRESHOLDS)
    rounds = []
    try:
        for _ in range(args.rounds):
            for driver in args.drivers:
                rounds.append(await _round(driver, ports, profile, args))
                print(json.dumps(rounds[-1]), file=sys.stderr)
    finally:
        emu.terminate()
        emu.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    medians = {}
    for driver in args.drivers:
        mine = [r for r in rounds if r["driver"] == driver]
        medians[driver] = {
            key: round(statistics.median(r[key] for r in mine), 2)
            for key in ("cpu_pct", "user_pct", "system_pct", "cpu_us_per_poll", "wakeups_per_s")
        }
        medians[driver]["cpu_pct_rounds"] = [r["cpu_pct"] for r in mine]
    return {
        "bench": "acquisition",
        "terminals": len(ports),
        "points": POINTS,
        "interval_s": args.interval,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "medians": medians,
        "all_kept_up": all(r["kept_up"] for r in rounds),
        "devices_not_online": max(r["devices_not_online"] for r in rounds),
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.acquisition", description=__doc__)
    ap.add_argument("--terminals", type=int, default=500)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=20.0, help="measured seconds of a round")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds before a round's window")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every driver, alternating")
    ap.add_argument(
        "--driver",
        dest="drivers",
        action="append",
        choices=DRIVERS,
        help="what polls (repeatable; default: the agent's TcpEngine and the bare loop)",
    )
    args = ap.parse_args(argv)
    args.drivers = args.drivers or ["TcpEngine", "bare"]
    r = asyncio.run(measure(args))
    m = r["medians"]
    print(
        f"{r['terminals']} terminals x {r['points']} registers at {r['interval_s']:g} s; "
        f"{r['rounds']} rounds of {r['duration_s']:g} s, drivers alternating; medians\n"
    )
    print(f"{'figure':<20}" + "".join(f"{d:>15}" for d in args.drivers))
    for key in ("cpu_pct", "user_pct", "system_pct", "cpu_us_per_poll", "wakeups_per_s"):
        print(f"{key:<20}" + "".join(f"{m[d][key]!s:>15}" for d in args.drivers))
    print(
        f"{'cpu_pct each round':<20}"
        + "".join(f"{' '.join(map(str, m[d]['cpu_pct_rounds'])):>15}" for d in args.drivers)
    )
    print(f"every round kept up (>= 98 % of the polls due): {r['all_kept_up']}")
    print(f"devices not online at the end of a round: {r['devices_not_online']}")
    print(json.dumps(r))
    return 0 if r["devices_not_online"] == 0 and r["all_kept_up"] else 1


if __name__ == "__main__":
    sys.exit(main())
