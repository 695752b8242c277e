"""The ``vitals`` command line.

The only place that configures logging. Commands that need the simulator (the
demo, the reference hub, emulated terminals) import it lazily, so the agent on
a gateway never loads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from agent import runner

__all__ = ["app", "main"]

app = typer.Typer(
    name="vitals",
    help="vitals: the gateway agent of a city's vital-signs sensor network.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Check gateway configuration files.", no_args_is_help=True)
hub_app = typer.Typer(
    help="The reference hub: verify, deduplicate, store.", invoke_without_command=True
)
sim_app = typer.Typer(help="Emulated terminals for benches and tests.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(hub_app, name="hub")
app.add_typer(sim_app, name="sim")


def _sub_apps() -> None:
    from agent.diag import diag_app
    from agent.provision import key_app, keygen_command, provision_command

    app.add_typer(diag_app, name="diag")
    app.command("provision")(provision_command)
    app.command("keygen")(keygen_command)
    app.add_typer(key_app, name="key")


_sub_apps()

DEFAULT_CONFIG, DEFAULT_STATE = runner.DEFAULT_CONFIG, runner.DEFAULT_STATE
setup_logging = runner.setup_logging


def _fail(message: str, hint: str = "", code: int = 1) -> typer.Exit:
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


# -- the agent ----------------------------------------------------------------


@app.command()
def run(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="gateway configuration (TOML)")
    ] = DEFAULT_CONFIG,
    state_dir: Annotated[Path | None, typer.Option(help="override [gateway] state_dir")] = None,
    log_level: Annotated[str | None, typer.Option(help="override [log] level")] = None,
) -> None:
    """Run the gateway agent until SIGTERM or Ctrl-C; SIGHUP reloads the configuration."""
    raise typer.Exit(runner.run(config, state_dir, log_level))


@app.command()
def status(
    status_file: Annotated[
        Path | None, typer.Option(help="status file (default: /run/vitals, then the state dir)")
    ] = None,
    state_dir: Annotated[Path | None, typer.Option(help="the agent's state directory")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the status document as JSON")] = False,
) -> None:
    """The running agent's state: buses, devices, spool, uplink, counters."""
    from agent.status import show

    raise typer.Exit(show(status_file, state_dir, as_json))


@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Argument(help="gateway configuration (TOML)")],
) -> None:
    """Print the resolved configuration (exit 0) or every problem in it (exit 1)."""
    from agent.config import check

    code, text = check(file)
    if code:
        typer.secho(text, fg="red", err=True)
    else:
        typer.echo(text)
    raise typer.Exit(code)


# -- the hub ----------------------------------------------------------------


def _broker_addr(broker: str) -> tuple[str, int]:
    host, _, port = broker.rpartition(":")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise _fail(f"--broker {broker!r} is not HOST:PORT") from None


@hub_app.callback()
def hub(
    ctx: typer.Context,
    db: Annotated[Path, typer.Option(help="hub database (SQLite)")] = Path("hub.sqlite3"),
    broker: Annotated[str, typer.Option(help="MQTT broker HOST:PORT")] = "127.0.0.1:1883",
    trust: Annotated[
        list[str] | None, typer.Option(help="enroll GATEWAY=PUBKEYHEX before starting (repeatable)")
    ] = None,
    worker: Annotated[
        str | None, typer.Option(help="this worker's name in the counters (default host-pid)")
    ] = None,
    no_shared: Annotated[
        bool, typer.Option("--no-shared", help="plain subscription (brokers without $share)")
    ] = False,
    sharded: Annotated[
        bool,
        typer.Option(
            "--sharded", help="readings into <db>.shards/<worker>.sqlite3 (needs --worker)"
        ),
    ] = False,
) -> None:
    """Run a hub worker (several share the load through a shared subscription)."""
    ctx.obj = {"db": db}
    _require_demo_extra("vitals hub", "aiomqtt")
    if ctx.invoked_subcommand is not None:
        return
    from simulator.enroll import EnrollmentDesk, hub_key_path, load_or_create_hub_key
    from simulator.enroll import serve as serve_enroll
    from simulator.hub import Hub, HubCore

    setup_logging()
    host, port = _broker_addr(broker)
    import socket

    if sharded and not worker:
        raise _fail("--sharded needs --worker NAME: the name is the shard's file")
    core = HubCore(db, worker=worker or f"{socket.gethostname()}-{os.getpid()}", sharded=sharded)
    for item in trust or []:
        gw, _, hexkey = item.partition("=")
        try:
            core.enroll(gw, bytes.fromhex(hexkey))
        except ValueError:
            raise _fail(f"--trust {item!r}: expected GATEWAY=64 hex digits") from None

    async def _main() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            if task:
                loop.add_signal_handler(sig, task.cancel)
        desk = EnrollmentDesk(core, load_or_create_hub_key(hub_key_path(db)))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(serve_enroll(desk, host=host, port=port), name="hub.enroll")
            tg.create_task(
                Hub(core, host=host, port=port, shared=not no_shared).run(), name="hub.worker"
            )

    try:
        asyncio.run(_main())
    except asyncio.CancelledError:
        pass
    finally:
        core.close()


