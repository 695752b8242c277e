"""An emulated Modbus RTU bus on a pseudo terminal, with wire timing.

:class:`RtuBus` owns a pty pair. A master (the agent, ``mbpoll -P none``,
pyserial) opens :attr:`RtuBus.port`, the slave side (``/dev/pts/N``); the
emulator works the master side in raw mode. Several :class:`RtuSlave` share
the bus, each serving a device profile with live values from
``simulator.signals``.

Wire timing
-----------
A pty moves bytes instantly and ignores the baud rate, so the emulator keeps
the clock of a real RS-485 line itself: a request that shows up at ``t`` is
taken to end on the wire at ``t + bytes x char``; the addressed slave notices
the end after t3.5 of silence, waits its ``turnaround`` (plus ``slow_s``),
then sends its reply paced at the baud rate, in small chunks whose last byte
is written at the instant it would complete on a real line. So one
transaction costs a master, at best, exactly::

    T(request) + t3.5 + turnaround + T(reply) + t3.5 (its own gap)

which is the wire limit ``bench.bus`` compares against. Timing needs a steady
hand, so the bus runs in its own thread (``select`` and ``time.sleep`` are
precise to tens of microseconds; the asyncio loop only to a millisecond), and
for measurements in its own process (``python -m simulator.rtu``).

Line settings
-------------
The bus has a baud of its own, like every terminal on a real line, and it
answers only a master that opened the port at that baud. A pty ignores the
baud but keeps what the master set (``tcgetattr`` on our end shows it,
:func:`simulator.pty.line_baud`); when it differs, the slaves hear what real
UARTs hear from a master at the wrong baud: framing errors and wrong bytes,
never a frame with a good CRC. So they stay silent, as real terminals do
(counted in ``garbled``), and a scan finds the bus at its own baud only.
Stop bits do not matter (a UART checks the first stop bit only: 8N1 and 8N2
hear each other). Ptys refuse parity bits (``tcsetattr`` with PARENB fails
with EINVAL) and data bits other than 8, so an emulated bus runs 8N1 (or
8N2); its masters must open it with parity ``N``. (Asked for together with a
new baud, Linux drops PARENB silently instead: the emulator then sees an 8N1
master and cannot tell; a master checks what took, as ``agent.fieldbus.links`` does.)

Faults, per slave, settable while the bus runs (``RtuSlave.fault``): ``silent``
(no reply), ``crc`` (reply with a broken CRC), ``exception`` (answer with
exception ``code``), ``garbage`` (random bytes instead of a reply), ``late``
(the reply comes ``delay_s`` late: set it past the master's timeout),
``slow`` (a long turnaround, ``delay_s``, inside the timeout).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import sys
import threading
import time
import tty
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from drivers.profiles import Profile
from protocols.errors import FrameError
from protocols.modbus import Space
from protocols.modbus.pdu import (
    ReadBitsResponse,
    ReadRegistersResponse,
    ReadRequest,
    RequestRejected,
    Response,
    WriteBitsRequest,
    WriteMultipleResponse,
    WriteRegistersRequest,
    WriteSingleRequest,
    WriteSingleResponse,
)
from protocols.modbus.rtu import (
    decode_request,
    encode_response,
    exception_response,
    frame_time,
    request_length,
    t35,
)
from simulator.pty import line_baud
from simulator.signals import IllegalAddress, ProfileRegisters

__all__ = ["FAULTS", "RtuBus", "RtuSlave", "main"]

FAULTS = ("silent", "crc", "exception", "garbage", "late", "slow")
_FC_SPACE = {1: Space.COIL, 2: Space.DISCRETE, 3: Space.HOLDING, 4: Space.INPUT}


@dataclass
class RtuSlave:
    """One emulated terminal: ``profile`` at address ``slave``.

    ``fault`` is ``None`` or one of :data:`FAULTS`; ``code`` is the exception
    code of the ``exception`` fault; ``delay_s`` the extra delay of ``late``
    and ``slow``.
    """

    profile: Profile
    slave: int
    seed: int = 0
    fault: str | None = None
    code: int = 4
    delay_s: float = 0.0
    requests: int = 0
    replies: int = 0
    registers: ProfileRegisters = field(init=False)

    def __post_init__(self) -> None:
        self.registers = ProfileRegisters(self.profile, seed=self.seed)

    def answer(self, frame: bytes) -> bytes | None:
        """The reply frame to a request addressed to us, or None for silence."""
        try:
            req = decode_request(frame)
        except RequestRejected as exc:
            return exception_response(self.slave, exc.function, exc.code)
        except FrameError:
            return None
        resp: Response
        try:
            if isinstance(req, ReadRequest):
                space = _FC_SPACE[req.function]
                words = self.registers.read(space, req.address, req.count)
                if space.is_bits:
                    resp = ReadBitsResponse(self.slave, req.function, tuple(map(bool, words)))
                else:
                    resp = ReadRegistersResponse(self.slave, req.function, tuple(words))
            elif isinstance(req, WriteSingleRequest):
                space = Space.COIL if req.function == 5 else Space.HOLDING
                self.registers.write(
                    space,
                    req.address,
                    [int(req.value == 0xFF00) if req.function == 5 else req.value],
                )
                resp = WriteSingleResponse(self.slave, req.function, req.address, req.value)
            elif isinstance(req, WriteBitsRequest):
                self.registers.write(Space.COIL, req.address, [int(b) for b in req.bits])
                resp = WriteMultipleResponse(self.slave, 15, req.address, len(req.bits))
            elif isinstance(req, WriteRegistersRequest):
                self.registers.write(Space.HOLDING, req.address, list(req.values))
                resp = WriteMultipleResponse(self.slave, 16, req.address, len(req.values))
            else:
                return exception_response(self.slave, req.function, 1)
        except IllegalAddress:
            return exception_response(self.slave, req.function, 2)
        return encode_response(resp)


class RtuBus:
    """Several :class:`RtuSlave` on one emulated RS-485 line (a pty pair).

    Use as a context manager or call :meth:`start` / :meth:`stop`. Statistics:
    ``requests``, ``replies``, ``bad_frames`` (frames from the master that did
    not decode), ``garbled`` (bytes sent by a master at another baud: nobody
    answers them), ``busy_s`` (time the line carried bytes). ``echo=True`` sends
    the master's own bytes back to it, as a 2-wire adapter without echo
    suppression does.
    """

    def __init__(
        self,
        slaves: Sequence[RtuSlave],
        *,
        baud: int = 9600,
        stopbits: int = 1,
        turnaround_s: float = 0.001,
        echo: bool = False,
        rng_seed: int = 0,
    ) -> None:
        self.echo = echo  # like a 2-wire adapter that hears its own transmission
        self.slaves = {s.slave: s for s in slaves}
        self.baud = baud
        self.char_s = frame_time(1, baud, 10 + (stopbits == 2))  # start + 8 + stop(s), no parity
        self.t35 = t35(baud)
        self.turnaround_s = turnaround_s
        self._rng = random.Random(rng_seed)
        self._master, self._slave_fd = os.openpty()
        tty.setraw(self._slave_fd)  # the line discipline is shared: raw for both ends
        os.set_blocking(self._master, False)
        self.port = os.ttyname(self._slave_fd)
        self._stop_r, self._stop_w = os.pipe()
        self._thread: threading.Thread | None = None
        self.requests = 0
        self.replies = 0
        self.bad_frames = 0
        self.garbled = 0
        self.busy_s = 0.0

    # -- life cycle

    def start(self) -> RtuBus:
        self._thread = threading.Thread(target=self._run, name=f"rtu-bus {self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join()
            self._thread = None
        for fd in (self._master, self._slave_fd, self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> RtuBus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def statistics(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "baud": self.baud,
            "requests": self.requests,
            "replies": self.replies,
            "bad_frames": self.bad_frames,
            "garbled": self.garbled,
            "busy_s": round(self.busy_s, 3),
            "slaves": {
                s.slave: {"requests": s.requests, "replies": s.replies, "fault": s.fault}
                for s in self.slaves.values()
            },
        }

    # -- the wire

    def _run(self) -> None:
        rx = bytearray()
        first_at = last_at = 0.0
        # replies waiting for the wire: (start time, frame); sent one after the other
        queue: list[tuple[float, bytes]] = []
        sending: tuple[float, bytes] | None = None
        sent = 0
        chunk = max(1, int(0.0005 / self.char_s))
        while True:
            now = time.monotonic()
            timeout: float | None = None
            if sending is not None:
                t0, frame = sending
                timeout = t0 + min(len(frame), sent + chunk) * self.char_s - now
            elif queue:
                timeout = queue[0][0] - now
            if rx:
                wait = last_at + self.t35 - now
                timeout = wait if timeout is None else min(timeout, wait)
            r, _, _ = select.select(
                [self._master, self._stop_r], [], [], None if timeout is None else max(0.0, timeout)
            )
            if self._stop_r in r:
                return
            now = time.monotonic()
            if self._master in r:
                try:
                    data = os.read(self._master, 4096)
                except BlockingIOError:
                    data = b""
                except OSError:  # EIO: no master has the port open; keep serving
                    data = b""
                    time.sleep(0.01)
                if data and self.echo:
                    with contextlib.suppress(OSError):
                        os.write(self._master, data)
                if data and line_baud(self._slave_fd) != self.baud:
                    self.garbled += len(data)  # framing errors at the slaves: nobody answers
                    data = b""
                if data:
                    if not rx:
                        first_at = now
                    rx += data
                    last_at = now
            # requests: cut by length (a pty has no timing of its own), or by t3.5 silence
            while rx:
                n = request_length(bytes(rx[:7]))
                if n is not None and len(rx) >= n:
                    frame = bytes(rx[:n])
                    del rx[:n]
                elif now - last_at >= self.t35:
                    frame = bytes(rx)
                    rx.clear()
                else:
                    break
                end = first_at + len(frame) * self.char_s
                self.busy_s += len(frame) * self.char_s
                first_at = end
                reply = self._serve(frame)
                if reply is not None:
                    start, out = reply
                    queue.append((max(start + end, now), out))
                    queue.sort(key=lambda x: x[0])
            # replies: paced onto the line
            if sending is None and queue and queue[0][0] <= now:
                sending, sent = queue.pop(0), 0
            if sending is not None:
                t0, frame = sending
                due = min(len(frame), int((now - t0) / self.char_s + 1e-9))
                if due > sent:
                    with contextlib.suppress(OSError):
                        os.write(self._master, frame[sent:due])
                    sent = due
                if sent >= len(frame):
                    self.busy_s += len(frame) * self.char_s
                    self.replies += 1
                    sending = None

    def _serve(self, frame: bytes) -> tuple[float, bytes] | None:
        """(delay after the request's end, reply) for one request, or None."""
        if len(frame) < 4:
            self.bad_frames += 1
            return None
        self.requests += 1
        s = self.slaves.get(frame[0])
        if s is None:
            return None  # nobody at that address (or a broadcast: never answered)
        s.requests += 1
        fault = s.fault
        if fault == "silent":
            return None
        if fault == "exception":
            reply = exception_response(s.slave, frame[1], s.code)
        else:
            answer = s.answer(frame)
            if answer is None:
                self.bad_frames += 1
                return None
            reply = answer
        if fault == "crc":
            reply = reply[:-1] + bytes([reply[-1] ^ 0x5A])
        elif fault == "garbage":
            reply = bytes(self._rng.randrange(256) for _ in range(len(reply)))
        delay = self.t35 + self.turnaround_s
        if fault in ("late", "slow"):
            delay += s.delay_s
        s.replies += 1
        return delay, reply


# --------------------------------------------------------------------------- CLI


def serve(
    terminals: Sequence[tuple[int, Profile]],
    faults: Sequence[tuple[int, str, float]] = (),
    *,
    baud: int = 9600,
    stopbits: int = 1,
    turnaround_s: float = 0.001,
    seed: int = 0,
    duration: float | None = None,
) -> int:
    """``vitals sim rtu`` (its options are parsed and checked in agent/cli/main.py): run a bus
    of ``(slave, profile)`` terminals until SIGINT/SIGTERM or ``duration``; print the
    port (open it with parity N) first and the bus's counters as JSON at the end."""
    slaves = [RtuSlave(p, slave=a, seed=seed + i) for i, (a, p) in enumerate(terminals)]
    by_addr = {s.slave: s for s in slaves}
    for addr, kind, value in faults:
        s = by_addr[addr]
        s.fault = kind
        if kind == "exception":
            s.code = int(value or 4)
        else:
            s.delay_s = value
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    bus = RtuBus(slaves, baud=baud, stopbits=stopbits, turnaround_s=turnaround_s)
    with bus:
        print(bus.port, flush=True)
        stop.wait(duration)
    print(json.dumps(bus.statistics()), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m simulator.rtu ARGS`` is ``vitals sim rtu ARGS`` (exits)."""
    from agent.cli.main import main as cli

    cli(["sim", "rtu", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
