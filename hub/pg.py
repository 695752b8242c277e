"""The hub's store on PostgreSQL: ``vitals hub --db postgresql://user@host:port/name``.

The same tables as :class:`~hub.store.SqliteStore`, for a city: many workers
write one database at once, many readers query it.

- **Readings** go in with ``COPY ... FROM STDIN (FORMAT BINARY)``, in the same
  transaction as their batches' claims and this worker's counters: one
  transaction per flush, so a batch is stored with all its readings or not
  at all.
- **Dedup across workers**: ``batches`` has the unique key (gw, epoch, seq);
  a flush claims its batches with ``INSERT ... ON CONFLICT DO NOTHING
  RETURNING`` and copies only the readings of the batches it won. The claims
  go in sorted by key, so two workers claiming the same batches wait for each
  other rather than deadlock; the second sees the first's claim once it
  commits.
- **Time partitions**: ``readings`` is partitioned by range of ``ts``
  (milliseconds since the Unix epoch, UTC, as on the wire), one partition per
  UTC day, created ahead (today and the next two days at start, and any day a
  flush needs before its transaction). Dropping a day is ``DROP TABLE
  readings_pYYYYMMDD``. Where the ``timescaledb`` extension is installed,
  ``readings`` is a hypertable with one-day chunks instead. No index on
  ``readings``: a query by time reads only its days' partitions, and every
  index is paid for on each reading stored (a BRIN index on ``ts`` alone
  took the server from 0.5-0.9 to 1.1 µs of CPU a row); add one for the
  queries you run (docs/hub.md).
- **Stats from SQL**: counts, sums and the missing ranges of seqs (window
  functions) are computed by the database; only the small lists of ranges
  come back.
- **Durable, and patient**: the sessions commit with ``synchronous_commit =
  on`` (the worker acknowledges to the broker after the commit); a write that
  loses the server reconnects and runs its transaction again for up to
  ``RETRY_S``.

``value`` is ``double precision``; a text value (rare: a serial sensor's
status word) goes to ``text_value`` with ``value`` NULL.
"""

from __future__ import annotations

import calendar
import contextlib
import functools
import logging
import random
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain, repeat
from typing import Any, TypeVar

from hub.store import UPSERT_TAIL, BatchRow, EventRow, GapRow, PointRow, SqlStore, TailRow
from protocols.errors import LocalError
from protocols.reading import Reading

try:
    import psycopg
    from psycopg import pq, sql
except ImportError:
    raise LocalError(
        "a postgresql:// --db needs psycopg: pip install 'vitals-gateway[postgresql]'"
    ) from None

