"""The one exception tree of vitals.

Every error vitals raises derives from :class:`VitalsError`. Faults of the
outside world (a device sent garbage, a batch was forged, the broker refused)
derive from :class:`RemoteError`; mistakes of whoever configured or called us
derive from :class:`LocalError`. Each carries the field that helps (a Modbus
exception code, a key path in a config file), and is raised ``from`` its cause.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ConfigError",
    "DecodeError",
    "DeviceException",
    "FrameError",
    "InvalidSignature",
    "KeyFormatError",
    "LocalError",
    "ProtocolError",
    "RemoteError",
    "SignatureError",
    "VitalsError",
]


class VitalsError(Exception):
    """Root of every error raised by vitals."""


class LocalError(VitalsError):
    """Our side is wrong: a bad configuration, a bad argument, a misuse."""


class RemoteError(VitalsError):
    """The world is wrong: a device, a link, a broker or a peer misbehaved."""


class KeyFormatError(LocalError):
    """Key material we were handed is malformed: a wrong length, not Ed25519, not PKCS#8 PEM."""


class ConfigError(LocalError):
    """A configuration or profile file is invalid.

    ``problems`` lists every problem found, each as ``(where, message)`` where
    ``where`` names the file and key path (``gw.toml: devices[3].slave``).
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(f"{where}: {msg}" for where, msg in self.problems))


class ProtocolError(RemoteError):
    """Bytes from the outside do not follow the protocol they claim."""


class FrameError(ProtocolError):
    """A frame is malformed: bad length, bad checksum, bad header."""


class DecodeError(ProtocolError):
    """A well-framed message holds values that cannot be decoded."""


class SignatureError(ProtocolError):
    """A signed message does not verify against the key it names."""


class InvalidSignature(SignatureError):
    """An Ed25519 signature does not verify (``protocols.ed25519.PublicKey.verify``)."""


class DeviceException(RemoteError):
    """A Modbus device answered with an exception response."""

    NAMES: ClassVar[dict[int, str]] = {
        1: "illegal function",
        2: "illegal data address",
        3: "illegal data value",
        4: "server device failure",
        5: "acknowledge",
        6: "server device busy",
        8: "memory parity error",
        10: "gateway path unavailable",
        11: "gateway target device failed to respond",
    }

    def __init__(self, code: int, function: int | None = None) -> None:
        self.code = code
        self.function = function
        name = self.NAMES.get(code, "unknown exception")
        fc = f" to function {function}" if function is not None else ""
        super().__init__(f"device answered exception {code:02d} ({name}){fc}")
