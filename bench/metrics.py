"""The gateway's metrics endpoint at 500 devices: ``python -m bench.metrics``.

A real :class:`~agent.service.Agent` is set up (spool, pollers, links, not
polling) for ``--devices`` Modbus TCP devices, one bus each, as
``bench.tcp_fleet`` runs them. Each scrape is what ``GET /metrics`` does on the
agent's loop (``Agent.statistics()``, the snapshot, timed apart: what holds
the loop) and then in a worker thread (the metric families, the text). It is timed in process CPU (``time.process_time``), ``--scrapes`` times;
the share of a core is that cost once every ``--interval`` seconds (Prometheus'
usual 15 s). The spool's oldest age (one SQLite query in a worker thread) is
measured apart. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from agent.ops.config import parse_config
from agent.ops.metrics import render, snapshot
from agent.ops.state import create_identity
from agent.ops.status import spool_oldest_age_s
from agent.service import Agent


async def measure(devices: int, scrapes: int, interval_s: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="vitals-bench-metrics-") as tmp:
        base = Path(tmp)
        cfg = parse_config(
            {
                "gateway": {"id": "gw-bench-metrics", "state_dir": str(base / "gw")},
                "buses": [
                    {"name": f"tcp-{i}", "kind": "tcp", "host": "127.0.0.1", "tcp_port": 1502}
                    for i in range(devices)
                ],
                "devices": [
                    {"name": f"dev-{i}", "bus": f"tcp-{i}", "profile": "sound_level_meter"}
                    | {"slave": 1}
                    for i in range(devices)
                ],
                "metrics": {"listen": "127.0.0.1:9108"},
            },
            source="<bench.metrics>",
            base=base,
        )
        agent = Agent(cfg, identity=create_identity(cfg.gateway.state_dir))
        await agent._setup()
        try:
            text = render(snapshot(agent), 0.0)
            series = sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))
            snap, costs = [], []
            for _ in range(scrapes):
                t0 = time.process_time()
                stats = snapshot(agent)
                t1 = time.process_time()
                render(stats, 0.0)
                snap.append(t1 - t0)
                costs.append(time.process_time() - t0)
            db = cfg.gateway.state_dir / "spool.sqlite3"
            t0 = time.process_time()
            for _ in range(scrapes):
                spool_oldest_age_s(db)
            oldest = (time.process_time() - t0) / scrapes
        finally:
            assert agent.spool is not None
            await agent.spool.close()
    per = statistics.median(costs)
    return {
        "bench": "metrics",
        "machine": platform.machine(),
        "python": platform.python_version(),
        "devices": devices,
        "series": series,
        "bytes": len(text),
        "scrape_ms_median": round(per * 1000, 2),
        "scrape_ms_max": round(max(costs) * 1000, 2),
        "on_loop_ms_median": round(statistics.median(snap) * 1000, 2),
        "oldest_age_ms": round(oldest * 1000, 3),
        "interval_s": interval_s,
        "core_percent": round((per + oldest) / interval_s * 100, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=500)
    ap.add_argument("--scrapes", type=int, default=50)
    ap.add_argument("--interval", type=float, default=15.0, help="seconds between scrapes")
    a = ap.parse_args()
    r = asyncio.run(measure(a.devices, a.scrapes, a.interval))
    print(f"metrics bench on {r['machine']} Python {r['python']}")
    print(
        f"{'devices':>8}{'series':>8}{'bytes':>9}{'ms/scrape':>11}{'max ms':>8}"
        f"{'on loop ms':>12}{'% core':>9}"
    )
    print(
        f"{r['devices']:>8}{r['series']:>8}{r['bytes']:>9}{r['scrape_ms_median']:>11}"
        f"{r['scrape_ms_max']:>8}{r['on_loop_ms_median']:>12}{r['core_percent']:>9}"
    )
    print(json.dumps(r))


if __name__ == "__main__":
    main()