__all__ = ["PgStore", "partition_name"]

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
AHEAD_DAYS = 2  # partitions made ahead of today's
# days back a partition is made for: a gateway's spool keeps 168 h, plus margin;
# a reading older than that (or beyond the days ahead) goes to readings_default
PAST_DAYS = 10
# the batches received in the last hour are loaded into a worker's memory at start, so
# a redelivery after a restart is dropped at once; an older one is caught by the
# unique key at the flush. All of them would be too many in a city: two million
# batches a day, ~150 bytes each in a Python set.
SEEN_MS = 3_600_000
RETRY_S = 60.0  # how long a write waits for a lost server before the hub gives up
_IN_TRANSACTION = (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR)
_T = TypeVar("_T")
_LOCK = 0x76697461  # pg_advisory_xact_lock key for schema changes ("vita")
# a split's part against its original: every claim transaction holds this shared, a
# part's decision (settle_part) exclusive, so each sees the other's commit
_SPLIT_LOCK = _LOCK + 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS gateways (
    gw text NOT NULL, kid bytea NOT NULL, pubkey bytea NOT NULL,
    revoked boolean NOT NULL DEFAULT false, enrolled double precision NOT NULL,
    PRIMARY KEY (gw, kid)
);
CREATE TABLE IF NOT EXISTS batches (
    gw text NOT NULL, epoch bigint NOT NULL, seq bigint NOT NULL,
    n integer NOT NULL, t0 bigint NOT NULL, t1 bigint NOT NULL,
    received_ms bigint NOT NULL, worker text NOT NULL DEFAULT '',
    PRIMARY KEY (gw, epoch, seq)
);
CREATE INDEX IF NOT EXISTS batches_received ON batches USING brin (received_ms);
CREATE TABLE IF NOT EXISTS points (
    gw text NOT NULL, id integer NOT NULL, device text, name text, unit text,
    domain text, cls text, indicator text, epoch bigint NOT NULL,
    PRIMARY KEY (gw, id)
);
CREATE TABLE IF NOT EXISTS gaps (
    gw text NOT NULL, epoch bigint NOT NULL, first bigint NOT NULL, last bigint NOT NULL,
    readings bigint NOT NULL, reason text NOT NULL, received_ms bigint NOT NULL,
    PRIMARY KEY (gw, epoch, first, last)
);
CREATE TABLE IF NOT EXISTS events (
    gw text NOT NULL, epoch bigint NOT NULL, seq bigint NOT NULL,
    rule text NOT NULL, kind text NOT NULL, state text NOT NULL, device text NOT NULL,
    point text NOT NULL, pid integer NOT NULL, value text, ts bigint NOT NULL,
    since bigint NOT NULL, detail text NOT NULL, received_ms bigint NOT NULL,
    PRIMARY KEY (gw, epoch, seq)
);
-- a gateway's clock correction for one epoch (protocols/envelope.py, fix_*): the
-- readings of its batches seq <= last_seq stamped ts < until are truly at ts + offset_ms
CREATE TABLE IF NOT EXISTS clock_fixes (
    gw text NOT NULL, epoch bigint NOT NULL, offset_ms bigint NOT NULL,
    until bigint NOT NULL, last_seq bigint NOT NULL, received_ms bigint NOT NULL,
    PRIMARY KEY (gw, epoch)
);
CREATE TABLE IF NOT EXISTS tails (
    gw text NOT NULL, epoch bigint NOT NULL, sealed bigint NOT NULL,
    received_ms bigint NOT NULL, PRIMARY KEY (gw, epoch)
);
CREATE TABLE IF NOT EXISTS counters (name text PRIMARY KEY, value bigint NOT NULL);
CREATE TABLE IF NOT EXISTS enroll_tokens (
    hash bytea PRIMARY KEY, gw text NOT NULL, issued double precision NOT NULL,
    expires double precision NOT NULL, used double precision, kid bytea
);
CREATE TABLE IF NOT EXISTS key_rotations (
    gw text NOT NULL, old_kid bytea NOT NULL, new_kid bytea NOT NULL,
    at double precision NOT NULL, revoke_at double precision NOT NULL,
    done boolean NOT NULL DEFAULT false,
    PRIMARY KEY (gw, old_kid)
);
"""
_READINGS_COLUMNS = """
    gw text NOT NULL, epoch bigint NOT NULL, seq bigint NOT NULL,
    point integer NOT NULL, ts bigint NOT NULL, value double precision,
    quality smallint NOT NULL, text_value text
"""
# readings with each gateway's clock correction applied when read (hub.store's
# true_readings, the same columns plus text_value): the signed stamps stay as they came
_TRUE_READINGS = """
CREATE OR REPLACE VIEW true_readings AS
SELECT r.gw, r.point, r.ts + coalesce(f.offset_ms, 0) AS ts, r.value, r.text_value,
       r.quality, r.epoch, r.seq, r.ts AS stamped, f.offset_ms IS NOT NULL AS corrected
FROM readings r LEFT JOIN clock_fixes f
  ON f.gw = r.gw AND f.epoch = r.epoch AND r.seq <= f.last_seq AND r.ts < f.until
