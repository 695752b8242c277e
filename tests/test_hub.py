"""The reference hub: dedup by (gateway, epoch, seq), gaps, gap notices, stats."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sqlite3
import time
from pathlib import Path

import msgpack
import pytest

from agent.pipeline.uplink import gap_topic
from hub.core import HubCore
from hub.stats import hub_stats
from hub.store import open_readings, shard_dir, shards
from protocols import envelope, topics
from protocols.ed25519 import PrivateKey
from protocols.envelope import sign_message
from protocols.errors import DecodeError, FrameError, LocalError, SignatureError
from protocols.gap import GAP_DOMAIN, GapRange, parse_gap, seal_gap
from protocols.reading import Quality, Reading
from simulator.broker import MosquittoBroker

GW = "gw-hub-1"
KEY = PrivateKey.from_private_bytes(bytes(range(32)))
PUB = KEY.public_key().public_bytes_raw()

T0 = time.time_ns() // 1_000_000 - 3_600_000  # an hour ago: inside the hub's age window


def _batch(epoch: int, seq: int, n: int = 3) -> bytes:
    rs = [Reading(point=i, ts=T0 + seq * 1000 + i, value=float(i)) for i in range(n)]
    return envelope.seal(rs, gateway=GW, key=KEY, epoch=epoch, seq=seq)


@pytest.fixture
def core(tmp_path: Path) -> HubCore:
    c = HubCore(tmp_path / "hub.sqlite3", flush_readings=10)
    c.enroll(GW, PUB)
    return c


def test_duplicates_are_dropped_and_counted(core: HubCore, tmp_path: Path) -> None:
    t = topics.batch(GW)
    assert core.handle(t, _batch(1, 0)) == "stored"
    assert core.handle(t, _batch(1, 1)) == "stored"
    assert core.handle(t, _batch(1, 0)) == "duplicate"
    assert core.handle(t, _batch(2, 0)) == "stored"  # a new epoch starts its seqs again
    core.close()
    s = hub_stats(tmp_path / "hub.sqlite3")
    assert (s["batches"], s["readings"], s["duplicates"], s["duplicate_readings"]) == (3, 9, 1, 3)
    assert s["gateways"][GW]["epochs"]["1"]["batches"] == 2


def test_dedup_survives_a_hub_restart(core: HubCore, tmp_path: Path) -> None:
    t = topics.batch(GW)
    core.handle(t, _batch(4, 7))
    core.close()
    again = HubCore(tmp_path / "hub.sqlite3")
    assert again.handle(t, _batch(4, 7)) == "duplicate"
    assert again.delivered(GW) == {(4, 7)}
    again.close()


def test_writes_are_buffered_until_flush(core: HubCore, tmp_path: Path) -> None:
    core.handle(topics.batch(GW), _batch(1, 0))
    assert core.buffered == 1
    core.flush()
    assert core.buffered == 0
    assert hub_stats(tmp_path / "hub.sqlite3")["gateways"][GW]["readings"] == 3
    core.close()


def test_missing_ranges_and_dropped_by_gateway(core: HubCore, tmp_path: Path) -> None:
    t = topics.batch(GW)
    for seq in (0, 1, 4, 5, 9):
        core.handle(t, _batch(1, seq))
    notice = seal_gap([GapRange(1, 2, 3, 6, "spool_full")], gateway=GW, key=KEY, epoch=2)
    assert core.handle(gap_topic(GW), notice) == "gap"
    assert core.handle(gap_topic(GW), notice) == "gap"  # idempotent
    core.close()
    s = hub_stats(tmp_path / "hub.sqlite3")
    e = s["gateways"][GW]["epochs"]["1"]
    assert e["missing"] == [[6, 8]]
    assert e["dropped_by_gateway"] == [
        {"first": 2, "last": 3, "readings": 6, "reason": "spool_full"}
    ]
    assert s["gateways"][GW]["missing_batches"] == 3
    assert s["gateways"][GW]["dropped_batches"] == 2
    assert s["gap_notices"] == 2


def test_a_dropped_range_of_an_epoch_with_nothing_delivered(core: HubCore, tmp_path: Path) -> None:
    notice = seal_gap([GapRange(3, 0, 4, 50, "too_old")], gateway=GW, key=KEY, epoch=5)
    core.handle(gap_topic(GW), notice)
    core.close()
    e = hub_stats(tmp_path / "hub.sqlite3")["gateways"][GW]["epochs"]["3"]
    assert (e["batches"], e["last_seq"], e["missing"]) == (0, 4, [])


def test_forged_or_misrouted_gap_notices_are_refused(core: HubCore, tmp_path: Path) -> None:
    other = PrivateKey.generate()
    forged = seal_gap([GapRange(1, 0, 9, 1, "spool_full")], gateway=GW, key=other, epoch=1)
    assert core.handle(gap_topic(GW), forged) == "unknown_key"
    good = seal_gap([GapRange(1, 0, 9, 1, "spool_full")], gateway=GW, key=KEY, epoch=1)
    assert core.handle(gap_topic("gw-other"), good) == "topic_mismatch"
    # a batch signature does not verify as a gap notice (domain separation)
    m = envelope.parse_message(good)
    swapped = msgpack.packb(
        [
            1,
            m.protected,
            m.payload,
            KEY.sign(envelope.signed_bytes("vitals/batch/v1", m.protected, m.payload)),
        ]
    )
    assert core.handle(gap_topic(GW), swapped) == "bad_signature"
    assert core.handle(gap_topic(GW), b"\x93junk") == "malformed_gap"
    core.close()
    s = hub_stats(tmp_path / "hub.sqlite3")
    # enrolled, so listed, but nothing refused counted for it
    assert s["gateways"] == {
        GW: {
            "batches": 0,
            "readings": 0,
            "missing_batches": 0,
            "dropped_batches": 0,
            "split_batches": 0,
            "refused_batches": 0,
            "epochs": {},
        }
    }
    assert s["rejected"] == {
        "unknown_key": 1,
        "topic_mismatch": 1,
        "bad_signature": 1,
        "malformed_gap": 1,
    }


def test_corrupted_batch_is_rejected_not_stored(core: HubCore, tmp_path: Path) -> None:
    data = bytearray(_batch(1, 0))
    data[-10] ^= 0x01
    assert core.handle(topics.batch(GW), bytes(data)) == "bad_signature"
    assert core.delivered(GW) == set()
    core.close()


def test_gap_codec_round_trip_and_strictness() -> None:
    ranges = [GapRange(1, 0, 3, 40, "spool_full"), GapRange(2, 5, 5, 10, "disk_full")]
    data = seal_gap(ranges, gateway=GW, key=KEY, epoch=2)
    g = parse_gap(data)
    g.verify(PUB)
    assert g.ranges() == ranges
    assert (g.header.gw, g.header.epoch, g.header.n) == (GW, 2, 2)
    with pytest.raises(SignatureError):
        g.verify(PrivateKey.generate().public_key().public_bytes_raw())
    # n disagrees with the payload
    prot = {"gw": GW, "kid": envelope.key_id(KEY), "epoch": 2, "n": 3, "enc": "msgpack"}
    bad = sign_message(GAP_DOMAIN, prot, msgpack.packb([[1, 0, 3, 40, "spool_full"]]), KEY)
    with pytest.raises(DecodeError):
        parse_gap(bad).ranges()
    # first > last, unknown reason
    for item in ([1, 5, 3, 0, "spool_full"], [1, 0, 3, 0, "bored"], [1, 0, 3, -1, "too_old"]):
        prot["n"] = 1
        bad = sign_message(GAP_DOMAIN, prot, msgpack.packb([item]), KEY)
        with pytest.raises(DecodeError):
            parse_gap(bad).ranges()
    with pytest.raises(FrameError):
        parse_gap(envelope.seal([Reading(0, 1, 1.0)], gateway=GW, key=KEY, epoch=1, seq=0))


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_two_workers_store_overlapping_batches_exactly_once(tmp_path: Path, sharded: bool) -> None:
    """A redelivered batch can land on the other worker of a shared subscription:
    the claim in the shared file decides, whichever worker flushes first."""
    db = tmp_path / "hub.sqlite3"
    w0 = HubCore(db, worker="w0", sharded=sharded)
    w0.enroll(GW, PUB)
    w1 = HubCore(db, worker="w1", sharded=sharded)
    t = topics.batch(GW)
    for seq in range(6):  # w0: seqs 0-5, w1: seqs 3-8; both buffer 3-5 before either flushes
        assert w0.handle(t, _batch(1, seq)) == "stored"
    for seq in range(3, 9):
        assert w1.handle(t, _batch(1, seq)) == "stored"
    w1.flush()  # w1 claims 3-8 first
    w0.flush()  # w0's 3-5 are duplicates now
    assert w0.handle(t, _batch(1, 7)) == "stored"  # not in w0's memory: the claim decides
    w0.close()
    w1.close()
    s = hub_stats(db)
    assert (s["batches"], s["readings"]) == (9, 27)
    assert (s["duplicates"], s["duplicate_readings"]) == (4, 12)
    assert s["gateways"][GW]["missing_batches"] == 0
    con = open_readings(db)
    try:
        per_batch = dict(con.execute("SELECT seq, count(*) FROM readings GROUP BY seq"))
        owners = dict(con.execute("SELECT seq, worker FROM batches"))
    finally:
        con.close()
    assert per_batch == dict.fromkeys(range(9), 3)
    assert owners == {**dict.fromkeys(range(3), "w0"), **dict.fromkeys(range(3, 9), "w1")}
    # a restarted worker knows every claim, whoever made it
    again = HubCore(db, worker="w0", sharded=sharded)
    assert again.handle(t, _batch(1, 8)) == "duplicate"
    assert again.delivered(GW) == {(1, s) for s in range(9)}
    again.close()


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_stored_rows_are_the_batches_readings(tmp_path: Path, sharded: bool) -> None:
    """The insert binds a hundred readings a statement and the rest one by one: every
    reading of a batch of 257 (points repeat: layout 1) and of one of 300 (each point
    once: layout 2) is one row, every kind of value and quality as it came."""
    db = tmp_path / "hub.sqlite3"
    core = HubCore(db, sharded=sharded)
    core.enroll(GW, PUB)
    values: list[object] = [1.5, 7, True, "on", None, -0.25]
    mixed = [
        Reading(
            i % 9,
            T0 + i,
            values[i % 6],
            Quality.COMM_ERROR if values[i % 6] is None else Quality(i % 3),
        )
        for i in range(257)
    ]
    once = [Reading(i, T0 + 1000 + i // 30, i / 10) for i in range(300)]
    t = topics.batch(GW)
    for seq, rs in enumerate((mixed, once)):
        assert core.handle(t, envelope.seal(rs, gateway=GW, key=KEY, epoch=1, seq=seq)) == "stored"
    core.close()
    con = open_readings(db)
    try:
        rows = con.execute(
            "SELECT gw, point, ts, value, quality, epoch, seq FROM readings ORDER BY seq, ts, rowid"
        ).fetchall()
    finally:
        con.close()
    want = [(seq, r) for seq, rs in enumerate((mixed, once)) for r in rs]
    want.sort(key=lambda sr: (sr[0], sr[1].ts))
    assert rows == [(GW, r.point, r.ts, r.value, int(r.quality), 1, seq) for seq, r in want]


def test_shard_rows_without_a_claim_are_not_readings(tmp_path: Path) -> None:
    """A worker that dies between its shard commit and its claim leaves orphans behind."""
    db = tmp_path / "hub.sqlite3"
    core = HubCore(db, worker="w0", sharded=True)
    core.enroll(GW, PUB)
    core.handle(topics.batch(GW), _batch(1, 0))
    core.close()
    shard = sqlite3.connect(shard_dir(db) / "w0.sqlite3")
    with shard:
        shard.execute("INSERT INTO readings VALUES (?, 0, ?, 1.0, 0, 1, 1)", (GW, T0))
    shard.close()
    assert list(shards(db)) == ["w0"]
    con = open_readings(db)
    try:
        assert con.execute("SELECT count(*) FROM readings").fetchone()[0] == 3
    finally:
        con.close()


def test_a_sharded_worker_needs_a_file_safe_name(tmp_path: Path) -> None:
    with pytest.raises(LocalError):
        HubCore(tmp_path / "hub.sqlite3", worker="../evil", sharded=True)


def test_every_signed_kind_is_refused_the_same_way(core: HubCore) -> None:
    """Meta, gap notices and events go through one check: a forged signature is
    bad_signature for each, a stranger's key unknown_key, another gateway's topic
    topic_mismatch."""
    from protocols.event import Event, seal_event
    from protocols.payload import PointInfo

    stranger = PrivateKey.generate()
    point = PointInfo(0, "noise-1", "laeq", "dB(A)", "environment", "noise", "LAeq")
    event = Event("loud", "threshold", "fired", "noise-1", "laeq", 0, 71.0, T0, T0, "above 70")
    kinds = {
        "meta": lambda key: envelope.seal_meta([point], gateway=GW, key=key, epoch=1),
        "gap": lambda key: seal_gap(
            [GapRange(1, 0, 3, 40, "spool_full")], gateway=GW, key=key, epoch=1
        ),
        "event": lambda key: seal_event(event, gateway=GW, key=key, epoch=1, seq=0),
    }
    core.enroll(GW, KEY.public_key().public_bytes_raw())
    for kind, seal in kinds.items():
        topic = f"{topics.DEFAULT_PREFIX}/{GW}/{kind}"
        good = seal(KEY)
        forged = good[:-1] + bytes([good[-1] ^ 1])
        assert core.handle(topic, forged) == "bad_signature", kind
        assert core.handle(topic, seal(stranger)) == "unknown_key", kind
        assert core.handle(f"{topics.DEFAULT_PREFIX}/gw-other/{kind}", good) == "topic_mismatch"
        assert core.handle(topic, good) == kind, kind


def test_the_hub_without_the_demo_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import importlib.util

    from typer.testing import CliRunner

    from agent.cli.main import app

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "aiomqtt" else real(name, *a)
    )
    # the worker needs aiomqtt; `hub stats` and `hub token` do not (tests/test_cli.py)
    result = CliRunner().invoke(app, ["hub", "--db", str(tmp_path / "h.db")])
    assert result.exit_code == 1
    assert "vitals hub needs aiomqtt" in result.output
    assert "pip install 'vitals-gateway[hub]'" in result.output


def test_an_outage_is_one_warning_and_one_info_with_capped_jittered_back_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    from hub.reconnect import Outage

    log = logging.getLogger("test.outage")
    caplog.set_level(logging.INFO, logger="test.outage")
    o = Outage(log, "worker", "127.0.0.1", 1883, first_s=0.25, cap_s=5.0)
    delays = [o.down(OSError("refused")) for _ in range(12)]
    assert all(0 < d <= 5.0 for d in delays)
    assert all(d <= 0.25 * 2**i for i, d in enumerate(delays))
    assert max(delays[-4:]) > 2.5  # it grew to the cap (each at least half of it)
    o.up()
    o.down(OSError("reset"))
    o.up()
    lines = [(r.levelname, r.getMessage().split(":")[0]) for r in caplog.records]
    assert lines == [
        ("WARNING", "worker cannot reach the broker 127.0.0.1"),  # never connected yet
        ("INFO", "worker back on the broker 127.0.0.1"),
        ("WARNING", "worker lost the broker 127.0.0.1"),
        ("INFO", "worker back on the broker 127.0.0.1"),
    ]
    assert o.outages == 1
    assert o.down(OSError("x")) <= 0.25  # the back-off starts again after a recovery


async def test_a_running_worker_freezes_what_start_up_built(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """Once running (store open, keys loaded), a worker freezes the collector's view of
    start-up's objects and raises the gen-0 threshold, as the agent does; at stop it
    gives both back (bench/README.md, "the worker's collector", has the CPU it saves)."""
    pytest.importorskip("aiomqtt", reason="the hub needs aiomqtt (the hub extra)")
    from hub.worker import Hub

    before = gc.get_threshold()
    core = HubCore(tmp_path / "hub.sqlite3")
    core.enroll(GW, PUB)
    hub = Hub(core, host=mosquitto.host, port=mosquitto.port, shared=False)
    task = asyncio.create_task(hub.run())
    try:
        await asyncio.wait_for(hub.subscribed.wait(), 10)
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (20_000, 20, 100)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        core.close()
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before
