"""The reference hub: verify, deduplicate and store what the gateways send.

:class:`HubCore` is the hub without I/O to the broker: ``handle(topic, data)``
parses a message, looks up the gateway's enrolled key by (gateway, kid),
verifies the signature, drops duplicates by (gateway, epoch, seq) and stores
the readings in SQLite. Every refusal is counted by reason and logged once per
(gateway, reason). :class:`Hub` feeds it from MQTT through a shared
subscription, so several hub workers split the load of one broker.

Storage is SQLite by default; the schema (``readings``, ``batches``,
``gateways``, ``points``) is plain SQL so a deployment can put PostgreSQL
behind the same statements.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain, repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocols import envelope, topics
from protocols.errors import LocalError, ProtocolError, SignatureError
from protocols.event import parse_event
from protocols.gap import parse_gap
from protocols.reading import Reading

if TYPE_CHECKING:
    import aiomqtt

__all__ = ["Hub", "HubCore", "hub_stats", "open_readings", "shard_dir", "shards"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS gateways (
    gw TEXT NOT NULL, kid BLOB NOT NULL, pubkey BLOB NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0, enrolled REAL NOT NULL,
    PRIMARY KEY (gw, kid)
);
CREATE TABLE IF NOT EXISTS batches (
    gw TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
    n INTEGER NOT NULL, t0 INTEGER NOT NULL, t1 INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    -- the worker that claimed the batch: with sharded workers, the shard holding its readings
    worker TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (gw, epoch, seq)
);
CREATE TABLE IF NOT EXISTS points (
    gw TEXT NOT NULL, id INTEGER NOT NULL, device TEXT, name TEXT, unit TEXT,
    domain TEXT, cls TEXT, indicator TEXT, epoch INTEGER NOT NULL,
    PRIMARY KEY (gw, id)
);
CREATE TABLE IF NOT EXISTS gaps (
    gw TEXT NOT NULL, epoch INTEGER NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL,
    readings INTEGER NOT NULL, reason TEXT NOT NULL, received_ms INTEGER NOT NULL,
    PRIMARY KEY (gw, epoch, first, last)
);
CREATE TABLE IF NOT EXISTS events (
    gw TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
    rule TEXT NOT NULL, kind TEXT NOT NULL, state TEXT NOT NULL, device TEXT NOT NULL,
    point TEXT NOT NULL, pid INTEGER NOT NULL, value, ts INTEGER NOT NULL,
    since INTEGER NOT NULL, detail TEXT NOT NULL, received_ms INTEGER NOT NULL,
    PRIMARY KEY (gw, epoch, seq)
);
-- one row per (worker, counter): "<worker>/<name>"; hub_stats sums over workers
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

_READINGS = """
CREATE TABLE IF NOT EXISTS {schema}.readings (
    gw TEXT NOT NULL, point INTEGER NOT NULL, ts INTEGER NOT NULL,
    value, quality INTEGER NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL
)
"""
_INSERT_READINGS = (
    "INSERT INTO {schema}.readings (gw, point, ts, value, quality, epoch, seq)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_BATCH = (
    "INSERT OR IGNORE INTO batches (gw, epoch, seq, n, t0, t1, received_ms, worker)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_WORKER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def shard_dir(db_path: Path) -> Path:
    """Where sharded workers keep their readings: ``<db>.shards/<worker>.sqlite3``."""
    return db_path.with_name(db_path.name + ".shards")


def shards(db_path: Path) -> dict[str, Path]:
    """The reading shards of the hub database ``db_path``, by worker name."""
    d = shard_dir(db_path)
    if not d.is_dir():
        return {}
    return {p.name.removesuffix(".sqlite3"): p for p in sorted(d.glob("*.sqlite3"))}


def open_readings(db_path: Path) -> sqlite3.Connection:
    """A read-only connection to the hub database in which ``readings`` is every stored
    reading: the main file's, and each shard's whose batch claim names that shard.

    A shard row whose claim names another worker (it lost the race for a redelivered
    batch) or no worker at all (it crashed between its two commits) is not a reading.
    Shards are attached, so their number is bounded by SQLite's attach limit (10 by
    default); give workers stable names (``--worker``).
    """
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    parts = ["SELECT gw, point, ts, value, quality, epoch, seq FROM main.readings"]
    for i, (worker, path) in enumerate(shards(db_path).items()):
        con.execute("ATTACH DATABASE ? AS ?", (f"file:{path}?mode=ro", f"s{i}"))
        name = worker.replace("'", "''")
        parts.append(
            f"SELECT r.gw, r.point, r.ts, r.value, r.quality, r.epoch, r.seq FROM s{i}.readings r"
            " WHERE EXISTS (SELECT 1 FROM main.batches b WHERE b.gw = r.gw"
            f" AND b.epoch = r.epoch AND b.seq = r.seq AND b.worker = '{name}')"
        )
    con.execute("CREATE TEMP VIEW readings AS " + " UNION ALL ".join(parts))
    return con


_BatchRow = tuple[str, int, int, int, int, int, int, str]  # gw, epoch, seq, n, t0, t1, ms, worker


def _add_worker_column(db: sqlite3.Connection) -> None:
    """``batches.worker`` on a database made before it existed."""
    if "worker" in [r[1] for r in db.execute("PRAGMA table_info(batches)")]:
        return
    try:
        db.execute("ALTER TABLE batches ADD COLUMN worker TEXT NOT NULL DEFAULT ''")
    except sqlite3.OperationalError as exc:  # another worker added it first
        if "duplicate column" not in str(exc):
            raise


def _rows(
    batches: list[_BatchRow], readings: list[list[Reading]], won: list[bool] | None
) -> Iterator[tuple[object, ...]]:
    """The ``readings`` rows of the batches (those whose ``won`` is true), built in C:
    one zip per batch; quality as a plain int (sqlite3 binds an IntEnum much slower)."""
    return chain.from_iterable(
        zip(repeat(b[0]), p, t, v, map(int, q), repeat(b[1]), repeat(b[2]))
        for i, b in enumerate(batches)
        if won is None or won[i]
        for p, t, v, q in (zip(*readings[i], strict=True),)
    )


@dataclass
class HubCore:
    """Verification, dedup and storage; no network.

    Duplicates are found in memory (a set of seqs per (gateway, epoch), loaded
    from ``batches`` at start), never by a SELECT per message. Stored rows are
    buffered and written in one transaction per ``flush_readings`` readings or
    per :meth:`flush` call (the :class:`Hub` calls it every ``flush_interval_s``
    and whenever the broker has nothing more queued).

    Several workers may share one database (a shared subscription): a batch
    redelivered to another worker is not in that worker's memory, so the
    ``batches`` primary key (gw, epoch, seq) decides: ``INSERT OR IGNORE``, and
    only the worker whose claim went in keeps the readings. SQLite has one
    writer per file, so workers on one file take turns for the whole insert;
    with ``sharded=True`` a worker appends its readings to a file of its own
    (:func:`shard_dir`) and only the small claim goes to the shared file. Read
    readings through :func:`open_readings`.
    """

    db_path: Path
    flush_readings: int = 50_000
    # batches whose last reading is older than this are refused as "too_old": longer
    # than a gateway's spool keeps anything (168 h by default) plus a margin, so only
    # a replay of an old capture can be this old
    window_ms: int | None = 8 * 86_400_000  # None: no window (replaying recorded data)
    # several workers may share one database (shared subscription): each keeps its
    # own counters; the batches table's primary key decides who stores a batch
    worker: str = "w0"
    # readings into <db>.shards/<worker>.sqlite3 (the worker name must then be stable
    # and file-safe); the dedup claim and everything else stay in the shared file
    sharded: bool = False
    counters: Counter[str] = field(default_factory=Counter)
    _logged: set[tuple[str, str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        self.db.execute(_READINGS.format(schema="main"))
        _add_worker_column(self.db)
        self._readings_schema = "main"
        if self.sharded:
            if not _WORKER_NAME.fullmatch(self.worker):
                raise LocalError(
                    f"a sharded worker's name is its file name: {self.worker!r} is not"
                    " 1 to 63 of A-Z a-z 0-9 _ . - (starting with a letter or digit)"
                )
            path = shard_dir(self.db_path) / f"{self.worker}.sqlite3"
            path.parent.mkdir(exist_ok=True)
            self.db.execute("ATTACH DATABASE ? AS shard", (str(path),))
            self.db.execute("PRAGMA shard.journal_mode=WAL")
            self.db.execute("PRAGMA shard.synchronous=NORMAL")
            self.db.execute(_READINGS.format(schema="shard"))
            self._readings_schema = "shard"
        self._keys: dict[tuple[str, bytes], tuple[bytes, bool]] = {}
        for gw, kid, pub, revoked in self.db.execute(
            "SELECT gw, kid, pubkey, revoked FROM gateways"
        ):
            self._keys[(gw, bytes(kid))] = (bytes(pub), bool(revoked))
        mine = f"{self.worker}/"
        for name, value in self.db.execute(
            "SELECT name, value FROM counters WHERE substr(name, 1, ?) = ?", (len(mine), mine)
        ):
            self.counters[name[len(mine) :]] = int(value)
        self._seen: dict[tuple[str, int], set[int]] = {}
        for gw, epoch, seq in self.db.execute("SELECT gw, epoch, seq FROM batches"):
            self._seen.setdefault((gw, epoch), set()).add(seq)
        self.closed = False
        # per buffered batch: its claim row and its readings
        self._batch_rows: list[_BatchRow] = []
        self._batch_readings: list[list[Reading]] = []
        self._buffered_readings = 0

    # -- keys -----------------------------------------------------------------

    def enroll(self, gateway: str, public_raw: bytes) -> bytes:
        """Trust ``public_raw`` (32 bytes) as a key of ``gateway``; returns its kid."""
        kid = envelope.key_id(public_raw)
        self.db.execute(
            "INSERT OR REPLACE INTO gateways (gw, kid, pubkey, revoked, enrolled) VALUES (?, ?, ?, 0, ?)",
            (gateway, kid, public_raw, time.time()),
        )
        self._keys[(gateway, kid)] = (public_raw, False)
        return kid

    def revoke(self, gateway: str, kid: bytes) -> None:
        self.db.execute("UPDATE gateways SET revoked = 1 WHERE gw = ? AND kid = ?", (gateway, kid))
        if (gateway, kid) in self._keys:
            self._keys[(gateway, kid)] = (self._keys[(gateway, kid)][0], True)

    # -- messages -------------------------------------------------------------

    def _refuse(self, reason: str, gateway: str, detail: str) -> str:
        self.counters[f"rejected.{reason}"] += 1
        if (gateway, reason) not in self._logged:
            self._logged.add((gateway, reason))
            log.warning(
                "hub refused a message from %s: %s (%s); further ones only counted",
                gateway or "?",
                reason,
                detail,
            )
        return reason

    def _key(self, gw: str, kid: bytes) -> bytes | str:
        entry = self._keys.get((gw, kid))
        if entry is None:
            return "unknown_key"
        pub, revoked = entry
        return "revoked_key" if revoked else pub

    def handle(self, topic: str, data: bytes) -> str:
        """Process one message; returns "stored", "duplicate", "meta", "gap" or the refusal reason."""
        if topic.endswith("/batch"):
            return self._handle_batch(topic, data)
        if topic.endswith("/meta"):
            return self._handle_meta(topic, data)
        if topic.endswith("/gap"):
            return self._handle_gap(topic, data)
        if topic.endswith("/event"):
            return self._handle_event(topic, data)
        return "ignored"

    def _handle_batch(self, topic: str, data: bytes) -> str:
        topic_gw = topics.gateway_of(topic) or ""
        try:
            batch = envelope.parse(data)
        except ProtocolError as exc:
            return self._refuse("malformed", topic_gw, str(exc))
        h = batch.header
        if h.gw != topic_gw:
            return self._refuse("topic_mismatch", topic_gw, f"header names {h.gw!r}")
        key = self._key(h.gw, h.kid)
        if isinstance(key, str):
            return self._refuse(key, h.gw, f"kid {h.kid.hex()}")
        try:
            batch.verify(key)
        except SignatureError as exc:
            return self._refuse("bad_signature", h.gw, str(exc))
        if self.window_ms is not None and h.t1 < time.time_ns() // 1_000_000 - self.window_ms:
            return self._refuse(
                "too_old", h.gw, f"t1 {h.t1} is behind the {self.window_ms} ms window"
            )
        seen = self._seen.setdefault((h.gw, h.epoch), set())
        if h.seq in seen:
            self.counters["duplicates"] += 1
            self.counters["duplicate_readings"] += h.n
            return "duplicate"
        try:
            readings = batch.readings()
        except ProtocolError as exc:
            return self._refuse("bad_payload", h.gw, str(exc))
        seen.add(h.seq)
        self._batch_rows.append(
            (h.gw, h.epoch, h.seq, h.n, h.t0, h.t1, time.time_ns() // 1_000_000, self.worker)
        )
        self._batch_readings.append(readings)
        self._buffered_readings += len(readings)
        self.counters["batches"] += 1
        self.counters["readings"] += len(readings)
        if self._buffered_readings >= self.flush_readings:
            self.flush()
        return "stored"

    def flush(self) -> None:
        """Write the buffered batches, their readings and the counters.

        Unsharded: one transaction in the shared file. Sharded: the readings first,
        in this worker's shard (no lock on the shared file), then the claims and
        counters in the shared file; a claim another worker made first turns our
        copy of that batch into orphan rows, deleted at once by rowid (a crash
        before that leaves them, and :func:`open_readings` ignores them).
        """
        if self.closed:
            return
        if not self._batch_rows:  # refusals are counted too
            self.db.execute("BEGIN IMMEDIATE")
            self._save_counters()
            self.db.execute("COMMIT")
            return
        batches, self._batch_rows = self._batch_rows, []
        readings, self._batch_readings = self._batch_readings, []
        self._buffered_readings = 0
        self.counters["flushes"] += 1
        if self.sharded:
            self._flush_sharded(batches, readings)
            return
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            won = self._claim(batches)
            db.executemany(_INSERT_READINGS.format(schema="main"), _rows(batches, readings, won))
            self._save_counters()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _flush_sharded(self, batches: list[_BatchRow], readings: list[list[Reading]]) -> None:
        db = self.db
        # 1. the readings, into this worker's own file: in parallel with the other workers
        db.execute("BEGIN")
        try:
            base = db.execute("SELECT coalesce(max(rowid), 0) FROM shard.readings").fetchone()[0]
            db.executemany(_INSERT_READINGS.format(schema="shard"), _rows(batches, readings, None))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        # 2. the claims, in the shared file: small, serialised across workers
        db.execute("BEGIN IMMEDIATE")
        try:
            won = self._claim(batches)
            self._save_counters()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        # 3. the batches another worker had first: our rows of them are orphans. One
        # transaction inserted them in order, so each batch's rows are a rowid range.
        lost: list[tuple[int, int]] = []
        first = int(base) + 1
        for row, ok in zip(batches, won, strict=True):
            if not ok:
                lost.append((first, first + row[3] - 1))
            first += row[3]
        if lost:
            db.execute("BEGIN")
            db.executemany("DELETE FROM shard.readings WHERE rowid BETWEEN ? AND ?", lost)
            db.execute("COMMIT")

    def _claim(self, batches: list[_BatchRow]) -> list[bool]:
        """Insert the batch rows (inside the caller's transaction); for each, whether
        this worker's row went in. A batch another worker stored first is a duplicate."""
        won: list[bool] = []
        for row in batches:
            ok = self.db.execute(_INSERT_BATCH, row).rowcount == 1
            won.append(ok)
            if not ok:
                self.counters["batches"] -= 1
                self.counters["readings"] -= row[3]
                self.counters["duplicates"] += 1
                self.counters["duplicate_readings"] += row[3]
                self.counters["duplicates_across_workers"] += 1
        return won

    def delivered(self, gateway: str) -> set[tuple[int, int]]:
        """Every (epoch, seq) of ``gateway`` verified so far (stored or buffered)."""
        return {(e, s) for (gw, e), seqs in self._seen.items() if gw == gateway for s in seqs}

    @property
    def buffered(self) -> int:
        """Batches verified but not yet written."""
        return len(self._batch_rows)

    def _open(self, topic: str, data: bytes, parse: Any, what: str) -> Any:
        """Parse a signed message, check it names the topic's gateway, look up its
        key and verify it: the parsed message, or the refusal reason (a str).

        One path for every kind but batches (which add dedup and the age window).
        """
        topic_gw = topics.gateway_of(topic) or ""
        try:
            sealed = parse(data)
            if sealed.header.gw != topic_gw:
                return self._refuse("topic_mismatch", topic_gw, what)
            key = self._key(sealed.header.gw, sealed.header.kid)
            if isinstance(key, str):
                return self._refuse(key, topic_gw, what)
            sealed.verify(key)
        except SignatureError as exc:
            return self._refuse("bad_signature", topic_gw, str(exc))
        except ProtocolError as exc:
            return self._refuse(f"malformed_{what}", topic_gw, str(exc))
        return sealed

    def _handle_gap(self, topic: str, data: bytes) -> str:
        notice = self._open(topic, data, parse_gap, "gap")
        if isinstance(notice, str):
            return notice
        topic_gw = notice.header.gw
        try:
            ranges = notice.ranges()
        except ProtocolError as exc:
            return self._refuse("malformed_gap", topic_gw, str(exc))
        self.flush()
        self.db.execute("BEGIN")
        cur = self.db.executemany(
            "INSERT OR IGNORE INTO gaps (gw, epoch, first, last, readings, reason, received_ms)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (topic_gw, g.epoch, g.first, g.last, g.readings, g.reason, time.time_ns() // 10**6)
                for g in ranges
            ],
        )
        self.counters["gap_notices"] += 1
        self.counters["gap_ranges"] += max(0, cur.rowcount)
        self._save_counters()
        self.db.execute("COMMIT")
        return "gap"

    def _handle_event(self, topic: str, data: bytes) -> str:
        sealed = self._open(topic, data, parse_event, "event")
        if isinstance(sealed, str):
            return sealed
        try:
            e = sealed.event()
        except ProtocolError as exc:
            return self._refuse("malformed_event", sealed.header.gw, str(exc))
        h = sealed.header
        cur = self.db.execute(
            "INSERT OR IGNORE INTO events (gw, epoch, seq, rule, kind, state, device, point, pid,"
            " value, ts, since, detail, received_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                h.gw,
                h.epoch,
                h.seq,
                e.rule,
                e.kind,
                e.state,
                e.device,
                e.point,
                e.pid,
                e.value,
                e.ts,
                e.since,
                e.detail,
                time.time_ns() // 1_000_000,
            ),
        )
        if cur.rowcount == 0:
            self.counters["duplicate_events"] += 1
            return "duplicate"
        self.counters["events"] += 1
        log.info("event from %s: %s %s on %s (%s)", h.gw, e.rule, e.state, e.device, e.detail)
        return "event"

    def _handle_meta(self, topic: str, data: bytes) -> str:
        meta = self._open(topic, data, envelope.parse_meta, "meta")
        if isinstance(meta, str):
            return meta
        topic_gw = meta.header.gw
        try:
            points = meta.points()
        except ProtocolError as exc:
            return self._refuse("malformed_meta", topic_gw, str(exc))
        self.db.execute("BEGIN")
        self.db.executemany(
            "INSERT OR REPLACE INTO points (gw, id, device, name, unit, domain, cls, indicator, epoch)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    topic_gw,
                    p.id,
                    p.device,
                    p.name,
                    p.unit,
                    p.domain,
                    p.cls,
                    p.indicator,
                    meta.header.epoch,
                )
                for p in points
            ],
        )
        self.db.execute("COMMIT")
        self.counters["meta"] += 1
        return "meta"

    def _save_counters(self) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)",
            [(f"{self.worker}/{k}", v) for k, v in self.counters.items()],
        )

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.db.close()
            self.closed = True


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


