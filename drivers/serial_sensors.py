"""Serial sensors that do not speak Modbus: bind a sans-IO framer to a byte stream.

The transport is injected: :class:`SerialSensor` takes any ``reader`` with
``async read(n) -> bytes`` (``b""`` at end of stream), so tests hand it a pipe or a
pty, and the gateway hands it :func:`open_serial`, which opens a real port in raw
mode (pyserial sets the termios flags) and reads it on the event loop without a
thread::

    port = open_serial("/dev/ttyAMA0", baudrate=9600)
    sensor = SerialSensor(reader=port, parser=pms5003.Parser(), frame_timeout=5.0)
    async for frame in sensor.frames():
        readings = pms5003.to_readings(frame, now_ms(), point_ids)
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import termios
from collections.abc import AsyncIterator, Callable
from typing import Generic, Protocol, TypeVar

import serial

from protocols.errors import LocalError, RemoteError

__all__ = [
    "ByteReader",
    "ByteWriter",
    "FdStream",
    "FrameParser",
    "LinkError",
    "SensorSilent",
    "SerialSensor",
    "StreamClosed",
    "open_serial",
]

log = logging.getLogger(__name__)

F = TypeVar("F")


class ByteReader(Protocol):
    async def read(self, n: int) -> bytes: ...


class ByteWriter(Protocol):
    async def write(self, data: bytes) -> None: ...


class FrameParser(Protocol[F]):
    """What the protocols framers offer (``pms5003.Parser``, ``sds011.Parser``, ``nmea.Parser``)."""

    def feed(self, data: bytes) -> list[F]: ...

    def statistics(self) -> dict[str, int]: ...


class SensorSilent(RemoteError):
    """No complete frame arrived within ``timeout`` seconds.

    ``bytes_received`` tells a mute sensor (0: unpowered, unplugged, TX/RX swapped,
    asleep) from one that talks garbage (wrong baud rate, wrong sensor type).
    """

    def __init__(self, name: str, timeout: float, bytes_received: int) -> None:
        self.name = name
        self.timeout = timeout
        self.bytes_received = bytes_received
        what = "no bytes" if not bytes_received else f"{bytes_received} bytes but no valid frame"
        super().__init__(f"{name}: {what} in {timeout:g} s")


class LinkError(RemoteError):
    """The serial link failed: the port cannot be opened, a read failed, the stream ended
    (a USB adapter unplugged, a pty closed)."""


class StreamClosed(LocalError):
    """The stream was closed here (:meth:`FdStream.close`): a read or write after that,
    or one waiting when it happened, is ours to stop, not a broken link."""


class SerialSensor(Generic[F]):
    """A sensor that sends frames on its own (or on :meth:`send` of a command)."""

    def __init__(
        self,
        *,
        reader: ByteReader,
        parser: FrameParser[F],
        frame_timeout: float = 5.0,
        writer: ByteWriter | None = None,
        name: str = "serial",
        read_size: int = 256,
    ) -> None:
        if frame_timeout <= 0 or read_size <= 0:
            raise LocalError("frame_timeout and read_size must be positive")
        self._reader = reader
        self._writer = writer
        self._parser = parser
        self.frame_timeout = frame_timeout
        self.name = name
        self._read_size = read_size
        self._bytes_read = 0
        self._timeouts = 0

    async def send(self, command: bytes) -> None:
        """Write a command frame (``sds011.query_command()``, ``pms5003.encode_command``...)."""
        if self._writer is None:
            raise LocalError(f"{self.name}: no writer given, cannot send commands")
        await self._writer.write(command)

    async def frames(self) -> AsyncIterator[F]:
        """Every frame, in order; raise SensorSilent when none completes in time.

        The timeout runs per frame: garbage does not reset it, a complete frame does.
        """
        pending: collections.deque[F] = collections.deque()
        while True:
            while pending:
                yield pending.popleft()
            received = 0
            try:
                async with asyncio.timeout(self.frame_timeout):
                    while not pending:
                        data = await self._read()
                        received += len(data)
                        pending.extend(self._parser.feed(data))
            except TimeoutError as exc:
                self._timeouts += 1
                raise SensorSilent(self.name, self.frame_timeout, received) from exc

    async def _read(self) -> bytes:
        try:
            data = await self._reader.read(self._read_size)
        except OSError as exc:
            raise LinkError(f"{self.name}: read failed: {exc}") from exc
        if not data:
            raise LinkError(f"{self.name}: end of stream")
        self._bytes_read += len(data)
        return data

    def statistics(self) -> dict[str, int]:
        """The parser's counters plus ``bytes_read`` and ``timeouts``."""
        return {
            **self._parser.statistics(),
            "bytes_read": self._bytes_read,
            "timeouts": self._timeouts,
        }


