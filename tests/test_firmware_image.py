"""Signed firmware images (protocols.fwimage) and function 21 (protocols.modbus.rtu), in CPython."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from protocols import ed25519, fwimage
from protocols.errors import FrameError, LocalError
from protocols.modbus.pdu import RequestRejected, WriteFileRecordRequest, WriteFileRecordResponse
from protocols.modbus.rtu import (
    ResponseParser,
    decode_request,
    encode_request,
    encode_response,
    request_length,
    response_length,
    with_crc,
)
from simulator.firmware import FIRMWARE_DIR


@pytest.fixture(scope="module")
def key() -> ed25519.PrivateKey:
    return ed25519.PrivateKey.generate()


def test_an_image_round_trips_and_verifies(key: ed25519.PrivateKey) -> None:
    payload = fwimage.pack_dir(FIRMWARE_DIR)
    data = fwimage.build(payload, model="VX-SLM-1", version=101, key=key)
    image = fwimage.parse(data)
    m = fwimage.verify(image, [ed25519.PrivateKey.generate().public_key(), key.public_key()])
    assert (m.model, m.version, m.size) == ("VX-SLM-1", 101, len(payload))
    files = fwimage.unpack_slot(image.payload)
    assert "app.py" in files and "bootloader.py" not in files and "main.py" not in files
    assert files["device.py"] == (FIRMWARE_DIR / "device.py").read_bytes()
    assert fwimage.version_text(101) == "1.1" and fwimage.version_text(1203) == "12.3"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: d[:-1], "holds"),  # truncated payload
        (lambda d: d[:-3] + bytes([d[-3] ^ 1]) + d[-2:], "SHA-256"),
        (lambda d: d.replace(b'"version":2', b'"version":3'), "signature does not verify"),
        (lambda d: b"XXXX" + d[4:], "no VXFW header"),
        (lambda d: d[:40], "truncated"),
    ],
)
def test_a_damaged_image_is_refused(
    key: ed25519.PrivateKey, damage: Callable[[bytes], bytes], message: str
) -> None:
    data = fwimage.build(fwimage.pack_slot({"app.py": b"x = 1\n"}), model="M", version=2, key=key)
    with pytest.raises(fwimage.ImageRefused, match=message):
        fwimage.verify(fwimage.parse(damage(data)), [key.public_key()])


def test_an_image_of_an_unknown_key_is_refused(key: ed25519.PrivateKey) -> None:
    data = fwimage.build(b"\x06app.py\x00\x00\x00\x00", model="M", version=2, key=key)
    with pytest.raises(fwimage.ImageRefused, match="not a trusted firmware key"):
        fwimage.verify(fwimage.parse(data), [ed25519.PrivateKey.generate().public_key()])


def test_slot_names_are_plain_module_files() -> None:
    with pytest.raises(LocalError, match="module file name"):
        fwimage.pack_slot({"../boot.py": b""})
    with pytest.raises(fwimage.ImageRefused, match="truncated"):
        fwimage.unpack_slot(fwimage.pack_slot({"app.py": b"abc"})[:-1])


# ---------------------------------------------------------------- function 21


def test_write_file_record_both_ways() -> None:
    req = WriteFileRecordRequest(1, 2, 9990, bytes(range(20)))
    frame = encode_request(req)
    # slave fc byte-count | ref-type file record length(words) | data | crc
    assert frame[:10] == bytes([1, 0x15, 27, 6, 0, 2, 0x27, 0x06, 0, 10])
    assert request_length(frame[:3]) == len(frame) == response_length(frame[:3])
    assert decode_request(frame) == req
    response = encode_response(WriteFileRecordResponse(1, 2, 9990, bytes(range(20))))
    assert response == frame  # the answer is the echo
    assert ResponseParser(req).feed(response) == WriteFileRecordResponse(
        1, 2, 9990, bytes(range(20))
    )


def test_write_file_record_refusals() -> None:
    with pytest.raises(LocalError, match="even"):
        encode_request(WriteFileRecordRequest(1, 1, 0, b"abc"))
    with pytest.raises(LocalError, match="record 10000"):
        encode_request(WriteFileRecordRequest(1, 1, 10000, b"ab"))
    with pytest.raises(LocalError, match=r"even, 2\.\.244"):
        encode_request(WriteFileRecordRequest(1, 1, 0, bytes(246)))
    assert len(encode_request(WriteFileRecordRequest(1, 1, 0, bytes(244)))) == 256
    bad_type = bytes([1, 0x15, 9, 7, 0, 1, 0, 0, 0, 1, 0xAB, 0xCD])
    with pytest.raises(RequestRejected, match="reference type 6"):
        decode_request(with_crc(bad_type))
    too_far = bytes([1, 0x15, 9, 6, 0, 1, 0x27, 0x10, 0, 1, 0xAB, 0xCD])
    with pytest.raises(RequestRejected) as exc:
        decode_request(with_crc(too_far))
    assert exc.value.code == 2
    short = bytes([1, 0x15, 10, 6, 0, 1, 0, 0, 0, 1, 0xAB, 0xCD])
    with pytest.raises(FrameError, match="byte count"):
        decode_request(with_crc(short))
    req = WriteFileRecordRequest(1, 1, 0, b"ab")
    other = encode_request(WriteFileRecordRequest(1, 1, 1, b"ab"))
    with pytest.raises(FrameError, match="echo"):
        ResponseParser(req).feed(other)


def test_vendor_packs_and_shows_an_image(key: ed25519.PrivateKey, tmp_path: Path) -> None:
    from agent.cli.main import app

    src = tmp_path / "fw"
    shutil.copytree(FIRMWARE_DIR, src, ignore=shutil.ignore_patterns("__pycache__"))
    pem = tmp_path / "firmware.pem"
    pem.write_bytes(key.private_pem())
    out = tmp_path / "vx-slm-1-1.1.vfw"
    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "firmware",
            "pack",
            str(src),
            "--model",
            "VX-SLM-1",
            "--version",
            "1.1",
            "--key",
            str(pem),
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    assert key.public_key().public_bytes_raw().hex() in r.output
    m = fwimage.verify(fwimage.parse(out.read_bytes()), [key.public_key()])
    assert (m.model, m.version) == ("VX-SLM-1", 101)
    r = runner.invoke(app, ["firmware", "show", str(out)])
    assert r.exit_code == 0, r.output
    assert "model VX-SLM-1, version 1.1" in r.output and "app.py (" in r.output
    r = runner.invoke(
        app,
        [
            "firmware",
            "pack",
            str(src),
            "--model",
            "VX-SLM-1",
            "--version",
            "one",
            "--key",
            str(pem),
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 2 and "expected MAJOR.MINOR" in r.output