@hub_app.command("token")
def hub_token(
    ctx: typer.Context,
    gateway: Annotated[str, typer.Argument(help="gateway id the token is for")],
    ttl: Annotated[float, typer.Option(help="validity in hours")] = 24.0,
) -> None:
    """Issue a one-time enrollment token for a field technician."""
    from simulator.enroll import hub_token_command

    hub_token_command(ctx, gateway, ttl)


@hub_app.command("stats")
def hub_stats_cmd(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
) -> None:
    """Delivered, duplicate, rejected and missing batches, per gateway."""
    from simulator.hub import hub_stats

    db: Path = ctx.obj["db"]
    if not db.exists():
        raise _fail(f"{db}: no hub database here", "pass --db PATH before 'stats'")
    stats = hub_stats(db)
    if as_json:
        typer.echo(json.dumps(stats))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"hub {db}")
    for col in (
        "gateway",
        "batches",
        "readings",
        "epochs",
        "missing batches",
        "dropped by gateway",
    ):
        t.add_column(col, justify="right" if col != "gateway" else "left")
    for gw, g in stats["gateways"].items():
        t.add_row(
            gw,
            str(g["batches"]),
            str(g["readings"]),
            str(len(g["epochs"])),
            str(g["missing_batches"]),
            str(g["dropped_batches"]),
        )
    Console().print(t)
    typer.echo(
        f"duplicates dropped: {stats['duplicates']}  gap notices: {stats['gap_notices']}  "
        f"rejected: {stats['rejected'] or 'none'}"
    )


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
    _require_demo_extra("vitals demo", "aiomqtt", "amqtt")
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


@sim_app.command("tcp")
def sim_tcp(
    profile: Annotated[list[str], typer.Option(help="profile to serve (repeatable)")],
    slave: Annotated[int, typer.Option(help="unit id")] = 1,
) -> None:
    """Serve emulated Modbus TCP terminals on free loopback ports until Ctrl-C."""
    from drivers.profiles import load_profile
    from simulator.tcp import TcpTerminal

    async def _main() -> None:
        terms = [TcpTerminal(load_profile(p), slave=slave, seed=i) for i, p in enumerate(profile)]
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


_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


@sim_app.command("firmware", context_settings=_PASS_THROUGH, add_help_option=False)
def sim_firmware(ctx: typer.Context) -> None:
    """The terminal firmware under MicroPython on a pty; prints the port path first.

    Options: --profile, --slave N, --baud B, --state FILE, --seed N (--help for all).
    """
    from simulator import firmware

    raise typer.Exit(firmware.main(ctx.args))


@sim_app.command("rtu", context_settings=_PASS_THROUGH, add_help_option=False)
def sim_rtu(ctx: typer.Context) -> None:
    """An emulated, wire-timed Modbus RTU bus on a pty; prints the port path first.

    --help lists its options (profiles, slaves, baud, faults).
    """
    from simulator import rtu

    raise typer.Exit(rtu.main(ctx.args))


@sim_app.command("fleet", context_settings=_PASS_THROUGH, add_help_option=False)
def sim_fleet(ctx: typer.Context) -> None:
    """G agents, their terminals, a broker and the hub: loss, latency, CPU, events.

    --gateways G --terminals T --duration S --scenario NAME --json (--help for all).
    """
    _require_demo_extra("vitals sim fleet", "aiomqtt")
    from simulator.fleet import main as fleet_main

    raise typer.Exit(fleet_main(list(ctx.args)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
