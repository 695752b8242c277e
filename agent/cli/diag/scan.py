"""``vitals diag scan``: which terminals answer on a bus, at which settings.

For every line setting (baud x parity) the port accepts, every slave address
gets one harmless request (read 1 holding register at 0, function 3). Anything
that answers in a well-formed frame is a terminal, an exception response too
(a device without register 0 says "illegal data address", which proves it is
there). Each terminal found is then asked for its identification (function
43 / MEI 14, basic objects: vendor, product code, revision); devices without
it answer "illegal function", which is fine.

The timeout of one attempt is the shortest that can work at that baud: the
request's frame time (8 characters), the turnaround the device needs
(``--turnaround``, 60 ms by default: typical terminals answer in 5-50 ms,
USB adapters add up to 16 ms of latency), the reply's frame time (7
characters) and t3.5. After a timeout the line is kept quiet for another
t3.5 before the next address (a slow slave's reply may be starting), and a
reply heard then is the late answer of the address just asked: it is listed
as ``late`` with the turnaround that would catch it. Since a silent address
costs exactly one timeout plus that silence, the duration of a scan is known
before it starts: it is printed first.

Frames are built and parsed by :mod:`protocols.modbus.rtu`; the port is driven by
:class:`agent.cli.diag._serial.RawSerialPort` (our own RTU master, for exact
timeouts). The scanner itself only needs :class:`ScanPort`, so tests drive it
with a fake bus.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from agent.cli.diag._common import (
    FAILED,
    OK,
    PORT,
    USAGE,
    DiagError,
    console,
    die,
    emit_json,
    escape,
)
from agent.cli.diag._serial import LateAnswer, LineSettings, RawSerialPort, SettingRefused
from protocols.errors import DeviceException, FrameError
from protocols.modbus.pdu import DeviceIdRequest, DeviceIdResponse, ReadRequest, Response
from protocols.modbus.rtu import ResponseParser, encode_request, frame_time, t35

__all__ = [
    "BAUDS",
    "PARITIES",
    "Found",
    "ScanPlan",
    "ScanPort",
    "ScanResult",
    "attempt_timeout",
    "parse_slaves",
    "scan",
    "scan_command",
]

BAUDS = (9600, 19200, 38400, 115200, 4800, 2400)
PARITIES = ("E", "N", "O")
DEFAULT_TURNAROUND_S = 0.06
REQUEST_CHARS = 8  # read 1 holding register: slave fc addr(2) count(2) crc(2)
REPLY_CHARS = 7  # slave fc n reg(2) crc(2)
# 43/14 basic objects
IDENT_NAMES = {
    0: "vendor",
    1: "product_code",
    2: "revision",
    3: "vendor_url",
    4: "product_name",
    5: "model",
}


class ScanPort(Protocol):
    """What the scanner needs of a port (RawSerialPort, or a fake in tests).

    ``late_answers`` collects the slaves heard after their attempt's timeout."""

    late_answers: list[LateAnswer]

    def configure(self, settings: LineSettings) -> None: ...

    async def transact(
        self, frame: bytes, parser: ResponseParser, timeout_s: float
    ) -> Response | None: ...

    def close(self) -> None: ...


def attempt_timeout(baud: int, turnaround_s: float = DEFAULT_TURNAROUND_S) -> float:
    """Time one attempt waits at ``baud`` before calling an address silent."""
    return (
        frame_time(REQUEST_CHARS, baud) + turnaround_s + frame_time(REPLY_CHARS, baud) + t35(baud)
    )


def attempt_cost(baud: int, turnaround_s: float = DEFAULT_TURNAROUND_S) -> float:
    """What a silent address costs: its timeout, then t3.5 of silence."""
    return attempt_timeout(baud, turnaround_s) + t35(baud)


def parse_slaves(text: str) -> list[int]:
    """``1-20,30,40-42`` as a sorted list of addresses in 1..247."""
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo_s, sep, hi_s = part.partition("-")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if sep else lo
        except ValueError:
            raise DiagError(
                f"--slaves {text!r}: {part!r} is not N or N-M", "e.g. --slaves 1-20,30", 2
            ) from None
        if not 1 <= lo <= hi <= 247:
            raise DiagError(f"--slaves {text!r}: {part!r} is outside 1..247", "", 2)
        out.update(range(lo, hi + 1))
    if not out:
        raise DiagError("--slaves is empty", "e.g. --slaves 1-20", 2)
    return sorted(out)


