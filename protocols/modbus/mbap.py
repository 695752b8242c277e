"""Modbus TCP framing (sans-IO): the MBAP header and the transaction table.

A Modbus TCP frame (ADU) is the 7-byte MBAP header (transaction id, protocol
id 0, length of what follows, unit id) and a PDU (:mod:`protocols.modbus.pdu`).
:func:`adu` builds one, :func:`decode_header` reads a header (a
:class:`FrameError` for bytes that are not Modbus TCP), :func:`frame_length`
tells a frame's length from its first six bytes.

:class:`Transactions` is the master's side of one connection as a state
machine, with every rule in one place and no IO: which transaction id the
next request carries, whether a frame that arrives is the reply waited for,
the late reply of a request that timed out (dropped), or a fault (an id on no
request out: the stream is not trusted any more). The agent's Modbus TCP link
(``agent/fieldbus/tcp.py``) drives it; ``tests/test_modbus_mbap.py`` walks every
transition without a socket.

Reference: *MODBUS Messaging on TCP/IP Implementation Guide V1.0b*.
"""

from __future__ import annotations

import struct

from protocols.errors import FrameError

__all__ = [
    "HEADER",
    "MAX_LENGTH",
    "READ_REQUEST",
    "Transactions",
    "adu",
    "decode_header",
    "frame_length",
    "read_request",
]

HEADER = struct.Struct(">HHHB")
"""Transaction id, protocol id (0), length (unit id and PDU), unit id."""
_HEAD = struct.Struct(">HHH")  # the part that tells the length
READ_REQUEST = struct.Struct(">HHHBBHH")
"""A whole read request: the header, then function, address and count."""
MAX_LENGTH = 254  # unit id and a PDU of at most 253 bytes
_LATE_KEPT = 64  # late replies of at most this many requests back are recognised


def adu(tid: int, unit: int, pdu: bytes) -> bytes:
    """The Modbus TCP frame of ``pdu`` to (or from) ``unit`` as transaction ``tid``."""
    return HEADER.pack(tid, 0, len(pdu) + 1, unit) + pdu


def read_request(tid: int, unit: int, function: int, address: int, count: int) -> bytes:
    """The frame of a read (function 1-4): one precompiled struct, for the hot path."""
    return READ_REQUEST.pack(tid, 0, 6, unit, function, address, count)


def decode_header(buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int]:
    """``(transaction id, frame length)`` of the frame at ``buf[pos:]`` (at least
    6 bytes there). Raises :class:`FrameError` when they are not Modbus TCP (a
    protocol id other than 0, a length outside 2..254)."""
    tid, proto, length = _HEAD.unpack_from(buf, pos)
    if proto != 0 or not 2 <= length <= MAX_LENGTH:
        raise FrameError(f"not Modbus TCP (protocol id {proto}, length {length})")
    return tid, 6 + length


def frame_length(prefix: bytes | bytearray) -> int | None:
    """Length of the frame that starts with ``prefix``; ``None`` before 6 bytes."""
    return decode_header(prefix)[1] if len(prefix) >= 6 else None


class Transactions:
    """The transaction ids of one Modbus TCP connection, one request out at a time.

    State: ``tid``, the id of the last request sent; ``acked``, the id of the
    last reply received (the requests after it up to ``tid`` have had none
    yet); ``waiting``, whether the request ``tid`` still waits for its reply.

    ========================  =====================================================
    event                     transition
    ========================  =====================================================
    :meth:`open`              a new connection: nothing of the old one can come
                              (``acked = tid``, not waiting)
    :meth:`send`              the next id (``tid + 1``, wrapping at 65536), waiting
    :meth:`receive` of        the reply: ``acked = tid``, not waiting (``True``)
    ``tid`` while waiting
    :meth:`receive` of an id  the late reply of a request that timed out:
    in ``acked+1 .. tid``     ``acked`` = that id, dropped (``False``)
    :meth:`receive` of any    :class:`FrameError`: an id on no request out (never
    other id                  sent, already answered, or a reply to ``tid`` twice)
    :meth:`expire`            the request timed out: not waiting; its reply, if
                              it comes, is late; only the last 64 are remembered
    :meth:`abandon`           the request was given up (the caller went away)
    ========================  =====================================================

    :attr:`due` says whether a reply may still come: bytes that arrive while
    none is due are not Modbus, whatever they look like.
    """

    __slots__ = ("acked", "tid", "waiting")

    def __init__(self) -> None:
        self.tid = 0
        self.acked = 0
        self.waiting = False

    @property
    def due(self) -> bool:
        """Whether a reply (the one waited for, or a late one) may still arrive."""
        return self.acked != self.tid

    def open(self) -> None:
        """A new connection: the replies of the old one never come on it."""
        self.acked = self.tid
        self.waiting = False

    def send(self) -> int:
        """The id of the request about to be sent; it now waits for its reply."""
        self.tid = tid = (self.tid + 1) & 0xFFFF
        self.waiting = True
        return tid

    def receive(self, tid: int) -> bool:
        """A frame with ``tid`` arrived: ``True`` if it is the reply waited for,
        ``False`` if it is a late reply to drop. :class:`FrameError` if neither."""
        if tid == self.tid and self.waiting:
            self.acked = tid
            self.waiting = False
            return True
        if 0 < (tid - self.acked) & 0xFFFF <= (self.tid - self.acked) & 0xFFFF:
            self.acked = tid  # the late reply of a request that timed out
            return False
        raise FrameError(f"a reply with transaction id {tid}, which is on no request out")

    def expire(self) -> None:
        """The request on the wire timed out: its reply, if it comes, is late."""
        self.waiting = False
        if (self.tid - self.acked) & 0xFFFF > _LATE_KEPT:  # late replies of long ago: no longer
            self.acked = (self.tid - _LATE_KEPT) & 0xFFFF

    def abandon(self) -> None:
        """The request on the wire was given up: its reply, if it comes, is late."""
        self.waiting = False
