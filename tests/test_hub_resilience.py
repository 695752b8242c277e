"""A hub that stays up: a real Mosquitto (persistence on, same port) restarted under a
live ``vitals hub`` process, ten times idle and ten times with a real agent
(``vitals run``) sending. After each restart the hub is back (its clock topic is
fresh again); after the last it enrolls a new gateway (``vitals hub token`` and the
enrollment request ``vitals provision`` sends); every batch the agent saw
acknowledged is stored; SIGTERM ends the hub within seconds; each outage is one
WARNING and one INFO line per loop, not a line every half second.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.ops.config import UplinkConfig
from agent.ops.provision import enroll_key
from agent.ops.state import create_identity
from drivers.profiles import load_profile
from hub.core import HubCore, Outcome
from hub.stats import hub_stats
from hub.worker import Hub
from protocols import ed25519, enroll, envelope, topics
from protocols.reading import Quality, Reading
from simulator.broker import HOST, MosquittoBroker, free_port, mosquitto_path
from simulator.tcp import TcpTerminal

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto is not installed"),
]

aiomqtt = pytest.importorskip("aiomqtt", reason="the hub needs aiomqtt (the hub extra)")

GW = "gw-resilient-1"
RESTARTS = 10
VITALS = [sys.executable, "-m", "agent"]


class PersistentMosquitto:
    """Mosquitto on one port for the whole test, its persistence file kept across
    restarts (saved when it is stopped with SIGTERM, read when it starts)."""

    def __init__(self, work: Path) -> None:
        self.dir = work
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._hold: socket.socket | None = None
        self._hold_port()
        work.mkdir(parents=True, exist_ok=True)
        (work / "mosquitto.conf").write_text(
            f"listener {self.port} {HOST}\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {work}/\n"
            # as root it would drop to the mosquitto user, who cannot write in our
            # private temporary directory: its persistence would silently be off
            + ("user root\n" if os.geteuid() == 0 else "")
            + "max_inflight_messages 0\n"
            "max_queued_messages 100000\n"
            "log_dest stderr\n"
            "log_type error\n"
            "log_type warning\n"
        )

    def _hold_port(self) -> None:
        """Bound, not listening: a client is refused as by a stopped broker, and no
        other test's server can take the port meanwhile (the suite runs in parallel)."""
        self._hold = socket.socket()
        self._hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._hold.bind((HOST, self.port))

    async def start(self) -> None:
        if self._hold is not None:
            self._hold.close()
            self._hold = None
        log = (self.dir / "mosquitto.log").open("ab")
        exe = mosquitto_path()
        assert exe is not None
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - a fork and exec, no waiting
            [exe, "-c", str(self.dir / "mosquitto.conf")], stdout=log, stderr=log
        )
        log.close()
        for _ in range(200):
            try:
                _, w = await asyncio.open_connection(HOST, self.port)
                w.close()
                return
            except OSError:
                await asyncio.sleep(0.02)
        raise RuntimeError((self.dir / "mosquitto.log").read_text()[-2000:])

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.terminate()  # SIGTERM: it writes mosquitto.db on the way out
            await asyncio.to_thread(proc.wait, 10)
            self._hold_port()

    def close(self) -> None:
        if self._hold is not None:
            self._hold.close()
            self._hold = None


async def _hub_time_after(port: int, after: float, within: float = 20.0) -> float:
    """The hub's clock, once it reads later than ``after``: the worker is connected,
    subscribed and publishing again."""
    async with asyncio.timeout(within):
        while True:
            try:
                async with aiomqtt.Client(HOST, port, identifier=f"probe-{time.time_ns()}") as c:
                    await c.subscribe(topics.hub_time(), qos=0)
                    async for msg in c.messages:
                        assert isinstance(msg.payload, bytes)
                        t = float(msg.payload)
                        if t > after:
                            return t
            except aiomqtt.MqttError:
                await asyncio.sleep(0.1)


async def _restart(broker: PersistentMosquitto, down_s: float = 0.2) -> None:
    await broker.stop()
    await asyncio.sleep(down_s)
    await broker.start()
    await _hub_time_after(broker.port, time.time())


