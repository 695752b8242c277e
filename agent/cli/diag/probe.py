"""``vitals diag probe``: the end of word-order guessing.

Given the 2 (or 4) register words of one value, decode them under every
byte/word order and every numeric type of that width with
:func:`protocols.modbus.decode` and mark the values inside ``--expect
LOW..HIGH``. When exactly one order gives a plausible value, that is the
order to write in the profile.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich.table import Table

from agent.cli.diag._common import (
    FAILED,
    OK,
    USAGE,
    DiagError,
    console,
    die,
    emit_json,
    parse_int,
    parse_range,
    waiting,
)
from agent.cli.diag._link import (
    LinkSettings,
    check_endpoint,
    check_line,
    check_slave,
    open_link,
    transact_errors,
)
from protocols.modbus import DataType, Order, PointSpec, Space, decode

__all__ = ["Candidate", "ProbeResult", "probe", "probe_command"]

TYPES = {
    2: (DataType.U32, DataType.I32, DataType.F32),
    4: (DataType.U64, DataType.I64, DataType.F64),
}
ORDERS = (Order.ABCD, Order.CDAB, Order.BADC, Order.DCBA)


@dataclass(frozen=True, slots=True)
class Candidate:
    type: DataType
    order: Order
    value: float | int
    plausible: bool


@dataclass(frozen=True, slots=True)
class ProbeResult:
    words: tuple[int, ...]
    expect: tuple[float, float] | None
    candidates: tuple[Candidate, ...]

    @property
    def plausible(self) -> list[Candidate]:
        return [c for c in self.candidates if c.plausible]

    @property
    def orders(self) -> list[Order]:
        """The orders that give at least one plausible value, in ORDERS order."""
        found = {c.order for c in self.plausible}
        return [o for o in ORDERS if o in found]

    @property
    def verdict(self) -> Order | None:
        """The one order that makes sense, or None (none, or ambiguous)."""
        orders = self.orders
        return orders[0] if len(orders) == 1 else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "words": [f"0x{w:04X}" for w in self.words],
            "expect": list(self.expect) if self.expect else None,
            "candidates": [
                {
                    "type": str(c.type),
                    "order": str(c.order),
                    "value": _json_value(c.value),
                    "plausible": c.plausible,
                }
                for c in self.candidates
            ],
            "plausible_orders": [str(o) for o in self.orders],
            "order": str(self.verdict) if self.verdict else None,
            "types": sorted({str(c.type) for c in self.plausible if c.order is self.verdict}),
        }


def _json_value(v: float | int) -> float | int | str:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def probe(words: Sequence[int], expect: tuple[float, float] | None = None) -> ProbeResult:
    """Every (type, order) reading of ``words``; plausible = finite and inside ``expect``."""
    if len(words) not in TYPES:
        raise DiagError(
            f"{len(words)} words given: probe takes 2 (32-bit) or 4 (64-bit)",
            "pass --words 0x42F6,0xE979",
            2,
        )
    for w in words:
        if not 0 <= w <= 0xFFFF:
            raise DiagError(f"{w} is not a 16-bit register value", "each word is 0..0xFFFF", 2)
    out: list[Candidate] = []
    for dtype in TYPES[len(words)]:
        for order in ORDERS:
            spec = PointSpec(name="probe", space=Space.HOLDING, address=0, type=dtype, order=order)
            value = decode(spec, words)
            assert isinstance(value, int | float) and not isinstance(value, bool)
            ok = expect is not None and math.isfinite(value) and expect[0] <= value <= expect[1]
            out.append(Candidate(dtype, order, value, ok))
    return ProbeResult(tuple(words), expect, tuple(out))


def _fmt(v: float | int) -> str:
    if isinstance(v, float):
        return f"{v:.7g}" if math.isfinite(v) else str(v)
    return str(v)


def render(result: ProbeResult) -> None:
    con = console()
    words = " ".join(f"0x{w:04X}" for w in result.words)
    types = TYPES[len(result.words)]
    t = Table(title=f"registers {words}")
    t.add_column("order")
    for dtype in types:
        t.add_column(str(dtype), justify="right")
    for order in ORDERS:
        cells = []
        for dtype in types:
            c = next(c for c in result.candidates if c.type is dtype and c.order is order)
            text = _fmt(c.value)
            cells.append(f"[bold green]{text} ✓[/]" if c.plausible else text)
        t.add_row(str(order), *cells)
    con.print(t)
    if result.expect is None:
        con.print("pass --expect LOW..HIGH to mark the plausible values")
        return
    lo, hi = result.expect
    verdict = result.verdict
    if verdict is not None:
        kinds = ", ".join(sorted({str(c.type) for c in result.plausible}))
        con.print(
            f'order: [bold]{verdict}[/] (type {kinds}): write order = "{verdict}" in the profile'
        )
    elif not result.orders:
        con.print(
            f"no order gives a value in {lo:g}..{hi:g}: check the address "
            "(off by one?), the scale, or widen --expect"
        )
    else:
        con.print(
            f"ambiguous: {', '.join(map(str, result.orders))} all give values in {lo:g}..{hi:g}; "
            "narrow --expect or probe another reading"
        )


def probe_command(
    words: Annotated[
        str | None, typer.Option(help="2 or 4 register words, e.g. 0x42F6,0xE979")
    ] = None,
    expect: Annotated[
        str | None, typer.Option(help="plausible range LOW..HIGH of the value")
    ] = None,
    port: Annotated[
        str | None, typer.Option(help="read the words live from this serial port")
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="read the words live from this Modbus TCP host")
    ] = None,
    tcp_port: Annotated[int, typer.Option(help="Modbus TCP port")] = 502,
    slave: Annotated[int, typer.Option(help="slave address / unit id")] = 1,
    address: Annotated[int, typer.Option(help="first register (0-based)")] = 0,
    space: Annotated[str, typer.Option(help="holding or input")] = "holding",
    count: Annotated[int, typer.Option(help="words to read live: 2 or 4")] = 2,
    baud: Annotated[int, typer.Option(help="serial baud rate")] = 9600,
    parity: Annotated[str, typer.Option(help="N, E or O")] = "E",
    stopbits: Annotated[int, typer.Option(help="1 or 2")] = 1,
    timeout: Annotated[float, typer.Option(help="response timeout, seconds")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
) -> None:
    """Decode 2 or 4 registers under every byte/word order and type; name the right order."""
    try:
        rng = parse_range(expect) if expect else None
        if words and (port or host):
            raise DiagError(
                "--words and --port/--host: which one?",
                "--words decodes words you already have; --port or --host reads them from the device",
                USAGE,
            )
        if words:
            values = [parse_int(w) for w in words.replace(" ", ",").split(",") if w]
        elif port or host:
            values = _read_live_sync(
                LiveRead(
                    port=port,
                    host=host,
                    tcp_port=tcp_port,
                    slave=slave,
                    address=address,
                    space=space,
                    count=count,
                    baud=baud,
                    parity=parity,
                    stopbits=stopbits,
                    timeout_s=timeout,
                ),
                as_json=as_json,
            )
        else:
            raise DiagError(
                "nothing to probe", "pass --words W1,W2 or --port/--host to read them", 2
            )
        result = probe(values, rng)
    except DiagError as exc:
        die(exc, as_json=as_json)
    if as_json:
        emit_json(result.to_dict())
    else:
        render(result)
    raise typer.Exit(OK if rng is None or result.verdict is not None else FAILED)


@dataclass(frozen=True, slots=True)
class LiveRead:
    port: str | None
    host: str | None
    tcp_port: int
    slave: int
    address: int
    space: str
    count: int
    baud: int
    parity: str
    stopbits: int
    timeout_s: float


def _read_live_sync(r: LiveRead, *, as_json: bool) -> list[int]:

    check_endpoint(r.port, r.host)
    check_slave(r.slave, tcp=bool(r.host))
    if r.space not in ("holding", "input"):
        raise DiagError(f"--space {r.space}: probe reads registers", "use holding or input", USAGE)
    if r.count not in TYPES:
        raise DiagError(f"--count {r.count}: probe takes 2 or 4 words", "", USAGE)
    check_line(_settings(r))
    if not 0 <= r.address <= 0x10000 - r.count:
        raise DiagError(f"--address {r.address}: registers are 0..65535", "0-based", USAGE)
    where = r.host or r.port
    with waiting(f"reading {r.count} words at {r.address} from {where}", quiet=as_json):
        return asyncio.run(_read_live(r))


def _settings(r: LiveRead) -> LinkSettings:
    return LinkSettings(
        port=r.port,
        host=r.host,
        tcp_port=r.tcp_port,
        baud=r.baud,
        parity=r.parity.upper(),
        stopbits=r.stopbits,
        timeout_s=r.timeout_s,
    )


async def _read_live(r: LiveRead) -> list[int]:
    settings = _settings(r)
    link = await open_link(settings)
    try:
        with transact_errors(settings.describe, r.slave):
            regs = await link.read(Space(r.space), r.address, r.count, r.slave)
    finally:
        link.close()
    return [int(x) for x in regs]
