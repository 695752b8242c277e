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

* **RTU on a serial port**: the line is opened with pyserial (baud, parity,
  stop bits; parity ``N`` on pseudo terminals, which refuse parity bits) and
  then driven from the event loop (``add_reader`` on its descriptor). A
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
  (:class:`_RtuLink` has the rules, ``docs/field-buses.md`` explains them).
* **Modbus TCP**: one connection per bus (devices behind a gateway share it by
  unit id; devices that accept one connection only get exactly one); every
  request carries a fresh transaction id, the late reply of a request that
  timed out is dropped, and any other break of the framing (garbage, an id
  not out, bytes after a reply, half a reply) fails the request on the wire
  and closes the connection, reopened with back-off (:class:`_TcpLink`); the
  input is drained before each request (a device that closed an idle
  connection gets a new one first, not a failed poll). Replies of all
  the TCP links of an event loop are collected together (:class:`_Reactor`):
  a few wake-ups per burst of polls instead of one per reply.
* **RTU over TCP** (serial device servers): the RTU master above on a TCP
  stream.

A link that cannot connect backs off (0.5 s doubling to 30 s) and raises
:class:`LinkDown` at once meanwhile, so a dead converter costs its bus one
connect timeout per back-off period, not one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import math
import os
import select
import socket
import termios
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from agent.clock import libc as c_library
from agent.fieldbus.portlock import port_error, refused_parity
from protocols.errors import DeviceException, FrameError, RemoteError
from protocols.modbus import Space, mbap
from protocols.modbus import pdu as modbus_pdu
from protocols.modbus.pdu import read_items, read_request, registers, reply_length
from protocols.modbus.rtu import adu, crc_ok, frame_time, response_length, t35

if TYPE_CHECKING:
    import serial  # pyserial: imported by a serial link when it opens (0.2 MB for TCP-only gateways)

__all__ = [
    "BadResponse",
    "LinkDown",
    "ModbusLink",
    "NoResponse",
    "TransportError",
    "drain_input",
]

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- precise timer


