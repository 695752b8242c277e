"""Modbus RTU: the master (:class:`RtuLink`) on a serial port (:class:`SerialLink`) or on a
TCP stream to a serial device server (:class:`RtuOverTcpLink`), and the precise timer
(:class:`Timer`) that keeps its silences to the microsecond.

The rules that tie a reply to its request without a transaction id are
:class:`RtuLink`'s (``docs/field-buses.md``, "Late replies").
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import termios
import time
from typing import TYPE_CHECKING, Any, NoReturn

from agent.clock import libc as c_library
from agent.fieldbus.links import (
    RX_SIZE,
    BadResponse,
    LinkDown,
    ModbusLink,
    NoResponse,
    wake,
)
from agent.fieldbus.portlock import port_error, refused_parity
from protocols.modbus.rtu import adu, crc_ok, frame_time, response_length

if TYPE_CHECKING:
    import serial  # pyserial: imported by a serial link when it opens (0.2 MB for TCP-only gateways)

__all__ = ["RtuLink", "RtuOverTcpLink", "SerialLink", "Timer"]


class Timer:
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
        loop.add_reader(fd, wake, fut)
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


def _expire(w: asyncio.Future[bytes]) -> None:
    if not w.done():
        w.set_exception(TimeoutError())


class RtuLink(ModbusLink):
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
        self._timer = Timer()
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

    def _lost_why(self) -> LinkDown:
        """The error for a port found closed between exchanges."""
        return LinkDown(f"{self.describe}: port lost")

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
            if self._usual_known:
                # its usual time ends with the timeout itself (a slave that answers in
                # about half of it): the reply held within that time is taken, as
                # _confirm would; dropped, the next exchange would be suspect again,
                # and so on: the slave was never read again
                reply = self._candidate[1:-2]
            else:
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
                raise self._lost_why()
            now = time.monotonic()
            if max(self._last_rx, self._quiet_from) + self.inter_frame_s <= now:
                return
            if now > deadline:
                return  # a babbling device: go ahead, the reply check will sort it out

    def close(self) -> None:
        self._timer.close()
        self._timer = Timer()


class SerialLink(RtuLink):
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

        from drivers.serial_sensors import empty_read_is_hang_up

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
        try:
            # else a read callback whose bytes _drain_input took first in the loop's
            # round (the wait for a quiet line) reads b"" and calls the port lost
            empty_read_is_hang_up(s.fileno())
        except termios.error as exc:
            s.close()
            raise LinkDown(f"{self.describe}: cannot set raw reads: {exc}") from exc
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

    def _lost_why(self) -> LinkDown:
        untold, self._untold = self._untold, None  # with its reason, told once
        return untold or super()._lost_why()

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
            if not data:  # a hang-up (VMIN 1: nothing waiting is EAGAIN)
                self._down(None)
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
    def __init__(self, link: RtuOverTcpLink) -> None:
        self._link = link
        self._buf = memoryview(bytearray(RX_SIZE))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buf

    def buffer_updated(self, nbytes: int) -> None:
        self._link._received(bytes(self._buf[:nbytes]))

    def connection_lost(self, exc: Exception | None) -> None:
        self._link._lost(exc)


class RtuOverTcpLink(RtuLink):
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
