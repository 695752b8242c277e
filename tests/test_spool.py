"""The spool: durable FIFO, grouped acks, bounds, gap rows, damage, full disk."""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
from pathlib import Path

import pytest

from agent.pipeline.spool import Spool, SpoolError
from protocols.gap import GapRange

MiB = 1 << 20


def _aside(d: Path) -> list[str]:
    return [
        p.name
        for p in d.iterdir()
        if ".damaged-" in p.name and not p.name.endswith(("-wal", "-shm"))
    ]


def _rows(
    epoch: int, seqs: range, size: int = 1000, n: int = 10
) -> list[tuple[int, int, int, int, bytes]]:
    return [(epoch, s, n, 1_700_000_000_000 + s, bytes([s % 256]) * size) for s in seqs]


async def test_append_is_read_back_oldest_first_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    spool = await Spool.open(path)
    stored = await spool.append(_rows(1, range(5)))
    assert len(stored) == 5
    await spool.append(_rows(2, range(3)))
    assert not spool.empty.is_set()
    await spool.close()

    spool = await Spool.open(path)
    rows = await spool.pending(0, 100)
    assert [(r.epoch, r.seq) for r in rows] == [
        (1, 0),
        (1, 1),
        (1, 2),
        (1, 3),
        (1, 4),
        (2, 0),
        (2, 1),
        (2, 2),
    ]
    assert rows[3].data == bytes([3]) * 1000
    assert spool.statistics()["depth_batches"] == 8
    # the cursor: after the third row, at most two
    assert [r.seq for r in await spool.pending(rows[2].id, 2)] == [3, 4]
    # the backlog bound
    assert [r.seq for r in await spool.pending(0, 100, upto_id=rows[1].id)] == [0, 1]
    await spool.close()


async def test_live_reads_come_from_memory_and_agree_with_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The uplink reads each batch right after it is appended: no trip to the
    spool thread for that, and never a row that SQLite would not give."""
    spool = await Spool.open(tmp_path / "spool.sqlite3")
    await spool.append(_rows(1, range(3)))
    before = await spool._call(spool._pending_sync, 0, 100, None)
    reads = []
    real = spool._pending_sync

    def counted(*args: object) -> object:
        reads.append(args)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(spool, "_pending_sync", counted)
    rows = await spool.pending(0, 100)
    assert [(r.id, r.seq, r.data) for r in rows] == [(i, s, d) for i, _, s, _, d in before]
    await spool.append(_rows(1, range(3, 5)))
    assert [r.seq for r in await spool.pending(rows[-1].id, 1)] == [3]
    assert reads == []  # all from memory
    # acknowledged (and then deleted) rows never come back
    live = await spool.pending(rows[-1].id, 100)
    spool.ack([live[0].id])
    assert [r.seq for r in await spool.pending(rows[-1].id, 100)] == [4]
    await spool.flush_acks()
    # (memory no longer starts right after the cursor: SQLite says what is there)
    assert [r.seq for r in await spool.pending(rows[-1].id, 100)] == [4]
    # older than what memory holds, or the backlog bound: SQLite
    assert [r.seq for r in await spool.pending(0, 100)] == [0, 1, 2, 4]
    assert [r.seq for r in await spool.pending(0, 100, upto_id=rows[1].id)] == [0, 1]
    assert len(reads) == 3
    await spool.close()


async def test_dropped_batches_are_not_served_from_memory(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "spool.sqlite3", max_bytes=MiB)
    await spool.append(_rows(1, range(5), size=100_000))  # 500 kB
    first = await spool.pending(0, 100)
    await spool.append(_rows(1, range(5, 13), size=100_000))  # 1.3 MB: the oldest go
    left = [r.seq for r in await spool.pending(first[0].id - 1, 100)]
    assert left == [r.seq for r in await spool.pending(0, 100, upto_id=10**9)]
    assert 0 not in left and left[-1] == 12
    await spool.close()


async def test_acks_are_grouped_and_deleted_on_flush(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    spool = await Spool.open(path)
    await spool.append(_rows(1, range(4)))
    rows = await spool.pending(0, 10)
    spool.ack([rows[0].id, rows[1].id])
    # acknowledged rows are no longer pending, even before the delete is committed
    assert [r.seq for r in await spool.pending(0, 10)] == [2, 3]
    assert spool.statistics()["depth_batches"] == 2
    assert not spool.empty.is_set()
    spool.ack([r.id for r in rows[2:]])
    spool.ack([rows[3].id])  # a second PUBACK for the same batch changes nothing
    assert spool.empty.is_set()
    assert spool.statistics()["acked"] == 4
    await spool.flush_acks()
    await spool.close()
    spool = await Spool.open(path)
    assert await spool.pending(0, 10) == []
    await spool.close()


async def test_close_deletes_what_was_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    spool = await Spool.open(path)
    await spool.append(_rows(1, range(3)))
    spool.ack([(await spool.pending(0, 1))[0].id])
    await spool.close()
    spool = await Spool.open(path)
    assert [r.seq for r in await spool.pending(0, 10)] == [1, 2]
    await spool.close()


def _on_disk(path: Path) -> int:
    """What the spool's files take on disk (database, WAL, WAL index, reserve)."""
    return sum(
        p.stat().st_blocks * 512
        for p in (Path(f"{path}{s}") for s in ("", "-wal", "-shm", "-reserve"))
        if p.exists()
    )


