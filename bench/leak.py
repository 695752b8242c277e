"""Where the acquisition's memory goes over minutes: ``python -m bench.leak``.

``bench.acquisition``'s load (500 emulated Modbus TCP terminals x 30 input
registers at 1 Hz, the emulators in a child process) polled by the agent's
``TcpEngine`` in this process for ``--minutes``, with a sink that counts.
Every ``--sample`` seconds one line: VmRSS, the ``[heap]`` mapping's RSS (glibc
malloc's brk heap), the anonymous RSS outside it (pymalloc's arenas, mmapped
blocks), ``sys.getallocatedblocks()`` and, with ``--tracemalloc``, the bytes
tracemalloc traces. The growth after ``--warmup`` seconds is the answer. The
variants halve the search for a leak (bench/README.md, "soak"):

* ``--gc agent|default``: the agent's ``gc.freeze()`` and thresholds
  (decisions 20), or Python's;
* ``--arenas N``: glibc's ``M_ARENA_MAX`` (the agent's runner sets 1); 0
  leaves glibc's default;
* ``--trim``: ``malloc_trim(0)`` before every sample.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from bench.tcp_fleet import POINTS, profile_toml
from drivers.collector import STEADY_THRESHOLDS


def memory() -> dict[str, float]:
    """VmRSS, the brk heap's RSS and the other anonymous RSS of this process, in MB."""
    heap = anon = 0
    name = ""
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=6)
            if not line[0].isupper() or "-" in head[0]:  # a mapping's first line
                name = head[5].strip() if len(head) > 5 else ""
            elif head[0] == "Rss:":
                if name == "[heap]":
                    heap += int(head[1])
                elif not name:
                    anon += int(head[1])
    with open("/proc/self/status") as f:
        rss = next(int(x.split()[1]) for x in f if x.startswith("VmRSS:"))
    return {"rss": rss / 1024, "heap": heap / 1024, "anon": anon / 1024}


async def soak(args: argparse.Namespace) -> list[dict[str, Any]]:
    from agent.clock import SystemClock
    from agent.fieldbus.engine import TcpEngine
    from agent.fieldbus.links import ModbusLink
    from agent.fieldbus.poller import BusPoller, PolledDevice
    from drivers.profiles import load_profile
    from protocols.reading import Reading

    tmp = Path(tempfile.mkdtemp(prefix="vitals-leak-"))
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
            interval_s=1.0,
            max_registers=profile.max_registers,
            max_gap=profile.max_gap,
            points=points,
        )
        link = ModbusLink.tcp("127.0.0.1", port, timeout_s=1.0)
        pollers.append(BusPoller(f"tcp-{i}", link, [dev], sink, clock))
    if args.gc == "agent":  # as agent.service once started
        gc.collect()
        gc.freeze()
        gc.set_threshold(*STEADY_THRESHOLDS)
    libc = ctypes.CDLL(None)
    if args.tracemalloc:
        tracemalloc.start(1)
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    task = asyncio.create_task(TcpEngine(pollers, sink, clock).run())
    try:
        while time.monotonic() - t0 < 60 * args.minutes:
            await asyncio.sleep(args.sample)
            if args.trim:
                libc.malloc_trim(0)
            row: dict[str, Any] = {"t_s": round(time.monotonic() - t0), **memory()}
            row["blocks"] = sys.getallocatedblocks()
            row["readings"] = readings
            if args.tracemalloc:
                row["traced"] = tracemalloc.get_traced_memory()[0] / 2**20
            rows.append(row)
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.items()), flush=True)  # fmt: skip
    finally:
        task.cancel()
        emu.terminate()
        emu.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.leak", description=__doc__)
    ap.add_argument("--terminals", type=int, default=500)
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds before growth counts")
    ap.add_argument("--gc", choices=("agent", "default"), default="agent")
    ap.add_argument("--arenas", type=int, default=1, help="M_ARENA_MAX; 0: glibc's default")
    ap.add_argument("--trim", action="store_true", help="malloc_trim(0) before every sample")
    ap.add_argument("--tracemalloc", action="store_true")
    args = ap.parse_args(argv)
    if args.arenas:
        ctypes.CDLL(None).mallopt(-8, args.arenas)  # M_ARENA_MAX, before any thread
    rows = asyncio.run(soak(args))
    base = next((r for r in rows if r["t_s"] >= args.warmup), rows[0])
    end = rows[-1]
    growth = {k: round(end[k] - base[k], 3) for k in ("rss", "heap", "anon", "blocks")}
    polls = (end["readings"] - base["readings"]) / POINTS
    print(json.dumps({
        "bench": "leak", "args": vars(args), "from_s": base["t_s"], "to_s": end["t_s"],
        "growth_mb": growth, "bytes_per_poll": round(growth["rss"] * 2**20 / polls, 1)
        if polls else None,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
