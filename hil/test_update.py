"""Firmware update: the terminal takes a signed image over its own line, through the
gateway's update path (agent.ops.fwupdate: control block, function 21 chunks, commit,
trial, confirmation), and then reports the image's version.

Runs only when given an image and the key it is signed with::

    pytest hil --port /dev/ttyUSB0 --parity E --image vx-slm-1-1.1.vfw --key 3b6a...

It leaves the terminal on the image's version: keep the previous image to go back.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hil.bus import Bus, Target


def test_terminal_takes_a_signed_image(
    target: Target, bus: Bus, request: pytest.FixtureRequest
) -> None:
    """The version register shows the image's version once the terminal confirmed it."""
    from agent.fieldbus.links import ModbusLink
    from agent.ops.fwupdate import FirmwareUpdate, load_firmware_keys
    from protocols import fwimage
    from protocols.modbus import Space

    path, key = request.config.getoption("--image"), request.config.getoption("--key")
    if not path or not key:
        pytest.skip("no --image and --key: the update group needs a signed image and its key")
    image = fwimage.parse(Path(path).read_bytes())
    manifest = fwimage.verify(image, load_firmware_keys(Path("/nonexistent"), [key]))
    bus.ser.close()  # one master on the line at a time

    async def update() -> tuple[object, int]:
        link = ModbusLink.serial(
            target.port, baud=target.baud, parity=target.parity, timeout_s=target.response_timeout
        )
        try:
            out = await FirmwareUpdate(link, target.slave, image, baud=target.baud).run()
            version = (await link.read(Space.HOLDING, 38, 1, target.slave))[0]
        finally:
            link.close()
        return out, int(version)

    try:
        out, version = asyncio.run(update())
    finally:
        bus.ser.open()
    assert getattr(out, "ok", False), getattr(out, "message", out)
    assert version == manifest.version
