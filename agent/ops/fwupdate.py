"""Terminal firmware updates through the gateway: a signed image, over the terminal's own line.

The image is verified first (``protocols.fwimage.verify``: the signature of a
trusted firmware key, the payload's size and SHA-256): a refused image never
puts a byte on the bus. Then, on the terminal (docs/firmware.md, "Updates"):

1. read its control block (holding 48-55; wait while it boots or an image is on
   trial) and its model (identification object 1);
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

``vitals firmware update --device D IMAGE`` (agent/cli/firmware.py) runs this
for a technician, with the bus's other devices polled meanwhile and a progress
bar; a running agent runs it for the hub (:class:`FirmwareCommands`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.fieldbus.links import LinkDown, ModbusLink, TransportError
from agent.fieldbus.poller import BusPoller
from protocols import ed25519, fwimage
from protocols.errors import DeviceException, KeyFormatError, RemoteError
from protocols.modbus import Space
from protocols.modbus.pdu import WriteFileRecordRequest
from protocols.modbus.rtu import encode_request, frame_time

__all__ = [
    "CHUNK_MAX",
    "BusTurns",
    "FirmwareCommands",
    "FirmwareUpdate",
    "NoIdleTime",
    "Outcome",
    "UpdateFailed",
    "load_firmware_keys",
]

# the terminal's control block (firmware/regmap.py, firmware/bootloader.py)
FWU_STATUS = 48
FWU_COMMAND = 56
CMD_BEGIN, CMD_COMMIT = 1, 2
ERRORS = (
    "",
    "the received image's SHA-256 is wrong",
    "the image is not a well-formed slot archive",
    "the terminal's flash refused a write",
    "the new image crashed at boot",
    "the new image did not confirm in time",
)
RECEIVING, REBOOTING, TRIAL, CONFIRMED, REJECTED, ROLLED_BACK = 1, 2, 3, 4, 5, 6
CHUNK_MAX = 240
FIRMWARE_KEYS_DIR = "firmware-keys"

log = logging.getLogger(__name__)


class UpdateFailed(RemoteError):
    """The terminal did not take the image (the message says what it runs now)."""


class NoIdleTime(TransportError):
    """The bus's poller gave no turn in time: its polls fill the line, or it stopped."""


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
    verdict: str = ""  # the terminal's own: "rejected" or "rolled back" (the image is bad)

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
            "verdict": self.verdict,
        }


class BusTurns:
    """Transactions of a side job in the idle time of a bus's poller.

    Attached to a :class:`BusPoller` (``poller.idle``), it is called whenever
    nothing is due before the next poll; it grants a waiting :meth:`turn`
    only if its cost fits before that poll, so the devices polled keep their
    intervals. Without a poller, or detached from it, a turn is granted at once.
    """

    def __init__(self, poller: BusPoller | None = None) -> None:
        self._poller = poller
        self._asked = asyncio.Event()
        self._want: tuple[asyncio.Future[None], asyncio.Future[None], float] | None = None
        self.granted = 0
        self.grant_timeout_s = 60.0

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
            try:
                async with asyncio.timeout(self.grant_timeout_s):
                    await granted  # cancelled with us: the poller skips it
            except TimeoutError:
                raise NoIdleTime(
                    f"bus {self._poller.name}: no idle time for a chunk in "
                    f"{self.grant_timeout_s:.0f} s (its polls fill it, or it stopped)"
                ) from None
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
        self._slowest = 0.0  # the slowest clean exchange: a chunk's cost is 1.5 times it
        self._clean = True
        self._held = 0  # bytes the terminal acknowledged
        self.outcome = Outcome(False, "not started")

    # -- one transaction each, in the bus's idle time

    def _cost(self, request_bytes: int, reply_bytes: int) -> float:
        wire = frame_time(request_bytes, self.baud) + frame_time(reply_bytes, self.baud)
        return max(wire + 0.03, 1.5 * self._slowest) + self.link.inter_frame_s

    async def _timed(self, cost: float, call: Callable[[], Any]) -> Any:
        # an exchange after a failed one waits out the link's late window first: not
        # what an exchange costs, so only one after a success is measured
        clean, self._clean = self._clean, False
        try:
            async with self.turns.turn(cost):
                t0 = time.monotonic()
                result = await call()
                if clean:
                    self._slowest = max(self._slowest, time.monotonic() - t0)
                self._clean = True
                return result
        except NoIdleTime as exc:  # waiting longer would not help: say so now
            raise UpdateFailed(
                f"{exc}; stopped at byte {self._held}, the terminal keeps it for the next try"
            ) from None

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
        except (TransportError, DeviceException) as exc:
            out.ok = False
            out.message = f"{exc}: stopped at byte {self._held}; run it again to resume"
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
                if isinstance(exc, DeviceException | LinkDown) or time.monotonic() > deadline:
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
            out.verdict = "rejected"
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
            if st.state == RECEIVING and st.received >= m.size:
                await self._commit(out)  # the commit did not arrive: again
                continue
            if st.state == CONFIRMED and st.version == m.version:
                out.ok = True
                out.message = f"updated to {fwimage.version_text(m.version)}"
                return
            if st.state in (ROLLED_BACK, REJECTED):
                out.verdict = "rolled back" if st.state == ROLLED_BACK else "rejected"
                raise UpdateFailed(
                    f"{st.why}: {fwimage.version_text(st.version)} runs again"
                    if st.state == ROLLED_BACK
                    else f"{st.why}: rejected; it keeps running {fwimage.version_text(st.version)}"
                )
        raise UpdateFailed(
            f"the terminal did not confirm {fwimage.version_text(m.version)} "
            f"within {self.reboot_wait_s:.0f} s of the commit"
        )


