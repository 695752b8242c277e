"""``vitals hub config push GW FILE`` and ``vitals hub config status GW``.

A push is signed with the hub key (the one gateways pinned at enrollment, beside
the database), versioned above anything the gateway reported and anything this
hub pushed to it before (``<db>.configs.json``), and published retained on
``{prefix}/{gw}/config``: a gateway that is away gets it when it is back. The
gateway's signed report is retained on ``{prefix}/{gw}/config/status`` and
verified against its enrolled key (docs/updates.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer

from hub._cli import DB_HELP, broker_addr, fail
from hub.enroll import hub_key_path
from hub.store import is_url, shown
from protocols import confpush, ed25519, topics
from protocols.errors import ProtocolError, SignatureError

__all__ = ["config_app", "latest_report", "push_config", "versions_path"]

config_app = typer.Typer(
    help="Push a signed configuration to a gateway; see how it went.", no_args_is_help=True
)

FINAL = ("applied", "rolled_back", "refused")


def versions_path(db: str | Path) -> Path:
    """The versions pushed per gateway: beside the hub key (``hub.configs.json``)."""
    return hub_key_path(db).with_suffix(".configs.json")


def _versions(db: str | Path) -> dict[str, int]:
    try:
        doc = json.loads(versions_path(db).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {str(k): int(v) for k, v in doc.items()} if isinstance(doc, dict) else {}


def _save_version(db: str | Path, gateway: str, version: int) -> None:
    path = versions_path(db)
    doc = _versions(db)
    doc[gateway] = max(version, doc.get(gateway, 0))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    os.replace(tmp, path)


def verify_report(store: Any, gateway: str, data: bytes) -> confpush.ConfigReport:
    """The report, verified against ``gateway``'s enrolled, unrevoked key; ProtocolError if not."""
    rep = confpush.parse_report(data)
    if rep.gw != gateway:
        raise SignatureError(f"report names {rep.gw!r}, expected {gateway!r}")
    row = store.key(gateway, rep.kid)
    if row is None or row[1]:
        raise SignatureError(f"report signed by kid {rep.kid.hex()}, not a valid key of {gateway}")
    rep.verify(row[0])
    return rep


async def latest_report(
    client: Any,
    store: Any,
    gateway: str,
    *,
    prefix: str,
    timeout_s: float,
    version: int = 0,
    on_report: Any = None,
) -> confpush.ConfigReport | None:
    """The gateway's report (retained, or the next one): with ``version``, the first final
    report about it (``on_report`` sees the others); without, the first that verifies."""
    await client.subscribe(topics.config_status(gateway, prefix), qos=1)
    with_timeout = asyncio.timeout(timeout_s)
    try:
        async with with_timeout:
            async for msg in client.messages:
                if not isinstance(msg.payload, bytes | bytearray):
                    continue
                try:
                    rep = verify_report(store, gateway, bytes(msg.payload))
                except ProtocolError:
                    continue
                if not version:
                    return rep
                if rep.v == version and rep.status in FINAL:
                    return rep
                if on_report is not None:
                    on_report(rep)
    except TimeoutError:
        return None
    return None


def push_config(
    text: str, *, gateway: str, version: int, hub_key: ed25519.PrivateKey, trial_s: int
) -> bytes:
    return confpush.push(
        text,
        gateway=gateway,
        version=version,
        hub_key=hub_key,
        now_ms=int(time.time() * 1000),
        trial_s=trial_s,
    )


def _open(db: str, gateway: str) -> tuple[Any, ed25519.PrivateKey | None]:
    """The hub core (for the gateway's keys) and the hub key, or a one-line error."""
    import sqlite3

    from hub.core import HubCore
    from hub.enroll import load_or_create_hub_key
    from protocols.errors import VitalsError

    if not is_url(db) and not Path(db).is_file():
        raise fail(f"{shown(db)}: no hub database here", "pass --db PATH (the hub's --db)")
    try:
        core = HubCore(db)
    except (OSError, sqlite3.Error, VitalsError) as exc:
        raise fail(f"{shown(db)}: {exc}", "pass --db PATH (the hub's --db)") from None
    path = hub_key_path(db)
    if not path.exists():
        return core, None
    try:
        return core, load_or_create_hub_key(path)
    except (OSError, VitalsError) as exc:
        core.close()
        raise fail(f"the hub key: {exc}", "the hub key beside the database, mode 600") from None


def _broker(ctx: typer.Context, broker: str | None) -> tuple[str, int]:
    return broker_addr(broker or (ctx.obj or {}).get("broker") or "127.0.0.1:1883")


def _line(rep: confpush.ConfigReport) -> str:
    running = f"version {rep.running}" if rep.running else "its local file"
    why = f": {rep.reason}" if rep.reason else ""
    return f"{rep.gw} version {rep.v} {rep.status}{why} (running {running})"


def _as_dict(rep: confpush.ConfigReport) -> dict[str, Any]:
    return {
        "gateway": rep.gw,
        "version": rep.v,
        "status": rep.status,
        "reason": rep.reason,
        "running": rep.running,
        "t": rep.t,
    }


_Db = Annotated[str | None, typer.Option(help=f"{DB_HELP}; also accepted before 'config'")]
_Broker = Annotated[
    str | None, typer.Option(help="MQTT broker HOST:PORT; also accepted before 'config'")
]


