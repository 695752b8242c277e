"""The ``vitals`` command line: one typer app for every command, ``run`` included.

The only place that configures logging. What only some commands need is
imported when that command runs: the simulator (the demo, the reference hub,
emulated terminals), the diagnostics and provisioning (registered lazily by
:class:`_Commands`), rich. ``vitals run`` so loads typer but none of those
(docs/decisions.md, 22).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core

from agent import runner
from protocols.address import host_port
from protocols.errors import ConfigError, LocalError

__all__ = ["app", "main"]

# what typer refuses itself: typer >= 0.2x vendors click, its errors derive from TyperException
_UsageProblem: Any = getattr(typer, "TyperException", None)
if _UsageProblem is None:  # pragma: no cover - an older typer, on click
    import click

    _UsageProblem = click.ClickException

DEFAULT_CONFIG, DEFAULT_STATE = runner.DEFAULT_CONFIG, runner.DEFAULT_STATE
setup_logging = runner.setup_logging

# a flag takes no value: typer >= 0.2x labels every option with its type, flags as "<bool>"
_display_type_rich: Any = getattr(typer.core.TyperOption, "display_type_rich", None)
if _display_type_rich is not None:

    def _no_bool_label(self: typer.core.TyperOption, ctx: Any) -> str | None:
        if self.is_flag and self.metavar is None:
            return None
        label: str | None = _display_type_rich(self, ctx)
        return label

    typer.core.TyperOption.display_type_rich = _no_bool_label  # type: ignore[method-assign]


# commands whose modules load only when they are called or listed: `vitals run`
# never imports the diagnostics or the provisioning code
_LAZY = ("provision", "keygen", "key", "diag", "hub", "firmware")


def _lazy_commands() -> dict[str, Any]:
    from agent.cli.diag import diag_app
    from agent.cli.firmware import firmware_app
    from agent.ops.provision import key_app, keygen_command, provision_command
    from hub.cli import hub_app  # the hub is its own package: mounted here, never imported by run

    extra = typer.Typer()
    extra.command("provision")(provision_command)
    extra.command("keygen")(keygen_command)
    extra.add_typer(key_app, name="key")
    extra.add_typer(diag_app, name="diag")
    extra.add_typer(hub_app, name="hub")
    extra.add_typer(firmware_app, name="firmware")
    return dict(typer.main.get_group(extra).commands)


class _Commands(typer.core.TyperGroup):
    def list_commands(self, ctx: Any) -> list[str]:
        return [*super().list_commands(ctx), *(n for n in _LAZY if n not in self.commands)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name in _LAZY:
            self._load()
        return super().get_command(ctx, cmd_name)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and args[0] not in self.commands:
            self._load()  # a typo's "did you mean" may be one of them
        return super().resolve_command(ctx, args)

    def _load(self) -> None:
        if not all(name in self.commands for name in _LAZY):
            for name, cmd in _lazy_commands().items():
                self.commands.setdefault(name, cmd)


app = typer.Typer(
    name="vitals",
    cls=_Commands,
    help="vitals: the gateway agent of a city's vital-signs sensor network.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(
    help="Check gateway configuration files; the versions the hub pushed.", no_args_is_help=True
)
sim_app = typer.Typer(help="Emulated terminals for benches and tests.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(sim_app, name="sim")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"vitals {version('vitals-gateway')}")
        except PackageNotFoundError:
            typer.echo("vitals (not installed: no package metadata)")
        raise typer.Exit(0)


@app.callback()
def _root(
    _: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="the installed version, then exit"
        ),
    ] = False,
) -> None:
    """vitals: the gateway agent of a city's vital-signs sensor network."""


def _fail(message: str, hint: str = "", code: int = 1) -> typer.Exit:
    """One line naming what is wrong, one with what to do; exit 1 (2: a usage error)."""
    typer.secho(f"error: {message}", fg="red", err=True)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    return typer.Exit(code)


