"""Modbus RTU framing (sans-IO): CRC, timing, the ADU around a PDU.

An RTU frame (ADU) is the slave address, a PDU (:mod:`protocols.modbus.pdu`)
and the CRC-16 of both, low byte first. Both sides of the wire live here. A
master builds a request with one of the ``read_*`` / ``write_*`` /
``diagnostics`` / ``read_device_id`` builders (or :func:`encode_request` on a
typed request, or :func:`adu` on a PDU), sends the bytes, and feeds what
comes back into a :class:`ResponseParser` made for that request; it returns
the typed response once the frame is complete, or raises
:class:`~protocols.errors.FrameError` (bad CRC, another slave, another
function) or :class:`~protocols.errors.DeviceException` (an exception
response).

A slave cuts the byte stream into frames (by t3.5 silence, or with
:func:`request_length` when there is no timing, as on a pty) and calls
:func:`decode_request`; a request it must refuse raises
:class:`~protocols.modbus.pdu.RequestRejected` carrying the Modbus exception
code to answer with; :func:`encode_response` and :func:`exception_response`
build the answer.

Reference: *MODBUS over Serial Line V1.02* (framing, CRC, timing, fc 8).
"""

from __future__ import annotations

from protocols.errors import FrameError, LocalError
from protocols.modbus import pdu as _pdu
from protocols.modbus.pdu import (
    DeviceIdRequest,
    DiagnosticsRequest,
    ReadRequest,
    Request,
    Response,
    WriteBitsRequest,
    WriteFileRecordRequest,
    WriteRegistersRequest,
    WriteSingleRequest,
)

__all__ = [
    "BROADCAST",
    "MAX_FRAME",
    "ResponseParser",
    "adu",
    "crc16",
    "crc_ok",
    "decode_request",
    "diagnostics",
    "encode_request",
    "encode_response",
    "exception_response",
    "frame_time",
    "read_coils",
    "read_device_id",
    "read_discrete_inputs",
    "read_holding_registers",
    "read_input_registers",
    "request_length",
    "response_length",
    "t15",
    "t35",
    "with_crc",
    "write_coil",
    "write_coils",
    "write_register",
    "write_registers",
]

BROADCAST = 0  # "address 0 is reserved as the broadcast address" (serial line, 2.2)
MAX_FRAME = 256  # "The maximum size of a MODBUS RTU frame is 256 bytes" (2.5.1.1)

# ---------------------------------------------------------------- CRC, timing


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16(data: bytes | bytearray | memoryview) -> int:
    """CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF), table driven.

    On the wire the low byte goes first (serial line spec, 2.5.1.2).
    """
    crc = 0xFFFF
    table = _CRC_TABLE
    for byte in bytes(data):
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc


def with_crc(frame: bytes) -> bytes:
    """``frame`` followed by its CRC, low byte first."""
    return frame + crc16(frame).to_bytes(2, "little")


def adu(slave: int, pdu: bytes) -> bytes:
    """The RTU frame of ``pdu`` to (or from) ``slave``: address, PDU, CRC."""
    return with_crc(bytes([slave]) + pdu)


def _check_crc(frame: bytes) -> None:
    if len(frame) < 4:
        raise FrameError(f"frame of {len(frame)} bytes is shorter than the 4-byte minimum")
    got = int.from_bytes(frame[-2:], "little")
    want = crc16(frame[:-2])
    if got != want:
        raise FrameError(f"bad CRC: frame carries {got:04x}, content gives {want:04x}")


def crc_ok(frame: bytes | bytearray) -> bool:
    """Whether the last two bytes of ``frame`` are the CRC of the others."""
    return len(frame) >= 4 and crc16(frame[:-2]) == frame[-2] | frame[-1] << 8


def frame_time(nbytes: int, baud: int, bits_per_char: int = 11) -> float:
    """Seconds ``nbytes`` characters take on the wire (11 bits each: start, 8
    data, parity or a second stop bit, stop)."""
    if baud <= 0:
        raise LocalError(f"baud must be positive, not {baud}")
    return nbytes * bits_per_char / baud


def t35(baud: int) -> float:
    """Silence that ends a frame: 3.5 characters, fixed at 1.75 ms above 19200
    baud ("a fixed value of 1.75 ms for the inter-frame delay", 2.5.1.1)."""
    return 0.00175 if baud > 19200 else frame_time(1, baud) * 3.5


def t15(baud: int) -> float:
    """Longest gap allowed inside a frame: 1.5 characters, 750 µs above 19200."""
    return 0.00075 if baud > 19200 else frame_time(1, baud) * 1.5


# ---------------------------------------------------------------- requests


def encode_request(req: Request) -> bytes:
    """The RTU frame of ``req``, CRC included. Raises :class:`LocalError` on a
    request no slave could accept (a count out of range, a field wider than 16 bits)."""
    if not 0 <= req.slave <= 0xFF:
        raise LocalError(f"slave {req.slave} is outside 0..255")
    return adu(req.slave, _pdu.encode_request(req))


def read_coils(slave: int, address: int, count: int) -> bytes:
    return encode_request(ReadRequest(slave, 1, address, count))


def read_discrete_inputs(slave: int, address: int, count: int) -> bytes:
    return encode_request(ReadRequest(slave, 2, address, count))


def read_holding_registers(slave: int, address: int, count: int) -> bytes:
    return encode_request(ReadRequest(slave, 3, address, count))


def read_input_registers(slave: int, address: int, count: int) -> bytes:
    return encode_request(ReadRequest(slave, 4, address, count))


