"""``vitals diag trace``: the raw frames of a bus, each told what it is.

The installer holds the port (or a Modbus TCP device, or an RTU-over-TCP
converter): trace polls the device as ``diag read`` does, through the agent's own
:class:`~agent.fieldbus.links.ModbusLink`, whose trace hook hands over every byte
sent and received. :class:`Annotator` cuts what is received into frames
(:func:`protocols.modbus.rtu.response_length`, silence) and names each one: a
request (numbered), the reply to request #n with its time, an exception
reply, a CRC error, a late reply (to an earlier request, or after its
timeout), the adapter's echo of our own request, or garbage. Modbus TCP
(``--host`` without ``--rtu-over-tcp``): :class:`MbapAnnotator` cuts by the
MBAP length and matches replies by transaction id. Printed live, one line a
frame, or ``--json``: one object a frame, for a support bundle.

Or ``--bus NAME``: the running agent's own link on that bus, tapped through
its trace socket (:mod:`agent.ops.tap`, the service group only) while it polls
on; the frames are named the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from agent.cli.diag._common import (
    FAILED,
    OK,
    PORT,
    USAGE,
    DiagError,
    console,
    die,
    emit_json,
    waiting,
)
from agent.cli.diag._link import open_link
from agent.cli.diag.read import check_run, read_sample, resolve_target
from agent.ops.status import default_status_paths
from agent.ops.tap import TRACE_SOCKET, tap_socket_path
from protocols.errors import ConfigError, FrameError
from protocols.modbus import mbap, plan
from protocols.modbus.rtu import crc_ok, frame_time, response_length

__all__ = ["Annotator", "MbapAnnotator", "TraceFrame", "trace_command"]

#: what a frame is
REQUEST, REPLY, EXCEPTION, CRC, LATE, ECHO, GARBAGE = (
    "request",
    "reply",
    "exception",
    "crc-error",
    "late",
    "echo",
    "garbage",
)
_STYLE = {
    REQUEST: "cyan",
    REPLY: "green",
    EXCEPTION: "yellow",
    CRC: "bold red",
    LATE: "magenta",
    ECHO: "dim",
    GARBAGE: "red",
}


@dataclass(slots=True)
class TraceFrame:
    t: float  # seconds since the trace started
    direction: str  # "tx" or "rx"
    data: bytes
    kind: str
    slave: int | None = None
    function: int | None = None
    crc_ok: bool | None = None
    request: int | None = None  # the request's number (tx), or the one it answers (rx)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "t": round(self.t, 4),
            "dir": self.direction,
            "hex": self.data.hex(" "),
            "kind": self.kind,
            "slave": self.slave,
            "function": self.function,
            "crc_ok": self.crc_ok,
            "request": self.request,
            "note": self.note,
        }

    def line(self) -> Text:
        arrow = "→" if self.direction == "tx" else "←"
        what = self.kind + (f" #{self.request}" if self.request is not None else "")
        return Text.assemble(
            f"{self.t:9.4f}  {arrow}  ",
            (f"{what:<14}", _STYLE[self.kind]),
            f" {self.note:<44} ",
            (self.data.hex(" "), "dim" if self.kind == ECHO else ""),
        )


@dataclass(slots=True)
class _Request:
    n: int
    slave: int
    function: int
    frame: bytes
    end: float  # monotonic time its last bit left the wire
    answered: bool = False


def _what(pdu: bytes) -> str:
    """``slave 2 fn 3 @32 x7``: a request's unit id and PDU, said in a few words."""
    note = f"slave {pdu[0]} fn {pdu[1]}"
    if pdu[1] in (1, 2, 3, 4) and len(pdu) >= 6:
        note += f" @{int.from_bytes(pdu[2:4], 'big')} x{int.from_bytes(pdu[4:6], 'big')}"
    return note