def _require_demo_extra(what: str, *modules: str) -> None:
    """The reference hub, the demo and the simulators need the ``demo`` extra."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise _fail(
            f"{what} needs {' and '.join(missing)}, not part of a gateway's install",
            "pip install 'vitals-gateway[demo]' (the README's demo command does)",
        )


_CONFIG_HELP = "gateway configuration (TOML)"
_LEVELS = ("debug", "info", "warning", "error")


# -- the agent ----------------------------------------------------------------


@app.command()
def run(
    config: Annotated[
        Path, typer.Option("--config", "-c", envvar="VITALS_CONFIG", help=_CONFIG_HELP)
    ] = DEFAULT_CONFIG,
    state_dir: Annotated[Path | None, typer.Option(help="override [gateway] state_dir")] = None,
    log_level: Annotated[
        str | None, typer.Option(help="override [log] level: debug, info, warning, error")
    ] = None,
) -> None:
    """Run the gateway agent until SIGTERM or Ctrl-C; SIGHUP reloads the configuration."""
    if log_level is not None and log_level.lower() not in _LEVELS:
        raise _fail(
            f"--log-level {log_level!r} is not a level", f"choose from {', '.join(_LEVELS)}", 2
        )
    runner.exec_agent(config, state_dir, log_level)


# the options of the commands that read the running agent's status file
_StatusConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="VITALS_CONFIG",
        help="the agent's configuration: the status is looked for in its state_dir "
        "[default: /etc/vitals/gateway.toml]",
        show_default=False,
    ),
]
_StateOpt = Annotated[
    Path | None, typer.Option(envvar="VITALS_STATE_DIR", help="the agent's state directory")
]
_StatusFileOpt = Annotated[
    Path | None,
    typer.Option(help="this status file only (default: /run/vitals, then the state dir)"),
]


@app.command()
def status(
    config: _StatusConfigOpt = None,
    state_dir: _StateOpt = None,
    status_file: _StatusFileOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="the status document as JSON")] = False,
) -> None:
    """The running agent's state: buses, devices, spool, uplink, counters."""
    from agent.ops.status import show

    raise typer.Exit(show(status_file, state_dir, as_json, config=config))


@app.command()
def health(
    config: _StatusConfigOpt = None,
    state_dir: _StateOpt = None,
    status_file: _StatusFileOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help='one JSON object: {"health", "exit", "checks"}')
    ] = False,
    wait: Annotated[
        float,
        typer.Option(help="check every second until healthy or this many seconds passed", min=0.0),
    ] = 0.0,
    require_uplink: Annotated[
        bool, typer.Option(help="an uplink that is not connected is a failure, not degraded")
    ] = False,
) -> None:
    """Is the gateway working? Exit 0 healthy, 1 degraded, 2 failed (an OS updater's check).

    Failed: the agent is not running, a device was never polled, or no device answers.
    Degraded: a device degraded or offline, the uplink down (spooling), the disk full.
    """
    from agent.ops.health import main as health_main

    raise typer.Exit(
        health_main(
            config=config,
            state_dir=state_dir,
            status_file=status_file,
            as_json=as_json,
            wait_s=wait,
            require_uplink=require_uplink,
        )
    )


@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Argument(help=_CONFIG_HELP)],
    as_json: Annotated[
        bool,
        typer.Option("--json", help='one JSON object: {"ok", "config"} or {"ok", "problems"}'),
    ] = False,
) -> None:
    """Print the resolved configuration (exit 0) or every problem in it (exit 1)."""
    from agent.ops.config import check

    code, text = check(file, as_json=as_json)
    if code and not as_json:
        typer.secho(text, fg="red", err=True)
    else:
        typer.echo(text)
    raise typer.Exit(code)


_ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="VITALS_CONFIG",
        help="the agent's configuration: names its state_dir [default: /etc/vitals/gateway.toml]",
        show_default=False,
    ),
]


def _pushed_store(config: Path | None, state_dir: Path | None) -> Any:
    from agent.ops.confpush import ConfigStore
    from agent.ops.status import StatusUnavailable, _state_dir_of

    try:
        sd = state_dir or _state_dir_of(config) or DEFAULT_STATE
    except StatusUnavailable as exc:
        raise _fail(exc.message, exc.hint) from None
    return ConfigStore.of(sd), sd