@dataclass(frozen=True, slots=True)
class Found:
    slave: int
    settings: LineSettings
    rtt_ms: float
    exception: int | None = None  # answered with this exception code
    ident: dict[str, str] = field(default_factory=dict)
    ident_error: str = ""
    late: bool = False  # answered after the attempt's timeout (rtt_ms after the request)

    @property
    def answer(self) -> str:
        if self.late:
            return f"late ({self.rtt_ms:.0f} ms)"
        if self.exception is None:
            return "register 0 read"
        return f"exception {self.exception:02d} ({DeviceException.NAMES.get(self.exception, '?')})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "slave": self.slave,
            "baud": self.settings.baud,
            "parity": self.settings.parity,
            "stopbits": self.settings.stopbits,
            "answer": "late" if self.late else ("ok" if self.exception is None else "exception"),
            "exception": self.exception,
            "rtt_ms": round(self.rtt_ms, 2),
            "ident": self.ident,
            **({"ident_error": self.ident_error} if self.ident_error else {}),
        }


@dataclass(frozen=True, slots=True)
class ScanPlan:
    """What will be tried, and how long it takes at most."""

    settings: tuple[LineSettings, ...]
    refused: tuple[tuple[LineSettings, str], ...]
    slaves: tuple[int, ...]
    turnaround_s: float

    @property
    def attempts(self) -> int:
        return len(self.settings) * len(self.slaves)

    @property
    def expected_s(self) -> float:
        """Upper bound on the scan's duration: every address silent at every setting."""
        return sum(
            attempt_cost(s.baud, self.turnaround_s) * len(self.slaves) for s in self.settings
        )


@dataclass(slots=True)
class ScanResult:
    port: str
    plan: ScanPlan
    found: list[Found] = field(default_factory=list)
    garbled: dict[LineSettings, int] = field(default_factory=dict)
    duration_s: float = 0.0
    stopped_early: bool = False
    interrupted: bool = False  # Ctrl-C: what was found until then

    def to_dict(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "slaves": [self.plan.slaves[0], self.plan.slaves[-1]] if self.plan.slaves else [],
            "settings": [str(s) for s in self.plan.settings],
            "refused": [{"settings": str(s), "reason": why} for s, why in self.plan.refused],
            "expected_s": round(self.plan.expected_s, 2),
            "duration_s": round(self.duration_s, 2),
            "stopped_early": self.stopped_early,
            "interrupted": self.interrupted,
            "garbled": {str(s): n for s, n in self.garbled.items()},
            "found": [f.to_dict() for f in self.found],
        }


def make_plan(
    port: ScanPort,
    bauds: Sequence[int],
    parities: Sequence[str],
    slaves: Sequence[int],
    turnaround_s: float,
    stopbits: int = 1,
) -> ScanPlan:
    """Try each setting on the port once; keep those it accepts."""
    ok: list[LineSettings] = []
    refused: list[tuple[LineSettings, str]] = []
    for baud in bauds:
        for parity in parities:
            s = LineSettings(baud, parity, stopbits)
            try:
                port.configure(s)
            except SettingRefused as exc:
                refused.append((s, str(exc)))
                continue
            ok.append(s)
    port.close()
    return ScanPlan(tuple(ok), tuple(refused), tuple(slaves), turnaround_s)


Tick = Callable[[LineSettings, int, Found | None], None]


async def scan(
    port: ScanPort,
    plan: ScanPlan,
    *,
    name: str = "",
    first: bool = False,
    identify: bool = True,
    tick: Tick | None = None,
    result: ScanResult | None = None,
) -> ScanResult:
    """Run ``plan``: every address at every setting; ``first`` stops after the
    first setting where anything answered. ``result`` (when given) is filled as
    the scan goes, so an interrupted scan still tells what it found."""
    result = result or ScanResult(port=name, plan=plan)
    t0 = time.monotonic()
    try:
        for settings in plan.settings:
            port.configure(settings)
            timeout = attempt_timeout(settings.baud, plan.turnaround_s)
            found_here = 0
            for slave in plan.slaves:
                req = ReadRequest(slave, 3, 0, 1)
                started = time.monotonic()
                found: Found | None = None
                try:
                    resp = await port.transact(encode_request(req), ResponseParser(req), timeout)
                    if resp is not None:
                        found = Found(slave, settings, (time.monotonic() - started) * 1000)
                except DeviceException as exc:
                    found = Found(slave, settings, (time.monotonic() - started) * 1000, exc.code)
                except FrameError:
                    result.garbled[settings] = result.garbled.get(settings, 0) + 1
                for late in port.late_answers:  # (a late 43/14 of one found: known)
                    if not any(
                        f.slave == late.slave and f.settings == settings for f in result.found
                    ):
                        result.found.append(
                            Found(late.slave, settings, late.ms, late.exception, late=True)
                        )
                        found_here += 1
                port.late_answers.clear()
                if found is not None and identify:
                    found = await _identify(port, found, timeout)
                if found is not None:
                    result.found.append(found)
                    found_here += 1
                if tick is not None:
                    tick(settings, slave, found)
            if first and found_here:
                result.stopped_early = True
                break
    finally:
        port.close()
        result.duration_s = time.monotonic() - t0
        order = {s: i for i, s in enumerate(plan.settings)}
        result.found.sort(key=lambda f: (order.get(f.settings, 0), f.slave))
    return result


