"""Signed commands from the hub, and the gateway's signed results (sans-IO).

Two message kinds on the envelope of :mod:`protocols.envelope` (specified in
``docs/security.md``, section "Commands").

``vitals/cmd/v1`` — signed by the hub key, on ``{prefix}/{gw}/cmd``::

    gw   str    the target gateway
    kid  bin 8  the hub key's id
    id   bin 16 command id (random, unique)
    op   str    ping | read | write | reload | log_level | resend
    t    int    hub time at issue, ms
    exp  int    expiry, ms: the gateway refuses the command from then on

The payload is a msgpack map of the operation's arguments (``{}`` for none).
``resend`` (the hub asks for batches it misses): ``{"epoch": int, "ranges":
[[lo, hi], ...]}`` (at most :data:`MAX_RESEND_RANGES`); the gateway republishes
what it holds and answers ``{"resent": n_batches, "not_held": [[epoch, lo, hi],
...]}``, naming what it no longer holds in a gap notice (reason ``not_held``).

``vitals/cmd-result/v1`` — signed by the gateway key, on ``{prefix}/{gw}/cmd/result``::

    gw      str    the gateway
    kid     bin 8  the gateway key's id
    id      bin    the command id ("" when the command could not be parsed)
    status  str    "ok", or "refused" (never executed), or "failed" (executed, went wrong)
    reason  str    why ("" when ok): unknown_key, bad_signature,
                   misaddressed, expired, replayed, too_long, unknown_op,
                   bad_args, not_writable, out_of_range, ...
    t       int    gateway time, ms

The payload is the msgpack encoding of the operation's answer (``nil`` when none).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
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
    "CMD_DOMAIN",
    "MAX_COMMAND_BYTES",
    "MAX_RESEND_RANGES",
    "OPS",
    "RESULT_DOMAIN",
    "STATUSES",
    "Command",
    "CommandResult",
    "Op",
    "ResultStatus",
    "command",
    "parse_command",
    "parse_result",
    "result",
]

CMD_DOMAIN: Final = "vitals/cmd/v1"
RESULT_DOMAIN: Final = "vitals/cmd-result/v1"
Op: TypeAlias = Literal["ping", "read", "write", "reload", "log_level", "resend", "firmware"]
OPS: Final[tuple[Op, ...]] = get_args(Op)
#: ``resend`` asks for at most this many ``[lo, hi]`` seq ranges of one epoch
MAX_RESEND_RANGES: Final = 64
#: "ok", or "refused" (never executed), or "failed" (executed, went wrong)
ResultStatus: TypeAlias = Literal["ok", "refused", "failed"]
STATUSES: Final[tuple[ResultStatus, ...]] = get_args(ResultStatus)
#: the largest command message, signed and enveloped, that a gateway reads (it drops a
#: larger one unread and unanswered); real ones are a few hundred bytes (a ``read``
#: naming 30 points is under 1 KiB)
MAX_COMMAND_BYTES: Final = 4096
_ID_LEN: Final = 16

_CMD_SCHEMA: Final = {"gw": str, "kid": bytes, "id": bytes, "op": str, "t": int, "exp": int}
_RESULT_SCHEMA: Final = {
    "gw": str,
    "kid": bytes,
    "id": bytes,
    "status": str,
    "reason": str,
    "t": int,
}


@dataclass(frozen=True, slots=True)
class Command:
    """A parsed command: well formed, signature not yet verified, args not yet decoded."""

    gw: str
    kid: bytes
    id: bytes
    op: Op
    t: int
    exp: int
    message: SignedMessage

    def verify(self, hub_public: PublicKeyLike) -> None:
        self.message.verify(CMD_DOMAIN, hub_public, kid=self.kid)

    def args(self) -> dict[str, Any]:
        """The argument map (str keys); :class:`DecodeError` if it is not one."""
        obj = unpack(self.message.payload, "command arguments", strict_map_key=True, max_ext_len=0)
        if type(obj) is not dict:
            raise DecodeError("command arguments must be a msgpack map")
        return obj


def command(
    op: Op,
    args: Mapping[str, Any] | None = None,
    *,
    gateway: str,
    hub_key: ed25519.PrivateKey,
    now_ms: int,
    ttl_ms: int = 60_000,
    command_id: bytes | None = None,
) -> tuple[bytes, bytes]:
    """``(wire bytes, command id)`` of a signed command for ``gateway``."""
    if op not in OPS:
        raise LocalError(f"unknown command {op!r}; one of {', '.join(OPS)}")
    cid = command_id if command_id is not None else secrets.token_bytes(_ID_LEN)
    payload = pack(dict(args or {}))
    protected: dict[str, str | bytes | int] = {
        "gw": gateway,
        "kid": key_id(hub_key),
        "id": cid,
        "op": op,
        "t": now_ms,
        "exp": now_ms + ttl_ms,
    }
    wire = sign_message(CMD_DOMAIN, protected, payload, hub_key)
    if len(wire) > MAX_COMMAND_BYTES:
        raise LocalError(
            f"the {op} command is {len(wire)} bytes; a gateway reads at most "
            f"{MAX_COMMAND_BYTES} (send fewer points or values at once)"
        )
    return wire, cid


def parse_command(data: bytes) -> Command:
    """Structure only; :class:`FrameError` names what is malformed."""
    msg = parse_message(data)
    f = msg.fields(_CMD_SCHEMA)
    cmd = Command(message=msg, **f)  # type: ignore[arg-type]  # types checked by fields()
    check_sender(cmd.gw, cmd.kid)
    if len(cmd.id) != _ID_LEN:
        raise FrameError(f"protected header: id must be {_ID_LEN} bytes")
    if len(data) > MAX_COMMAND_BYTES:
        raise FrameError(f"a command is at most {MAX_COMMAND_BYTES} bytes, not {len(data)}")
    return cmd


@dataclass(frozen=True, slots=True)
class CommandResult:
    gw: str
    kid: bytes
    id: bytes
    status: ResultStatus
    reason: str
    t: int
    message: SignedMessage

    def verify(self, gateway_public: PublicKeyLike) -> None:
        self.message.verify(RESULT_DOMAIN, gateway_public, kid=self.kid)

    def value(self) -> Any:
        """The operation's answer, decoded."""
        return unpack(self.message.payload, "result value", strict_map_key=False)


def result(
    *,
    gateway: str,
    key: ed25519.PrivateKey,
    command_id: bytes,
    status: ResultStatus,
    reason: str = "",
    value: object = None,
    now_ms: int,
) -> bytes:
    """The gateway's signed result of a command."""
    if status not in STATUSES:
        raise LocalError(f"status must be one of {', '.join(STATUSES)}")
    protected: dict[str, str | bytes | int] = {
        "gw": gateway,
        "kid": key_id(key),
        "id": command_id,
        "status": status,
        "reason": reason[:512],
        "t": now_ms,
    }
    return sign_message(RESULT_DOMAIN, protected, pack(value), key)


def parse_result(data: bytes) -> CommandResult:
    msg = parse_message(data)
    f = msg.fields(_RESULT_SCHEMA)
    res = CommandResult(message=msg, **f)  # type: ignore[arg-type]  # types checked by fields()
    if res.status not in STATUSES:
        raise FrameError(f"protected header: unknown status {res.status!r}")
    check_sender(res.gw, res.kid)
    return res