@config_app.command("history")
def config_history(
    config: _ConfigOpt = None,
    state_dir: _StateOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
) -> None:
    """The configurations the hub pushed: versions kept, outcomes, which one runs."""
    import time as _time

    store, sd = _pushed_store(config, state_dir)
    doc = {
        "state_dir": str(sd),
        "active": store.active,
        "trial": store.trial,
        "kept": store.kept(),
        "history": store.state.get("history") or [],
    }
    if as_json:
        typer.echo(json.dumps(doc))
        return
    running = f"version {store.active}" if store.active else "the local configuration file"
    typer.echo(f"running {running}; kept: {', '.join(map(str, doc['kept'])) or 'none'}")
    for h in doc["history"]:
        at = _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(float(h.get("at") or 0)))
        why = f"  {h['reason']}" if h.get("reason") else ""
        typer.echo(f"  {at}  version {h.get('version')}  {h.get('status')}{why}")


@config_app.command("rollback")
def config_rollback(
    version: Annotated[
        int | None,
        typer.Argument(help="a kept version (default: the newest kept one below the running one)"),
    ] = None,
    local: Annotated[
        bool, typer.Option("--local", help="back to the local file (--config), no pushed one")
    ] = False,
    config: _ConfigOpt = None,
    state_dir: _StateOpt = None,
) -> None:
    """Run an earlier pushed configuration (or the local file); the agent reloads on it."""
    import os
    import signal

    from agent.ops.status import StatusUnavailable, default_status_paths, read_status

    store, sd = _pushed_store(config, state_dir)
    if local:
        target = 0
    elif version is not None:
        target = version
    else:
        older = [v for v in store.kept() if v < store.active]
        target = older[-1] if older else 0
    if target and target not in store.kept():
        raise _fail(
            f"version {target} is not kept in {store.dir}",
            f"kept: {', '.join(map(str, store.kept())) or 'none'}; or --local",
        )
    try:
        store.set_active(target, "by hand (vitals config rollback)")
    except OSError as exc:
        raise _fail(
            f"{store.dir}: {exc.strerror or exc}", "run as the agent's user: sudo -u vitals ..."
        ) from None
    name = f"version {target}" if target else "the local configuration file"
    try:
        _, doc, why = read_status(default_status_paths(sd))
        pid = 0 if why else int(doc.get("pid") or 0)
    except StatusUnavailable:
        pid = 0
    if pid:
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError:
            pid = 0
    if pid:
        typer.echo(f"{name} is active; the agent (pid {pid}) reloads on it")
    else:
        typer.echo(f"{name} is active from the agent's next start (systemctl restart vitals)")


def _broker_addr(broker: str) -> tuple[str, int]:
    try:
        return host_port(broker, default_host="127.0.0.1")
    except LocalError as exc:
        raise _fail(f"--broker {exc}", "e.g. --broker 127.0.0.1:1883", 2) from None


# -- the demo and the simulators ------------------------------------------------


@app.command()
def demo(
    duration: Annotated[float | None, typer.Option(help="stop after this many seconds")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print one JSON summary at the end")
    ] = False,
    broker: Annotated[
        str | None, typer.Option(help="use this MQTT broker HOST:PORT instead of the embedded one")
    ] = None,
) -> None:
    """Agent, emulated terminals, broker and hub, live. Ctrl-C stops it."""
    if broker is not None:
        _broker_addr(broker)
    _require_demo_extra("vitals demo", "amqtt")  # the embedded broker (aiomqtt is core)
    from simulator.demo import run_demo

    setup_logging("warning")
    summary: dict[str, Any] = asyncio.run(
        run_demo(duration=duration, broker=broker, live=sys.stderr.isatty() or not as_json)
    )
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        typer.echo(
            f"polled {summary['readings_polled']} readings, {summary['readings_verified']} verified at the hub, "
            f"{summary['readings_lost']} lost, {summary['batches_rejected']} batches rejected, "
            f"{summary['events_verified']} edge events"
        )
    ok = summary["readings_lost"] == 0 and summary["batches_rejected"] == 0
    raise typer.Exit(0 if ok else 1)


