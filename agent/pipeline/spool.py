"""The spool: every sealed batch on disk until the hub has confirmed it.

SQLite in WAL mode, one row per batch; :meth:`Spool.keep` takes the batcher's
sealed batches off their channel. The spool is the single source of truth
for delivery: a batch is appended (and, with durability ``full``, fsynced)
before it counts as spooled, and deleted only after the hub's signed receipt
covers it (:meth:`Spool.confirm`; the PUBACK only marks it sent,
:meth:`Spool.mark_sent`), or, on a gateway that does not know the hub's key,
after its PUBACK (:meth:`Spool.ack`). Sent batches with no receipt in time
are found by :meth:`Spool.overdue` and queued again (:meth:`Spool.send_again`,
or :meth:`Spool.resend` when the hub asks). The uplink learns that there is
something to send from :attr:`Spool.news`, a one-token channel only the spool
sends on (:class:`agent.pipeline.channel.Notify`), and reads the rest itself (pending
batches, :meth:`Spool.due`, :attr:`Spool.has_gaps`). All SQLite calls run on one
dedicated thread so the event loop never blocks on disk.

Durability policies (``[spool] durability``):
- ``full``: ``synchronous=FULL``; a batch reported as spooled survives a power cut.
- ``normal``: ``synchronous=NORMAL``; survives a crash of the agent (kill -9),
  a power cut may lose the last transactions (never corrupts).
- ``off``: ``synchronous=OFF``; for tests and RAM disks.

Acknowledgements are grouped (:meth:`Spool.ack` queues, :meth:`Spool.run_acks`
deletes every ``ack_interval_s`` in one transaction) and committed without an
fsync of their own: the next append's fsync carries them. A lost delete only
means the batch is sent again after a restart, and the hub drops the duplicate.

The spool is bounded by ``max_bytes``, what its files take on disk (the
database, its WAL and shared-memory index, and the reserve below), and by
``max_age_s``. The WAL is checkpointed every ``wal limit`` (1/16 of the bound,
64 KiB to 1 MiB) and kept to that size, and deletes leave no zeroed pages
behind them (``secure_delete=OFF``), so the files track the data. Before each
append the pages the batches need are compared with the bound and with the
room left on the file system; when either is short, the oldest batches are
deleted in the same transaction, so their pages are reused and the file does
not grow. Every drop is counted and written, in that transaction, as a gap row
naming the (epoch, seq) range, which the uplink turns into a signed gap notice
for the hub (:mod:`protocols.gap`) and deletes once that is acknowledged.

A full disk (``SQLITE_FULL``/``ENOSPC``) at any step never stops the agent.
Freeing space in SQLite needs space (a delete is written to the WAL, a
checkpoint may extend the database), so the spool keeps a *reserve*: a file
of ``wal limit + 64 KiB`` allocated beside the database while there is room
(``spool.sqlite3-reserve``). On ``ENOSPC`` it deletes the reserve and
checkpoints (so the WAL starts again in the blocks it has) and tries again;
next it drops the oldest batches in a transaction of their own and tries again;
a batch that still does not fit is counted as dropped and named in a gap
notice (kept in memory if even the gap row cannot be written). On a tight
disk, pages that are only in the WAL are checkpointed right after each commit,
while the room kept for them is there. The reserve is allocated again once the
file system has room. One WARNING line says the disk is full, one INFO line
that it has room again. A spool on a full disk opens without needing a byte
(the WAL index then lives in the process's memory: ``locking_mode=EXCLUSIVE``).
Why a reserve and not the alternatives: ``docs/decisions.md`` 21.

The same file holds the edge events' outbox (table ``events``: :meth:`Spool.event_put`,
:meth:`Spool.event_delete`, :meth:`Spool.events_held`; docs/events.md), written on
the same thread under the same durability and disk-full rules.

A spool file that SQLite cannot open or whose ``quick_check`` fails is moved
aside (``spool.sqlite3.damaged-<time>``) with an error line, counted, and a
fresh spool is started.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from agent.pipeline.channel import Channel, Notify
from protocols.errors import LocalError
from protocols.gap import GapRange, GapReason

if TYPE_CHECKING:  # the batcher sends, the spool takes: no import at run time
    from agent.pipeline.batcher import Sealed

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
    data    BLOB    NOT NULL,
    sent    REAL             -- when the broker acknowledged it (receipts on); NULL: not yet
);
CREATE INDEX IF NOT EXISTS batches_seq ON batches (epoch, seq);
CREATE TABLE IF NOT EXISTS gaps (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    epoch    INTEGER NOT NULL,
    first    INTEGER NOT NULL,
    last     INTEGER NOT NULL,
    readings INTEGER NOT NULL,
    reason   TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (     -- the edge events' outbox (agent.rules.EdgeEvents)
    epoch   INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    data    BLOB    NOT NULL,           -- the sealed vitals/event/v1 message
    PRIMARY KEY (epoch, seq)
);
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
_PAGE = 4096
_SHM = 32 << 10  # the WAL index (-shm) of a WAL under ~4,000 frames
_ROW_OVERHEAD = 64  # a row's cell header, pointer and columns besides its data, generously
# Left free on the file system for the status file, the epoch and the WAL index.
_MARGIN = 64 << 10
_RESERVE_EXTRA = 64 << 10  # the reserve: the WAL limit (a checkpoint's growth) and this


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
    """The file system is full (SQLite's SQLITE_FULL, or ENOSPC, or an -shm it cannot grow)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and (code & 0xFF == sqlite3.SQLITE_FULL or code == _IOERR_SHMSIZE):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "full" in str(exc).lower()


_IOERR_SHMSIZE = sqlite3.SQLITE_IOERR | (19 << 8)


def _fs_free(path: Path | str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512  # what it takes, not what it says (sparse files)
    except FileNotFoundError:
        return 0


def _data_bytes(size: int) -> int:
    """What a row with ``size`` bytes of data takes in the database's pages.

    SQLite keeps up to 4,061 bytes of a row in its leaf page; a larger one keeps
    ``local`` bytes there and the rest in whole overflow pages of 4,092 bytes.
    """
    if size <= 4061:
        return size + _ROW_OVERHEAD
    local = 489 + (size - 489) % 4092
    if local > 4061:
        local = 489
    return -(-(size - local) // 4092) * _PAGE + local + _ROW_OVERHEAD


def _row_bytes(rows: Sequence[Row]) -> tuple[int, int]:
    """What appending ``rows`` takes, generously: in the database, their pages; in
    the WAL, those with a 24-byte header each and the pages a transaction also
    rewrites (the table's interior and last leaf, the header, the sequence; and when
    it drops batches, their leaves, the free list, the gap rows and the counters)."""
    pages = sum(_data_bytes(len(r[4])) for r in rows)
    return pages, pages + pages // 170 + 12 * _PAGE


def _ranges(rows: Sequence[tuple[int, int, int]], reason: GapReason) -> list[GapRange]:
    """(epoch, seq, n) rows, in id order, as contiguous per-epoch ranges."""
    out: list[GapRange] = []
    for epoch, seq, n in sorted(rows):
        last = out[-1] if out else None
        if last is not None and last.epoch == epoch and last.last + 1 == seq:
            out[-1] = GapRange(epoch, last.first, seq, last.readings + n, reason)
        else:
            out.append(GapRange(epoch, seq, seq, n, reason))
    return out


@dataclass(slots=True)
class _Dropped:
    """Rows deleted inside a transaction: applied to the counters once it commits."""

    ids: list[int]
    freed: int  # their data bytes
    readings: int
    ranges: list[GapRange]
    reason: GapReason


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
        # receipts on: id -> when its last publish was acknowledged or sent again
        # (monotonic; the dict is in that order, oldest first), until a receipt deletes it
        self._sent: dict[int, float] = {}
        self._sent_new: list[int] = []  # acknowledged, not yet marked in the file
        self._tries: dict[int, int] = {}  # id -> times published again without a receipt
        self._gone: list[int] = []  # deleted by the spool thread: out of _sent on the loop
        self._next_age_check = 0.0
        self._lost_gaps: list[GapRange] = []  # could not even be written (disk full)
        self._lost_sent = 0  # the first of _lost_gaps in a notice on its way
        self._gaps_done: set[int] = set()
        self._gaps_handed = 0  # the newest gap row in a notice on its way  # gap rows acknowledged, delete not yet committed
        self._has_gaps = False
        # the newest rows, contiguous ids: pending() serves live reads from here
        self._tail: deque[SpoolRow] = deque()
        self._deletes = 0  # bumped by the spool thread whenever batches are dropped
        # on-disk accounting (set at open from the bound and the file system)
        self._reserve = Path(f"{path}-reserve")
        self._reserve_size = 0
        self._reserve_held = False
        self._wal_limit = 0
        self._dir = str(path.parent)
        self._free = 0  # the file system's free bytes when last looked at, and when next
        self._free_next = 0.0
        self._used = 0  # bytes of database pages in use (measured, plus estimates since)
        self._pages = 0  # bytes of database pages, in use or free (when last measured)
        self._unwritten = False  # on a tight disk: pages in the WAL past the file's end
        self._limit = 0  # what the pages may hold: the smaller of the bound and the disk's room
        self._dropping: dict[str, int] = {}  # reason -> batches dropped since its WARNING line
        self.exclusive = False  # opened without a shared WAL index (the disk was full)
        self.disk_full = False
        self.disk_full_events = 0
        self.appended = 0
        self.acked = 0
        self.dropped_batches = 0
        self.dropped_readings = 0
        self.dropped_full = 0
        self.dropped_by_reason: dict[str, int] = {}
        self.lost_batches = 0  # never stored: not even an empty spool had room
        self.sent = 0  # receipts on: PUBACKs (a batch sent again counts again)
        self.confirmed = 0  # batches a hub receipt deleted
        self.confirmed_readings = 0
        self.refused_by_hub = 0  # batches a hub receipt of kind "refused" deleted (settled)
        self.republished = 0  # batches sent again: no receipt in time, or the hub asked
        self.split_batches = 0  # batches re-sealed as smaller ones (they could not pass)
        self.last_confirmed_id = 0  # the newest batch a receipt deleted
        self.moved_aside = 0
        #: to the uplink, its only receiver: something to send (batches appended, gap
        #: rows written, batches due again); tokens coalesce, nobody else touches it
        self.news = Notify()
        self._due: deque[int] = deque()  # ids to hand out again, oldest first
        self.empty = asyncio.Event()  # set while nothing waits for a PUBACK (or a receipt)
        #: to the stop's drain (agent.service), its only receiver: what waits for the
        #: broker or the hub changed (batches added, acknowledged, marked sent,
        #: confirmed, dropped, split); tokens coalesce, nobody else touches it
        self.progress = Notify()
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

        ``max_bytes`` bounds the spool's files on disk. ``max_page_count``
        caps the SQLite file (pages of 4 KiB), for tests of SQLite's own
        ``SQLITE_FULL``; the real full disk is tested on a small tmpfs.
        """
        if durability not in _SYNC:
            raise SpoolError(f"unknown durability {durability!r}: use full, normal or off")
        spool = cls(path, durability, max_bytes, max_age_s, max_page_count)
        await spool._call(spool._open_sync)
        spool._held_changed()
        spool.news.send()  # what it holds from before, gap rows too
        return spool

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._exec, fn, *args)

    # -- opening ----------------------------------------------------------------

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        st = os.statvfs(self.path.parent)
        base = min(self._max_bytes, st.f_blocks * st.f_frsize)
        self._wal_limit = max(64 << 10, min(1 << 20, base // 16)) // _PAGE * _PAGE
        self._reserve_size = self._wal_limit + _RESERVE_EXTRA
        self._reserve_held = _size(self._reserve) >= self._reserve_size
        try:
            self._open_db()
        except sqlite3.DatabaseError as exc:
            if self._db is not None:
                self._db.close()
                self._db = None
            if self._full_now(exc):  # not damage: never move a sound spool aside for that
                raise SpoolError(
                    f"spool {self.path}: cannot open it, the disk is full ({exc}); "
                    f"free some space under {self.path.parent}"
                ) from exc
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
            self._open_db()
            self._bump_sync({"moved_aside": 1})
        self._measure_sync()
        self._arm_reserve_sync()

    def _open_db(self) -> None:
        """Connect and load; on a full disk with the reserve spent, without an -shm file."""
        try:
            self._db = self._connect()
            self._load()
            return
        except sqlite3.DatabaseError as exc:
            if not self._full_now(exc):
                raise
            if self._db is not None:
                self._db.close()
                self._db = None
            self._disk_full_sync(f"no room to open it: {exc}")
            self._release_reserve_sync()
        try:
            self._db = self._connect()
            self._load()
            return
        except sqlite3.DatabaseError as exc:
            if not self._full_now(exc):
                raise
            if self._db is not None:
                self._db.close()
                self._db = None
        # no room even for the WAL index: keep it in memory (no other process can read)
        self.exclusive = True
        self._db = self._connect()
        self._load()
        log.warning(
            "spool %s: opened without a shared WAL index (the disk is full); "
            "`vitals status` cannot show the spool's oldest batch until a restart",
            self.path,
        )

    def _full_now(self, exc: BaseException) -> bool:
        """A failure at open caused by a full disk (some show only as an I/O error)."""
        return _is_full(exc) or _fs_free(self.path.parent) < _MARGIN

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            if self.exclusive:
                db.execute("PRAGMA locking_mode=EXCLUSIVE")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={_SYNC[self._durability]}")
            # batches are written once and read once, in order: SQLite's default 2 MB
            # page cache would only hold pages that are never read again
            db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
            # a delete must not write zeroed pages: on a full disk that is room it has not got
            db.execute("PRAGMA secure_delete=OFF")
            db.execute(f"PRAGMA wal_autocheckpoint={self._wal_limit // _PAGE}")
            db.execute(f"PRAGMA journal_size_limit={self._wal_limit}")
            ok = db.execute("PRAGMA quick_check").fetchone()
            if ok is None or ok[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {ok[0] if ok else 'no answer'}")
            db.executescript(_SCHEMA)
            if not any(r[1] == "sent" for r in db.execute("PRAGMA table_info(batches)")):
                # a spool written before receipts: its backlog stays, as not yet sent
                db.execute("ALTER TABLE batches ADD COLUMN sent REAL")
                log.info("spool %s: upgraded for hub receipts (its batches are kept)", self.path)
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
        # sent in an earlier run, no receipt yet: the receipt (or the timeout) starts now
        now = time.monotonic()
        self._sent = {
            int(r[0]): now
            for r in self._db.execute("SELECT id FROM batches WHERE sent IS NOT NULL ORDER BY id")
        }
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

    # -- the disk ---------------------------------------------------------------

    def _measure_sync(self) -> int:
        """Bytes of database pages in use, from SQLite (cheap: two header reads)."""
        assert self._db is not None
        db = self._db
        pages = int(db.execute("PRAGMA page_count").fetchone()[0])
        free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
        self._pages = pages * _PAGE
        self._used = (pages - free) * _PAGE
        return self._used

    def disk_bytes(self) -> int:
        """What the spool's files take on disk: database, WAL, WAL index and reserve."""
        return sum(_size(Path(f"{self.path}{s}")) for s in ("", "-wal", "-shm", "-reserve"))

    def _limit_sync(self, txn: int) -> tuple[int, GapReason]:
        """The most the database's pages may hold after a transaction of ``txn`` WAL
        bytes, and what sets it: ``spool_full`` (``max_bytes``) or ``disk_full`` (the
        file system)."""
        # beside the pages: a WAL of up to its limit plus this transaction, its index, the reserve
        wal = self._wal_limit + txn
        limit = self._max_bytes - wal - _SHM - self._reserve_size
        reason: GapReason = "spool_full"
        now = time.monotonic()
        free = self._free
        if now >= self._free_next or free < self._max_bytes + _MARGIN + wal:
            # a roomy disk is looked at once a second (1.5 µs a look: the fast path)
            free = self._free = _fs_free(self._dir)
            self._free_next = now + 1.0
        if free < self._max_bytes + _MARGIN:  # the disk may be tighter: look closer
            # The database may grow only into room the file system has beyond a margin
            # (and the reserve, to allocate it again), what the WAL still needs and what
            # the next checkpoint needs (pages in the WAL past the file's end); past
            # that, batches go into pages that dropping the oldest frees. Dropping never
            # gives the file system room (the file does not shrink), so it only does so
            # for the pages the new batches need.
            self._measure_sync()  # exactly: a page is not freed until all its rows are
            pages = self._pages
            on_disk = _size(self.path)
            self._unwritten = pages > on_disk  # checkpointed right after this commit
            wal_grows = max(0, wal - _size(Path(f"{self.path}-wal")))
            keep_free = _MARGIN + (0 if self._reserve_held else self._reserve_size)
            keep_free += wal_grows + max(0, pages - on_disk)
            room = max(pages, on_disk) + max(0, free - keep_free)
            if room < limit:
                limit, reason = room, "disk_full"
        self._limit = limit
        return limit, reason

    def _disk_full_sync(self, why: str) -> None:
        if not self.disk_full:
            self.disk_full = True
            self.disk_full_events += 1
            log.warning(
                "spool %s: the disk is full (%s; %d bytes free); dropping the oldest batches "
                "to make room for new ones: they are counted and named to the hub in a gap "
                "notice; polling goes on",
                self.path,
                why,
                _fs_free(self.path.parent),
            )

    def _room_again_sync(self) -> None:
        if self._used > self._limit // 2:
            return
        self._dropping.clear()  # the next drop has a WARNING line again
        if self.disk_full and self._reserve_held:
            self.disk_full = False
            log.info(
                "spool %s: the disk has room again (%d batches dropped for room so far)",
                self.path,
                self.dropped_full,
            )

    def _release_reserve_sync(self) -> bool:
        """Delete the reserve file: its room is what a drop and a checkpoint need."""
        if not self._reserve_held and not self._reserve.exists():
            return False
        self._reserve.unlink(missing_ok=True)
        self._reserve_held = False
        log.debug("spool %s: released the reserve (%d bytes)", self.path, self._reserve_size)
        return True

    def _arm_reserve_sync(self) -> None:
        """Allocate the reserve file again if the file system has room for it."""
        if self._reserve_held or _fs_free(self.path.parent) < self._reserve_size + _MARGIN:
            return
        try:
            fd = os.open(self._reserve, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self._reserve_size)
            finally:
                os.close(fd)
        except OSError as exc:
            self._reserve.unlink(missing_ok=True)
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                log.warning("spool %s: cannot allocate the reserve (%s)", self.path, exc)
            return
        self._reserve_held = True

    def _checkpoint_sync(self, mode: str = "RESTART") -> None:
        """Copy the WAL into the database. ``RESTART``: the next transaction writes the
        WAL from its start, in blocks it has already (a full disk has no others);
        ``TRUNCATE``: the WAL gives its blocks back to the file system."""
        assert self._db is not None
        try:
            self._db.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
        except sqlite3.Error as exc:
            log.debug("spool %s: checkpoint %s: %s", self.path, mode, exc)
            if not _is_full(exc):
                raise SpoolError(f"spool {self.path}: cannot checkpoint ({exc})") from exc

    def _make_room_sync(self, need: int, why: BaseException, *, drop: bool = True) -> bool:
        """After ENOSPC: make room, a step at a time; False when nothing is left to free.

        First the reserve goes; next time the oldest batches, in a transaction of
        their own (smaller than the one that failed), so the retry reuses their pages.
        Each step ends with a checkpoint that lets the WAL start again in its own blocks.
        """
        self._disk_full_sync(str(why))
        log.debug(
            "spool %s: %s; %d bytes free, files %s",
            self.path,
            why,
            _fs_free(self.path.parent),
            [_size(Path(f"{self.path}{s}")) for s in ("", "-wal", "-shm", "-reserve")],
        )
        progress = self._release_reserve_sync()
        self._checkpoint_sync()
        if self._count and drop and not progress:
            try:
                progress = self._drop_oldest_sync(need, "disk_full", keep=0) > 0 or progress
            except sqlite3.Error as exc:
                if not _is_full(exc):
                    raise SpoolError(f"spool {self.path}: cannot drop batches ({exc})") from exc
            self._checkpoint_sync()
        self._measure_sync()
        return progress

    # -- writes ---------------------------------------------------------------

    async def keep(self, sealed: Channel[Sealed], limit: int = 64) -> None:
        """Spool every batch the batcher seals (:attr:`Batcher.sealed
        <agent.pipeline.batcher.Batcher.sealed>`) until it closes the channel and
        all is spooled. Group commit: what waits (up to ``limit``) goes in one
        append, one fsync."""
        while items := await sealed.receive(limit):
            stored = await self.append([(s.epoch, s.seq, s.n, s.t0, s.data) for s in items])
            if log.isEnabledFor(logging.DEBUG):
                # the crash tests' record of what was reported as spooled
                for epoch, seq, n, t0, _ in stored:
                    log.debug("spooled epoch=%d seq=%d n=%d t0=%d", epoch, seq, n, t0)

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
        self._held_changed()
        if stored or self._has_gaps:
            self.news.send()
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
                need = max(int(self._bytes * _FULL_FREE_SHARE), _row_bytes(todo)[0])
                if self._make_room_sync(need, exc):
                    continue
                # nothing left to make room with: give up on the oldest new one
                lost, todo = todo[0], todo[1:]
                self._lost_sync([(lost[0], lost[1], lost[2])], "disk_full")
        if todo:
            if self._unwritten:
                # while the file system still has the room kept for it (a full disk
                # later could leave the WAL unable to restart)
                self._checkpoint_sync("PASSIVE")
                self._unwritten = False
            self._arm_reserve_sync()
            self._room_again_sync()
        return todo, self._last_id  # the rows just stored: last_id - len(todo) + 1 ...

    def _insert_sync(self, batches: list[Row], now: float) -> None:
        """One transaction: drop what the bound or the disk needs, then insert."""
        assert self._db is not None
        db = self._db
        incoming, txn = _row_bytes(batches)
        dropped: list[_Dropped] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            limit, reason = self._limit_sync(txn)
            if self._used + incoming > limit and self._measure_sync() + incoming > limit:
                # delete first: the insert reuses their pages and the file does not grow
                cut = self._oldest_cut_sync(self._used + incoming - limit)
                d = self._delete_rows_sync("id <= ?", cut, reason)
                if d is not None:
                    dropped.append(d)
            db.executemany(
                "INSERT INTO batches (epoch, seq, n, t0, created, data) VALUES (?, ?, ?, ?, ?, ?)",
                [(e, s, n, t0, now, d) for e, s, n, t0, d in batches],
            )
            last_id = int(db.execute("SELECT max(id) FROM batches").fetchone()[0])
            if incoming > limit:  # more than the bound at once: keep the newest that fit
                self._count += len(batches)
                try:
                    limit, reason = self._limit_sync(0)
                    cut = self._oldest_cut_sync(self._measure_sync() - limit, keep=1)
                finally:
                    self._count -= len(batches)
                d = self._delete_rows_sync("id <= ?", cut, reason)
                if d is not None:
                    dropped.append(d)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._last_id = last_id
        for d in dropped:
            if d.reason == "disk_full":
                self._disk_full_sync("no room for the next batches")
            self._dropped_sync(d)
        self._count += len(batches)
        self._bytes += sum(len(b[4]) for b in batches)
        if dropped:
            self._measure_sync()  # exactly: a page is not freed until all its rows are
        else:
            self._used += incoming

    def _oldest_cut_sync(self, need: int, keep: int = 0) -> int:
        """The id up to which the oldest batches hold ``need`` bytes (keeping ``keep`` newest)."""
        assert self._db is not None
        total, cut = 0, 0
        if need <= 0:
            return 0
        for rid, size in self._db.execute(
            "SELECT id, length(data) FROM batches ORDER BY id LIMIT ?", (self._count - keep,)
        ):
            total += _data_bytes(int(size))
            cut = int(rid)
            if total >= need:
                break
        return cut

    def _delete_rows_sync(self, where: str, arg: Any, reason: GapReason) -> _Dropped | None:
        """Delete the batches matching ``where`` and write their gap rows and counters,
        inside the caller's transaction; :meth:`_dropped_sync` once it commits."""
        assert self._db is not None
        db = self._db
        rows = db.execute(
            f"SELECT id, epoch, seq, n, length(data) FROM batches WHERE {where} ORDER BY id",
            (arg,),
        ).fetchall()
        if not rows:
            return None
        db.execute(f"DELETE FROM batches WHERE {where}", (arg,))
        d = _Dropped(
            ids=[int(r[0]) for r in rows],
            freed=sum(int(r[4]) for r in rows),
            readings=sum(int(r[3]) for r in rows),
            ranges=_ranges([(int(r[1]), int(r[2]), int(r[3])) for r in rows], reason),
            reason=reason,
        )
        ranges = d.ranges
        # a drop that continues the last gap row extends it (one row per outage, not one
        # per append), unless that row is in a notice on its way
        last = db.execute(
            "SELECT id, epoch, last, reason FROM gaps ORDER BY id DESC LIMIT 1"
        ).fetchone()
        g = ranges[0]
        if (
            last is not None
            and int(last[0]) > self._gaps_handed
            and (int(last[1]), int(last[2]) + 1, str(last[3])) == (g.epoch, g.first, g.reason)
        ):
            db.execute(
                "UPDATE gaps SET last = ?, readings = readings + ? WHERE id = ?",
                (g.last, g.readings, int(last[0])),
            )
            ranges = ranges[1:]
        db.executemany(
            "INSERT INTO gaps (epoch, first, last, readings, reason) VALUES (?, ?, ?, ?, ?)",
            [(g.epoch, g.first, g.last, g.readings, g.reason) for g in ranges],
        )
        self._bump_sync({"dropped_batches": len(d.ids), "dropped_readings": d.readings})
        return d

    def _dropped_sync(self, d: _Dropped) -> None:
        """Account for rows whose delete has committed."""
        self._deletes += 1
        self._gone.extend(d.ids)
        acked_now = self._acked_ids.intersection(d.ids)
        # acknowledged in memory but not yet deleted: delivered, not dropped
        self._count -= len(d.ids)
        self._bytes -= d.freed
        self._used -= d.freed + _ROW_OVERHEAD * len(d.ids)
        self.dropped_batches += len(d.ids) - len(acked_now)
        self.dropped_readings += d.readings
        if d.reason == "disk_full":
            self.dropped_full += len(d.ids)
        self.dropped_by_reason[d.reason] = self.dropped_by_reason.get(d.reason, 0) + len(d.ids)
        self._acked_ids.difference_update(acked_now)
        self._has_gaps = True
        first = d.reason not in self._dropping and d.reason != "disk_full"
        self._dropping[d.reason] = self._dropping.get(d.reason, 0) + len(d.ids)
        for g in d.ranges:
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "spool: dropped epoch %d seq %d..%d (%d readings): %s%s",
                g.epoch,
                g.first,
                g.last,
                g.readings,
                g.reason,
                "" if d.reason == "too_old" or not first else " (further drops: debug lines)",
            )
        if d.reason == "too_old":
            self._dropping.pop(d.reason)  # a line each time (at most every 30 s)

    def _delete_sync(self, where: str, arg: Any, reason: GapReason) -> int:
        """Delete the batches matching ``where`` in a transaction of its own, writing
        their gap rows; returns the bytes freed."""
        assert self._db is not None
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            d = self._delete_rows_sync(where, arg, reason)
            if d is None:
                db.execute("ROLLBACK")
                return 0
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._dropped_sync(d)
        return d.freed

    def _drop_oldest_sync(self, need_bytes: int, reason: GapReason, keep: int = 1) -> int:
        """Drop the oldest batches until ``need_bytes`` are freed (keeps ``keep`` newest)."""
        cut = self._oldest_cut_sync(need_bytes, keep)
        return self._delete_sync("id <= ?", cut, reason) if cut else 0

    def _drop_old_sync(self, now: float) -> None:
        try:
            self._delete_sync("created < ?", now - self._max_age_s, "too_old")
        except sqlite3.Error as exc:
            if not _is_full(exc):
                raise SpoolError(f"spool {self.path}: cannot drop old batches ({exc})") from exc
            self._make_room_sync(0, exc)  # and next time

    async def expire(self) -> None:
        """Drop the batches older than ``max_age_s`` now (appends also do it, at most
        every 30 s)."""
        deletes = self._deletes
        await self._call(self._drop_old_sync, time.time())
        if self._deletes != deletes:
            self._tail.clear()
        if self._has_gaps:
            self.news.send()
        self._held_changed()

    def _lost_sync(self, rows: list[tuple[int, int, int]], reason: GapReason) -> None:
        """Batches that never made it into the spool: a gap row, or in memory if even that fails."""
        assert self._db is not None
        ranges = _ranges(rows, reason)
        self.dropped_batches += len(rows)
        self.dropped_readings += sum(r[2] for r in rows)
        self.dropped_full += len(rows)
        self.lost_batches += len(rows)
        try:
            self._db.executemany(
                "INSERT INTO gaps (epoch, first, last, readings, reason) VALUES (?, ?, ?, ?, ?)",
                [(g.epoch, g.first, g.last, g.readings, g.reason) for g in ranges],
            )
            self._has_gaps = True
        except sqlite3.Error:
            for g in ranges:  # one range per run of consecutive batches, however long
                last = self._lost_gaps[-1] if len(self._lost_gaps) > self._lost_sent else None
                if last and last.epoch == g.epoch and last.last + 1 == g.first:
                    self._lost_gaps[-1] = GapRange(
                        g.epoch, last.first, g.last, last.readings + g.readings, g.reason
                    )
                else:
                    self._lost_gaps.append(g)
        first = "lost" not in self._dropping
        self._dropping["lost"] = self._dropping.get("lost", 0) + len(rows)
        log.log(
            logging.ERROR if first else logging.DEBUG,
            "spool %s: the disk is full and has no room even to drop the oldest batches: "
            "batch(es) %s not spooled%s",
            self.path,
            ", ".join(f"{g.epoch}:{g.first}..{g.last}" for g in ranges),
            " (counted; further ones: debug lines)" if first else "",
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
        self._held_changed()
        self._ack_wake.set()

    async def flush_acks(self) -> None:
        """Delete every acknowledged batch now, in one transaction (receipts on: mark
        the acknowledged ones sent)."""
        if self._sent_new:
            ids, self._sent_new = self._sent_new, []
            missing = await self._call(self._sent_sync, ids, time.time())
            self._gone.extend(missing)
            self._purge()
        if not self._acks:
            return
        ids, self._acks = self._acks, []
        if not await self._call(self._ack_sync, ids):
            self._acks.extend(ids)  # the disk is full: deleted at a later flush
        if self._tail:  # deleted now, and no longer in _acked_ids: never hand them out again
            gone = set(ids)
            self._tail = deque(r for r in self._tail if r.id not in gone)
        self._held_changed()  # a delete that failed leaves them to send again

    def _sent_sync(self, ids: list[int], now: float) -> list[int]:
        """Mark batches sent in the file; the ids no longer in it (confirmed, dropped)."""
        assert self._db is not None
        db = self._db
        found: set[int] = set()
        db.execute("PRAGMA synchronous=OFF")  # like a delete: a lost mark only sends it again
        try:
            db.execute("BEGIN IMMEDIATE")
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                marks = ",".join("?" * len(chunk))
                found.update(
                    int(r[0])
                    for r in db.execute(
                        f"UPDATE batches SET sent = ? WHERE id IN ({marks}) RETURNING id",
                        (now, *chunk),
                    )
                )
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            # harmless: they stay marked in memory; after a restart they are sent again
            log.debug("spool %s: could not mark batches sent (%s)", self.path, exc)
            return []
        finally:
            db.execute(f"PRAGMA synchronous={_SYNC[self._durability]}")
        return [i for i in ids if i not in found]

    async def run_acks(self, interval_s: float = 0.05) -> None:
        """Group acknowledgements: delete what arrived every ``interval_s``. Cancel to stop."""
        while True:
            self._ack_wake.clear()
            await self._ack_wake.wait()
            await asyncio.sleep(interval_s)
            await self.flush_acks()

    def _ack_sync(self, ids: list[int]) -> bool:
        """Delete acknowledged batches; False if the disk is too full to (they stay acked)."""
        try:
            self._ack_once_sync(ids)
        except sqlite3.Error as exc:
            if not _is_full(exc):
                # not fatal: the batches stay and are sent again later (the hub drops duplicates)
                log.warning("spool %s: could not delete acknowledged batches (%s)", self.path, exc)
                self._acked_ids.difference_update(ids)
                return True
            self._make_room_sync(0, exc, drop=False)
            try:
                self._ack_once_sync(ids)
            except sqlite3.Error as again:
                if not _is_full(again):
                    raise SpoolError(f"spool {self.path}: cannot delete ({again})") from again
                return False
        return True

    def _ack_once_sync(self, ids: list[int]) -> None:
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
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.execute(f"PRAGMA synchronous={_SYNC[self._durability]}")
        self._count -= gone
        self._bytes -= freed
        self._used -= freed + _ROW_OVERHEAD * gone
        self._acked_ids.difference_update(ids)

    # -- receipts ---------------------------------------------------------------

    def mark_sent(self, ids: Sequence[int]) -> None:
        """Receipts on: the broker acknowledged these; they stay until a receipt covers them."""
        self._purge()
        now = time.monotonic()
        sent = self._sent
        for i in ids:
            sent.pop(i, None)  # sent again: to the end, in time order
            sent[i] = now
        self._sent_new.extend(ids)
        self.sent += len(ids)
        self.progress.send()
        self._ack_wake.set()

    def _purge(self) -> None:
        """Forget the sent marks of batches the spool thread deleted (loop side only)."""
        gone = self._gone
        while gone:
            i = gone.pop()
            self._sent.pop(i, None)
            self._tries.pop(i, None)

    async def confirm(self, spans: Sequence[tuple[int, int, int]], *, refused: bool = False) -> int:
        """Delete the batches a hub receipt covers: ``(epoch, first_seq, last_seq)``
        spans, inclusive (``refused``: a receipt of kind "refused", the hub will never
        store them; counted refused, not confirmed). Returns how many were deleted."""
        if not spans:
            return 0
        rows: list[tuple[int, int]] = await self._call(self._confirm_sync, list(spans))
        if not rows:
            return 0
        ids = {i for i, _ in rows}
        self._purge()
        for i in ids:
            self._sent.pop(i, None)
            self._tries.pop(i, None)
        if self._tail:
            self._tail = deque(r for r in self._tail if r.id not in ids)
        if refused:
            self.refused_by_hub += len(rows)
        else:
            self.confirmed += len(rows)
            self.confirmed_readings += sum(n for _, n in rows)
        self.last_confirmed_id = max(self.last_confirmed_id, *ids)
        self._held_changed()
        return len(rows)

    def _confirm_sync(self, spans: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
        try:
            return self._confirm_once_sync(spans)
        except sqlite3.Error as exc:
            if not _is_full(exc):
                # not fatal: the batches stay, and the next receipt names them again
                log.warning("spool %s: could not delete confirmed batches (%s)", self.path, exc)
                return []
            self._make_room_sync(0, exc, drop=False)
            try:
                return self._confirm_once_sync(spans)
            except sqlite3.Error as again:
                if not _is_full(again):
                    raise SpoolError(f"spool {self.path}: cannot delete ({again})") from again
                return []  # the next receipt names them again

    def _confirm_once_sync(self, spans: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
        assert self._db is not None
        db = self._db
        out: list[tuple[int, int]] = []
        freed = 0
        db.execute("PRAGMA synchronous=OFF")  # the next append's fsync carries it
        try:
            db.execute("BEGIN IMMEDIATE")
            for epoch, first, last in spans:
                for rid, n, size in db.execute(
                    "DELETE FROM batches WHERE epoch = ? AND seq BETWEEN ? AND ? "
                    "RETURNING id, n, length(data)",
                    (epoch, first, last),
                ):
                    out.append((int(rid), int(n)))
                    freed += int(size)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.execute(f"PRAGMA synchronous={_SYNC[self._durability]}")
        self._count -= len(out)
        self._bytes -= freed
        self._used -= freed + _ROW_OVERHEAD * len(out)
        self._acked_ids.difference_update(i for i, _ in out)
        return out

    def overdue(self, timeout_s: float) -> list[int]:
        """Batches sent ``timeout_s`` ago or more with no receipt, oldest first; each is
        counted as sent again and its clock starts again."""
        self._purge()
        now = time.monotonic()
        cutoff = now - timeout_s
        out: list[int] = []
        for i, t in self._sent.items():
            if t > cutoff:
                break
            out.append(i)
        self._again(out, now)
        return out

    def _again(self, ids: Sequence[int], now: float) -> None:
        for i in ids:
            if self._sent.pop(i, None) is not None:
                self._sent[i] = now
            self._tries[i] = self._tries.get(i, 0) + 1
        self.republished += len(ids)

    def tries(self, rid: int) -> int:
        """How often the batch ``rid`` was sent again without a receipt."""
        return self._tries.get(rid, 0)

    async def held(self, epoch: int, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """The (id, seq) of the batches of ``epoch`` in the seq ``ranges`` still in the spool."""
        rows: list[tuple[int, int]] = await self._call(self._held_sync, epoch, list(ranges))
        return rows

    def _held_sync(self, epoch: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        assert self._db is not None
        out: list[tuple[int, int]] = []
        for first, last in ranges:
            out.extend(
                (int(r[0]), int(r[1]))
                for r in self._db.execute(
                    "SELECT id, seq FROM batches WHERE epoch = ? AND seq BETWEEN ? AND ? "
                    "ORDER BY seq",
                    (epoch, first, last),
                )
            )
        return out

    def resend(self, ids: Sequence[int]) -> list[int]:
        """Of ``ids`` (the hub asked for them), those sent already: they go out again
        (:meth:`send_again`; the others are on their way anyway)."""
        self._purge()
        again = [i for i in ids if i in self._sent]
        self._again(again, time.monotonic())
        self.send_again(again)
        return again

    def send_again(self, ids: Sequence[int]) -> None:
        """Hand these batches out again (their receipt is late, or the hub asked):
        :meth:`due` gives them to the uplink, which :attr:`news` wakes."""
        if ids:
            self._due.extend(ids)
            self.news.send()

    def due(self, limit: int) -> list[int]:
        """Up to ``limit`` ids of batches to send again, oldest first (:meth:`send_again`)."""
        due = self._due
        return [due.popleft() for _ in range(min(limit, len(due)))]

    async def rows(self, ids: Sequence[int]) -> list[SpoolRow]:
        """The batches ``ids`` still in the spool, in id order."""
        if not ids:
            return []
        found: list[tuple[int, int, int, int, bytes]] = await self._call(self._rows_sync, list(ids))
        return [SpoolRow(*r) for r in found]

    def _rows_sync(self, ids: list[int]) -> list[tuple[int, int, int, int, bytes]]:
        assert self._db is not None
        out: list[tuple[int, int, int, int, bytes]] = []
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            out.extend(
                self._db.execute(
                    f"SELECT id, epoch, seq, n, data FROM batches WHERE id IN ({marks})", chunk
                )
            )
        out.sort()
        return out

    async def held_ranges(self, limit: int = 64) -> list[tuple[int, int, int]]:
        """What the spool holds as ``(epoch, first_seq, last_seq)`` runs, oldest first, at
        most ``limit`` of them (the heartbeat's list)."""
        out: list[tuple[int, int, int]] = await self._call(self._held_ranges_sync, limit)
        return out

    def _held_ranges_sync(self, limit: int) -> list[tuple[int, int, int]]:
        assert self._db is not None
        out: list[tuple[int, int, int]] = []
        # the (epoch, seq) index alone: no batch's data is read
        for e, q in self._db.execute("SELECT epoch, seq FROM batches ORDER BY epoch, seq"):
            epoch, seq = int(e), int(q)
            if out and out[-1][0] == epoch and out[-1][2] + 1 == seq:
                out[-1] = (epoch, out[-1][1], seq)
                continue
            if len(out) == limit:
                break
            out.append((epoch, seq, seq))
        return out

    async def split(self, old: SpoolRow, parts: Sequence[Row]) -> bool:
        """Replace the batch ``old`` by ``parts`` (its readings re-sealed with new seqs) and
        write a gap row naming it (reason ``split``), in one transaction. False when the
        disk is too full to (it stays, and is tried again)."""
        done: bool = await self._call(self._split_sync, old, list(parts))
        if not done:
            return False
        self._tail.clear()  # read the new rows from SQLite
        self._gone.append(old.id)
        self._purge()
        self.split_batches += 1
        self._held_changed()
        self.news.send()
        return True

    def _split_sync(self, old: SpoolRow, parts: list[Row]) -> bool:
        assert self._db is not None
        db = self._db
        now = time.time()
        try:
            db.execute("BEGIN IMMEDIATE")
            gone = db.execute(
                "DELETE FROM batches WHERE id = ? RETURNING length(data)", (old.id,)
            ).fetchone()
            if gone is None:  # confirmed or dropped meanwhile: nothing to split
                db.execute("ROLLBACK")
                return False
            db.executemany(
                "INSERT INTO batches (epoch, seq, n, t0, created, data) VALUES (?, ?, ?, ?, ?, ?)",
                [(e, q, n, t0, now, d) for e, q, n, t0, d in parts],
            )
            db.execute(
                "INSERT INTO gaps (epoch, first, last, readings, reason) VALUES (?, ?, ?, ?, ?)",
                (old.epoch, old.seq, old.seq, old.n, "split"),
            )
            last_id = int(db.execute("SELECT max(id) FROM batches").fetchone()[0])
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if not _is_full(exc):
                raise SpoolError(f"spool {self.path}: cannot split a batch ({exc})") from exc
            return False
        added = sum(len(p[4]) for p in parts)
        self._last_id = last_id
        self._count += len(parts) - 1
        self._bytes += added - int(gone[0])
        self._used += _row_bytes(parts)[0] - _data_bytes(int(gone[0]))
        self._has_gaps = True
        return True

    # -- gap rows ---------------------------------------------------------------

    async def note_gaps(self, ranges: Sequence[GapRange]) -> None:
        """Write gap rows for batches the spool does not hold (the hub asked for them):
        the uplink sends their notice like any other."""
        if ranges:
            await self._call(self._note_gaps_sync, list(ranges))
            self.news.send()

    def _note_gaps_sync(self, ranges: list[GapRange]) -> None:
        assert self._db is not None
        try:
            self._db.executemany(
                "INSERT INTO gaps (epoch, first, last, readings, reason) VALUES (?, ?, ?, ?, ?)",
                [(g.epoch, g.first, g.last, g.readings, g.reason) for g in ranges],
            )
        except sqlite3.Error as exc:
            if not _is_full(exc):
                raise SpoolError(f"spool {self.path}: cannot write gap rows ({exc})") from exc
            self._lost_gaps.extend(ranges)  # sent from memory
        self._has_gaps = True

    # -- the edge events' outbox ---------------------------------------------------
    #
    # Sealed events wait here (beside the batches, in the same file and thread: one
    # fsync policy, one disk-full rule) until the hub's event receipt, or their PUBACK
    # without the hub key, lets agent.rules.EdgeEvents delete them. A handful of rows
    # of ~300 bytes: they count in the spool's pages like everything in its file.

    async def events_held(self) -> list[tuple[int, int, bytes]]:
        """Every (epoch, seq, data) in the outbox, oldest first (read at start)."""
        rows: list[tuple[int, int, bytes]] = await self._call(self._events_held_sync)
        return rows

    def _events_held_sync(self) -> list[tuple[int, int, bytes]]:
        assert self._db is not None
        q = "SELECT epoch, seq, data FROM events ORDER BY epoch, seq"
        return [(int(e), int(s), bytes(d)) for e, s, d in self._db.execute(q)]

    async def event_put(
        self, row: tuple[int, int, bytes], drop: Sequence[tuple[int, int]] = ()
    ) -> bool:
        """Keep a sealed event (and delete ``drop``, pushed out of the bounded outbox, in
        the same transaction). False when the disk is full even after making room the
        way an append does: the event then lives in memory only. Never raises for that."""
        deletes = self._deletes
        ok: bool = await self._call(self._event_put_sync, row, list(drop))
        if self._deletes != deletes:
            self._tail.clear()  # batches were dropped for room: read from SQLite
        return ok

    def _event_put_sync(self, row: tuple[int, int, bytes], drop: list[tuple[int, int]]) -> bool:
        assert self._db is not None
        db = self._db
        for attempt in range(3):
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    if drop:
                        db.executemany("DELETE FROM events WHERE epoch = ? AND seq = ?", drop)
                    db.execute(
                        "INSERT OR REPLACE INTO events (epoch, seq, data) VALUES (?, ?, ?)", row
                    )
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
                return True
            except sqlite3.Error as exc:
                if not _is_full(exc):
                    raise SpoolError(f"spool {self.path}: cannot keep an event ({exc})") from exc
                if attempt == 2 or not self._make_room_sync(len(row[2]) + _ROW_OVERHEAD, exc):
                    return False
        return False

    async def event_delete(self, keys: Sequence[tuple[int, int]]) -> None:
        """Delete events (their receipt came). On a full disk the rows stay: sent again
        after a restart, the hub drops the duplicate and confirms them again."""
        if keys:
            await self._call(self._event_delete_sync, list(keys))

    def _event_delete_sync(self, keys: list[tuple[int, int]]) -> None:
        assert self._db is not None
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("DELETE FROM events WHERE epoch = ? AND seq = ?", keys)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            if not _is_full(exc):
                raise SpoolError(f"spool {self.path}: cannot delete events ({exc})") from exc
            log.debug("spool %s: events not deleted (%s): the disk is full", self.path, exc)

    async def gaps(self, limit: int = 256) -> list[tuple[int, GapRange]]:
        """Gap rows not yet acknowledged by the broker, oldest first, with their row ids."""
        rows: list[tuple[int, GapRange]] = await self._call(self._gaps_sync, limit)
        return rows

    def _gaps_sync(self, limit: int) -> list[tuple[int, GapRange]]:
        assert self._db is not None
        # negative row ids: only in memory (could not be written: the disk was full)
        out = [(-1 - i, g) for i, g in enumerate(self._lost_gaps[:limit])]
        self._lost_sent = len(out)  # being sent: no longer extended
        for rid, e, f, last, n, reason in self._db.execute(
            "SELECT id, epoch, first, last, readings, reason FROM gaps ORDER BY id LIMIT ?",
            (limit + len(self._gaps_done),),
        ):
            if int(rid) not in self._gaps_done:
                out.append(
                    (int(rid), GapRange(int(e), int(f), int(last), int(n), cast(GapReason, reason)))
                )
        out = out[:limit]
        # being sent: no longer extended by later drops
        self._gaps_handed = max([self._gaps_handed, *(i for i, _ in out)])
        return out

    async def gaps_sent(self, ids: Sequence[int]) -> None:
        """Delete gap rows whose notice the broker has acknowledged."""
        await self._call(self._gaps_sent_sync, list(ids))
        if self._has_gaps:  # written while that notice was on its way
            self.news.send()

    def _gaps_sent_sync(self, ids: list[int]) -> None:
        assert self._db is not None
        # in memory only: -1, -2, ... are the first of the list, which only grows at its end
        del self._lost_gaps[: sum(1 for i in ids if i < 0)]
        self._lost_sent = 0
        self._gaps_done.update(i for i in ids if i >= 0)
        real = sorted(self._gaps_done)
        if real:
            marks = ",".join("?" * len(real))
            try:
                self._db.execute(f"DELETE FROM gaps WHERE id IN ({marks})", real)
                self._gaps_done.clear()
            except sqlite3.Error as exc:
                if not _is_full(exc):
                    raise SpoolError(f"spool {self.path}: cannot delete gap rows ({exc})") from exc
                # the disk is full: deleted with the next notice; never sent twice meanwhile
        self._has_gaps = (
            bool(self._lost_gaps)
            or self._db.execute(
                "SELECT 1 FROM gaps WHERE id NOT IN (SELECT value FROM json_each(?)) LIMIT 1",
                (json.dumps(sorted(self._gaps_done)),),
            ).fetchone()
            is not None
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
            acked, sent = self._acked_ids, self._sent
            out: list[SpoolRow] = []
            for r in tail:
                if len(out) == limit:
                    break
                if r.id not in acked and r.id not in sent:
                    out.append(r)
            return out
        rows: list[tuple[int, int, int, int, bytes]] = await self._call(
            self._pending_sync, after_id, limit, upto_id
        )
        skip = self._acked_ids | self._sent.keys()
        return [SpoolRow(*r) for r in rows if r[0] not in skip]

    def _pending_sync(
        self, after_id: int, limit: int, upto_id: int | None
    ) -> list[tuple[int, int, int, int, bytes]]:
        assert self._db is not None
        if upto_id is None:
            upto_id = 2**63 - 1
        return self._db.execute(
            "SELECT id, epoch, seq, n, data FROM batches WHERE id > ? AND id <= ? "
            "AND sent IS NULL ORDER BY id LIMIT ?",
            (after_id, upto_id, limit),
        ).fetchall()

    def _unconfirmed(self) -> int:
        self._purge()
        return len(self._sent)

    def _held_changed(self) -> None:
        """What waits for a PUBACK or a receipt changed: :attr:`empty` follows it and
        the stop's drain is told (:attr:`progress`)."""
        if len(self._acked_ids) >= self._count:
            self.empty.set()
        else:
            self.empty.clear()
        self.progress.send()

    @property
    def unsent(self) -> int:
        """Batches held that the broker has not acknowledged yet (0: every batch left
        waits only for the hub's receipt, or none is left)."""
        return self._count - len(self._acked_ids) - self._unconfirmed()

    def _oldest_unconfirmed_s(self) -> float | None:
        """How long the batch waiting longest for its receipt has waited since it was
        (last) sent; None when none waits."""
        for t in self._sent.values():
            return round(time.monotonic() - t, 1)
        return None

    async def totals(self) -> dict[str, int]:
        """The persistent counters (over every run): dropped_batches, moved_aside..."""
        rows: list[tuple[str, int]] = await self._call(
            lambda: (
                self._db.execute("SELECT name, value FROM counters").fetchall() if self._db else []
            )
        )
        return {str(k): int(v) for k, v in rows}

    def statistics(self) -> dict[str, Any]:
        return {
            "depth_batches": self._count - len(self._acked_ids),
            "depth_bytes": self._bytes,
            "appended": self.appended,
            "acked": self.acked,
            "dropped_batches": self.dropped_batches,
            "dropped_readings": self.dropped_readings,
            "dropped_disk_full": self.dropped_full,
            "dropped_spool_full": self.dropped_by_reason.get("spool_full", 0),
            "dropped_too_old": self.dropped_by_reason.get("too_old", 0),
            "lost_disk_full": self.lost_batches,
            "sent": self.sent,
            "sent_unconfirmed": self._unconfirmed(),
            "unconfirmed_oldest_s": self._oldest_unconfirmed_s(),
            "confirmed": self.confirmed,
            "confirmed_readings": self.confirmed_readings,
            "refused_by_hub": self.refused_by_hub,
            "republished": self.republished,
            "split": self.split_batches,
            "disk_full": int(self.disk_full),
            "disk_full_events": self.disk_full_events,
            "disk_bytes": self.disk_bytes(),
            "max_bytes": self._max_bytes,
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
                    # harmless: the WAL is kept, and read again at the next start
                    log.log(
                        logging.INFO if _is_full(exc) else logging.WARNING,
                        "spool %s: checkpoint at close failed (%s)",
                        self.path,
                        exc,
                    )
                self._db.close()
                self._db = None

        await self._call(_close)
        self._exec.shutdown(wait=True)
