"""Terminal firmware updates through the gateway: a signed image, over the terminal's own line.

The image is verified first (``protocols.fwimage.verify``: the signature of a
trusted firmware key, the payload's size and SHA-256): a refused image never
puts a byte on the bus. Then, on the terminal (docs/firmware.md, "Updates"):

1. read its control block (holding 48-55) and its model (identification object 1);
2. *begin* (holding 56-75: size, version, SHA-256): a terminal that already
   holds part of this very image keeps it, and says how much (50-51);
3. send the rest in chunks with function 21 (write file record), each in the
   idle time of the bus (:class:`BusTurns`: the other devices keep their
   poll intervals); a chunk without an answer is sent again; a terminal that
   stays silent (power cut) is waited for, then the transfer resumes where
   its flash says it stopped; a gateway that restarts resumes the same way;
4. *commit*: the terminal checks the SHA-256, unpacks the image into its
   inactive slot and resets into it on trial;
5. wait until it confirms the new version, or reports that the old one came
   back (a crash at boot, no confirmation in time).

``vitals firmware update --device D IMAGE`` runs this for a technician, with
the bus's other devices polled meanwhile and a progress bar.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from agent.bus import BusPoller
from agent.transport import ModbusLink, TransportError
from protocols import ed25519, fwimage
from protocols.errors import DeviceException, KeyFormatError, RemoteError
from protocols.modbus import Space
from protocols.rtu import WriteFileRecordRequest, encode_request, frame_time

__all__ = [
    "CHUNK_MAX",
    "BusTurns",
    "FirmwareUpdate",
    "Outcome",
    "UpdateFailed",
    "firmware_app",
    "load_firmware_keys",
]

# the terminal's control block (firmware/regmap.py, firmware/bootloader.py)
FWU_STATUS = 48
FWU_COMMAND = 56
CMD_BEGIN, CMD_COMMIT = 1, 2
STATES = ("idle", "receiving", "rebooting", "trial", "confirmed", "rejected", "rolled back")
ERRORS = (
    "",
    "the received image's SHA-256 is wrong",
    "the image is not a well-formed slot archive",
    "the terminal's flash refused a write",
    "the new image crashed at boot",
    "the new image did not confirm in time",
)
REBOOTING, TRIAL, CONFIRMED, REJECTED, ROLLED_BACK = 2, 3, 4, 5, 6
CHUNK_MAX = 240
FIRMWARE_KEYS_DIR = "firmware-keys"


class UpdateFailed(RemoteError):
    """The terminal did not take the image (the message says what it runs now)."""


@dataclass(frozen=True, slots=True)
class Status:
    state: int
    error: int
    received: int
    version: int
    tried: int
    chunk_max: int
    trial: bool

    @classmethod
    def of(cls, regs: Sequence[int] | Sequence[bool]) -> Status:
        r = [int(v) for v in regs]
        return cls(r[0], r[1], r[2] << 16 | r[3], r[4], r[5], r[6], bool(r[7]))

    @property
    def why(self) -> str:
        return ERRORS[self.error] if 0 <= self.error < len(ERRORS) else f"error {self.error}"


@dataclass(slots=True)
class Outcome:
    ok: bool
    message: str
    version_before: int = 0
    version_after: int = 0
    chunks: int = 0
    resent: int = 0  # chunks sent again (no answer, a gap)
    resumed_at: list[int] = field(default_factory=list)  # byte offsets a transfer resumed from
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "message": self.message,
            "version_before": fwimage.version_text(self.version_before),
            "version_after": fwimage.version_text(self.version_after),
            "chunks": self.chunks,
            "resent": self.resent,
            "resumed_at": self.resumed_at,
            "seconds": round(self.seconds, 1),
        }


class BusTurns:
    """Transactions of a side job in the idle time of a bus's poller.

    Attached to a :class:`BusPoller` (``poller.idle``), it is called whenever
    nothing is due before the next poll; it grants a waiting :meth:`turn`
    only if its cost fits before that poll, so the devices polled keep their
    intervals. Without a poller (or before it runs) a turn is granted at once.
    """

    def __init__(self, poller: BusPoller | None = None) -> None:
        self._poller = poller
        self._asked = asyncio.Event()
        self._want: tuple[asyncio.Future[None], asyncio.Future[None], float] | None = None
        self.granted = 0

    def attach(self) -> None:
        if self._poller is not None:
            self._poller.idle = self

    def detach(self) -> None:
        if self._poller is not None and self._poller.idle is self:
            self._poller.idle = None

    @contextlib.asynccontextmanager
    async def turn(self, cost_s: float) -> AsyncIterator[None]:
        """Hold the bus for about ``cost_s`` seconds, between two polls."""
        if self._poller is None or self._poller.idle is not self:
            yield
            return
        loop = asyncio.get_running_loop()
        granted, release = loop.create_future(), loop.create_future()
        self._want = (granted, release, cost_s)
        self._asked.set()
        try:
            await granted
            yield
        finally:
            if not release.done():
                release.set_result(None)

    async def __call__(self, due: float) -> bool:
        """The poller is idle until ``due``: run a side transaction if it fits.
        True when time went by (the poller looks at its schedule again)."""
        while True:
            left = due - time.monotonic()
            want = self._want
            if want is not None and not want[0].done():
                granted, release, cost = want
                if left < cost:
                    return False  # it does not fit: the poll first
                self._want = None
                self._asked.clear()
                granted.set_result(None)
                self.granted += 1
                await release
                return True
            if left <= 0:
                return False
            self._asked.clear()
            try:
                await asyncio.wait_for(self._asked.wait(), left)
            except TimeoutError:
                return True


class FirmwareUpdate:
    """One update of one terminal (``slave`` behind ``link``) to ``image``.

    ``baud`` is the line's (the first chunks' cost estimate); ``progress`` is
    called with (bytes the terminal holds, image size, phase).
    """

    def __init__(
        self,
        link: ModbusLink,
        slave: int,
        image: fwimage.FirmwareImage,
        *,
        turns: BusTurns | None = None,
        baud: int = 9600,
        retries: int = 3,
        silent_wait_s: float = 120.0,
        reboot_wait_s: float = 120.0,
        progress: Callable[[int, int, str], None] | None = None,
    ) -> None:
        self.link = link
        self.slave = slave
        self.image = image
        self.manifest = image.manifest
        self.turns = turns or BusTurns()
        self.baud = baud
        self.retries = retries
        self.silent_wait_s = silent_wait_s
        self.reboot_wait_s = reboot_wait_s
        self._progress = progress or (lambda n, size, phase: None)
        self._slowest = 0.0
        self._held = 0  # bytes the terminal acknowledged
        self.outcome = Outcome(False, "not started")

    # -- one transaction each, in the bus's idle time

    def _cost(self, request_bytes: int, reply_bytes: int) -> float:
        wire = frame_time(request_bytes, self.baud) + frame_time(reply_bytes, self.baud)
        return max(wire + 0.03, 1.5 * self._slowest) + self.link.inter_frame_s

    async def _timed(self, cost: float, call: Callable[[], Any]) -> Any:
        async with self.turns.turn(cost):
            t0 = time.monotonic()
            result = await call()
            self._slowest = max(self._slowest, time.monotonic() - t0)
            return result

    async def status(self) -> Status:
        regs = await self._timed(
            self._cost(8, 21),
            lambda: self.link.read(Space.HOLDING, FWU_STATUS, 8, self.slave),
        )
        return Status.of(regs)

    async def _command(self, values: list[int]) -> None:
        await self._timed(
            self._cost(9 + 2 * len(values), 8),
            lambda: self.link.write(16, FWU_COMMAND, values, self.slave),
        )

    async def model(self) -> str:
        """The terminal's product code (identification object 1, function 43/14 code 4)."""
        want = self.manifest.model.encode()
        pdu = b"\x2b\x0e\x04\x01"
        # the reply PDU: 2b 0e code conformity more next count, then id, length, value
        reply: bytes = await self._timed(
            self._cost(8, 12 + len(want)),
            lambda: self.link._request(self.slave, pdu, 9 + len(want)),
        )
        return reply[9 : 9 + reply[8]].decode(errors="replace") if len(reply) >= 9 else ""

    async def _chunk(self, offset: int, data: bytes) -> None:
        words = offset // 2
        req = WriteFileRecordRequest(self.slave, words // 10000 + 1, words % 10000, data)
        pdu = encode_request(req)[1:-2]
        await self._timed(
            self._cost(len(pdu) + 3, len(pdu) + 3),
            lambda: self.link._request(self.slave, pdu, len(pdu)),
        )

    # -- the update

    async def run(self) -> Outcome:
        t0 = time.monotonic()
        out = self.outcome
        try:
            await self._run(out)
        except UpdateFailed as exc:
            out.ok = False
            out.message = str(exc)
        finally:
            out.seconds = time.monotonic() - t0
        return out

    async def _run(self, out: Outcome) -> None:
        m = self.manifest
        target = fwimage.version_text(m.version)
        deadline = time.monotonic() + 10.0  # it may be booting (a commit before, a power-on)
        while True:
            try:
                st = await self.status()
                break
            except (TransportError, DeviceException) as exc:
                if isinstance(exc, DeviceException) or time.monotonic() > deadline:
                    raise UpdateFailed(
                        f"the terminal does not answer the update registers: {exc}"
                    ) from None
            await asyncio.sleep(0.5)
        try:
            model = await self.model()
        except (TransportError, DeviceException):
            model = ""
        if model != m.model:
            raise UpdateFailed(
                f"the image is for {m.model}, the terminal does not identify as one "
                f"({model or 'identification object 1 unreadable'})"
            )
        out.version_before = out.version_after = st.version
        if st.state in (TRIAL, REBOOTING):  # an image committed before: it settles first
            st = await self._settle()
            out.version_after = st.version
        if st.version == m.version:
            out.ok = True
            out.message = f"the terminal already runs {target}"
            return
        st = await self._begin()
        size = m.size
        self._progress(st.received, size, "sending")
        if st.received:
            out.resumed_at.append(st.received)
        offset = self._held = st.received
        failures = 0
        while offset < size:
            chunk_max = min(CHUNK_MAX, st.chunk_max or CHUNK_MAX)
            words = offset // 2
            room = 2 * (10000 - words % 10000)  # a record run stays inside its file
            data = self.image.payload[offset : offset + min(chunk_max, room)]
            if len(data) % 2:
                data += b"\x00"
            try:
                await self._chunk(offset, data)
            except DeviceException as exc:
                if exc.code != 2:  # 02: a gap; anything else ends it
                    raise UpdateFailed(
                        f"the terminal refused a chunk at byte {offset}: {exc}"
                    ) from None
                out.resent += 1
                st = await self.status()
                offset = self._held = st.received
                continue
            except TransportError:
                failures += 1
                out.resent += 1
                if failures <= self.retries:
                    continue
                st = await self._wait_for_terminal("the terminal went silent during the transfer")
                offset = self._held = st.received
                out.resumed_at.append(offset)
                failures = 0
                continue
            failures = 0
            out.chunks += 1
            offset = self._held = min(size, offset + len(data))
            self._progress(offset, size, "sending")
        self._progress(size, size, "checking")
        await self._commit(out)
        self._progress(size, size, "rebooting")
        await self._await_new_version(out)

    async def _begin(self) -> Status:
        m = self.manifest
        sha = struct.unpack(">16H", m.sha256)
        values = [CMD_BEGIN, m.size >> 16, m.size & 0xFFFF, m.version, *sha]
        deadline = time.monotonic() + self.silent_wait_s
        while True:
            try:
                await self._command(values)
                return await self.status()
            except DeviceException as exc:
                if exc.code != 6 or time.monotonic() > deadline:  # 06: busy
                    raise UpdateFailed(f"the terminal refused the update: {exc}") from None
            except TransportError:
                if time.monotonic() > deadline:
                    raise UpdateFailed("the terminal does not answer") from None
            await asyncio.sleep(1.0)  # a previous image is still on trial

    async def _settle(self) -> Status:
        """Wait while an image committed earlier is rebooting or on trial (our reads
        are its first good exchanges: it confirms, or it rolls back)."""
        deadline = time.monotonic() + self.reboot_wait_s
        while time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            with contextlib.suppress(TransportError, DeviceException):
                st = await self.status()
                if st.state not in (TRIAL, REBOOTING):
                    return st
        raise UpdateFailed("the image committed before is still on trial: try again later")

    async def _wait_for_terminal(self, why: str) -> Status:
        """Wait until the terminal answers again (a power cut), then begin again: it resumes."""
        deadline = time.monotonic() + self.silent_wait_s
        self._progress(self._held, self.manifest.size, "waiting for the terminal")
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            with contextlib.suppress(TransportError):
                await self.status()
                return await self._begin()
        raise UpdateFailed(f"{why}; silent for {self.silent_wait_s:.0f} s: try again later")

    async def _commit(self, out: Outcome) -> None:
        try:
            await self._command([CMD_COMMIT])
        except DeviceException:
            st = await self.status()
            raise UpdateFailed(
                f"{st.why or 'the terminal refused the image'}: rejected; "
                f"it keeps running {fwimage.version_text(st.version)}"
            ) from None
        except TransportError:
            pass  # the answer may be lost in its reset: its state says what happened

    async def _await_new_version(self, out: Outcome) -> None:
        m = self.manifest
        deadline = time.monotonic() + self.reboot_wait_s
        while time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            try:
                st = await self.status()
            except (TransportError, DeviceException):
                continue  # resetting
            out.version_after = st.version
            if st.state == CONFIRMED and st.version == m.version:
                out.ok = True
                out.message = f"updated to {fwimage.version_text(m.version)}"
                return
            if st.state in (ROLLED_BACK, REJECTED):
                raise UpdateFailed(
                    f"{st.why}: {fwimage.version_text(st.version)} runs again"
                    if st.state == ROLLED_BACK
                    else f"{st.why}: rejected; it keeps running {fwimage.version_text(st.version)}"
                )
        raise UpdateFailed(
            f"the terminal did not confirm {fwimage.version_text(m.version)} "
            f"within {self.reboot_wait_s:.0f} s of the commit"
        )


# --------------------------------------------------------------------------- keys


def load_firmware_keys(state_dir: Path, extra: Sequence[str] = ()) -> list[ed25519.PublicKey]:
    """The trusted firmware keys: ``<state_dir>/firmware-keys/*.pub`` (64 hex digits
    each, as ``hub.pub``) and ``extra`` (hex, or a path to such a file)."""
    texts: list[tuple[str, str]] = []
    keydir = state_dir / FIRMWARE_KEYS_DIR
    if keydir.is_dir():
        texts += [(str(p), p.read_text()) for p in sorted(keydir.glob("*.pub"))]
    for item in extra:
        p = Path(item)
        texts.append((item, p.read_text() if p.is_file() else item))
    keys = []
    for where, text in texts:
        try:
            keys.append(ed25519.PublicKey.from_public_bytes(bytes.fromhex(text.strip())))
        except (ValueError, KeyFormatError):
            raise KeyFormatError(f"{where}: not a firmware public key (64 hex digits)") from None
    return keys


# --------------------------------------------------------------------------- the command

firmware_app = typer.Typer(
    help="Terminal firmware: update a terminal behind this gateway.", no_args_is_help=True
)


def _die(message: str, hint: str = "", code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg="red", err=True)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    return typer.Exit(code)


@firmware_app.command("update")
def update_command(
    image: Annotated[Path, typer.Argument(help="the signed firmware image (.vfw)")],
    device: Annotated[
        str, typer.Option("--device", "-d", help="the terminal, by its name in the configuration")
    ],
    config: Annotated[
        Path,
        typer.Option("--config", "-c", envvar="VITALS_CONFIG", help="the gateway configuration"),
    ] = Path("/etc/vitals/gateway.toml"),
    state_dir: Annotated[
        Path | None, typer.Option(envvar="VITALS_STATE_DIR", help="override [gateway] state_dir")
    ] = None,
    key: Annotated[
        list[str] | None,
        typer.Option("--key", help="a trusted firmware public key (hex, or a file); repeatable"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the outcome as JSON")] = False,
) -> None:
    """Update one terminal's firmware over its own bus; the bus's other devices keep being polled.

    Stop the agent first (it holds the port). Run the same command again after
    an interruption: the transfer resumes where the terminal's flash says.
    """
    from agent.config import load_config
    from protocols.errors import ConfigError

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise _die(
            str(exc).splitlines()[0], f"check it with: vitals config check -c {config}", 2
        ) from None
    except OSError as exc:
        raise _die(f"{config}: {exc.strerror}", "name the configuration with --config", 2) from None
    dev = next((d for d in cfg.devices if d.name == device), None)
    if dev is None:
        names = ", ".join(d.name for d in cfg.devices) or "none"
        raise _die(f"no device {device!r} in {config}", f"devices: {names}", 2)
    bus = next(b for b in cfg.buses if b.name == dev.bus)
    if bus.kind not in ("rtu", "rtu-over-tcp", "tcp"):
        raise _die(f"{device} is on a {bus.kind} bus", "firmware goes over Modbus buses only", 2)
    if bus.kind == "rtu":
        from agent.diag._common import port_busy, port_holder

        if port_holder(bus.port) is not None:
            busy = port_busy(bus.port)
            raise _die(busy.message, busy.hint, 1)
    state = state_dir or cfg.gateway.state_dir
    try:
        keys = load_firmware_keys(state, key or ())
        data = image.read_bytes()
    except KeyFormatError as exc:
        raise _die(
            str(exc), "a .pub file holds the 64 hex digits of the raw public key", 2
        ) from None
    except OSError as exc:
        raise _die(f"{image}: {exc.strerror}", "name the image file", 2) from None
    if not keys:
        raise _die(
            "no trusted firmware key",
            f"install the vendor's key as {state / FIRMWARE_KEYS_DIR}/NAME.pub, or pass --key",
            2,
        )
    try:
        parsed = fwimage.parse(data)
        manifest = fwimage.verify(parsed, keys)
    except fwimage.ImageRefused as exc:
        raise _die(
            f"image refused, nothing was sent: {exc}", "ask for a correctly signed image", 1
        ) from None
    outcome = asyncio.run(_update_on_bus(cfg, bus, dev, parsed, quiet=as_json))
    if as_json:
        typer.echo(
            json.dumps(
                {"device": device, "image": fwimage.version_text(manifest.version), **outcome}
            )
        )
    elif outcome["ok"]:
        typer.secho(f"{device}: {outcome['message']} ({outcome['seconds']} s)", fg="green")
    else:
        typer.secho(f"error: {device}: {outcome['message']}", fg="red", err=True)
        typer.echo(
            "hint: run the command again to resume; the terminal keeps its working firmware",
            err=True,
        )
    raise typer.Exit(0 if outcome["ok"] else 1)


async def _update_on_bus(
    cfg: Any, bus: Any, dev: Any, image: fwimage.FirmwareImage, *, quiet: bool
) -> dict[str, Any]:
    """Poll the bus's devices (readings dropped) and update ``dev`` in the idle time."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from agent.bus import PolledDevice
    from agent.clock import SystemClock
    from agent.service import link_for

    link = link_for(bus)
    polls: dict[str, int] = {}

    async def sink(readings: list[Any]) -> None:
        return None

    devices = [
        PolledDevice(
            name=d.name,
            slave=d.slave,
            interval_s=d.interval_s,
            max_registers=d.profile.max_registers,
            max_gap=d.profile.max_gap,
            points=cfg.points.of(d),
        )
        for d in cfg.devices
        if d.bus == bus.name and d.enabled and d.name != dev.name
    ]
    poller = (
        BusPoller(
            bus.name,
            link,
            devices,
            sink,
            SystemClock(),
            retries=bus.retries,
            inter_frame_s=bus.frame_gap_s,
        )
        if devices
        else None
    )
    turns = BusTurns(poller)
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        disable=quiet,
    )
    task = bar.add_task(dev.name, total=image.manifest.size)

    def progress(n: int, size: int, phase: str) -> None:
        bar.update(task, completed=n, description=f"{dev.name}: {phase}")

    upd = FirmwareUpdate(link, dev.slave, image, turns=turns, baud=bus.baud, progress=progress)
    poll_task = None
    with bar:
        try:
            if poller is not None:
                turns.attach()
                poll_task = asyncio.create_task(poller.run(), name=f"poll {bus.name}")
            outcome = await upd.run()
        finally:
            turns.detach()
            if poll_task is not None:
                poll_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poll_task
            else:
                link.close()
    if poller is not None:
        polls = {d.name: d.polls for d in poller.devices}
    return {**outcome.as_dict(), "other_devices_polls": polls}


@firmware_app.command("pack")
def pack_command(
    directory: Annotated[
        Path, typer.Argument(help="the firmware directory (its .py/.mpy modules)")
    ],
    model: Annotated[str, typer.Option(help="the terminals' product code, e.g. VX-SLM-1")],
    version: Annotated[str, typer.Option(help="MAJOR.MINOR, e.g. 1.1 (register value 101)")],
    key: Annotated[Path, typer.Option(help="the firmware private key (PKCS#8 PEM)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="the image file to write")],
) -> None:
    """Build and sign a firmware image (the vendor's side; the key never goes to a gateway)."""
    try:
        major, minor = (int(x) for x in version.split("."))
        if not (0 <= minor < 100 and 0 < major * 100 + minor <= 0xFFFF):
            raise ValueError
    except ValueError:
        raise _die(f"--version {version}: expected MAJOR.MINOR", "e.g. --version 1.1", 2) from None
    try:
        private = ed25519.PrivateKey.from_pem(key.read_bytes())
        payload = fwimage.pack_dir(directory)
    except KeyFormatError as exc:
        raise _die(f"{key}: {exc}", "vitals keygen writes one", 2) from None
    except OSError as exc:
        raise _die(f"{exc.filename}: {exc.strerror}", "", 2) from None
    files = fwimage.unpack_slot(payload)
    if "app.py" not in files and "app.mpy" not in files:
        raise _die(f"{directory}: no app.py", "point at the firmware directory", 2)
    data = fwimage.build(payload, model=model, version=major * 100 + minor, key=private)
    output.write_bytes(data)
    pub = private.public_key().public_bytes_raw().hex()
    typer.echo(f"{output}: {model} {version}, {len(files)} files, {len(payload)} bytes")
    typer.echo(f"firmware key (install as <state_dir>/firmware-keys/NAME.pub): {pub}")


@firmware_app.command("show")
def show_command(
    image: Annotated[Path, typer.Argument(help="a firmware image (.vfw)")],
) -> None:
    """What an image holds: its manifest and files (not a verification: update does that)."""
    try:
        parsed = fwimage.parse(image.read_bytes())
        files = fwimage.unpack_slot(parsed.payload)
    except OSError as exc:
        raise _die(f"{image}: {exc.strerror}", "", 2) from None
    except fwimage.ImageRefused as exc:
        raise _die(f"{image}: {exc}", "", 1) from None
    m = parsed.manifest
    typer.echo(f"model {m.model}, version {fwimage.version_text(m.version)}, {m.size} bytes")
    typer.echo(f"sha256 {m.sha256.hex()}")
    typer.echo(f"signed by firmware key {m.kid.hex()}")
    typer.echo("files: " + ", ".join(f"{n} ({len(b)})" for n, b in sorted(files.items())))
