"""``vitals diag ports``: the serial ports of this machine, and who holds them.

Ports come from pyserial's ``serial.tools.list_ports`` (USB adapters with their
VID:PID and serial number, on-board UARTs); ``--port`` adds paths it does not
list (a pty, a symlink from a udev rule). Holders are found by reading the
``/proc/<pid>/fd`` symlinks; other users' processes are only visible to root,
which the output says when it matters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from agent.cli.diag._common import FAILED, OK, console, emit_json, escape
from agent.fieldbus.portlock import lock_holder, process_name

__all__ = ["PortInfo", "holders", "list_serial_ports", "ports_command"]


@dataclass(slots=True)
class PortInfo:
    device: str
    description: str = ""
    vid_pid: str = ""
    serial_number: str = ""
    manufacturer: str = ""
    exists: bool = True
    access: bool = True  # read+write for us
    held_by: list[tuple[int, str]] = field(default_factory=list)
    locked_by: int | None = None  # the pid holding it exclusively (flock): diag refuses it

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "description": self.description,
            "vid_pid": self.vid_pid,
            "serial_number": self.serial_number,
            "manufacturer": self.manufacturer,
            "exists": self.exists,
            "access": self.access,
            "held_by": [{"pid": pid, "command": cmd} for pid, cmd in self.held_by],
            "locked_by": self.locked_by,
        }


def holders(
    paths: list[str], proc: Path = Path("/proc")
) -> tuple[dict[str, list[tuple[int, str]]], int]:
    """For each path, the ``(pid, command)`` of processes with it open; plus how
    many processes could not be inspected (no permission)."""
    wanted: dict[str, str] = {}
    for p in paths:
        wanted[os.path.realpath(p)] = p
    out: dict[str, list[tuple[int, str]]] = {p: [] for p in paths}
    hidden = 0
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            fds = list((entry / "fd").iterdir())
        except PermissionError:
            hidden += 1
            continue
        except OSError:
            continue
        hit: set[str] = set()
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target in wanted:
                hit.add(wanted[target])
        if hit:
            cmd = process_name(pid, proc, command=True)  # "vitals run", "vitals sim rtu"
            for p in hit:
                out[p].append((pid, cmd))
    return out, hidden


def list_serial_ports(extra: list[str] | None = None) -> tuple[list[PortInfo], int]:
    from serial.tools import list_ports

    infos: list[PortInfo] = []
    for p in sorted(list_ports.comports(), key=lambda p: p.device):
        vid_pid = f"{p.vid:04x}:{p.pid:04x}" if p.vid is not None and p.pid is not None else ""
        infos.append(
            PortInfo(
                device=p.device,
                description=p.description if p.description not in (None, "n/a") else "",
                vid_pid=vid_pid,
                serial_number=p.serial_number or "",
                manufacturer=p.manufacturer or "",
            )
        )
    known = {i.device for i in infos}
    for path in extra or []:
        if path not in known:
            infos.append(PortInfo(device=path, description="(given with --port)"))
    for i in infos:
        i.exists = os.path.exists(i.device)
        i.access = i.exists and os.access(i.device, os.R_OK | os.W_OK)
    held, hidden = holders([i.device for i in infos if i.exists])
    for i in infos:
        i.held_by = sorted(held.get(i.device, []))
        i.locked_by = lock_holder(i.device) if i.exists else None
    return infos, hidden


def ports_command(
    port: Annotated[
        list[str] | None, typer.Option(help="also check this path (a pty, a udev symlink)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
) -> None:
    """Serial ports: description, USB VID:PID, serial number, and who holds them."""
    infos, hidden = list_serial_ports(port)
    if as_json:
        emit_json({"ports": [i.to_dict() for i in infos], "processes_not_visible": hidden})
        raise typer.Exit(OK if infos else FAILED)
    con = console()
    if not infos:
        con.print("no serial ports found")
        con.print(
            "hint: plug the USB-RS-485 adapter in; 'dmesg | tail' shows whether the kernel saw it"
        )
        raise typer.Exit(FAILED)
    t = Table(title="serial ports")
    # "held by" names every process with the port open; "exclusive" the one that
    # locked it (the agent does): diag commands refuse that port until it is stopped
    for col in ("port", "description", "USB VID:PID", "serial", "held by", "access"):
        t.add_column(col)
    for i in infos:
        held = (
            ", ".join(
                f"{cmd} ({pid}{', exclusive' if pid == i.locked_by else ''})"
                for pid, cmd in i.held_by
            )
            or "—"
        )
        access = "ok" if i.access else ("missing" if not i.exists else "[red]no permission[/]")
        # names come from devices and udev: "[...]" in them is text, not markup
        t.add_row(
            escape(i.device), escape(i.description), i.vid_pid, escape(i.serial_number),
            escape(held), access,
        )  # fmt: skip
    con.print(t)
    if any(i.exists and not i.access for i in infos):
        con.print(
            "hint: add yourself to the dialout group (sudo usermod -aG dialout $USER), then log in again"
        )
    if hidden:
        con.print(
            f"note: {hidden} processes of other users not inspected; run with sudo to see every holder"
        )
    raise typer.Exit(OK)