def write_coil(slave: int, address: int, on: bool) -> bytes:
    return encode_request(WriteSingleRequest(slave, 5, address, 0xFF00 if on else 0))


def write_register(slave: int, address: int, value: int) -> bytes:
    return encode_request(WriteSingleRequest(slave, 6, address, value))


def write_coils(slave: int, address: int, bits: tuple[bool, ...]) -> bytes:
    return encode_request(WriteBitsRequest(slave, address, tuple(bits)))


def write_registers(slave: int, address: int, values: tuple[int, ...]) -> bytes:
    return encode_request(WriteRegistersRequest(slave, address, tuple(values)))


def diagnostics(slave: int, sub_function: int, data: bytes = b"\x00\x00") -> bytes:
    return encode_request(DiagnosticsRequest(slave, sub_function, data))


def read_device_id(slave: int, read_code: int = 1, object_id: int = 0) -> bytes:
    return encode_request(DeviceIdRequest(slave, read_code, object_id))


def request_length(prefix: bytes | bytearray) -> int | None:
    """Length of the request frame that starts with ``prefix``, ``None`` while
    too few bytes have arrived to tell (:func:`protocols.modbus.pdu.request_length`
    plus address and CRC). For a slave without inter-frame timing."""
    n = _pdu.request_length(prefix[1:]) if len(prefix) >= 2 else None
    return None if n is None else n + 3


def response_length(prefix: bytes | bytearray) -> int | None:
    """Length of the response frame that starts with ``prefix``, by its own
    header; ``None`` while too few bytes have arrived to tell, or for a
    function whose length only a parser that knows the request can tell.

    An RTU master that finds a frame of the right slave and function but of
    another length than it asked for has found the reply to another request
    (a late one): with this it can skip that frame whole and still take the
    reply behind it.
    """
    n = _pdu.response_length(prefix[1:]) if len(prefix) >= 2 else None
    return None if n is None else n + 3


def decode_request(frame: bytes) -> Request:
    """The request in one whole RTU ``frame`` (as cut by t3.5 silence).

    Raises :class:`FrameError` when the frame must be ignored (too short, bad
    CRC, a length that contradicts its fields) and
    :class:`~protocols.modbus.pdu.RequestRejected` when it must be answered
    with an exception (01 unknown function, 02 address out of the 16-bit
    space, 03 a bad count or value).
    """
    _check_crc(frame)
    return _pdu.decode_request(frame[0], frame[1:-2])


# ---------------------------------------------------------------- responses


def encode_response(resp: Response) -> bytes:
    """The RTU frame of ``resp``, CRC included (the slave side)."""
    if not 0 <= resp.slave <= 0xFF:
        raise LocalError(f"slave {resp.slave} is outside 0..255")
    return adu(resp.slave, _pdu.encode_response(resp))


def exception_response(slave: int, function: int, code: int) -> bytes:
    """The exception response to ``function`` with exception ``code``."""
    return adu(slave, _pdu.exception_response(function, code))


class ResponseParser:
    """Incremental parser of the response to one request.

    ``feed(data)`` returns the typed response once the frame is complete and
    ``None`` before. Each call only compares the buffer length against the
    frame length known so far, so bytes arriving one at a time cost nothing
    extra; the length is worked out as header bytes arrive (byte count of a
    read, object headers of a device identification). Bytes after the frame are
    kept in :attr:`trailing`.

    Raises :class:`FrameError` (another slave, another function, bad CRC, a
    malformed body) or :class:`~protocols.errors.DeviceException` (an
    exception response).
    """

    def __init__(self, request: Request) -> None:
        if request.slave == BROADCAST:
            raise LocalError("a broadcast request gets no response")
        self.request = request
        self._buf = bytearray()
        self._need = 2  # bytes needed before the next look
        self._done = False
        self.trailing = b""

    def feed(self, data: bytes) -> Response | None:
        if self._done:
            raise LocalError("this parser already returned its response")
        self._buf += data
        while len(self._buf) >= self._need:
            need = self._frame_length()
            if need is None:  # more header arrived: look again at the new threshold
                continue
            if len(self._buf) < need:
                self._need = need
                return None
            frame = bytes(self._buf[:need])
            self.trailing = bytes(self._buf[need:])
            self._done = True
            _check_crc(frame)
            return _pdu.decode_response(self.request, frame[1:-2])
        return None

    def _frame_length(self) -> int | None:
        """The full frame length if the header read so far tells it; otherwise
        raise ``self._need`` to the next header byte needed and return None."""
        buf, req = self._buf, self.request
        if buf[0] != req.slave:
            raise FrameError(f"response from slave {buf[0]}, expected {req.slave}")
        fc = buf[1]
        if fc == req.function | 0x80:
            return 5
        if fc != req.function:
            raise FrameError(f"response to function {fc}, expected {req.function}")
        if isinstance(req, ReadRequest):
            if len(buf) < 3:
                self._need = 3
                return None
            return 5 + buf[2]
        if isinstance(req, WriteSingleRequest | WriteBitsRequest | WriteRegistersRequest):
            return 8
        if isinstance(req, DiagnosticsRequest):
            return 6 + len(req.data)
        if isinstance(req, WriteFileRecordRequest):
            return len(req.data) + 12
        # 43/14: slave fc mei code conformity more next n, then n x (id len value)
        pos = 8
        if len(buf) < pos:
            self._need = pos
            return None
        for _ in range(buf[7]):
            if len(buf) < pos + 2:
                self._need = pos + 2
                return None
            pos += 2 + buf[pos + 1]
            if pos + 2 > MAX_FRAME:
                raise FrameError("device identification objects overflow a 256-byte frame")
        return pos + 2
