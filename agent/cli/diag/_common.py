"""What every ``vitals diag`` command shares: exit codes, errors a technician
can cause turned into one line and a hint, JSON output, the rich console.

Exit codes (documented in ``docs/diagnostics.md``):

* 0 ``OK``: the check passed / something was found;
* 1 ``FAILED``: the command ran but the answer is "no" (nothing answered, a
  step failed, no plausible order);
* 2 ``USAGE``: bad arguments (typer's own code for usage errors);
* 3 ``PORT``: the serial port or TCP endpoint cannot be used (missing, busy,
  no permission).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console

from agent.fieldbus.portlock import lock_holder, process_name
from protocols.errors import VitalsError

__all__ = [
    "FAILED",
    "OK",
    "PORT",
    "USAGE",
    "DiagError",
    "console",
    "die",
    "emit_json",
    "explain_os_error",
    "parse_int",
    "parse_range",
    "port_busy",
    "port_holder",
    "waiting",
]

OK = 0
FAILED = 1
USAGE = 2
PORT = 3


class DiagError(VitalsError):
    """A problem a technician can fix: one line, a hint, an exit code."""

    def __init__(self, message: str, hint: str = "", code: int = FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code


def console(*, stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False)


def die(exc: DiagError, *, as_json: bool = False) -> NoReturn:
    """Print ``exc`` as one line (plus its hint) and exit with its code."""
    if as_json:
        emit_json({"ok": False, "error": exc.message, "hint": exc.hint, "code": exc.code})
    else:
        typer.secho(f"error: {exc.message}", fg="red", err=True)
        if exc.hint:
            typer.echo(f"hint: {exc.hint}", err=True)
    raise typer.Exit(exc.code)


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def explain_os_error(what: str, exc: BaseException) -> DiagError:
    """Turn an error opening ``what`` (a port or an endpoint) into a DiagError."""
    code = getattr(exc, "errno", None)
    if code is None and exc.args and isinstance(exc.args[0], int):
        code = exc.args[0]
    if code is None and isinstance(exc.__cause__, OSError):
        code = exc.__cause__.errno
    if code == errno.ENOENT:
        return DiagError(
            f"{what}: no such port",
            "list the ports with 'vitals diag ports'; a USB adapter appears as /dev/ttyUSB0 or /dev/ttyACM0",
            PORT,
        )
    if code in (errno.EACCES, errno.EPERM):
        return DiagError(
            f"{what}: permission denied",
            "add yourself to the dialout group (sudo usermod -aG dialout $USER), then log in again",
            PORT,
        )
    if code in (errno.EBUSY, errno.EAGAIN):
        return port_busy(what)
    if code == errno.ECONNREFUSED:
        return DiagError(
            f"{what}: connection refused", "check the host and port; is the device powered?", PORT
        )
    if code in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT):
        return DiagError(f"{what}: unreachable", "check the cabling and the IP settings", PORT)
    if code in (errno.EIO, errno.ENXIO, errno.ENODEV):
        return DiagError(
            f"{what}: the port went away",
            "is the USB adapter still plugged in? 'dmesg | tail' shows what the kernel saw",
            PORT,
        )
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return DiagError(
        f"{what}: {reason}",
        "'vitals diag ports' lists the serial ports; for a TCP device check the address",
        PORT,
    )


def parse_int(text: str) -> int:
    """``0x42F6``, ``17142`` or ``0b101``: an integer."""
    try:
        return int(text.strip(), 0)
    except ValueError:
        raise DiagError(f"{text!r} is not a number", "write 0x42F6 or 17142", 2) from None


def parse_range(text: str) -> tuple[float, float]:
    """``LOW..HIGH`` (either may be negative): a closed range."""
    low, sep, high = text.partition("..")
    try:
        if not sep:
            raise ValueError
        lo, hi = float(low), float(high)
    except ValueError:
        raise DiagError(f"{text!r} is not a range", "write LOW..HIGH, e.g. 100..150", 2) from None
    if lo > hi:
        lo, hi = hi, lo
    return lo, hi


def waiting(
    text: str, *, quiet: bool = False
) -> contextlib.AbstractContextManager[Callable[[str], None]]:
    """A spinner with ``text`` on stderr while something takes a while; nothing
    when ``quiet`` (--json) or when stderr is not a terminal. Yields a function
    that changes the text."""
    return _waiting(text, quiet)


@contextlib.contextmanager
def _waiting(text: str, quiet: bool) -> Iterator[Callable[[str], None]]:
    err = console(stderr=True)
    if quiet or not err.is_terminal:
        yield lambda _text: None
        return
    with err.status(escape(text)) as status:
        yield lambda new: status.update(escape(new))


def escape(text: str) -> str:
    """``text`` shown as is by rich (``[uplink.tls]`` is not markup)."""
    from rich.markup import escape as _escape

    return _escape(text)


# -- who holds a serial port -------------------------------------------------------


def port_holder(path: str, proc: Path = Path("/proc")) -> tuple[int, str] | None:
    """``(pid, name)`` of the process holding ``path`` locked (``flock``, as
    pyserial's ``exclusive=True`` and the agent take it; from /proc/locks), else
    of another process with it open (from /proc/*/fd); None when not found."""
    from agent.cli.diag.ports import holders

    pid = lock_holder(path, proc)
    if pid is not None and pid != os.getpid():
        return pid, process_name(pid, proc)

    found, _hidden = holders([path], proc)
    others = [h for h in found.get(path, []) if h[0] != os.getpid()]
    if others:
        pid = others[0][0]
        return pid, process_name(pid, proc)
    return None


def port_busy(path: str) -> DiagError:
    """The refusal for a port another process holds, naming it."""
    who = port_holder(path)
    if who is None:
        return DiagError(
            f"{path}: port busy: held by another process",
            "see who holds it with 'sudo vitals diag ports'; stop the agent with "
            "'sudo systemctl stop vitals'",
            PORT,
        )
    pid, name = who
    if name == "vitals":
        hint = "the agent is polling this port: stop it first ('sudo systemctl stop vitals'), start it again after"
    else:
        hint = f"close {name} first (kill {pid} if it is stuck); 'vitals diag ports' lists who holds what"
    return DiagError(f"{path}: port busy: held by {name} (PID {pid})", hint, PORT)
