"""One small interface to a Modbus link, over pymodbus, raising our own errors.

pymodbus returns errors as values (``.isError()``), mixes client kinds with
mode flags and retries on its own; this module hides all of that behind
:class:`ModbusLink`: ``connect``, ``read``, ``write``, ``close``, each raising
:class:`NoResponse` (the device was silent), :class:`LinkDown` (the port or
connection is gone) or :class:`protocols.errors.DeviceException` (the device
answered with an exception code). Retries are the scheduler's business, so
pymodbus is told never to retry or reconnect by itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType

from protocols.errors import DeviceException, RemoteError
from protocols.modbus import Space

__all__ = ["LinkDown", "ModbusLink", "NoResponse", "TransportError"]

log = logging.getLogger(__name__)

# pymodbus attaches its own handlers to its loggers; keep them quiet unless asked
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


class TransportError(RemoteError):
    """The link to a device failed."""


class NoResponse(TransportError):
    """The device did not answer within the response timeout."""


class LinkDown(TransportError):
    """The serial port or TCP connection is not usable."""


class ModbusLink:
    """A Modbus master on one bus: TCP, RTU over a serial port, or RTU over TCP."""

    def __init__(self, client: Any, describe: str) -> None:
        self._client = client
        self.describe = describe

    @classmethod
    def tcp(
        cls, host: str, port: int, *, timeout_s: float, rtu_framing: bool = False
    ) -> ModbusLink:
        client = AsyncModbusTcpClient(
            host,
            port=port,
            framer=FramerType.RTU if rtu_framing else FramerType.SOCKET,
            timeout=timeout_s,
            retries=0,
            reconnect_delay=0,
        )
        kind = "rtu-over-tcp" if rtu_framing else "tcp"
        return cls(client, f"{kind}://{host}:{port}")

    @classmethod
    def serial(
        cls,
        port: str,
        *,
        baud: int,
        parity: str,
        stopbits: int,
        bytesize: int,
        timeout_s: float,
    ) -> ModbusLink:
        client = AsyncModbusSerialClient(
            port,
            framer=FramerType.RTU,
            baudrate=baud,
            parity=parity,
            stopbits=stopbits,
            bytesize=bytesize,
            timeout=timeout_s,
            retries=0,
            reconnect_delay=0,
        )
        return cls(client, f"rtu://{port}@{baud}{parity}{stopbits}")

    @property
    def connected(self) -> bool:
        return bool(self._client.connected)

    async def connect(self) -> None:
        try:
            ok = await self._client.connect()
        except (OSError, ModbusException) as exc:
            raise LinkDown(f"{self.describe}: cannot connect ({exc})") from exc
        if not ok:
            raise LinkDown(f"{self.describe}: cannot connect")

    async def read(
        self, space: Space, address: int, count: int, slave: int
    ) -> Sequence[int] | Sequence[bool]:
        c = self._client
        fn = {
            Space.HOLDING: c.read_holding_registers,
            Space.INPUT: c.read_input_registers,
            Space.COIL: c.read_coils,
            Space.DISCRETE: c.read_discrete_inputs,
        }[space]
        rr = await self._call(fn, address, count=count, device_id=slave)
        if rr.isError():
            raise DeviceException(int(getattr(rr, "exception_code", 4)), space.read_function)
        if space.is_bits:
            return list(rr.bits)
        return list(rr.registers)

    async def write(
        self, function: int, address: int, payload: list[int] | bool, slave: int
    ) -> None:
        c = self._client
        if function == 5:
            rr = await self._call(c.write_coil, address, bool(payload), device_id=slave)
        elif function == 15:
            assert isinstance(payload, list)
            rr = await self._call(
                c.write_coils, address, [bool(b) for b in payload], device_id=slave
            )
        elif function == 6:
            assert isinstance(payload, list)
            rr = await self._call(c.write_register, address, payload[0], device_id=slave)
        elif function == 16:
            assert isinstance(payload, list)
            rr = await self._call(c.write_registers, address, payload, device_id=slave)
        else:
            raise ValueError(f"not a write function: {function}")
        if rr.isError():
            raise DeviceException(int(getattr(rr, "exception_code", 4)), function)

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if not self._client.connected:
            await self.connect()
        try:
            return await fn(*args, **kwargs)
        except ModbusIOException as exc:
            raise NoResponse(
                f"{self.describe}: no response from slave {kwargs.get('device_id')}"
            ) from exc
        except (ConnectionException, OSError) as exc:
            self.close()
            raise LinkDown(f"{self.describe}: link lost ({exc})") from exc

    def close(self) -> None:
        self._client.close()