class _Timer:
    """Sleep until a ``time.monotonic()`` instant with microsecond precision.

    The event loop waits in ``epoll_wait`` with a timeout in whole
    milliseconds (rounded up), so ``asyncio.sleep(0.00175)`` wakes 2-3 ms
    later: at 115200 baud that alone would cost a tenth of the bus. A Linux
    ``timerfd`` armed on CLOCK_MONOTONIC (the clock of ``time.monotonic``)
    wakes the loop on time. Falls back to ``asyncio.sleep`` elsewhere.

    Even so the loop runs again some 50-150 us after the timer fires (more
    on a VM): 2 % of every transaction at 115200 baud. So the timer is armed
    that much early, learnt from the last wakes (the median of how late each
    came after the instant armed, at most ``max_early_s``), and the rest is
    waited out in a short spin: never before ``when``; the spin costs some
    tens of microseconds a sleep where the wake cost 80 (``bench.bus``).
    """

    max_early_s = 0.0003
    _STEP_S = 0.000002

    _CLOCK_MONOTONIC = 1
    _TFD_CLOEXEC = 0o2000000
    _TFD_NONBLOCK = 0o4000
    _TFD_TIMER_ABSTIME = 1

    class _Spec(ctypes.Structure):
        _fields_ = [
            ("i_sec", ctypes.c_long),
            ("i_nsec", ctypes.c_long),
            ("v_sec", ctypes.c_long),
            ("v_nsec", ctypes.c_long),
        ]

    def __init__(self) -> None:
        self._fd = -1
        self._sleeping = 0
        self._closed = False
        self._early = 0.0  # how long before ``when`` the timer is armed (learnt)
        self._libc: Any = None
        try:
            libc = c_library()  # once a process: a CDLL a timer would pile up ctypes classes
            fd = libc.timerfd_create(self._CLOCK_MONOTONIC, self._TFD_CLOEXEC | self._TFD_NONBLOCK)
        except (OSError, AttributeError):
            return
        if fd >= 0:
            self._fd, self._libc = fd, libc

    async def sleep_until(self, when: float) -> None:
        delay = when - time.monotonic()
        if delay <= 0:
            return
        fd = self._fd
        if fd < 0 or delay > 0.05:
            await asyncio.sleep(delay)
            return
        arm = when - self._early
        sec = int(arm)
        spec = self._Spec(0, 0, sec, int((arm - sec) * 1e9))
        if self._libc.timerfd_settime(fd, self._TFD_TIMER_ABSTIME, ctypes.byref(spec), None):
            await asyncio.sleep(delay)
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _wake, fut)
        self._sleeping += 1
        try:
            await fut
        finally:
            # this very fd: close() may have run meanwhile (the port was lost while we
            # slept); it leaves the fd to us, so it is never closed under the loop
            loop.remove_reader(fd)
            with contextlib.suppress(OSError):
                os.read(fd, 8)
            self._sleeping -= 1
            if self._closed and not self._sleeping:
                self._release()
        now = time.monotonic()
        # arm next time by the median of how late the loop woke (a step towards it:
        # on a busy machine the mean is all tails, and every early wake is spun)
        step = self._STEP_S if now - arm > self._early else -self._STEP_S
        self._early = min(self.max_early_s, max(0.0, self._early + step))
        while now < when:  # woke early, as armed: at most max_early_s
            now = time.monotonic()

    def close(self) -> None:
        """Release the timer, now or when the sleep in progress ends."""
        self._closed = True
        if not self._sleeping:
            self._release()

    def _release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _wake(fut: asyncio.Future[None]) -> None:
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
            gap = t35(baud) if inter_frame_s is None else inter_frame_s
            return _RtuOverTcpLink(host, port, timeout_s=timeout_s, inter_frame_s=gap)
        return _TcpLink(host, port, timeout_s=timeout_s, inter_frame_s=inter_frame_s or 0.0)

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
        gap = t35(baud) if inter_frame_s is None else inter_frame_s
        return _SerialLink(
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


# --------------------------------------------------------------------------- Modbus TCP


class _Reactor:
    """The replies of every Modbus TCP link of one event loop, collected together.

    On a virtual machine, and on a small ARM board, a process pays for each
    wake-up far more than for the few microseconds of work a reply needs
    (``bench/README.md``: 500 terminals polled with a reader callback per
    socket cost 2.7 % of a core, collected like this 1.4 %). So the links'
    sockets are not watched by the event loop one by one: they sit in one
    private epoll set, and while any link waits for a reply, one timer every
    ``collect_s`` reads whatever has arrived on all of them and expires the
    requests whose response timeout has passed. A burst of 500 polls costs
    about ten wake-ups instead of 500; a reply waits at most ``collect_s``
    longer (2 ms; 10 ms while more than ``many`` requests are out), counted in
    its round-trip time; a timeout fires within that. With nothing in flight
    there is no timer at all.
    """

    collect_s = 0.002
    # with many requests out (a burst of polls) a reply waits a little longer and
    # each collect reads many: 10 wake-ups a burst instead of 50 here; with few out
    # (a serial gateway behind one connection, a command) it stays quick
    collect_many_s = 0.01
    many = 16

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ep = select.epoll()
        self._links: dict[int, _TcpLink] = {}
        self.waiting: set[_TcpLink] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._first_deadline = math.inf  # no waiting link expires before this

    def add(self, link: _TcpLink, fd: int) -> None:
        self._ep.register(fd, select.EPOLLIN)
        self._links[fd] = link

    def remove(self, fd: int) -> None:
        if self._links.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(fd)

    def wait(self, link: _TcpLink) -> None:
        """``link`` sent a request: collect until it is answered or expires."""
        self.waiting.add(link)
        if link._deadline < self._first_deadline:
            self._first_deadline = link._deadline
        if self._timer is None:
            self._timer = self._loop.call_at(self._loop.time() + self._delay(), self._collect)

    def _delay(self) -> float:
        return self.collect_s if len(self.waiting) <= self.many else self.collect_many_s

    def read_ready(self) -> None:
        """Read whatever has arrived, on every link, in one ``epoll_wait``."""
        links = self._links
        for fd, _ in self._ep.poll(0):
            link = links.get(fd)
            if link is not None:
                link._readable()

    def _collect(self) -> None:
        self._timer = None
        self.read_ready()
        waiting = self.waiting
        if not waiting:
            return
        now = self._loop.time()
        if now >= self._first_deadline:  # not before: most collects scan nothing
            for link in [w for w in waiting if w._deadline <= now]:
                link._expire()
            self._first_deadline = min((w._deadline for w in waiting), default=math.inf)
        if waiting:
            self._timer = self._loop.call_at(now + self._delay(), self._collect)


_REACTORS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Reactor] = (
    weakref.WeakKeyDictionary()
)


def drain_input() -> None:
    """Read what arrived on the Modbus TCP links of the running loop while none waited.

    Late replies are dropped, and a connection the device closed is seen as
    closed, before the next requests: what ``read`` does for one link before its
    request, in one system call for all of them (call it before a burst of
    :meth:`ModbusLink.start_read`).
    """
    r = _REACTORS.get(asyncio.get_running_loop())
    if r is not None:
        r.read_ready()


def _reactor(loop: asyncio.AbstractEventLoop) -> _Reactor:
    r = _REACTORS.get(loop)
    if r is None:
        r = _REACTORS[loop] = _Reactor(loop)
    return r


# A Modbus TCP frame is at most 6 + 254 bytes and the buffer never keeps more
# than the start of one after a read: there is always room for the next read
# (a long frame behind another may take two). 500 links: 256 KiB.
_RX_SIZE = 512