class FdStream:
    """``async read``/``write`` on a non-blocking file descriptor (tty, pty, pipe).

    Uses the event loop's reader/writer callbacks: no thread, no polling. EIO (what a
    pty returns once its other end is gone) reads as end of stream; a read or write on
    a stream closed here raises :class:`StreamClosed`.
    """

    def __init__(self, fd: int, *, close: Callable[[], None] | None = None) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self._close = close if close is not None else (lambda: os.close(fd))
        self._closed = False
        self._waiting: asyncio.Future[None] | None = None

    def _check_open(self) -> None:
        if self._closed:
            raise StreamClosed(f"fd {self.fd} was closed here")

    async def read(self, n: int) -> bytes:
        while True:
            self._check_open()
            try:
                return os.read(self.fd, n)
            except BlockingIOError:
                await self._wait(writable=False)
            except OSError as exc:
                if exc.errno == errno.EIO:
                    return b""
                raise

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            self._check_open()
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                await self._wait(writable=True)

    async def _wait(self, *, writable: bool) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        if writable:
            loop.add_writer(self.fd, wake)
        else:
            loop.add_reader(self.fd, wake)
        self._waiting = ready
        try:
            await ready
        finally:
            self._waiting = None
            if not self._closed:  # close() took the callbacks off before the fd went
                if writable:
                    loop.remove_writer(self.fd)
                else:
                    loop.remove_reader(self.fd)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            waiting = self._waiting
            if waiting is not None and not waiting.done():
                loop = waiting.get_loop()
                loop.remove_reader(self.fd)
                loop.remove_writer(self.fd)
                waiting.set_exception(StreamClosed(f"fd {self.fd} was closed here"))
            self._close()


def empty_read_is_hang_up(fd: int) -> None:
    """Set VMIN = 1, VTIME = 0 on the tty ``fd`` (non-blocking, as pyserial leaves it).

    pyserial leaves VMIN = VTIME = 0, with which read() on a tty returns b"" when no
    byte is waiting: the same as after a hang-up (an adapter pulled out), and what a
    read callback gets whose bytes another reader took first. With VMIN = 1 "nothing
    yet" is EAGAIN, so b"" means only the end of the stream. Raises termios.error."""
    attrs = termios.tcgetattr(fd)
    attrs[6][termios.VMIN] = 1
    attrs[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def open_serial(
    port: str,
    *,
    baudrate: int = 9600,
    parity: str = serial.PARITY_NONE,
    stopbits: float = serial.STOPBITS_ONE,
) -> FdStream:
    """Open ``port`` raw, 8 data bits (9600 8N1 by default), as an :class:`FdStream`.

    pyserial puts the tty in raw mode (no echo, no line discipline, no CR/LF
    translation). Ptys refuse parity (see DESIGN.md): keep ``PARITY_NONE`` there.
    """
    try:
        link = serial.Serial(
            port,
            baudrate=baudrate,
            bytesize=serial.EIGHTBITS,
            parity=parity,
            stopbits=stopbits,
            timeout=0,
            exclusive=True,
        )
    except (serial.SerialException, ValueError, OSError, termios.error) as exc:
        # termios.error: a port that refuses the settings (a pty asked for parity)
        raise LinkError(f"cannot open {port} at {baudrate} baud: {exc}") from exc
    fd = link.fileno()
    try:
        empty_read_is_hang_up(fd)
    except termios.error as exc:
        link.close()
        raise LinkError(f"cannot set {port} to raw reads: {exc}") from exc
    log.debug("opened %s at %d baud", port, baudrate)
    return FdStream(fd, close=link.close)
