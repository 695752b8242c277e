"""The hub's verifying core: verify, deduplicate and store what the gateways send.

:class:`HubCore` is the hub without I/O to the broker: ``handle(topic, data)``
parses a message, looks up the gateway's enrolled key by (gateway, kid),
verifies the signature, drops duplicates by (gateway, epoch, seq) and keeps
the readings in its :class:`~hub.store.Store` (SQLite or PostgreSQL). Every
outcome is an :class:`Outcome`; every refusal is counted by reason and logged
once per (gateway, reason). :class:`hub.worker.Hub` feeds it from MQTT.
"""

from __future__ import annotations

import bisect
import logging
import math
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from hub.store import REFUSED, BatchRow, SqliteStore, Store, TailRow, open_store
from protocols import envelope, topics
from protocols.errors import LocalError, ProtocolError, SignatureError
from protocols.event import parse_event
from protocols.gap import GapRange, parse_gap
from protocols.reading import Reading
from protocols.receipt import (
    MAX_RECEIPT_EPOCHS,
    EpochReceipt,
    HeldRange,
    RefusedRange,
    parse_heartbeat,
)

__all__ = ["HubCore", "Outcome", "SeqRanges"]

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    """What :meth:`HubCore.handle` did with a message (the values are the counters'
    and the stored refusal reasons' names)."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    META = "meta"
    GAP = "gap"
    EVENT = "event"
    HEARTBEAT = "heartbeat"
    IGNORED = "ignored"
    # refusals
    MALFORMED = "malformed"
    TOPIC_MISMATCH = "topic_mismatch"
    UNKNOWN_KEY = "unknown_key"
    REVOKED_KEY = "revoked_key"
    BAD_SIGNATURE = "bad_signature"
    TOO_OLD = "too_old"
    BAD_PAYLOAD = "bad_payload"
    MALFORMED_META = "malformed_meta"
    MALFORMED_GAP = "malformed_gap"
    MALFORMED_EVENT = "malformed_event"
    MALFORMED_HEARTBEAT = "malformed_heartbeat"

    @property
    def refused(self) -> bool:
        return self not in _ACCEPTED


_ACCEPTED = frozenset(
    {
        Outcome.STORED,
        Outcome.DUPLICATE,
        Outcome.META,
        Outcome.GAP,
        Outcome.EVENT,
        Outcome.HEARTBEAT,
        Outcome.IGNORED,
    }
)
_MALFORMED: dict[topics.TopicKind, Outcome] = {
    "meta": Outcome.MALFORMED_META,
    "gap": Outcome.MALFORMED_GAP,
    "event": Outcome.MALFORMED_EVENT,
    "hb": Outcome.MALFORMED_HEARTBEAT,
}
_REFUSALS = {str(o): o for o in (Outcome.TOO_OLD, Outcome.BAD_PAYLOAD)}  # for good
_RECHECK_S = 5.0
_S = TypeVar("_S", bound=envelope.Sealed[Any])
_MAX_ASK_RANGES = 64  # protocols.command.MAX_RESEND_RANGES


class SeqRanges:
    """A set of seqs as sorted, disjoint, not touching inclusive ranges."""

    __slots__ = ("r",)

    def __init__(self) -> None:
        self.r: list[tuple[int, int]] = []

    def add(self, lo: int, hi: int) -> None:
        r = self.r
        i = bisect.bisect_left(r, (lo,))
        if i > 0 and r[i - 1][1] >= lo - 1:
            i -= 1
        j, new_lo, new_hi = i, lo, hi
        while j < len(r) and r[j][0] <= new_hi + 1:
            new_lo, new_hi = min(new_lo, r[j][0]), max(new_hi, r[j][1])
            j += 1
        r[i:j] = [(new_lo, new_hi)]

    @property
    def top(self) -> int:
        """The highest seq held, -1 when none."""
        return self.r[-1][1] if self.r else -1

    def missing(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The seqs ``lo..hi`` not held, as ranges."""
        out: list[tuple[int, int]] = []
        expected = lo
        for a, b in self.r[max(0, bisect.bisect_left(self.r, (lo,)) - 1) :]:
            if a > hi:
                break
            if b < expected:
                continue
            if a > expected:
                out.append((expected, a - 1))
            expected = b + 1
        if expected <= hi:
            out.append((expected, hi))
        return out


