"""protocols.modbus.rtu (and pdu): one golden table drives encoders and decoders, byte by byte
too; the parsers never fail with anything but our own errors."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import DeviceException, FrameError, LocalError, ProtocolError
from protocols.modbus import rtu
from protocols.modbus.pdu import (
    DeviceIdRequest,
    DeviceIdResponse,
    DiagnosticsRequest,
    DiagnosticsResponse,
    ReadBitsResponse,
    ReadRegistersResponse,
    ReadRequest,
    Request,
    RequestRejected,
    Response,
    WriteBitsRequest,
    WriteMultipleResponse,
    WriteRegistersRequest,
    WriteSingleRequest,
    WriteSingleResponse,
)
from protocols.modbus.rtu import ResponseParser

H = bytes.fromhex

# (case, request, request bytes, response, response bytes); CRCs as published in
# the serial line spec's examples or checked by the bitwise reference below
GOLDEN: list[tuple[str, Request, bytes, Response, bytes]] = [
    (
        "fc3 spec example (slave 17)",
        ReadRequest(0x11, 3, 0x6B, 3),
        H("11 03 00 6b 00 03 76 87"),
        ReadRegistersResponse(0x11, 3, (0xAE41, 0x5652, 0x4340)),
        H("11 03 06 ae 41 56 52 43 40 49 ad"),
    ),
    (
        "fc4 one input register",
        ReadRequest(1, 4, 8, 1),
        H("01 04 00 08 00 01 b0 08"),
        ReadRegistersResponse(1, 4, (7,)),
        H("01 04 02 00 07 f8 f2"),
    ),
    (
        "fc1 ten coils",
        ReadRequest(1, 1, 0x13, 10),
        H("01 01 00 13 00 0a 4d c8"),
        ReadBitsResponse(1, 1, (True, False, True, True, False, False, True, True, True, True)),
        H("01 01 02 cd 03 ad 6d"),
    ),
    (
        "fc2 discrete inputs",
        ReadRequest(1, 2, 0xC4, 3),
        H("01 02 00 c4 00 03 79 f6"),
        ReadBitsResponse(1, 2, (False, True, True)),
        H("01 02 01 06 21 8a"),
    ),
    (
        "fc5 coil on",
        WriteSingleRequest(1, 5, 0xAC, 0xFF00),
        H("01 05 00 ac ff 00 4c 1b"),
        WriteSingleResponse(1, 5, 0xAC, 0xFF00),
        H("01 05 00 ac ff 00 4c 1b"),
    ),
    (
        "fc6 one register",
        WriteSingleRequest(1, 6, 1, 3),
        H("01 06 00 01 00 03 98 0b"),
        WriteSingleResponse(1, 6, 1, 3),
        H("01 06 00 01 00 03 98 0b"),
    ),
    (
        "fc15 ten coils",
        WriteBitsRequest(1, 0x13, (True, False, True, True, False, False, True, True, True, False)),
        H("01 0f 00 13 00 0a 02 cd 01 72 cb"),
        WriteMultipleResponse(1, 15, 0x13, 10),
        H("01 0f 00 13 00 0a 24 09"),
    ),
    (
        "fc16 two registers",
        WriteRegistersRequest(1, 1, (0x000A, 0x0102)),
        H("01 10 00 01 00 02 04 00 0a 01 02 92 30"),
        WriteMultipleResponse(1, 16, 1, 2),
        H("01 10 00 01 00 02 10 08"),
    ),
    (
        "fc8 return query data",
        DiagnosticsRequest(1, 0, H("a5 37")),
        H("01 08 00 00 a5 37 da 8d"),
        DiagnosticsResponse(1, 0, H("a5 37")),
        H("01 08 00 00 a5 37 da 8d"),
    ),
    (
        "fc8 bus message count",
        DiagnosticsRequest(1, 11),
        H("01 08 00 0b 00 00 91 c9"),
        DiagnosticsResponse(1, 11, H("01 2c")),
        H("01 08 00 0b 01 2c 91 84"),
    ),
    (
        "fc43/14 basic identification",
        DeviceIdRequest(1, 1, 0),
        H("01 2b 0e 01 00 70 77"),
        DeviceIdResponse(1, 1, 0x81, False, 0, {0: b"AB", 1: b"C"}),
        H("01 2b 0e 01 81 00 00 02 00 02 41 42 01 01 43 55 0a"),
    ),
]
IDS = [g[0] for g in GOLDEN]


def _bitwise_crc(data: bytes) -> int:
    """The spec's bit-by-bit CRC procedure (serial line spec, 6.2.2)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