"""
_COPY = (
    "COPY readings (gw, epoch, seq, point, ts, value, quality, text_value)"
    " FROM STDIN (FORMAT BINARY)"
)
# COPY's binary format, written here rather than row by row through psycopg (a third
# of a worker's time went to formatting rows): the file header, each row's 8 fields
# as (length, bytes), the trailer
_SIGNATURE = b"PGCOPY\n\xff\r\n\0" + bytes(8)
_TRAILER = b"\xff\xff"
_NULL = -1
# a claim: not if the batch is there, nor if it was split and a part stored instead
# (hub.store's _INSERT_BATCH)
_CLAIM = """
INSERT INTO batches (gw, epoch, seq, n, t0, t1, received_ms, worker)
SELECT * FROM unnest(%s::text[], %s::int8[], %s::int8[], %s::int4[], %s::int8[], %s::int8[],
                     %s::int8[], %s::text[]) AS b (gw, epoch, seq, n, t0, t1, received_ms, worker)
WHERE NOT EXISTS (SELECT 1 FROM gaps g WHERE g.gw = b.gw AND g.epoch = b.epoch
                  AND g.first = b.seq AND g.last = b.seq AND g.reason = 'split')
ON CONFLICT DO NOTHING
RETURNING gw, epoch, seq
"""
_SAVE_COUNTERS = """
INSERT INTO counters (name, value) SELECT * FROM unnest(%s::text[], %s::int8[])
ON CONFLICT (name) DO UPDATE SET value = excluded.value
"""
_NUMBERS = frozenset({float, int, bool})
# per reading after the batch's prefix: point int4, ts int8, value float8, quality int2,
# text_value NULL; each field's length first
_ROW = "iiiqidihi"


@functools.lru_cache(maxsize=256)
def _rows_struct(n: int, prefix: int) -> struct.Struct:
    return struct.Struct(">" + f"{prefix}s{_ROW}" * n)


def _copy_rows(b: BatchRow, rs: list[Reading]) -> bytes:
    """One batch's readings in COPY's binary format: one ``struct.pack`` for the batch
    when every value is a number (the rule), else row by row."""
    gw = b[0].encode()
    prefix = struct.pack(f">hi{len(gw)}siqiq", 8, len(gw), gw, 8, b[1], 8, b[2])
    p, t, v, q = zip(*rs, strict=True)
    if _NUMBERS.issuperset(map(type, v)):
        fields = chain.from_iterable(
            zip(
                repeat(prefix),
                repeat(4),
                p,
                repeat(8),
                t,
                repeat(8),
                v,
                repeat(2),
                q,
                repeat(_NULL),
            )
        )
        return _rows_struct(len(rs), len(prefix)).pack(*fields)
    out = bytearray()
    for point, ts, value, quality in rs:  # a reading without a value, or a text value
        out += prefix + struct.pack(">iiiq", 4, point, 8, ts)
        if isinstance(value, (int, float)):
            out += struct.pack(">id", 8, value)
        else:
            out += struct.pack(">i", _NULL)
        out += struct.pack(">ih", 2, quality)
        if isinstance(value, str):
            text = value.encode()
            out += struct.pack(">i", len(text)) + text
        else:
            out += struct.pack(">i", _NULL)
    return bytes(out)


def _days_of(batches: list[BatchRow], readings: list[list[Reading]], today: int) -> set[int]:
    """The days the batches' readings fall on, from ``PAST_DAYS`` ago to the partitions
    ahead of today (a reading outside goes to ``readings_default``: a gateway whose
    clock was wrong must not make the hub create a table per day since 1970)."""
    days: set[int] = set()
    for b, rs in zip(batches, readings, strict=True):
        first, last = b[4] // DAY_MS, b[5] // DAY_MS
        if last - first <= 2:
            days.update(range(first, last + 1))
        else:  # a batch spanning days: only those its readings are on
            days.update(r[1] // DAY_MS for r in rs)
    if max(days, default=0) >= today:
        days.update(range(today, today + AHEAD_DAYS + 1))
    return {d for d in days if today - PAST_DAYS <= d <= today + AHEAD_DAYS}


@functools.lru_cache(maxsize=64)
def _pg(text: str) -> str:
    """A statement of :class:`~hub.store.SqlStore` with psycopg's placeholders."""
    return text.replace("?", "%s")


