"""Where the hub keeps what it verified: the :class:`Store` interface and SQLite.

:class:`~hub.core.HubCore` verifies and deduplicates in memory; everything it
keeps goes through a :class:`Store`: enrolled keys, batch claims and their
readings, gap notices, events, point tables, counters, and the enrollment
desk's tokens and key rotations. :class:`SqliteStore` is the embedded default
(the demo, small sites, tests); ``hub.pg`` implements the same interface on
PostgreSQL for a city. :func:`open_store` picks one from ``--db``: a
``postgresql://`` URL or a path.

Dedup across workers: several workers may share one store (a shared
subscription), and a batch redelivered to another worker is not in that
worker's memory, so the store's unique key on (gw, epoch, seq) decides:
:meth:`Store.write_batches` claims each batch and keeps the readings only of
the batches whose claim went in. A split's part and its original reaching two
workers are decided the same way: :meth:`Store.settle_part` records one of
them split, and a claim of a batch recorded split fails.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import chain, repeat
from pathlib import Path
from typing import Any, Protocol

from protocols.errors import LocalError
from protocols.reading import Quality, Reading

__all__ = [
    "REFUSED",
    "BatchRow",
    "SqlStore",
    "SqliteStore",
    "Store",
    "TailRow",
    "is_url",
    "open_readings",
    "open_store",
    "shard_dir",
    "shards",
]

#: the gaps table's reason for a batch the hub refused for good: "refused:" + the
#: refusal ("too_old", "bad_payload"); settled, neither missing nor dropped, and no
#: batch receipt covers it (a receipt of kind "refused" does)
REFUSED = "refused:"

# gw, epoch, seq, n, t0, t1, received_ms, worker
BatchRow = tuple[str, int, int, int, int, int, int, str]
# gw, epoch, first, last, readings, reason, received_ms
GapRow = tuple[str, int, int, int, int, str, int]
# gw, epoch, seq, rule, kind, state, device, point, pid, value, ts, since, detail, received_ms
EventRow = tuple[str, int, int, str, str, str, str, str, int, object, int, int, str, int]
# gw, epoch, sealed (the last seq the gateway sealed), received_ms
TailRow = tuple[str, int, int, int]
# gw, id, device, name, unit, domain, cls, indicator, epoch
PointRow = tuple[str, int, str, str, str, str, str, str, int]


class Store(Protocol):
    """What a hub worker needs of its database. One worker, one store object (not
    shared between threads); several workers may share one database."""

    worker: str

    # -- start-up -------------------------------------------------------------
    def enrolled_keys(self) -> Iterable[tuple[str, bytes, bytes, bool]]:
        """Every enrolled key: (gateway, kid, public key, revoked)."""
        ...

    def seen(self) -> Iterable[tuple[str, int, int]]:
        """Every stored batch: (gateway, epoch, seq)."""
        ...

    def splits(self) -> Iterable[tuple[str, int, int, int]]:
        """Every range recorded split (gap reason "split"): (gateway, epoch, first, last)."""
        ...

    def refused(self) -> Iterable[tuple[str, int, int, int, str]]:
        """Every range the hub refused for good (gap reason :data:`REFUSED` + why):
        (gateway, epoch, first, last, why)."""
        ...

    def counters(self) -> dict[str, int]:
        """This worker's counters as last saved."""
        ...

    # -- keys -----------------------------------------------------------------
    def key(self, gateway: str, kid: bytes) -> tuple[bytes, bool] | None:
        """(public key, revoked) of one key, from the database (another worker may
        have enrolled or revoked it)."""
        ...

    def enroll(self, gateway: str, kid: bytes, public_raw: bytes, at: float) -> None: ...

    def revoke(self, gateway: str, kid: bytes) -> None: ...

    def other_keys(self, gateway: str, kid: bytes) -> list[bytes]:
        """The unrevoked kids of ``gateway`` other than ``kid``."""
        ...

    # -- what the gateways send -------------------------------------------------
    def write_batches(
        self,
        batches: list[BatchRow],
        readings: list[list[Reading]],
        counters: Callable[[list[bool]], Mapping[str, int]],
    ) -> list[bool]:
        """Claim each batch and store the readings of those whose claim went in (not
        one stored already, nor an original :meth:`settle_part` recorded split); then
        save ``counters(won)`` (this worker's, corrected for the batches it lost).
        One transaction where the database allows it. Returns ``won``."""
        ...

    def save_counters(self, counters: Mapping[str, int]) -> None: ...

    def write_gaps(self, rows: list[GapRow]) -> int:
        """Insert gap ranges (a range already there is skipped); how many were new."""
        ...

    def settle_part(
        self, gateway: str, epoch: int, seq: int, n: int, of: tuple[int, int], now_ms: int
    ) -> bool:
        """Decide, for every worker at once, between a split's part (``epoch``, ``seq``,
        ``n`` readings) and its original ``of`` (epoch, seq): True if the original is
        not stored (it is recorded split, gap reason "split", so its claim in
        :meth:`write_batches` fails from now on, whichever worker makes it): store the
        part; False if it is: the part is recorded split instead (never stored)."""
        ...

    def write_event(self, row: EventRow) -> bool:
        """Insert an event; False if (gw, epoch, seq) was there already."""
        ...

    # -- receipts (protocols.receipt) ---------------------------------------------
    def accounted(self, gateway: str, epoch: int, lo: int, hi: int) -> list[tuple[int, int]]:
        """Ranges of ``gateway``'s seqs ``lo..hi`` of ``epoch`` the database accounts
        for: batches stored and ranges named by its gap notices (may overlap, may
        reach beyond lo..hi); not the batches the hub refused (:data:`REFUSED`)."""
        ...

    def top(self, gateway: str, epoch: int) -> int:
        """The highest seq of ``epoch`` stored or named by a gap notice; -1 if none."""
        ...

    def write_tails(self, rows: list[TailRow]) -> None:
        """Keep the highest sealed seq per (gw, epoch) of these and those there."""
        ...

    def write_points(self, rows: list[PointRow]) -> None:
        """Replace the point-table rows (gw, id)."""
        ...

    # -- the enrollment desk ----------------------------------------------------
    def add_token(self, digest: bytes, gateway: str, issued: float, expires: float) -> None: ...

    def token(self, digest: bytes) -> tuple[str, float, float | None] | None:
        """(gateway, expires, used) of a token by its SHA-256."""
        ...

    def use_token(self, digest: bytes, kid: bytes, at: float) -> bool:
        """Mark the token used, atomically: False if it was used already."""
        ...

    def rotation(self, gateway: str, old_kid: bytes) -> bytes | None:
        """The new kid a key was rotated to, if it was."""
        ...

    def add_rotation(
        self, gateway: str, old_kid: bytes, new_kid: bytes, at: float, revoke_at: float
    ) -> None: ...

    def due_rotations(self, now: float) -> list[tuple[str, bytes]]:
        """(gateway, old kid) of rotations whose grace period is over and not done."""
        ...

    def finish_rotation(self, gateway: str, old_kid: bytes) -> None: ...

    # -- reading it back ----------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """What :func:`hub.stats.hub_stats` shows."""
        ...

    def close(self) -> None: ...


