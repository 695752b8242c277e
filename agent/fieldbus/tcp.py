"""Modbus TCP: the link (:class:`TcpLink`) and the reactor that collects the replies
of every Modbus TCP link of an event loop (:func:`drain_input` reads them all at once).

The rules (one request on the wire, transaction ids, what is a fault) are in
:mod:`agent.fieldbus.links`'s overview and :class:`TcpLink`; the transaction
table is :class:`protocols.modbus.mbap.Transactions`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import select
import socket
import time
import weakref
from collections.abc import Sequence

from agent.fieldbus.links import (
    RX_SIZE,
    Done,
    LinkDown,
    ModbusLink,
    NoResponse,
    TransportError,
)
from protocols.errors import DeviceException, FrameError
from protocols.modbus import Space, mbap
from protocols.modbus.pdu import read_items, registers, reply_length

__all__ = ["TcpLink", "drain_input"]

log = logging.getLogger(__name__)


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
        self._links: dict[int, TcpLink] = {}
        self.waiting: set[TcpLink] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._first_deadline = math.inf  # no waiting link expires before this

    def add(self, link: TcpLink, fd: int) -> None:
        self._ep.register(fd, select.EPOLLIN)
        self._links[fd] = link

    def remove(self, fd: int) -> None:
        if self._links.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(fd)

    def wait(self, link: TcpLink) -> None:
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


class TcpLink(ModbusLink):
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
        self._rx = bytearray(RX_SIZE)
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
