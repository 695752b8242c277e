"""``vitals hub firmware push GW DEVICE IMAGE`` and ``vitals hub firmware status GW DEVICE``.

The image goes to the gateway as signed ``firmware`` commands (the command
channel: hub key, expiry, replay protection), in parts of 3000 bytes; the
first part names the firmware key the image must verify with (the hub names
it, as the issue asks: ``--key``, or ``firmware-keys/*.pub`` beside the hub
key). The hub verifies the image itself first: a refused image is never sent.
The gateway verifies it again, then updates the terminal in the idle time of
its bus (agent/ops/fwupdate.py); ``status`` asks it how far it is, and how it went.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from hub._cli import fail
from hub.confpush import _broker, _open
from hub.enroll import hub_key_path
from protocols import ed25519, fwimage, topics
from protocols.envelope import key_id
from protocols.errors import KeyFormatError

__all__ = ["firmware_app"]

PART_BYTES = 3000  # as agent.ops.fwupdate.PART_BYTES: a command is at most 4 KiB

firmware_app = typer.Typer(
    help="Push a signed firmware image to a terminal behind a gateway; see how it goes.",
    no_args_is_help=True,
)

_Db = Annotated[str | None, typer.Option(help="hub database; also accepted before 'firmware'")]
_Broker = Annotated[
    str | None, typer.Option(help="MQTT broker HOST:PORT; also accepted before 'firmware'")
]


def _keys(db: str, given: list[str]) -> list[ed25519.PublicKey]:
    texts = []
    keydir = hub_key_path(db).parent / "firmware-keys"
    if keydir.is_dir():
        texts += [(str(p), p.read_text()) for p in sorted(keydir.glob("*.pub"))]
    for item in given:
        p = Path(item)
        texts.append((item, p.read_text() if p.is_file() else item))
    out = []
    for where, text in texts:
        try:
            out.append(ed25519.PublicKey.from_public_bytes(bytes.fromhex(text.strip())))
        except (ValueError, KeyFormatError):
            raise fail(f"{where}: not a firmware public key", "64 hex digits", 2) from None
    return out


def _line(device: str, st: dict[str, Any]) -> str:
    state = st.get("state", "?")
    if state == "done":
        return f"{device}: {st.get('message')}"
    if state in ("sending", "checking", "rebooting", "waiting for the terminal"):
        held, size = int(st.get("held") or 0), int(st.get("size") or 0)
        pct = f" {100 * held // size} %" if size else ""
        return f"{device}: {state}{pct} ({held}/{size} bytes of {st.get('image')})"
    return f"{device}: {state} {st.get('message') or ''}".rstrip()


async def _status(c: Any, commander: Any, gateway: str, device: str) -> dict[str, Any]:
    res = await commander.send(
        c, gateway, "firmware", {"device": device, "action": "status"}, timeout_s=10.0
    )
    if res.status != "ok":
        raise fail(f"{gateway} refused: {res.reason}", "vitals hub firmware status later")
    value = res.value()
    return dict(value) if isinstance(value, dict) else {}


@firmware_app.command("push")
def push_cmd(
    ctx: typer.Context,
    gateway: Annotated[str, typer.Argument(help="the gateway id")],
    device: Annotated[
        str, typer.Argument(help="the terminal, by its name in the gateway's configuration")
    ],
    image: Annotated[Path, typer.Argument(help="the signed firmware image (.vfw)")],
    key: Annotated[
        list[str] | None,
        typer.Option("--key", help="the firmware public key (hex, or a file); repeatable"),
    ] = None,
    wait: Annotated[
        float, typer.Option(help="seconds to wait for the outcome (0: do not)")
    ] = 900.0,
    db: _Db = None,
    broker: _Broker = None,
    as_json: Annotated[bool, typer.Option("--json", help="the outcome as one JSON object")] = False,
) -> None:
    """Send IMAGE to GW for DEVICE; follow the update (exit 0 updated, 1 refused or failed,
    3 no outcome within --wait: 'vitals hub firmware status' later)."""
    import aiomqtt

    from hub.commander import Commander

    obj = ctx.obj or {}
    db = db or obj.get("db") or "hub.sqlite3"
    prefix = obj.get("prefix") or topics.DEFAULT_PREFIX
    host, port = _broker(ctx, broker)
    try:
        data = image.read_bytes()
    except OSError as exc:
        raise fail(f"{image}: {exc.strerror}", "name the image file", 2) from None
    keys = _keys(db, key or [])
    try:
        parsed = fwimage.parse(data)
        manifest = fwimage.verify(parsed, keys)
    except fwimage.ImageRefused as exc:
        raise fail(
            f"image refused, nothing was sent: {exc}",
            "name the vendor's firmware key with --key (or firmware-keys/*.pub beside the hub key)",
        ) from None
    named = next(k for k in keys if key_id(k) == manifest.kid)
    core, hub_key = _open(db, gateway)
    if hub_key is None:
        core.close()
        raise fail(f"no hub key at {hub_key_path(db)}", "run from the hub's directory (--db)")

    async def _main() -> dict[str, Any] | None:
        async with aiomqtt.Client(host, port, identifier=f"vitals-hub-fw-{os.getpid()}") as c:
            commander = Commander(core, hub_key, prefix=prefix)
            for off in range(0, len(data), PART_BYTES):
                args: dict[str, Any] = {
                    "device": device,
                    "action": "part",
                    "offset": off,
                    "total": len(data),
                    "data": data[off : off + PART_BYTES],
                }
                if off == 0:
                    args["key"] = named.public_bytes_raw().hex()
                res = await commander.send(c, gateway, "firmware", args, timeout_s=10.0)
                if res.status != "ok":
                    detail = res.value() if res.status == "refused" else res.reason
                    raise fail(f"{gateway} refused the image: {res.reason}: {detail}", "")
            if not as_json:
                typer.echo(
                    f"sent {fwimage.version_text(manifest.version)} for {device} to {gateway} "
                    f"({len(data)} bytes); following the update"
                )
            end = time.monotonic() + wait
            said = ""
            while time.monotonic() < end:
                st = await _status(c, commander, gateway, device)
                line = _line(device, st)
                if line != said and not as_json:
                    typer.echo(line)
                    said = line
                if st.get("state") in ("done", "refused"):
                    return st
                await asyncio.sleep(2.0)
            return None

    try:
        st = asyncio.run(_main())
    except aiomqtt.MqttError as exc:
        raise fail(f"broker {host}:{port}: {exc}", "--broker HOST:PORT") from None
    except TimeoutError:
        raise fail(f"{gateway} did not answer", "is it connected? vitals hub stats") from None
    finally:
        core.close()
    if as_json:
        typer.echo(json.dumps({"gateway": gateway, "device": device, "status": st}))
    if st is None:
        typer.echo(
            f"no outcome yet: 'vitals hub firmware status {gateway} {device}' later", err=True
        )
        raise typer.Exit(3)
    raise typer.Exit(0 if st.get("ok") else 1)


@firmware_app.command("status")
def status_cmd(
    ctx: typer.Context,
    gateway: Annotated[str, typer.Argument(help="the gateway id")],
    device: Annotated[str, typer.Argument(help="the terminal")],
    db: _Db = None,
    broker: _Broker = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
) -> None:
    """How far the update of DEVICE is, or how it went (since the agent started)."""
    import aiomqtt

    from hub.commander import Commander

    obj = ctx.obj or {}
    db = db or obj.get("db") or "hub.sqlite3"
    prefix = obj.get("prefix") or topics.DEFAULT_PREFIX
    host, port = _broker(ctx, broker)
    core, hub_key = _open(db, gateway)
    if hub_key is None:
        core.close()
        raise fail(f"no hub key at {hub_key_path(db)}", "run from the hub's directory (--db)")

    async def _main() -> dict[str, Any]:
        async with aiomqtt.Client(host, port, identifier=f"vitals-hub-fw-{os.getpid()}") as c:
            return await _status(c, Commander(core, hub_key, prefix=prefix), gateway, device)

    try:
        st = asyncio.run(_main())
    except aiomqtt.MqttError as exc:
        raise fail(f"broker {host}:{port}: {exc}", "--broker HOST:PORT") from None
    except TimeoutError:
        raise fail(f"{gateway} did not answer", "is it connected? vitals hub stats") from None
    finally:
        core.close()
    typer.echo(json.dumps(st) if as_json else _line(device, st))
