"""Modbus PDUs (sans-IO): every function code's request and response, both ways.

A PDU is the function code and its data, the part of a frame that RTU
(:mod:`protocols.modbus.rtu`: slave address before, CRC after) and Modbus TCP
(:mod:`protocols.modbus.mbap`: the MBAP header before) share. Requests and
responses are typed values (:data:`Request`, :data:`Response`); for each:

* a master encodes a request (:func:`encode_request`) and decodes the answer
  to it (:func:`decode_response`: the typed response, :class:`FrameError` when
  it does not answer that request, :class:`DeviceException` for an exception
  response);
* a slave decodes a request (:func:`decode_request`: :class:`RequestRejected`
  carries the exception code to answer with) and encodes the answer
  (:func:`encode_response`, :func:`exception_response`);
* :func:`request_length` and :func:`response_length` tell a PDU's length from
  its first bytes (a slave with no timing, a master skipping a late reply).

The agent's hot path (a read every second on hundreds of devices) takes the
shortcuts :func:`read_request`, :func:`reply_length` and :func:`read_items`:
precompiled structs, no object per poll.

Reference: *MODBUS Application Protocol V1.1b3* (functions 1-6, 8, 15, 16,
21 write file record, 43/14 read device identification).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from protocols.errors import DeviceException, FrameError, LocalError, ProtocolError

__all__ = [
    "MAX_PDU",
    "READ",
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
    "WriteBitsRequest",
    "WriteFileRecordRequest",
    "WriteFileRecordResponse",
    "WriteMultipleResponse",
    "WriteRegistersRequest",
    "WriteSingleRequest",
    "WriteSingleResponse",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "encode_write",
    "exception_response",
    "pack_bits",
    "read_items",
    "read_request",
    "registers",
    "reply_length",
    "request_length",
    "response_length",
    "unpack_bits",
]

MAX_PDU = 253  # 256-byte RTU frame less address and CRC; 260-byte TCP ADU less MBAP
MAX_READ_REGISTERS = 125
MAX_WRITE_REGISTERS = 123
MAX_READ_BITS = 2000
MAX_WRITE_BITS = 1968

READ = struct.Struct(">BHH")
"""Function, address, count (1-4) or value (5, 6): the fixed five-byte request PDU."""
_MULTIPLE = struct.Struct(">BHHB")  # 15, 16: function, address, count, byte count
_REGS: dict[int, struct.Struct] = {}


def registers(n: int) -> struct.Struct:
    """The struct of ``n`` big-endian registers, compiled once per ``n``."""
    s = _REGS.get(n)
    if s is None:
        s = _REGS[n] = struct.Struct(f">{n}H")
    return s


def pack_bits(bits: Sequence[bool] | Sequence[int]) -> bytes:
    """Bits into bytes, the first in the least significant bit (functions 1, 2, 15)."""
    out = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        if bit:
            out[i >> 3] |= 1 << (i & 7)
    return bytes(out)


def unpack_bits(data: bytes | bytearray | memoryview, count: int) -> tuple[bool, ...]:
    """The first ``count`` bits of ``data``, as :func:`pack_bits` packed them."""
    return tuple(bool(data[i >> 3] >> (i & 7) & 1) for i in range(count))


# ---------------------------------------------------------------- the hot path


def read_request(function: int, address: int, count: int) -> bytes:
    """The PDU of a read (function 1-4), without the checks of :func:`encode_request`."""
    return READ.pack(function, address, count)


def reply_length(function: int, count: int) -> int:
    """Length of the normal reply PDU to a read of ``count`` or a write (5, 6, 15, 16)."""
    if function in (3, 4):
        return 2 + 2 * count
    if function in (1, 2):
        return 2 + (count + 7) // 8
    return 5  # 5, 6, 15, 16 echo address and value / quantity


def read_items(function: int, count: int, reply: bytes) -> Sequence[int] | Sequence[bool]:
    """The registers or bits of a checked normal reply PDU to a read of ``count``."""
    if function > 2:
        return registers(count).unpack_from(reply, 2)
    return unpack_bits(memoryview(reply)[2:], count)


def encode_write(function: int, address: int, payload: list[int] | bool) -> bytes:
    """The PDU that writes ``payload`` from ``address``: function 5 (``bool``), 6 (one
    word), 15 (bits as 0/1) or 16 (words), as :func:`protocols.modbus.plan.write_request`
    gives them. Raises :class:`LocalError` for another function or payload."""
    if function == 5 and isinstance(payload, bool):
        return encode_request(WriteSingleRequest(0, 5, address, 0xFF00 if payload else 0))
    if function == 6 and isinstance(payload, list) and len(payload) == 1:
        return encode_request(WriteSingleRequest(0, 6, address, payload[0]))
    if function == 15 and isinstance(payload, list):
        return encode_request(WriteBitsRequest(0, address, tuple(map(bool, payload))))
    if function == 16 and isinstance(payload, list):
        return encode_request(WriteRegistersRequest(0, address, tuple(payload)))
    raise LocalError(f"function {function} with {payload!r} is not a write")


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
        raise LocalError(f"{name} {value} is outside 0..65535")
    return value.to_bytes(2, "big")


def _u8(name: str, value: int) -> bytes:
    if not 0 <= value <= 0xFF:
        raise LocalError(f"{name} {value} is outside 0..255")
    return bytes([value])


def encode_request(req: Request) -> bytes:
    """The PDU of ``req`` (its ``slave`` is the frame's business, not the PDU's).
    Raises :class:`LocalError` on a request no slave could accept (a count out
    of range, a field wider than 16 bits)."""
    if isinstance(req, ReadRequest):
        if req.function not in (1, 2, 3, 4):
            raise LocalError(f"function {req.function} is not a read")
        limit = MAX_READ_BITS if req.function in (1, 2) else MAX_READ_REGISTERS
        if not 1 <= req.count <= limit:
            raise LocalError(f"count {req.count} is outside 1..{limit}")
        return bytes([req.function]) + _u16("address", req.address) + _u16("count", req.count)
    if isinstance(req, WriteSingleRequest):
        if req.function not in (5, 6):
            raise LocalError(f"function {req.function} is not a single write")
        return bytes([req.function]) + _u16("address", req.address) + _u16("value", req.value)
    if isinstance(req, WriteBitsRequest):
        if not 1 <= len(req.bits) <= MAX_WRITE_BITS:
            raise LocalError(f"{len(req.bits)} coils is outside 1..{MAX_WRITE_BITS}")
        packed = pack_bits(req.bits)
        _u16("address", req.address)
        return _MULTIPLE.pack(15, req.address, len(req.bits), len(packed)) + packed
    if isinstance(req, WriteRegistersRequest):
        n = len(req.values)
        if not 1 <= n <= MAX_WRITE_REGISTERS:
            raise LocalError(f"{n} registers is outside 1..{MAX_WRITE_REGISTERS}")
        _u16("address", req.address)
        return _MULTIPLE.pack(16, req.address, n, 2 * n) + b"".join(
            _u16("value", v) for v in req.values
        )
    if isinstance(req, WriteFileRecordRequest):
        if not req.data or len(req.data) % 2 or len(req.data) > MAX_PDU - 9:
            raise LocalError(f"{len(req.data)} bytes of record data: even, 2..{MAX_PDU - 9}")
        if req.record > 9999:
            raise LocalError(f"record {req.record} is outside 0..9999")
        sub = b"\x06" + _u16("file", req.file) + _u16("record", req.record)
        sub += _u16("record length", len(req.data) // 2) + req.data
        return b"\x15" + bytes([len(sub)]) + sub
    if isinstance(req, DiagnosticsRequest):
        if len(req.data) > MAX_PDU - 3:
            raise LocalError(f"{len(req.data)} bytes of diagnostics data do not fit a frame")
        return b"\x08" + _u16("sub-function", req.sub_function) + req.data
    return b"\x2b\x0e" + _u8("read code", req.read_code) + _u8("object id", req.object_id)


def request_length(prefix: bytes | bytearray) -> int | None:
    """Length of the request PDU that starts with ``prefix``, ``None`` while too
    few bytes have arrived to tell.

    Function 8 carries no length: its PDU is taken as the usual 5 bytes (every
    sub-function but 0 has 2 data bytes). Unknown functions give ``None``.
    """
    if not prefix:
        return None
    fc = prefix[0]
    if fc in (1, 2, 3, 4, 5, 6, 8):
        return 5
    if fc in (15, 16):
        return 6 + prefix[5] if len(prefix) >= 6 else None
    if fc == 21:
        return 2 + prefix[1] if len(prefix) >= 2 else None
    if fc == 43:
        return 4
    return None


def decode_request(slave: int, pdu: bytes | bytearray) -> Request:
    """The request in ``pdu``, addressed to ``slave`` (the slave's side).

    Raises :class:`FrameError` when it must be ignored (a length that
    contradicts its fields) and :class:`RequestRejected` when it must be
    answered with an exception (01 unknown function, 02 address out of the
    16-bit space, 03 a bad count or value).
    """
    if not pdu:
        raise FrameError("empty PDU")
    fc, body = pdu[0], pdu[1:]
    if fc in (1, 2, 3, 4, 5, 6):
        if len(body) != 4:
            raise FrameError(f"function {fc} request has {len(body)} data bytes, not 4")
        _, address, value = READ.unpack(pdu)
        if fc == 5:
            if value not in (0, 0xFF00):
                raise RequestRejected(
                    slave, fc, 3, f"coil value {value:04x} is neither 0000 nor FF00"
                )
            return WriteSingleRequest(slave, fc, address, value)
        if fc == 6:
            return WriteSingleRequest(slave, fc, address, value)
        limit = MAX_READ_BITS if fc in (1, 2) else MAX_READ_REGISTERS
        if not 1 <= value <= limit:
            raise RequestRejected(slave, fc, 3, f"count {value} is outside 1..{limit}")
        if address + value > 0x10000:
            raise RequestRejected(
                slave, fc, 2, f"{value} items from {address} run past the address space"
            )
        return ReadRequest(slave, fc, address, value)
    if fc in (15, 16):
        if len(body) < 5:
            raise FrameError(f"function {fc} request of {len(body)} data bytes is truncated")
        _, address, count, nbytes = _MULTIPLE.unpack_from(pdu)
        data = body[5:]
        if len(data) != nbytes:
            raise FrameError(f"byte count {nbytes} but {len(data)} data bytes follow")
        limit = MAX_WRITE_BITS if fc == 15 else MAX_WRITE_REGISTERS
        want = (count + 7) // 8 if fc == 15 else 2 * count
        if not 1 <= count <= limit or nbytes != want:
            raise RequestRejected(slave, fc, 3, f"count {count} with byte count {nbytes}")
        if address + count > 0x10000:
            raise RequestRejected(
                slave, fc, 2, f"{count} items from {address} run past the address space"
            )
        if fc == 15:
            return WriteBitsRequest(slave, address, unpack_bits(data, count))
        return WriteRegistersRequest(slave, address, registers(count).unpack(data))
    if fc == 21:
        if len(body) < 1 or body[0] != len(body) - 1:
            raise FrameError("function 21 request whose byte count is not its length")
        if len(body) < 8 or body[1] != 6:
            raise RequestRejected(
                slave, fc, 3, "function 21 takes one sub-request of reference type 6"
            )
        words = int.from_bytes(body[6:8], "big")
        if 8 + 2 * words != len(body) or words == 0:
            raise RequestRejected(
                slave, fc, 3, f"record length {words} with {len(body) - 8} data bytes"
            )
        record = int.from_bytes(body[4:6], "big")
        if record > 9999:
            raise RequestRejected(slave, fc, 2, f"record {record} is outside 0..9999")
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
            raise RequestRejected(
                slave, fc, 1, f"MEI type {body[0]} is not 14 (device identification)"
            )
        if body[1] not in (1, 2, 3, 4):
            raise RequestRejected(slave, fc, 3, f"read device id code {body[1]} is outside 1..4")
        return DeviceIdRequest(slave, body[1], body[2])
    raise RequestRejected(slave, fc, 1, f"function {fc} is not supported")


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
    """The PDU of ``resp`` (the slave's side)."""
    head = _u8("function", resp.function)
    if isinstance(resp, ReadBitsResponse):
        packed = pack_bits(resp.bits)
        body = bytes([len(packed)]) + packed
    elif isinstance(resp, ReadRegistersResponse):
        n = len(resp.registers)
        try:
            body = bytes([2 * n]) + registers(n).pack(*resp.registers)
        except (struct.error, ValueError) as exc:  # ValueError: more than 127 registers
            raise LocalError(f"registers {resp.registers!r} do not fit a response") from exc
    elif isinstance(resp, WriteSingleResponse):
        body = _u16("address", resp.address) + _u16("value", resp.value)
    elif isinstance(resp, WriteMultipleResponse):
        body = _u16("address", resp.address) + _u16("count", resp.count)
    elif isinstance(resp, DiagnosticsResponse):
        body = _u16("sub-function", resp.sub_function) + resp.data
    elif isinstance(resp, WriteFileRecordResponse):
        req = WriteFileRecordRequest(resp.slave, resp.file, resp.record, resp.data)
        body = encode_request(req)[1:]
    else:
        body = bytes(
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
            body += _u8("object id", oid) + _u8("object length", len(value)) + value
    if 1 + len(body) > MAX_PDU:
        raise LocalError(f"response PDU of {1 + len(body)} bytes exceeds {MAX_PDU}")
    return head + body


def exception_response(function: int, code: int) -> bytes:
    """The exception response PDU to ``function`` with exception ``code``."""
    return bytes([(function | 0x80) & 0xFF, code])


def response_length(prefix: bytes | bytearray) -> int | None:
    """Length of the response PDU that starts with ``prefix``, by its own header;
    ``None`` while too few bytes have arrived to tell, or for a function whose
    length only the request tells (8, 43)."""
    if not prefix:
        return None
    fc = prefix[0]
    if fc & 0x80:
        return 2
    if fc in (1, 2, 3, 4, 21):  # 21: the echo of the request
        return 2 + prefix[1] if len(prefix) >= 2 else None
    if fc in (5, 6, 15, 16):
        return 5
    return None


def decode_response(req: Request, pdu: bytes | bytearray) -> Response:
    """The response to ``req`` in ``pdu`` (the master's side).

    Raises :class:`DeviceException` for an exception response and
    :class:`FrameError` for a PDU that does not answer ``req`` (another
    function, a length or byte count that does not fit, a write acknowledged
    at another address, a function 21 that is not the echo).
    """
    slave = req.slave
    fc = pdu[0] if pdu else -1
    if fc == req.function | 0x80 and len(pdu) == 2:
        raise DeviceException(pdu[1], req.function)
    if fc != req.function:
        raise FrameError(f"response to function {fc}, expected {req.function}")
    body = pdu[1:]
    if isinstance(req, ReadRequest):
        if not body or body[0] != len(body) - 1:
            raise FrameError(f"read response of {len(pdu)} bytes with a byte count that differs")
        if req.function in (1, 2):
            if body[0] != (req.count + 7) // 8:
                raise FrameError(f"{body[0]} data bytes for {req.count} bits")
            return ReadBitsResponse(slave, fc, unpack_bits(body[1:], req.count))
        if body[0] != 2 * req.count:
            raise FrameError(f"{body[0]} data bytes for {req.count} registers")
        return ReadRegistersResponse(slave, fc, registers(req.count).unpack_from(body, 1))
    if isinstance(req, WriteSingleRequest | WriteBitsRequest | WriteRegistersRequest):
        if len(body) != 4:
            raise FrameError(f"write acknowledged with {len(body)} data bytes, not 4")
        _, address, value = READ.unpack(pdu)
        if address != req.address:
            raise FrameError(f"write acknowledged at {address}, sent to {req.address}")
        if isinstance(req, WriteSingleRequest):
            return WriteSingleResponse(slave, fc, address, value)
        return WriteMultipleResponse(slave, fc, address, value)
    if isinstance(req, WriteFileRecordRequest):
        if bytes(pdu) != encode_request(req):
            raise FrameError("function 21 answered with other than the echo of the request")
        return WriteFileRecordResponse(slave, req.file, req.record, req.data)
    if isinstance(req, DiagnosticsRequest):
        if len(body) < 2:
            raise FrameError("diagnostics answer without a sub-function")
        sub = int.from_bytes(body[0:2], "big")
        if sub != req.sub_function:
            raise FrameError(f"diagnostics answer to sub-function {sub}")
        return DiagnosticsResponse(slave, sub, bytes(body[2:]))
    if len(body) < 6 or body[0] != 14:
        raise FrameError(f"MEI type {body[0] if body else None} in the answer, expected 14")
    objects: dict[int, bytes] = {}
    pos = 6
    for _ in range(body[5]):
        if pos + 2 > len(body) or pos + 2 + body[pos + 1] > len(body):
            raise FrameError("device identification objects run past the response")
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
