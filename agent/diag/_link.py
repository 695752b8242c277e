"""Opening a Modbus link for ``diag read`` / ``diag probe``, with errors a
technician understands.

The link itself is :class:`agent.transport.ModbusLink` (the one the agent
polls with); before handing a serial port to it we open the port once
ourselves, so that "no such port", "permission denied" and "busy" come out
with their errno instead of pymodbus' generic "cannot connect".
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from agent.diag._common import FAILED, PORT, DiagError, explain_os_error
from agent.transport import LinkDown, ModbusLink, NoResponse
from protocols.errors import DecodeError, DeviceException

__all__ = ["LinkSettings", "check_serial_port", "open_link", "transact_errors"]


@dataclass(frozen=True, slots=True)
class LinkSettings:
    port: str | None = None
    host: str | None = None
    tcp_port: int = 502
    baud: int = 9600
    parity: str = "E"
    stopbits: int = 1
    bytesize: int = 8
    timeout_s: float = 1.0
    rtu_over_tcp: bool = False

    @property
    def describe(self) -> str:
        if self.host:
            return f"{self.host}:{self.tcp_port}"
        return f"{self.port} {self.baud} {self.bytesize}{self.parity}{self.stopbits}"


def check_serial_port(port: str, *, baud: int, parity: str, stopbits: int) -> None:
    """Open and close ``port`` with these settings; raise a DiagError saying why not."""
    import serial

    try:
        s = serial.Serial(
            port, baudrate=baud, parity=parity, stopbits=stopbits, timeout=0, exclusive=True
        )
    except (OSError, serial.SerialException) as exc:
        err = _errno_of(exc)
        if err == errno.EINVAL and parity != "N":
            raise DiagError(
                f"{port}: the port refuses parity {parity} (a pseudo terminal cannot do parity)",
                "use --parity N",
                PORT,
            ) from None
        if err in (errno.EWOULDBLOCK, errno.EBUSY):
            raise explain_os_error(port, OSError(errno.EBUSY, "busy")) from None
        raise explain_os_error(port, OSError(err, str(exc)) if err else exc) from None
    except Exception as exc:  # termios.error is not an OSError
        err = _errno_of(exc)
        if err == errno.EINVAL:
            raise DiagError(
                f"{port}: the port refuses {baud} {parity} {stopbits} (a pseudo terminal cannot do parity)",
                "use --parity N",
                PORT,
            ) from None
        raise DiagError(f"{port}: {exc}", "", PORT) from None
    s.close()


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
    text = str(exc)
    for code in (errno.ENOENT, errno.EACCES, errno.EBUSY, errno.EINVAL):
        if f"[Errno {code}]" in text:
            return code
    return None


async def open_link(s: LinkSettings) -> ModbusLink:
    if s.host:
        await _check_tcp(s.host, s.tcp_port, s.timeout_s)
        link = ModbusLink.tcp(s.host, s.tcp_port, timeout_s=s.timeout_s, rtu_framing=s.rtu_over_tcp)
    elif s.port:
        check_serial_port(s.port, baud=s.baud, parity=s.parity, stopbits=s.stopbits)
        link = ModbusLink.serial(
            s.port,
            baud=s.baud,
            parity=s.parity,
            stopbits=s.stopbits,
            bytesize=s.bytesize,
            timeout_s=s.timeout_s,
        )
    else:
        raise DiagError("no device to talk to", "pass --port P, --host H or --device NAME", 2)
    try:
        await link.connect()
    except LinkDown as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError):
            raise explain_os_error(s.describe, cause) from None
        raise DiagError(
            f"{s.describe}: cannot connect",
            "check the address and that the device or converter is powered",
            PORT,
        ) from None
    return link


async def _check_tcp(host: str, port: int, timeout_s: float) -> None:
    """Connect once ourselves so a refused or unreachable endpoint says why."""
    where = f"{host}:{port}"
    try:
        async with asyncio.timeout(max(timeout_s, 1.0)):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        raise DiagError(
            f"{where}: no connection within {max(timeout_s, 1.0):g} s",
            "check the IP address, the cabling and that the device is powered",
            PORT,
        ) from None
    except OSError as exc:
        if isinstance(exc, socket.gaierror):
            raise DiagError(
                f"{host}: unknown host", "check the name or use the IP address", PORT
            ) from None
        raise explain_os_error(where, exc) from None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


@contextlib.contextmanager
def transact_errors(where: str, slave: int) -> Iterator[None]:
    """Map link errors of one transaction to DiagErrors."""
    try:
        yield
    except NoResponse:
        raise DiagError(
            f"{where}: slave {slave} did not answer",
            "check the slave address, baud and parity (find them with 'vitals diag scan'), "
            "and the A/B wiring",
            FAILED,
        ) from None
    except LinkDown as exc:
        raise DiagError(f"{where}: link lost ({exc})", "check the cable or adapter", PORT) from None
    except DeviceException as exc:
        raise DiagError(
            f"{where}: slave {slave} {exc}",
            "it is there but refuses this request: check the address and the register space",
            FAILED,
        ) from None
    except DecodeError as exc:
        raise DiagError(f"{where}: {exc}", "", FAILED) from None