async def _identify(port: ScanPort, found: Found, timeout_s: float) -> Found:
    req = DeviceIdRequest(found.slave, read_code=1, object_id=0)
    objects: dict[int, bytes] = {}
    error = ""
    # a 43/14 answer is long (up to 256 characters): give it its frame time
    wait = timeout_s + frame_time(256, found.settings.baud)
    for _ in range(4):  # "more follows": continue from next_object_id
        try:
            resp = await port.transact(encode_request(req), ResponseParser(req), wait)
        except DeviceException as exc:
            error = f"no identification (exception {exc.code:02d})"
            break
        except FrameError as exc:
            error = f"garbled identification ({exc})"
            break
        if not isinstance(resp, DeviceIdResponse):
            error = "no identification (no answer to 43/14)"
            break
        objects.update(resp.objects)
        if not resp.more_follows:
            break
        req = DeviceIdRequest(found.slave, read_code=1, object_id=resp.next_object_id)
    ident = {
        IDENT_NAMES.get(oid, f"object_{oid}"): value.decode("ascii", "replace")
        for oid, value in sorted(objects.items())
    }
    return Found(
        found.slave,
        found.settings,
        found.rtt_ms,
        found.exception,
        ident,
        error if not ident else "",
    )


# --------------------------------------------------------------------------- CLI


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(round(s), 60)
    return f"{m} min {sec:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


def _csv(text: str, conv: Callable[[str], Any], what: str, allowed: Iterable[Any]) -> list[Any]:
    allowed = list(allowed)
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = conv(part)
        except ValueError:
            raise DiagError(
                f"--{what} {text!r}: {part!r} is not valid",
                f"choose from {', '.join(map(str, allowed))}" if allowed else "",
                USAGE,
            ) from None
        if allowed and v not in allowed:
            raise DiagError(
                f"--{what} {text!r}: {part!r} is not valid",
                f"choose from {', '.join(map(str, allowed))}",
                USAGE,
            )
        out.append(v)
    return out


def render(result: ScanResult) -> None:
    con = console()
    if not result.found:
        con.print(
            f"[red]nothing answered[/] on {escape(result.port)} "
            f"({len(result.plan.settings)} settings x {len(result.plan.slaves)} addresses"
            + (", interrupted before the end)" if result.interrupted else ")")
        )
        hints = ["check A/B polarity (swap the wires), termination and the adapter's ground"]
        if result.garbled:
            where = ", ".join(str(s) for s in result.garbled)
            hints.insert(
                0, f"garbled answers at {where}: a device is there, at a setting near this one"
            )
        for h in hints:
            con.print(f"hint: {h}")
        return
    t = Table(title=escape(f"terminals on {result.port}"))
    for col in ("slave", "settings", "answer", "rtt ms", "identification (43/14)"):
        t.add_column(col, justify="right" if col in ("slave", "rtt ms") else "left")
    for f in result.found:
        ident = " ".join(
            f.ident[k] for k in ("vendor", "product_code", "revision") if f.ident.get(k)
        )
        if f.late:
            answer = "late"
        else:
            answer = "ok" if f.exception is None else f"exception {f.exception:02d}"
        t.add_row(
            str(f.slave),
            str(f.settings),
            answer,
            f"{f.rtt_ms:.1f}",
            escape(ident or f.ident_error.replace("no identification ", "none ")),
        )
    con.print(t)
    settings = sorted({f.settings for f in result.found})
    con.print(
        f"{len(result.found)} answer(s) in {_duration(result.duration_s)}; "
        f"bus settings: {', '.join(map(str, settings))}"
        + (" (stopped after the first setting that answered)" if result.stopped_early else "")
        + (" (interrupted: the rest was not scanned)" if result.interrupted else ""),
        soft_wrap=True,
    )
    for f in result.found:
        if f.late:
            need = max(2 * result.plan.turnaround_s, f.rtt_ms / 1000)
            con.print(
                f"slave {f.slave} answered after the timeout ({f.rtt_ms:.0f} ms): it is slow; "
                f"scan again with --turnaround {need:.2f} to read it properly",
                soft_wrap=True,
            )
    codes = sorted({f.exception for f in result.found if f.exception is not None})
    for code in codes:
        con.print(
            f"exception {code:02d} = {DeviceException.NAMES.get(code, 'unknown')}: "
            "the terminal is there but refuses register 0",
            soft_wrap=True,
        )


