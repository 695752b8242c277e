"""Modbus RTU framing (sans-IO): CRC, timing, requests and responses.

Both sides of the wire live here. A master builds a request with one of the
``read_*`` / ``write_*`` / ``diagnostics`` / ``read_device_id`` builders (or
:func:`encode_request` on a typed request), sends the bytes, and feeds what comes
back into a :class:`ResponseParser` made for that request; it returns the typed
response once the frame is complete, or raises :class:`~protocols.errors.FrameError`
(bad CRC, another slave, another function) or
:class:`~protocols.errors.DeviceException` (an exception response).

A slave cuts the byte stream into frames (by t3.5 silence, or with
:func:`request_length` when there is no timing, as on a pty) and calls
:func:`decode_request`; a request it must refuse raises :class:`RequestRejected`
carrying the Modbus exception code to answer with; :func:`encode_response` and
:func:`exception_response` build the answer.

References: *MODBUS over Serial Line V1.02* (framing, CRC, timing, fc 8) and
*MODBUS Application Protocol V1.1b3* (PDUs, fc 21 write file record, fc 43/14).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocols.errors import DeviceException, FrameError, ProtocolError

__all__ = [
    "BROADCAST",
    "DeviceIdRequest",
    "DeviceIdResponse",
    "DiagnosticsRequest",
    "DiagnosticsResponse",
    "ReadBitsResponse",
    "ReadRegistersResponse",
    "ReadRequest",
    "Request",
    "RequestRejected",
    "Response",
    "ResponseParser",
    "WriteBitsRequest",
    "WriteFileRecordRequest",
    "WriteFileRecordResponse",
    "WriteMultipleResponse",
    "WriteRegistersRequest",
    "WriteSingleRequest",
    "WriteSingleResponse",
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
MAX_READ_REGISTERS = 125
MAX_WRITE_REGISTERS = 123
MAX_READ_BITS = 2000
MAX_WRITE_BITS = 1968

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
    for byte in bytes(data):
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc


def with_crc(frame: bytes) -> bytes:
    """``frame`` followed by its CRC, low byte first."""
    return frame + crc16(frame).to_bytes(2, "little")


def _check_crc(frame: bytes) -> None:
    if len(frame) < 4:
        raise FrameError(f"frame of {len(frame)} bytes is shorter than the 4-byte minimum")
    got = int.from_bytes(frame[-2:], "little")
    want = crc16(frame[:-2])
    if got != want:
        raise FrameError(f"bad CRC: frame carries {got:04x}, content gives {want:04x}")


def frame_time(nbytes: int, baud: int, bits_per_char: int = 11) -> float:
    """Seconds ``nbytes`` characters take on the wire (11 bits each: start, 8
    data, parity or a second stop bit, stop)."""
    if baud <= 0:
        raise ValueError(f"baud must be positive, not {baud}")
    return nbytes * bits_per_char / baud


def t35(baud: int) -> float:
    """Silence that ends a frame: 3.5 characters, fixed at 1.75 ms above 19200
    baud ("a fixed value of 1.75 ms for the inter-frame delay", 2.5.1.1)."""
    return 0.00175 if baud > 19200 else frame_time(1, baud) * 3.5


def t15(baud: int) -> float:
    """Longest gap allowed inside a frame: 1.5 characters, 750 µs above 19200."""
    return 0.00075 if baud > 19200 else frame_time(1, baud) * 1.5


# ---------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """Function 1, 2, 3 or 4: read ``count`` bits or registers from ``address``."""

    slave: int
    function: int
    address: int
    count: int


@dataclass(frozen=True, slots=True)
class WriteSingleRequest:
    """Function 5 (``value`` 0xFF00 = on, 0 = off) or 6 (a register)."""

    slave: int
    function: int
    address: int
    value: int


@dataclass(frozen=True, slots=True)
class WriteBitsRequest:
    """Function 15: write coils from ``address``."""

    slave: int
    address: int
    bits: tuple[bool, ...]
    function: int = 15


@dataclass(frozen=True, slots=True)
class WriteRegistersRequest:
    """Function 16: write holding registers from ``address``."""

    slave: int
    address: int
    values: tuple[int, ...]
    function: int = 16


@dataclass(frozen=True, slots=True)
class WriteFileRecordRequest:
    """Function 21, one sub-request (reference type 6): ``data`` (an even number
    of bytes) into ``file`` from two-byte record ``record`` (0..9999)."""

    slave: int
    file: int
    record: int
    data: bytes
    function: int = 21


@dataclass(frozen=True, slots=True)
class DiagnosticsRequest:
    """Function 8: ``sub_function`` with its ``data`` (sub-function 0 echoes it)."""

    slave: int
    sub_function: int
    data: bytes = b"\x00\x00"
    function: int = 8


@dataclass(frozen=True, slots=True)
class DeviceIdRequest:
    """Function 43 / MEI 14: read device identification from ``object_id``.
    ``read_code`` 1 = basic stream, 2 = regular, 3 = extended, 4 = one object."""

    slave: int
    read_code: int = 1
    object_id: int = 0
    function: int = 43


Request = (
    ReadRequest
    | WriteSingleRequest
    | WriteBitsRequest
    | WriteRegistersRequest
    | WriteFileRecordRequest
    | DiagnosticsRequest
    | DeviceIdRequest
)


class RequestRejected(ProtocolError):
    """A well-framed request the slave must answer with an exception response."""

    def __init__(self, slave: int, function: int, code: int, why: str) -> None:
        self.slave = slave
        self.function = function
        self.code = code
        super().__init__(f"function {function}: exception {code:02d}: {why}")


def _u16(name: str, value: int) -> bytes:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"{name} {value} is outside 0..65535")
    return value.to_bytes(2, "big")


def _u8(name: str, value: int) -> bytes:
    if not 0 <= value <= 0xFF:
        raise ValueError(f"{name} {value} is outside 0..255")
    return bytes([value])


def _pack_bits(bits: tuple[bool, ...]) -> bytes:
    out = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        if bit:
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def _unpack_bits(data: bytes, count: int) -> tuple[bool, ...]:
    return tuple(bool(data[i // 8] >> (i % 8) & 1) for i in range(count))


def encode_request(req: Request) -> bytes:
    """The RTU frame of ``req``, CRC included. Raises ValueError on a request
    no slave could accept (a count out of range, a field wider than 16 bits)."""
    head = _u8("slave", req.slave)
    if isinstance(req, ReadRequest):
        if req.function not in (1, 2, 3, 4):
            raise ValueError(f"function {req.function} is not a read")
        limit = MAX_READ_BITS if req.function in (1, 2) else MAX_READ_REGISTERS
        if not 1 <= req.count <= limit:
            raise ValueError(f"count {req.count} is outside 1..{limit}")
        pdu = bytes([req.function]) + _u16("address", req.address) + _u16("count", req.count)
    elif isinstance(req, WriteSingleRequest):
        if req.function not in (5, 6):
            raise ValueError(f"function {req.function} is not a single write")
        pdu = bytes([req.function]) + _u16("address", req.address) + _u16("value", req.value)
    elif isinstance(req, WriteBitsRequest):
        if not 1 <= len(req.bits) <= MAX_WRITE_BITS:
            raise ValueError(f"{len(req.bits)} coils is outside 1..{MAX_WRITE_BITS}")
        packed = _pack_bits(req.bits)
        pdu = b"\x0f" + _u16("address", req.address) + _u16("count", len(req.bits))
        pdu += bytes([len(packed)]) + packed
    elif isinstance(req, WriteRegistersRequest):
        if not 1 <= len(req.values) <= MAX_WRITE_REGISTERS:
            raise ValueError(f"{len(req.values)} registers is outside 1..{MAX_WRITE_REGISTERS}")
        pdu = b"\x10" + _u16("address", req.address) + _u16("count", len(req.values))
        pdu += bytes([2 * len(req.values)])
        pdu += b"".join(_u16("value", v) for v in req.values)
    elif isinstance(req, WriteFileRecordRequest):
        if not req.data or len(req.data) % 2 or len(req.data) > MAX_FRAME - 12:
            raise ValueError(f"{len(req.data)} bytes of record data: even, 2..{MAX_FRAME - 12}")
        if req.record > 9999:
            raise ValueError(f"record {req.record} is outside 0..9999")
        sub = b"\x06" + _u16("file", req.file) + _u16("record", req.record)
        sub += _u16("record length", len(req.data) // 2) + req.data
        pdu = b"\x15" + bytes([len(sub)]) + sub
    elif isinstance(req, DiagnosticsRequest):
        if len(req.data) > MAX_FRAME - 6:
            raise ValueError(f"{len(req.data)} bytes of diagnostics data do not fit a frame")
        pdu = b"\x08" + _u16("sub-function", req.sub_function) + req.data
    else:
        pdu = b"\x2b\x0e" + _u8("read code", req.read_code) + _u8("object id", req.object_id)
    return with_crc(head + pdu)


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


def request_length(prefix: bytes) -> int | None:
    """Length of the request frame that starts with ``prefix``, ``None`` while
    too few bytes have arrived to tell. For a slave without inter-frame timing.

    Function 8 carries no length: its frame is taken as the usual 8 bytes
    (every sub-function but 0 has 2 data bytes). Unknown functions give ``None``:
    only the t3.5 silence can end them.
    """
    if len(prefix) < 2:
        return None
    fc = prefix[1]
    if fc in (1, 2, 3, 4, 5, 6, 8):
        return 8
    if fc in (15, 16):
        return 9 + prefix[6] if len(prefix) >= 7 else None
    if fc == 21:
        return 5 + prefix[2] if len(prefix) >= 3 else None
    if fc == 43:
        return 7
    return None


def response_length(prefix: bytes | bytearray) -> int | None:
    """Length of the response frame that starts with ``prefix``, by its own
    header; ``None`` while too few bytes have arrived to tell, or for a
    function whose length only a parser that knows the request can tell.

    An RTU master that finds a frame of the right slave and function but of
    another length than it asked for has found the reply to another request
    (a late one): with this it can skip that frame whole and still take the
    reply behind it.
    """
    if len(prefix) < 2:
        return None
    fc = prefix[1]
    if fc & 0x80:
        return 5
    if fc in (1, 2, 3, 4):
        return 5 + prefix[2] if len(prefix) >= 3 else None
    if fc in (5, 6, 15, 16):
        return 8
    if fc == 21:  # the echo of the request
        return 5 + prefix[2] if len(prefix) >= 3 else None
    return None


def crc_ok(frame: bytes | bytearray) -> bool:
    """Whether the last two bytes of ``frame`` are the CRC of the others."""
    return len(frame) >= 4 and crc16(frame[:-2]) == frame[-2] | frame[-1] << 8


def decode_request(frame: bytes) -> Request:
    """The request in one whole RTU ``frame`` (as cut by t3.5 silence).

    Raises :class:`FrameError` when the frame must be ignored (too short, bad
    CRC, a length that contradicts its fields) and :class:`RequestRejected` when
    it must be answered with an exception (01 unknown function, 02 address out
    of the 16-bit space, 03 a bad count or value).
    """
    _check_crc(frame)
    slave, fc, body = frame[0], frame[1], frame[2:-2]

    def reject(code: int, why: str) -> RequestRejected:
        return RequestRejected(slave, fc, code, why)

    if fc in (1, 2, 3, 4, 5, 6):
        if len(body) != 4:
            raise FrameError(f"function {fc} request has {len(body)} data bytes, not 4")
        address = int.from_bytes(body[0:2], "big")
        value = int.from_bytes(body[2:4], "big")
        if fc == 5:
            if value not in (0, 0xFF00):
                raise reject(3, f"coil value {value:04x} is neither 0000 nor FF00")
            return WriteSingleRequest(slave, fc, address, value)
        if fc == 6:
            return WriteSingleRequest(slave, fc, address, value)
        limit = MAX_READ_BITS if fc in (1, 2) else MAX_READ_REGISTERS
        if not 1 <= value <= limit:
            raise reject(3, f"count {value} is outside 1..{limit}")
        if address + value > 0x10000:
            raise reject(2, f"{value} items from {address} run past the address space")
        return ReadRequest(slave, fc, address, value)
    if fc in (15, 16):
        if len(body) < 5:
            raise FrameError(f"function {fc} request of {len(body)} data bytes is truncated")
        address = int.from_bytes(body[0:2], "big")
        count = int.from_bytes(body[2:4], "big")
        nbytes = body[4]
        data = body[5:]
        if len(data) != nbytes:
            raise FrameError(f"byte count {nbytes} but {len(data)} data bytes follow")
        limit = MAX_WRITE_BITS if fc == 15 else MAX_WRITE_REGISTERS
        want = (count + 7) // 8 if fc == 15 else 2 * count
        if not 1 <= count <= limit or nbytes != want:
            raise reject(3, f"count {count} with byte count {nbytes}")
        if address + count > 0x10000:
            raise reject(2, f"{count} items from {address} run past the address space")
        if fc == 15:
            return WriteBitsRequest(slave, address, _unpack_bits(data, count))
        values = tuple(int.from_bytes(data[i : i + 2], "big") for i in range(0, nbytes, 2))
        return WriteRegistersRequest(slave, address, values)
    if fc == 21:
        if len(body) < 1 or body[0] != len(body) - 1:
            raise FrameError("function 21 request whose byte count is not its length")
        if len(body) < 8 or body[1] != 6:
            raise reject(3, "function 21 takes one sub-request of reference type 6")
        words = int.from_bytes(body[6:8], "big")
        if 8 + 2 * words != len(body) or words == 0:
            raise reject(3, f"record length {words} with {len(body) - 8} data bytes")
        record = int.from_bytes(body[4:6], "big")
        if record > 9999:
            raise reject(2, f"record {record} is outside 0..9999")
        return WriteFileRecordRequest(
            slave, int.from_bytes(body[2:4], "big"), record, bytes(body[8:])
        )
    if fc == 8:
        if len(body) < 2:
            raise FrameError("diagnostics request without a sub-function")
        return DiagnosticsRequest(slave, int.from_bytes(body[0:2], "big"), bytes(body[2:]))
    if fc == 43:
        if len(body) != 3:
            raise FrameError(f"function 43 request has {len(body)} data bytes, not 3")
        if body[0] != 14:
            raise reject(1, f"MEI type {body[0]} is not 14 (device identification)")
        if body[1] not in (1, 2, 3, 4):
            raise reject(3, f"read device id code {body[1]} is outside 1..4")
        return DeviceIdRequest(slave, body[1], body[2])
    raise reject(1, f"function {fc} is not supported")


# ---------------------------------------------------------------- responses


@dataclass(frozen=True, slots=True)
class ReadBitsResponse:
    slave: int
    function: int  # 1 or 2
    bits: tuple[bool, ...]


@dataclass(frozen=True, slots=True)
class ReadRegistersResponse:
    slave: int
    function: int  # 3 or 4
    registers: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class WriteSingleResponse:
    slave: int
    function: int  # 5 or 6
    address: int
    value: int


@dataclass(frozen=True, slots=True)
class WriteMultipleResponse:
    slave: int
    function: int  # 15 or 16
    address: int
    count: int


@dataclass(frozen=True, slots=True)
class WriteFileRecordResponse:
    """Function 21: the echo of the request."""

    slave: int
    file: int
    record: int
    data: bytes
    function: int = 21


@dataclass(frozen=True, slots=True)
class DiagnosticsResponse:
    slave: int
    sub_function: int
    data: bytes
    function: int = 8


@dataclass(frozen=True, slots=True)
class DeviceIdResponse:
    slave: int
    read_code: int
    conformity: int
    more_follows: bool
    next_object_id: int
    objects: dict[int, bytes] = field(default_factory=dict)
    function: int = 43


Response = (
    ReadBitsResponse
    | ReadRegistersResponse
    | WriteSingleResponse
    | WriteMultipleResponse
    | WriteFileRecordResponse
    | DiagnosticsResponse
    | DeviceIdResponse
)


def encode_response(resp: Response) -> bytes:
    """The RTU frame of ``resp``, CRC included (the slave side)."""
    head = _u8("slave", resp.slave) + _u8("function", resp.function)
    if isinstance(resp, ReadBitsResponse):
        packed = _pack_bits(resp.bits)
        pdu = bytes([len(packed)]) + packed
    elif isinstance(resp, ReadRegistersResponse):
        pdu = bytes([2 * len(resp.registers)])
        pdu += b"".join(_u16("register", r) for r in resp.registers)
    elif isinstance(resp, WriteSingleResponse):
        pdu = _u16("address", resp.address) + _u16("value", resp.value)
    elif isinstance(resp, WriteMultipleResponse):
        pdu = _u16("address", resp.address) + _u16("count", resp.count)
    elif isinstance(resp, DiagnosticsResponse):
        pdu = _u16("sub-function", resp.sub_function) + resp.data
    elif isinstance(resp, WriteFileRecordResponse):
        req = WriteFileRecordRequest(resp.slave, resp.file, resp.record, resp.data)
        pdu = encode_request(req)[2:-2]
    else:
        pdu = bytes(
            [
                14,
                resp.read_code,
                resp.conformity,
                0xFF if resp.more_follows else 0,
                resp.next_object_id,
                len(resp.objects),
            ]
        )
        for oid, value in resp.objects.items():
            pdu += _u8("object id", oid) + _u8("object length", len(value)) + value
    frame = with_crc(head + pdu)
    if len(frame) > MAX_FRAME:
        raise ValueError(f"response of {len(frame)} bytes exceeds the {MAX_FRAME}-byte frame")
    return frame


def exception_response(slave: int, function: int, code: int) -> bytes:
    """The exception response to ``function`` with exception ``code``."""
    return with_crc(bytes([slave, (function | 0x80) & 0xFF, code]))


class ResponseParser:
    """Incremental parser of the response to one request.

    ``feed(data)`` returns the typed response once the frame is complete and
    ``None`` before. Each call only compares the buffer length against the
    frame length known so far, so bytes arriving one at a time cost nothing
    extra; the length is worked out as header bytes arrive (byte count of a
    read, object headers of a device identification). Bytes after the frame are
    kept in :attr:`trailing`.

    Raises :class:`FrameError` (another slave, another function, bad CRC, a
    malformed body) or :class:`DeviceException` (an exception response).
    """

    def __init__(self, request: Request) -> None:
        if request.slave == BROADCAST:
            raise ValueError("a broadcast request gets no response")
        self.request = request
        self._buf = bytearray()
        self._need = 2  # bytes needed before the next look
        self._done = False
        self.trailing = b""

    def feed(self, data: bytes) -> Response | None:
        if self._done:
            raise ValueError("this parser already returned its response")
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
            return self._decode(frame)
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

    def _decode(self, frame: bytes) -> Response:
        _check_crc(frame)
        req = self.request
        slave, fc, body = frame[0], frame[1], frame[2:-2]
        if fc & 0x80:
            raise DeviceException(body[0], req.function)
        if isinstance(req, ReadRequest):
            if req.function in (1, 2):
                if body[0] != (req.count + 7) // 8:
                    raise FrameError(f"{body[0]} data bytes for {req.count} bits")
                return ReadBitsResponse(slave, fc, _unpack_bits(body[1:], req.count))
            if body[0] != 2 * req.count:
                raise FrameError(f"{body[0]} data bytes for {req.count} registers")
            regs = tuple(int.from_bytes(body[i : i + 2], "big") for i in range(1, len(body), 2))
            return ReadRegistersResponse(slave, fc, regs)
        if isinstance(req, WriteSingleRequest | WriteBitsRequest | WriteRegistersRequest):
            address = int.from_bytes(body[0:2], "big")
            value = int.from_bytes(body[2:4], "big")
            if address != req.address:
                raise FrameError(f"write acknowledged at {address}, sent to {req.address}")
            if isinstance(req, WriteSingleRequest):
                return WriteSingleResponse(slave, fc, address, value)
            return WriteMultipleResponse(slave, fc, address, value)
        if isinstance(req, WriteFileRecordRequest):
            if frame != encode_request(req):
                raise FrameError("function 21 answered with other than the echo of the request")
            return WriteFileRecordResponse(slave, req.file, req.record, req.data)
        if isinstance(req, DiagnosticsRequest):
            sub = int.from_bytes(body[0:2], "big")
            if sub != req.sub_function:
                raise FrameError(f"diagnostics answer to sub-function {sub}")
            return DiagnosticsResponse(slave, sub, bytes(body[2:]))
        if body[0] != 14:
            raise FrameError(f"MEI type {body[0]} in the answer, expected 14")
        objects: dict[int, bytes] = {}
        pos = 6
        for _ in range(body[5]):
            oid, length = body[pos], body[pos + 1]
            objects[oid] = bytes(body[pos + 2 : pos + 2 + length])
            pos += 2 + length
        return DeviceIdResponse(
            slave,
            read_code=body[1],
            conformity=body[2],
            more_follows=body[3] == 0xFF,
            next_object_id=body[4],
            objects=objects,
        )
