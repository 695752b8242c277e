"""What the hub has: ``vitals hub stats``.

Counters summed over the workers, and per gateway and epoch the delivered
batches, the ranges the gateway said it dropped (signed gap notices) and the
ranges still missing. :func:`summarize` works on plain rows, so every store
(SQLite here, ``hub.pg`` for PostgreSQL) shows the same thing.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hub.store import is_url, open_store

__all__ = ["hub_stats", "sqlite_stats", "summarize"]


def hub_stats(target: str | Path) -> dict[str, Any]:
    """The stats of the hub database ``target`` (an SQLite file, opened read-only, or a
    PostgreSQL URL)."""
    if is_url(target):
        store = open_store(target)
        try:
            return store.stats()
        finally:
            store.close()
    db = sqlite3.connect(f"file:{target}?mode=ro", uri=True)
    try:
        return sqlite_stats(db)
    finally:
        db.close()


def sqlite_stats(db: sqlite3.Connection) -> dict[str, Any]:
    has_gaps = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'gaps'"
    ).fetchone()
    return summarize(
        counters=db.execute("SELECT name, value FROM counters"),
        batches=db.execute("SELECT gw, epoch, seq, n FROM batches"),
        gaps=db.execute("SELECT gw, epoch, first, last, readings, reason FROM gaps")
        if has_gaps
        else [],
        enrolled=[gw for (gw,) in db.execute("SELECT DISTINCT gw FROM gateways WHERE revoked = 0")],
    )


def summarize(
    *,
    counters: Iterable[tuple[str, int]],
    batches: Iterable[tuple[str, int, int, int]],
    gaps: Iterable[tuple[str, int, int, int, int, str]],
    enrolled: Iterable[str],
) -> dict[str, Any]:
    """The stats from rows: counters ("<worker>/<name>", value), batches (gw, epoch,
    seq, n), gaps (gw, epoch, first, last, readings, reason), unrevoked gateways."""
    totals: Counter[str] = Counter()
    for name, v in counters:
        totals[name.split("/", 1)[-1]] += int(v)  # summed over the hub's workers
    per: dict[tuple[str, int], list[int]] = {}
    readings: Counter[str] = Counter()
    for gw, epoch, seq, n in batches:
        per.setdefault((gw, epoch), []).append(seq)
        readings[gw] += n
    dropped: dict[tuple[str, int], list[tuple[int, int, int, str]]] = {}
    for gw, epoch, first, last, n, reason in gaps:
        dropped.setdefault((gw, epoch), []).append((first, last, n, reason))
    gateways: dict[str, Any] = {}
    # enrolled but silent (a gateway provisioned that never delivered) is shown too, at 0
    for gw in sorted(set(enrolled)):
        gateways[gw] = _no_batches()
    for gw, epoch in sorted({*per, *dropped}):
        seqs = per.get((gw, epoch), [])
        drops = sorted(dropped.get((gw, epoch), []))
        g = gateways.setdefault(gw, _no_batches())
        g["readings"] = readings[gw]
        missing = _holes(seqs, [(f, last) for f, last, _, _ in drops])
        g["batches"] += len(seqs)
        g["missing_batches"] += sum(b - a + 1 for a, b in missing)
        g["dropped_batches"] += sum(last - f + 1 for f, last, _, _ in drops)
        g["epochs"][str(epoch)] = {
            "batches": len(seqs),
            "last_seq": max([*seqs, *(last for _, last, _, _ in drops)], default=-1),
            "missing": missing,
            "dropped_by_gateway": [
                {"first": f, "last": last, "readings": n, "reason": r} for f, last, n, r in drops
            ],
        }
    return {
        "batches": totals.get("batches", 0),
        "readings": totals.get("readings", 0),
        "duplicates": totals.get("duplicates", 0),
        "duplicate_readings": totals.get("duplicate_readings", 0),
        "gap_notices": totals.get("gap_notices", 0),
        "rejected": {k.split(".", 1)[1]: v for k, v in totals.items() if k.startswith("rejected.")},
        # enrollment requests by the desk's answer: "enrolled" and every refusal
        "enrollments": {
            k.split(".", 1)[1]: v for k, v in totals.items() if k.startswith("enroll.")
        },
        "gateways": gateways,
    }


def _holes(seqs: Iterable[int], covered: list[tuple[int, int]]) -> list[list[int]]:
    """[first, last] ranges below the highest seq known that are neither delivered nor covered."""
    marks = sorted(set(seqs))
    top = max([*marks[-1:], *(last for _, last in covered)], default=-1)
    cov = sorted(covered)
    out: list[list[int]] = []
    expected = 0
    it = iter([*marks, top + 1])
    for q in it:
        if q > expected:
            out.extend(_minus([expected, q - 1], cov))
        expected = q + 1
    return out


def _minus(span: list[int], cov: list[tuple[int, int]]) -> list[list[int]]:
    """``span`` without the (sorted) ranges ``cov``."""
    lo, hi = span
    out: list[list[int]] = []
    for first, last in cov:
        if last < lo or first > hi:
            continue
        if first > lo:
            out.append([lo, first - 1])
        lo = max(lo, last + 1)
        if lo > hi:
            return out
    if lo <= hi:
        out.append([lo, hi])
    return out


def _no_batches() -> dict[str, Any]:
    return {"batches": 0, "readings": 0, "missing_batches": 0, "dropped_batches": 0, "epochs": {}}
