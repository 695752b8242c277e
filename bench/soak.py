"""The fleet load for minutes on end: ``python -m bench.soak [--minutes 10]``.

The processes and the load of ``bench.tcp_fleet`` (500 Modbus TCP terminals
x 30 points at 1 Hz through the whole agent, Mosquitto and the reference hub),
held for ``--minutes`` after ``--warmup`` seconds, with the agent's CPU
seconds and VmRSS read every ``--sample`` seconds. What a gateway left alone
for weeks needs, in three checks:

* **memory**: VmRSS at the end of the run is at most 1 MB over VmRSS at the
  end of the warm-up (a leak of 100 bytes a poll would be 3 MB in 10 minutes);
* **CPU**: flat, the median CPU % of the second half of the samples at most
  half a point of a core over the first half's (work that piles up, a heap or
  a dict that grows, shows as CPU that climbs);
* **nothing lost**: every reading served arrives at the hub, verified, no
  missing batch range, no rejection (as ``bench.tcp_fleet``).

A table per sample for people and one JSON line at the end for machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from typing import Any

from bench.bus import machine
from bench.tcp_fleet import POINTS, delivered, orchestrate

RSS_GROWTH_MB = 1.0
CPU_DRIFT_PCT = 0.5


def judge(r: dict[str, Any]) -> dict[str, Any]:
    """Per-sample CPU % and RSS, and the three checks, from a run with samples."""
    rows = []
    for (t0, c0, _), (t1, c1, kb) in zip(r["samples"], r["samples"][1:], strict=False):
        rows.append(
            {"t_s": t1, "cpu_pct": round(100 * (c1 - c0) / (t1 - t0), 2), "rss_mb": kb / 1024}
        )
    cpu = [x["cpu_pct"] for x in rows]
    half = len(cpu) // 2
    first, second = statistics.median(cpu[:half] or cpu), statistics.median(cpu[half:])
    rss0, rss1 = r["samples"][0][2] / 1024, r["samples"][-1][2] / 1024
    return {
        "rows": rows,
        "cpu_first_half_pct": first,
        "cpu_second_half_pct": second,
        "rss_start_mb": round(rss0, 2),
        "rss_end_mb": round(rss1, 2),
        "rss_growth_mb": round(rss1 - rss0, 2),
        "pass": {
            "rss": rss1 - rss0 <= RSS_GROWTH_MB,
            "cpu_flat": second - first <= CPU_DRIFT_PCT,
            "delivered": delivered(r) and r["agent_exit"] == 0,
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="measured minutes (default 10)")
    ap.add_argument(
        "--warmup", type=float, default=60.0, help="seconds before the first sample (default 60)"
    )
    ap.add_argument("--sample", type=float, default=60.0, help="seconds between samples")
    ap.add_argument("--terminals", type=int, default=500)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    sample = min(args.sample, args.minutes * 60 / 2)  # at least two samples
    fleet = argparse.Namespace(
        duration=args.minutes * 60,
        warmup=args.warmup,
        terminals=args.terminals,
        batch_readings=None,
        profile_agent=None,
        no_receipts=False,  # batches leave the spool on the hub's receipt, as in the field
        rss_trace=False,
        keep=args.keep,
    )
    m = machine()
    r = asyncio.run(orchestrate(fleet, sample_s=sample))
    j = judge(r)
    print(f"machine: {m['nproc']} cores, {m['cpu']}, Python {m['python']}")
    print(
        f"{r['terminals']} terminals x {POINTS} points at 1 Hz: {r['duration_s']:g} s after "
        f"{args.warmup:g} s of warm-up\n"
    )
    print(f"{'at s':>7} {'agent CPU %':>12} {'VmRSS MB':>9}")
    print(f"{0:>7} {'':>12} {j['rss_start_mb']:>9.2f}")
    for row in j["rows"]:
        print(f"{row['t_s']:>7g} {row['cpu_pct']:>12.2f} {row['rss_mb']:>9.2f}")
    ok = j["pass"]
    checks = [
        (
            "RSS growth after warm-up, MB",
            f"{j['rss_growth_mb']:+.2f}",
            f"<= {RSS_GROWTH_MB:g}",
            ok["rss"],
        ),
        (
            "CPU %, median 1st half -> 2nd half",
            f"{j['cpu_first_half_pct']:.2f} -> {j['cpu_second_half_pct']:.2f}",
            f"+{CPU_DRIFT_PCT:g}",
            ok["cpu_flat"],
        ),
        (
            "readings verified at the hub",
            f"{r['readings_at_hub']} of {r['readings_expected']}",
            "all*",
            ok["delivered"],
        ),
        (
            "missing batch ranges / rejected",
            f"{r['missing_batch_ranges']} / {r['rejected'] or 0}",
            "0 / 0",
            ok["delivered"],
        ),
        ("agent CPU % over the whole run", f"{r['agent_cpu_pct_one_core']}", "", None),
        ("agent peak RSS (VmHWM), MB", f"{r['agent_peak_rss_mb']}", "", None),
    ]
    print()
    for name, value, target, good in checks:
        mark = "" if good is None else ("PASS" if good else "FAIL")
        print(f"{name:<36} {value:>22} {target:>8} {mark}")
    print("* all but the polls in flight at SIGTERM, at most one per bus")
    del r["samples"]
    print(json.dumps({"bench": "soak", "machine": m, "minutes": args.minutes, **r, **j}))
    return 0 if all(ok.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
