"""Who holds a serial port: the one place the agent and ``vitals diag`` ask.

The agent and the diagnostics open serial ports exclusively (pyserial's
``exclusive=True``: ``flock(LOCK_EX | LOCK_NB)`` on the device), so a second
opener is refused at once; /proc/locks then names the holder's PID. No typer
or rich here: the running agent imports this module.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import termios
from pathlib import Path

__all__ = ["held_by", "lock_holder", "port_error", "process_name", "refused_parity"]


def lock_holder(path: str, proc: Path = Path("/proc")) -> int | None:
    """The pid holding ``path`` with an exclusive ``flock``, from /proc/locks;
    None when nobody does."""
    try:
        st = os.stat(path)
        locks = (proc / "locks").read_text().splitlines()
    except OSError:
        return None
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in locks:
        # "1: FLOCK  ADVISORY  WRITE 8550 00:1a:3 0 EOF" (a blocked waiter has "->")
        fields = line.split()
        if len(fields) >= 6 and "->" not in fields and fields[1] == "FLOCK" and fields[5] == key:
            with contextlib.suppress(ValueError):
                return int(fields[4])
    return None


def process_name(pid: int, proc: Path = Path("/proc"), *, command: bool = False) -> str:
    """A process's name as a person knows it: ``vitals`` for the agent however it
    was started (its script, ``python -m agent``), else the command name. With
    ``command``, a vitals process says which one: ``vitals run``, ``vitals sim rtu``."""
    try:
        comm = (proc / str(pid) / "comm").read_text().strip()
    except OSError:
        return "?"
    try:
        argv = [
            a.decode(errors="replace")
            for a in (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
        ]
    except OSError:
        argv = []
    words = [os.path.basename(a) for a in argv[:3]]
    # the console script, "python -m agent ...", or the agent itself: "vitals run"
    # replaces its process with "python -m agent.runner CONFIG ..." (same PID)
    if not (comm == "vitals" or "vitals" in words or "agent" in words or "agent.runner" in words):
        return comm
    if not command:
        return "vitals"
    if "agent.runner" in words:
        return "vitals run"
    at = next((i for i, w in enumerate(words) if w in ("vitals", "agent")), None)
    if at is None:
        return "vitals"
    sub = list(itertools.takewhile(lambda a: a and not a.startswith("-"), argv[at + 1 :]))[:2]
    return " ".join(["vitals", *sub])


def held_by(path: str) -> str:
    """``held by NAME (PID n)``, or ``held by another program`` when /proc does not say."""
    pid = lock_holder(path)
    if pid is None:
        return "held by another program"
    return f"held by {process_name(pid)} (PID {pid})"


# a port's errors, as one line an installer can act on (never a raw errno)
_PORT_ERRORS = {
    errno.ENOENT: "no such port (is the adapter plugged in? 'vitals diag ports' lists them)",
    errno.EACCES: "permission denied (the service user needs the dialout group)",
    errno.EPERM: "permission denied (the service user needs the dialout group)",
    errno.EIO: "I/O error (adapter unplugged, or the other end closed)",
    errno.ENXIO: "no such device (adapter unplugged?)",
    errno.ENODEV: "no such device (adapter unplugged?)",
    errno.ENOTTY: "not a serial port",
}


def port_error(port: str, parity: str, exc: BaseException) -> str:
    """Why ``port`` cannot be used, from what opening or using it raised."""
    code = getattr(exc, "errno", None)
    if code is None and isinstance(exc, termios.error) and exc.args:
        code = exc.args[0]
    text = str(exc)
    if code is None:  # pyserial wraps some: "Could not configure port: (25, '...')"
        for c in (errno.ENOTTY, errno.EINVAL, errno.EIO):
            if f"({c}," in text or f"[Errno {c}]" in text:
                code = c
    if code in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EBUSY) or "exclusively lock" in text:
        return f"port busy: {held_by(port)}"
    if code == errno.EINVAL and parity != "N":
        return refused_parity(parity)
    if isinstance(code, int) and code in _PORT_ERRORS:
        return _PORT_ERRORS[code]
    if isinstance(code, int):
        return os.strerror(code)
    return text or type(exc).__name__


def refused_parity(parity: str) -> str:
    return f"the port refused parity {parity} (pseudo terminals refuse parity bits: use parity N)"