@pytest.mark.parametrize("frame", [g[2] for g in GOLDEN] + [g[4] for g in GOLDEN])
def test_golden_crcs_follow_the_bitwise_procedure(frame: bytes) -> None:
    assert _bitwise_crc(frame[:-2]).to_bytes(2, "little") == frame[-2:]


@given(st.binary(max_size=300))
def test_table_crc_equals_bitwise_crc(data: bytes) -> None:
    assert rtu.crc16(data) == _bitwise_crc(data)


def test_crc_of_spec_example() -> None:
    assert rtu.crc16(H("11 03 00 6b 00 03")) == 0x8776  # sent low byte first: 76 87
    assert rtu.crc16(H("01 03 00 00 00 0a")) == 0xCDC5


@pytest.mark.parametrize(("case", "req", "req_bytes", "resp", "resp_bytes"), GOLDEN, ids=IDS)
def test_encode_request(
    case: str, req: Request, req_bytes: bytes, resp: Response, resp_bytes: bytes
) -> None:
    assert rtu.encode_request(req) == req_bytes


@pytest.mark.parametrize(("case", "req", "req_bytes", "resp", "resp_bytes"), GOLDEN, ids=IDS)
def test_decode_request(
    case: str, req: Request, req_bytes: bytes, resp: Response, resp_bytes: bytes
) -> None:
    assert rtu.decode_request(req_bytes) == req
    if rtu.request_length(req_bytes[:7]) is not None:
        assert rtu.request_length(req_bytes[:7]) == len(req_bytes)


@pytest.mark.parametrize(("case", "req", "req_bytes", "resp", "resp_bytes"), GOLDEN, ids=IDS)
def test_encode_response(
    case: str, req: Request, req_bytes: bytes, resp: Response, resp_bytes: bytes
) -> None:
    assert rtu.encode_response(resp) == resp_bytes


@pytest.mark.parametrize(("case", "req", "req_bytes", "resp", "resp_bytes"), GOLDEN, ids=IDS)
def test_parse_response_whole_and_byte_by_byte(
    case: str, req: Request, req_bytes: bytes, resp: Response, resp_bytes: bytes
) -> None:
    assert ResponseParser(req).feed(resp_bytes) == resp
    parser = ResponseParser(req)
    results = [parser.feed(resp_bytes[i : i + 1]) for i in range(len(resp_bytes))]
    assert results[:-1] == [None] * (len(resp_bytes) - 1)
    assert results[-1] == resp
    assert parser.trailing == b""


@pytest.mark.parametrize(("case", "req", "req_bytes", "resp", "frame"), GOLDEN, ids=IDS)
def test_response_length_and_crc_of_golden_replies(
    case: str, req: Request, req_bytes: bytes, resp: Response, frame: bytes
) -> None:
    """What an RTU master uses to skip a late reply whole: the frame's own length."""
    assert rtu.crc_ok(frame)
    assert not rtu.crc_ok(frame[:-1] + bytes([frame[-1] ^ 1]))
    n = rtu.response_length(frame[:3])
    if req.function in (1, 2, 3, 4, 5, 6, 15, 16):
        assert n == len(frame)
    else:  # diagnostics, device id: only a parser that knows the request can tell
        assert n is None