async def test_over_max_bytes_drops_the_oldest_and_writes_gap_rows(tmp_path: Path) -> None:
    """``max_bytes`` bounds the files on disk (database, WAL, index, reserve), not the
    payload: 10 kB batches into a 2 MiB spool, checked after every append."""
    path = tmp_path / "s.sqlite3"
    spool = await Spool.open(path, max_bytes=2 * MiB)
    total = 0
    for i in range(40):
        await spool.append(_rows(3, range(i * 8, i * 8 + 8), size=10_000))
        total += 8
        assert _on_disk(path) <= 2 * MiB
    st = spool.statistics()
    assert st["dropped_batches"] > 0 and st["dropped_spool_full"] == st["dropped_batches"]
    assert st["dropped_readings"] == 10 * st["dropped_batches"]
    assert st["depth_batches"] + st["dropped_batches"] == total
    assert st["disk_bytes"] <= 2 * MiB
    # the bound is not met by keeping nothing: most of it holds batches
    assert st["depth_bytes"] > MiB
    left = [r.seq for r in await spool.pending(0, 1000)]
    assert left == list(range(total - len(left), total))  # the newest, in order
    gaps = await spool.gaps()
    # a gap row per append that dropped, together the oldest batches, all named
    assert all(g.reason == "spool_full" and g.epoch == 3 for _, g in gaps)
    assert [(g.first, g.last) for _, g in gaps] == sorted((g.first, g.last) for _, g in gaps)
    assert gaps[0][1].first == 0 and gaps[-1][1].last == st["dropped_batches"] - 1
    assert sum(g.last - g.first + 1 for _, g in gaps) == st["dropped_batches"]
    assert sum(g.readings for _, g in gaps) == st["dropped_readings"]
    assert spool.news.take()
    await spool.gaps_sent([i for i, _ in gaps])
    assert await spool.gaps() == []
    assert not spool.has_gaps
    totals = await spool.totals()
    assert totals["dropped_batches"] == st["dropped_batches"]
    await spool.close()


async def test_gap_ranges_split_at_holes_and_epochs(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "s.sqlite3", max_bytes=1 << 20, max_age_s=0.0)
    await spool.append([*_rows(1, range(0, 3)), *_rows(1, range(5, 7)), *_rows(2, range(2))])
    # a batch of the spool acknowledged in memory only is delivered, not dropped
    await spool.expire()
    gaps = [g for _, g in await spool.gaps()]
    assert gaps == [
        GapRange(1, 0, 2, 30, "too_old"),
        GapRange(1, 5, 6, 20, "too_old"),
        GapRange(2, 0, 1, 20, "too_old"),
    ]
    assert spool.statistics()["depth_batches"] == 0
    assert spool.empty.is_set()
    await spool.close()


async def test_gap_rows_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    spool = await Spool.open(path, max_bytes=MiB)
    await spool.append(_rows(1, range(4), size=300_000))
    await spool.close()
    spool = await Spool.open(path, max_bytes=MiB)
    assert spool.has_gaps and spool.news.take()
    assert [g for _, g in await spool.gaps()] == [GapRange(1, 0, 1, 20, "spool_full")]
    await spool.close()


