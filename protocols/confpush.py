"""Signed remote configuration: the hub's push, the gateway's report (sans-IO).

Two message kinds on the envelope of :mod:`protocols.envelope` (docs/envelope.md,
"Remote configuration").

``vitals/config/v1`` — signed by the hub key, on ``{prefix}/{gw}/config``
(QoS 1, retained: a gateway that is away gets it when it is back)::

    gw     str    the target gateway
    kid    bin 8  the hub key's id
    v      int    the configuration's version: above every version the gateway saw
    t      int    hub time at issue, ms
    trial  int    seconds the gateway has to show it works on it, else it rolls back
    sha    bin 32 SHA-256 of the payload

The payload is the configuration file, TOML in UTF-8, at most
:data:`MAX_CONFIG_BYTES`.

``vitals/config-report/v1`` — signed by the gateway key, on
``{prefix}/{gw}/config/status`` (QoS 1, retained: the latest outcome)::

    gw       str    the gateway
    kid      bin 8  the gateway key's id
    v        int    the version this report is about
    status   str    trying | applied | rolled_back | refused
    reason   str    why ("" when applied)
    running  int    the version the gateway runs now (0: its local file)
    t        int    gateway time, ms

The payload is a msgpack map of details (``checks``: the trial's findings) or nil.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias, get_args

from protocols import ed25519
from protocols.envelope import (
    PublicKeyLike,
    SignedMessage,
    check_sender,
    key_id,
    pack,
    parse_message,
    sign_message,
    unpack,
)
from protocols.errors import DecodeError, FrameError, LocalError

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_TRIAL_S",
    "PUSH_DOMAIN",
    "REPORT_DOMAIN",
    "STATUSES",
    "ConfigPush",
    "ConfigReport",
    "ReportStatus",
    "parse_push",
    "parse_report",
    "push",
    "report",
]

PUSH_DOMAIN: Final = "vitals/config/v1"
REPORT_DOMAIN: Final = "vitals/config-report/v1"
ReportStatus: TypeAlias = Literal["trying", "applied", "rolled_back", "refused"]
STATUSES: Final[tuple[ReportStatus, ...]] = get_args(ReportStatus)
#: the largest push, signed and enveloped, a gateway reads (its own MQTT cap for the
#: config topic; commands keep theirs, 4 KiB). The full example configuration is
#: 6 KiB; a cabinet with 200 devices and their rules stays under 100 KiB.
MAX_CONFIG_BYTES: Final = 256 * 1024
MAX_TRIAL_S: Final = 3600

_PUSH_SCHEMA: Final = {"gw": str, "kid": bytes, "v": int, "t": int, "trial": int, "sha": bytes}
_REPORT_SCHEMA: Final = {
    "gw": str,
    "kid": bytes,
    "v": int,
    "status": str,
    "reason": str,
    "running": int,
    "t": int,
}


@dataclass(frozen=True, slots=True)
class ConfigPush:
    """A parsed push: well formed, hash checked, signature not yet verified."""

    gw: str
    kid: bytes
    v: int
    t: int
    trial: int
    sha: bytes
    message: SignedMessage

    def verify(self, hub_public: PublicKeyLike) -> None:
        self.message.verify(PUSH_DOMAIN, hub_public, kid=self.kid)

    def text(self) -> str:
        """The configuration file; :class:`DecodeError` if it is not UTF-8."""
        try:
            return self.message.payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"configuration is not UTF-8 (byte {exc.start})") from exc


def push(
    text: str,
    *,
    gateway: str,
    version: int,
    hub_key: ed25519.PrivateKey,
    now_ms: int,
    trial_s: int = 120,
) -> bytes:
    """The wire bytes of a signed configuration push."""
    if not 1 <= version < 2**63:
        raise LocalError(f"version must be 1 or more, not {version}")
    if not 1 <= trial_s <= MAX_TRIAL_S:
        raise LocalError(f"trial must be 1 to {MAX_TRIAL_S} s, not {trial_s}")
    payload = text.encode("utf-8")
    protected: dict[str, str | bytes | int] = {
        "gw": gateway,
        "kid": key_id(hub_key),
        "v": version,
        "t": now_ms,
        "trial": trial_s,
        "sha": hashlib.sha256(payload).digest(),
    }
    wire = sign_message(PUSH_DOMAIN, protected, payload, hub_key)
    if len(wire) > MAX_CONFIG_BYTES:
        raise LocalError(
            f"the configuration is {len(wire)} bytes signed; a gateway reads at most "
            f"{MAX_CONFIG_BYTES}"
        )
    return wire


def parse_push(data: bytes) -> ConfigPush:
    """Structure and hash only; :class:`FrameError` names what is malformed."""
    if len(data) > MAX_CONFIG_BYTES:
        raise FrameError(f"a config push is at most {MAX_CONFIG_BYTES} bytes, not {len(data)}")
    msg = parse_message(data)
    f = msg.fields(_PUSH_SCHEMA)
    p = ConfigPush(message=msg, **f)  # type: ignore[arg-type]  # types checked by fields()
    check_sender(p.gw, p.kid)
    if p.v < 1:
        raise FrameError("protected header: v must be 1 or more")
    if not 1 <= p.trial <= MAX_TRIAL_S:
        raise FrameError(f"protected header: trial must be 1 to {MAX_TRIAL_S} s")
    if hashlib.sha256(msg.payload).digest() != p.sha:
        raise FrameError("payload does not match its SHA-256")
    return p


@dataclass(frozen=True, slots=True)
class ConfigReport:
    gw: str
    kid: bytes
    v: int
    status: ReportStatus
    reason: str
    running: int
    t: int
    message: SignedMessage

    def verify(self, gateway_public: PublicKeyLike) -> None:
        self.message.verify(REPORT_DOMAIN, gateway_public, kid=self.kid)

    def details(self) -> Any:
        return unpack(self.message.payload, "report details", strict_map_key=False)


def report(
    *,
    gateway: str,
    key: ed25519.PrivateKey,
    version: int,
    status: ReportStatus,
    running: int,
    now_ms: int,
    reason: str = "",
    details: object = None,
) -> bytes:
    """The gateway's signed report on configuration ``version``."""
    if status not in STATUSES:
        raise LocalError(f"status must be one of {', '.join(STATUSES)}")
    protected: dict[str, str | bytes | int] = {
        "gw": gateway,
        "kid": key_id(key),
        "v": version,
        "status": status,
        "reason": reason[:1024],
        "running": running,
        "t": now_ms,
    }
    return sign_message(REPORT_DOMAIN, protected, pack(details), key)


def parse_report(data: bytes) -> ConfigReport:
    msg = parse_message(data)
    f = msg.fields(_REPORT_SCHEMA)
    r = ConfigReport(message=msg, **f)  # type: ignore[arg-type]  # types checked by fields()
    if r.status not in STATUSES:
        raise FrameError(f"protected header: unknown status {r.status!r}")
    check_sender(r.gw, r.kid)
    return r