def _profile(name: str, option: str, given: str | None = None) -> Any:
    """A shipped Modbus profile by name (or a file), or a usage error naming the choices."""
    from drivers.profiles import available_profiles, load_profile

    given = name if given is None else given
    modbus = [n for n in available_profiles() if not load_profile(n).is_sensor]
    try:
        profile = load_profile(name)
    except ConfigError as exc:
        where, problem = exc.problems[0]
        if where == name and "no such profile" in problem:
            raise _fail(
                f"{option} {given!r}: no profile {name!r}", f"choose from {', '.join(modbus)}", 2
            ) from None
        raise _fail(
            f"{option} {given!r}: {where}: {problem}", "check the profile file", 2
        ) from None
    if profile.is_sensor:
        raise _fail(
            f"{option} {given!r}: {name} is a serial sensor, not a Modbus terminal",
            f"choose from {', '.join(modbus)}",
            2,
        )
    return profile


@sim_app.command("tcp")
def sim_tcp(
    profile: Annotated[
        list[str], typer.Option(metavar="NAME", help="profile to serve (repeatable)")
    ],
    slave: Annotated[int, typer.Option(help="unit id", min=0, max=255)] = 1,
) -> None:
    """Serve emulated Modbus TCP terminals on free loopback ports until Ctrl-C."""
    from simulator.tcp import TcpTerminal

    profiles = [_profile(p, "--profile") for p in profile]

    async def _main() -> None:
        terms = [TcpTerminal(p, slave=slave, seed=i) for i, p in enumerate(profiles)]
        for t in terms:
            await t.start()
            typer.echo(f"{t.profile.name} 127.0.0.1:{t.port} unit {slave}")
        try:
            await asyncio.Event().wait()
        finally:
            for t in terms:
                await t.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main())


_SLAVES = "a Modbus slave address is 1..247"


def _slave(text: str, option: str, value: str) -> int:
    try:
        slave = int(text)
    except ValueError:
        slave = 0
    if not 1 <= slave <= 247:
        raise _fail(f"{option} {value!r}: slave {text!r} is not 1..247", _SLAVES, 2)
    return slave


