"""A real full disk: the state directory on a small tmpfs that the test mounts.

The earlier stand-in (SQLite's ``max_page_count``) never ran out of room where
SQLite itself needs some: in the delete that frees space, in a checkpoint, in
the WAL index, in the epoch and the status file. Here the file system says
ENOSPC, as a full SD card does. Mounting needs root (CI runs as root); without
it, or when the mount fails, the tests skip and say why.

- spool, in process: its files stay under ``max_bytes`` on the real file
  system; a full disk drops the oldest (counted, gap rows) and never raises,
  at every step (append, drop, ack, checkpoint, gap rows, open); the reserve
  comes back when the disk has room.
- epoch and status file: written on a disk with no free block.
- the agent (``vitals run`` subprocess, broker down) on a 3 MiB tmpfs that
  another file fills: keeps polling past full, one WARNING line, counters and
  status say so; restarts on the full disk; is killed with SIGKILL while full;
  then the disk gets room, broker and hub start, and every batch the agent
  reported spooled is at the hub or named in a signed gap notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.ops.state import next_epoch
from agent.ops.status import write_status
from agent.pipeline.spool import Spool
from drivers.profiles import load_profile
from hub.core import HubCore
from hub.stats import hub_stats
from hub.worker import Hub
from simulator.broker import MosquittoBroker, free_port, mosquitto_path
from simulator.tcp import TcpTerminal

MiB = 1 << 20
GW = "gw-disk-1"
PROFILES = ("sound_level_meter", "weather_station", "gas_detector", "pump_meter")
SPOOLED = re.compile(r"spooled epoch=(\d+) seq=(\d+) n=(\d+) t0=(\d+)")
VITALS = [sys.executable, "-m", "agent"]


def _mount(where: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for a real full disk needs root (CI runs as root)")
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {where}: {r.stderr.strip() or r.returncode}")


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs, mounted for this test."""
    disk = tmp_path / "disk"
    _mount(disk, "3m")
    try:
        yield disk
    finally:
        _umount(disk)


def _free(disk: Path) -> int:
    st = os.statvfs(disk)
    return st.f_bavail * st.f_frsize


def _fill(disk: Path, leave: int = 0, name: str = "ballast") -> Path:
    """Another file takes the disk's room but ``leave`` bytes (all of it: 0)."""
    path = disk / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        want = _free(disk) - leave
        if want > 0:
            with contextlib.suppress(OSError):
                os.posix_fallocate(fd, os.fstat(fd).st_size, want)
        if leave == 0:  # the last partial pages: write until the file system refuses
            while True:
                try:
                    os.write(fd, b"\0" * 4096)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return path


def _on_disk(path: Path) -> int:
    """What the spool's files take on disk: database, WAL, WAL index, reserve."""
    return sum(
        p.stat().st_blocks * 512
        for p in (Path(f"{path}{s}") for s in ("", "-wal", "-shm", "-reserve"))
        if p.exists()
    )


def _exists(path: Path) -> bool:
    return path.exists()


def _rows(epoch: int, seqs: range, size: int = 2000) -> list[tuple[int, int, int, int, bytes]]:
    return [(epoch, s, 10, 1_700_000_000_000 + s, os.urandom(size)) for s in seqs]


# ---------------------------------------------------------------- the spool in process


async def test_spool_files_stay_under_max_bytes_on_a_real_file_system(small_disk: Path) -> None:
    """(d) The bound is what the files take (database, WAL, index, reserve), checked
    after every append on the tmpfs; and most of it holds batches."""
    path = small_disk / "spool.sqlite3"
    spool = await Spool.open(path, max_bytes=MiB, durability="normal")
    peak = 0
    for i in range(300):
        stored = await spool.append(_rows(1, range(i * 4, i * 4 + 4)))
        assert len(stored) == 4
        peak = max(peak, _on_disk(path))
        assert _on_disk(path) <= MiB, f"after append {i}: {_on_disk(path)} bytes on disk"
        if i % 7 == 0:  # the uplink acknowledges some, as it does
            rows = await spool.pending(0, 2)
            spool.ack([r.id for r in rows])
            await spool.flush_acks()
    st = spool.statistics()
    assert st["dropped_spool_full"] > 0 and st["dropped_disk_full"] == 0
    assert st["disk_bytes"] <= MiB and st["depth_bytes"] > MiB // 2
    assert not spool.disk_full
    await spool.close()
    print(f"\nspool on tmpfs, max_bytes 1 MiB: peak {peak} bytes on disk, {st}")