def hub_stats(db_path: Path) -> dict[str, Any]:
    """What the hub has: counters, and per gateway and epoch the delivered batches, the
    ranges the gateway said it dropped (signed gap notices) and the ranges still missing."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        counters: Counter[str] = Counter()
        for name, v in db.execute("SELECT name, value FROM counters"):
            counters[name.split("/", 1)[-1]] += int(v)  # summed over the hub's workers
        per: dict[tuple[str, int], list[int]] = {}
        readings: Counter[str] = Counter()
        for gw, epoch, seq, n in db.execute("SELECT gw, epoch, seq, n FROM batches"):
            per.setdefault((gw, epoch), []).append(seq)
            readings[gw] += n
        dropped: dict[tuple[str, int], list[tuple[int, int, int, str]]] = {}
        has_gaps = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'gaps'"
        ).fetchone()
        if has_gaps:
            for gw, epoch, first, last, n, reason in db.execute(
                "SELECT gw, epoch, first, last, readings, reason FROM gaps"
            ):
                dropped.setdefault((gw, epoch), []).append((first, last, n, reason))
        gateways: dict[str, Any] = {}
        # enrolled but silent (a gateway provisioned that never delivered) is shown too, at 0
        for (gw,) in db.execute("SELECT DISTINCT gw FROM gateways WHERE revoked = 0 ORDER BY gw"):
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
                    {"first": f, "last": last, "readings": n, "reason": r}
                    for f, last, n, r in drops
                ],
            }
        return {
            "batches": counters.get("batches", 0),
            "readings": counters.get("readings", 0),
            "duplicates": counters.get("duplicates", 0),
            "duplicate_readings": counters.get("duplicate_readings", 0),
            "gap_notices": counters.get("gap_notices", 0),
            "rejected": {
                k.split(".", 1)[1]: v for k, v in counters.items() if k.startswith("rejected.")
            },
            "gateways": gateways,
        }
    finally:
        db.close()


def _no_batches() -> dict[str, Any]:
    return {"batches": 0, "readings": 0, "missing_batches": 0, "dropped_batches": 0, "epochs": {}}


class Hub:
    """A hub worker: :class:`HubCore` fed from MQTT through a shared subscription.

    With ``persistent=True`` the hub keeps a broker session (clean session off,
    fixed client id): what gateways publish while the hub is away is queued
    for it by the broker. Without it, a batch the broker acknowledged while no
    hub was subscribed is gone, whatever the gateway does.
    """

    def __init__(
        self,
        core: HubCore,
        *,
        host: str = "127.0.0.1",
        port: int = 1883,
        prefix: str = topics.DEFAULT_PREFIX,
        group: str = "hub",
        shared: bool = True,
        client_id: str = "",
        persistent: bool = False,
        flush_interval_s: float = 0.2,
    ) -> None:
        self.core = core
        self.host, self.port, self.prefix, self.group = host, port, prefix, group
        self.shared = shared  # amqtt (the demo's embedded broker) has no shared subscriptions
        self.client_id = client_id or f"vitals-hub-{id(self):x}"
        self.persistent = persistent
        self.flush_interval_s = flush_interval_s
        self.subscribed = asyncio.Event()
        self.results: Counter[str] = Counter()

    def _filters(self) -> list[str]:
        out = []
        for kind in ("batch", "gap", "event"):
            f = f"{self.prefix}/+/{kind}"
            out.append(topics.shared(self.group, f) if self.shared else f)
        out.append(f"{self.prefix}/+/meta")
        return out

    async def run(self) -> None:
        """Receive until cancelled, reconnecting when the broker goes away."""
        import aiomqtt  # the demo extra: `vitals hub stats` and `token` work without it

        try:
            while True:
                try:
                    async with aiomqtt.Client(
                        self.host,
                        self.port,
                        identifier=self.client_id,
                        clean_session=not self.persistent,
                        max_queued_incoming_messages=100_000,
                    ) as client:
                        for f in self._filters():
                            await client.subscribe(f, qos=1)
                        self.subscribed.set()
                        async with asyncio.TaskGroup() as tg:
                            tg.create_task(self._flusher(), name="hub.flush")
                            tg.create_task(self._receive(client), name="hub.receive")
                            tg.create_task(self._clock(client), name="hub.time")
                except* aiomqtt.MqttError as group:
                    self.subscribed.clear()
                    self.core.flush()
                    log.warning(
                        "hub lost the broker %s:%d: %s; retrying",
                        self.host,
                        self.port,
                        group.exceptions[0],
                    )
                    await asyncio.sleep(0.5)
        finally:
            self.core.flush()

    async def _receive(self, client: aiomqtt.Client) -> None:
        core, results = self.core, self.results
        async for msg in client.messages:
            payload = msg.payload
            if isinstance(payload, (bytes, bytearray)):
                results[core.handle(msg.topic.value, bytes(payload))] += 1
            if core.buffered and not len(client.messages):
                # one turn of the loop lets the client read what the socket holds; if
                # nothing came, the broker has nothing more queued: write now rather
                # than at the flusher's next tick (under load the queue is never empty)
                await asyncio.sleep(0)
                if not len(client.messages):
                    core.flush()

    async def _clock(self, client: aiomqtt.Client, every_s: float = 1.0) -> None:
        """The hub's time, each second, retained: ``vitals diag uplink`` checks a
        gateway's clock against it (MQTT itself carries no time)."""
        topic = f"{self.prefix}/hub/time"
        while True:
            await client.publish(topic, f"{time.time():.3f}".encode(), qos=0, retain=True)
            await asyncio.sleep(every_s)

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            if self.core.buffered:
                self.core.flush()
