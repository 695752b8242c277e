"""What the hub's commands share (``vitals hub``, ``hub config``, ``hub firmware``)."""

from __future__ import annotations

import typer

from protocols.address import host_port
from protocols.errors import LocalError

DB_HELP = "hub database: an SQLite file, or a postgresql:// URL"


def fail(message: str, hint: str = "", code: int = 1) -> typer.Exit:
    """One line naming what is wrong, one with what to do; exit 1 (2: a usage error)."""
    typer.secho(f"error: {message}", fg="red", err=True)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    return typer.Exit(code)


def broker_addr(broker: str) -> tuple[str, int]:
    """``--broker HOST:PORT`` (an empty host: this machine), or a usage error."""
    try:
        return host_port(broker, default_host="127.0.0.1")
    except LocalError as exc:
        raise fail(f"--broker {exc}", "e.g. --broker 127.0.0.1:1883", 2) from None
