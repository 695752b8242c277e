"""The spool: every sealed batch on disk until the broker has acknowledged it.

SQLite in WAL mode, one row per batch. The spool is the single source of truth
for delivery: a batch is appended (and, with durability ``full``, fsynced)
before it counts as spooled, and deleted only after its PUBACK. All SQLite
calls run on one dedicated thread so the event loop never blocks on disk.

Durability policies (``[spool] durability``):
- ``full``: ``synchronous=FULL``; a batch reported as spooled survives a power cut.
- ``normal``: ``synchronous=NORMAL``; survives a crash of the agent (kill -9),
  a power cut may lose the last transactions (never corrupts).
- ``off``: ``synchronous=OFF``; for tests and RAM disks.

Acknowledgements are grouped (:meth:`Spool.ack` queues, :meth:`Spool.run_acks`
deletes every ``ack_interval_s`` in one transaction) and committed without an
fsync of their own: the next append's fsync carries them. A lost delete only
means the batch is sent again after a restart, and the hub drops the duplicate.

The spool is bounded by ``max_bytes`` and by ``max_age_s``. When a bound is
hit (or the disk is full: ``SQLITE_FULL``/``ENOSPC``) the oldest batches are
dropped; every drop is counted and written, in the same transaction, as a gap
row naming the (epoch, seq) range, which the uplink turns into a signed gap
notice for the hub (:mod:`protocols.gap`) and deletes once that is acknowledged.

A spool file that SQLite cannot open or whose ``quick_check`` fails is moved
aside (``spool.sqlite3.damaged-<time>``) with an error line, counted, and a
fresh spool is started.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocols.errors import LocalError
from protocols.gap import GapRange

__all__ = ["Spool", "SpoolError", "SpoolRow"]

log = logging.getLogger(__name__)

_CACHE_KIB = 256
_SYNC = {"full": "FULL", "normal": "NORMAL", "off": "OFF"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: the uplink reads by cursor
    epoch   INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    n       INTEGER NOT NULL,
    t0      INTEGER NOT NULL,
    created REAL    NOT NULL,
    data    BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS gaps (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    epoch    INTEGER NOT NULL,
    first    INTEGER NOT NULL,
    last     INTEGER NOT NULL,
    readings INTEGER NOT NULL,
    reason   TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

# Spool rows sealed before this are dropped as too old; checked at most this often.
_AGE_CHECK_S = 30.0
# When the disk is full: free at least this share of the spool per attempt.
_FULL_FREE_SHARE = 0.05
# A row is (epoch, seq, n, t0, data).
Row = tuple[int, int, int, int, bytes]
# The newest rows appended by this process, kept for the uplink's live reads
# (it reads back every batch right after it is appended). 64 batches of 500
# readings are ~160 KiB; when the uplink falls behind, reads go to SQLite.
_TAIL_MAX = 64


class SpoolError(LocalError):
    """The spool cannot be opened or written (other than by a full disk)."""


@dataclass(frozen=True, slots=True)
class SpoolRow:
    id: int
    epoch: int
    seq: int
    n: int
    data: bytes


def _is_full(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL:
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    return "full" in str(exc).lower()


def _ranges(rows: Sequence[tuple[int, int, int]], reason: str) -> list[GapRange]:
    """(epoch, seq, n) rows, in id order, as contiguous per-epoch ranges."""
    out: list[GapRange] = []
    for epoch, seq, n in sorted(rows):
        last = out[-1] if out else None
        if last is not None and last.epoch == epoch and last.last + 1 == seq:
            out[-1] = GapRange(epoch, last.first, seq, last.readings + n, reason)
        else:
            out.append(GapRange(epoch, seq, seq, n, reason))
    return out


class Spool:
    """Durable FIFO of sealed batches. Create with :meth:`open`."""

    def __init__(
        self,
        path: Path,
        durability: str,
        max_bytes: int,
        max_age_s: float,
        max_page_count: int | None,
    ) -> None:
        self.path = path
        self._durability = durability
        self._max_bytes = max_bytes
        self._max_age_s = max_age_s
        self._max_page_count = max_page_count
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._db: sqlite3.Connection | None = None
        self._bytes = 0
        self._count = 0
        self._last_id = 0
        self._acks: list[int] = []
        self._acked_ids: set[int] = set()  # acknowledged, delete not yet committed
        self._next_age_check = 0.0
        self._lost_gaps: list[GapRange] = []  # could not even be written (disk full)
        self._has_gaps = False
        # the newest rows, contiguous ids: pending() serves live reads from here
        self._tail: deque[SpoolRow] = deque()
        self._deletes = 0  # bumped by the spool thread whenever batches are dropped
        self.appended = 0
        self.acked = 0
        self.dropped_batches = 0
        self.dropped_readings = 0
        self.dropped_full = 0
        self.moved_aside = 0
        self.added = asyncio.Event()  # set on every append
        self.gaps_added = asyncio.Event()  # set when a gap row is written
        self.empty = asyncio.Event()  # set while nothing waits for a PUBACK
        self._ack_wake = asyncio.Event()

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        durability: str = "full",
        max_bytes: int = 256 << 20,
        max_age_s: float = 168 * 3600.0,
        max_page_count: int | None = None,
    ) -> Spool:
        """Open (or create) the spool at ``path``; a damaged file is moved aside.

        ``max_page_count`` caps the SQLite file (pages of 4 KiB): a stand-in
        for a full disk in tests.
        """
        if durability not in _SYNC:
            raise SpoolError(f"unknown durability {durability!r}: use full, normal or off")
        spool = cls(path, durability, max_bytes, max_age_s, max_page_count)
        await spool._call(spool._open_sync)
        if spool._count == 0:
            spool.empty.set()
        if spool._has_gaps:
            spool.gaps_added.set()
        spool.added.set()
        return spool

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._exec, fn, *args)

    # -- opening ----------------------------------------------------------------

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._connect()
            self._load()
        except sqlite3.DatabaseError as exc:
            if self._db is not None:
                self._db.close()
                self._db = None
            aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
            for suffix in ("", "-wal", "-shm"):
                p = Path(str(self.path) + suffix)
                if p.exists():
                    p.rename(Path(str(aside) + suffix))
            self.moved_aside += 1
            log.error(
                "spool %s is damaged (%s): moved it aside to %s and started a fresh spool; "
                "the batches in it are not sent (keep the file for a post-mortem)",
                self.path,
                exc,
                aside,
            )
            self._db = self._connect()
            self._load()
            self._bump_sync({"moved_aside": 1})

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={_SYNC[self._durability]}")
            # batches are written once and read once, in order: SQLite's default 2 MB
            # page cache would only hold pages that are never read again
            db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
            ok = db.execute("PRAGMA quick_check").fetchone()
            if ok is None or ok[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {ok[0] if ok else 'no answer'}")
            db.executescript(_SCHEMA)
            if self._max_page_count is not None:
                db.execute(f"PRAGMA max_page_count={int(self._max_page_count)}")
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _load(self) -> None:
        assert self._db is not None
        row = self._db.execute(
            "SELECT count(*), coalesce(sum(length(data)), 0), coalesce(max(id), 0) FROM batches"
        ).fetchone()
        self._count, self._bytes, self._last_id = int(row[0]), int(row[1]), int(row[2])
        self._has_gaps = self._db.execute("SELECT 1 FROM gaps LIMIT 1").fetchone() is not None
        if self._count:
            log.info("spool %s holds %d batches (%d bytes) from before", self.path, *row[:2])

    def _bump_sync(self, deltas: dict[str, int]) -> None:
        """Add to the persistent counters (inside the caller's transaction, if any)."""
        assert self._db is not None
        self._db.executemany(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            list(deltas.items()),
        )

    # -- writes ---------------------------------------------------------------

    async def append(self, batches: Sequence[Row]) -> list[Row]:
        """Append rows in one transaction; returns, once durable, the rows spooled.

        A row missing from the result could not be stored even after dropping
        every older batch (the disk is full): it is counted as dropped and
        reported in a gap notice like any other dropped batch.
        """
        deletes = self._deletes
        stored: list[Row]
        stored, last_id = await self._call(self._append_sync, list(batches))
        if self._deletes != deletes:
            self._tail.clear()  # batches were dropped: read from SQLite until the next append
        elif stored:
            # the tail holds every row still in the spool from tail[0].id on: rows
            # leave it only when deleted (acknowledged) or all older ones with it
            first = last_id - len(stored) + 1
            tail = self._tail
            for i, (epoch, seq, n, _, data) in enumerate(stored):
                tail.append(SpoolRow(first + i, epoch, seq, n, data))
            while len(tail) > _TAIL_MAX:
                tail.popleft()
        self.appended += len(stored)
        if stored:
            self.empty.clear()
            self.added.set()
        elif len(self._acked_ids) >= self._count:
            self.empty.set()
        if self._has_gaps:
            self.gaps_added.set()
            self.added.set()
        return stored

    def _append_sync(self, batches: list[Row]) -> tuple[list[Row], int]:
        assert self._db is not None
        now = time.time()
        if now >= self._next_age_check:
            self._next_age_check = now + _AGE_CHECK_S
            self._drop_old_sync(now)
        todo = batches
        while todo:
            try:
                self._insert_sync(todo, now)
                break
            except sqlite3.Error as exc:
                if not _is_full(exc):
                    raise SpoolError(f"spool {self.path}: cannot append ({exc})") from exc
                if self._count == 0:
                    # nothing left to make room with: give up on the oldest new one
                    lost, todo = todo[0], todo[1:]
                    self._lost_sync([(lost[0], lost[1], lost[2])], "disk_full")
                    continue
                freed = self._drop_oldest_sync(
                    max(int(self._bytes * _FULL_FREE_SHARE), sum(len(b[4]) for b in todo)),
                    "disk_full",
                )
                log.warning(
                    "spool %s: disk full (%s); dropped the oldest batches (%d bytes) to make room",
                    self.path,
                    exc,
                    freed,
                )
        last_id = self._last_id  # of the rows just stored: last_id - len(todo) + 1 ...
        if self._bytes > self._max_bytes:
            self._drop_oldest_sync(self._bytes - self._max_bytes, "spool_full")
        return todo, last_id

    def _insert_sync(self, batches: list[Row], now: float) -> None:
        assert self._db is not None
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            cur = db.executemany(
                "INSERT INTO batches (epoch, seq, n, t0, created, data) VALUES (?, ?, ?, ?, ?, ?)",
                [(e, s, n, t0, now, d) for e, s, n, t0, d in batches],
            )
            del cur
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._last_id = int(db.execute("SELECT max(id) FROM batches").fetchone()[0])
        self._count += len(batches)
        self._bytes += sum(len(b[4]) for b in batches)

    def _delete_sync(self, where: str, args: tuple[Any, ...], reason: str) -> int:
        """Delete the batches matching ``where``, writing their gap rows; returns bytes freed."""
        assert self._db is not None
        db = self._db
        rows = db.execute(
            f"SELECT id, epoch, seq, n, length(data) FROM batches WHERE {where} ORDER BY id",
            args,
        ).fetchall()
        if not rows:
            return 0
        ranges = _ranges([(e, s, n) for _, e, s, n, _ in rows], reason)
        freed = sum(int(r[4]) for r in rows)
        readings = sum(int(r[3]) for r in rows)
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(f"DELETE FROM batches WHERE {where}", args)
            db.executemany(
                "INSERT INTO gaps (epoch, first, last, readings, reason) VALUES (?, ?, ?, ?, ?)",
                [(g.epoch, g.first, g.last, g.readings, g.reason) for g in ranges],
            )
            self._bump_sync({"dropped_batches": len(rows), "dropped_readings": readings})
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._deletes += 1
        ids = [int(r[0]) for r in rows]
        acked_now = self._acked_ids.intersection(ids)
        # acknowledged in memory but not yet deleted: delivered, not dropped
        self._count -= len(rows)
        self._bytes -= freed
        self.dropped_batches += len(rows) - len(acked_now)
        self.dropped_readings += readings
        if reason == "disk_full":
            self.dropped_full += len(rows)
        self._acked_ids.difference_update(acked_now)
        self._has_gaps = True
        for g in ranges:
            log.warning(
                "spool: dropped epoch %d seq %d..%d (%d readings): %s",
                g.epoch,
                g.first,
                g.last,
                g.readings,
                g.reason,
            )
        return freed

    def _drop_oldest_sync(self, need_bytes: int, reason: str) -> int:
        """Drop the oldest batches until ``need_bytes`` are freed (keeps the newest)."""
        assert self._db is not None
        total, cut = 0, 0
        for rid, size in self._db.execute(
            "SELECT id, length(data) FROM batches ORDER BY id LIMIT ?", (self._count - 1,)
        ):
            total += int(size)
            cut = int(rid)
            if total >= need_bytes:
                break
        if not cut:
            cut = int(self._db.execute("SELECT coalesce(max(id), 0) FROM batches").fetchone()[0])
        return self._delete_sync("id <= ?", (cut,), reason)

    def _drop_old_sync(self, now: float) -> None:
        self._delete_sync("created < ?", (now - self._max_age_s,), "too_old")

    async def expire(self) -> None:
        """Drop the batches older than ``max_age_s`` now (appends also do it, at most
        every 30 s)."""
        deletes = self._deletes
        await self._call(self._drop_old_sync, time.time())
        if self._deletes != deletes:
            self._tail.clear()
        if self._has_gaps:
            self.gaps_added.set()
            self.added.set()
        if len(self._acked_ids) >= self._count:
            self.empty.set()

    def _lost_sync(self, rows: list[tuple[int, int, int]], reason: str) -> None:
        """Batches that never made it into the spool: a gap row, or in memory if even that fails."""
        assert self._db is not None
        ranges = _ranges(rows, reason)
        self.dropped_batches += len(rows)
        self.dropped_readings += sum(r[2] for r in rows)
        self.dropped_full += len(rows)
        try:
            self._db.executemany(
                "INSERT INTO gaps (epoch, first, last, readings, reason) VALUES (?, ?, ?, ?, ?)",
                [(g.epoch, g.first, g.last, g.readings, g.reason) for g in ranges],
            )
            self._has_gaps = True
        except sqlite3.Error:
            self._lost_gaps.extend(ranges)
        log.error(
            "spool %s: disk full and nothing left to drop: batch(es) %s not spooled",
            self.path,
            ", ".join(f"{g.epoch}:{g.first}..{g.last}" for g in ranges),
        )

    # -- acknowledgements -------------------------------------------------------

    def ack(self, ids: Sequence[int]) -> None:
        """Mark batches acknowledged; :meth:`run_acks` (or :meth:`flush_acks`) deletes them."""
        fresh = [i for i in ids if i not in self._acked_ids]
        if not fresh:
            return
        self._acks.extend(fresh)
        self._acked_ids.update(fresh)
        self.acked += len(fresh)
        if len(self._acked_ids) >= self._count:
            self.empty.set()
        self._ack_wake.set()

    async def flush_acks(self) -> None:
        """Delete every acknowledged batch now, in one transaction."""
        if not self._acks:
            return
        ids, self._acks = self._acks, []
        await self._call(self._ack_sync, ids)
        if self._tail:  # deleted now, and no longer in _acked_ids: never hand them out again
            gone = set(ids)
            self._tail = deque(r for r in self._tail if r.id not in gone)

    async def run_acks(self, interval_s: float = 0.05) -> None:
        """Group acknowledgements: delete what arrived every ``interval_s``. Cancel to stop."""
        while True:
            self._ack_wake.clear()
            await self._ack_wake.wait()
            await asyncio.sleep(interval_s)
            await self.flush_acks()

    def _ack_sync(self, ids: list[int]) -> None:
        assert self._db is not None
        db = self._db
        db.execute("PRAGMA synchronous=OFF")  # the next append's fsync carries it
        try:
            db.execute("BEGIN IMMEDIATE")
            freed = 0
            gone = 0
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                marks = ",".join("?" * len(chunk))
                row = db.execute(
                    f"SELECT count(*), coalesce(sum(length(data)), 0) FROM batches "
                    f"WHERE id IN ({marks})",
                    chunk,
                ).fetchone()
                db.execute(f"DELETE FROM batches WHERE id IN ({marks})", chunk)
                gone += int(row[0])
                freed += int(row[1])
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            # not fatal: the batches stay and are sent again later (the hub drops duplicates)
            log.warning("spool %s: could not delete acknowledged batches (%s)", self.path, exc)
            self._acked_ids.difference_update(ids)
            return
        finally:
            db.execute(f"PRAGMA synchronous={_SYNC[self._durability]}")
        self._count -= gone
        self._bytes -= freed
        self._acked_ids.difference_update(ids)

    # -- gap rows ---------------------------------------------------------------

    async def gaps(self, limit: int = 256) -> list[tuple[int, GapRange]]:
        """Gap rows not yet acknowledged by the broker, oldest first, with their row ids."""
        rows: list[tuple[int, GapRange]] = await self._call(self._gaps_sync, limit)
        return rows

    def _gaps_sync(self, limit: int) -> list[tuple[int, GapRange]]:
        assert self._db is not None
        out = [(-1, g) for g in self._lost_gaps[:limit]]  # row id -1: only in memory
        for rid, e, f, last, n, reason in self._db.execute(
            "SELECT id, epoch, first, last, readings, reason FROM gaps ORDER BY id LIMIT ?",
            (limit,),
        ):
            out.append((int(rid), GapRange(int(e), int(f), int(last), int(n), str(reason))))
        return out[:limit]

    async def gaps_sent(self, ids: Sequence[int]) -> None:
        """Delete gap rows whose notice the broker has acknowledged."""
        await self._call(self._gaps_sent_sync, list(ids))

    def _gaps_sent_sync(self, ids: list[int]) -> None:
        assert self._db is not None
        if -1 in ids:
            self._lost_gaps.clear()
        real = [i for i in ids if i >= 0]
        if real:
            marks = ",".join("?" * len(real))
            self._db.execute(f"DELETE FROM gaps WHERE id IN ({marks})", real)
        self._has_gaps = (
            bool(self._lost_gaps)
            or self._db.execute("SELECT 1 FROM gaps LIMIT 1").fetchone() is not None
        )

    # -- reads ----------------------------------------------------------------

    @property
    def has_gaps(self) -> bool:
        """Gap rows wait for their notice to be acknowledged."""
        return self._has_gaps

    @property
    def last_id(self) -> int:
        """Id of the newest batch ever appended (0 for none)."""
        return self._last_id

    async def pending(
        self, after_id: int, limit: int, *, upto_id: int | None = None
    ) -> list[SpoolRow]:
        """Up to ``limit`` unacknowledged batches with ``after_id < id <= upto_id``, oldest first.

        The uplink's live reads (no ``upto_id``, just after an append) come from
        the rows this process appended last, without a trip to the spool thread.
        """
        tail = self._tail
        if upto_id is None and tail and tail[0].id <= after_id + 1:
            while tail and tail[0].id <= after_id:
                tail.popleft()  # read by the live reader already
            acked = self._acked_ids
            out: list[SpoolRow] = []
            for r in tail:
                if len(out) == limit:
                    break
                if r.id not in acked:
                    out.append(r)
            return out
        rows: list[tuple[int, int, int, int, bytes]] = await self._call(
            self._pending_sync, after_id, limit, upto_id
        )
        return [SpoolRow(*r) for r in rows if r[0] not in self._acked_ids]

    def _pending_sync(
        self, after_id: int, limit: int, upto_id: int | None
    ) -> list[tuple[int, int, int, int, bytes]]:
        assert self._db is not None
        if upto_id is None:
            upto_id = 2**63 - 1
        return self._db.execute(
            "SELECT id, epoch, seq, n, data FROM batches WHERE id > ? AND id <= ? "
            "ORDER BY id LIMIT ?",
            (after_id, upto_id, limit),
        ).fetchall()

    async def totals(self) -> dict[str, int]:
        """The persistent counters (over every run): dropped_batches, moved_aside..."""
        rows: list[tuple[str, int]] = await self._call(
            lambda: (
                self._db.execute("SELECT name, value FROM counters").fetchall() if self._db else []
            )
        )
        return {str(k): int(v) for k, v in rows}

    def statistics(self) -> dict[str, int]:
        return {
            "depth_batches": self._count - len(self._acked_ids),
            "depth_bytes": self._bytes,
            "appended": self.appended,
            "acked": self.acked,
            "dropped_batches": self.dropped_batches,
            "dropped_readings": self.dropped_readings,
            "dropped_disk_full": self.dropped_full,
            "moved_aside": self.moved_aside,
        }

    async def close(self) -> None:
        """Delete what was acknowledged, checkpoint, close."""
        self._tail.clear()
        if self._db is not None:
            await self.flush_acks()

        def _close() -> None:
            if self._db is not None:
                try:
                    self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:
                    log.warning("spool %s: checkpoint at close failed (%s)", self.path, exc)
                self._db.close()
                self._db = None

        await self._call(_close)
        self._exec.shutdown(wait=True)
