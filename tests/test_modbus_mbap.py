"""protocols.modbus.mbap: the MBAP header both ways, and the transaction table as a
state machine, every transition walked with no socket and no sleep; pymodbus's own
framer decodes our frames (the independent oracle)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymodbus.framer import FramerSocket
from pymodbus.pdu import DecodePDU

from protocols.errors import FrameError
from protocols.modbus import mbap, pdu
from protocols.modbus.pdu import (
    ReadRegistersResponse,
    ReadRequest,
    WriteRegistersRequest,
    decode_response,
    encode_request,
    encode_response,
)

# ------------------------------------------------------------------ the header


def test_a_read_request_byte_by_byte() -> None:
    # tid 0x0102, protocol 0, length 6, unit 17, fc 3, address 0x006B, count 3
    want = bytes.fromhex("0102 0000 0006 11 03 006b 0003")
    assert mbap.read_request(0x0102, 17, 3, 0x6B, 3) == want
    assert mbap.adu(0x0102, 17, encode_request(ReadRequest(17, 3, 0x6B, 3))) == want
    assert mbap.decode_header(want) == (0x0102, 12)
    assert mbap.frame_length(want[:6]) == 12
    assert mbap.frame_length(want[:5]) is None


@pytest.mark.parametrize(
    ("head", "why"),
    [
        (bytes.fromhex("0001 0001 0006"), "protocol id 1"),
        (bytes.fromhex("0001 0000 0001"), "length 1"),
        (bytes.fromhex("0001 0000 00ff"), "length 255"),
    ],
)
def test_a_header_that_is_not_modbus_tcp(head: bytes, why: str) -> None:
    with pytest.raises(FrameError, match=why):
        mbap.decode_header(head)


@given(
    tid=st.integers(0, 0xFFFF),
    unit=st.integers(0, 255),
    address=st.integers(0, 0xFFFF - 125),
    count=st.integers(1, 125),
)
def test_pymodbus_decodes_our_requests(tid: int, unit: int, address: int, count: int) -> None:
    frame = mbap.read_request(tid, unit, 3, address, count)
    used, got = FramerSocket(DecodePDU(is_server=True)).handleFrame(frame, 0, 0)
    assert used == len(frame)
    assert got is not None
    assert (got.transaction_id, got.dev_id, got.function_code) == (tid, unit, 3)
    assert (got.address, got.count) == (address, count)


@given(tid=st.integers(1, 0xFFFF), words=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=123))
def test_pymodbus_decodes_our_writes_and_replies(tid: int, words: list[int]) -> None:
    write = mbap.adu(tid, 5, encode_request(WriteRegistersRequest(5, 100, tuple(words))))
    _, req = FramerSocket(DecodePDU(is_server=True)).handleFrame(write, 0, 0)
    assert req is not None
    assert (req.transaction_id, req.function_code, req.address) == (tid, 16, 100)
    assert list(req.registers) == words
    reply = mbap.adu(tid, 5, encode_response(ReadRegistersResponse(5, 4, tuple(words))))
    _, resp = FramerSocket(DecodePDU(is_server=False)).handleFrame(reply, 5, tid)
    assert resp is not None
    assert (resp.transaction_id, resp.function_code) == (tid, 4)
    assert list(resp.registers) == words


def test_our_decoder_takes_pymodbus_frames() -> None:
    """The other way round: a reply pymodbus frames decodes here to the same registers."""
    from pymodbus.pdu.register_message import ReadHoldingRegistersResponse

    msg = ReadHoldingRegistersResponse(registers=[1, 0xFFFF, 0x1234], dev_id=9, transaction_id=77)
    frame = FramerSocket(DecodePDU(is_server=False)).buildFrame(msg)
    tid, end = mbap.decode_header(frame)
    assert (tid, end, frame[6]) == (77, len(frame), 9)
    got = decode_response(ReadRequest(9, 3, 0, 3), frame[7:end])
    assert got == ReadRegistersResponse(9, 3, (1, 0xFFFF, 0x1234))


# ------------------------------------------------------------------ the transaction table


def test_a_request_and_its_reply() -> None:
    tx = mbap.Transactions()
    assert not tx.due and not tx.waiting
    tid = tx.send()
    assert (tid, tx.waiting, tx.due) == (1, True, True)
    assert tx.receive(tid) is True
    assert (tx.acked, tx.waiting, tx.due) == (1, False, False)


def test_a_reply_twice_is_a_fault() -> None:
    tx = mbap.Transactions()
    tid = tx.send()
    assert tx.receive(tid)
    with pytest.raises(FrameError, match=f"transaction id {tid}, which is on no request out"):
        tx.receive(tid)


def test_an_id_never_sent_is_a_fault() -> None:
    tx = mbap.Transactions()
    tx.send()
    with pytest.raises(FrameError, match="transaction id 2"):
        tx.receive(2)
    with pytest.raises(FrameError, match="transaction id 0"):
        tx.receive(0)


def test_the_late_reply_of_a_timed_out_request_is_dropped_then_the_reply_taken() -> None:
    tx = mbap.Transactions()
    first = tx.send()
    tx.expire()  # no reply within the timeout
    assert (tx.waiting, tx.due) == (False, True)
    second = tx.send()
    assert tx.receive(first) is False  # late: dropped, not taken for the second's reply
    assert tx.waiting and tx.due
    assert tx.receive(second) is True
    assert not tx.due


def test_late_replies_come_in_order_or_not_at_all() -> None:
    tx = mbap.Transactions()
    a = tx.send()
    tx.expire()
    b = tx.send()
    tx.expire()
    c = tx.send()
    assert tx.receive(b) is False  # a's reply never came: b's late one may still
    with pytest.raises(FrameError):
        tx.receive(a)  # but not a's after b's: a stream keeps its order
    assert tx.receive(c) is True


def test_a_late_reply_while_none_waits() -> None:
    tx = mbap.Transactions()
    a = tx.send()
    tx.expire()
    assert tx.receive(a) is False
    assert not tx.due  # everything answered: bytes now are no reply


def test_only_the_last_64_late_replies_are_remembered() -> None:
    tx = mbap.Transactions()
    first = tx.send()
    tx.expire()
    for _ in range(70):
        tx.send()
        tx.expire()
    with pytest.raises(FrameError):
        tx.receive(first)  # 70 requests back: long gone
    assert tx.receive((tx.tid - 63) & 0xFFFF) is False


def test_a_new_connection_forgets_the_old_one() -> None:
    tx = mbap.Transactions()
    old = tx.send()
    tx.expire()
    tx.open()
    assert not tx.due and not tx.waiting
    with pytest.raises(FrameError):
        tx.receive(old)  # a reply of the old connection cannot come on the new one
    new = tx.send()
    assert new == old + 1  # ids go on: a stray old frame is never taken for a new reply
    assert tx.receive(new)


def test_an_abandoned_request_s_reply_is_late() -> None:
    tx = mbap.Transactions()
    tid = tx.send()
    tx.abandon()  # the caller went away (cancelled)
    assert tx.receive(tid) is False


def test_ids_wrap_at_65536_and_zero_is_an_id() -> None:
    tx = mbap.Transactions()
    tx.tid = tx.acked = 0xFFFE
    assert tx.send() == 0xFFFF
    tx.expire()
    assert tx.send() == 0
    assert tx.receive(0xFFFF) is False  # late, across the wrap
    assert tx.receive(0) is True


# ------------------------------------------------------------------ the PDU shortcuts


@given(count=st.integers(1, 125), words=st.data())
def test_the_hot_path_agrees_with_the_codec(count: int, words: st.DataObject) -> None:
    regs = tuple(words.draw(st.lists(st.integers(0, 0xFFFF), min_size=count, max_size=count)))
    req = ReadRequest(1, 4, 0, count)
    assert pdu.read_request(4, 0, count) == encode_request(req)
    reply = encode_response(ReadRegistersResponse(1, 4, regs))
    assert len(reply) == pdu.reply_length(4, count) == pdu.response_length(reply[:2])
    assert tuple(pdu.read_items(4, count, reply)) == decode_response(req, reply).registers  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("function", "payload", "want"),
    [
        (5, True, "05 0007 ff00"),
        (5, False, "05 0007 0000"),
        (6, [0x1234], "06 0007 1234"),
        (15, [1, 0, 1], "0f 0007 0003 01 05"),
        (16, [1, 2], "10 0007 0002 04 0001 0002"),
    ],
)
def test_encode_write(function: int, payload: list[int] | bool, want: str) -> None:
    assert pdu.encode_write(function, 7, payload) == bytes.fromhex(want)
    assert pdu.request_length(bytes.fromhex(want)) == len(bytes.fromhex(want))