class _TcpLink(ModbusLink):
    """Modbus TCP on a non-blocking socket whose replies a :class:`_Reactor` collects.

    No asyncio transport: a request is at most 260 bytes, sent whole by one
    ``send`` (a socket whose send buffer is full has a peer that stopped
    reading long ago: the link is down), and replies are read with
    ``recv_into`` into the link's own buffer. A transport would copy each
    reply into a 256 KiB ``bytes`` first (``mmap``/``mremap``/``munmap`` per
    read) and keep a kilobyte or two of state per connection.

    One request is on the wire at a time, so the stream must hold exactly its
    reply, after the late replies (in order) of requests that timed out before
    it. Anything else is a *fault* (:meth:`_fault`): bytes that are not Modbus
    TCP, a transaction id we did not send or that was already answered, a
    reply with another unit, function or length, bytes after the reply, half a
    reply then silence, the connection lost in the middle of a reply. A fault
    fails the request on the wire with :class:`LinkDown` naming it (a reply in
    the same read with it too: the stream is not trusted), closes the
    connection (:meth:`_shut`, the one place every waiter is failed: the
    engine's callback and ``read()``), is counted in ``resets`` (and in
    ``bad_frames`` but for a lost connection), and the connection is reopened
    at once the first time, then after a back-off of 0.5 s doubling to 30 s
    while the faults go on (until a valid reply).
    """

    # slots: with the base's 14 attributes, 33 in a __dict__ are past the 30 that
    # CPython shares between instances, 1.6 KB a link (0.6 MB at 500 buses)
    __slots__ = ("_cb", "_deadline", "_faults", "_host", "_idle", "_last_reply", "_loop",
                 "_port", "_reactor", "_reopen_at", "_rx", "_rx_len", "_rx_view", "_sock",
                 "_tx", "_used", "_waiter", "_why", "resets")  # fmt: skip

    def __init__(self, host: str, port: int, *, timeout_s: float, inter_frame_s: float) -> None:
        super().__init__(f"tcp://{host}:{port}", timeout_s=timeout_s, inter_frame_s=inter_frame_s)
        self._host, self._port = host, port
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rx = bytearray(_RX_SIZE)
        self._rx_view = memoryview(self._rx)
        self._rx_len = 0  # bytes of self._rx holding data not parsed yet
        # transaction ids: the one on the wire, the late replies still allowed
        self._tx = mbap.Transactions()
        self._waiter: asyncio.Future[bytes] | None = None
        self._deadline = 0.0
        self._used = False  # a reply came on this connection
        self._reactor: _Reactor | None = None
        # a read started by start_read: (done, slave, function, count)
        self._cb: tuple[Done, int, int, int] | None = None
        self._idle: asyncio.Future[None] | None = None  # a read() waiting for it to end
        self._last_reply = 0.0
        self._faults = 0  # in a row, without a good reply between them
        self._why = ""  # the last fault
        self._reopen_at = 0.0  # after faults in a row: no new connection before then
        self.resets = 0  # connections dropped on a fault

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def statistics(self) -> dict[str, int]:
        return {**super().statistics(), "resets": self.resets}

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            sock = await asyncio.wait_for(self._connect(loop), self.timeout_s)
        except (OSError, TimeoutError) as exc:
            raise LinkDown(f"{self.describe}: cannot connect ({exc or 'timeout'})") from exc
        self._sock, self._loop, self._rx_len, self._used = sock, loop, 0, False
        self._tx.open()
        self._reactor = _reactor(loop)
        self._reactor.add(self, sock.fileno())

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        try:  # an address needs no resolver (and no thread for it)
            infos = socket.getaddrinfo(
                self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
            )
        except socket.gaierror:
            infos = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
        error: OSError = OSError(f"no address for {self._host}")
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await loop.sock_connect(sock, address)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            except BaseException:
                sock.close()
                raise
            return sock
        raise error

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            n = sock.recv_into(self._rx_view[self._rx_len :] if self._rx_len else self._rx_view)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        if not n:
            self._lost(None)  # the device closed the connection
            return
        if self.trace is not None:
            self.trace("rx", bytes(self._rx_view[self._rx_len : self._rx_len + n]))
        self._received(n)

    def _received(self, nbytes: int) -> None:
        rx, tx = self._rx, self._tx
        got: bytes | None = None
        filled = self._rx_len + nbytes
        pos = 0
        while filled - pos >= 8:
            try:
                tid, end = mbap.decode_header(rx, pos)
            except FrameError:
                self._fault(f"{filled - pos} bytes that are not Modbus TCP")
                return
            end += pos
            if end > filled:
                break
            try:
                mine = tx.receive(tid)  # the transaction table says whose reply it is
            except FrameError as exc:
                self._fault(str(exc))
                return
            if mine:
                got = bytes(rx[pos + 6 : end])  # unit id first, then the PDU
            else:  # the late reply to a request that timed out: dropped
                self.stray_bytes += end - pos
            pos = end
        rest = filled - pos
        if rest:
            if not tx.due:  # nothing more is due: what follows is not a reply
                self._fault(f"{rest} bytes after the reply")
                return
            if pos:
                rx[:rest] = rx[pos:filled]  # the start of the next frame to the front
        self._rx_len = rest
        if got is None:
            return
        self._used = True
        cb = self._cb
        if cb is not None:
            self._cb = None
            self._settled()
            self._answer(cb, got)  # after the buffer is settled: done may send the next read
            return
        w = self._waiter
        if w is not None and not w.done():  # done: its caller gave up (cancelled)
            self._last_reply = time.monotonic() if self.inter_frame_s else 0.0
            w.set_result(got)
        self._settled()

    def _fault(self, why: str) -> LinkDown:
        """The device broke the framing: fail the request on the wire, reconnect; the error."""
        self.bad_frames += 1
        self._trouble(why)
        err = LinkDown(f"{self.describe}: {why}; connection dropped")
        self._shut(err)
        return err

    def _trouble(self, why: str) -> None:
        """A connection dropped on a fault: counted, reopened at once, then with back-off.

        Not logged here but by whoever gets the :class:`LinkDown` (the bus
        poller says it once, with this reason, until the device answers again).
        """
        self.resets += 1
        self._faults += 1
        self._why = why
        log.debug("%s: %s (fault %d in a row)", self.describe, why, self._faults)
        if self._faults > 1:  # one fault: reconnect at once
            self._reopen_at = time.monotonic() + min(30.0, 0.5 * 2 ** min(self._faults - 2, 6))

    def _answered(self) -> None:
        """A valid reply (or exception reply) after faults: the episode is over."""
        log.debug("%s: answering again after %d faults", self.describe, self._faults)
        self._faults = 0
        self._reopen_at = 0.0

    async def connect(self) -> None:
        """As :meth:`ModbusLink.connect`; after faults in a row, not before the back-off."""
        if self._sock is None and self._reopen_at:
            wait = self._reopen_at - time.monotonic()
            if wait > 0:
                raise LinkDown(f"{self.describe}: {self._why}; reconnecting in {wait:.1f} s")
        await super().connect()

    def _lost(self, exc: BaseException | None) -> None:
        w = self._waiter
        if self._cb is not None or (w is not None and not w.done()) or self._rx_len:
            # in the middle of a transaction: a fault (idle, a device may close at will)
            self._trouble(f"connection lost in the middle of a reply ({exc or 'closed'})")
        self._shut(LinkDown(f"{self.describe}: connection lost ({exc or 'closed'})"))

    def _expire(self) -> None:
        if self._rx_len:  # part of a reply: where the next frame starts is lost
            self._fault(f"half a reply ({self._rx_len} bytes), then silence")
            return
        self._tx.expire()
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(TimeoutError())
        self._settled()
        cb = self._cb
        if cb is not None:
            self._cb = None
            self.timeouts += 1
            self._end_cb()
            cb[0](NoResponse(f"{self.describe}: no response from unit {cb[1]}"))

    # -- start_read: the TcpEngine's reads, answered from the reactor

    @property
    def callbacks(self) -> bool:  # type: ignore[override]
        return not self.inter_frame_s

    def start_read(self, space: Space, address: int, count: int, slave: int, done: Done) -> bool:
        if self._turn.locked() or self._cb is not None or self._waiter is not None:
            return False  # a caller of read() has the link: queue behind it
        sock, loop, reactor = self._sock, self._loop, self._reactor
        if sock is None or loop is None or reactor is None:
            return False  # read() connects (or says why it cannot)
        fc = space.read_function
        self.requests += 1
        failed = self._put(sock, mbap.read_request(self._tx.send(), slave, fc, address, count))
        if failed is not None:
            loop.call_soon(done, failed)
            return True
        self._cb = (done, slave, fc, count)
        self._deadline = loop.time() + self.timeout_s
        reactor.wait(self)
        return True

    def _send(self, sock: socket.socket, slave: int, pdu: bytes) -> LinkDown | None:
        """Send ``pdu`` to ``slave`` with a fresh transaction id; the error if the link broke.

        A request is at most 260 bytes, sent whole by one ``send``: a socket
        whose buffer is full has a peer that stopped reading long ago.
        """
        return self._put(sock, mbap.adu(self._tx.send(), slave, pdu))

    def _put(self, sock: socket.socket, frame: bytes) -> LinkDown | None:
        """Send a whole request frame; the error if the link broke."""
        try:
            sent = sock.send(frame)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._lost(exc)
            return LinkDown(f"{self.describe}: send failed ({exc})")
        if sent != len(frame):
            self._lost(None)
            return LinkDown(
                f"{self.describe}: sent {sent} of {len(frame)} bytes (peer not reading)"
            )
        if self.trace is not None:
            self.trace("tx", frame)
        return None

    def _answer(self, cb: tuple[Done, int, int, int], got: bytes) -> None:
        done, slave, fc, count = cb
        self._end_cb()
        if fc > 2 and got[1] == fc and got[0] == slave and len(got) - 3 == 2 * count == got[2]:
            self.replies += 1  # the common case, checked as _pdu and _checked would
            if self._faults:
                self._answered()
            done(registers(count).unpack_from(got, 3))
            return
        result: Sequence[int] | Sequence[bool] | Exception
        try:
            reply_len = reply_length(fc, count)
            pdu = self._pdu(slave, fc, reply_len, got)
            result = read_items(fc, count, self._checked(slave, fc, reply_len, pdu))
        except (TransportError, DeviceException) as exc:
            result = exc
        done(result)

    def _end_cb(self) -> None:
        idle, self._idle = self._idle, None
        if idle is not None and not idle.done():
            idle.set_result(None)

    def _settled(self) -> None:
        if self._reactor is not None:
            self._reactor.waiting.discard(self)

    async def _exchange(self, slave: int, pdu: bytes, reply_len: int) -> bytes:
        while self._cb is not None:  # a read of the engine is on the wire: after it
            self._idle = idle = asyncio.get_running_loop().create_future()
            await idle
        # the input first: late replies are dropped here, and a device that closed
        # the idle connection gets a new one instead of a request into the void
        was_open, used, resets = self._sock is not None, self._used, self.resets
        self._readable()
        if self._sock is None:
            if was_open and not used and resets == self.resets:
                # closed as soon as opened: a refusal, not an idle timeout
                raise LinkDown(f"{self.describe}: connection closed by the device")
            await self.connect()
        sock, loop, reactor = self._sock, self._loop, self._reactor
        assert sock is not None and loop is not None and reactor is not None
        if self.inter_frame_s and self._last_reply:
            await asyncio.sleep(self._last_reply + self.inter_frame_s - time.monotonic())
        failed = self._send(sock, slave, pdu)
        if failed is not None:
            raise failed
        w = self._waiter = loop.create_future()
        self._deadline = loop.time() + self.timeout_s
        reactor.wait(self)
        try:
            got: bytes = await w
        except TimeoutError:
            self.timeouts += 1
            raise NoResponse(f"{self.describe}: no response from unit {slave}") from None
        finally:
            self._waiter = None
            self._tx.abandon()
            self._settled()
        return self._pdu(slave, pdu[0], reply_len, got)

    def _pdu(self, slave: int, fc: int, reply_len: int, got: bytes) -> bytes:
        """The PDU of a frame ``got`` (unit id first) if it answers ``fc`` to ``slave``.

        A frame that does not is a fault: the connection is closed.
        """
        if got[0] != slave or got[1] & 0x7F != fc:
            raise self._fault(
                f"reply from unit {got[0]} function {got[1]} to unit {slave} function {fc}"
            )
        exception = got[1] & 0x80
        if len(got) - 1 != (2 if exception else reply_len):
            raise self._fault(f"unit {slave} sent a reply of {len(got) - 1} bytes")
        if fc <= 4 and not exception and got[2] != reply_len - 2:
            raise self._fault(
                f"unit {slave} sent {got[2]} data bytes in a reply of {reply_len - 2}"
            )
        if self._faults:
            self._answered()
        return got[1:]

    def close(self) -> None:
        self._shut(LinkDown(f"{self.describe}: connection closed"))

    def _shut(self, error: TransportError) -> None:
        """Close the connection; the request on the wire, if any, fails with ``error``."""
        sock, self._sock = self._sock, None
        self._rx_len = 0
        if sock is not None:
            if self._reactor is not None:
                self._reactor.remove(sock.fileno())
            sock.close()
        cb, self._cb = self._cb, None
        w = self._waiter
        self._tx.abandon()
        self._settled()
        if w is not None and not w.done():
            w.set_exception(error)
        if cb is not None:
            self._end_cb()
            cb[0](error)


