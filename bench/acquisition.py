"""The acquisition alone: ``python -m bench.acquisition``.

500 emulated Modbus TCP terminals (30 input registers each, the fleet
bench's profile) in a child process; in this process the agent's pollers
(``agent.bus``, one TCP bus per terminal, 1 Hz) with a sink that only counts
the readings. After ``--warmup`` seconds this process's ``utime + stime`` is
sampled, again ``--duration`` seconds later: the CPU that acquisition costs
(timers, requests, replies, decoding, scheduling), without batching, signing,
spooling or publishing. This is the piece ``bench.tcp_fleet`` measures with
everything else, isolated so that a change to it can be judged outside the
fleet bench's noise.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bus import machine
from bench.tcp_fleet import POINTS, profile_toml


def _wakeups() -> int:
    """Times this process went to sleep and was woken (voluntary context switches)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    return 0


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    from agent.bus import BusPoller, PolledDevice, TcpEngine
    from agent.clock import SystemClock
    from agent.transport import ModbusLink
    from drivers.profiles import load_profile
    from protocols.reading import Reading

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
    readings = 0

    async def sink(out: list[Reading]) -> None:
        nonlocal readings
        readings += len(out)

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
    try:
        async with asyncio.TaskGroup() as tg:
            if args.task_per_bus:
                tasks = [tg.create_task(p.run()) for p in pollers]
            else:
                tasks = [tg.create_task(TcpEngine(pollers, sink, clock).run())]
            # as the agent does once started (agent.service): the start-up objects frozen
            gc.collect()
            gc.freeze()
            gc.set_threshold(20_000, 20, 100)
            await asyncio.sleep(args.warmup)
            t0, (u0, s0), r0, w0 = time.monotonic(), os.times()[:2], readings, _wakeups()
            await asyncio.sleep(args.duration)
            t1, (u1, s1), r1, w1 = time.monotonic(), os.times()[:2], readings, _wakeups()
            c0, c1 = u0 + s0, u1 + s1
            for t in tasks:
                t.cancel()
    finally:
        emu.terminate()
        emu.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    wall = t1 - t0
    polls = (r1 - r0) / POINTS
    offline = sum(1 for p in pollers for d in p.devices if d.state != "online")
    return {
        "bench": "acquisition",
        "terminals": len(ports),
        "points": POINTS,
        "interval_s": args.interval,
        "duration_s": round(wall, 1),
        "readings_per_s": round((r1 - r0) / wall),
        "polls_per_s": round(polls / wall, 1),
        "cpu_pct": round(100 * (c1 - c0) / wall, 2),
        "user_pct": round(100 * (u1 - u0) / wall, 2),
        "system_pct": round(100 * (s1 - s0) / wall, 2),
        "cpu_us_per_poll": round(1e6 * (c1 - c0) / polls, 1) if polls else None,
        "driver": "task per bus" if args.task_per_bus else "TcpEngine",
        "wakeups_per_s": round((w1 - w0) / wall),
        "devices_not_online": offline,
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.acquisition", description=__doc__)
    ap.add_argument("--terminals", type=int, default=500)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument(
        "--task-per-bus",
        action="store_true",
        help="a task per bus (BusPoller.run) instead of the agent's one TcpEngine",
    )
    args = ap.parse_args(argv)
    r = asyncio.run(measure(args))
    print(f"{'figure':<34} {'value':>10}")
    print(f"{'driver':<34} {r['driver']:>10}")
    for key in (
        "terminals",
        "readings_per_s",
        "polls_per_s",
        "cpu_pct",
        "user_pct",
        "system_pct",
        "cpu_us_per_poll",
        "wakeups_per_s",
    ):
        print(f"{key:<34} {r[key]!s:>10}")
    print(f"{'devices not online at the end':<34} {r['devices_not_online']:>10}")
    print(json.dumps(r))
    return 0 if r["devices_not_online"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
