"""`vitals demo`: the whole signed path, live, on one machine, nothing installed.

It starts an MQTT broker (amqtt, embedded, unless ``--broker`` names one), a
handful of emulated Modbus TCP terminals (a noise meter, a weather station, a
water-level radar, a PM monitor, a gas box, a manhole sensor), the agent
polling them, and the reference hub verifying what arrives, and shows it all in
a live terminal view. Ctrl-C (or ``--duration``) stops it cleanly: the buses
stop, the open batch is sealed and delivered, and the demo checks that every
polled reading reached the hub, verified.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from agent.ops.config import Config, parse_config
from agent.ops.state import create_identity
from agent.service import Agent
from drivers.profiles import load_profile
from hub.worker import Hub
from protocols.address import host_port
from simulator.broker import EmbeddedBroker, make_broker
from simulator.harness import agent_with_hub
from simulator.tcp import TcpTerminal

__all__ = ["DEMO_DEVICES", "demo_config", "run_demo"]

log = logging.getLogger(__name__)

# (device name, profile, poll interval override)
DEMO_DEVICES: tuple[tuple[str, str, float | None], ...] = (
    ("noise-1", "sound_level_meter", 1.0),
    ("weather-1", "weather_station", 1.0),
    ("river-1", "radar_water_level", 1.0),
    ("pm-1", "pm_monitor", 1.0),
    ("gas-1", "gas_detector", 1.0),
    ("manhole-1", "manhole_sensor", 1.0),
)


# edge events the demo shows: they fire and clear as the emulated values move
DEMO_RULES: list[dict[str, Any]] = [
    {
        "id": "loud",
        "kind": "threshold",
        "device": "noise-1",
        "point": "laeq",
        "above": 65.0,  # a busy street by day comes close; a quiet night never
        "clear": 62.0,
    },
    {
        "id": "gas-alarm",
        "kind": "threshold",
        "device": "gas-1",
        "point": "co",
        "above": 35.0,  # ppm: the detector's own alarm level; a street is at ~1
        "clear": 30.0,
    },
    {"id": "terminal-offline", "kind": "offline", "device": "*", "after_s": 10},
]


def demo_config(
    state_dir: Path,
    broker: tuple[str, int],
    terminals: dict[str, int],
    *,
    gateway: str = "demo-gw-1",
    max_age_s: float = 2.0,
    durability: str = "normal",
    rules: list[dict[str, Any]] | None = None,
) -> Config:
    """The configuration of the demo gateway: one TCP bus per emulated terminal."""
    data: dict[str, Any] = {
        "gateway": {"id": gateway, "state_dir": str(state_dir)},
        "uplink": {"host": broker[0], "port": broker[1]},
        "batch": {"max_age_s": max_age_s},
        "spool": {"durability": durability},
        "buses": [
            {
                "name": f"tcp-{name}",
                "kind": "tcp",
                "host": "127.0.0.1",
                "tcp_port": port,
                "timeout_s": 1.0,
            }
            for name, port in terminals.items()
        ],
        "devices": [],
        "rules": DEMO_RULES if rules is None else rules,
    }
    for name, profile, interval in DEMO_DEVICES:
        if name not in terminals:
            continue
        dev: dict[str, Any] = {"name": name, "bus": f"tcp-{name}", "profile": profile, "slave": 1}
        if interval:
            dev["interval_s"] = interval
        data["devices"].append(dev)
    return parse_config(data, source="<demo>", base=state_dir)


def _view(agent: Agent, hub: Hub, rate: float, broker_kind: str, elapsed: float) -> Group:
    s = agent.statistics()
    head = Table.grid(padding=(0, 2))
    b, sp, up = s.get("batch", {}), s.get("spool", {}), s.get("uplink", {})
    hub_c = hub.core.counters
    head.add_row(
        f"[b]vitals demo[/b]  gateway [cyan]{s['gateway']}[/] epoch {s['epoch']}",
        f"broker: {broker_kind}  {'[green]connected' if up.get('connected') else '[red]offline'}[/]",
        f"{elapsed:5.0f} s",
    )
    # with the hub's key (the demo's hub signs receipts) a batch leaves the spool on
    # the hub's receipt; without it, on the broker's PUBACK
    if up.get("confirm") == "receipt":
        left = f"confirmed by the hub {sp.get('confirmed', 0)}"
    else:
        left = f"acked {sp.get('acked', 0)}"
    head.add_row(
        f"readings polled [b]{b.get('readings_in', 0)}[/] ({rate:.0f}/s)",
        f"batches sealed {b.get('batches_sealed', 0)} · spooled {sp.get('appended', 0)} · "
        f"{left} · in spool {sp.get('depth_batches', 0)}",
        f"hub verified [b]{hub_c['batches']}[/] batches / [b]{hub_c['readings']}[/] readings, "
        f"rejected {sum(v for k, v in hub_c.items() if k.startswith('rejected.'))}, "
        f"events {hub_c['events']}",
    )
    t = Table(expand=True, title_justify="left")
    for col in ("device", "profile", "state", "rtt ms", "last values"):
        t.add_column(col)
    profiles = {d.name: d.profile_name for d in agent.config.devices}
    units = {(dev.name, p.spec.name): p.unit for dev, p in agent.config.points.values()}
    for poller in agent.buses:
        for d in poller.devices:
            colour = {"online": "green", "degraded": "yellow", "offline": "red"}.get(
                str(d.state), "white"
            )
            vals = ", ".join(
                f"{k}={v}"
                if isinstance(v, bool | str)
                else f"{k}={v:.6g}{' ' + units[(d.name, k)] if units.get((d.name, k)) else ''}"
                for k, v in list(d.last_values.items())[:4]
            )
            t.add_row(
                d.name,
                profiles.get(d.name, ""),
                f"[{colour}]{d.state}[/]",
                f"{d.last_rtt_ms:.1f}",
                vals,
            )
    recent = hub.core.db.execute(
        "SELECT rule, state, device, point, value, detail FROM events ORDER BY received_ms DESC LIMIT 3"
    ).fetchall()
    lines = [
        f"  [{'red' if state == 'fired' else 'green'}]{state:7}[/] {rule} on {device}"
        f"{'.' + point if point else ''}: {detail}"
        for rule, state, device, point, _value, detail in recent
    ]
    events = "edge events at the hub (newest first):\n" + ("\n".join(lines) or "  none yet")
    return Group(head, t, events)


async def run_demo(
    *,
    duration: float | None = None,
    broker: str | None = None,
    live: bool = True,
    state_dir: Path | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the demo until ``duration`` elapses or SIGINT/SIGTERM; return the summary."""
    console = console or Console(stderr=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    tmp = Path(state_dir or tempfile.mkdtemp(prefix="vitals-demo-"))
    if broker:
        mqtt: Any = None
        addr = host_port(broker, default_host="127.0.0.1")
        kind = f"external {broker}"
    else:
        mqtt = make_broker("embedded")
        await mqtt.start()
        addr = (mqtt.host, mqtt.port)
        kind = f"embedded amqtt on {mqtt.host}:{mqtt.port}"
    terminals: list[TcpTerminal] = []
    summary: dict[str, Any] = {}
    try:
        for i, (_, profile, _) in enumerate(DEMO_DEVICES):
            term = TcpTerminal(load_profile(profile), seed=i)
            await term.start()
            terminals.append(term)
        config = demo_config(
            tmp / "gateway",
            addr,
            {n: t.port for (n, _, _), t in zip(DEMO_DEVICES, terminals, strict=True)},
        )
        identity = create_identity(config.gateway.state_dir, exist_ok=True)
        t_start = time.monotonic()
        async with agent_with_hub(
            config,
            identity,
            addr[0],
            addr[1],
            tmp / "hub.sqlite3",
            shared=not isinstance(mqtt, EmbeddedBroker) and broker is None,
            stop=stop,
        ) as run:
            agent, core = run.agent, run.core
            if duration is not None:
                loop.call_later(duration, stop.set)
            live_view = (
                Live(console=console, refresh_per_second=4, transient=False) if live else None
            )
            with live_view if live_view else contextlib.nullcontext():
                # the rate over the last 5 s: terminals answer once a second or
                # slower, so a half-second window alone read 0/s between polls
                window: collections.deque[tuple[float, int]] = collections.deque(maxlen=10)
                window.append((time.monotonic(), 0))
                while not run.agent_task.done():
                    await asyncio.sleep(0.5)
                    if live_view and agent.batcher:
                        now = time.monotonic()
                        n = agent.batcher.readings_in
                        t0, n0 = window[0]
                        rate = (n - n0) / max(1e-3, now - t0)
                        window.append((now, n))
                        live_view.update(_view(agent, run.hub, rate, kind, now - t_start))
            if live_view and not console.is_terminal:
                console.line()  # a log file gets the last view ended by a newline
        polled = run.polled
        rejected = sum(v for k, v in core.counters.items() if k.startswith("rejected."))
        spool_left = agent.spool.statistics()["depth_batches"] if agent.spool else 0
        summary = {
            "readings_polled": polled,
            "readings_verified": core.counters["readings"],
            "readings_lost": max(0, polled - core.counters["readings"]),
            "batches_rejected": rejected,
            "batches_sealed": agent.batcher.batches_sealed if agent.batcher else 0,
            "batches_verified": core.counters["batches"],
            "duplicates": core.counters["duplicates"],
            "events_verified": core.counters["events"],
            "spool_left": spool_left,
            "duration_s": round(time.monotonic() - t_start, 1),
            "broker": kind,
            # what each terminal said last, for a look by eye (``vitals demo --json``)
            "last_values": {
                d.name: {k: _shown(v) for k, v in d.last_values.items()}
                for poller in agent.buses
                for d in poller.devices
            },
        }
        core.close()
    finally:
        for term in terminals:
            await term.stop()
        if mqtt is not None:
            await mqtt.stop()
        if state_dir is None:  # the demo gateway's key and spool were throwaway
            shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _shown(value: object) -> object:
    """A value for the summary: floats to 6 significant digits (f32 noise off)."""
    return float(f"{value:.6g}") if isinstance(value, float) else value