async def test_full_disk_drops_the_oldest_instead_of_failing(tmp_path: Path) -> None:
    # max_page_count stands in for a full file system: SQLite answers SQLITE_FULL
    spool = await Spool.open(tmp_path / "s.sqlite3", max_page_count=60)
    stored = 0
    for i in range(60):
        stored += len(await spool.append(_rows(1, range(i * 4, i * 4 + 4), size=3000)))
    st = spool.statistics()
    assert stored == 240  # every batch went in, the oldest made room
    assert st["dropped_disk_full"] > 0
    assert st["depth_batches"] + st["dropped_batches"] == 240
    gaps = [g for _, g in await spool.gaps(1000)]
    assert gaps and all(g.reason == "disk_full" for g in gaps)
    assert gaps[0].first == 0
    assert sum(g.last - g.first + 1 for g in gaps) == st["dropped_batches"]
    # what is left is the newest, in order
    seqs = [r.seq for r in await spool.pending(0, 1000)]
    assert seqs == list(range(240 - len(seqs), 240))
    await spool.close()


async def test_batch_bigger_than_the_disk_is_reported_lost(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "s.sqlite3", max_page_count=12)
    stored = await spool.append(_rows(5, range(2), size=200_000))
    assert stored == []
    assert spool.statistics()["dropped_disk_full"] == 2
    gaps = [g for _, g in await spool.gaps()]
    # given up one by one, each reported
    assert gaps == [GapRange(5, 0, 0, 10, "disk_full"), GapRange(5, 1, 1, 10, "disk_full")]
    await spool.close()


