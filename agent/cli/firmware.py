"""``vitals firmware``: update a terminal from the gateway (a technician), pack and show images.

The update itself is agent/ops/fwupdate.py; this is its command line (kept apart:
the running agent never loads typer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from agent.fieldbus.poller import BusPoller
from agent.ops.fwupdate import FIRMWARE_KEYS_DIR, BusTurns, FirmwareUpdate, load_firmware_keys
from protocols import ed25519, fwimage
from protocols.errors import KeyFormatError

__all__ = ["firmware_app"]

# --------------------------------------------------------------------------- the command

firmware_app = typer.Typer(
    help="Terminal firmware: update a terminal behind this gateway.", no_args_is_help=True
)


def _die(message: str, hint: str = "", code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg="red", err=True)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    return typer.Exit(code)


@firmware_app.command("update")
def update_command(
    image: Annotated[Path, typer.Argument(help="the signed firmware image (.vfw)")],
    device: Annotated[
        str, typer.Option("--device", "-d", help="the terminal, by its name in the configuration")
    ],
    config: Annotated[
        Path,
        typer.Option("--config", "-c", envvar="VITALS_CONFIG", help="the gateway configuration"),
    ] = Path("/etc/vitals/gateway.toml"),
    state_dir: Annotated[
        Path | None, typer.Option(envvar="VITALS_STATE_DIR", help="override [gateway] state_dir")
    ] = None,
    key: Annotated[
        list[str] | None,
        typer.Option("--key", help="a trusted firmware public key (hex, or a file); repeatable"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the outcome as JSON")] = False,
) -> None:
    """Update one terminal's firmware over its own bus; the bus's other devices keep being polled.

    Stop the agent first (it holds the port). Run the same command again after
    an interruption: the transfer resumes where the terminal's flash says.
    """
    from agent.ops.config import load_config
    from protocols.errors import ConfigError

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise _die(
            str(exc).splitlines()[0], f"check it with: vitals config check -c {config}", 2
        ) from None
    except OSError as exc:
        raise _die(f"{config}: {exc.strerror}", "name the configuration with --config", 2) from None
    dev = next((d for d in cfg.devices if d.name == device), None)
    if dev is None:
        names = ", ".join(d.name for d in cfg.devices) or "none"
        raise _die(f"no device {device!r} in {config}", f"devices: {names}", 2)
    bus = next(b for b in cfg.buses if b.name == dev.bus)
    if bus.kind not in ("rtu", "rtu-over-tcp", "tcp"):
        raise _die(f"{device} is on a {bus.kind} bus", "firmware goes over Modbus buses only", 2)
    if bus.kind == "rtu":
        import os

        from agent.cli.diag._common import port_busy
        from agent.fieldbus.portlock import lock_holder

        if lock_holder(bus.port) not in (None, os.getpid()):  # the agent locks its ports
            busy = port_busy(bus.port)
            raise _die(busy.message, busy.hint, 1)
    state = state_dir or cfg.gateway.state_dir
    try:
        keys = load_firmware_keys(state, key or ())
        data = image.read_bytes()
    except KeyFormatError as exc:
        raise _die(
            str(exc), "a .pub file holds the 64 hex digits of the raw public key", 2
        ) from None
    except OSError as exc:
        raise _die(f"{image}: {exc.strerror}", "name the image file", 2) from None
    if not keys:
        raise _die(
            "no trusted firmware key",
            f"install the vendor's key as {state / FIRMWARE_KEYS_DIR}/NAME.pub, or pass --key",
            2,
        )
    try:
        parsed = fwimage.parse(data)
        manifest = fwimage.verify(parsed, keys)
    except fwimage.ImageRefused as exc:
        raise _die(
            f"image refused, nothing was sent: {exc}", "ask for a correctly signed image", 1
        ) from None
    outcome = asyncio.run(_update_on_bus(cfg, bus, dev, parsed, quiet=as_json))
    if as_json:
        typer.echo(
            json.dumps(
                {"device": device, "image": fwimage.version_text(manifest.version), **outcome}
            )
        )
    elif outcome["ok"]:
        typer.secho(f"{device}: {outcome['message']} ({outcome['seconds']} s)", fg="green")
    else:
        typer.secho(f"error: {device}: {outcome['message']}", fg="red", err=True)
        if outcome["verdict"]:
            hint = "the terminal refused this image and runs its old one: tell the image's vendor"
        elif outcome["chunks"] or outcome["resumed_at"]:
            hint = "run the command again to resume; the terminal keeps its working firmware"
        else:
            hint = f"nothing was sent; does it answer? vitals diag read --config {config} --device {device}"
        typer.echo(f"hint: {hint}", err=True)
    raise typer.Exit(0 if outcome["ok"] else 1)


async def _update_on_bus(
    cfg: Any, bus: Any, dev: Any, image: fwimage.FirmwareImage, *, quiet: bool
) -> dict[str, Any]:
    """Poll the bus's devices (readings dropped) and update ``dev`` in the idle time."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from agent.clock import SystemClock
    from agent.fieldbus.poller import PolledDevice
    from agent.service import link_for

    link = link_for(bus)
    polls: dict[str, int] = {}

    async def sink(readings: Sequence[Any]) -> None:
        return None

    devices = [
        PolledDevice(
            name=d.name,
            slave=d.slave,
            interval_s=d.interval_s,
            max_registers=d.profile.max_registers,
            max_gap=d.profile.max_gap,
            points=cfg.points.of(d),
        )
        for d in cfg.devices
        if d.bus == bus.name and d.enabled and d.name != dev.name
    ]
    poller = (
        BusPoller(
            bus.name,
            link,
            devices,
            sink,
            SystemClock(),
            retries=bus.retries,
            inter_frame_s=bus.frame_gap_s,
        )
        if devices
        else None
    )
    turns = BusTurns(poller)
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        disable=quiet,
    )
    task = bar.add_task(dev.name, total=image.manifest.size)

    def progress(n: int, size: int, phase: str) -> None:
        bar.update(task, completed=n, description=f"{dev.name}: {phase}")

    upd = FirmwareUpdate(link, dev.slave, image, turns=turns, baud=bus.baud, progress=progress)
    poll_task = None
    with bar:
        try:
            if poller is not None:
                turns.attach()
                poll_task = asyncio.create_task(poller.run(), name=f"poll {bus.name}")
            outcome = await upd.run()
        finally:
            turns.detach()
            if poll_task is not None:
                poll_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poll_task
            else:
                link.close()
    if poller is not None:
        polls = {d.name: d.polls for d in poller.devices}
    return {**outcome.as_dict(), "other_devices_polls": polls}


