"""The spool: every sealed batch on disk until the broker has acknowledged it.

SQLite in WAL mode, one table, one row per batch. The spool is the single source
of truth for delivery: a batch is appended (and, with durability ``full``,
fsynced) before it counts as spooled, and deleted only after its PUBACK. All
SQLite calls run on one dedicated thread so the event loop never blocks on disk.

Durability policies (``[spool] durability``):
- ``full``: ``synchronous=FULL``; a batch reported as spooled survives a power cut.
- ``normal``: ``synchronous=NORMAL``; survives a crash of the agent (kill -9),
  a power cut may lose the last transactions (never corrupts).
- ``off``: ``synchronous=OFF``; for tests and RAM disks.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from protocols.errors import LocalError

__all__ = ["Spool", "SpoolError", "SpoolRow"]

log = logging.getLogger(__name__)

T = TypeVar("T")

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
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class SpoolError(LocalError):
    """The spool cannot be opened or written."""


@dataclass(frozen=True, slots=True)
class SpoolRow:
    id: int
    epoch: int
    seq: int
    n: int
    data: bytes


class Spool:
    """Durable FIFO of sealed batches. Create with :meth:`open`."""

    def __init__(self, path: Path, durability: str, max_bytes: int) -> None:
        self.path = path
        self._durability = durability
        self._max_bytes = max_bytes
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._db: sqlite3.Connection | None = None
        self._bytes = 0
        self._count = 0
        self.appended = 0
        self.acked = 0
        self.dropped_batches = 0
        self.moved_aside = 0
        self.added = asyncio.Event()
        self.empty = asyncio.Event()  # set while nothing waits for a PUBACK

    @classmethod
    async def open(
        cls, path: Path, *, durability: str = "full", max_bytes: int = 256 << 20
    ) -> Spool:
        if durability not in _SYNC:
            raise SpoolError(f"unknown durability {durability!r}: use full, normal or off")
        spool = cls(path, durability, max_bytes)
        await spool._call(spool._open_sync)
        if spool._count == 0:
            spool.empty.set()
        return spool

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._exec, fn, *args)

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
            log.error(
                "spool %s is damaged (%s): moved aside to %s, starting a fresh spool",
                self.path,
                exc,
                aside,
            )
            for suffix in ("", "-wal", "-shm"):
                p = Path(str(self.path) + suffix)
                if p.exists():
                    p.rename(Path(str(aside) + suffix))
            self.moved_aside += 1
            self._db = self._connect()
        row = self._db.execute(
            "SELECT count(*), coalesce(sum(length(data)), 0) FROM batches"
        ).fetchone()
        self._count, self._bytes = int(row[0]), int(row[1])
        if self._count:
            log.info("spool %s holds %d batches (%d bytes) from before", self.path, *row)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={_SYNC[self._durability]}")
            ok = db.execute("PRAGMA quick_check").fetchone()
            if ok is None or ok[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {ok[0] if ok else 'no answer'}")
            db.executescript(_SCHEMA)
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    # -- writes ---------------------------------------------------------------

    async def append(self, batches: Sequence[tuple[int, int, int, int, bytes]]) -> None:
        """Append (epoch, seq, n, t0, data) rows in one transaction; returns when durable."""
        await self._call(self._append_sync, batches)
        self.appended += len(batches)
        self.empty.clear()
        self.added.set()

    def _append_sync(self, batches: Sequence[tuple[int, int, int, int, bytes]]) -> None:
        assert self._db is not None
        now = time.time()
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT INTO batches (epoch, seq, n, t0, created, data) VALUES (?, ?, ?, ?, ?, ?)",
                [(e, s, n, t0, now, d) for e, s, n, t0, d in batches],
            )
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            db.execute("ROLLBACK")
            raise SpoolError(f"spool {self.path}: cannot append ({exc})") from exc
        self._count += len(batches)
        self._bytes += sum(len(b[4]) for b in batches)
        if self._bytes > self._max_bytes:
            self._drop_oldest_sync()

    def _drop_oldest_sync(self) -> None:
        assert self._db is not None
        while self._bytes > self._max_bytes and self._count > 1:
            row = self._db.execute(
                "SELECT id, length(data) FROM batches ORDER BY id LIMIT 1"
            ).fetchone()
            if row is None:
                break
            self._db.execute("DELETE FROM batches WHERE id = ?", (row[0],))
            self._count -= 1
            self._bytes -= int(row[1])
            self.dropped_batches += 1
        log.warning(
            "spool over %d bytes: dropped oldest batches (%d so far)",
            self._max_bytes,
            self.dropped_batches,
        )

    async def ack(self, ids: Sequence[int]) -> None:
        """Delete acknowledged batches."""
        if ids:
            await self._call(self._ack_sync, list(ids))
            if self._count == 0:
                self.empty.set()

    def _ack_sync(self, ids: list[int]) -> None:
        assert self._db is not None
        marks = ",".join("?" * len(ids))
        row = self._db.execute(
            f"SELECT count(*), coalesce(sum(length(data)), 0) FROM batches WHERE id IN ({marks})",
            ids,
        ).fetchone()
        self._db.execute(f"DELETE FROM batches WHERE id IN ({marks})", ids)
        self._count -= int(row[0])
        self._bytes -= int(row[1])
        self.acked += int(row[0])

    # -- reads ----------------------------------------------------------------

    async def pending(self, after_id: int, limit: int) -> list[SpoolRow]:
        """Up to ``limit`` batches with id > ``after_id``, oldest first."""
        rows: list[tuple[int, int, int, int, bytes]] = await self._call(
            self._pending_sync, after_id, limit
        )
        return [SpoolRow(*r) for r in rows]

    def _pending_sync(self, after_id: int, limit: int) -> list[tuple[int, int, int, int, bytes]]:
        assert self._db is not None
        return self._db.execute(
            "SELECT id, epoch, seq, n, data FROM batches WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        ).fetchall()

    def statistics(self) -> dict[str, int]:
        return {
            "depth_batches": self._count,
            "depth_bytes": self._bytes,
            "appended": self.appended,
            "acked": self.acked,
            "dropped_batches": self.dropped_batches,
            "moved_aside": self.moved_aside,
        }

    async def close(self) -> None:
        def _close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._call(_close)
        self._exec.shutdown(wait=True)
