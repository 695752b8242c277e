"""The batcher: readings in, sealed batches out.

The open batch is kept as the buses hand it on, as columns
(:class:`protocols.reading.Columns`, decisions 47), and the payload's layout 2
encodes them as they are. A batch is sealed when it holds ``max_readings``
readings or when its oldest reading is ``max_age_s`` old, whichever comes first. Sealing (msgpack + Ed25519)
happens here, once. Sealed batches go to the spool writer through a closable
channel (:attr:`Batcher.sealed`, :class:`agent.pipeline.channel.Channel`): a batch is in
it the moment it is sealed (so cancelling a bus task can never lose one), and
when it is full the buses wait, so a slow disk slows the buses down instead of
eating memory. :meth:`Batcher.close` seals what is open and closes the channel:
the writer spools what is left in it and ends.

Clock truth (:mod:`agent.clock`): a batch holds readings of one clock state
only. While the gateway's clock is unsynchronised its batches say so
(``"clock": "unsynced"``); when it syncs, the open batch is sealed, and the
next :data:`FIX_BATCHES` batches carry the clock's correction for this epoch,
under their signature, through the spool, to the hub.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from operator import itemgetter

from agent.clock import Clock
from agent.pipeline.channel import Channel
from protocols import envelope
from protocols.ed25519 import PrivateKey
from protocols.payload import Encoding
from protocols.reading import Columns, Reading

__all__ = ["FIX_BATCHES", "Batcher", "Sealed"]

# batches after a sync that carry the correction: the spool drops oldest first, so
# while any unsynchronised batch is left to correct, these are behind it
FIX_BATCHES = 64

log = logging.getLogger(__name__)

_ts = itemgetter(1)  # Reading.ts


@dataclass(frozen=True, slots=True)
class Sealed:
    """A sealed batch on its way to the spool."""

    epoch: int
    seq: int
    n: int
    t0: int
    data: bytes


class Batcher:
    def __init__(
        self,
        *,
        gateway: str,
        key: PrivateKey,
        epoch: int,
        max_readings: int,
        max_age_s: float,
        encoding: Encoding,
        clock: Clock,
        max_pending: int = 64,
        observe: Callable[[Iterable[Reading]], None] | None = None,
    ) -> None:
        self._gateway = gateway
        #: who else looks at each reading on its way in (the edge rules), before it is taken
        self._observe = observe
        self._key = key
        self._epoch = epoch
        self._max = max_readings
        self._max_age = max_age_s
        self._enc = encoding
        self._clock = clock
        #: sealed batches on their way to the spool writer, its only receiver
        self.sealed: Channel[Sealed] = Channel(max_pending)
        # the open batch as columns, as the buses hand them (decisions 47)
        self._open = Columns()
        self._opened_at = 0.0
        self._seq = 0
        self._wake = asyncio.Event()
        self.readings_in = 0
        self.batches_sealed = 0
        # test clocks without a sync state are synchronised
        self._synced: bool = getattr(clock, "synced", True)
        self._fix: tuple[int, int, int] | None = None  # (offset_ms, until, last_seq)
        self._fix_left = 0

    @property
    def next_seq(self) -> int:
        return self._seq

    def statistics(self) -> dict[str, int]:
        return {
            "readings_in": self.readings_in,
            "open_readings": len(self._open),
            "batches_sealed": self.batches_sealed,
            "sealed_waiting": len(self.sealed),
            # 0 while readings are stamped from the monotonic clock (no NTP sync yet)
            "clock_synced": int(self._synced),
        }

    async def add(self, readings: Iterable[Reading]) -> None:
        """Add readings; seals (and waits for room in the spool queue) when full.

        The buses' sink: :class:`~protocols.reading.Columns` from the pollers, a list
        from the serial sensors (the observer walks them first: not a one-shot iterator).
        """
        if self._observe is not None:
            self._observe(readings)
        items = Columns.of(readings)
        if getattr(self._clock, "synced", True) is not self._synced:
            await self._clock_changed()
        done, n = 0, len(items)
        while done < n:
            if not self._open:
                self._opened_at = self._clock.monotonic()
                self._wake.set()
            take = min(n - done, self._max - len(self._open))
            self._open.extend(items[done : done + take] if take < n else items)
            self.readings_in += take
            done += take
            if len(self._open) >= self._max:
                await self._seal()

    async def flush(self) -> None:
        """Seal whatever is open."""
        if self._open:
            await self._seal()

    async def close(self) -> None:
        """At a stop, once the buses are stopped: seal what is open and close
        :attr:`sealed`, so the spool writer ends once it has spooled every batch."""
        await self.flush()
        self.sealed.close()

    def take(self, limit: int) -> list[Sealed]:
        """Up to ``limit`` sealed batches, oldest first, now (``[]``: none waits)."""
        return self.sealed.take(limit)

    def reseal(
        self,
        readings: list[Reading],
        *,
        unsynced: bool,
        split_of: tuple[int, int] | None = None,
        parts: int = 2,
    ) -> list[Sealed]:
        """``readings`` of a batch that could not pass, sealed again as ``parts`` batches
        with new seqs of this epoch (returned, not queued: the spool swaps them in),
        each naming ``split_of`` (that batch's epoch and seq) in its header."""
        size = -(-len(readings) // parts)
        out: list[Sealed] = []
        for i in range(0, len(readings), size):
            chunk = readings[i : i + size]
            seq = self._seq
            self._seq += 1
            data = envelope.seal(
                chunk,
                gateway=self._gateway,
                key=self._key,
                epoch=self._epoch,
                seq=seq,
                enc=self._enc,
                unsynced=unsynced,
                split_of=split_of,
            )
            out.append(Sealed(self._epoch, seq, len(chunk), min(map(_ts, chunk)), data))
        self.batches_sealed += len(out)
        return out

    async def run(self) -> None:
        """Seal batches that reach their maximum age. Runs until cancelled."""
        while True:
            if not self._open:
                self._wake.clear()
                await self._wake.wait()
                continue
            due = self._opened_at + self._max_age
            delay = due - self._clock.monotonic()
            if delay > 0:
                await self._clock.sleep(delay)
                continue
            await self._seal()

    async def _clock_changed(self) -> None:
        """Seal what was stamped in the old clock state; after a sync, carry the fix.

        The fix names the batches it corrects (``seq <= last_seq``) and the stamps
        (``ts < until``). A clock that was behind (the usual case: a Pi booting
        with an old time) stamps after the sync at ``until + offset`` and later,
        so the first batch after the sync is included: readings stamped just
        before the sync and handed over just after it are corrected too.
        """
        if self._open:
            await self._seal()
        self._synced = not self._synced
        fix = getattr(self._clock, "fix", None)
        if self._synced and fix is not None:
            last = self._seq if fix.offset_ms > 0 else self._seq - 1
            if last >= 0:
                self._fix, self._fix_left = (fix.offset_ms, fix.until, last), FIX_BATCHES

    async def _seal(self) -> None:
        readings, self._open = self._open, Columns()
        seq = self._seq
        self._seq += 1
        data = envelope.seal(
            readings,
            gateway=self._gateway,
            key=self._key,
            epoch=self._epoch,
            seq=seq,
            enc=self._enc,
            unsynced=not self._synced,
            fix=self._fix if self._fix_left > 0 else None,
        )
        if self._fix_left > 0:
            self._fix_left -= 1
        t0 = min(readings.stamps)
        self.batches_sealed += 1
        # in the channel at once; only the wait for room that follows is cancellable
        await self.sealed.send(Sealed(self._epoch, seq, len(readings), t0, data))
