"""``vitals diag``: the installer's diagnostics.

One module per command; each exposes a typer command function registered on
:data:`diag_app` here. The integrator mounts it with
``app.add_typer(diag_app, name="diag")``.
"""

from __future__ import annotations

import typer

from agent.cli.diag.bundle import bundle_command
from agent.cli.diag.ports import ports_command
from agent.cli.diag.probe import probe_command
from agent.cli.diag.read import read_command
from agent.cli.diag.scan import scan_command
from agent.cli.diag.trace import trace_command
from agent.cli.diag.uplink import uplink_command

__all__ = ["diag_app"]

diag_app = typer.Typer(
    help="Installer diagnostics: ports, bus scan, live read, frame trace, word order, uplink, support bundle.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
diag_app.command("ports")(ports_command)
diag_app.command("probe")(probe_command)
diag_app.command("read")(read_command)
diag_app.command("scan")(scan_command)
diag_app.command("uplink")(uplink_command)
diag_app.command("bundle")(bundle_command)
diag_app.command("trace")(trace_command)


@diag_app.callback()
def _diag() -> None:
    """Installer diagnostics. Every command takes --json; exit 0 ok, 1 failed or nothing
    found, 2 usage, 3 port or endpoint unusable (docs/diagnostics.md)."""