class Annotator:
    """The link's trace hook: cuts, names and hands on every frame (``emit``).

    ``timeout_s`` is the link's response timeout (a reply after it is late);
    ``char_s`` one character's time on the wire (0 over TCP); ``gap_s`` the
    silence that ends what cannot be cut by its length (garbage).
    """

    def __init__(
        self,
        emit: Callable[[TraceFrame], None],
        *,
        timeout_s: float,
        char_s: float = 0.0,
        gap_s: float = 0.02,
    ) -> None:
        self._emit = emit
        self.timeout_s = timeout_s
        self.char_s = char_s
        self.gap_s = max(gap_s, 0.005)
        self.t0 = time.monotonic()
        self.requests: list[_Request] = []
        self._rx = bytearray()
        self._rx_at = 0.0
        self._flush: asyncio.TimerHandle | None = None

    def __call__(self, direction: str, data: bytes, now: float | None = None) -> None:
        """One chunk sent or received; ``now``: when (monotonic; default: now)."""
        if now is None:
            now = time.monotonic()
        if direction == "tx":
            self._cut(now, final=True)
            self._sent(now, data)
            return
        if not self._rx:
            self._rx_at = now
        self._rx += data
        self._cut(now, final=False)
        if self._flush is not None:
            self._flush.cancel()
        if self._rx:
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(self.gap_s, lambda: self._cut(time.monotonic(), True))

    def _sent(self, now: float, data: bytes) -> None:
        """A request went out: numbered and shown."""
        req = _Request(
            len(self.requests) + 1, data[0], data[1], data, now + len(data) * self.char_s
        )
        self.requests.append(req)
        self._out(now, "tx", data, REQUEST, req.slave, req.function, True, req.n, _what(data))

    def _out(
        self,
        now: float,
        direction: str,
        data: bytes,
        kind: str,
        slave: int | None,
        function: int | None,
        crc: bool | None,
        request: int | None,
        note: str,
    ) -> None:
        self._emit(
            TraceFrame(now - self.t0, direction, data, kind, slave, function, crc, request, note)
        )

    def _match(self, slave: int, fn: int) -> _Request | None:
        for req in reversed(self.requests):
            if req.slave == slave and req.function == fn & 0x7F and not req.answered:
                return req
        return None

    def _cut(self, now: float, final: bool) -> None:
        """Emit the whole frames received; with ``final`` (silence, or a request going
        out) whatever is left too, as garbage."""
        rx, at = self._rx, self._rx_at
        last = self.requests[-1] if self.requests else None
        while rx:
            if (
                last is not None
                and not last.answered
                and last.function not in (5, 6)  # those replies are copies of the request
                and rx.startswith(last.frame)
            ):
                del rx[: len(last.frame)]
                self._out(
                    at,
                    "rx",
                    last.frame,
                    ECHO,
                    last.slave,
                    last.function,
                    True,
                    last.n,
                    "our own request, heard back",
                )
                continue
            n = response_length(rx[:3]) if len(rx) >= 2 else None
            req = self._match(rx[0], rx[1]) if len(rx) >= 2 else None
            if n is None or req is None:
                if not final:
                    return  # wait: more may come, or silence makes it garbage
                break
            if len(rx) < n:
                if not final:
                    return
                break
            frame = bytes(rx[:n])
            del rx[:n]
            slave, fn = frame[0], frame[1]
            ms = (at - req.end) * 1000
            if not crc_ok(frame):
                self._out(
                    at,
                    "rx",
                    frame,
                    CRC,
                    slave,
                    fn,
                    False,
                    req.n,
                    f"slave {slave} fn {fn}: bad CRC, reply to #{req.n} refused",
                )
                req.answered = True
                continue
            req.answered = True
            if req is not last or at - req.end > self.timeout_s:
                after = (at - req.end - self.timeout_s) * 1000
                self._out(
                    at,
                    "rx",
                    frame,
                    LATE,
                    slave,
                    fn,
                    True,
                    req.n,
                    f"slave {slave}: reply to #{req.n}, {after:.0f} ms after its timeout",
                )
            elif fn & 0x80:
                code = frame[2]
                self._out(
                    at,
                    "rx",
                    frame,
                    EXCEPTION,
                    slave,
                    fn,
                    True,
                    req.n,
                    f"slave {slave}: exception {code} to #{req.n} in {ms:.0f} ms",
                )
            else:
                self._out(
                    at,
                    "rx",
                    frame,
                    REPLY,
                    slave,
                    fn,
                    True,
                    req.n,
                    f"slave {slave} fn {fn}: reply to #{req.n} in {ms:.0f} ms",
                )
        if rx and final:
            data = bytes(rx)
            rx.clear()
            self._out(
                at,
                "rx",
                data,
                GARBAGE,
                None,
                None,
                crc_ok(data),
                None,
                f"{len(data)} bytes that are no reply to a request",
            )
        if self._flush is not None and not rx:
            self._flush.cancel()
            self._flush = None


