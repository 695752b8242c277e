"""A raw serial port driven from the event loop, for ``diag scan``.

``diag scan`` needs what a poller does not: exact, short response timeouts
computed from the baud rate, switching line settings many times, and an
answer to "does this port take this parity at all?". So it talks RTU itself
(:mod:`protocols.rtu` builds the frames and parses the replies) on a port
opened with pyserial in non-blocking mode and read with ``add_reader``.

Pseudo terminals refuse parity. Depending on the kernel ``tcsetattr`` fails
with EINVAL or quietly drops ``PARENB``; :meth:`RawSerialPort.configure`
reads the settings back and raises :class:`SettingRefused` in both cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import termios
import time
from dataclasses import dataclass

from agent.diag._common import PORT, DiagError, explain_os_error
from protocols.errors import DeviceException, FrameError
from protocols.rtu import Response, ResponseParser, t35

__all__ = ["LineSettings", "RawSerialPort", "SettingRefused"]


@dataclass(frozen=True, slots=True, order=True)
class LineSettings:
    baud: int
    parity: str  # N E O
    stopbits: int = 1

    def __str__(self) -> str:
        return f"{self.baud} 8{self.parity}{self.stopbits}"


class SettingRefused(Exception):
    """The port cannot take these line settings (a pty and parity)."""


class RawSerialPort:
    """One serial port, reopened for every line setting."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.settings: LineSettings | None = None
        self._serial: object | None = None
        self._fd = -1
        self._last_byte = 0.0

    def configure(self, settings: LineSettings) -> None:
        """(Re)open the port with ``settings``; SettingRefused / DiagError if it cannot."""
        import serial

        self.close()
        try:
            s = serial.Serial(
                self.path,
                baudrate=settings.baud,
                parity=settings.parity,
                stopbits=settings.stopbits,
                bytesize=8,
                timeout=0,
                exclusive=True,
            )
        except serial.SerialException as exc:
            code = exc.errno if isinstance(exc.errno, int) else None
            if code == errno.EINVAL:
                raise SettingRefused(f"the port refuses {settings} (EINVAL)") from None
            if code == errno.EAGAIN:
                raise explain_os_error(self.path, OSError(errno.EBUSY, "busy")) from None
            if code is not None:
                raise explain_os_error(self.path, OSError(code, str(exc))) from None
            raise DiagError(f"{self.path}: {exc}", "", PORT) from None
        except termios.error as exc:
            if exc.args and exc.args[0] == errno.EINVAL:
                raise SettingRefused(f"the port refuses {settings} (EINVAL)") from None
            raise DiagError(f"{self.path}: {exc}", "", PORT) from None
        except OSError as exc:
            raise explain_os_error(self.path, exc) from None
        cflag = termios.tcgetattr(s.fd)[2]
        want_parenb = settings.parity != "N"
        got_parenb = bool(cflag & termios.PARENB)
        got_odd = bool(cflag & termios.PARODD)
        if got_parenb != want_parenb or (want_parenb and got_odd != (settings.parity == "O")):
            s.close()
            raise SettingRefused(f"the port drops parity {settings.parity} (a pseudo terminal?)")
        self._serial = s
        self._fd = s.fd
        self.settings = settings

    async def transact(
        self, frame: bytes, parser: ResponseParser, timeout_s: float
    ) -> Response | None:
        """Send ``frame`` after t3.5 of silence; the reply, or None after ``timeout_s``
        of silence. Raises FrameError (garbage, another slave) or DeviceException."""
        assert self.settings is not None and self._fd >= 0
        loop = asyncio.get_running_loop()
        gap = t35(self.settings.baud)
        self._drain()
        wait = self._last_byte + gap - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
            self._drain()
        import os

        os.write(self._fd, frame)
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
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                try:
                    async with asyncio.timeout(left):
                        data = await queue.get()
                except TimeoutError:
                    return None
                if not data:
                    return None
                self._last_byte = time.monotonic()
                # a reply that started keeps its frame: allow t3.5 plus scheduling slack
                deadline = max(deadline, self._last_byte + gap + 0.02)
                resp = parser.feed(data)
                if resp is not None:
                    return resp
        except (FrameError, DeviceException):
            self._last_byte = time.monotonic()
            raise
        finally:
            loop.remove_reader(self._fd)

    def _drain(self) -> None:
        import os

        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._fd, 512):
                self._last_byte = time.monotonic()

    def close(self) -> None:
        s, self._serial = self._serial, None
        self._fd = -1
        if s is not None:
            s.close()  # type: ignore[attr-defined]
