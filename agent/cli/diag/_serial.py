"""Serial ports for the diagnostics: opened exclusively, with errors a
technician understands, and a raw RTU master for ``diag scan``.

:func:`open_port` is the one place a diag command opens a serial port. It
opens it exclusively (pyserial's ``exclusive=True``: ``flock(LOCK_EX |
LOCK_NB)`` on the descriptor, the same lock the agent takes), so a port the
agent or another program holds is refused at once with who holds it, before
a single line setting is changed or a byte is sent. It reads the settings
back: pseudo terminals refuse parity, depending on the kernel with EINVAL or
by quietly dropping ``PARENB``; both are :class:`SettingRefused`.

``diag scan`` needs what a poller does not: exact, short response timeouts
computed from the baud rate, switching line settings many times. So it talks
RTU itself (:mod:`protocols.modbus.rtu` builds the frames and parses the replies)
on a port from :func:`open_port`, read with ``add_reader``
(:class:`RawSerialPort`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import termios
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.cli.diag._common import PORT, DiagError, explain_os_error, port_busy
from protocols.errors import DeviceException, FrameError, LocalError
from protocols.modbus.pdu import Response
from protocols.modbus.rtu import ResponseParser, frame_time, t35

if TYPE_CHECKING:
    import serial

__all__ = [
    "LateAnswer",
    "LineSettings",
    "RawSerialPort",
    "SettingRefused",
    "check_port",
    "open_port",
    "parity_refused",
]


@dataclass(frozen=True, slots=True, order=True)
class LineSettings:
    baud: int
    parity: str  # N E O
    stopbits: int = 1

    def __str__(self) -> str:
        return f"{self.baud} 8{self.parity}{self.stopbits}"


class SettingRefused(LocalError):
    """The port cannot take these line settings (a pty and parity)."""


def parity_refused(port: str, parity: str) -> DiagError:
    return DiagError(
        f"{port}: this port refuses parity {parity}",
        "emulated buses (vitals sim rtu, a pseudo terminal) run 8N1: use --parity N",
        PORT,
    )


def _errno_of(exc: BaseException) -> int | None:
    """The errno behind a pyserial or termios error (they hide it differently)."""
    e = getattr(exc, "errno", None)
    if isinstance(e, int):
        return e
    if exc.args and isinstance(exc.args[0], int):
        return int(exc.args[0])
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc:
        return _errno_of(cause)
    return None


def open_port(path: str, settings: LineSettings, *, bytesize: int = 8) -> serial.Serial:
    """``path`` opened exclusively with ``settings`` (non-blocking).

    Raises :class:`SettingRefused` when the port cannot take the settings, and
    a :class:`DiagError` (exit 3) when it cannot be used at all: missing, no
    permission, held by another process (named), not a serial port.
    """
    import serial

    if os.path.isdir(path):
        raise DiagError(f"{path}: not a serial port (a directory)", _PORTS_HINT, PORT)
    try:
        s = serial.Serial(
            path,
            baudrate=settings.baud,
            parity=settings.parity,
            stopbits=settings.stopbits,
            bytesize=bytesize,
            timeout=0,
            exclusive=True,
        )
    except (OSError, termios.error, serial.SerialException, ValueError) as exc:
        code = _errno_of(exc)
        if "exclusively lock" in str(exc) or code in (errno.EWOULDBLOCK, errno.EBUSY):
            raise port_busy(path) from None
        if code == errno.ENOTTY:
            raise DiagError(f"{path}: not a serial port", _PORTS_HINT, PORT) from None
        if code == errno.EINVAL:
            raise SettingRefused(f"the port refuses parity {settings.parity} (EINVAL)") from None
        if isinstance(exc, ValueError):  # pyserial: a baud or parity it does not know
            raise DiagError(f"{path}: {exc}", "", 2) from None
        if code is not None:
            raise explain_os_error(path, OSError(code, os.strerror(code))) from None
        raise DiagError(f"{path}: cannot open ({exc})", _PORTS_HINT, PORT) from None
    cflag = termios.tcgetattr(s.fd)[2]
    want_parenb = settings.parity != "N"
    got_parenb = bool(cflag & termios.PARENB)
    got_odd = bool(cflag & termios.PARODD)
    if got_parenb != want_parenb or (want_parenb and got_odd != (settings.parity == "O")):
        s.close()
        raise SettingRefused(f"the port drops parity {settings.parity} (a pseudo terminal?)")
    return s


_PORTS_HINT = "list the serial ports with 'vitals diag ports'"


def check_port(path: str, settings: LineSettings) -> None:
    """Open and close ``path`` with ``settings``; a DiagError saying why it cannot."""
    try:
        s = open_port(path, settings)
    except SettingRefused:
        raise parity_refused(path, settings.parity) from None
    s.close()


@dataclass(frozen=True, slots=True)
class LateAnswer:
    """A slave that answered after the attempt's timeout (``ms`` after its request)."""

    slave: int
    ms: float
    exception: int | None = None


