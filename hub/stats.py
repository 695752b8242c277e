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

from hub.store import REFUSED, is_url, open_store
from protocols.gap import NOT_LOST

__all__ = ["hub_stats", "sqlite_stats", "summarize"]
# "missing" below counts every seq up to the last one known to exist: the highest
# stored, named by a gap notice, or said sealed by the gateway's heartbeat (the tail)


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
    tables = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    has_gaps = "gaps" in tables
    return summarize(
        counters=db.execute("SELECT name, value FROM counters"),
        batches=db.execute("SELECT gw, epoch, seq, n FROM batches"),
        gaps=db.execute("SELECT gw, epoch, first, last, readings, reason FROM gaps")
        if has_gaps
        else [],
        enrolled=[gw for (gw,) in db.execute("SELECT DISTINCT gw FROM gateways WHERE revoked = 0")],
        tails=db.execute("SELECT gw, epoch, sealed FROM tails") if "tails" in tables else [],
    )


def summarize(
    *,
    counters: Iterable[tuple[str, int]],
    batches: Iterable[tuple[str, int, int, int]],
    gaps: Iterable[tuple[str, int, int, int, int, str]],
    enrolled: Iterable[str],
    tails: Iterable[tuple[str, int, int]] = (),
) -> dict[str, Any]:
    """The stats from rows: counters ("<worker>/<name>", value), batches (gw, epoch,
    seq, n), gaps (gw, epoch, first, last, readings, reason), unrevoked gateways, tails
    (gw, epoch, the last seq the gateway's heartbeat said it sealed)."""
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
    sealed = {(gw, epoch): int(last) for gw, epoch, last in tails}
    gateways: dict[str, Any] = {}
    # enrolled but silent (a gateway provisioned that never delivered) is shown too, at 0
    for gw in sorted(set(enrolled)):
        gateways[gw] = _no_batches()
    for gw, epoch in sorted({*per, *dropped, *sealed}):
        seqs = per.get((gw, epoch), [])
        drops = sorted(dropped.get((gw, epoch), []))
        g = gateways.setdefault(gw, _no_batches())
        g["readings"] = readings[gw]
        missing = _holes(seqs, [(f, last) for f, last, _, _ in drops], sealed.get((gw, epoch), -1))
        _add_epoch(g, epoch, len(seqs), max([-1, *seqs], default=-1), missing, drops)
    return {
        "batches": totals.get("batches", 0),
        "readings": totals.get("readings", 0),
        "duplicates": totals.get("duplicates", 0),
        "duplicate_readings": totals.get("duplicate_readings", 0),
        "gap_notices": totals.get("gap_notices", 0),
        "receipts_sent": totals.get("receipts_sent", 0),
        "resend_asks": totals.get("resend_asks", 0),
        "heartbeats": totals.get("heartbeats", 0),
        "rejected": {k.split(".", 1)[1]: v for k, v in totals.items() if k.startswith("rejected.")},
        # enrollment requests by the desk's answer: "enrolled" and every refusal
        "enrollments": {
            k.split(".", 1)[1]: v for k, v in totals.items() if k.startswith("enroll.")
        },
        "gateways": gateways,
    }


def _add_epoch(
    g: dict[str, Any],
    epoch: int,
    count: int,
    top: int,
    missing: list[list[int]],
    drops: list[tuple[int, int, int, str]],
) -> None:
    """Add one epoch's numbers to a gateway's: ``top`` is its highest seq stored;
    batches re-sealed smaller (gap reason "split") are neither missing nor dropped,
    nor are the batches the hub refused for good (reason "refused:<why>": settled,
    counted refused)."""
    refused = [d for d in drops if d[3].startswith(REFUSED)]
    said = [d for d in drops if not d[3].startswith(REFUSED)]
    lost = [(f, last) for f, last, _, r in said if r not in NOT_LOST]
    g["batches"] += count
    g["missing_batches"] += sum(b - a + 1 for a, b in missing)
    g["dropped_batches"] += sum(last - f + 1 for f, last in lost)
    g["split_batches"] += sum(last - f + 1 for f, last, _, r in said if r in NOT_LOST)
    g["refused_batches"] += sum(last - f + 1 for f, last, _, _ in refused)
    g["epochs"][str(epoch)] = {
        "batches": count,
        "last_seq": max([top, *(m[1] for m in missing), *(last for _, last, _, _ in drops)]),
        "missing": missing,
        "dropped_by_gateway": [
            {"first": f, "last": last, "readings": n, "reason": r} for f, last, n, r in said
        ],
        "refused_by_hub": [
            {"first": f, "last": last, "readings": n, "reason": r.removeprefix(REFUSED)}
            for f, last, n, r in refused
        ],
    }


def _holes(
    seqs: Iterable[int], covered: list[tuple[int, int]], sealed: int = -1
) -> list[list[int]]:
    """[first, last] ranges up to the highest seq known (stored, covered, or the last one
    the gateway said it sealed) that are neither delivered nor covered."""
    marks = sorted(set(seqs))
    top = max([*marks[-1:], *(last for _, last in covered), sealed], default=-1)
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
    return {
        "batches": 0,
        "readings": 0,
        "missing_batches": 0,
        "dropped_batches": 0,
        "split_batches": 0,  # re-sealed smaller by the gateway: their readings are stored
        "refused_batches": 0,  # authentic, refused by the hub for good (settled, not missing)
        "epochs": {},
    }