@sim_app.command("rtu")
def sim_rtu(
    device: Annotated[
        list[str] | None,
        typer.Option(
            metavar="SLAVE=PROFILE", help="a terminal: slave address and profile (repeatable)"
        ),
    ] = None,
    profile: Annotated[
        str | None, typer.Option(help="profile of --count terminals at slaves 1..N")
    ] = None,
    count: Annotated[int, typer.Option(help="how many terminals of --profile", min=1, max=247)] = 1,
    baud: Annotated[int, typer.Option(help="the bus's baud rate", min=300, max=921600)] = 9600,
    stopbits: Annotated[int, typer.Option(help="1 or 2", min=1, max=2)] = 1,
    turnaround_ms: Annotated[
        float, typer.Option(help="a terminal's delay before it answers", min=0.0)
    ] = 1.0,
    fault: Annotated[
        list[str] | None,
        typer.Option(
            metavar="SLAVE:KIND[=V]",
            help="inject a fault: silent, crc, exception, garbage, late or slow; "
            "V = the exception code or the delay in s (repeatable)",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the terminals' signals")] = 0,
    duration: Annotated[
        float | None, typer.Option(help="stop after this many seconds (default: Ctrl-C)")
    ] = None,
) -> None:
    """An emulated, wire-timed Modbus RTU bus on a pty until Ctrl-C.

    Prints the port to open (8N1) on the first line, the bus's counters as JSON at the end. Without --device or --profile: one sound_level_meter at slave 1.
    """
    from simulator import rtu

    pairs: list[tuple[int, Any]] = []
    for d in device or []:
        number, eq, name = d.partition("=")
        if not eq or not name:
            raise _fail(f"--device {d!r}: expected SLAVE=PROFILE", "e.g. --device 3=rain_gauge", 2)
        pairs.append((_slave(number, "--device", d), _profile(name, "--device", d)))
    if profile:
        prof = _profile(profile, "--profile")
        pairs += [(i + 1, prof) for i in range(count)]
    if not pairs:
        pairs = [(1, _profile("sound_level_meter", "--profile"))]
    seen: set[int] = set()
    for address, _ in pairs:
        if address in seen:
            raise _fail(
                f"slave {address} is given twice",
                "one terminal per address (--count starts at 1)",
                2,
            )
        seen.add(address)
    faults: list[tuple[int, str, float]] = []
    for f in fault or []:
        where, _, rest = f.partition(":")
        kind, _, value = rest.partition("=")
        if kind not in rtu.FAULTS:
            raise _fail(
                f"--fault {f!r}: no fault {kind!r}", f"choose from {', '.join(rtu.FAULTS)}", 2
            )
        at = _slave(where, "--fault", f)
        if at not in seen:
            raise _fail(
                f"--fault {f!r}: no terminal at slave {at}",
                f"terminals are at {', '.join(map(str, sorted(seen)))}",
                2,
            )
        try:
            amount = float(value or 0)
        except ValueError:
            raise _fail(f"--fault {f!r}: {value!r} is not a number", "e.g. 2:late=0.5", 2) from None
        faults.append((at, kind, amount))
    raise typer.Exit(
        rtu.serve(
            pairs,
            faults,
            baud=baud,
            stopbits=stopbits,
            turnaround_s=turnaround_ms / 1000,
            seed=seed,
            duration=duration,
        )
    )


@sim_app.command("firmware")
def sim_firmware(
    profile: Annotated[
        str, typer.Option(help="the profile the firmware serves (only sound_level_meter)")
    ] = "sound_level_meter",
    slave: Annotated[int, typer.Option(help="slave address", min=1, max=247)] = 1,
    baud: Annotated[int, typer.Option(help="baud rate", min=300, max=921600)] = 9600,
    state: Annotated[
        Path | None, typer.Option(help="the terminal's settings file (default: temporary)")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="seed of its signals")] = None,
) -> None:
    """The terminal firmware under MicroPython on a pty until Ctrl-C; prints the port first."""
    if profile != "sound_level_meter":
        raise _fail(
            f"--profile {profile!r}: the firmware serves the sound_level_meter profile only",
            "drop --profile, or use 'vitals sim rtu' for other profiles",
            2,
        )
    from simulator import firmware

    raise typer.Exit(firmware.serve(slave=slave, baud=baud, state=state, seed=seed))


@sim_app.command("fleet")
def sim_fleet(
    gateways: Annotated[int, typer.Option(help="how many agents", min=1)] = 5,
    terminals: Annotated[int, typer.Option(help="terminals per gateway", min=1)] = 4,
    duration: Annotated[float, typer.Option(help="seconds of scenario", min=1.0)] = 20.0,
    scenario: Annotated[
        str, typer.Option(help="a shipped scenario's name or a TOML file")
    ] = "steady",
    broker: Annotated[
        str, typer.Option(help="auto (Mosquitto if installed), mosquitto or embedded")
    ] = "auto",
    max_age: Annotated[float, typer.Option(help="the agents' batch max_age_s", min=0.05)] = 1.0,
    workdir: Annotated[
        Path | None, typer.Option(help="keep state, configs, logs and the hub DB here")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON report on stdout")] = False,
    hub_db: Annotated[
        str | None,
        typer.Option(help="the hub stores into this empty PostgreSQL database (postgresql://...)"),
    ] = None,
) -> None:
    """G agents, their terminals, a broker and the hub: loss, latency, CPU, events.

    Exit 1 on any loss.
    """
    if broker not in ("auto", "mosquitto", "embedded"):
        raise _fail(f"--broker {broker!r}", "choose from auto, mosquitto, embedded", 2)
    from simulator import fleet
    from simulator.scenario import load_scenario

    try:
        scen = load_scenario(scenario)
    except ConfigError as exc:
        where, problem = exc.problems[0]
        raise _fail(
            f"--scenario {scenario!r}: {where}: {problem}", "a shipped name or a TOML file", 2
        ) from None
    raise typer.Exit(
        fleet.serve(
            gateways=gateways,
            terminals=terminals,
            duration=duration,
            scenario=scen,
            broker=broker,
            max_age_s=max_age,
            workdir=workdir,
            as_json=as_json,
            hub_db=hub_db,
        )
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``vitals [ARGS]`` (default: the process's arguments); exits with the command's status.

    A mistake typer finds itself (an unknown option, a value out of range, a missing
    argument) is reported like ours: one ``error:`` line and one ``hint:`` line, exit 2.
    """
    try:
        rv = app(
            args=None if argv is None else list(argv), prog_name="vitals", standalone_mode=False
        )
    except _UsageProblem as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `vitals sim`: typer showed the help
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "vitals"
        typer.secho(f"error: {exc.format_message()}", fg="red", err=True)
        typer.echo(f"hint: '{where} --help' lists what it takes", err=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
