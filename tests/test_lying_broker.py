"""The lying world (issue 15): a PUBACK is not the hub's word.

Each test runs the real thing: ``vitals run`` as a subprocess polling emulated
Modbus TCP terminals, ``vitals hub`` as a subprocess (so that kill -9 is real),
a real Mosquitto on a free loopback port, and in between, where needed, the
lying proxy of tests/mqtt_proxy.py. The gateway knows the hub's key (as
enrollment teaches it): a batch leaves its spool on the hub's signed receipt.
The faults, and what they cost before receipts (the same tests on commit
ee0f73f, the PUBACK deleting the batch):

- batches acknowledged and dropped, for 3 s in the middle of a run and for the
  tail (the last 1.5 s before a stop), by the lying proxy or by an ACL denying
  the batch topic (Mosquitto reloads it on SIGHUP); before: 22 of 253 batches
  lost (1,313 readings), hub stats said 14 missing, the tail unknown (the
  gateway had sealed up to seq 40, the hub knew of 32);
- the broker restarted without persistence while the hub is away (what the
  broker queued for the hub's session is gone); before: 19 of 250 lost;
- the hub killed with kill -9, three times, and restarted: with its persistent
  session (it acknowledges after its write: nothing lost before either) and
  without one (before: 28 of 269 lost, 1,680 readings);
- the broker's message size limit below a batch's size: ``message_size_limit``
  (a PUBACK and the batch dropped; before: 18 of 19 batches lost, 15,389
  readings), ``max_packet_size`` (named in the MQTT 5 CONNACK: the batch is split
  before it is sent; before receipts, under MQTT 3.1.1, the connection closed on
  it: the uplink stuck on the first batch, 19 of 19 never delivered, hub stats 0
  missing) and a limit no broker names (the proxy closes the connection on the
  batch: split after the second reset).

In every case every batch the gateway sealed (its debug line "spooled epoch=E
seq=S n=N t0=T", written after the spool's commit, and its warning naming the
seqs a split re-sealed) is stored at the hub exactly once, readings and all, or
was split and named so by a signed gap notice; and ``vitals hub stats --json``
agrees with the gateway's own count, tail included.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.mqtt import MqttClient, MqttError
from agent.ops.config import load_config
from agent.ops.state import create_identity, save_hub_key
from agent.service import Agent
from drivers.profiles import load_profile
from hub.enroll import hub_key_path, load_or_create_hub_key
from protocols import topics
from simulator.broker import MosquittoBroker, mosquitto_path
from simulator.tcp import TcpTerminal

sys.path.insert(0, str(Path(__file__).parent))
from mqtt_proxy import CUT, PASS, Action, MqttProxy, lie_on, pass_all

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.skipif(mosquitto_path() is None, reason="needs the mosquitto binary"),
]

GW = "gw-lying-1"
PROFILES = ("sound_level_meter", "weather_station", "gas_detector")
SPOOLED = re.compile(r"spooled epoch=(\d+) seq=(\d+) n=(\d+) t0=(\d+)")
# the gateway's WARNING when it splits a batch that cannot pass
RESEALED = re.compile(r"batch epoch (\d+) seq (\d+) \(\d+ readings, .*?re-sealed as seq ([\d, ]+)")
VITALS = [sys.executable, "-m", "agent"]


@dataclass
class World:
    """One gateway (``vitals run``, or its Agent in this process with ``overrides``),
    one hub (``vitals hub``), one broker; their files in ``dir``."""

    dir: Path
    broker: MosquittoBroker
    uplink_port: int  # what the gateway connects to: the broker, or a proxy in front
    terms: list[TcpTerminal]
    max_readings: int = 60
    max_age_s: float = 0.3
    gw_public: bytes = b""
    agent: asyncio.subprocess.Process | None = None
    hub: asyncio.subprocess.Process | None = None
    agent_logs: list[Path] = field(default_factory=list)
    hub_logs: list[Path] = field(default_factory=list)
    overrides: dict[str, Any] | None = None  # run the agent in this process, these uplink settings
    _task: asyncio.Task[None] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _log_handler: logging.Handler = field(default_factory=logging.NullHandler)
    _log_level: int = logging.NOTSET  # the "agent" logger's before an agent in this process

    @property
    def db(self) -> Path:
        return self.dir / "hub.sqlite3"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    def setup(self) -> None:
        """The gateway's key and config; the hub's key, which the gateway learns as
        enrollment would teach it (state/hub.pub)."""
        ident = create_identity(self.state)
        self.gw_public = ident.public_raw
        hub_key = load_or_create_hub_key(hub_key_path(self.db))
        save_hub_key(self.state, hub_key.public_key().public_bytes_raw())
        text = f"""