class RawSerialPort:
    """One serial port, reopened for every line setting.

    Between two requests the line is quiet for t3.5, counted from the last
    byte heard *or* from the end of the last attempt, whichever is later: a
    request is never sent right at another's timeout, when a slow slave's
    reply may be starting. Bytes heard in that silence restart it and are
    discarded; when they make the answer to the request that timed out, it is
    kept in :attr:`late_answers` (the slave is there, only slow).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.settings: LineSettings | None = None
        self.late_answers: list[LateAnswer] = []
        self._serial: serial.Serial | None = None
        self._fd = -1
        self._quiet_from = 0.0  # the line is known quiet since (last byte, or a timeout)
        # the request that timed out last: its reply may still come
        self._late: tuple[ResponseParser, float, bytearray] | None = None

    def configure(self, settings: LineSettings) -> None:
        """(Re)open the port with ``settings``; SettingRefused / DiagError if it cannot."""
        self.close()
        s = open_port(self.path, settings)
        self._serial = s
        self._fd = s.fd
        self.settings = settings
        self._quiet_from = time.monotonic()

    async def transact(
        self, frame: bytes, parser: ResponseParser, timeout_s: float
    ) -> Response | None:
        """Send ``frame`` after t3.5 of silence; the reply, or None after ``timeout_s``
        of silence. Raises FrameError (garbage, another slave) or DeviceException."""
        assert self.settings is not None and self._fd >= 0
        loop = asyncio.get_running_loop()
        gap = t35(self.settings.baud)
        await self._quiet(gap)
        os.write(self._fd, frame)
        sent = time.monotonic()
        queue: asyncio.Queue[bytes] = asyncio.Queue()

        def readable() -> None:
            try:
                data = os.read(self._fd, 512)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            queue.put_nowait(data)

        loop.add_reader(self._fd, readable)
        deadline = sent + timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    async with asyncio.timeout(left):
                        data = await queue.get()
                except TimeoutError:
                    break
                if not data:
                    break
                self._quiet_from = time.monotonic()
                # a reply that started keeps its frame: allow t3.5 plus scheduling slack
                deadline = max(deadline, self._quiet_from + gap + 0.02)
                # the late reply of the last request may come first: it is not ours
                data = self._hear_late(data)
                if not data:
                    continue
                resp = parser.feed(data)
                if resp is not None:
                    self._late = None
                    return resp
        except (FrameError, DeviceException):
            self._quiet_from = time.monotonic()
            raise
        finally:
            loop.remove_reader(self._fd)
        # a timeout: the silence before the next request counts from now, and a
        # reply that comes after it is this request's, late
        self._quiet_from = max(self._quiet_from, time.monotonic())
        self._late = (ResponseParser(parser.request), sent, bytearray())
        return None

    async def _quiet(self, gap: float) -> None:
        """Wait until the line has been silent for ``gap``; what is heard meanwhile
        is discarded (or kept as a late answer). Bounded by one longest frame."""
        limit = (
            time.monotonic() + gap + frame_time(256, self.settings.baud if self.settings else 9600)
        )
        while True:
            self._drain()
            wait = self._quiet_from + gap - time.monotonic()
            if wait <= 0 or time.monotonic() >= limit:
                return
            await asyncio.sleep(wait)

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 512)
            except OSError:
                return
            if not data:
                return
            self._quiet_from = time.monotonic()
            self._hear_late(data)  # heard before the request: discarded either way

    def _hear_late(self, data: bytes) -> bytes:
        """Feed ``data`` to the parser of the request that timed out last, while it
        takes it; return what is left for the current request."""
        if self._late is None:
            return data
        parser, sent, held = self._late
        held += data
        if held[0] != parser.request.slave:  # not the late reply: give every byte back
            self._late = None
            return bytes(held)
        ms = (time.monotonic() - sent) * 1000
        try:
            resp = parser.feed(data)
        except DeviceException as exc:
            self.late_answers.append(LateAnswer(parser.request.slave, ms, exc.code))
            self._late = None
            return parser.trailing
        except FrameError:  # it looked like one, but is not: every byte back
            self._late = None
            return bytes(held)
        if resp is None:
            return b""
        self.late_answers.append(LateAnswer(parser.request.slave, ms))
        self._late = None
        return parser.trailing

    def close(self) -> None:
        s, self._serial = self._serial, None
        self._fd = -1
        self._late = None
        if s is not None:
            with contextlib.suppress(OSError):
                s.close()