# --------------------------------------------------------------------------- from the hub

PART_BYTES = 3000  # image bytes per ``firmware`` command (a command is at most 4 KiB)


class FirmwareCommands:
    """The ``firmware`` command of a running agent (``vitals hub firmware push``).

    ``{"device": D, "action": "part", "offset": n, "total": size, "data": bytes,
    "key": hex}`` hands over the image in parts (the first part names the
    firmware key: the command is signed by the hub, so the hub names it); with
    the last part the image is verified (that key or one of
    ``<state_dir>/firmware-keys``) and the update starts in the background,
    in the idle time of the device's bus poller. ``{"device": D, "action":
    "status"}`` answers its progress, then its outcome.
    """

    def __init__(self, config: Any, pollers: Any, state_dir: Path) -> None:
        self._config = config
        self._pollers = pollers  # bus name -> BusPoller
        self._state_dir = state_dir
        self._parts: dict[str, tuple[bytearray, str]] = {}  # device -> (image so far, key hex)
        self._tasks: dict[str, asyncio.Task[Outcome]] = {}
        self.status: dict[str, dict[str, Any]] = {}  # device -> progress or outcome

    async def handle(self, args: dict[str, Any]) -> object:
        from agent.edge.commands import CommandRefused

        name = args.get("device")
        try:
            dev = self._config.device(name) if type(name) is str else None
        except KeyError:
            dev = None
        if dev is None:
            raise CommandRefused("unknown_device", str(name))
        poller = self._pollers.get(dev.bus)
        if poller is None:
            raise CommandRefused("not_modbus", f"{dev.name} is not on a polled Modbus bus")
        action = args.get("action", "status")
        if action == "status":
            return self.status.get(dev.name) or {"state": "idle"}
        if action != "part":
            raise CommandRefused("bad_args", "action: part or status")
        task = self._tasks.get(dev.name)
        if task is not None and not task.done():
            raise CommandRefused("busy", f"{dev.name} is being updated")
        offset, total, data = args.get("offset"), args.get("total"), args.get("data")
        if type(offset) is not int or type(total) is not int or type(data) is not bytes:
            raise CommandRefused("bad_args", "offset, total (int) and data (bytes)")
        if not 0 < total <= 1 << 20:
            raise CommandRefused("bad_args", f"an image of {total} bytes")
        if offset == 0:
            self._parts[dev.name] = (bytearray(), str(args.get("key") or ""))
        buf, key = self._parts.get(dev.name, (bytearray(), ""))
        if offset != len(buf):
            raise CommandRefused("bad_offset", f"expected offset {len(buf)}")
        buf += data
        if len(buf) < total:
            return {"received": len(buf)}
        del self._parts[dev.name]
        try:
            keys = await asyncio.to_thread(
                load_firmware_keys, self._state_dir, [key] if key else []
            )
            image = fwimage.parse(bytes(buf))
            fwimage.verify(image, keys)
        except (fwimage.ImageRefused, KeyFormatError) as exc:
            self.status[dev.name] = {"state": "refused", "ok": False, "message": str(exc)}
            raise CommandRefused("image_refused", str(exc)) from None
        self._start(dev, poller, image)
        return {"received": len(buf), "started": True}

    def _start(self, dev: Any, poller: BusPoller, image: fwimage.FirmwareImage) -> None:
        # a Modbus TCP bus is polled by the TcpEngine, not by its poller's task: no idle
        # hook there (nor a shared line: one connection per device), transactions just queue
        turns = BusTurns(None if poller.link.callbacks else poller)
        st = self.status[dev.name] = {
            "state": "sending",
            "image": fwimage.version_text(image.manifest.version),
            "held": 0,
            "size": image.manifest.size,
        }

        def progress(n: int, size: int, phase: str) -> None:
            st.update(state=phase, held=n)

        baud = self._config.bus(dev.bus).baud
        upd = FirmwareUpdate(
            poller.link, dev.slave, image, turns=turns, baud=baud, progress=progress
        )

        async def run() -> Outcome:
            turns.attach()
            try:
                out = await upd.run()
            except Exception as exc:  # a task of its own: its end is always reported
                log.exception("firmware update of %s failed", dev.name)
                out = Outcome(False, f"{type(exc).__name__}: {exc}")
            finally:
                turns.detach()
            self.status[dev.name] = {"state": "done", "image": st["image"], **out.as_dict()}
            log.info("firmware update of %s: %s", dev.name, out.message)
            return out

        self._tasks[dev.name] = asyncio.create_task(run(), name=f"firmware {dev.name}")


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