@pytest.mark.parametrize("damage", ["truncated", "random_bytes", "zeroed_header"])
async def test_damaged_spool_is_moved_aside_and_a_fresh_one_started(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.sqlite3"
    spool = await Spool.open(path)
    await spool.append(_rows(1, range(40), size=2000))
    await spool.close()
    size = path.stat().st_size
    rng = random.Random(7)
    if damage == "truncated":
        with path.open("r+b") as f:
            f.truncate(size // 2)
    elif damage == "random_bytes":
        path.write_bytes(rng.randbytes(size))
    else:
        with path.open("r+b") as f:
            f.write(b"\0" * 100)
    with caplog.at_level(logging.ERROR, logger="agent.pipeline.spool"):
        spool = await Spool.open(path)
    assert spool.statistics()["moved_aside"] == 1
    assert any(
        "damaged" in r.getMessage() and "moved it aside" in r.getMessage() for r in caplog.records
    )
    assert len(_aside(tmp_path)) == 1
    # the fresh spool works and remembers the count
    assert await spool.pending(0, 10) == []
    assert len(await spool.append(_rows(2, range(3)))) == 3
    assert (await spool.totals())["moved_aside"] == 1
    await spool.close()


async def test_a_sound_spool_is_not_moved(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    spool = await Spool.open(path)
    await spool.append(_rows(1, range(3)))
    await spool.close()
    spool = await Spool.open(path)
    assert spool.statistics()["moved_aside"] == 0
    assert _aside(tmp_path) == []
    await spool.close()


async def test_unknown_durability_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SpoolError, match="durability"):
        await Spool.open(tmp_path / "s.sqlite3", durability="sometimes")


@pytest.mark.parametrize(("durability", "level"), [("full", 2), ("normal", 1), ("off", 0)])
async def test_durability_sets_sqlite_synchronous(
    tmp_path: Path, durability: str, level: int
) -> None:
    path = tmp_path / "s.sqlite3"
    spool = await Spool.open(path, durability=durability)
    await spool.append(_rows(1, range(1)))
    spool.ack([(await spool.pending(0, 1))[0].id])
    await spool.flush_acks()  # acks commit with synchronous=OFF, then the policy is back
    assert spool._db is not None
    assert spool._db.execute("PRAGMA synchronous").fetchone()[0] == level
    await spool.close()
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


async def test_drops_across_appends_extend_one_gap_row_unless_it_is_being_sent(
    tmp_path: Path,
) -> None:
    """A long outage at the bound drops at every append: one gap row per run of
    dropped batches, not one per append; a row already in a notice on its way is
    never extended (its delete on PUBACK would take the extension with it)."""
    spool = await Spool.open(tmp_path / "s.sqlite3", max_bytes=MiB)
    for i in range(30):
        await spool.append(_rows(1, range(i * 4, i * 4 + 4), size=10_000))
    dropped = spool.statistics()["dropped_batches"]
    assert dropped > 8
    gaps = await spool.gaps()  # handed to the uplink: on its way
    assert [g for _, g in gaps] == [GapRange(1, 0, dropped - 1, 10 * dropped, "spool_full")]
    for i in range(30, 40):
        await spool.append(_rows(1, range(i * 4, i * 4 + 4), size=10_000))
    more = spool.statistics()["dropped_batches"]
    later = await spool.gaps()
    assert [g for _, g in later] == [
        GapRange(1, 0, dropped - 1, 10 * dropped, "spool_full"),
        GapRange(1, dropped, more - 1, 10 * (more - dropped), "spool_full"),
    ]
    await spool.gaps_sent([gaps[0][0]])
    assert [g for _, g in await spool.gaps()] == [g for _, g in later[1:]]
    await spool.close()


async def test_sent_rows_wait_for_a_receipt_across_a_restart(tmp_path: Path) -> None:
    """Receipts on: a PUBACK marks a row sent (persisted), the live read skips it, a
    restart keeps it sent; only a receipt's spans delete rows; a split swaps a row for
    its parts and a 'split' gap row at once."""
    path = tmp_path / "spool.sqlite3"
    spool = await Spool.open(path, durability="normal")
    await spool.append(_rows(1, range(6)))
    first = await spool.pending(0, 10)
    spool.mark_sent([r.id for r in first[:4]])
    await spool.flush_acks()
    assert [r.seq for r in await spool.pending(0, 10)] == [4, 5]
    assert spool.statistics()["sent_unconfirmed"] == 4 and not spool.empty.is_set()
    await spool.close()

    spool = await Spool.open(path, durability="normal")
    assert [r.seq for r in await spool.pending(0, 10)] == [4, 5], "sent stays sent"
    assert spool.statistics()["sent_unconfirmed"] == 4
    assert await spool.held_ranges() == [(1, 0, 5)]
    assert spool.overdue(3600.0) == [] and len(spool.overdue(0.0)) == 4
    assert await spool.confirm([(1, 0, 1), (1, 3, 3), (2, 0, 99)]) == 3
    assert await spool.held_ranges() == [(1, 2, 2), (1, 4, 5)]
    assert spool.statistics()["sent_unconfirmed"] == 1 and spool.confirmed == 3
    (row,) = [r for r in await spool.rows([first[2].id]) if r.seq == 2]
    parts = _rows(1, range(6, 8), size=500, n=5)
    assert await spool.split(row, parts)
    assert await spool.held_ranges() == [(1, 4, 7)]
    assert spool.statistics()["sent_unconfirmed"] == 0
    gaps = await spool.gaps()
    assert [(g.first, g.last, g.readings, g.reason) for _, g in gaps] == [(2, 2, 10, "split")]
    assert await spool.confirm([(1, 0, 7)]) == 4
    assert spool.empty.is_set()
    await spool.close()


async def test_the_spools_news_coalesces_and_names_what_to_send(tmp_path: Path) -> None:
    """The uplink's one wake-up: a token the spool sends (appends, gap rows, batches due
    again), that never grows however often it is sent while the uplink is busy."""
    spool = await Spool.open(tmp_path / "s.sqlite3", durability="off")
    assert spool.news.take()  # at open: whatever it holds from before
    assert not spool.news.take()
    for i in range(50):
        await spool.append(_rows(1, range(i, i + 1)))
    assert spool.news.take() and not spool.news.take()  # 50 appends, one token
    assert spool.news.statistics()["dropped"] == 49
    await spool.append([])  # nothing stored, no gap rows: no news
    assert not spool.news.take()

    rows = await spool.pending(0, 10)
    spool.mark_sent([r.id for r in rows])
    assert spool.due(10) == []
    # the hub asks for two of them: due again, and the uplink is woken
    assert spool.resend([rows[0].id, rows[1].id]) == [rows[0].id, rows[1].id]
    assert spool.news.take()
    assert spool.due(1) == [rows[0].id] and spool.due(10) == [rows[1].id]
    assert spool.due(10) == []
    spool.send_again([rows[2].id])  # no receipt in time
    assert spool.news.take() and spool.due(10) == [rows[2].id]
    spool.send_again([])
    assert not spool.news.take()
    await spool.close()


async def test_gap_rows_written_while_a_notice_is_out_wake_the_uplink_again(
    tmp_path: Path,
) -> None:
    spool = await Spool.open(tmp_path / "s.sqlite3", durability="off")
    spool.news.take()
    await spool.note_gaps([GapRange(1, 0, 0, 0, "not_held")])
    assert spool.news.take() and spool.has_gaps
    out = await spool.gaps()  # the notice goes out with this row...
    await spool.note_gaps([GapRange(1, 5, 5, 0, "not_held")])  # ...and one more is written
    spool.news.take()
    await spool.gaps_sent([i for i, _ in out])
    assert spool.has_gaps and spool.news.take()  # the second needs a notice of its own
    await spool.gaps_sent([i for i, _ in await spool.gaps()])
    assert not spool.has_gaps and not spool.news.take()
    await spool.close()


async def test_the_stops_drain_waits_on_what_the_spool_tells(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The stop's drain (agent.service) is woken by the spool's progress, no polling: a
    receipt that empties the spool ends it; every batch sent and no receipt: the grace
    ends it, not the stop's bound (60 s here)."""
    from agent.ops.config import parse_config
    from agent.service import Agent

    caplog.set_level(logging.INFO, logger="agent.service")
    cfg = parse_config(
        {"gateway": {"id": "gw-drain", "state_dir": str(tmp_path)}}, source="<drain>", base=tmp_path
    )
    agent = Agent(cfg)
    agent.spool = spool = await Spool.open(tmp_path / "s.sqlite3", durability="off")
    await spool.append(_rows(1, range(3)))
    rows = await spool.pending(0, 10)
    assert spool.unsent == 3 and spool.progress.take()
    spool.mark_sent([rows[0].id])
    assert spool.unsent == 2 and spool.progress.take() and not spool.progress.take()
    loop = asyncio.get_running_loop()
    drain = asyncio.create_task(agent._drain(loop.time() + 60))
    await asyncio.sleep(0)
    assert not drain.done()  # it waits for the spool
    spool.mark_sent([rows[1].id])
    assert spool.unsent == 1 and not drain.done()
    assert await spool.confirm([(1, 0, 2)]) == 3  # the receipt, the last PUBACK still out
    await asyncio.wait_for(drain, 30)
    assert spool.empty.is_set()
    assert "without the hub's receipt" not in caplog.text

    await spool.append(_rows(2, range(2)))
    spool.mark_sent([r.id for r in await spool.pending(0, 10)])
    assert spool.unsent == 0 and not spool.empty.is_set()
    await asyncio.wait_for(agent._drain(loop.time() + 60), 30)
    assert "stopping: 2 sent batches without the hub's receipt yet" in caplog.text
    await spool.close()


async def test_keep_spools_what_waits_in_the_channel_in_one_append(tmp_path: Path) -> None:
    """`Spool.keep` (the writer loop, issue 20): the sealed batches that wait go in one
    append (one fsync), later ones as they come; the channel closed and emptied, it ends."""
    from agent.pipeline.batcher import Sealed
    from agent.pipeline.channel import Channel

    spool = await Spool.open(tmp_path / "s.sqlite3", durability="off")
    calls: list[int] = []
    append = spool.append

    async def counted(batches):  # type: ignore[no-untyped-def]
        calls.append(len(batches))
        return await append(batches)

    spool.append = counted  # type: ignore[method-assign]
    sealed: Channel[Sealed] = Channel(64)
    for epoch, seq, n, t0, data in _rows(3, range(3)):
        await sealed.send(Sealed(epoch, seq, n, t0, data))
    spool.news.take()  # the open's news
    keep = asyncio.create_task(spool.keep(sealed))
    assert await asyncio.wait_for(spool.news.wait(), 30)  # the first append is done
    assert spool.appended == 3
    (epoch, seq, n, t0, data) = _rows(3, range(3, 4))[0]
    await sealed.send(Sealed(epoch, seq, n, t0, data))
    sealed.close()
    await asyncio.wait_for(keep, 30)
    assert calls == [3, 1]
    assert [r.seq for r in await spool.pending(0, 10)] == [0, 1, 2, 3]
    await spool.close()
