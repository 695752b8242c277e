"""Pseudo-terminal plumbing shared by the emulated serial buses.

An emulated device holds the *master* end of a pty; the code under test (our
agent, pymodbus, pyserial, mbpoll) opens the *slave* end by its path, like
``/dev/ttyUSB0``. The creator also keeps its own descriptor of the slave end
open for the pty's whole life: without it, the master reads EIO / polls POLLHUP
every time the last client closes the port between two connections.

Both ends are put in raw mode, 8N1: pseudo terminals refuse parity (``tcsetattr``
with ``PARENB`` fails with EINVAL), so emulated buses run with parity none.
A pty delivers bytes as fast as they are written; :func:`paced_write` spreads
them at the line rate for emulators that care about wire timing.

A pty also carries the line settings its user asked for, though it ignores
them: ``tcgetattr`` on either end returns what the master of the bus set on
the slave end (Linux keeps one termios per pty pair, shown on both ends).
:func:`line_baud` reads the baud from there, so an emulator can behave as a
real line does when the two sides disagree. Only the baud can disagree: a pty
refuses parity (EINVAL), and data bits other than 8 (CS7: EINVAL) too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import sys
import termios
import time
import tty
from dataclasses import dataclass, field

from protocols.modbus.rtu import frame_time

__all__ = ["PtyPair", "line_baud", "open_pty", "paced_write"]

# termios speed codes (B9600...) -> bits per second
_SPEEDS: dict[int, int] = {
    getattr(termios, name): int(name[1:])
    for name in dir(termios)
    if name[:1] == "B" and name[1:].isdigit() and int(name[1:]) > 0
}
_BOTHER = 0o010000  # Linux: the speed is in termios2's c_ospeed (pyserial's custom bauds)
# TCGETS2 = _IOR('T', 0x2A, struct termios2): 4 flags, c_line, 19 c_cc, ispeed, ospeed
_TERMIOS2 = struct.Struct("=4IB19s2I")
_TCGETS2 = 0x802C542A if sys.platform == "linux" else None


@dataclass(slots=True)
class PtyPair:
    """An open pty: ``master`` (the device's side), ``slave_fd`` (held open by
    us) and ``path`` (what a master of the bus opens)."""

    master: int
    slave_fd: int
    path: str
    closed: bool = field(default=False)

    def close(self) -> None:
        """Close both descriptors we hold; idempotent."""
        if self.closed:
            return
        self.closed = True
        for fd in (self.master, self.slave_fd):
            with contextlib.suppress(OSError):  # already closed: fine
                os.close(fd)

    def __enter__(self) -> PtyPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_pty() -> PtyPair:
    """A new pty in raw mode, 8N1, no echo, descriptors not inheritable."""
    master, slave = os.openpty()
    try:
        for fd in (master, slave):
            tty.setraw(fd)
        attrs = termios.tcgetattr(slave)
        attrs[2] = (attrs[2] & ~(termios.PARENB | termios.CSTOPB | termios.CSIZE)) | (
            termios.CS8 | termios.CLOCAL | termios.CREAD
        )
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        path = os.ttyname(slave)
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    return PtyPair(master=master, slave_fd=slave, path=path)


def line_baud(fd: int) -> int | None:
    """The baud the user of the pty set (``fd``: either end), or None if unknown."""
    try:
        attrs = termios.tcgetattr(fd)
    except termios.error:
        return None
    ospeed = attrs[5]
    if ospeed in _SPEEDS:
        return _SPEEDS[ospeed]
    if ospeed == _BOTHER and _TCGETS2 is not None:
        try:
            raw = fcntl.ioctl(fd, _TCGETS2, bytes(_TERMIOS2.size))
        except OSError:
            return None
        return int(_TERMIOS2.unpack(raw)[-1])
    return None


def paced_write(fd: int, data: bytes, baud: int, *, bits_per_char: int = 10) -> None:
    """Write ``data`` to ``fd`` one character time at a time, as a UART would.

    Blocking: for emulators running in their own thread or process. The delay
    is computed from the start, so scheduling jitter does not accumulate.
    """
    start = time.monotonic()
    for i in range(len(data)):
        due = start + frame_time(i, baud, bits_per_char)
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        os.write(fd, data[i : i + 1])