def _stored(db: Path) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(con.execute("SELECT count(*) FROM batches").fetchone()[0])
    finally:
        con.close()


async def _wait(what: str, cond: object, within: float) -> None:
    deadline = time.monotonic() + within
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_the_hub_stays_up_through_broker_restarts(tmp_path: Path) -> None:
    broker = PersistentMosquitto(tmp_path / "broker")
    await broker.start()
    term = TcpTerminal(load_profile("sound_level_meter"))
    await term.start()
    state = tmp_path / "gw-state"
    identity = create_identity(state)
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(
        f"""
[gateway]
id = "{GW}"
state_dir = "{state}"
[uplink]
host = "{HOST}"
port = {broker.port}
backoff_min_s = 0.1
backoff_max_s = 1.0
[batch]
max_age_s = 0.3
[[buses]]
name = "tcp-1"
kind = "tcp"
host = "127.0.0.1"
tcp_port = {term.port}
[[devices]]
name = "noise-1"
bus = "tcp-1"
profile = "sound_level_meter"
slave = 1
interval_s = 0.1
"""
    )
    db = tmp_path / "hub" / "hub.sqlite3"
    db.parent.mkdir()
    hub_log = tmp_path / "hub.log"
    hub_args = ["hub", "--db", str(db), "--broker", f"{HOST}:{broker.port}", "--worker", "w1"]
    trust = ["--trust", f"{GW}={identity.public_raw.hex()}"]
    with hub_log.open("wb") as out:
        hub = subprocess.Popen([*VITALS, *hub_args, *trust], stdout=out, stderr=out)  # noqa: ASYNC220
    agent: subprocess.Popen[bytes] | None = None
    try:
        await _hub_time_after(broker.port, 0.0)
        # the enrollment desk connects on its own: have it on the broker before the
        # first restart, so that "cannot reach" below means what it says
        await _wait(
            "the enrollment desk on the broker",
            lambda: "enrollment desk on the broker" in hub_log.read_text(errors="replace"),
            20,
        )

        # 1. idle: nobody sends, the broker comes and goes
        for _ in range(RESTARTS):
            await _restart(broker)
            assert hub.poll() is None, hub_log.read_text()

        # 2. with traffic from a real agent
        with (tmp_path / "agent.log").open("wb") as out:
            agent = subprocess.Popen(  # noqa: ASYNC220
                [*VITALS, "run", "--config", str(cfg)], stdout=out, stderr=out
            )
        await _wait("the first batches", lambda: _stored(db) >= 3, 30)
        for _ in range(RESTARTS):
            before = _stored(db)
            await _restart(broker)
            assert hub.poll() is None, hub_log.read_text()
            await _wait("batches after the restart", lambda b=before: _stored(db) > b, 20)  # type: ignore[misc]
        agent.send_signal(signal.SIGTERM)  # it delivers what it holds, then exits
        assert await asyncio.to_thread(agent.wait, 30) == 0, (tmp_path / "agent.log").read_text()
        status = await asyncio.to_thread(
            subprocess.run,
            [*VITALS, "status", "--json", "--config", str(cfg), "--state-dir", str(state)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        doc = json.loads(status.stdout)
        acked = doc["uplink"]["batches_acked"]
        assert acked > RESTARTS, doc["uplink"]
        with contextlib.suppress(AssertionError):
            await _wait("every acknowledged batch", lambda: _stored(db) >= acked, 20)
        assert _stored(db) >= acked, (acked, hub_stats(db), hub_log.read_text()[-3000:])

        # 3. enrollment still works after the last restart, once the desk is back on the
        # broker (a request sent while it is away is not kept for it, as for any client
        # without a session; a technician's provision says "no answer" and is run again)
        def desk_back() -> bool:
            # an outage starts "lost the broker", or "cannot reach the broker" when the
            # desk never had it (its first connection timed out on a loaded machine)
            text = hub_log.read_text(errors="replace")
            down = text.count("enrollment desk lost the broker") + text.count(
                "enrollment desk cannot reach the broker"
            )
            return down == text.count("enrollment desk back on the broker")

        await _wait("the enrollment desk back on the broker", desk_back, 20)
        issued = await asyncio.to_thread(
            subprocess.run,
            [*VITALS, "hub", "--db", str(db), "token", "gw-new-1"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert issued.returncode == 0, issued.stderr
        token = issued.stdout.strip()
        result = await enroll_key(
            uplink=UplinkConfig(gateway="gw-new-1", host=HOST, port=broker.port),
            new_key=create_identity(tmp_path / "new-state"),
            token=token,
            pinned_hub_kid=enroll.token_hub_kid(token),
            timeout_s=20,
        )
        assert result.ok

        # 4. SIGTERM: the hub ends within seconds, writing what it holds
        t0 = time.monotonic()
        hub.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(hub.wait, 10) == 0, hub_log.read_text()
        assert time.monotonic() - t0 < 10
    finally:
        for proc in (agent, hub):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        await term.stop()
        await broker.stop()
        broker.close()

    log = hub_log.read_text()
    assert "Traceback" not in log, log
    stats = hub_stats(db)
    gw = stats["gateways"][GW]
    assert gw["batches"] >= acked
    assert gw["missing_batches"] == 0, gw["epochs"]
    assert stats["rejected"] == {}
    assert "gw-new-1" in stats["gateways"]  # enrolled, silent, listed
    # one WARNING when an outage starts and one INFO when it ends, per loop: not one
    # every half second. The worker is back before each next restart (the test waits
    # for its clock); the enrollment desk may still be away, one outage then
    outages = 2 * RESTARTS
    lost = log.count("hub worker lost the broker")
    assert lost == log.count("hub worker back on the broker") == outages, log[-3000:]
    desk = log.count("enrollment desk lost the broker")
    assert 0 < desk <= outages and desk == log.count("enrollment desk back on the broker")
    assert log.count("WARNING") == lost + desk, log[-3000:]
    assert "ERROR" not in log, log
    assert "cannot reach" not in log  # it had the broker from the start


async def test_a_hub_started_before_its_broker_waits_for_it(tmp_path: Path) -> None:
    """No broker yet: one WARNING ("cannot reach", never "lost"), then the hub connects
    when the broker comes; SIGTERM while the broker is away ends it too."""
    broker = PersistentMosquitto(tmp_path / "broker")
    db = tmp_path / "hub.sqlite3"
    hub_log = tmp_path / "hub.log"
    with hub_log.open("wb") as out:
        hub = subprocess.Popen(  # noqa: ASYNC220
            [*VITALS, "hub", "--db", str(db), "--broker", f"{HOST}:{broker.port}"],
            stdout=out,
            stderr=out,
        )
    try:
        # until it has tried (a loaded machine takes seconds to start the hub), then
        # a few more attempts, with back-off
        tried = ("hub worker cannot reach", "enrollment desk cannot reach")
        await _wait(
            "the hub's first attempts",
            lambda: hub.poll() is not None or all(t in hub_log.read_text() for t in tried),
            60,
        )
        await asyncio.sleep(2)
        assert hub.poll() is None, hub_log.read_text()
        await broker.start()
        await _hub_time_after(broker.port, 0.0)
        await broker.stop()
        await asyncio.sleep(1)
        hub.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(hub.wait, 10) == 0, hub_log.read_text()
    finally:
        if hub.poll() is None:
            hub.kill()
            hub.wait()
        await broker.stop()
        broker.close()
    log = hub_log.read_text()
    assert log.count("hub worker cannot reach the broker") == 1, log
    assert log.count("enrollment desk cannot reach the broker") == 1, log
    assert "hub worker back on the broker" in log
    assert log.count("hub worker lost the broker") == 1, log
    assert "Traceback" not in log
    with contextlib.suppress(FileNotFoundError):
        os.unlink(db)


async def test_a_message_is_acknowledged_only_once_written(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """A worker whose write fails dies without acknowledging: the broker gives the
    batch again to the worker's next run (same persistent session), which stores it.
    Acknowledged on receipt, it would be gone."""
    key = ed25519.PrivateKey.generate()
    db = tmp_path / "hub.sqlite3"
    core = HubCore(db, worker="w1")
    core.enroll(GW, key.public_key().public_bytes_raw())

    def disk_gone(*_: object) -> list[bool]:
        raise OSError(errno.EIO, "disk gone")

    core.store.write_batches = disk_gone  # type: ignore[method-assign]
    first = Hub(core, host=mosquitto.host, port=mosquitto.port, persistent=True, shared=False)
    task = asyncio.create_task(first.run())
    await asyncio.wait_for(first.subscribed.wait(), 10)
    t1 = time.time_ns() // 1_000_000
    batch = envelope.seal([Reading(1, t1, 1.0, Quality.GOOD)], gateway=GW, epoch=1, seq=0, key=key)
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as c:
        await c.publish(topics.batch(GW), batch, qos=1)
    with pytest.raises(ExceptionGroup) as died:
        await asyncio.wait_for(task, 10)
    assert died.group_contains(OSError, match="disk gone")
    assert _stored(db) == 0

    again = HubCore(db, worker="w1")
    second = Hub(again, host=mosquitto.host, port=mosquitto.port, persistent=True, shared=False)
    assert second.client_id == first.client_id == "vitals-hub-w1"
    task = asyncio.create_task(second.run())
    try:
        await _wait("the batch again", lambda: second.results[Outcome.STORED] == 1, 10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    again.close()
    assert _stored(db) == 1


def _text(log: Path) -> str:
    return log.read_text()


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


def _sh(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def _spawn_hub(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([*VITALS, "hub", *args], stdout=out, stderr=out)


async def test_a_full_disk_stops_the_hub_and_loses_nothing(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """The hub's database on a 1 MiB tmpfs: gateways send until it is full. The hub
    stops with one line (nothing unwritten acknowledged); with room again, its next
    start gets every batch from its persistent session: all of them stored once."""
    disk = tmp_path / "disk"
    _mount(disk, "1m")
    try:
        key = ed25519.PrivateKey.generate()
        args = [
            "--db",
            str(disk / "hub.sqlite3"),
            "--broker",
            f"{mosquitto.host}:{mosquitto.port}",
            "--worker",
            "w1",
            "--trust",
            f"{GW}={key.public_key().public_bytes_raw().hex()}",
        ]
        log = tmp_path / "hub.log"
        hub = _spawn_hub(args, log)
        await _hub_time_after(mosquitto.port, 0.0)
        t1 = time.time_ns() // 1_000_000
        sent = 60  # 500 readings each: several MiB in SQLite
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as c:
            for seq in range(sent):
                readings = [
                    Reading(p, t1 - 500 + i, float(seq * 1000 + i) + 0.123, Quality.GOOD)
                    for i, p in enumerate(range(500))
                ]
                data = envelope.seal(readings, gateway=GW, epoch=1, seq=seq, key=key)
                await c.publish(topics.batch(GW), data, qos=1)
        rc = await asyncio.to_thread(hub.wait, 30)
        text = _text(log)
        assert rc == 1, text
        assert "Traceback" not in text, text
        assert "error: hub worker w1 stopped: cannot write to" in text, text
        assert "disk is full" in text, text  # SQLite's words, not a later ROLLBACK's
        assert "hint: nothing unwritten was acknowledged" in text, text

        r = _sh("mount", "-o", "remount,size=64m", str(disk))
        assert r.returncode == 0, r.stderr
        hub = _spawn_hub(args, log)
        try:
            await _wait("every batch", lambda: _stored(disk / "hub.sqlite3") == sent, 30)
        finally:
            hub.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(hub.wait, 15) == 0, _text(log)
        stats = hub_stats(disk / "hub.sqlite3")
        assert stats["gateways"][GW]["missing_batches"] == 0
        assert stats["readings"] == sent * 500
    finally:
        _sh("umount", "-l", str(disk))
