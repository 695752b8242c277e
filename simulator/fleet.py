"""`vitals sim fleet`: G real agents, their emulated terminals, a broker and a hub, on one machine.

The runner starts the broker (Mosquitto when installed, else the embedded
one), the reference hub in this process, ``G * T`` emulated Modbus TCP
terminals in a few emulator processes (``python -m simulator.fleet emulate``),
and G agent processes (``python -m agent run --config F``), each with its own
state directory, identity key (enrolled at the hub before it starts) and
configuration. It plays the scenario (signal models, faults, a typhoon), shows
progress, stops the agents with SIGTERM (they seal, spool and drain), and
reports per gateway and in total:

- ``generated``: readings the terminals served (terminal side: every answered
  request times the points the agent's plan reads with it);
- ``sealed``: batches the agent sealed (its spool's id sequence);
- ``delivered``: readings and batches verified and stored at the hub;
- ``lost``: sealed batches the hub does not have (exact: by seq);
- ``duplicated``: readings stored twice after dedup (must be 0), beside the
  duplicates the hub received and dropped;
- ``failed``: readings of failed polls (comm error, or stale: the last good
  value repeated), delivered like any other;
- ``unanswered``: served values the hub has no good reading for (the reply
  came after the agent's timeout, or was in flight at stop);
- latency from poll to hub (reading ``ts`` to the hub's receive time):
  p50, p99, max; CPU seconds and peak RSS per agent (``wait4``).

Edge events: when agents publish them (``{prefix}/{gw}/event``) the runner
collects and verifies them; in any case it replays the hub's stored readings
through the same :class:`agent.edge.rules.RuleEngine` and lists what fired where
and when (``events`` in the report; ``events_source`` says which).

Exit status: 0 when nothing was lost or duplicated, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocols import topics
from protocols.modbus.pdu import READ
from simulator.scenario import Scenario

__all__ = ["FleetResult", "main", "run_fleet"]

REPO = Path(__file__).resolve().parent.parent
TERMINALS_PER_EMULATOR = 200
DEFAULT_PROFILES = (
    "sound_level_meter",
    "weather_station",
    "radar_water_level",
    "rain_gauge",
    "pm_monitor",
    "gas_detector",
    "manhole_sensor",
    "multi_sensor_air_box",
    "pump_meter",
)


@dataclass
class TerminalPlan:
    gateway: int
    index: int
    profile: str
    port: int
    seed: int

    @property
    def device(self) -> str:
        return f"t{self.index:03d}-{self.profile.replace('_', '-')}"


@dataclass
class GatewayRun:
    index: int
    name: str
    state_dir: Path
    config_path: Path
    terminals: list[TerminalPlan]
    proc: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    cpu_s: float = 0.0
    peak_rss_kb: int = 0


@dataclass
class FleetResult:
    report: dict[str, Any]
    ok: bool
    workdir: Path
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- emulator process


def _fc_space(fc: int) -> str:
    return {1: "coil", 2: "discrete", 3: "holding", 4: "input"}.get(fc, "?")


async def _emulate(spec_path: Path) -> None:
    """Serve the terminals of ``spec_path``; on SIGTERM write served counts and exit."""

    from drivers.profiles import load_profile
    from simulator.tcp import TcpTerminal

    spec = json.loads(spec_path.read_text())  # noqa: ASYNC240 - small, at start
    scen = Scenario.from_dict(spec["scenario"])
    t0_file = Path(spec["t0_file"])
    t0 = 0.0  # the scenario clock starts when the runner says (every agent is up)
    duration: float = spec["duration"]
    gateways: int = spec["gateways"]
    served: dict[str, Counter[str]] = {}

    class FleetTerminal(TcpTerminal):
        noisy = 0.0
        key = ""
        rng = random.Random(0)

        def handle(self, unit: int, pdu: bytes) -> bytes | None:
            fc = pdu[0] if pdu else 0
            if not self.dead and self.noisy and fc <= 4 and self.rng.random() < self.noisy:
                self.requests += 1
                return bytes([fc | 0x80, 4])  # server device failure
            out = super().handle(unit, pdu)
            if out is not None and fc <= 4 and len(pdu) == 5 and out[:1] == pdu[:1]:
                _, address, count = READ.unpack(pdu)
                served[self.key][f"{_fc_space(fc)}:{address}:{count}"] += 1
            return out

    class ModelSignal:
        """A scenario signal model in front of the terminal's own signal."""

        def __init__(self, inner: Any, model: Any, rng: random.Random, stuck: bool) -> None:
            self.inner, self.model, self.rng, self.stuck = inner, model, rng, stuck
            self.inner_value = inner.value  # the signal's own model (bound method)
            self.offset = 0.0
            self.held: float | None = None
            self.phase = rng.uniform(0, 2 * math.pi)

        def value(self, t: float | None = None) -> Any:
            t = time.time() if t is None else t
            m = self.model
            if m is None:
                v = self.inner_value(t)
                if not self.offset or isinstance(v, bool | str):
                    return v
                v = float(v) + self.offset
            else:
                if self.stuck and self.held is not None:
                    return self.held
                day = math.sin(2 * math.pi * ((t % 86400) / 86400) + self.phase)
                v = m.base + m.daily * day + m.drift_per_min * (t - t0) / 60
                v += self.rng.gauss(0, m.noise) if m.noise else 0.0
                v += self.offset
            p = self.inner.point
            lo, hi = self.inner.lo, self.inner.hi
            v = min(hi, max(lo, v))
            spec = p.spec
            if spec.type.name not in ("F32", "F64"):
                raw = round((v - spec.offset) / spec.scale)
                v = raw if spec.scale == 1 and spec.offset == 0 else raw * spec.scale + spec.offset
            if self.stuck and self.held is None:
                self.held = v
            return v

    terms: list[tuple[TerminalPlan, FleetTerminal, dict[str, ModelSignal]]] = []
    for item in spec["terminals"]:
        tp = TerminalPlan(**item)
        term = FleetTerminal(load_profile(tp.profile), port=0, seed=tp.seed)  # the OS picks
        term.key = f"{tp.gateway}:{tp.index}"
        term.rng = random.Random(tp.seed)
        served[term.key] = Counter()
        wrapped: dict[str, ModelSignal] = {}
        for name, sig in list(term.signals.items()):
            model = scen.signal_for(tp.profile, name)
            rng = random.Random(f"{tp.seed}:{name}")
            stuck = bool(model and rng.random() < model.stuck_fraction)
            ms = ModelSignal(sig, model, rng, stuck)
            sig.value = ms.value  # type: ignore[method-assign]  # the registers call it
            wrapped[name] = ms
        await term.start()
        terms.append((tp, term, wrapped))
    ports = {f"{tp.gateway}:{tp.index}": term.port for tp, term, _ in terms}
    print("ready " + json.dumps(ports), flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    ty = scen.typhoon
    raised = {r.point: r.peak for r in ty.raises} if ty else {}
    while not stop.is_set():
        if not t0:
            with contextlib.suppress(OSError, ValueError):
                t0 = float(t0_file.read_text())  # noqa: ASYNC240 - a few bytes
        frac = (time.time() - t0) / duration if t0 else 0.0
        for tp, term, wrapped in terms:
            dead = False
            noisy = 0.0
            for ev in scen.events:
                if ev.gateway not in (-1, tp.gateway) or ev.terminal not in (-1, tp.index):
                    continue
                active = ev.at <= frac and (ev.duration == 0 or frac < ev.at + ev.duration)
                if active and ev.kind == "terminal_dies":
                    dead = True
                elif active and ev.kind == "bus_noisy":
                    noisy = ev.error_rate
            if ty is not None:
                level = ty.intensity(frac, tp.gateway, gateways)
                has_raised = False
                for name, ms in wrapped.items():
                    if name in raised:
                        ms.offset = raised[name] * level
                        has_raised = True
                # failing terminals die just past their gateway's peak, once the storm's
                # height has been reported: the events a run must show do not hang on the
                # exact poll at which a terminal goes silent
                if has_raised and frac >= ty.fail_at(tp.gateway, gateways):
                    dead = dead or ty.fails(tp.gateway, tp.index)
            term.dead = dead
            term.noisy = noisy
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
    out = json.dumps({k: dict(v) for k, v in served.items()})
    Path(spec["out"]).write_text(out)  # noqa: ASYNC240 - small, at exit
    for _, term, _ in terms:
        with contextlib.suppress(Exception):
            await term.stop()


# --------------------------------------------------------------------------- broker outage proxy


class OutageProxy:
    """A TCP relay agents -> broker that can drop every connection and refuse new ones."""

    def __init__(self, target_port: int) -> None:
        from simulator.broker import free_port

        self.target = target_port
        self.port = free_port()
        self.down = False
        self._conns: set[asyncio.StreamWriter] = set()
        self._all: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        w.close()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self._all.append(w)
        if self.down:
            w.close()
            return
        try:
            br, bw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            w.close()
            return
        self._conns.update((w, bw))
        self._all.append(bw)
        try:
            await asyncio.gather(self._pipe(r, bw), self._pipe(br, w))
        finally:
            self._conns.discard(w)
            self._conns.discard(bw)

    def cut(self) -> None:
        """Drop every connection and stop listening: connects are refused, as with a dead broker."""
        self.down = True
        for w in list(self._conns):
            w.close()
        if self._server is not None:
            self._server.close()
            self._server = None

    async def restore(self) -> None:
        self.down = False
        if self._server is None:
            await self.start()

    async def stop(self) -> None:
        self.cut()
        for w in self._all:
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()
        self._all.clear()


# --------------------------------------------------------------------------- planning


def _gateway_config(gw: GatewayRun, broker_port: int, scen: Scenario, max_age_s: float) -> str:
    lines = [
        "[gateway]",
        f'id = "{gw.name}"',
        f'state_dir = "{gw.state_dir}"',
        "",
        "[uplink]",
        'host = "127.0.0.1"',
        f"port = {broker_port}",
        "",
        "[batch]",
        f"max_age_s = {max_age_s}",
        "",
        "[spool]",
        'durability = "normal"',
        "",
        "[log]",
        'level = "warning"',
        "",
    ]
    for t in gw.terminals:
        lines += [
            "[[buses]]",
            f'name = "bus-{t.index:03d}"',
            'kind = "tcp"',
            'host = "127.0.0.1"',
            f"tcp_port = {t.port}",
            "timeout_s = 1.0",
            "retries = 0",
            "",
        ]
    for t in gw.terminals:
        lines += [
            "[[devices]]",
            f'name = "{t.device}"',
            f'bus = "bus-{t.index:03d}"',
            f'profile = "{t.profile}"',
            "slave = 1",
            f"interval_s = {scen.interval_s}",
            "",
        ]
    for rule in scen.rules:
        lines.append("[[rules]]")
        for k, v in rule.items():
            lines.append(f"{k} = {json.dumps(v)}")
        lines.append("")
    return "\n".join(lines)


def _served_readings(
    config_path: Path, served: dict[str, dict[str, int]], gw: GatewayRun
) -> dict[str, int]:
    """Readings the terminals of ``gw`` served, by mapping requests onto the agent's plan."""
    from agent.ops.config import load_config
    from protocols.modbus import plan

    cfg = load_config(config_path)
    out: dict[str, int] = {}
    for t in gw.terminals:
        dev = cfg.device(t.device)
        sizes: dict[str, int] = {}
        groups: dict[float, list[Any]] = {}
        for p in dev.profile.points:
            groups.setdefault(p.interval_s or dev.interval_s, []).append(p.spec)
        for specs in groups.values():
            for req in plan(
                specs, max_registers=dev.profile.max_registers, max_gap=dev.profile.max_gap
            ):
                sizes.setdefault(f"{req.space}:{req.address}:{req.count}", len(req.points))
        counts = served.get(f"{gw.index}:{t.index}", {})
        out[t.device] = sum(n * sizes.get(k, 0) for k, n in counts.items())
    return out


# --------------------------------------------------------------------------- the run


def _proc_cpu_rss(pid: int) -> tuple[float, int]:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        rss = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1])
        return cpu, rss
    except (OSError, ValueError, IndexError):
        return 0.0, 0