class HubCore:
    """Verification, dedup and storage; no network.

    Duplicates are found in memory (a set of seqs per (gateway, epoch), loaded
    from the store at start), never by a SELECT per message. Stored rows are
    buffered and written in one transaction per ``flush_readings`` readings or
    per :meth:`flush` call (the :class:`~hub.worker.Hub` calls it every
    ``flush_interval_s`` and whenever the broker has nothing more queued).

    Several workers may share one database (a shared subscription): each keeps
    its own counters, and the store's unique key on (gw, epoch, seq) decides
    who stores a batch redelivered to another worker
    (:meth:`~hub.store.Store.write_batches`), and the store also decides between
    a split's part and its original (:meth:`~hub.store.Store.settle_part`).

    ``store`` is a :class:`~hub.store.Store` or what ``--db`` takes: an SQLite
    path or a ``postgresql://`` URL. ``sharded`` (SQLite only): readings into
    ``<db>.shards/<worker>.sqlite3``, the worker name then stable and file-safe.
    """

    def __init__(
        self,
        store: Store | Path | str,
        *,
        flush_readings: int = 50_000,
        # batches whose last reading is older than this are refused as "too_old": longer
        # than a gateway's spool keeps anything (168 h by default) plus a margin, so only
        # a replay of an old capture can be this old; None: no window (recorded data)
        window_ms: int | None = 8 * 86_400_000,
        worker: str = "w0",
        sharded: bool = False,
        prefix: str = topics.DEFAULT_PREFIX,
        hole_grace_s: float = 30.0,
        receipt_interval_s: float = 1.0,
    ) -> None:
        if isinstance(store, Path | str):
            store = open_store(store, worker=worker, sharded=sharded)
        self.store = store
        self.worker = store.worker
        self.flush_readings = flush_readings
        self.window_ms = window_ms
        self.prefix = prefix
        self.counters: Counter[str] = Counter(store.counters())
        self._logged: set[tuple[str, str]] = set()
        self._keys: dict[tuple[str, bytes], tuple[bytes, bool]] = {
            (gw, kid): (pub, revoked) for gw, kid, pub, revoked in store.enrolled_keys()
        }
        self._seen: dict[tuple[str, int], set[int]] = {}
        self._top: dict[tuple[str, int], int] = {}  # the highest seq seen
        for gw, epoch, seq in store.seen():
            self._seen.setdefault((gw, epoch), set()).add(seq)
            if seq > self._top.get((gw, epoch), -1):
                self._top[(gw, epoch)] = seq
        self._fixes: set[tuple[str, int]] = set()  # (gw, epoch) of clock corrections kept
        # ranges gateways declared dropped (gap notices) since this worker started
        self._dropped: dict[tuple[str, int], set[tuple[int, int]]] = {}
        # seqs gateways re-sealed as smaller batches (gap notices "split", and the
        # originals a stored part named): an original arriving late would store its
        # readings twice. Loaded at start: few rows, and a restart must not forget them
        self._split: dict[tuple[str, int], SeqRanges] = {}
        for gw, epoch, first, last in store.splits():
            self._split.setdefault((gw, epoch), SeqRanges()).add(first, last)
        # authentic batches refused for good (too_old, bad_payload), settled: recorded
        # (gaps table, reason "refused:<why>"), never asked for again, and owed a
        # receipt of kind "refused" (gw -> (epoch, reason) -> seqs) that deletes them.
        # Loaded at start (rare rows): one sent again after a restart gets the same
        # answer from the store, not a second refusal
        self._refused: dict[tuple[str, int], dict[str, SeqRanges]] = {}
        self._refusals: dict[str, dict[tuple[int, str], SeqRanges]] = {}
        for gw, epoch, first, last, why in store.refused():
            self._refused.setdefault((gw, epoch), {}).setdefault(why, SeqRanges()).add(first, last)
        self.closed = False
        # per buffered batch: its claim row and its readings
        self._batch_rows: list[BatchRow] = []
        self._batch_readings: list[list[Reading]] = []
        self._buffered_readings = 0
        self._flushing: list[BatchRow] = []
        self._after: Counter[str] = self.counters
        # unknown keys looked up in the store again (another worker may have enrolled
        # them) at most every few seconds: a flood of unknown kids is no flood of queries
        self._unknown: dict[tuple[str, bytes], float] = {}
        # called after each write with the batches and which of them this worker stored
        self.on_flush: Callable[[list[BatchRow], list[bool]], None] | None = None
        # receipts (protocols.receipt): per gateway, per epoch, the seqs durably accounted
        # for (written batches, gap notices) as far as this worker knows
        self.hole_grace_s = hole_grace_s
        self.receipt_interval_s = receipt_interval_s
        self._acct: dict[str, dict[int, SeqRanges]] = {}
        self._tails: dict[str, dict[int, int]] = {}  # gw -> epoch -> last seq sealed
        self._tail_rows: list[TailRow] = []  # tails not yet written
        self._due: dict[str, bool] = {}  # gateways owed a receipt -> a heartbeat asked
        self._sent: dict[str, float] = {}  # gw -> monotonic time of its last receipt
        # gateways that sent a heartbeat (they can resend) -> its last one's (epoch,
        # sealed, ranges its spool still holds)
        self._speaks: dict[str, tuple[int, int, list[HeldRange]]] = {}
        # (gw, epoch) -> the highest seq the store accounted for at its first heartbeat
        self._floor: dict[tuple[str, int], int] = {}
        # (gw, epoch) -> holes: [lo, hi, missing since, last asked] (monotonic seconds)
        self._holes: dict[tuple[str, int], list[tuple[int, int, float, float]]] = {}
        # edge events (receipts of kind "event"): per gateway, per epoch, the event seqs
        # this worker stored or found stored (a duplicate: the gateway missed the receipt)
        self._ev_acct: dict[str, dict[int, SeqRanges]] = {}
        self._ev_due: set[str] = set()
        self._ev_sent: dict[str, float] = {}

    @property
    def db(self) -> sqlite3.Connection:
        """The SQLite connection of an SQLite store (tests and the demo look inside)."""
        if not isinstance(self.store, SqliteStore):
            raise LocalError("HubCore.db: the store is not SQLite")
        return self.store.db

    # -- keys -----------------------------------------------------------------

    def enroll(self, gateway: str, public_raw: bytes) -> bytes:
        """Trust ``public_raw`` (32 bytes) as a key of ``gateway``; returns its kid."""
        kid = envelope.key_id(public_raw)
        self.store.enroll(gateway, kid, public_raw, time.time())
        self._keys[(gateway, kid)] = (public_raw, False)
        self._unknown.pop((gateway, kid), None)
        return kid

    def revoke(self, gateway: str, kid: bytes) -> None:
        self.store.revoke(gateway, kid)
        self._unknown.pop((gateway, kid), None)
        if (gateway, kid) in self._keys:
            self._keys[(gateway, kid)] = (self._keys[(gateway, kid)][0], True)

    # -- messages -------------------------------------------------------------

    def _refuse(self, reason: Outcome, gateway: str, detail: str) -> Outcome:
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

    def _key(self, gw: str, kid: bytes) -> bytes | Outcome:
        entry = self._keys.get((gw, kid))
        if entry is None:
            now = time.monotonic()
            if now - self._unknown.get((gw, kid), -_RECHECK_S) < _RECHECK_S:
                return Outcome.UNKNOWN_KEY
            found = self.store.key(gw, kid)
            if found is None:
                if len(self._unknown) > 100_000:
                    self._unknown.clear()
                self._unknown[(gw, kid)] = now
                return Outcome.UNKNOWN_KEY
            entry = self._keys[(gw, kid)] = found
        pub, revoked = entry
        return Outcome.REVOKED_KEY if revoked else pub

    def handle(self, topic: str, data: bytes) -> Outcome:
        """Process one message on ``topic`` (under this core's prefix)."""
        parsed = topics.parse(topic, self.prefix)
        kind = parsed[1] if parsed else ""
        if kind == "batch":
            return self._handle_batch(parsed[0] if parsed else "", data)
        if kind == "meta":
            return self._handle_meta(topic, data)
        if kind == "gap":
            return self._handle_gap(topic, data)
        if kind == "event":
            return self._handle_event(topic, data)
        if kind == "hb":
            return self._handle_heartbeat(topic, data)
        return Outcome.IGNORED

    def _handle_batch(self, topic_gw: str, data: bytes) -> Outcome:
        try:
            batch = envelope.parse(data)
        except ProtocolError as exc:
            return self._refuse(Outcome.MALFORMED, topic_gw, str(exc))
        h = batch.header
        if h.gw != topic_gw:
            return self._refuse(Outcome.TOPIC_MISMATCH, topic_gw, f"header names {h.gw!r}")
        key = self._key(h.gw, h.kid)
        if isinstance(key, Outcome):
            return self._refuse(key, h.gw, f"kid {h.kid.hex()}")
        try:
            batch.verify(key)
        except SignatureError as exc:
            return self._refuse(Outcome.BAD_SIGNATURE, h.gw, str(exc))
        seen = self._seen.setdefault((h.gw, h.epoch), set())
        split = self._split.get((h.gw, h.epoch))
        # stored already, or re-sealed by the gateway as smaller batches (its readings
        # are theirs): a duplicate, and the gateway missed a receipt: another
        if h.seq in seen or (split is not None and not split.missing(h.seq, h.seq)):
            return self._duplicate(h.gw, h.n)
        why = self._refused_why(h.gw, h.epoch, h.seq)
        if why is not None:  # refused for good before (maybe before a restart): settled
            self._owe_refusal(h.gw, h.epoch, h.seq, why)
            return _REFUSALS.get(why, Outcome.TOO_OLD)
        # a gateway whose clock is not synchronised may be weeks behind: its batches are
        # never refused for their times (replay protection is the (gw, epoch, seq) key)
        now_ms = time.time_ns() // 1_000_000
        if self.window_ms is not None and not h.unsynced and h.t1 < now_ms - self.window_ms:
            return self._settle_refused(
                Outcome.TOO_OLD, h, f"t1 {h.t1} is behind the {self.window_ms} ms window"
            )
        try:
            readings = batch.readings()
        except ProtocolError as exc:
            return self._settle_refused(Outcome.BAD_PAYLOAD, h, str(exc))
        if h.split_of is not None and not self._part_of_new(h):
            return self._duplicate(h.gw, h.n)
        seen.add(h.seq)
        if h.fix_offset_ms is not None:
            self._clock_fix(h, now_ms)
        if h.seq > self._top.get((h.gw, h.epoch), -1):
            self._top[(h.gw, h.epoch)] = h.seq
        self._batch_rows.append(
            (h.gw, h.epoch, h.seq, h.n, h.t0, h.t1, time.time_ns() // 1_000_000, self.worker)
        )
        self._batch_readings.append(readings)
        self._buffered_readings += len(readings)
        self.counters["batches"] += 1
        self.counters["readings"] += len(readings)
        if self._buffered_readings >= self.flush_readings:
            self.flush()
        return Outcome.STORED

    def _duplicate(self, gw: str, n: int) -> Outcome:
        self.counters["duplicates"] += 1
        self.counters["duplicate_readings"] += n
        self._due.setdefault(gw, False)
        return Outcome.DUPLICATE

    def _part_of_new(self, h: envelope.BatchHeader) -> bool:
        """A part of a split batch (its header names the original): True to store it,
        the original then recorded split (its claim fails, here or at another worker,
        and it is a duplicate if it comes later); False if the original is stored
        (the broker delivered it first): the part is settled as split, never stored.
        The store decides (:meth:`~hub.store.Store.settle_part`), so with ``--shared``
        the original and a part reaching two workers at once are never both stored."""
        assert h.split_of is not None
        epoch, seq = h.split_of
        if seq in self._seen.get((h.gw, epoch), ()):
            self.flush()  # the original this worker holds, claimed before the store decides
        now_ms = time.time_ns() // 1_000_000
        if self.store.settle_part(h.gw, h.epoch, h.seq, h.n, h.split_of, now_ms):
            self._split_seen(h.gw, epoch, seq)
            return True
        self._split_seen(h.gw, h.epoch, h.seq)
        self.counters["split_parts_settled"] += 1
        return False

    def _split_seen(self, gw: str, epoch: int, seq: int) -> None:
        """Batch ``seq`` is recorded split (its readings stored in other batches)."""
        self._split.setdefault((gw, epoch), SeqRanges()).add(seq, seq)
        self._dropped.setdefault((gw, epoch), set()).add((seq, seq))
        self._epoch(gw, epoch).add(seq, seq)
        self._due.setdefault(gw, False)

    def _settle_refused(self, reason: Outcome, h: envelope.BatchHeader, detail: str) -> Outcome:
        """Refuse an authentic batch for good, and settle it: recorded at once (the gaps
        table, reason "refused:<reason>"), and a receipt of kind "refused" owed to the
        gateway, which deletes it. Counted and logged once, by the worker whose row
        went in (sent again, even to another worker, it is answered, not counted)."""
        row = (h.gw, h.epoch, h.seq, h.seq, h.n, REFUSED + str(reason), time.time_ns() // 10**6)
        if self.store.write_gaps([row]):
            self._refuse(reason, h.gw, detail)
        self._owe_refusal(h.gw, h.epoch, h.seq, str(reason))
        return reason

    def _refused_why(self, gw: str, epoch: int, seq: int) -> str | None:
        """Why batch ``seq`` was refused for good, if it was (as far as memory knows)."""
        for why, seqs in self._refused.get((gw, epoch), {}).items():
            if not seqs.missing(seq, seq):
                return why
        return None

    def _owe_refusal(self, gw: str, epoch: int, seq: int, why: str) -> None:
        self._refused.setdefault((gw, epoch), {}).setdefault(why, SeqRanges()).add(seq, seq)
        owed = self._refusals.setdefault(gw, {})
        owed.setdefault((epoch, why), SeqRanges()).add(seq, seq)

    def refusals_due(self) -> list[tuple[str, list[RefusedRange]]]:
        """The receipts of kind "refused" to send now (each at most MAX_RECEIPT_EPOCHS
        ranges): every batch refused for good since the last call."""
        out: list[tuple[str, list[RefusedRange]]] = []
        for gw, owed in self._refusals.items():
            ranges = [
                RefusedRange(epoch, lo, hi, reason)
                for (epoch, reason), seqs in sorted(owed.items())
                for lo, hi in seqs.r
            ]
            for i in range(0, len(ranges), MAX_RECEIPT_EPOCHS):
                out.append((gw, ranges[i : i + MAX_RECEIPT_EPOCHS]))
        self._refusals.clear()
        return out

    def _clock_fix(self, h: envelope.BatchHeader, now_ms: int) -> None:
        """Keep a gateway's clock correction for its epoch (once; readings are
        re-stamped when read: :func:`hub.store.open_readings`' ``true_readings``)."""
        if (h.gw, h.epoch) in self._fixes:
            return
        self._fixes.add((h.gw, h.epoch))
        write = getattr(self.store, "write_clock_fix", None)
        if write is None:
            log.warning("hub: this store keeps no clock corrections; %s's is dropped", h.gw)
            return
        if write((h.gw, h.epoch, h.fix_offset_ms, h.fix_until, h.fix_last_seq, now_ms)):
            self.counters["clock_fixes"] += 1
            log.info(
                "hub: %s epoch %d: clock correction %+.3f s for batches up to seq %s",
                h.gw,
                h.epoch,
                (h.fix_offset_ms or 0) / 1000,
                h.fix_last_seq,
            )

    def flush(self) -> None:
        """Write the buffered batches, their readings and the counters (one
        :meth:`~hub.store.Store.write_batches`). If the write fails, the batches
        stay buffered (a later flush tries again) and the error is raised: what
        was not written must not be acknowledged (:meth:`hub.worker.Hub.commit`)."""
        if self.closed:
            return
        if self._tail_rows:  # heartbeats' tails: one transaction per flush, not per message
            self.store.write_tails(self._tail_rows)
            self._tail_rows = []
        if not self._batch_rows:  # refusals are counted too
            self.store.save_counters(self.counters)
            return
        batches, readings = self._batch_rows, self._batch_readings
        self._flushing = batches
        won = self.store.write_batches(batches, readings, self._lost)
        self.counters = self._after
        self._batch_rows, self._batch_readings, self._buffered_readings = [], [], 0
        # durable now (this worker's or another's claim): owed a receipt
        for gw, epoch, seq, *_ in batches:
            self._epoch(gw, epoch).add(seq, seq)
            self._due.setdefault(gw, False)
        if self.on_flush is not None:
            self.on_flush(batches, won)

    def _lost(self, won: list[bool]) -> Mapping[str, int]:
        """The counters to write with the batches: a batch another worker stored first
        is a duplicate. Computed on a copy (a store may call this again when it
        retries its transaction), kept once the write succeeded."""
        c = self.counters.copy()
        c["flushes"] += 1
        for row, ok in zip(self._flushing, won, strict=True):
            if not ok:
                c["batches"] -= 1
                c["readings"] -= row[3]
                c["duplicates"] += 1
                c["duplicate_readings"] += row[3]
                c["duplicates_across_workers"] += 1
        self._after = c
        return c

    def delivered(self, gateway: str) -> set[tuple[int, int]]:
        """Every (epoch, seq) of ``gateway`` verified so far (stored or buffered)."""
        return {(e, s) for (gw, e), seqs in self._seen.items() if gw == gateway for s in seqs}

    def missing(self) -> dict[str, int]:
        """Per gateway: batches up to its highest seq (per epoch: arrived, or sealed as
        its heartbeat said) that neither arrived nor were declared dropped in a gap
        notice this worker received. Cheap (no database): what ``vitals hub stats``
        computes exactly from the database."""
        out: dict[str, int] = {}
        tops = dict(self._top)
        for gw, tails in self._tails.items():
            for epoch, sealed in tails.items():
                tops[(gw, epoch)] = max(sealed, tops.get((gw, epoch), -1))
        for (gw, epoch), top in tops.items():
            dropped = sum(
                min(last, top) - first + 1
                for first, last in self._dropped.get((gw, epoch), ())
                if first <= top
            )
            refused = sum(
                min(hi, top) - lo + 1
                for seqs in self._refused.get((gw, epoch), {}).values()
                for lo, hi in seqs.r
                if lo <= top
            )
            n = top + 1 - len(self._seen.get((gw, epoch), ())) - dropped - refused
            out[gw] = out.get(gw, 0) + max(0, n)
        return out

    @property
    def buffered(self) -> int:
        """Batches verified but not yet written."""
        return len(self._batch_rows)

    def _open(
        self, topic: str, data: bytes, parse: Callable[[bytes], _S], what: topics.TopicKind
    ) -> _S | Outcome:
        """Parse a signed message, check it names the topic's gateway, look up its
        key and verify it: the parsed message, or the refusal (an :class:`Outcome`).

        One path for every kind but batches (which add dedup and the age window).
        """
        topic_gw = topics.gateway_of(topic, self.prefix) or ""
        try:
            sealed = parse(data)
            if sealed.header.gw != topic_gw:
                return self._refuse(Outcome.TOPIC_MISMATCH, topic_gw, what)
            key = self._key(sealed.header.gw, sealed.header.kid)
            if isinstance(key, Outcome):
                return self._refuse(key, topic_gw, what)
            sealed.verify(key)
        except SignatureError as exc:
            return self._refuse(Outcome.BAD_SIGNATURE, topic_gw, str(exc))
        except ProtocolError as exc:
            return self._refuse(_MALFORMED[what], topic_gw, str(exc))
        return sealed

    def _handle_gap(self, topic: str, data: bytes) -> Outcome:
        notice = self._open(topic, data, parse_gap, "gap")
        if isinstance(notice, Outcome):
            return notice
        topic_gw = notice.header.gw
        try:
            ranges = notice.ranges()
        except ProtocolError as exc:
            return self._refuse(Outcome.MALFORMED_GAP, topic_gw, str(exc))
        self.flush()
        ranges = [p for g in ranges for p in self._not_stored(topic_gw, g)]
        for g in ranges:
            self._dropped.setdefault((topic_gw, g.epoch), set()).add((g.first, g.last))
            if g.reason == "split":
                self._split.setdefault((topic_gw, g.epoch), SeqRanges()).add(g.first, g.last)
        now = time.time_ns() // 10**6
        new = self.store.write_gaps(
            [(topic_gw, g.epoch, g.first, g.last, g.readings, g.reason, now) for g in ranges]
        )
        for g in ranges:
            self._epoch(topic_gw, g.epoch).add(g.first, g.last)
        self._due.setdefault(topic_gw, False)
        self.counters["gap_notices"] += 1
        self.counters["gap_ranges"] += new
        self.store.save_counters(self.counters)
        return Outcome.GAP

    # -- receipts, heartbeats and holes -----------------------------------------------
    #
    # What a worker accounts for of a gateway is in memory: what it wrote since it
    # started, and what the store holds of the ranges the gateway's heartbeats say
    # it still holds, read when a heartbeat names them (never a gateway's whole
    # history: a year of one epoch is 100 000 batches).

    def _epoch(self, gw: str, epoch: int) -> SeqRanges:
        acct = self._acct.setdefault(gw, {})
        r = acct.get(epoch)
        if r is None:
            r = acct[epoch] = SeqRanges()
        return r

    def _load(self, gw: str, epoch: int, lo: int, hi: int) -> None:
        """Add what the store accounts for of ``gw``'s seqs ``lo..hi`` that memory lacks."""
        r = self._epoch(gw, epoch)
        missing = r.missing(lo, hi)
        if missing:  # one query over the span, however fragmented
            a, b = missing[0][0], missing[-1][1]
            for x, y in self.store.accounted(gw, epoch, a, b):
                if x <= b and y >= a:
                    r.add(max(x, a), min(y, b))

    def _handle_heartbeat(self, topic: str, data: bytes) -> Outcome:
        hb = self._open(topic, data, parse_heartbeat, "hb")
        if isinstance(hb, Outcome):
            return hb
        h = hb.header
        try:
            held = hb.held()
        except ProtocolError as exc:
            return self._refuse(Outcome.MALFORMED_HEARTBEAT, h.gw, str(exc))
        for r in held:  # what it waits a receipt for: does the store have it?
            self._load(h.gw, r.epoch, r.first, r.last)
        if (h.gw, h.epoch) not in self._floor:  # the tail starts above what is stored
            self._floor[(h.gw, h.epoch)] = self.store.top(h.gw, h.epoch)
        tails = self._tails.setdefault(h.gw, {})
        said = [(h.epoch, h.sealed)] + [(r.epoch, r.last) for r in held]
        now_ms = time.time_ns() // 1_000_000
        for epoch, last in said:
            if last > tails.get(epoch, -1):
                tails[epoch] = last
                self._tail_rows.append((h.gw, epoch, last, now_ms))  # written at the next flush
        self._speaks[h.gw] = (h.epoch, h.sealed, held)
        self._due[h.gw] = True  # a receipt on request, whatever the rate
        self.counters["heartbeats"] += 1
        return Outcome.HEARTBEAT

    def receipt(self, gw: str) -> list[EpochReceipt]:
        """What this worker knows the store accounts for of ``gw``: the epochs its last
        heartbeat named first (what its spool holds), then its newest,
        MAX_RECEIPT_EPOCHS in all (empty when it knows nothing of it)."""
        acct = self._acct.get(gw, {})
        known = [e for e, r in acct.items() if r.r]
        spoke = self._speaks.get(gw)
        named = {spoke[0], *(r.epoch for r in spoke[2])} if spoke else set()
        first = sorted(e for e in known if e in named)
        newest = sorted((e for e in known if e not in named), reverse=True)
        chosen = (first + newest)[:MAX_RECEIPT_EPOCHS]
        return [EpochReceipt.of(e, acct[e].r) for e in sorted(chosen)]

    def receipts_due(self, now: float | None = None) -> list[tuple[str, list[EpochReceipt]]]:
        """The receipts to send now: each gateway owed one, at most once per
        ``receipt_interval_s`` unless a heartbeat asked; marks them sent."""
        now = time.monotonic() if now is None else now
        out: list[tuple[str, list[EpochReceipt]]] = []
        for gw, asked in list(self._due.items()):
            if not asked and now - self._sent.get(gw, -math.inf) < self.receipt_interval_s:
                continue
            del self._due[gw]
            self._sent[gw] = now
            entries = self.receipt(gw)
            spoke = self._speaks.get(gw)
            if not entries and asked and spoke:  # every heartbeat is answered: "nothing yet"
                entries = [EpochReceipt(spoke[0], -1)]
            if entries:
                out.append((gw, entries))
        return out

    def event_receipts_due(self, now: float | None = None) -> list[tuple[str, list[EpochReceipt]]]:
        """The event receipts (kind "event") to send now: each gateway with an event
        stored since its last one, at most once per ``receipt_interval_s``; the newest
        MAX_RECEIPT_EPOCHS epochs this worker stored events of."""
        now = time.monotonic() if now is None else now
        out: list[tuple[str, list[EpochReceipt]]] = []
        for gw in list(self._ev_due):
            if now - self._ev_sent.get(gw, -math.inf) < self.receipt_interval_s:
                continue
            self._ev_due.discard(gw)
            self._ev_sent[gw] = now
            acct = self._ev_acct[gw]
            for old in sorted(acct)[:-MAX_RECEIPT_EPOCHS]:  # boots long gone: forgotten
                del acct[old]
            chosen = sorted(acct)
            out.append((gw, [EpochReceipt.of(e, acct[e].r) for e in chosen]))
        return out

    def holes(self, gw: str) -> dict[int, list[tuple[int, int]]]:
        """Per epoch, the seqs ``gw``'s last heartbeat says exist that the hub does not
        account for: of the ranges it still holds, and its tail (above the highest
        stored, up to the last sealed)."""
        spoke = self._speaks.get(gw)
        if spoke is None:
            return {}
        epoch, sealed, held = spoke
        want: dict[int, SeqRanges] = {}
        for r in held:
            want.setdefault(r.epoch, SeqRanges()).add(r.first, r.last)
        floor = max(self._floor.get((gw, epoch), -1), self._epoch(gw, epoch).top)
        if sealed > floor:
            want.setdefault(epoch, SeqRanges()).add(floor + 1, sealed)
        out: dict[int, list[tuple[int, int]]] = {}
        for e, w in want.items():
            have = self._epoch(gw, e)
            missing = [m for lo, hi in w.r for m in have.missing(lo, hi)]
            for refused in self._refused.get((gw, e), {}).values():  # settled: never asked
                missing = [p for a, b in missing for p in refused.missing(a, b)]
            if missing:
                out[e] = missing
        return out

    def asks_due(self, now: float | None = None) -> list[tuple[str, int, list[tuple[int, int]]]]:
        """(gateway, epoch, ranges) to ask for with a ``resend`` command now: the
        :meth:`holes` of gateways that send heartbeats (older ones cannot resend),
        missing for ``hole_grace_s``, asked for at most once per ``hole_grace_s``.
        Before asking, those ranges are read again from the store (another worker
        may have stored them)."""
        now = time.monotonic() if now is None else now
        out: list[tuple[str, int, list[tuple[int, int]]]] = []
        for gw in sorted(self._speaks):
            due = self._track(gw, now)
            if due:
                for epoch, ranges in due.items():
                    for lo, hi in ranges:
                        self._load(gw, epoch, lo, hi)
                due = self._track(gw, now)
            for epoch, ranges in sorted(due.items()):
                asked = ranges[:_MAX_ASK_RANGES]
                out.append((gw, epoch, asked))
                self._holes[(gw, epoch)] = [
                    (lo, hi, since, now if (lo, hi) in asked else when)
                    for lo, hi, since, when in self._holes[(gw, epoch)]
                ]
                self.counters["resend_asks"] += 1
        return out

    def _track(self, gw: str, now: float) -> dict[int, list[tuple[int, int]]]:
        """Update how long each hole of ``gw`` has been missing; the ones due an ask."""
        grace = self.hole_grace_s
        current = self.holes(gw)
        for key in [k for k in self._holes if k[0] == gw and k[1] not in current]:
            del self._holes[key]
        due: dict[int, list[tuple[int, int]]] = {}
        for epoch, missing in current.items():
            old = self._holes.get((gw, epoch), [])
            new: list[tuple[int, int, float, float]] = []
            for lo, hi in missing:
                since, asked = now, -math.inf
                for olo, ohi, osince, oasked in old:  # a hole that shrank keeps its age
                    if olo <= hi and lo <= ohi:
                        since, asked = min(since, osince), max(asked, oasked)
                new.append((lo, hi, since, asked))
                if since <= now - grace and asked <= now - grace:
                    due.setdefault(epoch, []).append((lo, hi))
            self._holes[(gw, epoch)] = new
        return due

    def hole_batches(self) -> int:
        """Batches missing now of what the gateways' heartbeats say exist (tail
        included): what :meth:`asks_due` asks for once the grace is over."""
        return sum(
            hi - lo + 1
            for gw in self._speaks
            for missing in self.holes(gw).values()
            for lo, hi in missing
        )

    def _not_stored(self, gw: str, g: GapRange) -> list[GapRange]:
        """A "not_held" range without the seqs the hub has (the gateway answered a
        resend ask after a receipt of them had let it delete them): a batch stored is
        never also counted dropped. A "split" range likewise (the original came before
        the notice: stored, its parts are settled as split when they come). Other
        reasons are kept as they came."""
        if g.reason not in ("not_held", "split"):
            return [g]
        self._load(gw, g.epoch, g.first, g.last)
        pieces = self._epoch(gw, g.epoch).missing(g.first, g.last)
        if pieces == [(g.first, g.last)]:
            return [g]
        return [GapRange(g.epoch, lo, hi, 0, g.reason) for lo, hi in pieces]

    def _handle_event(self, topic: str, data: bytes) -> Outcome:
        sealed = self._open(topic, data, parse_event, "event")
        if isinstance(sealed, Outcome):
            return sealed
        try:
            e = sealed.event()
        except ProtocolError as exc:
            return self._refuse(Outcome.MALFORMED_EVENT, sealed.header.gw, str(exc))
        h = sealed.header
        new = self.store.write_event(
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
            )
        )
        # written (autocommit): durable now, owed an event receipt either way
        self._ev_acct.setdefault(h.gw, {}).setdefault(h.epoch, SeqRanges()).add(h.seq, h.seq)
        self._ev_due.add(h.gw)
        if not new:
            self.counters["duplicate_events"] += 1
            return Outcome.DUPLICATE
        self.counters["events"] += 1
        log.info("event from %s: %s %s on %s (%s)", h.gw, e.rule, e.state, e.device, e.detail)
        return Outcome.EVENT

    def _handle_meta(self, topic: str, data: bytes) -> Outcome:
        meta = self._open(topic, data, envelope.parse_meta, "meta")
        if isinstance(meta, Outcome):
            return meta
        topic_gw = meta.header.gw
        try:
            points = meta.points()
        except ProtocolError as exc:
            return self._refuse(Outcome.MALFORMED_META, topic_gw, str(exc))
        self.store.write_points(
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
            ]
        )
        self.counters["meta"] += 1
        return Outcome.META

    def close(self) -> None:
        """Write what is buffered and close the store (closed even if the write fails)."""
        if not self.closed:
            try:
                self.flush()
            finally:
                self.store.close()
                self.closed = True