class MbapAnnotator(Annotator):
    """Modbus TCP: frames cut by their MBAP length field, matched by transaction id.

    A reply whose transaction id is of a request no longer waited for (it
    timed out) is late, as is one to a request sent before a tap began (seen
    after the tap's first request); bytes that are not Modbus TCP (protocol id not 0, a
    length out of 2..254, a transaction id on no request, half a frame then
    silence) are garbage: the link drops the connection on them.
    """

    def __init__(
        self, emit: Callable[[TraceFrame], None], *, timeout_s: float, gap_s: float = 0.02
    ) -> None:
        super().__init__(emit, timeout_s=timeout_s, gap_s=gap_s)
        self._tids: dict[int, _Request] = {}
        self._first_tid: int | None = None

    def _before(self, tid: int) -> bool:
        """Whether ``tid`` may be of a request sent before the trace began (a tapped
        link numbers its requests on; it drops replies more than 64 behind)."""
        first = self._first_tid
        return first is None or 0 < (first - tid) & 0xFFFF <= 64

    def _sent(self, now: float, data: bytes) -> None:
        tid = int.from_bytes(data[:2], "big")
        if self._first_tid is None:
            self._first_tid = tid
        req = _Request(len(self.requests) + 1, data[6], data[7], data, now)
        self.requests.append(req)
        self._tids[tid] = req
        note = f"tid {tid} {_what(data[6:])}".replace("slave", "unit", 1)
        self._out(now, "tx", data, REQUEST, req.slave, req.function, None, req.n, note)

    def _cut(self, now: float, final: bool) -> None:
        rx, at = self._rx, self._rx_at
        last = self.requests[-1] if self.requests else None
        why = ""
        while len(rx) >= 6:
            try:
                tid, size = mbap.decode_header(rx)
            except FrameError as exc:
                why = str(exc)
                break
            if len(rx) < size:
                why = f"half a frame ({len(rx)} of {size} bytes)"
                break
            frame = bytes(rx[:size])
            req = self._tids.get(tid)
            if req is None and self._before(tid):  # a tap that began mid-exchange
                del rx[:size]
                unit, fn = frame[6], frame[7]
                # after a request of the trace went out, that reply is late
                kind = LATE if self.requests else EXCEPTION if fn & 0x80 else REPLY
                note = f"tid {tid} unit {unit} fn {fn}: to a request sent before the trace"
                self._out(at, "rx", frame, kind, unit, fn, None, None, note)
                continue
            if req is None or req.answered:
                why = f"transaction id {tid}, on no request out"
                break
            del rx[:size]
            req.answered = True
            unit, fn = frame[6], frame[7]
            head = f"tid {tid} unit {unit}"
            if req is not last or at - req.end > self.timeout_s:
                after = (at - req.end - self.timeout_s) * 1000
                kind, note = LATE, f"{head}: reply to #{req.n}, {after:.0f} ms after its timeout"
            elif fn & 0x80:
                code = frame[8] if len(frame) > 8 else None
                ms = (at - req.end) * 1000
                kind, note = EXCEPTION, f"{head}: exception {code} to #{req.n} in {ms:.0f} ms"
            else:
                ms = (at - req.end) * 1000
                kind, note = REPLY, f"{head} fn {fn}: reply to #{req.n} in {ms:.0f} ms"
            self._out(at, "rx", frame, kind, unit, fn, None, req.n, note)
        if rx and (final or (why and not why.startswith("half"))):
            data = bytes(rx)
            rx.clear()
            why = why or f"half a frame ({len(data)} bytes)"
            self._out(at, "rx", data, GARBAGE, None, None, None, None, f"{len(data)} bytes: {why}")
        if self._flush is not None and not rx:
            self._flush.cancel()
            self._flush = None


