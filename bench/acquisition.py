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
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bus import machine
from bench.tcp_fleet import POINTS, profile_toml


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    from agent.bus import BusPoller, PolledDevice
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
            tasks = [tg.create_task(p.run()) for p in pollers]
            await asyncio.sleep(args.warmup)
            t0, c0, r0 = time.monotonic(), sum(os.times()[:2]), readings
            await asyncio.sleep(args.duration)
            t1, c1, r1 = time.monotonic(), sum(os.times()[:2]), readings
            for t in tasks:
                t.cancel()
    finally:
        emu.terminate()
        emu.wait()
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
        "cpu_us_per_poll": round(1e6 * (c1 - c0) / polls, 1) if polls else None,
        "devices_not_online": offline,
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.acquisition", description=__doc__)
    ap.add_argument("--terminals", type=int, default=500)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    args = ap.parse_args(argv)
    r = asyncio.run(measure(args))
    print(f"{'figure':<34} {'value':>10}")
    for key in ("terminals", "readings_per_s", "polls_per_s", "cpu_pct", "cpu_us_per_poll"):
        print(f"{key:<34} {r[key]!s:>10}")
    print(f"{'devices not online at the end':<34} {r['devices_not_online']:>10}")
    print(json.dumps(r))
    return 0 if r["devices_not_online"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