def _expire(w: asyncio.Future[bytes]) -> None:
    if not w.done():
        w.set_exception(TimeoutError())


# --------------------------------------------------------------------------- RTU


class _RtuLink(ModbusLink):
    """The RTU master: silence, flush, send, then wait for a reply it can tie to the request.

    Subclasses move bytes (``_send``, ``_drain_input``) and feed what arrives
    to ``_received``.

    Modbus RTU has no transaction id: a reply is tied to its request by timing
    alone, and a slave that answers after its timeout must not answer the next
    request. The rules (``docs/field-buses.md``, "Late replies"):

    * after a timeout the line is kept quiet for that slave's *late window*:
      one more response timeout, or twice the latest lateness heard from that
      slave, at most ``late_cap_s``; everything heard then is discarded, and a
      reply of that slave recognised in it is counted (``late_replies``) and
      widens its window;
    * bytes that arrive while no request is out, or before our request has
      left the wire, are never part of a reply (``stray_bytes``);
    * a frame of the addressed slave and function but of another length (the
      reply to another request) is skipped whole, so the reply behind it is
      still taken, not failed as a CRC error;
    * the next exchange with a slave that timed out is *suspect* until it has
      answered again: its reply is held until the slave's usual response
      time (twice its slowest reply in time, plus 20 ms) has passed, and if
      another one follows (the genuine reply behind a late one), the last one
      wins; a reply later than that usual time is dropped. While the slave's
      usual time is not known, its one reply within ``late_cap_s`` of the
      timeout cannot be told from a late one: dropped, and the line held for
      ``late_cap_s``, after which no doubt is left.
    """

    def __init__(
        self,
        describe: str,
        *,
        timeout_s: float,
        inter_frame_s: float,
        char_s: float,
        discard_echo: bool = False,
        late_cap_s: float | None = None,
    ) -> None:
        super().__init__(describe, timeout_s=timeout_s, inter_frame_s=inter_frame_s)
        self._char = char_s
        self._echo = discard_echo
        self.late_cap_s = max(timeout_s, 3 * timeout_s if late_cap_s is None else late_cap_s)
        self._rx = bytearray()
        self._noise = bytearray()  # heard while no request was out: late replies, noise
        self._last_rx = 0.0  # monotonic time of the last byte seen on the line
        self._quiet_from = 0.0  # the line is ours from then on (after our last frame)
        self._hold_until = 0.0  # after a timeout: no request before then
        self._req_end = 0.0  # when the last bit of our request leaves the wire
        self._want: tuple[int, int, int] | None = None  # slave, function, reply PDU length
        self._echo_left = b""
        self._waiter: asyncio.Future[bytes] | None = None
        self._candidate: bytes | None = None  # suspect exchange: a reply, held
        self._candidate_at = 0.0
        self._suspect = False
        self._usual_known = False
        self._confirm_at = 0.0
        # per slave (at most 256 entries each): when its last unanswered request
        # expired (until it answers again), the latest lateness heard from it, and
        # its slowest reply in time
        self._expired: dict[int, float] = {}
        self._late: dict[int, float] = {}
        self._usual: dict[int, float] = {}
        self._timer = _Timer()
        self.echo_errors = 0
        self.late_replies = 0

    def statistics(self) -> dict[str, int]:
        return {
            **super().statistics(),
            "echo_errors": self.echo_errors,
            "late_replies": self.late_replies,
        }

    def late_window(self, slave: int) -> float:
        """The silence kept after a timeout of ``slave``, from the timeout on."""
        return min(self.late_cap_s, max(self.timeout_s, 2 * self._late.get(slave, 0.0)))

    def _send(self, frame: bytes) -> None:
        raise NotImplementedError

    def _drain_input(self) -> None:
        """Read (and so discard) whatever the port holds that we have not read yet."""

    def _received(self, data: bytes) -> None:
        now = self._last_rx = time.monotonic()
        if self.trace is not None:
            self.trace("rx", data)
        if self._waiter is None:
            self._heard(data, now)  # nobody asked: a late reply, noise
            return
        if self._echo_left:
            n = min(len(data), len(self._echo_left))
            if data[:n] != self._echo_left[:n]:
                self.echo_errors += 1
                self._fail(BadResponse(f"{self.describe}: our echo came back garbled (collision?)"))
                return
            self._echo_left = self._echo_left[n:]
            data = data[n:]
        if now < self._req_end:
            # our request is still on the wire: whatever this is, it is no reply to it
            self._heard(data, now)
            return
        self._rx += data
        self._parse(now)

    def _heard(self, data: bytes, now: float) -> None:
        """Bytes that answer nothing: counted, dropped; a late reply among them is learnt."""
        self.stray_bytes += len(data)
        if not self._expired:
            return
        noise = self._noise
        noise += data
        i = 0
        while len(noise) - i >= 5:
            s = noise[i]
            n = response_length(noise[i : i + 3]) if s in self._expired else None
            if n is not None and len(noise) - i >= n and crc_ok(noise[i : i + n]):
                self._learn_late(s, now)
                del noise[: i + n]
                i = 0
            else:
                i += 1
        del noise[: max(0, len(noise) - 260)]  # keep a frame's worth: the rest of one

    def _learn_late(self, slave: int, now: float) -> None:
        self.late_replies += 1
        expired = self._expired.get(slave)
        if expired is not None:
            late = min(self.late_cap_s, now - expired)
            if late > self._late.get(slave, 0.0):
                self._late[slave] = late

    def _fail(self, exc: Exception) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(exc)

    def _parse(self, now: float) -> None:
        assert self._want is not None
        slave, fc, n_pdu = self._want
        rx = self._rx
        i = 0
        while len(rx) - i >= 5:
            if rx[i] != slave or rx[i + 1] & 0x7F != fc:
                i += 1
                continue
            want = 5 if rx[i + 1] & 0x80 else n_pdu + 3
            n = response_length(rx[i : i + 3]) or want
            if len(rx) - i < n:
                return
            frame = bytes(rx[i : i + n])
            if not crc_ok(frame):
                if i == 0 and n == want:
                    self.bad_frames += 1
                    self._fail(
                        BadResponse(f"{self.describe}: CRC error in the reply of slave {slave}")
                    )
                    return
                i += 1
                continue
            self.stray_bytes += i
            del rx[: i + n]
            i = 0
            if n != want:  # a reply to another request of ours: late, skipped whole
                self.stray_bytes += n
                self._learn_late(slave, now)
                continue
            if self._candidate is not None:  # the genuine reply behind a late one
                self.late_replies += 1
            elif self._suspect:
                if now < self._confirm_at:
                    self._candidate = frame  # held until the slave's usual time is over
                    self._candidate_at = now
                else:  # later than this slave ever answers: as likely the old reply
                    self.stray_bytes += n
                    self._learn_late(slave, now)
                continue
            self._answer(frame)
            return

    def _answer(self, frame: bytes) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(frame[1:-2])

    def _confirm(self) -> None:
        """The suspect exchange's usual time is over: its one reply is taken, if it can be."""
        if self._candidate is not None and self._usual_known:
            self._answer(self._candidate)

    async def _exchange(self, slave: int, pdu: bytes, reply_len: int) -> bytes:
        frame = adu(slave, pdu)
        await self._quiet_line()
        loop = asyncio.get_running_loop()
        w = self._waiter = loop.create_future()
        self.stray_bytes += len(self._rx)  # heard after the last reply: answered nothing
        self._rx.clear()
        self._candidate = None
        self._want = (slave, pdu[0], reply_len)
        echo = frame if self._echo else b""
        self._echo_left = echo
        now = time.monotonic()
        end = self._req_end = now + len(frame) * self._char  # its last bit leaves the wire
        expiry = end + self.timeout_s
        usual = self._usual.get(slave)
        self._usual_known = usual is not None
        self._confirm_at = end + (
            self.timeout_s
            if usual is None
            else min(self.timeout_s, 2 * usual + self.inter_frame_s + 0.02)
        )
        # suspect: the slave's last request timed out, so its late reply may still
        # come. With its usual time known we can tell the two replies apart, however
        # late; without it, only a silence of late_cap_s since the timeout clears it
        prev = self._expired.get(slave)
        suspect = prev is not None and (usual is not None or end - prev < self.late_cap_s)
        self._suspect = suspect
        timer = loop.call_at(expiry, _expire, w)
        confirm = loop.call_at(self._confirm_at, self._confirm) if suspect else None
        try:
            if self.trace is not None:
                self.trace("tx", frame)
            self._send(frame)
            reply: bytes = await w
        except TimeoutError:
            if self._candidate is None:
                self._timed_out(slave, expiry, echo)
            # one reply, and this slave's usual time is not known: it may be the
            # late reply to the request before; we cannot tell, so it is not taken
            self._learn_late(slave, self._candidate_at)
            self.timeouts += 1
            self.bad_frames += 1
            self._expired[slave] = expiry
            self._hold_until = expiry + self.late_cap_s  # after that, no doubt is left
            raise BadResponse(
                f"{self.describe}: slave {slave} answered, but a reply to an earlier "
                "request cannot be ruled out after its timeout; dropped"
            ) from None
        finally:
            timer.cancel()
            if confirm is not None:
                confirm.cancel()
            self._waiter = None
            self._want = None
            self._quiet_from = max(time.monotonic(), end)
        # answered: the line is quiet from the reply's last byte (_last_rx), not from
        # whenever this task got round to it
        self._quiet_from = end
        self._expired.pop(slave, None)
        took = time.monotonic() - end
        if not suspect and took > self._usual.get(slave, 0.0):
            self._usual[slave] = min(self.timeout_s, took)
        return reply

    def _timed_out(self, slave: int, expiry: float, echo: bytes) -> NoReturn:
        """No reply: keep the line quiet for the slave's late window; the error."""
        self.timeouts += 1
        self._expired[slave] = expiry
        self._hold_until = expiry + self.late_window(slave)
        if self._rx or self._echo_left != echo:
            self.bad_frames += 1
            raise BadResponse(
                f"{self.describe}: no valid reply from slave {slave} "
                f"({len(self._rx)} bytes of garbage)"
            )
        raise NoResponse(f"{self.describe}: no response from slave {slave}")

    async def _quiet_line(self) -> None:
        """Wait out the late window and ``inter_frame_s`` of silence, then flush input."""
        deadline = max(time.monotonic(), self._hold_until) + self.timeout_s
        while True:
            quiet_at = max(
                max(self._last_rx, self._quiet_from) + self.inter_frame_s, self._hold_until
            )
            await self._timer.sleep_until(quiet_at)
            self._drain_input()
            if not self.connected:
                raise LinkDown(f"{self.describe}: port lost")
            now = time.monotonic()
            if max(self._last_rx, self._quiet_from) + self.inter_frame_s <= now:
                return
            if now > deadline:
                return  # a babbling device: go ahead, the reply check will sort it out

    def close(self) -> None:
        self._timer.close()
        self._timer = _Timer()