async def test_spool_on_a_disk_smaller_than_max_bytes_drops_for_room(small_disk: Path) -> None:
    """The disk fills before ``max_bytes``: the spool keeps itself inside the room
    there is (no ENOSPC even reaches SQLite), drops the oldest as ``disk_full``, and
    says so once; freeing the disk ends it."""
    path = small_disk / "spool.sqlite3"
    ballast = _fill(small_disk, leave=1 * MiB)
    spool = await Spool.open(path, durability="full")  # max_bytes 256 MiB: the disk decides
    assert (small_disk / "spool.sqlite3-reserve").exists()
    total = 0
    for i in range(400):
        total += len(await spool.append(_rows(1, range(i * 4, i * 4 + 4))))
    st = spool.statistics()
    assert total == 1600, "every batch was stored; the oldest made room"
    assert st["dropped_disk_full"] > 0 and st["lost_disk_full"] == 0
    assert st["depth_batches"] + st["dropped_batches"] == 1600
    assert st["disk_full"] == 1 and st["disk_full_events"] == 1
    left = [r.seq for r in await spool.pending(0, 2000)]
    assert left == list(range(1600 - len(left), 1600)) and len(left) > 100
    gaps = [g for _, g in await spool.gaps(10_000)]
    assert all(g.reason == "disk_full" for g in gaps)
    assert sum(g.last - g.first + 1 for g in gaps) == st["dropped_batches"]
    # the disk gets room and the backlog is delivered: the state ends
    ballast.unlink()
    rows = await spool.pending(0, 10_000)
    spool.ack([r.id for r in rows])
    await spool.flush_acks()
    await spool.append(_rows(1, range(1600, 1601)))
    assert not spool.disk_full
    await spool.close()


