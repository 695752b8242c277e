"""Modbus links: RTU on a serial port, Modbus TCP, RTU over TCP.

:class:`ModbusLink` is the one small interface the bus scheduler talks to:
``connect``, ``read``, ``write``, ``close``, each raising :class:`NoResponse`
(the device was silent), :class:`BadResponse` (something answered, but not a
valid reply to this request: bad CRC, wrong length, garbage, a broken echo),
:class:`LinkDown` (the port or connection is gone) or
:class:`protocols.errors.DeviceException` (the device answered with an
exception code). Retries are the scheduler's business: a link never retries.

These are our own small masters, not pymodbus's clients, for what a street
cabinet needs and pymodbus's serial client cannot give (see
``docs/field-buses.md``):

* **RTU on a serial port** (:mod:`agent.fieldbus.rtu`): the line is opened with
  pyserial (baud, parity, stop bits; parity ``N`` on pseudo terminals, which
  refuse parity bits) and then driven from the event loop (``add_reader`` on its descriptor). A
  request goes out only after the line has been silent for the inter-frame
  delay (t3.5 by default) counted from the last byte seen, timed to the
  microsecond by a ``timerfd`` instead of the loop's millisecond timeouts; the
  input is flushed right before the request; the local echo of 2-wire
  adapters can be discarded; a reply is accepted only from the addressed slave
  with the request's function, length and a good CRC. RTU has no transaction
  id, so that filter alone would take a late reply (the same slave answering
  the same function and count after its timeout) for the answer to the next
  request: the master also keeps the line quiet for a late window after
  every timeout and takes only a reply it can tie to the request on the wire
  (:class:`~agent.fieldbus.rtu.RtuLink` has the rules, ``docs/field-buses.md``
  explains them).
* **Modbus TCP** (:mod:`agent.fieldbus.tcp`): one connection per bus (devices
  behind a gateway share it by unit id; devices that accept one connection only get exactly one); every
  request carries a fresh transaction id, the late reply of a request that
  timed out is dropped, and any other break of the framing (garbage, an id
  not out, bytes after a reply, half a reply) fails the request on the wire
  and closes the connection, reopened with back-off
  (:class:`~agent.fieldbus.tcp.TcpLink`); the input is drained before each
  request (a device that closed an idle connection gets a new one first, not a
  failed poll). Replies of all the TCP links of an event loop are collected
  together (its reactor): a few wake-ups per burst of polls instead of one per
  reply.
* **RTU over TCP** (serial device servers, :mod:`agent.fieldbus.rtu`): the RTU
  master above on a TCP stream.

This module holds what every link shares: the interface and its factory
(:meth:`ModbusLink.tcp`, :meth:`ModbusLink.serial`, which import the kind of link
they build: a gateway without a serial bus never loads the RTU module), the
errors, and the size of a read buffer.

A link that cannot connect backs off (0.5 s doubling to 30 s) and raises
:class:`LinkDown` at once meanwhile, so a dead converter costs its bus one
connect timeout per back-off period, not one per request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from protocols.errors import DeviceException, RemoteError
from protocols.modbus import Space
from protocols.modbus import pdu as modbus_pdu
from protocols.modbus.pdu import read_items, read_request, reply_length
from protocols.modbus.rtu import t35

__all__ = [
    "RX_SIZE",
    "BadResponse",
    "Done",
    "LinkDown",
    "ModbusLink",
    "NoResponse",
    "TransportError",
    "wake",
]

# what start_read calls back with: the registers or bits read, or the error
Done = Callable[["Sequence[int] | Sequence[bool] | Exception"], None]


class TransportError(RemoteError):
    """The link to a device failed."""


class NoResponse(TransportError):
    """The device did not answer within the response timeout."""


class BadResponse(TransportError):
    """Something answered, but not a valid reply (CRC, length, header, echo)."""


class LinkDown(TransportError):
    """The serial port or TCP connection is not usable."""


# A read buffer's size (a TCP link's, an RTU-over-TCP stream's). A Modbus TCP frame is
# at most 6 + 254 bytes and the buffer never keeps more than the start of one after a
# read: there is always room for the next read (a long frame behind another may take
# two). 500 links: 256 KiB.
RX_SIZE = 512


def wake(fut: asyncio.Future[None]) -> None:
    """Done ``fut`` unless it is already: the callback of a timer or a reader that
    wakes a waiting task (the engine's sleep, an RTU link's timer)."""
    if not fut.done():
        fut.set_result(None)


# --------------------------------------------------------------------------- the link


class ModbusLink:
    """A Modbus master on one bus. Build one with :meth:`tcp` or :meth:`serial`.

    ``inter_frame_s`` is the silence kept before every request, counted from
    the last byte on the line (RTU) or the last reply (TCP, usually 0); the
    bus scheduler may raise it (``BusPoller(inter_frame_s=...)``).
    """

    describe: str
    inter_frame_s: float

    def __init__(self, describe: str, *, timeout_s: float, inter_frame_s: float = 0.0) -> None:
        self.describe = describe
        self.timeout_s = timeout_s
        self.inter_frame_s = inter_frame_s
        self.requests = 0
        self.replies = 0
        self.timeouts = 0
        self.bad_frames = 0
        self.stray_bytes = 0
        self.connects = 0
        # ``vitals diag trace``: called with ("tx" | "rx", raw bytes) as they go and come
        # (RTU links); None, the agent's case, costs one check per frame and per read
        self.trace: Callable[[str, bytes], None] | None = None
        self._retry_at = 0.0
        self._backoff = 0.0
        self._down_why = ""
        # one transaction at a time, whoever asks (the poller, a hub command, diag):
        # a bus is half duplex, and a reply must never be taken by another request
        self._turn = asyncio.Lock()

    # -- constructors

    @classmethod
    def tcp(
        cls,
        host: str,
        port: int,
        *,
        timeout_s: float,
        rtu_framing: bool = False,
        baud: int = 9600,
        inter_frame_s: float | None = None,
    ) -> ModbusLink:
        """Modbus TCP to ``host:port``, or with ``rtu_framing`` RTU over TCP.

        For RTU over TCP, ``baud`` is the serial side's speed (the gap before a
        request defaults to its t3.5, which the device server may not keep).
        """
        if rtu_framing:
            from agent.fieldbus.rtu import RtuOverTcpLink  # not loaded without an RTU bus

            gap = t35(baud) if inter_frame_s is None else inter_frame_s
            return RtuOverTcpLink(host, port, timeout_s=timeout_s, inter_frame_s=gap)
        from agent.fieldbus.tcp import TcpLink

        return TcpLink(host, port, timeout_s=timeout_s, inter_frame_s=inter_frame_s or 0.0)

    @classmethod
    def serial(
        cls,
        port: str,
        *,
        baud: int,
        parity: str = "E",
        stopbits: int = 1,
        bytesize: int = 8,
        timeout_s: float,
        inter_frame_s: float | None = None,
        discard_echo: bool = False,
    ) -> ModbusLink:
        """Modbus RTU on a serial port (RS-485 adapter, UART, or a pty)."""
        from agent.fieldbus.rtu import SerialLink  # not loaded by a TCP-only gateway

        gap = t35(baud) if inter_frame_s is None else inter_frame_s
        return SerialLink(
            port,
            baud=baud,
            parity=parity,
            stopbits=stopbits,
            bytesize=bytesize,
            timeout_s=timeout_s,
            inter_frame_s=gap,
            discard_echo=discard_echo,
        )

    # -- the interface

    @property
    def connected(self) -> bool:
        raise NotImplementedError

    async def connect(self) -> None:
        """Open the port or connection; :class:`LinkDown` if it cannot be."""
        if self.connected:
            return
        now = time.monotonic()
        if now < self._retry_at:
            # the reason of the failed attempt, so status says why, not just "down"
            raise LinkDown(
                f"{self._down_why} (next connect attempt in {self._retry_at - now:.1f} s)"
            )
        try:
            await self._open()
        except LinkDown as exc:
            self._down_why = str(exc)
            self._backoff = min(30.0, self._backoff * 2 or 0.5)
            self._retry_at = time.monotonic() + self._backoff
            raise
        self.connects += 1
        self._backoff = 0.0
        self._retry_at = 0.0

    async def read(
        self, space: Space, address: int, count: int, slave: int
    ) -> Sequence[int] | Sequence[bool]:
        """Registers (function 3, 4) or bits (1, 2) ``address .. address+count-1``."""
        fc = space.read_function
        reply = await self._request(
            slave, read_request(fc, address, count), reply_length(fc, count)
        )
        return read_items(fc, count, reply)

    # A link that can carry a read without a task waiting for it says so here
    # (the TcpEngine polls such links; others go through read()).
    callbacks = False

    def start_read(self, space: Space, address: int, count: int, slave: int, done: Done) -> bool:
        """Send a read now; ``done`` gets the registers or bits, or the error, later.

        False when the link cannot do it this way now (not connected, busy with
        a caller of :meth:`read`): then use :meth:`read`. ``done`` is called
        from the event loop, never before this returns. The input is not
        drained here, one link at a time: call :func:`drain_input` first.
        """
        return False

    async def write(
        self, function: int, address: int, payload: list[int] | bool, slave: int
    ) -> None:
        """Function 5 (``bool``), 6 (one word), 15 (bits as 0/1) or 16 (words);
        :class:`~protocols.errors.LocalError` for anything else."""
        pdu = modbus_pdu.encode_write(function, address, payload)
        reply = await self._request(slave, pdu, 5)
        if reply[:5] != pdu[:5]:
            raise BadResponse(f"{self.describe}: slave {slave} echoed {reply.hex()} to a write")

    def close(self) -> None:
        raise NotImplementedError

    def late_window(self, slave: int) -> float:
        """The silence kept after a timeout of ``slave`` before the next request."""
        return 0.0

    def statistics(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "replies": self.replies,
            "timeouts": self.timeouts,
            "bad_frames": self.bad_frames,
            "stray_bytes": self.stray_bytes,
            "connects": self.connects,
        }

    # -- for the kinds of link

    async def _open(self) -> None:
        raise NotImplementedError

    async def _exchange(self, slave: int, pdu: bytes, reply_len: int) -> bytes:
        """Send ``pdu`` to ``slave``; its reply PDU (normal or exception)."""
        raise NotImplementedError

    async def _request(self, slave: int, pdu: bytes, reply_len: int) -> bytes:
        async with self._turn:
            if not self.connected:
                await self.connect()
            self.requests += 1
            reply = await self._exchange(slave, pdu, reply_len)
        return self._checked(slave, pdu[0], reply_len, reply)

    def _checked(self, slave: int, fc: int, reply_len: int, reply: bytes) -> bytes:
        """The reply PDU to function ``fc``, or the exception or error it means."""
        self.replies += 1
        if reply[0] == fc | 0x80:
            raise DeviceException(reply[1], fc)
        if fc <= 4 and reply[1] != reply_len - 2:
            self.bad_frames += 1
            raise BadResponse(
                f"{self.describe}: slave {slave} sent {reply[1]} data bytes, expected {reply_len - 2}"
            )
        return reply