class _SerialLink(_RtuLink):
    def __init__(
        self,
        port: str,
        *,
        baud: int,
        parity: str,
        stopbits: int,
        bytesize: int,
        timeout_s: float,
        inter_frame_s: float,
        discard_echo: bool,
    ) -> None:
        super().__init__(
            f"rtu://{port}@{baud}{bytesize}{parity}{stopbits}",
            timeout_s=timeout_s,
            inter_frame_s=inter_frame_s,
            char_s=frame_time(1, baud, 1 + bytesize + (parity != "N") + stopbits),
            discard_echo=discard_echo,
        )
        self.port = port
        self._settings = {
            "baudrate": baud,
            "parity": parity,
            "stopbits": stopbits,
            "bytesize": bytesize,
        }
        self._serial: serial.Serial | None = None
        self._untold: LinkDown | None = None  # the port was lost while no request was out
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def connected(self) -> bool:
        return self._serial is not None

    async def _open(self) -> None:
        untold, self._untold = self._untold, None
        if untold is not None:
            raise untold
        parity = str(self._settings["parity"])
        import serial

        try:
            # exclusive: flock(LOCK_EX | LOCK_NB) on the descriptor, held while the port
            # is open; ``vitals diag`` takes the same lock, so neither ever talks over
            # the other (docs/field-buses.md, "Exclusive ports")
            s = serial.Serial(
                self.port, timeout=0, write_timeout=0, exclusive=True, **self._settings
            )
        except (serial.SerialException, termios.error, ValueError, OSError) as exc:
            raise LinkDown(f"{self.describe}: {port_error(self.port, parity, exc)}") from exc
        try:
            # some drivers (ptys among them) drop PARENB without an error: check it took
            cflag = termios.tcgetattr(s.fileno())[2] if parity != "N" else termios.PARENB
        except termios.error:
            cflag = termios.PARENB
        if not cflag & termios.PARENB:
            s.close()
            raise LinkDown(f"{self.describe}: {refused_parity(parity)}")
        self._serial = s
        self._fd = s.fileno()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._readable)
        self._drain_input()
        self._last_rx = time.monotonic()

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._down(exc)
            return
        if not data:  # the other end of a pty went away, or the adapter was unplugged
            self._down(None)
            return
        self._received(data)

    def _down(self, exc: OSError | None) -> None:
        why = "hang-up (adapter unplugged, or the other end closed)"
        if exc is not None:
            why = port_error(self.port, "N", exc)
        lost = LinkDown(f"{self.describe}: port lost: {why}")
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(lost)
        else:  # lost between requests: the next one hears it first, not "no such port"
            self._untold = lost
        self.close()

    def _drain_input(self) -> None:
        while self._fd >= 0:
            try:
                data = os.read(self._fd, 4096)
            except BlockingIOError:
                break
            except OSError as exc:
                self._down(exc)
                break
            if not data:  # nothing left (VMIN 0); a hang-up shows in _readable
                break
            self._received(data)

    def _send(self, frame: bytes) -> None:
        if self._fd < 0:
            raise LinkDown(f"{self.describe}: port lost")
        try:
            n = os.write(self._fd, frame)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                n = 0
            else:
                self._down(exc)
                why = port_error(self.port, "N", exc)
                raise LinkDown(f"{self.describe}: write failed: {why}") from exc
        if n != len(frame):
            # a frame is at most 256 bytes; a full output queue means a stuck port
            raise LinkDown(f"{self.describe}: wrote {n} of {len(frame)} bytes")

    def close(self) -> None:
        s, self._serial = self._serial, None
        if s is not None:
            import serial

            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._fd)
            self._fd = -1
            with contextlib.suppress(OSError, termios.error, serial.SerialException):
                s.close()
        super().close()


