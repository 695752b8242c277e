"""``vitals hub``: run a hub worker, issue enrollment tokens, show what the hub has.

Mounted lazily by the ``vitals`` command line (agent/cli/main.py), so ``vitals run``
never imports the hub. What only running a worker needs (aiomqtt) is imported
when it runs: ``vitals hub token`` and ``vitals hub stats`` work without it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from hub._cli import DB_HELP, broker_addr, fail
from hub.confpush import config_app
from hub.firmware import firmware_app
from hub.store import is_url, shown
from protocols import envelope, topics
from protocols.errors import VitalsError

__all__ = ["hub_app"]

hub_app = typer.Typer(
    help="The hub: verify, deduplicate, store what the gateways send.",
    invoke_without_command=True,
)

hub_app.add_typer(config_app, name="config")  # `vitals hub config push|status`
hub_app.add_typer(firmware_app, name="firmware")  # `vitals hub firmware push|status`


_STORE_ERRORS = (OSError, sqlite3.Error, VitalsError)


def _first(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


class _Refused(Exception):
    """What the running hub cannot start with: (message, hint)."""


def _setup_logging() -> None:
    """Log to stderr; under systemd (JOURNAL_STREAM set) without our own timestamps."""
    if "JOURNAL_STREAM" in os.environ:
        fmt = "<%(levelno)s>%(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def _trusted(items: list[str]) -> list[tuple[str, bytes]]:
    out = []
    for item in items:
        gw, _, hexkey = item.partition("=")
        try:
            key = bytes.fromhex(hexkey)
        except ValueError:
            key = b""
        if not gw or len(key) != 32:
            raise fail(
                f"--trust {item!r}: expected GATEWAY=64 hex digits (an Ed25519 public key)",
                "the gateway's 'public key' line of 'vitals key show' (or 'vitals keygen')",
                2,
            )
        out.append((gw, key))
    return out


def _db_problem(db: str | Path, exc: BaseException) -> typer.Exit:
    return fail(
        f"{shown(db)}: {exc}", "pass --db FILE (SQLite, created if new) or --db postgresql://..."
    )


def _require(what: str, *modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise fail(
            f"{what} needs {' and '.join(missing)}, not part of a gateway's install",
            "pip install 'vitals-gateway[hub]'",
        )


@hub_app.callback()
def hub(
    ctx: typer.Context,
    db: Annotated[str, typer.Option(help=DB_HELP)] = "hub.sqlite3",
    broker: Annotated[str, typer.Option(help="MQTT broker HOST:PORT")] = "127.0.0.1:1883",
    prefix: Annotated[
        str, typer.Option(help="topic prefix: the gateways' [uplink] topic_prefix")
    ] = topics.DEFAULT_PREFIX,
    trust: Annotated[
        list[str] | None,
        typer.Option(
            metavar="GATEWAY=HEX",
            help="enroll a gateway's public key before starting (repeatable)",
        ),
    ] = None,
    worker: Annotated[
        str | None,
        typer.Option(
            help="this worker's name: its counters, its session (default: the host's name)"
        ),
    ] = None,
    shared: Annotated[
        bool,
        typer.Option(
            help="several workers split the load ($share); on Mosquitto 2.0 this"
            " subscription does not survive a broker restart (docs/hub.md)",
        ),
    ] = False,
    sharded: Annotated[
        bool,
        typer.Option(
            "--sharded", help="readings into <db>.shards/<worker>.sqlite3 (needs --worker)"
        ),
    ] = False,
    persistent: Annotated[
        bool,
        typer.Option(
            help="a persistent session (client id vitals-hub-WORKER): the broker keeps"
            " what arrives while this worker is away",
        ),
    ] = True,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="serve Prometheus metrics on this port (GET /metrics); 0: any free port",
            min=0,
            max=65535,
            show_default=False,
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help="address the metrics endpoint listens on")
    ] = "127.0.0.1",
    hole_grace: Annotated[
        float,
        typer.Option(
            help="seconds a batch a gateway's heartbeat names may be missing before the"
            " hub asks the gateway to send it again (a signed resend command)",
            min=1.0,
            max=86400.0,
        ),
    ] = 30.0,
) -> None:
    """Run a hub worker (several split the load with --shared).

    It stays up through broker restarts (reconnects with back-off, one line when
    the broker goes, one when it is back) and ends on SIGTERM within seconds,
    writing what it holds first. A message is acknowledged to the broker only
    once it is written.
    """
    ctx.obj = {"db": db, "broker": broker, "prefix": prefix}
    if ctx.invoked_subcommand is not None:
        return  # `token` and `stats` need no MQTT
    host, port = broker_addr(broker)
    trusted = _trusted(trust or [])
    if sharded and not worker:
        raise fail("--sharded needs --worker NAME", "the name is the shard's file", 2)
    _require("vitals hub", "aiomqtt")
    if metrics_port is not None:
        _require("vitals hub --metrics-port", "prometheus_client")
    from hub.core import HubCore
    from hub.enroll import EnrollmentDesk, hub_key_path, load_or_create_hub_key
    from hub.enroll import serve as serve_enroll
    from hub.worker import Hub, quiet_closed_sockets

    _setup_logging()
    import socket

    # a persistent session needs a name that survives a restart: the host's (give each
    # worker of one host its own --worker); otherwise host and process
    name = worker or (
        socket.gethostname() if persistent else f"{socket.gethostname()}-{os.getpid()}"
    )
    try:
        core = HubCore(db, worker=name, sharded=sharded, prefix=prefix, hole_grace_s=hole_grace)
    except (OSError, sqlite3.Error, VitalsError) as exc:
        raise _db_problem(db, exc) from None
    for gw, key in trusted:
        try:
            core.enroll(gw, key)
        except (ValueError, VitalsError) as exc:
            core.close()
            raise fail(f"--trust {gw}: {exc}", "check the gateway id and its key", 2) from None
    try:
        desk = EnrollmentDesk(core, load_or_create_hub_key(hub_key_path(db)))
    except (OSError, VitalsError) as exc:
        core.close()
        raise fail(
            f"the hub key: {exc}", "the hub key beside the database must be the hub's own, mode 600"
        ) from None
    log = logging.getLogger("hub")

    async def _main() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(quiet_closed_sockets)

        def stop(again: bool = False) -> None:
            # again each second until it ends: a task can miss one cancellation
            # (aiomqtt's MqttError from a TaskGroup that dropped it; Python 3.11's
            # wait_for inside a publish), and a TaskGroup cancels its tasks only
            # once, so from the second second on every task is cancelled again
            if task is not None and not task.done():
                task.cancel()
                if again:
                    for t in asyncio.all_tasks(loop):
                        if t is not task:
                            t.cancel()
                loop.call_later(1.0, stop, True)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        worker_ = Hub(
            core,
            host=host,
            port=port,
            shared=shared,
            persistent=persistent,
            hub_key=desk.hub_key,  # signs the receipts and the resend asks
        )
        log.info(
            "hub worker %s on %s:%d, prefix %s, database %s%s",
            name,
            host,
            port,
            prefix,
            db,
            (" (persistent session)" if persistent else "") + (" (shared)" if shared else ""),
        )
        server = None
        if metrics_port is not None:
            from hub.metrics import Metrics, start_metrics

            try:
                server = await start_metrics(Metrics(core, worker_), metrics_host, metrics_port)
            except OSError as exc:
                raise _Refused(
                    f"--metrics-port {metrics_port} on {metrics_host}: {exc.strerror or exc}",
                    "another process listens there: choose another --metrics-port",
                ) from None
        async with asyncio.TaskGroup() as tg:
            if server is not None:
                tg.create_task(server.serve_forever(), name="hub.metrics")
            tg.create_task(
                serve_enroll(desk, host=host, port=port, shared=shared), name="hub.enroll"
            )
            tg.create_task(worker_.run(), name="hub.worker")

    failed: BaseException | None = None
    try:
        asyncio.run(_main())
    except asyncio.CancelledError:
        pass
    except _Refused as exc:
        core.close()
        raise fail(exc.args[0], exc.args[1]) from None
    except BaseExceptionGroup as group:  # a task's error: the database's are the ones expected
        failed = _first(group)
        if not isinstance(failed, _STORE_ERRORS):
            core.close()
            raise
    try:
        core.close()
    except _STORE_ERRORS as exc:
        failed = failed or exc
    if failed is not None:
        raise fail(
            f"hub worker {name} stopped: cannot write to {shown(db)}: {failed}",
            "nothing unwritten was acknowledged: the broker keeps it for this worker's next"
            " start; check the disk or the database",
        )
    log.info("hub worker %s stopped; everything it held is written", name)


@hub_app.command("token")
def hub_token(
    ctx: typer.Context,
    gateway: Annotated[str, typer.Argument(help="gateway id the token is for")],
    ttl: Annotated[float, typer.Option(help="validity in hours", min=0.01)] = 24.0,
    db: Annotated[str | None, typer.Option(help=f"{DB_HELP}; also accepted before 'token'")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON object: token, gateway, expiry, hub key id")
    ] = False,
) -> None:
    """Issue a one-time enrollment token for a field technician (`vitals provision --token`)."""
    from hub.core import HubCore
    from hub.enroll import EnrollmentDesk, hub_key_path, load_or_create_hub_key

    if db is None:
        db = ctx.obj["db"] if ctx.obj else "hub.sqlite3"

    def refuse(message: str, hint: str) -> typer.Exit:
        if as_json:
            typer.echo(json.dumps({"ok": False, "error": message, "hint": hint}))
            return typer.Exit(1)
        return fail(message, hint)

    if not is_url(db):
        parent = Path(db).parent
        if not (parent if str(parent) else Path(".")).is_dir():
            raise refuse(f"{shown(db)}: no such directory", "pass --db PATH of the hub's database")
    try:
        core = HubCore(db)
    except (OSError, sqlite3.Error, VitalsError) as exc:
        raise refuse(f"{shown(db)}: {exc}", "pass --db PATH of the hub's database") from None
    try:
        desk = EnrollmentDesk(core, load_or_create_hub_key(hub_key_path(db)))
        token = desk.issue_token(gateway, ttl_s=ttl * 3600.0)
    except (OSError, VitalsError) as exc:
        raise refuse(
            str(exc), "a gateway id is a-z, 0-9 and '-'; the hub key must be readable"
        ) from None
    finally:
        core.close()
    hub_kid = envelope.key_id(desk.hub_public).hex()
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "ok": True,
                    "token": token,
                    "gateway": gateway,
                    "valid_h": ttl,
                    "expires": round(time.time() + ttl * 3600.0, 3),
                    "hub_key_id": hub_kid,
                }
            )
        )
        return
    typer.echo(token)
    typer.echo(f"valid {ttl:g} h, once, for {gateway}; pins hub key {hub_kid}", err=True)


@hub_app.command("stats")
def hub_stats_cmd(
    ctx: typer.Context,
    db: Annotated[str | None, typer.Option(help=f"{DB_HELP}; also accepted before 'stats'")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
) -> None:
    """Delivered, duplicate, rejected and missing batches, per gateway (enrolled ones too)."""
    from hub.stats import hub_stats

    db = db or ctx.obj["db"]
    if not is_url(db) and not Path(db).is_file():
        raise fail(f"{shown(db)}: no hub database here", "pass --db PATH (the hub's --db)")
    try:
        stats: dict[str, Any] = hub_stats(db)
    except sqlite3.Error as exc:
        raise fail(
            f"{shown(db)}: not a hub database ({exc})", "pass --db PATH (the hub's --db)"
        ) from None
    except (OSError, VitalsError) as exc:
        raise _db_problem(db, exc) from None
    if as_json:
        typer.echo(json.dumps(stats))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"hub {shown(db)}")
    for col in (
        "gateway",
        "batches",
        "readings",
        "epochs",
        "missing batches",
        "dropped by gateway",
        "split",
        "refused",
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
            str(g["split_batches"]),
            str(g["refused_batches"]),
        )
    Console(highlight=False).print(t)
    typer.echo(
        f"duplicates dropped: {stats['duplicates']}  gap notices: {stats['gap_notices']}  "
        f"rejected: {stats['rejected'] or 'none'}"
    )
    typer.echo(
        f"receipts sent: {stats['receipts_sent']}  heartbeats: {stats['heartbeats']}  "
        f"resend asks: {stats['resend_asks']}"
        + (
            ""
            if stats["heartbeats"]
            else "  (no heartbeat yet: gateways without the hub key run without receipts)"
        )
    )
    if stats.get("enrollments"):
        typer.echo(f"enrollment requests: {stats['enrollments']}")