@firmware_app.command("pack")
def pack_command(
    directory: Annotated[
        Path, typer.Argument(help="the firmware directory (its .py/.mpy modules)")
    ],
    model: Annotated[str, typer.Option(help="the terminals' product code, e.g. VX-SLM-1")],
    version: Annotated[str, typer.Option(help="MAJOR.MINOR, e.g. 1.1 (register value 101)")],
    key: Annotated[Path, typer.Option(help="the firmware private key (PKCS#8 PEM)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="the image file to write")],
) -> None:
    """Build and sign a firmware image (the vendor's side; the key never goes to a gateway)."""
    try:
        major, minor = (int(x) for x in version.split("."))
        if not (0 <= minor < 100 and 0 < major * 100 + minor <= 0xFFFF):
            raise ValueError
    except ValueError:
        raise _die(f"--version {version}: expected MAJOR.MINOR", "e.g. --version 1.1", 2) from None
    try:
        private = ed25519.PrivateKey.from_pem(key.read_bytes())
        payload = fwimage.pack_dir(directory)
    except KeyFormatError as exc:
        raise _die(f"{key}: {exc}", "vitals keygen writes one", 2) from None
    except OSError as exc:
        raise _die(f"{exc.filename}: {exc.strerror}", "", 2) from None
    files = fwimage.unpack_slot(payload)
    if "app.py" not in files and "app.mpy" not in files:
        raise _die(f"{directory}: no app.py", "point at the firmware directory", 2)
    data = fwimage.build(payload, model=model, version=major * 100 + minor, key=private)
    output.write_bytes(data)
    pub = private.public_key().public_bytes_raw().hex()
    typer.echo(f"{output}: {model} {version}, {len(files)} files, {len(payload)} bytes")
    typer.echo(f"firmware key (install as <state_dir>/firmware-keys/NAME.pub): {pub}")


@firmware_app.command("show")
def show_command(
    image: Annotated[Path, typer.Argument(help="a firmware image (.vfw)")],
) -> None:
    """What an image holds: its manifest and files (not a verification: update does that)."""
    try:
        parsed = fwimage.parse(image.read_bytes())
        files = fwimage.unpack_slot(parsed.payload)
    except OSError as exc:
        raise _die(f"{image}: {exc.strerror}", "", 2) from None
    except fwimage.ImageRefused as exc:
        raise _die(f"{image}: {exc}", "", 1) from None
    m = parsed.manifest
    typer.echo(f"model {m.model}, version {fwimage.version_text(m.version)}, {m.size} bytes")
    typer.echo(f"sha256 {m.sha256.hex()}")
    typer.echo(f"signed by firmware key {m.kid.hex()}")
    typer.echo("files: " + ", ".join(f"{n} ({len(b)})" for n, b in sorted(files.items())))