class _RtuStream(asyncio.BufferedProtocol):
    # reads into a small buffer: a plain Protocol gets a 256 KiB bytes per read
    def __init__(self, link: _RtuOverTcpLink) -> None:
        self._link = link
        self._buf = memoryview(bytearray(_RX_SIZE))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buf

    def buffer_updated(self, nbytes: int) -> None:
        self._link._received(bytes(self._buf[:nbytes]))

    def connection_lost(self, exc: Exception | None) -> None:
        self._link._lost(exc)


class _RtuOverTcpLink(_RtuLink):
    def __init__(self, host: str, port: int, *, timeout_s: float, inter_frame_s: float) -> None:
        super().__init__(
            f"rtu-over-tcp://{host}:{port}",
            timeout_s=timeout_s,
            inter_frame_s=inter_frame_s,
            char_s=0.0,
        )
        self._host, self._port = host, port
        self._transport: asyncio.Transport | None = None

    @property
    def connected(self) -> bool:
        return self._transport is not None

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: _RtuStream(self), self._host, self._port),
                self.timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            raise LinkDown(f"{self.describe}: cannot connect ({exc or 'timeout'})") from exc
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def _lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._fail(LinkDown(f"{self.describe}: connection lost ({exc or 'closed'})"))

    def _send(self, frame: bytes) -> None:
        if self._transport is None:
            raise LinkDown(f"{self.describe}: not connected")
        self._transport.write(frame)

    def close(self) -> None:
        t, self._transport = self._transport, None
        if t is not None:
            t.close()
        super().close()