@config_app.command("push")
def push_cmd(
    ctx: typer.Context,
    gateway: Annotated[str, typer.Argument(help="the gateway id")],
    file: Annotated[Path, typer.Argument(help="its whole configuration file (TOML)")],
    version: Annotated[
        int | None,
        typer.Option(help="the version (default: one above any pushed or reported)", min=1),
    ] = None,
    trial: Annotated[
        int,
        typer.Option(
            help="seconds the gateway has to show it works on it", min=1, max=confpush.MAX_TRIAL_S
        ),
    ] = 120,
    wait: Annotated[
        float | None,
        typer.Option(help="seconds to wait for the outcome (default: trial + 60; 0: do not)"),
    ] = None,
    db: _Db = None,
    broker: _Broker = None,
    as_json: Annotated[bool, typer.Option("--json", help="the outcome as one JSON object")] = False,
) -> None:
    """Push FILE to GW, signed and versioned; wait for the outcome (exit 0 applied,
    1 refused or rolled back, 3 no answer yet: the push stays for the gateway)."""
    import aiomqtt

    obj = ctx.obj or {}
    db = db or obj.get("db") or "hub.sqlite3"
    prefix = obj.get("prefix") or topics.DEFAULT_PREFIX
    host, port = _broker(ctx, broker)
    try:
        text = file.read_text(encoding="utf-8")
        doc = tomllib.loads(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"{file}: cannot be read ({exc})", "pass the configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise fail(f"{file}: TOML syntax error: {exc}", f"vitals config check {file}") from None
    named = (doc.get("gateway") or {}).get("id")
    if named != gateway:
        raise fail(
            f"{file} is for gateway {named!r}, not {gateway!r}",
            "a gateway refuses a configuration that changes its id",
            2,
        )
    core, key = _open(db, gateway)
    if key is None:
        core.close()
        raise fail(
            f"no hub key at {hub_key_path(db)}",
            "pushes are signed with the key the gateways pinned at enrollment: run from the hub's directory",
        )

    async def _main() -> tuple[int, confpush.ConfigReport | None]:
        async with aiomqtt.Client(host, port, identifier=f"vitals-hub-config-{os.getpid()}") as c:
            last = await latest_report(c, core.store, gateway, prefix=prefix, timeout_s=1.0)
            v = version or max(_versions(db).get(gateway, 0), last.v if last else 0) + 1
            try:
                wire = push_config(text, gateway=gateway, version=v, hub_key=key, trial_s=trial)
            except ProtocolError as exc:
                raise fail(str(exc), "a smaller file") from None
            await c.publish(topics.config(gateway, prefix), wire, qos=1, retain=True)
            _save_version(db, gateway, v)
            if not as_json:
                typer.echo(f"pushed version {v} to {gateway} ({len(wire)} bytes, trial {trial} s)")
            budget = trial + 60.0 if wait is None else wait
            if budget <= 0:
                return v, None

            def progress(rep: confpush.ConfigReport) -> None:
                if rep.v == v and not as_json:
                    typer.echo(_line(rep))

            rep = await latest_report(
                c,
                core.store,
                gateway,
                prefix=prefix,
                timeout_s=budget,
                version=v,
                on_report=progress,
            )
            return v, rep

    try:
        v, rep = asyncio.run(_main())
    except aiomqtt.MqttError as exc:
        raise fail(
            f"broker {host}:{port}: {exc}", "is the broker running? --broker HOST:PORT"
        ) from None
    finally:
        core.close()
    if as_json:
        typer.echo(json.dumps({"version": v, "report": _as_dict(rep) if rep else None}))
    elif rep is None:
        typer.echo(
            f"no outcome from {gateway} yet: the push stays retained for it; "
            f"'vitals hub config status {gateway}' later",
            err=True,
        )
    else:
        typer.echo(_line(rep))
    raise typer.Exit(3 if rep is None else 0 if rep.status == "applied" else 1)


@config_app.command("status")
def status_cmd(
    ctx: typer.Context,
    gateway: Annotated[str, typer.Argument(help="the gateway id")],
    db: _Db = None,
    broker: _Broker = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the report")] = 3.0,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
) -> None:
    """The gateway's last signed report: which version it runs, how the last push went."""
    import aiomqtt

    obj = ctx.obj or {}
    db = db or obj.get("db") or "hub.sqlite3"
    prefix = obj.get("prefix") or topics.DEFAULT_PREFIX
    host, port = _broker(ctx, broker)
    core, _ = _open(db, gateway)

    async def _main() -> confpush.ConfigReport | None:
        async with aiomqtt.Client(host, port, identifier=f"vitals-hub-config-{os.getpid()}") as c:
            return await latest_report(c, core.store, gateway, prefix=prefix, timeout_s=timeout)

    try:
        rep = asyncio.run(_main())
    except aiomqtt.MqttError as exc:
        raise fail(
            f"broker {host}:{port}: {exc}", "is the broker running? --broker HOST:PORT"
        ) from None
    finally:
        core.close()
    if rep is None:
        if as_json:
            typer.echo(json.dumps({"report": None}))
        raise fail(
            f"no signed configuration report from {gateway} on the broker",
            "it was never pushed one, has not connected since, or is not enrolled here"
            " (its reports are checked against its enrolled key)",
        )
    if as_json:
        typer.echo(json.dumps({"report": _as_dict(rep)}))
        return
    typer.echo(_line(rep))