def partition_name(day: int) -> str:
    """The partition of UTC day ``day`` (days since 1970-01-01): ``readings_pYYYYMMDD``."""
    return "readings_p" + time.strftime("%Y%m%d", time.gmtime(day * 86_400))


class PgStore(SqlStore):
    """The hub's tables in one PostgreSQL database; one connection per worker."""

    def __init__(self, url: str, *, worker: str = "w0") -> None:
        self.url, self.worker = url, worker
        try:
            self.db = self._connect()
        except psycopg.OperationalError as exc:
            raise LocalError(
                f"cannot reach PostgreSQL at {_safe(url)}: {_first_line(exc)} (check host,"
                " port, user, database name and the server's pg_hba.conf)"
            ) from None
        self.timescale = False
        with self.db.transaction():
            self.db.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            self.db.execute(_SCHEMA)
            self._create_readings()
            self.db.execute(_TRUE_READINGS)
        self._days: set[int] = set()
        if not self.timescale:
            self._days = self._partition_days()
            today = time.time_ns() // 1_000_000 // DAY_MS
            self._ensure_days(range(today, today + AHEAD_DAYS + 1))

    def _connect(self) -> psycopg.Connection[Any]:
        db = psycopg.connect(
            self.url, autocommit=True, application_name=f"vitals-hub {self.worker}"
        )
        # a commit is durable when it returns, whatever the server's default: the
        # worker acknowledges the messages to the broker after it
        db.execute("SET synchronous_commit = on")
        return db

    # -- schema ---------------------------------------------------------------

    def _create_readings(self) -> None:
        """``readings``: a hypertable where TimescaleDB is installed, else partitioned by day."""
        kind = self.db.execute(
            "SELECT c.relkind FROM pg_class c WHERE c.oid = to_regclass('readings')"
        ).fetchone()
        available = self.db.execute(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'"
        ).fetchone()
        if kind is not None:  # made before: keep what it is
            self.timescale = kind[0] == "r" and available is not None and self._is_hypertable()
            return
        if available:
            try:
                with self.db.transaction():
                    self.db.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
                    self.db.execute(f"CREATE TABLE readings ({_READINGS_COLUMNS})")
                    self.db.execute(
                        "SELECT create_hypertable('readings', 'ts', chunk_time_interval => %s::bigint,"
                        " create_default_indexes => false)",
                        (DAY_MS,),
                    )
                self.timescale = True
                log.info("readings: a TimescaleDB hypertable, one-day chunks")
                return
            except psycopg.Error as exc:
                log.warning(
                    "TimescaleDB is installed but not usable here (%s); readings are"
                    " partitioned by day instead (shared_preload_libraries = 'timescaledb'"
                    " and a superuser for CREATE EXTENSION enable it)",
                    str(exc).strip().splitlines()[0],
                )
        self.db.execute(f"CREATE TABLE readings ({_READINGS_COLUMNS}) PARTITION BY RANGE (ts)")
        self.db.execute("CREATE TABLE readings_default PARTITION OF readings DEFAULT")

    def _is_hypertable(self) -> bool:
        try:
            with self.db.transaction():
                row = self.db.execute(
                    "SELECT 1 FROM timescaledb_information.hypertables"
                    " WHERE hypertable_name = 'readings'"
                ).fetchone()
        except psycopg.Error:
            return False
        return row is not None

    def _partition_days(self) -> set[int]:
        days = set()
        for (name,) in self.db.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = to_regclass('readings')"
        ):
            if name.startswith("readings_p") and name[10:].isdigit():
                days.add(calendar.timegm(time.strptime(name[10:], "%Y%m%d")) // 86_400)
        return days

    def _ensure_days(self, days: Iterable[int]) -> None:
        """Create the partitions of ``days`` that do not exist, in their own transaction
        (never inside a flush: creating a partition locks ``readings`` briefly)."""
        missing = sorted(set(days) - self._days)
        if not missing:
            return
        with self.db.transaction():
            self.db.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            for day in missing:
                try:
                    with self.db.transaction():  # a savepoint: one day may fail alone
                        self.db.execute(
                            sql.SQL(
                                "CREATE TABLE IF NOT EXISTS {} PARTITION OF readings"
                                " FOR VALUES FROM ({}) TO ({})"
                            ).format(
                                sql.Identifier(partition_name(day)),
                                sql.Literal(day * DAY_MS),
                                sql.Literal((day + 1) * DAY_MS),
                            )
                        )
                except psycopg.errors.CheckViolation:
                    # readings_default holds rows of that day already (they came when
                    # it was out of range): the day stays there
                    log.warning(
                        "readings of %s are in readings_default (some arrived before its"
                        " partition could be made)",
                        partition_name(day),
                    )
        self._days.update(missing)

    def partitions(self) -> list[str]:
        """The names of the readings partitions (or TimescaleDB chunks), oldest first."""
        if self.timescale:
            q = "SELECT chunk_name FROM timescaledb_information.chunks WHERE hypertable_name = 'readings' ORDER BY range_start_integer"
        else:
            q = (
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = to_regclass('readings') ORDER BY c.relname"
            )
        return [name for (name,) in self.db.execute(q)]

    # -- start-up -------------------------------------------------------------

    def _run(self, text: str, params: Sequence[object] = ()) -> psycopg.Cursor[Any]:
        """One statement of the shared queries (keys, the enrollment desk, receipts):
        on its own it is retried like a write, so a key looked up for a batch just
        after PostgreSQL restarted costs a pause, not the worker; inside a
        transaction the caller's retry runs the whole transaction again."""
        if self.db.info.transaction_status in _IN_TRANSACTION:
            return self.db.execute(_pg(text), params)
        return self._retry(lambda: self.db.execute(_pg(text), params))

    def seen(self) -> Iterable[tuple[str, int, int]]:
        since = time.time_ns() // 1_000_000 - SEEN_MS
        return self.db.execute(
            "SELECT gw, epoch, seq FROM batches WHERE received_ms >= %s", (since,)
        ).fetchall()

    # -- keys -----------------------------------------------------------------

    def enroll(self, gateway: str, kid: bytes, public_raw: bytes, at: float) -> None:
        self._run(  # the enrollment desk calls it while the hub runs: retried
            "INSERT INTO gateways (gw, kid, pubkey, revoked, enrolled) VALUES (?, ?, ?, false, ?)"
            " ON CONFLICT (gw, kid) DO UPDATE SET pubkey = excluded.pubkey, revoked = false,"
            " enrolled = excluded.enrolled",
            (gateway, kid, public_raw, at),
        )

    # -- what the gateways send -------------------------------------------------

    def write_batches(
        self,
        batches: list[BatchRow],
        readings: list[list[Reading]],
        counters: Callable[[list[bool]], Mapping[str, int]],
    ) -> list[bool]:
        """Claim, copy the won batches' readings, save the counters: one transaction."""
        return self._retry(lambda: self._write_batches(batches, readings, counters))

    def _write_batches(
        self,
        batches: list[BatchRow],
        readings: list[list[Reading]],
        counters: Callable[[list[bool]], Mapping[str, int]],
    ) -> list[bool]:
        if not self.timescale and batches:
            self._ensure_days(_days_of(batches, readings, self._today()))
        order = sorted(range(len(batches)), key=lambda i: batches[i][:3])
        cols = list(zip(*(batches[i] for i in order), strict=True)) if batches else [()] * 8
        with self.db.transaction():
            cur = self.db.cursor()
            cur.execute("SELECT pg_advisory_xact_lock_shared(%s)", (_SPLIT_LOCK,))
            cur.execute(_CLAIM, [list(c) for c in cols])
            claimed = {(gw, epoch, seq) for gw, epoch, seq in cur.fetchall()}
            won = [b[:3] in claimed for b in batches]
            if claimed:
                with cur.copy(_COPY) as copy:
                    copy.write(_SIGNATURE)
                    for b, rs, ok in zip(batches, readings, won, strict=True):
                        if ok and rs:
                            copy.write(_copy_rows(b, rs))
                    copy.write(_TRAILER)
            self._save_counters(cur, counters(won))
        return won

    @staticmethod
    def _today() -> int:
        return time.time_ns() // 1_000_000 // DAY_MS

    def _save_counters(self, cur: psycopg.Cursor[Any], counters: Mapping[str, int]) -> None:
        if counters:
            names = [f"{self.worker}/{k}" for k in counters]
            cur.execute(_SAVE_COUNTERS, (names, list(counters.values())))

    def save_counters(self, counters: Mapping[str, int]) -> None:
        def save() -> None:
            with self.db.transaction():
                self._save_counters(self.db.cursor(), counters)

        self._retry(save)

    def _retry(self, op: Callable[[], _T]) -> _T:
        """Run ``op`` (one transaction or one statement); when the server is lost (or
        rolls the transaction back, a deadlock), reconnect and run it again, for up to
        ``RETRY_S``: a restart of PostgreSQL or a fail-over costs the hub a pause, not
        the batches it holds. A transaction is all or nothing, so nothing is stored
        twice; past ``RETRY_S`` the hub stops (LocalError) for its supervisor to
        restart it."""
        deadline = time.monotonic() + RETRY_S
        delay, lost = 0.25, False
        while True:
            try:
                out = op()
            except psycopg.OperationalError as exc:
                why = _first_line(exc)
                if time.monotonic() > deadline:
                    raise LocalError(
                        f"PostgreSQL at {_safe(self.url)} failed for {RETRY_S:.0f} s: {why};"
                        " check the server (pg_isready) and the network"
                    ) from None
                if not lost:
                    log.warning(
                        "PostgreSQL at %s: %s; retrying for up to %.0f s",
                        _safe(self.url),
                        why,
                        RETRY_S,
                    )
                    lost = True
                time.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, 5.0)
                if not (exc.sqlstate or "").startswith("40"):  # class 40: rolled back
                    self._reconnect()
                continue
            if lost:
                log.warning("PostgreSQL at %s is back", _safe(self.url))
            return out

    def _reconnect(self) -> None:
        """A new connection in place of one that failed. Only a rolled-back transaction
        (a deadlock) leaves the connection sound; after any other failure it is not
        trusted, whatever ``closed`` and ``broken`` say: a socket error that psycopg
        raises while libpq still awaits a reply leaves both false, and every later
        command fails ("another command is already in progress")."""
        with contextlib.suppress(psycopg.Error):
            self.db.close()
        with contextlib.suppress(psycopg.OperationalError):
            self.db = self._connect()

    def write_gaps(self, rows: list[GapRow]) -> int:
        return self._retry(lambda: self._write_gaps(rows))

    def _write_gaps(self, rows: list[GapRow]) -> int:
        new = 0
        with self.db.transaction():
            cur = self.db.cursor()
            for row in rows:
                cur.execute(
                    "INSERT INTO gaps (gw, epoch, first, last, readings, reason, received_ms)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    row,
                )
                new += cur.rowcount
        return new

    def settle_part(
        self, gateway: str, epoch: int, seq: int, n: int, of: tuple[int, int], now_ms: int
    ) -> bool:
        def settle() -> bool:
            with self.db.transaction():
                self.db.execute("SELECT pg_advisory_xact_lock(%s)", (_SPLIT_LOCK,))
                return self._settle_part(gateway, epoch, seq, n, of, now_ms)

        return self._retry(settle)

    def write_tails(self, rows: list[TailRow]) -> None:
        self._retry(lambda: self._write_tails(rows))

    def _write_tails(self, rows: list[TailRow]) -> None:
        with self.db.transaction():
            self.db.cursor().executemany(_pg(UPSERT_TAIL), rows)

    def write_event(self, row: EventRow) -> bool:
        values = list(row)
        values[9] = None if row[9] is None else str(row[9])
        return self._retry(lambda: self._write_event(values))

    def _write_event(self, values: list[object]) -> bool:
        cur = self.db.execute(
            "INSERT INTO events (gw, epoch, seq, rule, kind, state, device, point, pid,"
            " value, ts, since, detail, received_ms)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            values,
        )
        return cur.rowcount == 1

    def write_points(self, rows: list[PointRow]) -> None:
        self._retry(lambda: self._write_points(rows))

    def _write_points(self, rows: list[PointRow]) -> None:
        with self.db.transaction():
            self.db.cursor().executemany(
                "INSERT INTO points (gw, id, device, name, unit, domain, cls, indicator, epoch)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (gw, id) DO UPDATE SET"
                " device = excluded.device, name = excluded.name, unit = excluded.unit,"
                " domain = excluded.domain, cls = excluded.cls, indicator = excluded.indicator,"
                " epoch = excluded.epoch",
                rows,
            )

    # -- reading it back ----------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """What :func:`hub.stats.summarize` makes of the rows, computed by the database:
        per (gateway, epoch) the count, readings and last seq, and the holes between
        consecutive seqs; only the ranges come back, never a row per batch. The
        totals are :func:`~hub.stats.summarize`'s own, from the counters."""
        from hub.stats import _add_epoch, _minus, _no_batches, summarize

        db = self.db
        epochs = db.execute(
            "SELECT gw, epoch, count(*), sum(n), max(seq) FROM batches GROUP BY gw, epoch"
        ).fetchall()
        holes: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for gw, epoch, first, last in db.execute(
            "SELECT gw, epoch, prev + 1, seq - 1 FROM ("
            " SELECT gw, epoch, seq,"
            " lag(seq, 1, -1::bigint) OVER (PARTITION BY gw, epoch ORDER BY seq) AS prev"
            " FROM batches) s WHERE seq > prev + 1"
        ):
            holes.setdefault((gw, epoch), []).append((first, last))
        dropped: dict[tuple[str, int], list[tuple[int, int, int, str]]] = {}
        for gw, epoch, first, last, n, reason in db.execute(
            "SELECT gw, epoch, first, last, readings, reason FROM gaps"
        ):
            dropped.setdefault((gw, epoch), []).append((first, last, n, reason))
        gateways: dict[str, Any] = {
            gw: _no_batches()
            for (gw,) in db.execute(
                "SELECT DISTINCT gw FROM gateways WHERE NOT revoked ORDER BY gw"
            )
        }
        per = {(gw, epoch): (int(c), int(n), int(top)) for gw, epoch, c, n, top in epochs}
        readings: Counter[str] = Counter()
        for (gw, _), (_, n, _) in per.items():
            readings[gw] += n
        sealed = {
            (gw, epoch): int(last)
            for gw, epoch, last in db.execute("SELECT gw, epoch, sealed FROM tails")
        }
        for gw, epoch in sorted({*per, *dropped, *sealed}):
            count, _, top_seq = per.get((gw, epoch), (0, 0, -1))
            drops = sorted(dropped.get((gw, epoch), []))
            cov = [(f, last) for f, last, _, _ in drops]
            top = max([top_seq, sealed.get((gw, epoch), -1), *(last for _, last in cov)])
            spans = list(holes.get((gw, epoch), []))
            if top_seq < 0 and top >= 0:
                spans = [(0, top)]
            elif top > top_seq:
                spans.append((top_seq + 1, top))
            missing = [m for s in sorted(spans) for m in _minus(list(s), sorted(cov))]
            g = gateways.setdefault(gw, _no_batches())
            g["readings"] = readings[gw]
            _add_epoch(g, epoch, count, top_seq, missing, drops)
        counters = [(str(k), int(v)) for k, v in db.execute("SELECT name, value FROM counters")]
        out = summarize(counters=counters, batches=[], gaps=[], enrolled=[])
        out["gateways"] = gateways
        return out

    def close(self) -> None:
        self.db.close()


def _first_line(exc: BaseException) -> str:
    """libpq's reason, without its preamble: 'Connection refused', 'FATAL: ...'."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return " ".join(line.rsplit(" failed: ", 1)[-1].split())


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "the --db URL"
    user = str(info.get("user") or "")
    where = f"{info.get('host', '')}:{info.get('port', 5432)}/{info.get('dbname', '')}"
    return f"{user}@{where}" if user else where
