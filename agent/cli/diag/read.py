"""``vitals diag read``: live decoded values of one device.

The device is named on the command line (``--port``/``--host`` plus
``--slave`` and ``--profile``) or taken from the gateway configuration
(``--device NAME --config F``: its bus settings, slave and profile). Each
sample reads the profile's points with the fewest requests
(:func:`protocols.modbus.plan`), through the same :class:`ModbusLink` the agent
polls with, and shows every point with its unit, quality (as the agent would
flag it) and the response time of its request. ``--json`` prints one JSON
object per sample on its own line.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Group
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from agent.cli.diag._common import FAILED, OK, USAGE, DiagError, console, die, emit_json, waiting
from agent.cli.diag._link import LinkSettings, check_endpoint, check_line, check_slave, open_link
from agent.fieldbus.links import LinkDown, ModbusLink, NoResponse, TransportError
from drivers.profiles import Point, Profile, load_profile
from protocols.errors import ConfigError, DecodeError, DeviceException
from protocols.modbus import ReadRequest, decode_response, plan
from protocols.reading import Quality

_T = TypeVar("_T")

__all__ = ["PointSample", "Sample", "Target", "read_command", "read_sample", "resolve_target"]

_QUALITY = {
    Quality.GOOD: "good",
    Quality.OUT_OF_RANGE: "out-of-range",
    Quality.STALE: "stale",
    Quality.COMM_ERROR: "comm-error",
}
_STYLE = {
    Quality.GOOD: "green",
    Quality.OUT_OF_RANGE: "yellow",
    Quality.STALE: "yellow",
    Quality.COMM_ERROR: "red",
}


@dataclass(frozen=True, slots=True)
class Target:
    """What to read: a link, a slave and a profile."""

    link: LinkSettings
    slave: int
    profile: Profile
    label: str
    interval_s: float


@dataclass(slots=True)
class PointSample:
    point: Point
    value: float | int | bool | str | None
    quality: Quality
    rtt_ms: float | None
    error: str = ""


@dataclass(slots=True)
class Sample:
    n: int
    ts: float
    points: list[PointSample] = field(default_factory=list)

    @property
    def answered(self) -> bool:
        return any(p.quality is not Quality.COMM_ERROR for p in self.points)

    def to_dict(self, target: Target) -> dict[str, Any]:
        return {
            "sample": self.n,
            "ts": round(self.ts, 3),
            "device": target.label,
            "slave": target.slave,
            "profile": target.profile.name,
            "points": {
                p.point.name: {
                    "value": _json_value(p.value),
                    "unit": p.point.unit,
                    "quality": _QUALITY[p.quality],
                    "rtt_ms": None if p.rtt_ms is None else round(p.rtt_ms, 2),
                    **({"error": p.error} if p.error else {}),
                }
                for p in self.points
            },
        }


def _not_a_sensor(profile: Profile) -> None:
    if profile.is_sensor:
        raise DiagError(
            f"'{profile.name}' is a serial sensor ({profile.protocol}), not a Modbus device",
            "it talks on its own: watch it with the agent and 'vitals status'",
            2,
        )


def _json_value(v: object) -> object:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _quality(point: Point, value: object) -> Quality:
    if isinstance(value, float) and not math.isfinite(value):
        return Quality.OUT_OF_RANGE
    if point.range is not None and isinstance(value, int | float) and not isinstance(value, bool):
        return Quality.GOOD if point.in_range(float(value)) else Quality.OUT_OF_RANGE
    return Quality.GOOD


async def read_sample(
    link: ModbusLink, slave: int, profile: Profile, requests: list[ReadRequest], n: int
) -> Sample:
    """One pass over ``requests``; a failed request marks its points comm-error."""
    by_spec = {p.spec: p for p in profile.points}
    sample = Sample(n=n, ts=time.time())
    silent = False
    for req in requests:
        if silent:
            sample.points += [
                PointSample(by_spec[s], None, Quality.COMM_ERROR, None, "not tried: no answer")
                for s in req.points
            ]
            continue
        t0 = time.perf_counter()
        try:
            # the link times out by itself; this only bounds a link that would not
            async with asyncio.timeout(link.timeout_s * 3 + 2):
                regs = await link.read(req.space, req.address, req.count, slave)
            values = decode_response(req, regs)
        except TimeoutError:
            link.close()  # whatever it waited for, start afresh
            silent = True
            sample.points += [
                PointSample(by_spec[s], None, Quality.COMM_ERROR, None, "no answer")
                for s in req.points
            ]
            continue
        except (TransportError, DeviceException, DecodeError) as exc:
            rtt = (time.perf_counter() - t0) * 1000
            # a silent device or a dead link will not answer the next request either
            silent = isinstance(exc, NoResponse | LinkDown)
            if isinstance(exc, NoResponse):
                text = "no answer"
            elif isinstance(exc, LinkDown):
                text = f"link down: {exc}"
            else:
                text = str(exc)
            sample.points += [
                PointSample(by_spec[s], None, Quality.COMM_ERROR, None if silent else rtt, text)
                for s in req.points
            ]
            continue
        rtt = (time.perf_counter() - t0) * 1000
        for spec, value in values:
            point = by_spec[spec]
            if isinstance(value, DecodeError):
                sample.points.append(PointSample(point, None, Quality.COMM_ERROR, rtt, str(value)))
            else:
                sample.points.append(PointSample(point, value, _quality(point, value), rtt))
    order = {p.spec: i for i, p in enumerate(profile.points)}
    sample.points.sort(key=lambda p: order[p.point.spec])
    return sample


def _fmt(v: object) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def render(target: Target, sample: Sample | None, samples: int | None, busy: str = "") -> Group:
    """The live screen; ``busy`` says what it waits for, beside a spinner."""
    of = f"/{samples}" if samples else ""
    n = sample.n if sample else 0
    head = Text.assemble(
        (f"{target.label}", "bold"),
        f"  slave {target.slave}  profile {target.profile.name} ({target.profile.model})  ",
        f"sample {n}{of}",
    )
    t = Table(expand=False)
    t.add_column("point")
    t.add_column("value", justify="right")
    t.add_column("unit")
    t.add_column("quality")
    t.add_column("rtt ms", justify="right")
    t.add_column("note")
    if sample is not None:
        for p in sample.points:
            rtt = "" if p.rtt_ms is None else f"{p.rtt_ms:.1f}"
            rng = p.point.range
            note = p.error or (f"valid {rng[0]:g}..{rng[1]:g}" if rng else "")
            t.add_row(
                Text(p.point.name),
                Text(_fmt(p.value)),
                Text(p.point.unit),
                Text(_QUALITY[p.quality], style=_STYLE[p.quality]),
                rtt,
                Text(note),
            )
    if busy:
        return Group(head, t, Spinner("dots", text=Text(busy)))
    return Group(head, t)


def resolve_target(
    *,
    device: str | None,
    config: Path | None,
    port: str | None,
    host: str | None,
    tcp_port: int,
    slave: int | None,
    profile: str | None,
    baud: int | None,
    parity: str | None,
    stopbits: int | None,
    timeout: float | None,
    interval: float | None,
) -> Target:
    """The device to read, from the command line or the gateway configuration."""
    check_endpoint(port, host)
    if device:
        from agent.ops.config import load_config

        cfg_path = config or Path("/etc/vitals/gateway.toml")
        try:
            cfg = load_config(cfg_path)
        except ConfigError as exc:
            first = exc.problems[0] if exc.problems else (str(cfg_path), "invalid")
            raise DiagError(
                f"{first[0]}: {first[1]}",
                f"see every problem with 'vitals config check {cfg_path}'",
            ) from None
        dev = next((d for d in cfg.devices if d.name == device), None)
        if dev is None:
            names = ", ".join(d.name for d in cfg.devices) or "(none)"
            raise DiagError(f"no device named {device!r} in {cfg_path}", f"devices: {names}", 2)
        bus = next(b for b in cfg.buses if b.name == dev.bus)
        _not_a_sensor(dev.profile)
        # --port or --host on the command line replace the bus's endpoint
        own = port is None and host is None
        link = LinkSettings(
            port=(bus.port or None) if own else port,
            host=(bus.host or None) if own else host,
            tcp_port=tcp_port if host else bus.tcp_port,
            baud=_given(baud, bus.baud),
            parity=_parity(parity or bus.parity),
            stopbits=_given(stopbits, bus.stopbits),
            bytesize=bus.bytesize,
            timeout_s=_given(timeout, bus.timeout_s),
            rtu_over_tcp=bus.kind == "rtu-over-tcp",
        )
        return _checked(
            Target(
                link=link,
                slave=_given(slave, dev.slave),
                profile=dev.profile,
                label=f"{dev.name} on {link.describe}",
                interval_s=_given(interval, dev.interval_s),
            )
        )
    if not profile:
        raise DiagError("which profile?", "pass --profile NAME (or --device NAME --config F)", 2)
    if not port and not host:
        raise DiagError("which port?", "pass --port /dev/ttyUSB0 or --host H --tcp-port P", 2)
    try:
        prof = load_profile(profile)
    except ConfigError as exc:
        raise DiagError(str(exc).splitlines()[0], "list them in drivers/profiles/", 2) from None
    _not_a_sensor(prof)
    link = LinkSettings(
        port=port,
        host=host,
        tcp_port=tcp_port,
        baud=_given(baud, 9600),
        parity=_parity(parity or "E"),
        stopbits=_given(stopbits, 1),
        timeout_s=_given(timeout, 1.0),
    )
    return _checked(
        Target(
            link=link,
            slave=_given(slave, 1),
            profile=prof,
            label=link.describe,
            interval_s=_given(interval, prof.interval_s),
        )
    )


def _checked(target: Target) -> Target:
    """``target`` if its slave address and line settings can be used; else exit 2."""
    check_slave(target.slave, tcp=bool(target.link.host))
    check_line(target.link)
    return target


def check_run(samples: int | None, interval: float | None, until: str) -> None:
    """At least one sample, a positive interval; else exit 2 (``until``: what
    leaving --samples out does, e.g. "read until Ctrl-C")."""
    if samples is not None and samples < 1:
        raise DiagError(f"--samples {samples}: at least 1", f"leave it out to {until}", USAGE)
    if interval is not None and interval <= 0:
        raise DiagError(f"--interval {interval}: more than 0 seconds", "", USAGE)


def _given(value: _T | None, default: _T) -> _T:
    """The value given on the command line (0 included: it is checked, not replaced)."""
    return default if value is None else value


def _parity(text: str) -> str:
    p = text.upper()
    if p not in ("N", "E", "O"):
        raise DiagError(f"--parity {text}: expected N, E or O", "emulated buses run N", USAGE)
    return p


@dataclass(slots=True)
class _Tally:
    samples: int = 0
    answered: int = 0


async def _run(target: Target, samples: int | None, as_json: bool, tally: _Tally) -> None:
    prof = target.profile
    requests = plan(prof.specs, max_registers=prof.max_registers, max_gap=prof.max_gap)
    with waiting(f"opening {target.link.describe}", quiet=as_json):
        link = await open_link(target.link)
    live: Live | None = None
    asking = f"asking slave {target.slave} (timeout {target.link.timeout_s:g} s)"
    try:
        if not as_json:
            live = Live(
                render(target, None, samples, asking),
                console=console(),
                refresh_per_second=8,
                transient=False,
            )
            live.start()
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while samples is None or tally.samples < samples:
            sample = await read_sample(link, target.slave, prof, requests, tally.samples + 1)
            tally.samples += 1
            tally.answered += sample.answered
            last = samples is not None and tally.samples >= samples
            if live is not None:
                wait = "" if last else f"next sample every {target.interval_s:g} s (Ctrl-C stops)"
                live.update(render(target, sample, samples, wait), refresh=True)
            else:
                emit_json(sample.to_dict(target))
            if last:
                break
            next_at += target.interval_s
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if live is not None:
                live.update(render(target, sample, samples, asking), refresh=True)
    finally:
        if live is not None:
            live.stop()
        link.close()


def read_command(
    port: Annotated[str | None, typer.Option(help="serial port, e.g. /dev/ttyUSB0")] = None,
    host: Annotated[str | None, typer.Option(help="Modbus TCP host")] = None,
    tcp_port: Annotated[int, typer.Option(help="Modbus TCP port")] = 502,
    slave: Annotated[int | None, typer.Option(help="slave address / unit id (default 1)")] = None,
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
        float | None, typer.Option(help="seconds between samples (default: the profile's)")
    ] = None,
    samples: Annotated[int | None, typer.Option(help="stop after this many samples")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON object per sample per line")
    ] = False,
) -> None:
    """Live table of a device's decoded points: value, unit, quality, response time."""
    try:
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
        check_run(samples, interval, "read until Ctrl-C")
        tally = _Tally()
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends a live read
            asyncio.run(_run(target, samples, as_json, tally))
    except DiagError as exc:
        die(exc, as_json=as_json)
    if tally.samples and not tally.answered:
        if not as_json:
            typer.secho(f"error: slave {target.slave} did not answer", fg="red", err=True)
            typer.echo(
                "hint: check the slave address, baud and parity ('vitals diag scan' finds them) "
                "and the A/B wiring",
                err=True,
            )
        raise typer.Exit(FAILED)
    raise typer.Exit(OK if tally.answered else FAILED)