async def _run(target: Any, samples: int | None, as_json: bool, counts: dict[str, int]) -> None:
    prof = target.profile
    requests = plan(prof.specs, max_registers=prof.max_registers, max_gap=prof.max_gap)
    out = console()

    def emit(f: TraceFrame) -> None:
        counts[f.kind] = counts.get(f.kind, 0) + 1
        if as_json:
            emit_json(f.to_dict())
        else:
            out.print(f.line(), soft_wrap=True)

    s = target.link
    char_s = (
        0.0 if s.host else frame_time(1, s.baud, 1 + s.bytesize + (s.parity != "N") + s.stopbits)
    )
    with waiting(f"opening {s.describe}", quiet=as_json):
        link = await open_link(s)
    gap_s = max(link.inter_frame_s, 0.02)
    annotate = (
        MbapAnnotator(emit, timeout_s=s.timeout_s, gap_s=gap_s)
        if s.host and not s.rtu_over_tcp
        else Annotator(emit, timeout_s=s.timeout_s, char_s=char_s, gap_s=gap_s)
    )
    link.trace = annotate
    if not as_json:
        out.print(
            Text.assemble(
                (f"trace {s.describe}", "bold"),
                f"  slave {target.slave}  profile {prof.name}  (Ctrl-C stops)",
            )
        )
    try:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        n = 0
        while samples is None or n < samples:
            n += 1
            await read_sample(link, target.slave, prof, requests, n)
            next_at += target.interval_s
            await asyncio.sleep(max(0.0, next_at - loop.time()))
        # what comes after the last request (a late reply) is shown too
        await asyncio.sleep(max(annotate.gap_s, link.late_window(target.slave)))
        annotate._cut(time.monotonic(), final=True)
    finally:
        link.trace = None
        link.close()


def _tap_paths(socket: Path | None, config: Path | None) -> list[Path]:
    if socket is not None:
        return [socket]
    paths = [p.with_name(TRACE_SOCKET) for p in default_status_paths()]
    if config is not None:
        from agent.ops.config import load_config

        try:
            paths.insert(0, tap_socket_path(load_config(config).gateway.state_dir))
        except ConfigError as exc:
            first = exc.problems[0] if exc.problems else (str(config), "invalid")
            raise DiagError(f"{first[0]}: {first[1]}", "", USAGE) from None
    return list(dict.fromkeys(paths))


