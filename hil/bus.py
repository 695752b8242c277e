"""The master's side of the HIL bench: pyserial plus protocols.modbus.rtu."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import serial

from protocols.errors import ProtocolError
from protocols.modbus.pdu import Request, Response
from protocols.modbus.rtu import ResponseParser, encode_request, frame_time, t35

__all__ = ["Bus", "Target"]


@dataclass
class Bus:
    """The master's side of the line: pyserial plus protocols.modbus.rtu, one
    transaction at a time, with t3.5 of silence before each request."""

    ser: serial.Serial
    baud: int
    slave: int
    response_timeout: float
    latencies: list[float] = field(default_factory=list)
    _last: float = 0.0

    def _gap(self) -> None:
        wait = self._last + t35(self.baud) - time.monotonic()
        if wait > 0:
            time.sleep(wait)

    def send(self, data: bytes) -> None:
        """Write raw bytes after the inter-frame silence."""
        self._gap()
        self.ser.reset_input_buffer()
        self.ser.write(data)
        self.ser.flush()
        self._last = time.monotonic() + frame_time(len(data), self.baud)

    def request(self, req: Request) -> Response:
        """Send ``req`` and return its response; raises DeviceException for an
        exception response, FrameError for a bad one, TimeoutError for none."""
        self.send(encode_request(req))
        sent = time.monotonic()
        parser = ResponseParser(req)
        deadline = sent + self.response_timeout + frame_time(256, self.baud)
        try:
            while time.monotonic() < deadline:
                chunk = self.ser.read(max(1, self.ser.in_waiting))
                if chunk:
                    response = parser.feed(chunk)
                    if response is not None:
                        self.latencies.append(time.monotonic() - sent)
                        return response
        except ProtocolError:
            self.latencies.append(time.monotonic() - sent)
            raise
        finally:
            self._last = time.monotonic()
        raise TimeoutError(f"no complete response to {req} in {self.response_timeout} s")

    def listen(self, seconds: float | None = None) -> bytes:
        """Everything that arrives within ``seconds`` (default: the response timeout)."""
        end = time.monotonic() + (self.response_timeout if seconds is None else seconds)
        got = bytearray()
        while time.monotonic() < end:
            got += self.ser.read(max(1, self.ser.in_waiting))
        self._last = time.monotonic()
        return bytes(got)


@dataclass
class Target:
    port: str
    baud: int
    parity: str
    slave: int
    other_slave: int
    response_timeout: float
    simulated: bool
