"""Opening a Modbus link for ``diag read`` / ``diag probe``, with errors a
technician understands.

The link itself is :class:`agent.fieldbus.links.ModbusLink` (the one the agent
polls with). Before handing a serial port to it we open the port once
ourselves (:func:`agent.cli.diag._serial.check_port`: exclusively, settings read
back), so that "no such port", "permission denied", "port busy: held by
vitals (PID n)" and "this port refuses parity E" come out as such. A TCP
device gets exactly one connection, the link's own, as from the agent: a
meter with one connection slot refuses a second.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from agent.cli.diag._common import FAILED, PORT, USAGE, DiagError, explain_os_error, port_busy
from agent.cli.diag._serial import LineSettings, check_port
from agent.fieldbus.links import LinkDown, ModbusLink, NoResponse
from protocols.errors import DecodeError, DeviceException

__all__ = [
    "LinkSettings",
    "check_endpoint",
    "check_line",
    "check_slave",
    "open_link",
    "transact_errors",
]


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
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"{host}:{self.tcp_port}"
        return f"{self.port} {self.baud} {self.bytesize}{self.parity}{self.stopbits}"


def check_endpoint(port: str | None, host: str | None) -> None:
    """One device to talk to: a serial port or a TCP host, not both."""
    if port and host:
        raise DiagError(
            f"--port {port} and --host {host}: which one?",
            "a serial device takes --port (e.g. /dev/ttyUSB0), a Modbus TCP one --host and --tcp-port",
            USAGE,
        )


def check_line(s: LinkSettings) -> None:
    """Line settings a serial port can take, and a timeout that can end; else exit 2."""
    if s.timeout_s <= 0:
        raise DiagError(
            f"--timeout {s.timeout_s:g}: more than 0 seconds", "e.g. --timeout 1", USAGE
        )
    if s.host:
        return
    if s.baud <= 0:
        raise DiagError(f"--baud {s.baud}: a baud rate is positive", "e.g. --baud 9600", USAGE)
    if s.parity not in ("N", "E", "O"):
        raise DiagError(f"--parity {s.parity}: expected N, E or O", "emulated buses run N", USAGE)
    if s.stopbits not in (1, 2):
        raise DiagError(f"--stopbits {s.stopbits}: 1 or 2", "", USAGE)


def check_slave(slave: int, *, tcp: bool) -> None:
    """An address a device can have: 1..247 on a serial bus, a unit id 0..255 over TCP."""
    lo, hi = (0, 255) if tcp else (1, 247)
    if not lo <= slave <= hi:
        where = "a Modbus TCP unit id is" if tcp else "a slave address on a serial bus is"
        raise DiagError(
            f"--slave {slave}: {where} {lo}..{hi}",
            "find the addresses on the bus with 'vitals diag scan'",
            USAGE,
        )


async def open_link(s: LinkSettings) -> ModbusLink:
    """The link, connected: one TCP connection (a device with one connection slot
    refuses a second), a serial port opened exclusively."""
    if s.host:
        link = ModbusLink.tcp(s.host, s.tcp_port, timeout_s=s.timeout_s, rtu_framing=s.rtu_over_tcp)
    elif s.port:
        check_port(s.port, LineSettings(s.baud, s.parity, s.stopbits))
        link = ModbusLink.serial(
            s.port,
            baud=s.baud,
            parity=s.parity,
            stopbits=s.stopbits,
            bytesize=s.bytesize,
            timeout_s=s.timeout_s,
        )
    else:
        raise DiagError("no device to talk to", "pass --port P, --host H or --device NAME", USAGE)
    try:
        await link.connect()
    except LinkDown as exc:
        raise _link_down(s, exc.__cause__) from None
    return link


def _link_down(s: LinkSettings, cause: BaseException | None) -> DiagError:
    where = s.describe
    if isinstance(cause, socket.gaierror):
        return DiagError(f"{s.host}: unknown host", "check the name or use the IP address", PORT)
    if isinstance(cause, TimeoutError):
        return DiagError(
            f"{where}: no connection within {s.timeout_s:g} s",
            "check the IP address, the cabling and that the device is powered",
            PORT,
        )
    if isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED:
        return DiagError(
            f"{where}: connection refused",
            "check the host and --tcp-port (Modbus TCP is 502); a device that takes one "
            "connection refuses a second: is the agent or another master connected?",
            PORT,
        )
    if isinstance(cause, OSError) and cause.errno is not None:
        return explain_os_error(where, cause)
    if s.port and not s.host and cause is not None and "exclusively lock" in str(cause):
        return port_busy(s.port)
    return DiagError(
        f"{where}: cannot connect" + (f" ({cause})" if cause else ""),
        "check the address and that the device or converter is powered",
        PORT,
    )


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