async def test_enospc_at_every_step_is_survived(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The disk is taken to its last byte by another file while the spool holds
    batches: append, the drop that makes room, acks, gap rows, checkpoint and a
    reopen all meet ENOSPC, and none raises; the reserve is what the first drop
    spends."""
    path = small_disk / "spool.sqlite3"
    spool = await Spool.open(path, durability="full")
    for i in range(100):
        await spool.append(_rows(1, range(i * 4, i * 4 + 4)))
    await spool.close()
    # reopened, its WAL is empty: the next transaction needs room the disk no longer has
    spool = await Spool.open(path, durability="full")
    assert (small_disk / "spool.sqlite3-reserve").exists()
    ballast = _fill(small_disk)  # not one byte left
    assert _free(small_disk) == 0
    seq = 400
    for _ in range(60):
        stored = await spool.append(_rows(1, range(seq, seq + 4)))
        seq += 4
        assert stored, "the oldest batches made room for the new ones"
    st = spool.statistics()
    assert st["dropped_disk_full"] > 0 and st["disk_full"] == 1
    assert not (small_disk / "spool.sqlite3-reserve").exists(), "the reserve was spent"
    warnings = [r for r in caplog.records if "the disk is full" in r.getMessage()]
    assert len(warnings) == 1, "one WARNING line, not one per batch"
    # acks and gap-row deletes on the full disk
    rows = await spool.pending(0, 20)
    spool.ack([r.id for r in rows])
    await spool.flush_acks()
    gaps = await spool.gaps()
    await spool.gaps_sent([i for i, _ in gaps])
    await spool.expire()
    await spool.close()  # the checkpoint at close may fail: harmless
    # a restart on the full disk: the spool opens and takes batches
    spool = await Spool.open(path, durability="full")
    assert await spool.pending(0, 1)
    stored = await spool.append(_rows(1, range(seq, seq + 4)))
    assert stored
    await spool.close()
    # room again: the reserve is allocated again at the next append
    ballast.unlink()
    spool = await Spool.open(path, durability="full")
    await spool.append(_rows(1, range(seq + 4, seq + 8)))
    assert (small_disk / "spool.sqlite3-reserve").exists()
    await spool.close()


async def test_a_spool_opens_on_a_disk_with_no_byte_left(small_disk: Path) -> None:
    """Another file took every byte and the reserve is gone (spent, never allocated
    again): after a clean stop the WAL index is gone too, and there is no room for a
    new one. The spool opens with the index in memory and its backlog can be sent;
    a batch that cannot be written anywhere is counted and named in a gap notice
    held in memory, not raised; once the disk has room, appends work again."""
    path = small_disk / "spool.sqlite3"
    spool = await Spool.open(path)
    await spool.append(_rows(1, range(20)))
    await spool.close()
    (small_disk / "spool.sqlite3-reserve").unlink()
    assert not _exists(Path(f"{path}-shm"))
    ballast = _fill(small_disk)
    spool = await Spool.open(path)
    assert spool.exclusive
    assert [r.seq for r in await spool.pending(0, 100)] == list(range(20))
    assert await spool.append(_rows(1, range(20, 22))) == []
    st = spool.statistics()
    assert st["lost_disk_full"] == 2 and st["dropped_batches"] >= 2
    gaps = await spool.gaps()
    assert {20, 21} <= {s for _, g in gaps for s in range(g.first, g.last + 1)}
    ballast.unlink()
    assert [r[1] for r in await spool.append(_rows(1, range(22, 24)))] == [22, 23]
    await spool.gaps_sent([i for i, _ in gaps])
    await spool.close()


def test_epoch_and_status_are_written_on_a_full_disk(small_disk: Path) -> None:
    assert next_epoch(small_disk) == 1
    write_status(small_disk / "status.json", {"state": "running", "n": 1})
    _fill(small_disk)
    assert next_epoch(small_disk) == 2
    assert (small_disk / "epoch").read_text().strip() == "2"
    assert not list(small_disk.glob("*.tmp"))
    write_status(small_disk / "status.json", {"state": "running", "n": 2})
    assert json.loads((small_disk / "status.json").read_text()) == {"state": "running", "n": 2}
    assert not list(small_disk.glob(".status.json.*"))


# ---------------------------------------------------------------- the agent, end to end


def _config(path: Path, state: Path, broker_port: int, ports: list[int]) -> None:
    text = f"""
[gateway]
id = "{GW}"
state_dir = "{state}"
[uplink]
host = "127.0.0.1"
port = {broker_port}
backoff_min_s = 0.2
backoff_max_s = 1.0
[batch]
max_readings = 60
max_age_s = 0.2
[spool]
durability = "full"
[log]
level = "debug"
"""
    for i, (profile, port) in enumerate(zip(PROFILES, ports, strict=True)):
        text += f"""
[[buses]]
name = "tcp-{i}"
kind = "tcp"
host = "127.0.0.1"
tcp_port = {port}
[[devices]]
name = "dev-{i}"
bus = "tcp-{i}"
profile = "{profile}"
slave = 1
interval_s = 0.05
"""
    path.write_text(text)


def _spooled(logs: list[Path]) -> set[tuple[int, int]]:
    return {
        (int(m[1]), int(m[2]))
        for f in logs
        for m in SPOOLED.finditer(f.read_text(errors="replace"))
    }


def _status(state: Path) -> dict[str, object]:
    try:
        doc = json.loads((state / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


async def _read_status(state: Path, log_file: Path) -> dict[str, object]:
    """The status file once it reads whole (a read can meet it being replaced: {})."""
    docs: list[dict[str, object]] = []

    def whole() -> bool:
        doc = _status(state)
        docs.append(doc)
        return isinstance(doc.get("buses"), dict)

    await _until("a status file that reads whole", whole, 10, log_file)
    return docs[-1]


def _polls(doc: dict[str, object]) -> int:
    buses = doc.get("buses")
    assert isinstance(buses, dict)
    return sum(int(d.get("polls", 0)) for b in buses.values() for d in b["devices"].values())


async def _start(cfg: Path, log_file: Path) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if k != "RUNTIME_DIRECTORY"}
    with log_file.open("wb") as err:
        return await asyncio.create_subprocess_exec(
            *VITALS,
            "run",
            "--config",
            str(cfg),
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )


async def _until(what: str, check: object, within: float, log_file: Path) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check() if callable(check) else check:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: not within {within} s\n{_tail(log_file)}")


def _tail(log_file: Path) -> str:
    return log_file.read_text(errors="replace")[-3000:]


async def _running(proc: asyncio.subprocess.Process, state: Path, log_file: Path) -> dict:
    """Wait until the agent writes a status with its pid and has polled since; return it."""
    first: dict[str, object] = {}

    def fresh() -> bool:
        nonlocal first
        doc = _status(state)
        if doc.get("pid") != proc.pid or not doc.get("buses"):
            return False
        if not first:
            first = doc
            return False
        return _polls(doc) > _polls(first)

    await _until("a running agent that polls", fresh, 30, log_file)
    return await _read_status(state, log_file)


@pytest.mark.mosquitto
async def test_agent_on_a_full_disk_polls_restarts_and_loses_nothing_spooled(
    small_disk: Path, tmp_path: Path
) -> None:
    """(a) past full: alive, polling, drops counted, one WARNING; (b) a restart on
    the full disk comes up, polls and spools; (c) kill -9 while full, then room, the
    broker and the hub: every batch reported spooled is at the hub, or named in a
    signed gap notice (dropped and counted)."""
    if not mosquitto_path():
        pytest.skip("needs the mosquitto binary (Debian: apt-get install mosquitto)")
    terms = [TcpTerminal(load_profile(p), seed=i) for i, p in enumerate(PROFILES)]
    for t in terms:
        await t.start()
    broker = MosquittoBroker(free_port())  # not started: the broker is down
    state = small_disk
    cfg = tmp_path / "gateway.toml"
    _config(cfg, state, broker.port, [t.port for t in terms])
    keygen = await asyncio.to_thread(
        subprocess.run,
        [*VITALS, "keygen", "--state-dir", str(state)],
        capture_output=True,
        text=True,
    )
    assert keygen.returncode == 0, keygen.stderr
    pub = next(ln.split()[-1] for ln in keygen.stdout.splitlines() if ln.startswith("public key"))
    spool_db = state / "spool.sqlite3"
    logs = [tmp_path / f"agent-{i}.log" for i in range(4)]
    procs: list[asyncio.subprocess.Process] = []
    core = HubCore(tmp_path / "hub.sqlite3")
    core.enroll(GW, bytes.fromhex(pub))
    try:
        # (a) the disk fills (another file takes it) while the broker is down
        procs.append(await _start(cfg, logs[0]))
        await _running(procs[0], state, logs[0])
        _fill(state, leave=300 << 10, name="ballast-1")
        await _until(
            "the disk-full warning", lambda: "the disk is full" in logs[0].read_text(), 60, logs[0]
        )
        before = await _read_status(state, logs[0])

        def ran_on() -> bool:  # past full: polling on, ten batches (2 s) dropped for it
            doc = _status(state)
            spool = doc.get("spool")
            return (
                isinstance(spool, dict)
                and spool.get("dropped_disk_full", 0) >= 10
                and _polls(doc) > _polls(before)
            )

        await _until("ten batches dropped on the full disk", ran_on, 30, logs[0])
        assert procs[0].returncode is None, logs[0].read_text()[-3000:]
        after = await _read_status(state, logs[0])  # written after `before`
        assert _polls(after) > _polls(before) > 0, "polling goes on"
        spool = after["spool"]
        assert isinstance(spool, dict)
        assert spool["disk_full"] == 1 and spool["dropped_disk_full"] > 0, spool
        assert spool["disk_full_events"] == 1
        assert spool["disk_bytes"] < 3 * MiB
        text = logs[0].read_text()
        assert text.count("the disk is full") == 1, "one WARNING line, not one per batch"
        assert "Traceback" not in text
        procs[0].send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(procs[0].wait(), 30) == 0, logs[0].read_text()[-3000:]

        # (b) a restart on the full disk: not one free byte left
        _fill(state, name="ballast-2")
        assert _free(state) == 0
        procs.append(await _start(cfg, logs[1]))
        await _running(procs[1], state, logs[1])
        await _until("a batch spooled on the full disk", lambda: _spooled(logs[1:2]), 20, logs[1])
        assert "Traceback" not in logs[1].read_text()

        # (c) kill -9 while the disk is full, a few batches later
        await _until(
            "3 batches spooled on the full disk", lambda: len(_spooled(logs[1:2])) >= 3, 20, logs[1]
        )
        procs[1].kill()
        assert await procs[1].wait() == -signal.SIGKILL
        procs.append(await _start(cfg, logs[2]))
        await _running(procs[2], state, logs[2])
        await _until("a batch spooled after kill -9", lambda: _spooled(logs[2:3]), 20, logs[2])
        procs[2].kill()
        assert await procs[2].wait() == -signal.SIGKILL

        # room again; the broker and the hub come; a last run delivers the backlog
        (state / "ballast-1").unlink()
        (state / "ballast-2").unlink()
        await broker.start()
        hub = Hub(core, host=broker.host, port=broker.port, shared=False)
        async with asyncio.TaskGroup() as tg:
            hub_task = tg.create_task(hub.run(), name="hub")
            await asyncio.wait_for(hub.subscribed.wait(), 10)
            procs.append(await _start(cfg, logs[3]))
            reported = _spooled(logs[:3])

            def delivered() -> bool:
                st = hub_stats(tmp_path / "hub.sqlite3")["gateways"].get(GW, {})
                dropped = _dropped(st)
                return reported <= core.delivered(GW) | dropped and bool(dropped)

            await _until("the backlog at the hub", delivered, 60, logs[3])
            procs[3].send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(procs[3].wait(), 30) == 0
            hub_task.cancel()
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        for t in terms:
            await t.stop()
        await broker.stop()
        core.close()

    reported = _spooled(logs)
    stats = hub_stats(tmp_path / "hub.sqlite3")
    gw = stats["gateways"][GW]
    dropped = _dropped(gw)
    at_hub = core_delivered = _delivered(tmp_path / "hub.sqlite3")
    lost = sorted(reported - at_hub - dropped)
    print(
        f"\nfull disk: {len(reported)} batches reported spooled, {len(reported & at_hub)} at "
        f"the hub, {len(reported & dropped)} dropped for room and named in gap notices "
        f"({gw['dropped_batches']} dropped in all), rejected {stats['rejected'] or 0}"
    )
    assert not lost, f"{len(lost)} spooled batches neither at the hub nor in a gap notice"
    assert reported & dropped, "the disk-full drops reached the hub as gap notices"
    assert {r["reason"] for e in gw["epochs"].values() for r in e["dropped_by_gateway"]} == {
        "disk_full"
    }
    assert stats["rejected"] == {}
    assert len(core_delivered) > 0
    # the counters the spool keeps over every run name as many drops as the hub was told
    con = sqlite3.connect(spool_db)
    counted = dict(con.execute("SELECT name, value FROM counters").fetchall())
    con.close()
    assert counted.get("dropped_batches", 0) <= gw["dropped_batches"]


def _dropped(gw: dict) -> set[tuple[int, int]]:
    return {
        (int(epoch), s)
        for epoch, e in gw.get("epochs", {}).items()
        for r in e["dropped_by_gateway"]
        for s in range(r["first"], r["last"] + 1)
    }


def _delivered(hub_db: Path) -> set[tuple[int, int]]:
    con = sqlite3.connect(hub_db)
    try:
        return {
            (e, s) for e, s in con.execute("SELECT epoch, seq FROM batches WHERE gw = ?", (GW,))
        }
    finally:
        con.close()