def scan_command(
    port: Annotated[str, typer.Option(help="serial port, e.g. /dev/ttyUSB0")],
    slaves: Annotated[str, typer.Option(help="addresses to try, e.g. 1-20,30")] = "1-247",
    baud: Annotated[str, typer.Option(help="baud rates to try, in order")] = ",".join(
        map(str, BAUDS)
    ),
    parity: Annotated[str, typer.Option(help="parities to try: E, N, O")] = ",".join(PARITIES),
    stopbits: Annotated[int, typer.Option(help="stop bits (1 also receives 2)")] = 1,
    turnaround: Annotated[
        float, typer.Option(help="seconds a device may take to start answering")
    ] = DEFAULT_TURNAROUND_S,
    first: Annotated[
        bool,
        typer.Option("--first", help="stop after the first setting where anything answers"),
    ] = False,
    identify: Annotated[
        bool,
        typer.Option(
            "--ident/--no-ident",
            help="ask each terminal found for 43/14 identification",
        ),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object at the end")] = False,
) -> None:
    """Find the terminals on a bus: every baud/parity and slave address, exact timeouts."""
    try:
        addresses = parse_slaves(slaves)
        bauds = _csv(baud, int, "baud", [])
        if not bauds or min(bauds) <= 0:
            raise DiagError(
                f"--baud {baud}: baud rates are positive", "e.g. --baud 9600,19200", USAGE
            )
        parities = _csv(parity.upper(), str, "parity", ["N", "E", "O"])
        if stopbits not in (1, 2):
            raise DiagError(f"--stopbits {stopbits}: 1 or 2", "", 2)
        if not 0.0 <= turnaround <= 5.0:
            raise DiagError(f"--turnaround {turnaround}: 0..5 seconds", "", 2)
        raw = RawSerialPort(port)
        plan = make_plan(raw, bauds, parities, addresses, turnaround, stopbits)
    except DiagError as exc:
        die(exc, as_json=as_json)
    err = console(stderr=True)
    if not plan.settings:
        die(
            DiagError(
                f"{port}: the port refuses every setting asked for",
                "emulated buses (vitals sim rtu, a pseudo terminal) run 8N1: pass --parity N",
                PORT,
            ),
            as_json=as_json,
        )
    by_reason: dict[str, list[LineSettings]] = {}
    for s, why in plan.refused:
        by_reason.setdefault(why, []).append(s)
    for why, refused in by_reason.items():
        listed = ", ".join(dict.fromkeys(str(s.baud) for s in refused))
        kinds = "/".join(dict.fromkeys(f"8{s.parity}{s.stopbits}" for s in refused))
        err.print(escape(f"skipping {kinds} at {listed} baud: {why}"), soft_wrap=True)
    err.print(
        f"scanning {escape(port)}: {len(plan.settings)} setting(s) x {len(plan.slaves)} address(es); "
        f"expected duration at most [bold]{_duration(plan.expected_s)}[/] "
        f"(timeout {attempt_timeout(max(s.baud for s in plan.settings), turnaround) * 1000:.0f}"
        f"-{attempt_timeout(min(s.baud for s in plan.settings), turnaround) * 1000:.0f} ms per address)",
        soft_wrap=True,
    )
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("found {task.fields[found]}"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=as_json or not err.is_terminal,
    )
    task = progress.add_task("scan", total=plan.attempts, found=0)
    count = 0

    def tick(settings: LineSettings, slave: int, found: Found | None) -> None:
        nonlocal count
        count += found is not None
        progress.update(task, advance=1, description=f"{settings} slave {slave:3d}", found=count)

    result = ScanResult(port=port, plan=plan)
    try:
        with progress:
            asyncio.run(scan(raw, plan, first=first, identify=identify, tick=tick, result=result))
    except DiagError as exc:
        die(exc, as_json=as_json)
    except KeyboardInterrupt:  # Ctrl-C: say what was found so far
        raw.close()
        result.interrupted = True
    except OSError as exc:
        from agent.cli.diag._common import explain_os_error

        die(explain_os_error(port, exc), as_json=as_json)
    if as_json:
        emit_json(result.to_dict())
    else:
        render(result)
    raise typer.Exit(OK if result.found else FAILED)
