"""Signed terminal firmware images: the manifest, the signature, the slot archive.

An image file (``.vfw``) is::

    b"VXFW" | manifest length (2 bytes, big endian) | manifest | signature (64) | payload

The manifest is canonical JSON (sorted keys, no spaces): ``model`` (the
terminal's product code, Modbus identification object 1, e.g. ``VX-SLM-1``),
``version`` (major * 100 + minor, as the terminal's version register shows
it), ``size`` and ``sha256`` (hex) of the payload, and ``kid``, the key id
(``protocols.envelope.key_id``) of the firmware key that signed it. The
signature is Ed25519 over :data:`DOMAIN` + the manifest bytes, so the manifest
binds the payload through its hash and nothing else needs signing.

The payload is the *slot archive* the terminal's bootloader unpacks into its
inactive slot (``firmware/bootloader.py``): per module file, its name length
(1 byte), name, data length (4 bytes, big endian), data.

:func:`verify` is what a gateway runs BEFORE it sends a byte to a terminal:
the signature by one of its trusted firmware keys, then size and SHA-256 of
the payload against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from protocols import ed25519
from protocols.envelope import key_id
from protocols.errors import InvalidSignature, LocalError, ProtocolError

__all__ = [
    "DOMAIN",
    "MAGIC",
    "FirmwareImage",
    "ImageRefused",
    "Manifest",
    "build",
    "pack_dir",
    "pack_slot",
    "parse",
    "unpack_slot",
    "verify",
    "version_text",
]

MAGIC: Final = b"VXFW"
DOMAIN: Final = b"vitals-firmware-manifest\x00"
MAX_MANIFEST: Final = 1024
_NAME = re.compile(r"[A-Za-z0-9_]+\.m?py")
# never in an image: the bootloader and its entry point (they are not in a slot), the freeze manifest
NOT_IN_IMAGE: Final = frozenset({"main.py", "bootloader.py", "manifest.py"})


class ImageRefused(ProtocolError):
    """A firmware image that must not be sent: malformed, unsigned, tampered with."""


@dataclass(frozen=True, slots=True)
class Manifest:
    model: str
    version: int
    size: int
    sha256: bytes
    kid: bytes

    def encode(self) -> bytes:
        doc = {
            "kid": self.kid.hex(),
            "model": self.model,
            "sha256": self.sha256.hex(),
            "size": self.size,
            "version": self.version,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class FirmwareImage:
    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes
    payload: bytes


def version_text(version: int) -> str:
    """``101`` -> ``"1.1"``."""
    return f"{version // 100}.{version % 100}"


def pack_slot(files: Mapping[str, bytes]) -> bytes:
    """The slot archive of ``files`` (name -> contents), in name order."""
    out = bytearray()
    for name in sorted(files):
        if not _NAME.fullmatch(name):
            raise LocalError(f"{name!r}: a module file name (letters, digits, _; .py or .mpy)")
        raw = name.encode()
        out += bytes([len(raw)]) + raw + len(files[name]).to_bytes(4, "big") + files[name]
    return bytes(out)


def unpack_slot(payload: bytes) -> dict[str, bytes]:
    """The files of a slot archive (the inverse of :func:`pack_slot`)."""
    files: dict[str, bytes] = {}
    pos = 0
    while pos < len(payload):
        n = payload[pos]
        name = payload[pos + 1 : pos + 1 + n].decode(errors="replace")
        head = pos + 1 + n
        if head + 4 > len(payload) or not _NAME.fullmatch(name):
            raise ImageRefused(f"the slot archive is malformed at byte {pos}")
        size = int.from_bytes(payload[head : head + 4], "big")
        files[name] = payload[head + 4 : head + 4 + size]
        pos = head + 4 + size
        if pos > len(payload):
            raise ImageRefused(f"the slot archive is truncated in {name}")
    return files


def pack_dir(directory: str | Path, *, replace: Mapping[str, bytes] | None = None) -> bytes:
    """The slot archive of a firmware directory's modules (not the bootloader's),
    with ``replace`` overriding or adding files (test images)."""
    files = {
        p.name: p.read_bytes()
        for p in sorted(Path(directory).iterdir())
        if _NAME.fullmatch(p.name) and p.name not in NOT_IN_IMAGE
    }
    files.update(replace or {})
    return pack_slot(files)


def build(payload: bytes, *, model: str, version: int, key: ed25519.PrivateKey) -> bytes:
    """A signed image file of ``payload`` for terminals of ``model``."""
    if not 0 < version <= 0xFFFF:
        raise LocalError(f"version {version}: 1..65535 (major * 100 + minor)")
    manifest = Manifest(model, version, len(payload), hashlib.sha256(payload).digest(), key_id(key))
    body = manifest.encode()
    return MAGIC + len(body).to_bytes(2, "big") + body + key.sign(DOMAIN + body) + payload


def parse(data: bytes) -> FirmwareImage:
    """The parts of an image file; :class:`ImageRefused` if it is not one."""
    if data[:4] != MAGIC or len(data) < 6:
        raise ImageRefused("not a vitals firmware image (no VXFW header)")
    n = int.from_bytes(data[4:6], "big")
    if n > MAX_MANIFEST or len(data) < 6 + n + 64:
        raise ImageRefused("the image is truncated in its manifest or signature")
    body = data[6 : 6 + n]
    try:
        doc = json.loads(body)
        manifest = Manifest(
            model=str(doc["model"]),
            version=int(doc["version"]),
            size=int(doc["size"]),
            sha256=bytes.fromhex(doc["sha256"]),
            kid=bytes.fromhex(doc["kid"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ImageRefused(f"the image's manifest is malformed: {exc}") from None
    return FirmwareImage(manifest, body, data[6 + n : 6 + n + 64], data[6 + n + 64 :])


def verify(image: FirmwareImage, keys: Iterable[ed25519.PublicKey]) -> Manifest:
    """The manifest, once the signature verifies with the trusted key it names
    and the payload has its size and SHA-256; else :class:`ImageRefused`."""
    m = image.manifest
    key = next((k for k in keys if key_id(k) == m.kid), None)
    if key is None:
        raise ImageRefused(
            f"the image is signed by key {m.kid.hex()}, which is not a trusted firmware key"
        )
    try:
        key.verify(image.signature, DOMAIN + image.manifest_bytes)
    except InvalidSignature:
        raise ImageRefused(
            f"the image's signature does not verify with firmware key {m.kid.hex()}"
        ) from None
    if len(image.payload) != m.size:
        raise ImageRefused(
            f"the image holds {len(image.payload)} bytes, its manifest says {m.size}"
        )
    digest = hashlib.sha256(image.payload).digest()
    if digest != m.sha256:
        raise ImageRefused(
            f"the image's SHA-256 is {digest.hex()[:16]}..., its manifest says {m.sha256.hex()[:16]}..."
        )
    return m
