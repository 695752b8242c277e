"""Emulated Modbus TCP terminals, hundreds in one process.

A :class:`TcpTerminal` listens on its own loopback port and serves one or more
unit ids (a plain device, or a serial gateway with several slaves behind it),
each a device profile whose registers are encoded from the points' signal
models at the instant of the request (``simulator.signals.ProfileRegisters``),
so a poller sees values that move like the real quantity.

This is a minimal asyncio server of our own (MBAP framing, functions 1-6, 15,
16) rather than pymodbus's: pymodbus 3.16 builds a ``SimDevice`` datastore per
server and its server classes are mid-way to 4.0; here, starting 500 of them in
one process failed ("Could not start listen"). Ours serves 500 terminals x 30
points at 1 Hz for about 12 % of one core (``bench.tcp_fleet``), so the
emulators stay light and the agent's own cost is what shows.

Faults: ``dead`` (requests get no answer; the connection stays open),
``exception`` (every request answers that exception code),
``max_connections`` (devices that accept only one connection close any
further one at once), and ``fault``, settable while the terminal runs, one of
:data:`FAULTS`, which breaks every reply of every unit:

* ``trailing``: the reply, then bytes that are not Modbus TCP;
* ``garbage``: random bytes instead of the reply;
* ``tid``: the reply with another transaction id;
* ``proto``: the reply with protocol id 1;
* ``length``: the reply's MBAP length one byte short;
* ``unit``: the reply from another unit id;
* ``unsolicited``: a reply to a request that was never sent, then the reply;
* ``half``: the first half of the reply, then silence (the connection stays open);
* ``reset``: the first half of the reply, then the connection reset (RST).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
from collections.abc import Sequence

from drivers.profiles import Profile
from protocols.errors import FrameError, LocalError
from protocols.modbus import Space, mbap
from protocols.modbus.pdu import (
    ReadBitsResponse,
    ReadRegistersResponse,
    ReadRequest,
    RequestRejected,
    WriteBitsRequest,
    WriteMultipleResponse,
    WriteRegistersRequest,
    WriteSingleRequest,
    WriteSingleResponse,
    decode_request,
    encode_response,
    exception_response,
)
from simulator.broker import HOST
from simulator.signals import IllegalAddress, ProfileRegisters, Signal

__all__ = ["FAULTS", "TcpTerminal", "start_terminals"]

log = logging.getLogger(__name__)

_FC_SPACE = {1: Space.COIL, 2: Space.DISCRETE, 3: Space.HOLDING, 4: Space.INPUT}
FAULTS = ("trailing", "garbage", "tid", "proto", "length", "unit", "unsolicited", "half", "reset")
_TRAILING = b"\r\nERROR 42\r\n"  # what a confused firmware might print after its reply


class _Conn(asyncio.Protocol):
    def __init__(self, term: TcpTerminal) -> None:
        self._term = term
        self._buf = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        term = self._term
        if term.max_connections and len(term._conns) >= term.max_connections:
            term.refused += 1
            transport.close()
            return
        self._transport = transport
        term._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._term._conns.discard(self)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        t = self._transport
        out = []
        while len(buf) >= 8:
            try:
                tid, end = mbap.decode_header(buf)
            except FrameError:
                if t is not None:
                    t.close()
                return
            if len(buf) < end:
                break
            unit = buf[6]
            reply = self._term.handle(unit, buf[7:end])
            if reply is not None:
                frame = mbap.adu(tid, unit, reply)
                if self._term.fault is None:
                    out.append(frame)
                elif not self._broken(frame, out):
                    return
            buf = buf[end:]
        self._buf = buf
        if out and t is not None:
            t.write(b"".join(out))

    def _broken(self, frame: bytes, out: list[bytes]) -> bool:
        """Append ``frame`` broken by the terminal's fault; False if the connection is done."""
        term, t = self._term, self._transport
        fault = term.fault
        term.faulty += 1
        if fault == "trailing":
            out.append(frame + _TRAILING)
        elif fault == "garbage":
            out.append(term.rng.randbytes(len(frame)))
        elif fault == "tid":
            out.append(((frame[0] << 8 | frame[1]) + 1 & 0xFFFF).to_bytes(2, "big") + frame[2:])
        elif fault == "proto":
            out.append(frame[:2] + b"\x00\x01" + frame[4:])
        elif fault == "length":
            out.append(frame[:4] + (len(frame) - 7).to_bytes(2, "big") + frame[6:])
        elif fault == "unit":
            out.append(frame[:6] + bytes([frame[6] ^ 0x80]) + frame[7:])
        elif fault == "unsolicited":
            out.append(bytes([frame[0] ^ 0x80]) + frame[1:] + frame)
        elif fault in ("half", "reset"):
            out.append(frame[: len(frame) // 2])
            if t is None:
                return False
            t.write(b"".join(out))
            out.clear()
            if fault == "reset":
                sock = t.get_extra_info("socket")
                if sock is not None:  # linger 0: close sends a reset, not a FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                t.abort()
                return False
        else:
            raise LocalError(f"unknown fault {fault!r}: expected one of {', '.join(FAULTS)}")
        return True

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class TcpTerminal:
    """An emulated device: ``profile`` at unit ``slave`` on 127.0.0.1:``port``.

    :meth:`add_unit` puts more units behind the same port (a TCP-to-RTU
    gateway). ``signals`` are the first unit's signal models, by point name.
    """

    def __init__(
        self,
        profile: Profile,
        *,
        slave: int = 1,
        port: int | None = None,
        seed: int = 0,
        max_connections: int = 0,
    ) -> None:
        self.profile = profile
        self.slave = slave
        self.port = port or 0
        self.units: dict[int, ProfileRegisters] = {slave: ProfileRegisters(profile, seed=seed)}
        self.signals: dict[str, Signal] = self.units[slave].signals
        self.dead = False  # fault: answer nothing (the connection stays open)
        self.exception: int | None = None  # fault: answer this exception code
        self.fault: str | None = None  # one of FAULTS: break every reply that way
        self.faulty = 0  # replies broken by ``fault``
        self.rng = random.Random(seed)
        self.max_connections = max_connections  # 0 = any number
        self.refused = 0
        self.requests = 0
        self._conns: set[_Conn] = set()
        self._server: asyncio.Server | None = None

    def add_unit(self, slave: int, profile: Profile, *, seed: int = 0) -> ProfileRegisters:
        regs = self.units[slave] = ProfileRegisters(profile, seed=seed)
        return regs

    @property
    def reads(self) -> int:
        return sum(u.reads for u in self.units.values())

    def handle(self, unit: int, pdu: bytes) -> bytes | None:
        """The reply PDU to one request PDU, or None for silence."""
        self.requests += 1
        if self.dead:
            return None
        fc = pdu[0]
        if self.exception is not None:
            return exception_response(fc, self.exception)
        regs = self.units.get(unit)
        if regs is None:
            return exception_response(fc, 11)  # gateway target device failed to respond
        try:
            req = decode_request(unit, pdu)
        except RequestRejected as exc:
            return exception_response(fc, exc.code)
        except FrameError:
            return exception_response(fc, 3)  # a length that contradicts its fields
        try:
            if isinstance(req, ReadRequest):
                words = regs.read(_FC_SPACE[fc], req.address, req.count)
                if fc <= 2:
                    return encode_response(ReadBitsResponse(unit, fc, tuple(map(bool, words))))
                return encode_response(ReadRegistersResponse(unit, fc, tuple(words)))
            if isinstance(req, WriteSingleRequest):
                if fc == 5:
                    regs.write(Space.COIL, req.address, [int(req.value == 0xFF00)])
                else:
                    regs.write(Space.HOLDING, req.address, [req.value])
                return encode_response(WriteSingleResponse(unit, fc, req.address, req.value))
            if isinstance(req, WriteRegistersRequest):
                words = list(req.values)
                regs.write(Space.HOLDING, req.address, words)
            elif isinstance(req, WriteBitsRequest):
                words = [int(b) for b in req.bits]
                regs.write(Space.COIL, req.address, words)
            else:
                return exception_response(fc, 1)  # diagnostics, file records: not here
            return encode_response(WriteMultipleResponse(unit, fc, req.address, len(words)))
        except IllegalAddress:
            return exception_response(fc, 2)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Conn(self), HOST, self.port, reuse_address=True, backlog=16
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            for c in list(self._conns):
                c.close()
            await server.wait_closed()
            await asyncio.sleep(0)  # let the transports finish closing


async def start_terminals(profiles: Sequence[Profile], *, seed: int = 0) -> list[TcpTerminal]:
    terminals = [TcpTerminal(p, seed=seed + i) for i, p in enumerate(profiles)]
    for t in terminals:
        await t.start()
    return terminals