def is_url(target: str | Path) -> bool:
    """Whether ``--db`` names a PostgreSQL database rather than an SQLite file."""
    return str(target).startswith(("postgresql://", "postgres://"))


def shown(target: str | Path) -> str:
    """``--db`` as messages and logs may show it: a URL without its password."""
    if not is_url(target):
        return str(target)
    parts = urllib.parse.urlsplit(str(target))
    if parts.password is None:
        return str(target)
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def open_store(target: str | Path, *, worker: str = "w0", sharded: bool = False) -> Store:
    """The store ``--db`` names: a PostgreSQL URL, else an SQLite file (created if new)."""
    if is_url(target):
        if sharded:
            raise LocalError("--sharded is for SQLite files; PostgreSQL has many writers")
        from hub.pg import PgStore

        store: Store = PgStore(str(target), worker=worker)
        return store
    return SqliteStore(Path(target), worker=worker, sharded=sharded)


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
-- a gateway's clock correction for one epoch (protocols/envelope.py, fix_*): the
-- readings of its batches seq <= last_seq stamped ts < until are truly at ts + offset_ms
CREATE TABLE IF NOT EXISTS clock_fixes (
    gw TEXT NOT NULL, epoch INTEGER NOT NULL, offset_ms INTEGER NOT NULL,
    until INTEGER NOT NULL, last_seq INTEGER NOT NULL, received_ms INTEGER NOT NULL,
    PRIMARY KEY (gw, epoch)
);
-- the last seq a gateway said (signed heartbeat) it sealed in an epoch: batches up
-- to it that are neither stored nor named by a gap notice are missing (the tail)
CREATE TABLE IF NOT EXISTS tails (
    gw TEXT NOT NULL, epoch INTEGER NOT NULL, sealed INTEGER NOT NULL,
    received_ms INTEGER NOT NULL, PRIMARY KEY (gw, epoch)
);
-- one row per (worker, counter): "<worker>/<name>"; hub_stats sums over workers
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
-- the enrollment desk
CREATE TABLE IF NOT EXISTS enroll_tokens (
    hash BLOB PRIMARY KEY, gw TEXT NOT NULL, issued REAL NOT NULL,
    expires REAL NOT NULL, used REAL, kid BLOB
);
CREATE TABLE IF NOT EXISTS key_rotations (
    gw TEXT NOT NULL, old_kid BLOB NOT NULL, new_kid BLOB NOT NULL,
    at REAL NOT NULL, revoke_at REAL NOT NULL, done INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (gw, old_kid)
);
"""

_READINGS = """
CREATE TABLE IF NOT EXISTS {schema}.readings (
    gw TEXT NOT NULL, point INTEGER NOT NULL, ts INTEGER NOT NULL,
    value, quality INTEGER NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL
)
"""
# a batch's readings go in _CHUNK at a time, one statement binding the batch's gw,
# epoch and seq once and four values a reading: half the CPU of a statement a row
# (0.44 against 0.97 us a reading, bench/README.md hub); the rest a row at a time
_CHUNK = 100
_INSERT_READINGS = (
    "INSERT INTO {schema}.readings (gw, point, ts, value, quality, epoch, seq)"
    " SELECT ?1, column1, column2, column3, column4, ?2, ?3 FROM (VALUES {rows})"
)
# a claim: not if the batch is there, nor if it was split and a part stored instead
# (Store.settle_part's row; the claims and settle_part take SQLite's write lock in turn)
_INSERT_BATCH = (
    "INSERT OR IGNORE INTO batches (gw, epoch, seq, n, t0, t1, received_ms, worker)"
    " SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8 WHERE NOT EXISTS (SELECT 1 FROM gaps"
    " WHERE gw = ?1 AND epoch = ?2 AND first = ?3 AND last = ?3 AND reason = 'split')"
)
# a tail only grows: a heartbeat delivered late never lowers it
UPSERT_TAIL = (
    "INSERT INTO tails (gw, epoch, sealed, received_ms) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (gw, epoch) DO UPDATE SET sealed = excluded.sealed,"
    " received_ms = excluded.received_ms WHERE excluded.sealed > tails.sealed"
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
    _true_readings(con)
    return con


def _true_readings(con: sqlite3.Connection) -> None:
    """``true_readings``: ``readings`` with each gateway's clock correction applied
    (``ts`` the true time, ``stamped`` the gateway's, ``corrected`` 1 where they differ
    by a correction). Applied when read: the signed stamps stay as they came, and a
    correction that arrives after its readings (or twice) changes nothing else."""
    has = con.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'clock_fixes'"
    ).fetchone()
    if has is None:  # a database from before clock corrections
        con.execute(
            "CREATE TEMP VIEW true_readings AS SELECT gw, point, ts, value, quality, epoch,"
            " seq, ts AS stamped, 0 AS corrected FROM readings"
        )
        return
    con.execute(
        "CREATE TEMP VIEW true_readings AS SELECT r.gw, r.point,"
        " r.ts + coalesce(f.offset_ms, 0) AS ts, r.value, r.quality, r.epoch, r.seq,"
        " r.ts AS stamped, f.offset_ms IS NOT NULL AS corrected FROM readings r"
        " LEFT JOIN main.clock_fixes f ON f.gw = r.gw AND f.epoch = r.epoch"
        " AND r.seq <= f.last_seq AND r.ts < f.until"
    )


def _add_worker_column(db: sqlite3.Connection) -> None:
    """``batches.worker`` on a database made before it existed."""
    if "worker" in [r[1] for r in db.execute("PRAGMA table_info(batches)")]:
        return
    try:
        db.execute("ALTER TABLE batches ADD COLUMN worker TEXT NOT NULL DEFAULT ''")
    except sqlite3.OperationalError as exc:  # another worker added it first
        if "duplicate column" not in str(exc):
            raise


def _insert_readings(
    db: sqlite3.Connection,
    schema: str,
    batches: list[BatchRow],
    readings: list[list[Reading]],
    won: list[bool] | None,
) -> None:
    """Insert the ``readings`` rows of the batches (those whose ``won`` is true), in
    order: each batch's readings flattened in C (a :class:`Reading` is the tuple
    point, ts, value, quality), quality as a plain int (sqlite3 binds an IntEnum
    much slower), :data:`_CHUNK` readings a statement."""
    many = _INSERT_READINGS.format(schema=schema, rows=", ".join(["(?, ?, ?, ?)"] * _CHUNK))
    one = _INSERT_READINGS.format(schema=schema, rows="(?, ?, ?, ?)")
    step = 4 * _CHUNK
    for i, b in enumerate(batches):
        if won is not None and not won[i]:
            continue
        flat: list[Any] = list(chain.from_iterable(readings[i]))
        quals = flat[3::4]
        if quals.count(Quality.GOOD) == len(quals):  # the common case: no int() a reading
            flat[3::4] = repeat(0, len(quals))
        else:
            flat[3::4] = map(int, quals)
        head: list[object] = [b[0], b[1], b[2]]
        full = len(flat) // step * step
        db.executemany(many, (head + flat[j : j + step] for j in range(0, full, step)))
        if full < len(flat):
            db.executemany(one, (head + flat[j : j + 4] for j in range(full, len(flat), 4)))


class _Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class SqlStore:
    """The statements SQLite and PostgreSQL share, written once with ``?`` placeholders:
    a store runs them through :meth:`_run` (``hub.pg`` turns ``?`` into ``%s``).
    Booleans are written ``true``/``NOT x``: SQLite stores them as 1 and 0."""

    worker: str

    def _run(self, text: str, params: Sequence[object] = ()) -> _Cursor:
        raise NotImplementedError

    # -- clock corrections ------------------------------------------------------

    def write_clock_fix(self, row: tuple[str, int, int, int, int, int]) -> bool:
        """Keep a gateway's clock correction (gw, epoch, offset_ms, until, last_seq,
        received_ms); False if that epoch's was there already."""
        cur = self._run(
            "INSERT INTO clock_fixes (gw, epoch, offset_ms, until, last_seq, received_ms)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            row,
        )
        return cur.rowcount == 1

    # -- receipts -------------------------------------------------------------

    def accounted(self, gateway: str, epoch: int, lo: int, hi: int) -> list[tuple[int, int]]:
        # runs of consecutive seqs ("gaps and islands"): seq - row_number() is constant
        # along a run, so only the runs come back, never a row per batch
        runs = self._run(
            "SELECT min(seq), max(seq) FROM ("
            " SELECT seq, seq - row_number() OVER (ORDER BY seq) AS g FROM batches"
            " WHERE gw = ? AND epoch = ? AND seq BETWEEN ? AND ?) AS s GROUP BY g",
            (gateway, epoch, lo, hi),
        ).fetchall()
        gaps = self._run(
            "SELECT first, last FROM gaps WHERE gw = ? AND epoch = ? AND first <= ? AND last >= ?"
            " AND substr(reason, 1, ?) != ?",
            (gateway, epoch, hi, lo, len(REFUSED), REFUSED),
        ).fetchall()
        return [(int(a), int(b)) for a, b in [*runs, *gaps]]

    def top(self, gateway: str, epoch: int) -> int:
        row = self._run(
            "SELECT max(t) FROM (SELECT max(seq) AS t FROM batches WHERE gw = ? AND epoch = ?"
            " UNION ALL SELECT max(last) FROM gaps WHERE gw = ? AND epoch = ?) AS s",
            (gateway, epoch, gateway, epoch),
        ).fetchone()
        return -1 if row is None or row[0] is None else int(row[0])

    def write_tails(self, rows: list[TailRow]) -> None:
        raise NotImplementedError  # one transaction: SqliteStore's and hub.pg's own

    def splits(self) -> Iterable[tuple[str, int, int, int]]:
        return [
            (str(gw), int(e), int(a), int(b))
            for gw, e, a, b in self._run(
                "SELECT gw, epoch, first, last FROM gaps WHERE reason = 'split'"
            ).fetchall()
        ]

    def refused(self) -> Iterable[tuple[str, int, int, int, str]]:
        return [
            (str(gw), int(e), int(a), int(b), str(why)[len(REFUSED) :])
            for gw, e, a, b, why in self._run(
                "SELECT gw, epoch, first, last, reason FROM gaps WHERE substr(reason, 1, ?) = ?",
                (len(REFUSED), REFUSED),
            ).fetchall()
        ]

    def _settle_part(
        self, gateway: str, epoch: int, seq: int, n: int, of: tuple[int, int], now_ms: int
    ) -> bool:
        """:meth:`Store.settle_part`'s statements: the caller holds the transaction and
        whatever orders it against the claims (SQLite's write lock, hub.pg's advisory
        lock)."""
        stored = (
            self._run(
                "SELECT 1 FROM batches WHERE gw = ? AND epoch = ? AND seq = ?", (gateway, *of)
            ).fetchone()
            is not None
        )
        # a claim looks for exactly this row (first = last = its seq): a primary key lookup
        row = (gateway, epoch, seq, seq, n) if stored else (gateway, *of, of[1], 0)
        self._run(
            "INSERT INTO gaps (gw, epoch, first, last, readings, reason, received_ms)"
            " VALUES (?, ?, ?, ?, ?, 'split', ?) ON CONFLICT DO NOTHING",
            (*row, now_ms),
        )
        return not stored

    # -- start-up -------------------------------------------------------------

    def enrolled_keys(self) -> Iterable[tuple[str, bytes, bytes, bool]]:
        return [
            (gw, bytes(kid), bytes(pub), bool(revoked))
            for gw, kid, pub, revoked in self._run(
                "SELECT gw, kid, pubkey, revoked FROM gateways"
            ).fetchall()
        ]

    def counters(self) -> dict[str, int]:
        mine = f"{self.worker}/"
        return {
            name[len(mine) :]: int(value)
            for name, value in self._run(
                "SELECT name, value FROM counters WHERE substr(name, 1, ?) = ?", (len(mine), mine)
            ).fetchall()
        }

    # -- keys -----------------------------------------------------------------

    def key(self, gateway: str, kid: bytes) -> tuple[bytes, bool] | None:
        row = self._run(
            "SELECT pubkey, revoked FROM gateways WHERE gw = ? AND kid = ?", (gateway, kid)
        ).fetchone()
        return None if row is None else (bytes(row[0]), bool(row[1]))

    def revoke(self, gateway: str, kid: bytes) -> None:
        self._run("UPDATE gateways SET revoked = true WHERE gw = ? AND kid = ?", (gateway, kid))

    def other_keys(self, gateway: str, kid: bytes) -> list[bytes]:
        return [
            bytes(k)
            for (k,) in self._run(
                "SELECT kid FROM gateways WHERE gw = ? AND kid != ? AND NOT revoked",
                (gateway, kid),
            ).fetchall()
        ]

    # -- the enrollment desk ----------------------------------------------------

    def add_token(self, digest: bytes, gateway: str, issued: float, expires: float) -> None:
        self._run(
            "INSERT INTO enroll_tokens (hash, gw, issued, expires) VALUES (?, ?, ?, ?)",
            (digest, gateway, issued, expires),
        )

    def token(self, digest: bytes) -> tuple[str, float, float | None] | None:
        row = self._run(
            "SELECT gw, expires, used FROM enroll_tokens WHERE hash = ?", (digest,)
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def use_token(self, digest: bytes, kid: bytes, at: float) -> bool:
        cur = self._run(
            "UPDATE enroll_tokens SET used = ?, kid = ? WHERE hash = ? AND used IS NULL",
            (at, kid, digest),
        )
        return cur.rowcount == 1

    def rotation(self, gateway: str, old_kid: bytes) -> bytes | None:
        row = self._run(
            "SELECT new_kid FROM key_rotations WHERE gw = ? AND old_kid = ?", (gateway, old_kid)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def add_rotation(
        self, gateway: str, old_kid: bytes, new_kid: bytes, at: float, revoke_at: float
    ) -> None:
        self._run(
            "INSERT INTO key_rotations (gw, old_kid, new_kid, at, revoke_at) VALUES (?, ?, ?, ?, ?)",
            (gateway, old_kid, new_kid, at, revoke_at),
        )

    def due_rotations(self, now: float) -> list[tuple[str, bytes]]:
        return [
            (gw, bytes(kid))
            for gw, kid in self._run(
                "SELECT gw, old_kid FROM key_rotations WHERE NOT done AND revoke_at <= ?", (now,)
            ).fetchall()
        ]

    def finish_rotation(self, gateway: str, old_kid: bytes) -> None:
        self._run(
            "UPDATE key_rotations SET done = true WHERE gw = ? AND old_kid = ?", (gateway, old_kid)
        )


class SqliteStore(SqlStore):
    """The hub's tables in one SQLite file (WAL).

    SQLite has one writer per file, so workers on one file take turns for the
    whole insert; with ``sharded=True`` a worker appends its readings to a file
    of its own (:func:`shard_dir`) and only the small claim goes to the shared
    file. Read readings through :func:`open_readings`.
    """

    def __init__(self, db_path: Path, *, worker: str = "w0", sharded: bool = False) -> None:
        self.db_path, self.worker, self.sharded = db_path, worker, sharded
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk when it returns; the worker acknowledges the
        # messages to the broker after it (one fsync per flush, not per message)
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        self.db.execute(_READINGS.format(schema="main"))
        _add_worker_column(self.db)
        if sharded:
            if not _WORKER_NAME.fullmatch(worker):
                self.db.close()
                raise LocalError(
                    f"a sharded worker's name is its file name: {worker!r} is not"
                    " 1 to 63 of A-Z a-z 0-9 _ . - (starting with a letter or digit)"
                )
            path = shard_dir(db_path) / f"{worker}.sqlite3"
            path.parent.mkdir(exist_ok=True)
            self.db.execute("ATTACH DATABASE ? AS shard", (str(path),))
            self.db.execute("PRAGMA shard.journal_mode=WAL")
            self.db.execute("PRAGMA shard.synchronous=FULL")
            self.db.execute(_READINGS.format(schema="shard"))

    # -- start-up -------------------------------------------------------------

    def _run(self, text: str, params: Sequence[object] = ()) -> sqlite3.Cursor:
        return self.db.execute(text, params)

    def seen(self) -> Iterable[tuple[str, int, int]]:
        return self.db.execute("SELECT gw, epoch, seq FROM batches")

    # -- keys -----------------------------------------------------------------

    def enroll(self, gateway: str, kid: bytes, public_raw: bytes, at: float) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO gateways (gw, kid, pubkey, revoked, enrolled) VALUES (?, ?, ?, 0, ?)",
            (gateway, kid, public_raw, at),
        )

    # -- what the gateways send -------------------------------------------------

    def write_batches(
        self,
        batches: list[BatchRow],
        readings: list[list[Reading]],
        counters: Callable[[list[bool]], Mapping[str, int]],
    ) -> list[bool]:
        """Unsharded: one transaction in the shared file. Sharded: the readings first,
        in this worker's shard (no lock on the shared file), then the claims and
        counters in the shared file; a claim another worker made first turns our
        copy of that batch into orphan rows, deleted at once by rowid (a crash
        before that leaves them, and :func:`open_readings` ignores them)."""
        if self.sharded:
            return self._write_sharded(batches, readings, counters)
        with self._transaction("BEGIN IMMEDIATE"):
            won = self._claim(batches)
            _insert_readings(self.db, "main", batches, readings, won)
            self._save_counters(counters(won))
        return won

    def _write_sharded(
        self,
        batches: list[BatchRow],
        readings: list[list[Reading]],
        counters: Callable[[list[bool]], Mapping[str, int]],
    ) -> list[bool]:
        db = self.db
        # 1. the readings, into this worker's own file: in parallel with the other workers
        with self._transaction():
            base = db.execute("SELECT coalesce(max(rowid), 0) FROM shard.readings").fetchone()[0]
            _insert_readings(db, "shard", batches, readings, None)
        # 2. the claims, in the shared file: small, serialised across workers
        with self._transaction("BEGIN IMMEDIATE"):
            won = self._claim(batches)
            self._save_counters(counters(won))
        # 3. the batches another worker had first: our rows of them are orphans. One
        # transaction inserted them in order, so each batch's rows are a rowid range.
        lost: list[tuple[int, int]] = []
        first = int(base) + 1
        for row, ok in zip(batches, won, strict=True):
            if not ok:
                lost.append((first, first + row[3] - 1))
            first += row[3]
        if lost:
            with self._transaction():
                db.executemany("DELETE FROM shard.readings WHERE rowid BETWEEN ? AND ?", lost)
        return won

    @contextlib.contextmanager
    def _transaction(self, begin: str = "BEGIN") -> Iterator[None]:
        self.db.execute(begin)
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        """Undo the open transaction, if SQLite has not already (it rolls back by
        itself on SQLITE_FULL: a ROLLBACK then would hide "database or disk is full")."""
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    def _claim(self, batches: list[BatchRow]) -> list[bool]:
        return [self.db.execute(_INSERT_BATCH, row).rowcount == 1 for row in batches]

    def _save_counters(self, counters: Mapping[str, int]) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)",
            [(f"{self.worker}/{k}", v) for k, v in counters.items()],
        )

    def save_counters(self, counters: Mapping[str, int]) -> None:
        with self._transaction("BEGIN IMMEDIATE"):
            self._save_counters(counters)

    def write_gaps(self, rows: list[GapRow]) -> int:
        with self._transaction():
            cur = self.db.executemany(
                "INSERT OR IGNORE INTO gaps (gw, epoch, first, last, readings, reason, received_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        return max(0, cur.rowcount)

    def settle_part(
        self, gateway: str, epoch: int, seq: int, n: int, of: tuple[int, int], now_ms: int
    ) -> bool:
        with self._transaction("BEGIN IMMEDIATE"):
            return self._settle_part(gateway, epoch, seq, n, of, now_ms)

    def write_tails(self, rows: list[TailRow]) -> None:
        with self._transaction():
            self.db.executemany(UPSERT_TAIL, rows)

    def write_event(self, row: EventRow) -> bool:
        cur = self.db.execute(
            "INSERT OR IGNORE INTO events (gw, epoch, seq, rule, kind, state, device, point, pid,"
            " value, ts, since, detail, received_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            row,
        )
        return cur.rowcount == 1

    def write_points(self, rows: list[PointRow]) -> None:
        with self._transaction():
            self.db.executemany(
                "INSERT OR REPLACE INTO points (gw, id, device, name, unit, domain, cls, indicator, epoch)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    # -- reading it back ----------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        from hub.stats import sqlite_stats

        return sqlite_stats(self.db)

    def close(self) -> None:
        self.db.close()