def _percentiles(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    s = sorted(values)
    return {
        "p50_ms": float(s[len(s) // 2]),
        "p99_ms": float(s[min(len(s) - 1, math.ceil(len(s) * 0.99) - 1)]),
        "max_ms": float(s[-1]),
    }


class _HubDb:
    """The hub's database, read for the report: its SQLite file (read-only), or the
    PostgreSQL database of ``--hub-db``; the same queries (``?`` placeholders)."""

    def __init__(self, target: Path | str) -> None:
        from hub.store import is_url

        self.pg = is_url(target)
        if self.pg:
            import psycopg

            self.con: Any = psycopg.connect(str(target), autocommit=True)
        else:
            self.con = sqlite3.connect(f"file:{target}?mode=ro", uri=True)

    def execute(self, query: str, params: Sequence[object] = ()) -> Any:
        return self.con.execute(query.replace("?", "%s") if self.pg else query, params)

    def close(self) -> None:
        self.con.close()


def replay_events(
    db_path: Path | str, gateways: Sequence[GatewayRun], until_ms: int | None = None
) -> list[dict[str, Any]]:
    """Run every gateway's rules over its readings stored at the hub, in time order.

    ``until_ms`` ends the replay at the end of the scenario: the stop phase (every
    agent sealing and draining at once) is not part of the weather.
    """
    from agent.edge.rules import RuleEngine
    from agent.ops.config import load_config

    out: list[dict[str, Any]] = []
    con = _HubDb(db_path)
    try:
        for gw in gateways:
            cfg = load_config(gw.config_path)
            if not cfg.rules:
                continue
            rows = con.execute(
                "SELECT point, ts, value, quality FROM readings WHERE gw = ? AND ts <= ?"
                " ORDER BY ts",
                (gw.name, until_ms if until_ms is not None else 2**62),
            ).fetchall()
            if not rows:
                continue
            from protocols.reading import Quality, Reading

            eng = RuleEngine(cfg.rules, start_ms=rows[0][1])
            events = []
            last_tick = rows[0][1]
            for point, ts, value, quality in rows:
                if ts - last_tick >= 1000:
                    events += eng.tick(ts)
                    last_tick = ts
                events += eng.feed(Reading(point, ts, value, Quality(quality))) or []
            events += eng.tick(rows[-1][1])
            for e in events:
                out.append(
                    {
                        "gateway": gw.name,
                        "rule": e.rule,
                        "state": e.state,
                        "device": e.device,
                        "point": e.point,
                        "value": e.value,
                        "ts": e.ts,
                        "detail": e.detail,
                    }
                )
    finally:
        con.close()
    out.sort(key=lambda e: (e["ts"], e["gateway"]))
    return out


async def run_fleet(
    *,
    gateways: int,
    terminals: int,
    duration: float,
    scenario: Scenario,
    broker_kind: str = "auto",
    workdir: Path | None = None,
    max_age_s: float = 1.0,
    progress: bool = True,
    log: Any = None,
    hub_db: str | None = None,
) -> FleetResult:
    from rich.console import Console

    from agent.ops.state import create_identity, save_hub_key
    from hub.core import HubCore
    from hub.enroll import load_or_create_hub_key
    from hub.worker import Hub
    from simulator.broker import free_port, make_broker

    console = Console(stderr=True)
    say = log or (lambda msg: console.print(msg) if progress else None)
    work = Path(workdir or tempfile.mkdtemp(prefix="vitals-fleet-"))
    work.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, at start
    profiles = scenario.profiles or DEFAULT_PROFILES
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("VITALS_CONFIG", None)

    broker = make_broker(broker_kind)
    await broker.start()
    outage = any(e.kind == "broker_outage" for e in scenario.events)
    proxy = OutageProxy(broker.port) if outage else None
    if proxy:
        await proxy.start()
    agent_port = proxy.port if proxy else broker.port
    hub_target: Path | str = hub_db or work / "hub.sqlite3"  # --hub-db: PostgreSQL
    core = HubCore(hub_target)
    # the hub's key (its public half goes to each gateway, as enrollment does): the
    # gateways keep each batch until the hub's signed receipt
    hub_key = load_or_create_hub_key(work / "hub.key")
    hub = Hub(
        core,
        host=broker.host,
        port=broker.port,
        shared=broker.shared_subscriptions,
        client_id="vitals-fleet-hub",
        hub_key=hub_key,
    )
    emulators: list[subprocess.Popen[bytes]] = []
    runs: list[GatewayRun] = []
    collected: list[dict[str, Any]] = []
    t0 = time.time()
    try:
        async with asyncio.TaskGroup() as tg:
            hub_task = tg.create_task(hub.run(), name="fleet.hub")
            event_task = tg.create_task(
                _collect_events(broker.host, broker.port, core, collected), name="fleet.events"
            )
            await asyncio.wait_for(hub.subscribed.wait(), 15)
            # plan gateways and terminals
            seed = 0
            for g in range(gateways):
                name = f"fleet-gw-{g:03d}"
                terms = []
                for i in range(terminals):
                    terms.append(
                        TerminalPlan(
                            g, i, profiles[(g * terminals + i) % len(profiles)], free_port(), seed
                        )
                    )
                    seed += 1
                state = work / name
                runs.append(GatewayRun(g, name, state, work / f"{name}.toml", terms))
            # emulators
            all_terms = [t for gw in runs for t in gw.terminals]
            n_emu = max(1, math.ceil(len(all_terms) / TERMINALS_PER_EMULATOR))
            ports: dict[str, int] = {}
            for e in range(n_emu):
                spec = {
                    "terminals": [t.__dict__ for t in all_terms[e::n_emu]],
                    "scenario": scenario.to_dict(),
                    "t0_file": str(work / "t0"),
                    "duration": duration,
                    "gateways": gateways,
                    "out": str(work / f"emulator-{e}.json"),
                }
                path = work / f"emulator-{e}.spec.json"
                path.write_text(json.dumps(spec))
                emulators.append(
                    subprocess.Popen(  # noqa: ASYNC220 - fork/exec, not waiting
                        [sys.executable, "-m", "simulator.fleet", "emulate", str(path)],
                        env=env,
                        stdout=subprocess.PIPE,
                        stderr=(work / f"emulator-{e}.log").open("wb"),
                    )
                )
            for p in emulators:
                assert p.stdout is not None
                line = await asyncio.to_thread(p.stdout.readline)
                if not line.startswith(b"ready "):
                    raise RuntimeError(f"emulator did not start: {line!r}; see {work}")
                ports.update(json.loads(line[6:]))
            for t in all_terms:
                t.port = ports[f"{t.gateway}:{t.index}"]
            say(f"{len(all_terms)} terminals up in {n_emu} emulator process(es)")
            # agents: identity, enrollment, config, process
            from agent.ops.config import load_config
            from protocols.errors import ConfigError

            for gw in runs:
                ident = await asyncio.to_thread(create_identity, gw.state_dir, exist_ok=True)
                core.enroll(gw.name, ident.public_raw)
                save_hub_key(gw.state_dir, hub_key.public_key().public_bytes_raw())
                gw.config_path.write_text(_gateway_config(gw, agent_port, scenario, max_age_s))
                try:
                    load_config(gw.config_path)
                except ConfigError as exc:
                    raise RuntimeError(f"scenario rules do not fit {gw.name}: {exc}") from exc
            for gw in runs:
                gw.proc = subprocess.Popen(  # noqa: ASYNC220
                    [sys.executable, "-m", "agent", "run", "--config", str(gw.config_path)],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=(gw.state_dir / "agent.log").open("wb"),
                )
            # the scenario clock starts once every agent has connected (its meta arrived)
            deadline = time.monotonic() + 30 + gateways
            while core.counters["meta"] < gateways and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
            t0 = time.time()
            (work / "t0").write_text(repr(t0))
            say(
                f"{gateways} agents up ({core.counters['meta']} connected); "
                f"scenario '{scenario.name}' for {duration:g} s"
            )
            # the run
            await _play(scenario, duration, t0, proxy, core, runs, progress, console, say)
            # measure and stop the agents
            for gw in runs:
                assert gw.proc is not None
                gw.proc.send_signal(signal.SIGTERM)
            await asyncio.gather(*(asyncio.to_thread(_reap, gw) for gw in runs))
            # let the hub take what the broker still holds
            await _settle(core)
            hub_task.cancel()
            event_task.cancel()
        core.flush()
    finally:
        for p in emulators:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in emulators:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(p.wait, 15)
        for gw in runs:
            if gw.proc is not None and gw.exit_code is None and gw.proc.poll() is None:
                gw.proc.kill()
        if proxy:
            await proxy.stop()
        await broker.stop()
        core.close()
    report = _report(work, runs, scenario, duration, broker.kind, collected, t0, hub_target)
    ok = report["total"]["lost_batches"] == 0 and report["total"]["duplicated"] == 0
    ok = ok and report["total"]["rejected"] == 0 and report["total"]["spool_left"] == 0
    ok = ok and all(g["exit_code"] == 0 for g in report["gateways"])
    report["ok"] = ok
    return FleetResult(report, ok, work)


async def _collect_events(host: str, port: int, core: Any, out: list[dict[str, Any]]) -> None:
    """Verified events the agents publish (when the agent hook is wired)."""
    import aiomqtt

    from protocols.errors import ProtocolError
    from protocols.event import parse_event

    seen: set[tuple[str, int, int]] = set()
    while True:
        try:
            async with aiomqtt.Client(host, port, identifier="vitals-fleet-events") as client:
                await client.subscribe(topics.subscription("event"), qos=1)
                async for msg in client.messages:
                    if not isinstance(msg.payload, bytes | bytearray):
                        continue
                    try:
                        sealed = parse_event(bytes(msg.payload))
                        h = sealed.header
                        key = core._key(h.gw, h.kid)
                        if isinstance(key, str):
                            continue
                        sealed.verify(key)
                        e = sealed.event()
                    except ProtocolError:
                        continue
                    if (h.gw, h.epoch, h.seq) in seen:
                        continue
                    seen.add((h.gw, h.epoch, h.seq))
                    out.append(
                        {
                            "gateway": h.gw,
                            "rule": e.rule,
                            "state": e.state,
                            "device": e.device,
                            "point": e.point,
                            "value": e.value,
                            "ts": e.ts,
                            "detail": e.detail,
                            "received_ms": time.time_ns() // 10**6,
                        }
                    )
        except aiomqtt.MqttError:
            await asyncio.sleep(0.5)


def _reap(gw: GatewayRun) -> None:
    assert gw.proc is not None
    try:
        _, status, usage = os.wait4(gw.proc.pid, 0)
    except ChildProcessError:
        gw.exit_code = gw.proc.wait()
        return
    gw.exit_code = os.waitstatus_to_exitcode(status)
    gw.proc.returncode = gw.exit_code
    gw.cpu_s = usage.ru_utime + usage.ru_stime
    gw.peak_rss_kb = usage.ru_maxrss


async def _settle(core: Any, quiet_s: float = 2.0, limit_s: float = 30.0) -> None:
    """Wait until the hub has stored nothing new for ``quiet_s``."""
    start = time.monotonic()
    last = -1
    since = time.monotonic()
    while time.monotonic() - start < limit_s:
        n = core.counters["readings"] + core.counters["duplicates"]
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        await asyncio.sleep(0.2)


async def _play(
    scen: Scenario,
    duration: float,
    t0: float,
    proxy: OutageProxy | None,
    core: Any,
    runs: list[GatewayRun],
    progress: bool,
    console: Any,
    say: Any,
) -> None:
    from rich.live import Live
    from rich.table import Table

    # the run starts when the scenario clock does (agents are importing meanwhile)
    await asyncio.sleep(max(0.0, t0 - time.time()))
    outages = [e for e in scen.events if e.kind == "broker_outage"]
    end = t0 + duration
    live = Live(console=console, refresh_per_second=2, transient=True) if progress else None
    with live if live else contextlib.nullcontext():
        while (now := time.time()) < end:
            frac = (now - t0) / duration
            if proxy:
                down = any(e.at <= frac < e.at + e.duration for e in outages)
                if down and not proxy.down:
                    proxy.cut()
                    say(f"[yellow]broker unreachable for the agents at {now - t0:.0f} s[/]")
                elif not down and proxy.down:
                    await proxy.restore()
                    say(f"[green]broker back at {now - t0:.0f} s[/]")
            if live:
                alive = sum(1 for g in runs if g.proc and g.proc.poll() is None)
                cpu = rss = 0.0
                for g in runs:
                    if g.proc:
                        c, r = _proc_cpu_rss(g.proc.pid)
                        cpu += c
                        rss = max(rss, r)
                t = Table.grid(padding=(0, 2))
                t.add_row(
                    f"[b]vitals fleet[/b] {scen.name}",
                    f"{now - t0:5.0f}/{duration:.0f} s",
                    f"agents alive {alive}/{len(runs)}",
                    f"agents cpu {cpu:.0f} s, max rss {rss / 1024:.0f} MiB",
                )
                t.add_row(
                    "hub",
                    f"batches {core.counters['batches']}",
                    f"readings {core.counters['readings']}",
                    f"duplicates dropped {core.counters['duplicates']}",
                )
                live.update(t)
            await asyncio.sleep(1.0)
        if proxy and proxy.down:
            await proxy.restore()


def _report(
    work: Path,
    runs: list[GatewayRun],
    scen: Scenario,
    duration: float,
    broker_kind: str,
    collected: list[dict[str, Any]],
    t0: float,
    hub_target: Path | str,
) -> dict[str, Any]:
    served: dict[str, dict[str, int]] = {}
    for f in sorted(work.glob("emulator-*.json")):
        if not f.name.endswith(".spec.json"):
            served.update(json.loads(f.read_text()))
    con = _HubDb(hub_target)
    counters = {k: int(v) for k, v in con.execute("SELECT name, value FROM counters")}
    gateways: list[dict[str, Any]] = []
    all_lat: list[int] = []
    for gw in runs:
        seqs = {
            (e, s): n
            for e, s, n in con.execute("SELECT epoch, seq, n FROM batches WHERE gw = ?", (gw.name,))
        }
        rows = con.execute(
            "SELECT count(*), coalesce(sum(CAST(r.quality IN (0, 1) AS INTEGER)), 0),"
            " coalesce(sum(CAST(r.quality IN (2, 3) AS INTEGER)), 0) FROM readings r WHERE r.gw = ?",
            (gw.name,),
        ).fetchone()
        stored, valued, comm = int(rows[0]), int(rows[1]), int(rows[2])
        lat = [
            int(x)
            for (x,) in con.execute(
                "SELECT b.received_ms - r.ts FROM readings r JOIN batches b"
                " ON b.gw = r.gw AND b.epoch = r.epoch AND b.seq = r.seq WHERE r.gw = ?",
                (gw.name,),
            )
        ]
        all_lat += lat
        sealed, left_rows = _spool_facts(gw.state_dir / "spool.sqlite3")
        # a row left in the spool that the hub has is only a redelivery in waiting
        left = sum(1 for e, s, _ in left_rows if (e, s) not in seqs)
        left_readings = sum(n for e, s, n in left_rows if (e, s) not in seqs)
        left_delivered = len(left_rows) - left
        delivered_n = sum(seqs.values())
        lost = max(0, sealed - len(seqs))
        gen = _served_readings(gw.config_path, served, gw) if served else {}
        generated = sum(gen.values())
        gateways.append(
            {
                "gateway": gw.name,
                "terminals": len(gw.terminals),
                "generated": generated,
                "sealed_batches": sealed,
                "delivered_batches": len(seqs),
                "delivered": delivered_n,
                "delivered_values": valued,
                "failed_poll_readings": comm,
                "unanswered": max(0, generated - valued),
                "lost_batches": lost,
                "lost_readings_known": left_readings,
                "spool_left": left,
                "spool_left_delivered": left_delivered,
                "duplicated": stored - delivered_n,
                "latency": _percentiles(lat),
                "cpu_s": round(gw.cpu_s, 2),
                "cpu_pct": round(100 * gw.cpu_s / max(1.0, duration), 2),
                "peak_rss_mib": round(gw.peak_rss_kb / 1024, 1),
                "exit_code": gw.exit_code,
            }
        )
    con.close()
    events = collected
    source = "agents" if collected else "replay"
    if not collected and scen.rules:
        events = replay_events(hub_target, runs, int((t0 + duration) * 1000))
    total = {
        k: sum(g[k] for g in gateways)
        for k in (
            "generated",
            "sealed_batches",
            "delivered_batches",
            "delivered",
            "delivered_values",
            "failed_poll_readings",
            "unanswered",
            "lost_batches",
            "lost_readings_known",
            "spool_left",
            "spool_left_delivered",
            "duplicated",
        )
    }
    total["duplicates_dropped_at_hub"] = counters.get("duplicates", 0)
    total["rejected"] = sum(v for k, v in counters.items() if k.startswith("rejected."))
    total["latency"] = _percentiles(all_lat)
    total["agent_cpu_s"] = round(sum(g.cpu_s for g in runs), 1)
    total["agent_cpu_pct_mean"] = round(
        100 * sum(g.cpu_s for g in runs) / max(1.0, duration) / max(1, len(runs)), 2
    )
    total["agent_peak_rss_mib_max"] = round(max((g.peak_rss_kb for g in runs), default=0) / 1024, 1)
    return {
        "scenario": scen.name,
        "gateways_n": len(runs),
        "terminals_per_gateway": len(runs[0].terminals) if runs else 0,
        "duration_s": duration,
        "broker": broker_kind,
        "workdir": str(work),
        "total": total,
        "gateways": gateways,
        "t0_ms": int(t0 * 1000),
        "events_source": source,
        "events": events,
    }


def _spool_facts(path: Path) -> tuple[int, list[tuple[int, int, int]]]:
    """(batches ever appended, [(epoch, seq, n) still in the spool]) of an agent's spool."""
    if not path.exists():
        return 0, []
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT seq FROM sqlite_sequence WHERE name = 'batches'").fetchone()
        sealed = int(row[0]) if row else 0
        left = [
            (int(e), int(s), int(n)) for e, s, n in con.execute("SELECT epoch, seq, n FROM batches")
        ]
        return sealed, left
    finally:
        con.close()


# --------------------------------------------------------------------------- report text


def render(report: dict[str, Any]) -> str:
    """The human report: a table per gateway, the total, and the events."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    buf = StringIO()
    con = Console(file=buf, width=160, force_terminal=False)
    t = Table(
        title=f"fleet: {report['scenario']}, {report['gateways_n']} gateways x "
        f"{report['terminals_per_gateway']} terminals, {report['duration_s']:g} s, "
        f"broker {report['broker']}"
    )
    cols = (
        "gateway",
        "generated",
        "delivered",
        "lost",
        "dup",
        "comm err",
        "unanswered",
        "p50 ms",
        "p99 ms",
        "max ms",
        "cpu %",
        "rss MiB",
    )
    for c in cols:
        t.add_column(c, justify="right" if c != "gateway" else "left")

    def row(name: str, g: dict[str, Any]) -> list[str]:
        lat = g["latency"]
        return [
            name,
            str(g["generated"]),
            str(g["delivered"]),
            f"{g['lost_batches']} b" if g["lost_batches"] else "0",
            str(g["duplicated"]),
            str(g["failed_poll_readings"]),
            str(g["unanswered"]),
            f"{lat['p50_ms']:.0f}",
            f"{lat['p99_ms']:.0f}",
            f"{lat['max_ms']:.0f}",
            f"{g.get('cpu_pct', g.get('agent_cpu_pct_mean', 0)):.1f}",
            f"{g.get('peak_rss_mib', g.get('agent_peak_rss_mib_max', 0)):.0f}",
        ]

    for g in report["gateways"]:
        t.add_row(*row(g["gateway"], g))
    t.add_section()
    t.add_row(*row("TOTAL", report["total"]))
    con.print(t)
    tot = report["total"]
    con.print(
        f"lost batches {tot['lost_batches']}, duplicated after dedup {tot['duplicated']}, "
        f"duplicates dropped at the hub {tot['duplicates_dropped_at_hub']}, rejected "
        f"{tot['rejected']}, left in spools {tot['spool_left']} (+{tot['spool_left_delivered']} "
        "the hub has: PUBACK not recorded before exit)  ->  "
        + ("[OK]" if report.get("ok") else "[FAIL]")
    )
    if report["events"]:
        et = Table(title=f"edge events ({report['events_source']})")
        for c in ("t", "gateway", "rule", "state", "device", "value", "detail"):
            et.add_column(c)
        start = report.get("t0_ms") or min(e["ts"] for e in report["events"])
        for e in report["events"]:
            v = e["value"]
            et.add_row(
                f"+{(e['ts'] - start) / 1000:.1f} s",
                e["gateway"],
                e["rule"],
                e["state"],
                e["device"] + (f".{e['point']}" if e["point"] else ""),
                "" if v is None else f"{v:g}" if isinstance(v, float) else str(v),
                e["detail"],
            )
        con.print(et)
    return buf.getvalue()


# --------------------------------------------------------------------------- CLI


def serve(
    *,
    gateways: int = 5,
    terminals: int = 4,
    duration: float = 20.0,
    scenario: Scenario,
    broker: str = "auto",
    max_age_s: float = 1.0,
    workdir: Path | None = None,
    as_json: bool = False,
    hub_db: str | None = None,
) -> int:
    """``vitals sim fleet`` (options parsed in agent/cli/main.py): run, print the report
    (one JSON object with ``as_json``); 0 when nothing was lost. ``hub_db``: the hub
    stores into that PostgreSQL database (it must hold no batches yet)."""
    if hub_db:
        from hub.stats import hub_stats
        from protocols.errors import VitalsError

        try:
            held = hub_stats(hub_db)["batches"]
        except VitalsError as exc:
            print(f"error: --hub-db: {exc}", file=sys.stderr)
            return 2
        if held:
            print(
                f"error: --hub-db: the database holds {held} batches of an earlier run\n"
                "hint: give the fleet an empty database (createdb NAME)",
                file=sys.stderr,
            )
            return 2
    result = asyncio.run(
        run_fleet(
            gateways=gateways,
            terminals=terminals,
            duration=duration,
            scenario=scenario,
            broker_kind=broker,
            workdir=workdir,
            max_age_s=max_age_s,
            progress=not as_json and sys.stderr.isatty(),
            hub_db=hub_db,
        )
    )
    print(json.dumps(result.report) if as_json else render(result.report))
    return 0 if result.ok else 1


def main(argv: list[str] | None = None) -> None:
    """``python -m simulator.fleet ARGS`` is ``vitals sim fleet ARGS``; ``emulate SPEC``
    is the internal emulator process (exits)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["emulate"]:
        asyncio.run(_emulate(Path(argv[1])))
        raise SystemExit(0)
    from agent.cli.main import main as cli

    cli(["sim", "fleet", *argv])


if __name__ == "__main__":
    main()