def test_response_length_of_exceptions_and_short_prefixes() -> None:
    assert rtu.response_length(rtu.exception_response(3, 4, 2)[:2]) == 5
    assert rtu.response_length(b"\x01") is None
    assert rtu.response_length(b"\x01\x03") is None  # the byte count is still to come
    assert not rtu.crc_ok(b"\x01\x03")


def test_trailing_bytes_are_kept() -> None:
    req = ReadRequest(1, 4, 8, 1)
    parser = ResponseParser(req)
    assert parser.feed(H("01 04 02 00 07 f8 f2 ff 00")) == ReadRegistersResponse(1, 4, (7,))
    assert parser.trailing == H("ff 00")


# ------------------------------------------------------------------ errors

READ = ReadRequest(1, 3, 0, 1)


@pytest.mark.parametrize(
    ("case", "data", "match"),
    [
        ("bad crc", H("01 03 02 00 07 00 00"), "bad CRC"),
        ("wrong slave", H("02 03 02 00 07"), "slave 2"),
        ("wrong function", H("01 04 02 00 07"), "function 4"),
        ("byte count", rtu.with_crc(H("01 03 04 00 07 00 08")), "4 data bytes"),
    ],
)
def test_response_frame_errors(case: str, data: bytes, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        ResponseParser(READ).feed(data)


@pytest.mark.parametrize("code", [1, 2, 3, 4])
def test_exception_response_raises_device_exception(code: int) -> None:
    frame = rtu.exception_response(1, 3, code)
    assert frame[:3] == bytes([1, 0x83, code])
    parser = ResponseParser(READ)
    for b in frame[:-1]:
        assert parser.feed(bytes([b])) is None
    with pytest.raises(DeviceException) as exc:
        parser.feed(frame[-1:])
    assert (exc.value.code, exc.value.function) == (code, 3)


def test_exception_response_with_bad_crc_is_a_frame_error() -> None:
    frame = bytearray(rtu.exception_response(1, 3, 2))
    frame[-1] ^= 1
    with pytest.raises(FrameError):
        ResponseParser(READ).feed(bytes(frame))


@pytest.mark.parametrize(
    ("case", "body", "code"),
    [
        ("unknown function", H("01 41 00 00"), 1),
        ("read count 0", H("01 03 00 00 00 00"), 3),
        ("read count 126", H("01 03 00 00 00 7e"), 3),
        ("past the address space", H("01 03 ff ff 00 02"), 2),
        ("coil value", H("01 05 00 01 12 34"), 3),
        ("fc16 byte count", H("01 10 00 01 00 02 02 00 01"), 3),
        ("MEI type 13", H("01 2b 0d 01 00"), 1),
        ("read id code 5", H("01 2b 0e 05 00"), 3),
    ],
)
def test_requests_to_reject(case: str, body: bytes, code: int) -> None:
    with pytest.raises(RequestRejected) as exc:
        rtu.decode_request(rtu.with_crc(body))
    assert exc.value.code == code
    assert rtu.exception_response(exc.value.slave, exc.value.function, code)[2] == code


@pytest.mark.parametrize(
    ("case", "frame"),
    [
        ("short", H("01 03 00")),
        ("bad crc", H("01 03 00 00 00 01 00 00")),
        ("truncated read", rtu.with_crc(H("01 03 00 00 00"))),
        ("fc16 without data", rtu.with_crc(H("01 10 00 01"))),
    ],
)
def test_requests_to_ignore(case: str, frame: bytes) -> None:
    with pytest.raises(FrameError):
        rtu.decode_request(frame)


def test_builders_refuse_impossible_requests() -> None:
    with pytest.raises(LocalError, match="count"):
        rtu.read_holding_registers(1, 0, 126)
    with pytest.raises(LocalError, match=r"outside 0\.\.65535"):
        rtu.write_register(1, 0, 70000)
    with pytest.raises(LocalError, match="broadcast"):
        ResponseParser(ReadRequest(0, 3, 0, 1))


def test_timing() -> None:
    assert rtu.frame_time(8, 9600) == pytest.approx(8 * 11 / 9600)
    assert rtu.t35(9600) == pytest.approx(3.5 * 11 / 9600)  # about 4.01 ms
    assert rtu.t35(19200) == pytest.approx(3.5 * 11 / 19200)
    assert rtu.t35(38400) == 0.00175  # fixed above 19200 baud
    assert rtu.t35(115200) == 0.00175
    assert rtu.t15(115200) == 0.00075
    with pytest.raises(LocalError):
        rtu.frame_time(1, 0)


# ------------------------------------------------------------------ fuzz

ANY_REQUEST = st.one_of(
    st.builds(
        ReadRequest,
        st.integers(1, 247),
        st.sampled_from([3, 4]),
        st.integers(0, 1000),
        st.integers(1, 125),
    ),
    st.builds(
        ReadRequest,
        st.integers(1, 247),
        st.sampled_from([1, 2]),
        st.integers(0, 1000),
        st.integers(1, 2000),
    ),
    st.builds(
        WriteSingleRequest,
        st.integers(1, 247),
        st.just(6),
        st.integers(0, 65535),
        st.integers(0, 65535),
    ),
    st.builds(
        WriteRegistersRequest,
        st.integers(1, 247),
        st.integers(0, 1000),
        st.lists(st.integers(0, 65535), min_size=1, max_size=123).map(tuple),
    ),
    st.builds(
        WriteBitsRequest,
        st.integers(1, 247),
        st.integers(0, 1000),
        st.lists(st.booleans(), min_size=1, max_size=100).map(tuple),
    ),
    st.builds(
        DiagnosticsRequest,
        st.integers(1, 247),
        st.integers(0, 20),
        st.binary(min_size=0, max_size=20),
    ),
    st.builds(DeviceIdRequest, st.integers(1, 247), st.integers(1, 4), st.integers(0, 255)),
)


@given(ANY_REQUEST, st.binary(max_size=300), st.integers(1, 17))
def test_fuzz_response_parser(req: Request, data: bytes, chunk: int) -> None:
    parser = ResponseParser(req)
    got = None
    try:
        for i in range(0, len(data), chunk):
            if (got := parser.feed(data[i : i + chunk])) is not None:
                break
    except (ProtocolError, DeviceException):  # our errors: garbage, or an exception answer
        return
    # no error: still waiting for bytes, or the answer of the slave and function asked
    assert got is None or (got.slave, got.function) == (req.slave, req.function)


@given(ANY_REQUEST, st.binary(max_size=40))
def test_fuzz_response_parser_with_right_header(req: Request, tail: bytes) -> None:
    """Bytes that start like the right answer get deeper into the parser."""
    parser = ResponseParser(req)
    try:
        got = parser.feed(bytes([req.slave, req.function]) + tail)
    except ProtocolError:
        return
    assert got is None or (got.slave, got.function) == (req.slave, req.function)


@given(st.binary(max_size=300))
def test_fuzz_decode_request(data: bytes) -> None:
    try:
        req = rtu.decode_request(data)
    except ProtocolError:
        req = None
    if req is not None:
        assert rtu.decode_request(rtu.encode_request(req)) == req
    try:
        n = rtu.request_length(data)
    except ProtocolError:
        return
    assert n is None or n >= 4


@given(st.binary(min_size=2, max_size=250))
def test_fuzz_decode_request_with_good_crc(body: bytes) -> None:
    try:
        req = rtu.decode_request(rtu.with_crc(body))
    except ProtocolError:
        return
    assert rtu.decode_request(rtu.encode_request(req)) == req  # what decodes, re-encodes


@given(ANY_REQUEST)
def test_request_round_trip(req: Request) -> None:
    assert rtu.decode_request(rtu.encode_request(req)) == req


def test_sans_io() -> None:
    tree = ast.parse(Path(rtu.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "serial", "socket", "select", "os"}