async def _tap(
    bus: str, paths: list[Path], frames: int | None, as_json: bool, counts: dict[str, int]
) -> None:
    """Trace ``bus`` of the running agent through its trace socket."""
    reader = writer = None
    errors: list[str] = []
    for path in paths:
        try:
            reader, writer = await asyncio.open_unix_connection(path)
            break
        except FileNotFoundError:
            continue
        except PermissionError:
            raise DiagError(
                f"{path}: permission denied",
                "the agent's frames are for its service group: add yourself to the 'vitals' "
                "group (sudo usermod -aG vitals $USER) and log in again, or use sudo",
                PORT,
            ) from None
        except OSError as exc:
            errors.append(f"{path}: {exc.strerror or exc}")
    if reader is None or writer is None:
        where = "; ".join(errors) or ", ".join(str(p) for p in paths)
        raise DiagError(
            f"no running agent to trace (no trace socket: {where})",
            "start it ('sudo systemctl start vitals'), or trace a port you hold with --port",
            FAILED,
        )
    try:
        writer.write(json.dumps({"bus": bus}).encode() + b"\n")
        hello = json.loads(await reader.readline() or b"{}")
        if not hello.get("ok"):
            buses = ", ".join(hello.get("buses", [])) or "(none)"
            raise DiagError(
                str(hello.get("error", "the agent closed the trace")), f"its buses: {buses}", USAGE
            )
        out = console()
        seen = 0

        def emit(f: TraceFrame) -> None:
            nonlocal seen
            seen += 1
            counts[f.kind] = counts.get(f.kind, 0) + 1
            if as_json:
                emit_json(f.to_dict())
            else:
                out.print(f.line(), soft_wrap=True)

        timeout_s, gap_s = float(hello["timeout_s"]), max(float(hello["inter_frame_s"]), 0.02)
        annotate = (
            MbapAnnotator(emit, timeout_s=timeout_s, gap_s=gap_s)
            if hello.get("framing") == "mbap"
            else Annotator(emit, timeout_s=timeout_s, char_s=float(hello["char_s"]), gap_s=gap_s)
        )
        annotate.t0 = float(hello["t"])
        if not as_json:
            out.print(
                Text.assemble(
                    (f"trace bus {bus} of the running agent", "bold"),
                    f"  {hello['link']}  (Ctrl-C stops)",
                )
            )
        while frames is None or seen < frames:
            line = await reader.readline()
            if not line:
                raise DiagError("the agent closed the trace (stopped?)", "", FAILED)
            msg = json.loads(line)
            annotate(msg["dir"], bytes.fromhex(msg["hex"]), now=float(msg["t"]))
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def trace_command(
    port: Annotated[str | None, typer.Option(help="serial port, e.g. /dev/ttyUSB0")] = None,
    host: Annotated[str | None, typer.Option(help="Modbus TCP device or gateway host")] = None,
    tcp_port: Annotated[int, typer.Option(help="its TCP port")] = 502,
    rtu_over_tcp: Annotated[
        bool, typer.Option("--rtu-over-tcp", help="--host is an RTU-over-TCP converter")
    ] = False,
    slave: Annotated[int | None, typer.Option(help="slave address (default 1)")] = None,
    profile: Annotated[str | None, typer.Option(help="device profile name or file")] = None,
    device: Annotated[
        str | None, typer.Option(help="a device of the gateway configuration")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="gateway configuration (with --device)")
    ] = None,
    baud: Annotated[int | None, typer.Option(help="baud rate (default 9600)")] = None,
    parity: Annotated[str | None, typer.Option(help="N, E or O (default E)")] = None,
    stopbits: Annotated[int | None, typer.Option(help="1 or 2")] = None,
    timeout: Annotated[float | None, typer.Option(help="response timeout, seconds")] = None,
    interval: Annotated[
        float | None, typer.Option(help="seconds between polls (default: the profile's)")
    ] = None,
    samples: Annotated[int | None, typer.Option(help="stop after this many polls")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per frame")] = False,
    bus: Annotated[
        str | None, typer.Option(help="tap this bus of the running agent (it keeps polling)")
    ] = None,
    socket: Annotated[
        Path | None, typer.Option(help="the agent's trace socket (default: beside its status)")
    ] = None,
    frames: Annotated[int | None, typer.Option(help="with --bus: stop after this many")] = None,
) -> None:
    """Raw frames of a bus (RTU or Modbus TCP): time, direction, hex, what it is.
    Polls a device (--port/--host) or taps the running agent's bus (--bus NAME)."""
    counts: dict[str, int] = {}
    try:
        if bus is not None:
            if port or host or device:
                raise DiagError(
                    "--bus taps the running agent: no --port, --host or --device with it",
                    "",
                    USAGE,
                )
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(_tap(bus, _tap_paths(socket, config), frames, as_json, counts))
            raise typer.Exit(OK)
        target = resolve_target(
            device=device,
            config=config,
            port=port,
            host=host,
            tcp_port=tcp_port,
            slave=slave,
            profile=profile,
            baud=baud,
            parity=parity,
            stopbits=stopbits,
            timeout=timeout,
            interval=interval,
        )
        if host and rtu_over_tcp:  # a converter: RTU frames inside the TCP stream
            target = dataclasses.replace(
                target, link=dataclasses.replace(target.link, rtu_over_tcp=True)
            )
        check_run(samples, interval, "trace until Ctrl-C")
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends a live trace
            asyncio.run(_run(target, samples, as_json, counts))
    except DiagError as exc:
        die(exc, as_json=as_json)
    raise typer.Exit(OK)
