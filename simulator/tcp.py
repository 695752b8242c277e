"""Emulated Modbus TCP terminals, on pymodbus's server.

A :class:`TcpTerminal` serves one device profile at one unit id on its own
loopback port; every read refreshes the requested registers from the points'
signal models (pymodbus's ``SimDevice`` action hook), so a poller sees values
that move like the real quantity. Hundreds run in one process.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType as SimType
from pymodbus.simulator import SimData, SimDevice

from drivers.profiles import Point, Profile
from protocols.modbus import Space, encode, register_count
from simulator.broker import HOST, free_port
from simulator.signals import Signal, signal_for

__all__ = ["TcpTerminal"]

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

# (coils, discrete inputs, holding registers, input registers), as SimDevice wants them
_ORDER = (Space.COIL, Space.DISCRETE, Space.HOLDING, Space.INPUT)
_FC_SPACE = {
    1: Space.COIL,
    5: Space.COIL,
    15: Space.COIL,
    2: Space.DISCRETE,
    3: Space.HOLDING,
    6: Space.HOLDING,
    16: Space.HOLDING,
    4: Space.INPUT,
}


class TcpTerminal:
    """One emulated device: ``profile`` at ``slave`` on 127.0.0.1:``port``."""

    def __init__(
        self, profile: Profile, *, slave: int = 1, port: int | None = None, seed: int = 0
    ) -> None:
        self.profile = profile
        self.slave = slave
        self.port = port or free_port()
        self.signals: dict[str, Signal] = {p.spec.name: signal_for(p, seed) for p in profile.points}
        self.dead = False  # fault: answer nothing (the connection stays open)
        self.exception: int | None = None  # fault: answer this exception code
        self.reads = 0
        self._by_space: dict[Space, list[Point]] = {s: [] for s in _ORDER}
        for p in profile.points:
            self._by_space[p.spec.space].append(p)
        self._server: ModbusTcpServer | None = None

    def _blocks(self) -> tuple[list[SimData], list[SimData], list[SimData], list[SimData]]:
        out: list[list[SimData]] = []
        for space in _ORDER:
            pts = self._by_space[space]
            if not pts:
                # pymodbus wants every block; an unused one is a single invalid address
                out.append(
                    [
                        SimData(
                            0,
                            count=1,
                            datatype=SimType.INVALID if not space.is_bits else SimType.BITS,
                        )
                    ]
                )
                continue
            lo = min(p.spec.address for p in pts)
            hi = max(p.spec.address + register_count(p.spec) for p in pts)
            dt = SimType.BITS if space.is_bits else SimType.REGISTERS
            out.append(
                [SimData(lo, count=hi - lo, values=0 if not space.is_bits else False, datatype=dt)]
            )
        return out[0], out[1], out[2], out[3]

    async def _action(
        self, fc: int, start: int, address: int, count: int, regs: list[int], set_values: Any
    ) -> ExcCodes | None:
        if self.dead:
            return ExcCodes.GATEWAY_NO_RESPONSE  # replaced by silence below
        if self.exception is not None:
            return ExcCodes(self.exception)
        if set_values is not None:
            return None
        self.reads += 1
        space = _FC_SPACE.get(fc)
        if space is None:
            return None
        for p in self._by_space[space]:
            n = register_count(p.spec)
            a = p.spec.address
            if a + n <= address or a >= address + count:
                continue
            value = self.signals[p.spec.name].value()
            words = encode(p.spec, value)
            off = a - start
            if space.is_bits:
                regs[off] = int(bool(words[0]))
            else:
                regs[off : off + n] = words
        return None

    async def start(self) -> None:
        device = SimDevice(self.slave, simdata=self._blocks(), action=self._action)
        self._server = ModbusTcpServer(device, address=(HOST, self.port))
        await self._server.serve_forever(background=True)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()  # type: ignore[no-untyped-call]


async def start_terminals(profiles: Sequence[Profile], *, seed: int = 0) -> list[TcpTerminal]:
    terminals = [TcpTerminal(p, seed=seed + i) for i, p in enumerate(profiles)]
    for t in terminals:
        await t.start()
    return terminals
