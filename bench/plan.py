"""Requests per poll of every shipped profile, planned vs naive: ``python -m bench.plan``.

For each profile the points are grouped by poll interval as the scheduler
does (``agent.fieldbus.poller``), each group planned with the profile's limits
(``protocols.modbus.plan``: ``max_registers``, ``max_gap``). Two figures:

* **per full round**: every point read once (all interval groups), planned
  requests against one request per point (the naive reader);
* **per hour**: requests an hour at each group's interval, planned against
  naive, which is what the bus actually carries.

Also the registers read through holes (the price of merging across gaps).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from bench.bus import machine
from drivers.profiles import available_profiles, load_profile
from protocols.modbus import plan, register_count


def profile_row(name: str) -> dict[str, object]:
    prof = load_profile(name)
    groups: dict[float, list[object]] = {}
    for p in prof.points:
        groups.setdefault(p.interval_s or prof.interval_s, []).append(p.spec)
    planned = naive = per_hour = naive_per_hour = read_regs = used_regs = 0
    for interval, specs in groups.items():
        reqs = plan(
            specs, max_registers=prof.max_registers, max_bits=prof.max_bits, max_gap=prof.max_gap
        )  # type: ignore[arg-type]
        planned += len(reqs)
        naive += len(specs)
        per_hour += round(len(reqs) * 3600 / interval)
        naive_per_hour += round(len(specs) * 3600 / interval)
        read_regs += sum(r.count for r in reqs)
        used = set()
        for r in reqs:
            for s in r.points:
                used.update(range(s.address, s.address + register_count(s)))
        used_regs += len(used)
    return {
        "profile": name,
        "points": len(prof.points),
        "intervals": len(groups),
        "max_registers": prof.max_registers,
        "max_gap": prof.max_gap,
        "naive_requests": naive,
        "planned_requests": planned,
        "ratio": round(planned / naive, 3),
        "naive_per_hour": naive_per_hour,
        "planned_per_hour": per_hour,
        "hole_registers": read_regs - used_regs,
    }


def main(argv: Sequence[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m bench.plan", description=__doc__.split("\n")[0]
    ).parse_args(argv)
    # serial-sensor profiles stream frames: nothing to plan
    rows = [profile_row(n) for n in available_profiles() if not load_profile(n).is_sensor]
    print(
        f"{'profile':<22} {'points':>6} {'groups':>6} {'naive':>6} {'planned':>7} {'ratio':>6} {'naive/h':>8} {'planned/h':>9} {'holes':>6}"
    )
    for r in rows:
        print(
            f"{r['profile']:<22} {r['points']:>6} {r['intervals']:>6} {r['naive_requests']:>6} "
            f"{r['planned_requests']:>7} {r['ratio']:>6} {r['naive_per_hour']:>8} {r['planned_per_hour']:>9} {r['hole_registers']:>6}"
        )
    tn = sum(int(r["naive_requests"]) for r in rows)  # type: ignore[call-overload]
    tp = sum(int(r["planned_requests"]) for r in rows)  # type: ignore[call-overload]
    hn = sum(int(r["naive_per_hour"]) for r in rows)  # type: ignore[call-overload]
    hp = sum(int(r["planned_per_hour"]) for r in rows)  # type: ignore[call-overload]
    print(f"{'all':<22} {'':>6} {'':>6} {tn:>6} {tp:>7} {tp / tn:>6.3f} {hn:>8} {hp:>9}")
    print(json.dumps({"bench": "plan", "machine": machine(), "profiles": rows,
                      "total": {"naive": tn, "planned": tp, "naive_per_hour": hn, "planned_per_hour": hp}}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