[gateway]
id = "{GW}"
state_dir = "{self.state}"
[uplink]
host = "127.0.0.1"
port = {self.uplink_port}
backoff_min_s = 0.2
backoff_max_s = 1.0
[batch]
max_readings = {self.max_readings}
max_age_s = {self.max_age_s}
encoding = "msgpack"
[spool]
durability = "full"
[log]
level = "debug"
"""
        for i, (profile, t) in enumerate(zip(PROFILES, self.terms, strict=True)):
            text += f"""
[[buses]]
name = "tcp-{i}"
kind = "tcp"
host = "127.0.0.1"
tcp_port = {t.port}
timeout_s = 1.0
[[devices]]
name = "dev-{i}"
bus = "tcp-{i}"
profile = "{profile}"
slave = 1
interval_s = 0.1
"""
        (self.dir / "gateway.toml").write_text(text)

    async def start_agent(self) -> None:
        """``vitals run`` as a subprocess; with ``overrides``, the same agent in this
        process with those uplink settings (the timings no configuration file sets)."""
        log_file = self.dir / f"agent-{len(self.agent_logs)}.log"
        self.agent_logs.append(log_file)
        if self.overrides is not None:
            self._log_handler = logging.FileHandler(log_file)
            self._log_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            self._log_level = logging.getLogger("agent").level
            logging.getLogger("agent").addHandler(self._log_handler)
            logging.getLogger("agent").setLevel(logging.DEBUG)
            self._stop = asyncio.Event()
            agent = Agent(load_config(self.dir / "gateway.toml"), uplink_overrides=self.overrides)
            self._task = asyncio.create_task(agent.run(self._stop), name="agent")
        else:
            with log_file.open("wb") as err:
                self.agent = await asyncio.create_subprocess_exec(
                    *VITALS,
                    "run",
                    "--config",
                    str(self.dir / "gateway.toml"),
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                )
        for _ in range(150):  # until its first batch is spooled
            await asyncio.sleep(0.1)
            if SPOOLED.search(log_file.read_text(errors="replace")):
                return
            assert self.agent_running(), self.tail(log_file)
        raise AssertionError(f"the agent spooled nothing: {self.tail(log_file)}")

    def agent_running(self) -> bool:
        if self._task is not None:
            return not self._task.done()
        return self.agent is not None and self.agent.returncode is None

    async def stop_agent(self) -> None:
        """SIGTERM: the agent seals its open batch, sends what it can, and ends."""
        if self._task is not None:
            task, self._task = self._task, None
            self._stop.set()
            try:
                await asyncio.wait_for(task, 40)
            finally:
                logging.getLogger("agent").removeHandler(self._log_handler)
                logging.getLogger("agent").setLevel(self._log_level)
                self._log_handler.close()
            return
        proc, self.agent = self.agent, None
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 40)
        assert rc == 0, self.tail(self.agent_logs[-1])

    async def start_hub(self, *, persistent: bool = True) -> None:
        """``vitals hub``; ``persistent=False``: no session the broker keeps for it."""
        self.hub_logs.append(self.dir / f"hub-{len(self.hub_logs)}.log")
        with self.hub_logs[-1].open("wb") as err:
            self.hub = await asyncio.create_subprocess_exec(
                *VITALS,
                "hub",
                "--db",
                str(self.db),
                "--broker",
                f"{self.broker.host}:{self.broker.port}",
                "--trust",
                f"{GW}={self.gw_public.hex()}",
                "--worker",
                "hub-lying",
                "--persistent" if persistent else "--no-persistent",
                "--hole-grace",  # ask for holes after 2 s, not the default 30 s
                "2",
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        await self.hub_back(time.time())

    async def hub_back(self, after: float, within: float = 20.0) -> None:
        """Until the hub's clock reads later than ``after``: it is connected, subscribed
        and publishing (as tests/test_hub_resilience.py waits for it)."""
        async with asyncio.timeout(within):
            while True:
                assert self.hub is not None and self.hub.returncode is None, self.tail(
                    self.hub_logs[-1]
                )
                try:
                    async with aiomqtt.Client(
                        self.broker.host, self.broker.port, identifier=f"probe-{time.time_ns()}"
                    ) as c:
                        await c.subscribe(topics.hub_time(), qos=0)
                        async for msg in c.messages:
                            assert isinstance(msg.payload, bytes)
                            if float(msg.payload) > after:
                                return
                except aiomqtt.MqttError:
                    await asyncio.sleep(0.1)

    async def kill_hub(self) -> None:
        proc, self.hub = self.hub, None
        assert proc is not None
        proc.kill()
        assert await proc.wait() == -signal.SIGKILL

    async def stop_hub(self) -> None:
        proc, self.hub = self.hub, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(
                f"SIGTERM did not end the hub: {self.tail(self.hub_logs[-1])}"
            ) from None

    @staticmethod
    def tail(path: Path) -> str:
        return path.read_text(errors="replace")[-3000:]

    def sealed(self) -> dict[tuple[int, int], tuple[int, int]]:
        """(epoch, seq) -> (n, t0) of every batch the gateway sealed from readings, from
        its logs."""
        out: dict[tuple[int, int], tuple[int, int]] = {}
        for f in self.agent_logs:
            for m in SPOOLED.finditer(f.read_text(errors="replace")):
                e, s, n, t0 = map(int, m.groups())
                assert out.get((e, s), (n, t0)) == (n, t0), f"(epoch, seq) {(e, s)} reused"
                out[(e, s)] = (n, t0)
        return out

    def resealed(self) -> dict[tuple[int, int], list[int]]:
        """(epoch, seq) of each batch the gateway split -> the seqs it re-sealed it as,
        from its logs."""
        out: dict[tuple[int, int], list[int]] = {}
        for f in self.agent_logs:
            for m in RESEALED.finditer(f.read_text(errors="replace")):
                out[(int(m[1]), int(m[2]))] = [int(x) for x in m[3].split(",")]
        return out

    def made(self) -> set[tuple[int, int]]:
        """Every (epoch, seq) the gateway sealed: from readings, or re-sealing a split."""
        return set(self.sealed()) | {(e, c) for (e, _), cs in self.resealed().items() for c in cs}

    def at_hub(self) -> dict[tuple[int, int], tuple[int, int]]:
        if not self.db.exists():
            return {}
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return {
                (e, s): (n, t0)
                for e, s, n, t0 in con.execute(
                    "SELECT epoch, seq, n, t0 FROM batches WHERE gw = ?", (GW,)
                )
            }
        except sqlite3.OperationalError:  # no tables yet
            return {}
        finally:
            con.close()

    def split_at_hub(self) -> set[tuple[int, int]]:
        """The (epoch, seq) the gateway named as split (their readings went in new batches)."""
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            rows = con.execute(
                "SELECT epoch, first, last FROM gaps WHERE gw = ? AND reason = 'split'", (GW,)
            ).fetchall()
        finally:
            con.close()
        return {(e, s) for e, first, last in rows for s in range(first, last + 1)}

    async def until(self, cond: Callable[[], bool], what: str, within: float = 30.0) -> None:
        """Until ``cond()`` holds (the world's own progress, not a fixed sleep); fail
        naming ``what`` after ``within`` s (a hang, not a timing)."""
        async with asyncio.timeout(within):
            while not cond():
                assert self.agent_running(), self.tail(self.agent_logs[-1])
                await asyncio.sleep(0.1)

    async def sealed_more(self, n: int, what: str) -> None:
        """Until the gateway has sealed ``n`` more batches (from readings) than now."""
        have = len(self.sealed())
        await self.until(lambda: len(self.sealed()) >= have + n, f"{n} more batches: {what}")

    async def wait_delivered(self, within: float, only: set[tuple[int, int]] | None = None) -> bool:
        """Until every sealed batch (or those of ``only``) is at the hub (or named
        split), at most ``within`` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            have = set(self.at_hub())
            if have and (only or self.made()) <= have | self.split_at_hub():
                return True
            await asyncio.sleep(0.25)
        return False

    def status(self) -> dict[str, Any]:
        """The agent's status file (the last one it wrote: 'stopped' after a stop)."""
        return dict(json.loads((self.state / "status.json").read_text()))

    async def stats(self) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            *VITALS,
            "hub",
            "stats",
            "--db",
            str(self.db),
            "--json",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return dict(json.loads(out))

    async def assert_counts_agree(self) -> dict[str, Any]:
        """``vitals hub stats`` counts what the gateway sealed, tail included: per epoch
        the last seq is the gateway's last sealed one, and delivered + missing +
        dropped + split is every batch it sealed."""
        made = self.made()
        g: dict[str, Any] = (await self.stats())["gateways"][GW]
        for e in sorted({e for e, _ in made}):
            last = max(s for ee, s in made if ee == e)
            assert str(e) in g["epochs"], f"epoch {e} (sealed up to {last}) unknown at the hub"
            assert g["epochs"][str(e)]["last_seq"] == last, (
                f"epoch {e}: the gateway sealed up to seq {last}, the hub knows of "
                f"{g['epochs'][str(e)]['last_seq']}"
            )
        counted = g["batches"] + g["missing_batches"] + g["dropped_batches"] + g["split_batches"]
        assert counted == len(made), f"the hub counts {counted} batches, the gateway {len(made)}"
        return g

    async def counts_agreeing(self, within: float = 15.0) -> dict[str, Any]:
        """:meth:`assert_counts_agree`, once the hub has committed what the gateway's stop
        told it (a moment after the stop): retried until it holds or ``within`` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            try:
                return await self.assert_counts_agree()
            except AssertionError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.3)

    async def assert_exactly_once(self) -> str:
        """Every batch the gateway sealed is stored once (same count and first time
        stamp, that many readings), or was split and named so by a gap notice; the
        readings at the hub are the ones polled; stats agree."""
        for f in self.agent_logs:  # the gateway knew the hub key: receipts, not PUBACKs
            assert "no hub key" not in f.read_text(errors="replace"), self.tail(f)
        sealed, made, resealed = self.sealed(), self.made(), self.resealed()
        at_hub = self.at_hub()
        split = self.split_at_hub()
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        stored = dict(
            ((e, s), c)
            for e, s, c in con.execute(
                "SELECT epoch, seq, count(*) FROM readings WHERE gw = ? GROUP BY epoch, seq", (GW,)
            )
        )
        con.close()
        missing = sorted(made - set(at_hub) - split)
        polled = sum(n for n, _ in sealed.values())
        report = (
            f"{len(sealed)} batches sealed ({polled} readings), {len(resealed)} split into "
            f"{len(made) - len(sealed)}, {len(at_hub)} at the hub, {len(missing)} lost"
            f" ({sum(sealed.get(k, (0, 0))[0] for k in missing)} readings or more)"
        )
        stats = await self.stats()
        g = stats["gateways"][GW]
        report += f"; hub stats: {g['missing_batches']} missing, {g['batches']} batches"
        assert not missing, f"{report}: lost {missing[:10]}"
        assert split == set(resealed), f"{report}: split at the hub {sorted(split)}"
        assert set(at_hub) == made - split, f"{report}: unknown {sorted(set(at_hub) - made)}"
        for key, (n, t0) in sealed.items():
            if key not in split:
                assert at_hub[key] == (n, t0), f"batch {key} differs at the hub"
        for key, (n, _) in at_hub.items():  # each stored once, readings and all
            assert stored.get(key) == n, f"batch {key}: {stored.get(key)} readings, not {n}"
        assert g["readings"] == polled == sum(stored.values()), report
        assert g["missing_batches"] == 0, report
        assert stats["rejected"] == {}, report
        await self.assert_counts_agree()
        return report


@asynccontextmanager
async def world(
    tmp_path: Path,
    *,
    proxy: bool = False,
    broker_config: str = "",
    max_readings: int = 60,
    max_age_s: float = 0.3,
    overrides: dict[str, Any] | None = None,
    persistent: bool = True,
) -> AsyncIterator[tuple[World, MqttProxy | None]]:
    broker = MosquittoBroker(extra_config=broker_config)
    await broker.start()
    terms = [TcpTerminal(load_profile(p), seed=i) for i, p in enumerate(PROFILES)]
    px: MqttProxy | None = None
    w: World | None = None
    try:
        for t in terms:
            await t.start()
        if proxy:
            px = MqttProxy(broker.host, broker.port)
            await px.start()
        w = World(tmp_path, broker, px.port if px else broker.port, terms, max_readings, max_age_s)
        w.overrides = overrides
        w.setup()
        await w.start_hub(persistent=persistent)
        yield w, px
    finally:
        if w is not None:
            if w.agent is not None and w.agent.returncode is None:
                w.agent.kill()
                await w.agent.wait()
            if w._task is not None:
                with contextlib.suppress(Exception):
                    await w.stop_agent()
            await w.stop_hub()
        if px is not None:
            await px.stop()
        for t in terms:
            await t.stop()
        await broker.stop()


async def test_the_proxy_lies_relays_and_cuts(mosquitto: MosquittoBroker) -> None:
    """The tool itself: through the proxy a publish to a lied-about topic gets its
    PUBACK and never reaches a subscriber; others pass; CUT closes the connection."""
    async with (
        MqttProxy(mosquitto.host, mosquitto.port, rule=lie_on("/batch")) as proxy,
        aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="watcher") as sub,
    ):
        await sub.subscribe("t/#", qos=1)
        async with aiomqtt.Client(proxy.host, proxy.port, identifier="liar-victim") as pub:
            await asyncio.wait_for(pub.publish("t/batch", b"lost", qos=1), 5)  # acknowledged
            await asyncio.wait_for(pub.publish("t/meta", b"kept", qos=1), 5)
        got = []
        async with asyncio.timeout(5):
            async for msg in sub.messages:
                got.append((msg.topic.value, msg.payload))
                break
        assert got == [("t/meta", b"kept")]
        assert proxy.lied == {"t/batch": 1} and proxy.passed == {"t/meta": 1}
        proxy.rule = lambda topic, size: CUT
        async with MqttClient(proxy.host, proxy.port, client_id="cut-victim") as c:
            with pytest.raises(MqttError, match="lost"):  # no PUBACK: the end of the stream
                await asyncio.wait_for(c.publish("t/x", b"x", qos=1), 5)
        assert proxy.cut == {"t/x": 1}


ALLOW = "topic readwrite #\n"
DENY_BATCHES = f"topic deny {topics.DEFAULT_PREFIX}/+/batch\n" + ALLOW


@pytest.fixture
def acl() -> Iterator[Path]:
    """An ACL file allowing everything, outside pytest's (root-only) tmp tree: Mosquitto
    started as root reads it as its own user."""
    d = Path(tempfile.mkdtemp(prefix="vitals-acl-"))
    d.chmod(0o755)
    (d / "acl").write_text(ALLOW)
    (d / "acl").chmod(0o644)
    yield d / "acl"
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("liar", ["proxy", "acl"])
async def test_batches_acknowledged_and_dropped(tmp_path: Path, acl: Path, liar: str) -> None:
    """Batches acknowledged and dropped, for a while in the middle of a run and for
    its tail, by the lying proxy or by Mosquitto's ACL denying the batch topic
    (reloaded on SIGHUP), reach the hub; the hub counts the tail while it is missing."""
    config = f"acl_file {acl}\n" if liar == "acl" else ""
    async with world(tmp_path, proxy=liar == "proxy", broker_config=config) as (w, proxy):

        def lie(on: bool) -> None:
            if proxy is not None:
                proxy.rule = lie_on("/batch") if on else pass_all
            else:
                acl.write_text(DENY_BATCHES if on else ALLOW)
                assert w.broker._proc is not None
                w.broker._proc.send_signal(signal.SIGHUP)  # Mosquitto reloads its ACL

        await w.start_agent()
        await w.until(lambda: len(w.at_hub()) >= 3, "3 batches at the hub before the lies")
        lie(True)
        await w.sealed_more(8, "sealed while they are dropped")  # ~2.4 s of batches
        lie(False)
        last = max(s for _, s in w.sealed())
        await w.until(  # the lie is over: what comes next passes
            lambda: any(s > last for _, s in w.at_hub()), "a batch at the hub after the lies"
        )
        lie(True)  # the tail: dropped until the gateway stops
        await w.sealed_more(4, "the tail, dropped")
        await w.stop_agent()
        g = await w.counts_agreeing()  # the tail is known while it is missing
        held = w.status()["spool"]["depth_batches"]  # the gateway's own count of what is due
        assert g["missing_batches"] == held > 0, f"the hub misses {g['missing_batches']}"
        lie(False)
        await w.start_agent()
        delivered = await w.wait_delivered(45)
        await w.stop_agent()
        delivered = await w.wait_delivered(10) and delivered  # the batch sealed at the stop
        report = await w.assert_exactly_once()
    lied = f"{sum(proxy.lied.values())} batches lied to" if proxy else "ACL denial"
    print(f"\n{liar}: {lied}; missing at the stop {g['missing_batches']}; {report}")
    assert delivered


async def test_broker_restarted_without_persistence(tmp_path: Path) -> None:
    """The hub is away, the broker queues for its session, then restarts without
    persistence: what it queued is gone, the gateway still has it."""
    async with world(tmp_path) as (w, _):
        await w.start_agent()
        await w.until(lambda: len(w.at_hub()) >= 3, "3 batches at the hub")
        await w.stop_hub()
        # batches acknowledged by the broker, queued for the hub
        await w.sealed_more(8, "sealed while the hub is away")
        await w.broker.stop()
        await w.broker.start()  # persistence false: the queue and the session are gone
        await w.start_hub()
        delivered = await w.wait_delivered(45)
        await w.stop_agent()
        delivered = await w.wait_delivered(10) and delivered
        report = await w.assert_exactly_once()
    print(f"\nbroker restarted without persistence: {report}")
    assert delivered


@pytest.mark.parametrize("session", ["persistent", "no-persistent"])
async def test_hub_killed_with_kill_9_and_restarted(tmp_path: Path, session: str) -> None:
    """kill -9 of the hub, three times, while the gateway sends; with its persistent
    session (the broker keeps what comes meanwhile) and without one (what the broker
    acknowledged while the hub was dead went nowhere)."""
    persistent = session == "persistent"
    async with world(tmp_path, persistent=persistent) as (w, _):
        await w.start_agent()
        for batches in (4, 7, 2):  # ~1.2, 2.1 and 0.6 s of batches between the kills
            await w.sealed_more(batches, "sealed while the hub runs")
            await w.kill_hub()
            await w.sealed_more(4, "sealed while the hub is dead")
            await w.start_hub(persistent=persistent)
        delivered = await w.wait_delivered(45)
        await w.stop_agent()
        delivered = await w.wait_delivered(10) and delivered
        report = await w.assert_exactly_once()
    print(f"\nhub ({session} session) killed with kill -9 three times: {report}")
    assert delivered


QUICK = {"confirm_timeout_s": 2.0, "heartbeat_s": 2.0}


def _cut_over_1200(topic: str, size: int) -> Action:
    """A broker that closes the connection on a batch over 1200 bytes without having
    said its limit (MQTT 3.1.1 cannot; Mosquitto behind the proxy names none)."""
    return CUT if size > 1200 and topic.endswith("/batch") else PASS


LIMITS = ["message_size_limit", "max_packet_size", "unnamed-cut"]


def _limited(tmp_path: Path, limit: str) -> Any:
    """The world of a size limit of 1200 bytes: Mosquitto's message_size_limit (a
    PUBACK, the batch dropped), its max_packet_size (named in the MQTT 5 CONNACK: split
    before sending), or the proxy cutting the connection on a batch over it with no
    limit named (the reset-twice rule of MQTT 3.1.1 brokers)."""
    return world(
        tmp_path,
        proxy=limit == "unnamed-cut",
        broker_config=f"{limit} 1200\n" if limit != "unnamed-cut" else "",
        max_readings=2000,
        max_age_s=3.0,
        overrides=QUICK if limit == "message_size_limit" else None,
    )


@pytest.mark.parametrize("limit", LIMITS)
async def test_broker_size_limit_below_a_batch(tmp_path: Path, limit: str) -> None:
    """Batches of ~870 readings (~1650 bytes, 3 s of polling) through a broker that
    takes 1200 bytes at most (the point table, 1053, passes): message_size_limit
    acknowledges and drops every one of them; max_packet_size, named in Mosquitto's
    MQTT 5 CONNACK, has them split before they are sent (the connection never fails
    on one); a limit nobody names closes the connection on each, twice, then the
    batch is split. Once the devices go quiet (the last batch is small) they have
    passed, split, while the gateway runs, never dropped.

    With message_size_limit only the hub's silence tells: the agent runs in this
    process with a 2 s receipt timeout (60 s by default, not in the configuration
    file) to keep the test short; otherwise ``vitals run`` as it ships."""
    async with _limited(tmp_path, limit) as (w, proxy):
        if proxy is not None:
            proxy.rule = _cut_over_1200
        await w.start_agent()
        await w.until(
            lambda: sum(1 for n, _ in w.sealed().values() if n >= 700) >= 2,
            "two batches over the limit",
        )
        for t in w.terms:  # the devices go quiet: no new batch, the backlog must go
            await t.stop()
        delivered = await w.wait_delivered(40)
        await w.stop_agent()
        delivered = await w.wait_delivered(10) and delivered
        big = sum(1 for n, _ in w.sealed().values() if n >= 700)
        report = await w.assert_exactly_once()
        logs = "".join(f.read_text(errors="replace") for f in w.agent_logs)
    print(f"\n{limit} 1200: {big} batches over the limit; {report}")
    assert big >= 2, "no batch over the limit: the test proves nothing"
    assert delivered, "the batches over the limit did not pass while the gateway ran"
    if limit == "max_packet_size":  # split before sending, never by a reset
        assert "over the broker's maximum packet size of 1200" in logs
        assert "the connection failed" not in logs and "uplink to" not in logs, "a reset"
    if limit == "unnamed-cut":
        assert proxy is not None and sum(proxy.cut.values()) >= 2
        assert "the connection failed 2 times on it" in logs


@pytest.mark.parametrize("limit", LIMITS)
async def test_every_batch_over_the_size_limit_passes_while_traffic_flows(
    tmp_path: Path, limit: str
) -> None:
    """As above, but the devices keep their pace: every batch is over the limit and
    the queue must not wait for a small one (the issue: 'never blocking the queue')."""
    async with _limited(tmp_path, limit) as (w, proxy):
        if proxy is not None:
            proxy.rule = _cut_over_1200
        await w.start_agent()
        await w.until(lambda: len(w.sealed()) >= 2, "two batches sealed")
        first = set(w.sealed())
        assert all(n >= 700 for n, _ in w.sealed().values()), "a batch under the limit"
        passed = await w.wait_delivered(20, only=first)
        await w.stop_agent()
    assert passed, f"with every batch over the limit, the first {len(first)} did not pass in 20 s"
