"""Enrollment of a gateway key with the hub (sans-IO).

Two message kinds on the signed envelope of :mod:`protocols.envelope`
(specified in ``docs/security.md``, section "Enrollment"):

``vitals/enroll/v1`` — the gateway asks the hub to trust a public key, on
``{prefix}/enroll/{gw}``. Protected map::

    gw     str    gateway id
    kid    bin 8  key id of the key that signs this request
    pub    bin 32 the raw Ed25519 public key to enroll
    token  str    one-time enrollment token ("" for a key rotation)
    t      int    gateway time, ms since the epoch
    nonce  bin 16 random, echoed in the result

The payload is the *proof of possession* of ``pub``: the Ed25519 signature,
by the key being enrolled, of ``msgpack [POP_DOMAIN, protected, b""]``. A
first enrollment is signed by the new key itself (``kid == key_id(pub)``) and
carries a token; a rotation is signed by the gateway's current, enrolled key
(``kid != key_id(pub)``) and needs no token.

``vitals/enroll-result/v1`` — the hub's answer, signed by the hub key, on
``{prefix}/enroll/{gw}/result``. Protected map::

    gw       str    gateway id
    kid      bin 8  the hub key's id
    hub_pub  bin 32 the hub's raw public key (the gateway keeps it to verify commands)
    nonce    bin 16 the request's nonce
    enrolled bin    key id now trusted for gw ("" when refused)
    status   str    "enrolled" or the refusal reason
    detail   str    human-readable detail
    t        int    hub time, ms

Tokens are ``<secret>.<hub kid hex>``: whoever hands the technician a token
also pins the hub key, so a result signed by any other key is refused.
"""

from __future__ import annotations

import base64
import hmac
import secrets
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from protocols import ed25519
from protocols.envelope import (
    MAX_GATEWAY_LEN,
    PublicKeyLike,
    SignedMessage,
    check_sender,
    key_id,
    pack,
    parse_message,
    sign_message,
    signed_bytes,
)
from protocols.errors import FrameError, LocalError, SignatureError

__all__ = [
    "ENROLL_DOMAIN",
    "POP_DOMAIN",
    "RESULT_DOMAIN",
    "EnrollRequest",
    "EnrollResult",
    "EnrollStatus",
    "new_token",
    "parse_request",
    "parse_result",
    "request",
    "result",
    "token_hub_kid",
]

ENROLL_DOMAIN: Final = "vitals/enroll/v1"
POP_DOMAIN: Final = "vitals/enroll-pop/v1"
RESULT_DOMAIN: Final = "vitals/enroll-result/v1"
#: the result's ``status``: ``"enrolled"``, or why the hub refused
EnrollStatus: TypeAlias = Literal[
    "enrolled",
    "malformed",
    "topic_mismatch",
    "bad_token",
    "token_used",
    "token_expired",
    "bad_signature",
    "unknown_key",
    "revoked_key",
    "already_rotated",
]
ENROLLED: Final = "enrolled"
MAX_TOKEN_LEN: Final = 128
MAX_DETAIL_LEN: Final = 512

_REQUEST_SCHEMA: Final = {
    "gw": str,
    "kid": bytes,
    "pub": bytes,
    "token": str,
    "t": int,
    "nonce": bytes,
}
_RESULT_SCHEMA: Final = {
    "gw": str,
    "kid": bytes,
    "hub_pub": bytes,
    "nonce": bytes,
    "enrolled": bytes,
    "status": str,
    "detail": str,
    "t": int,
}
_NONCE_LEN: Final = 16


def new_token(hub_public: PublicKeyLike) -> str:
    """A fresh one-time token that pins ``hub_public``: 128 random bits, base32."""
    secret = base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()
    return f"{secret}.{key_id(hub_public).hex()}"


def token_hub_kid(token: str) -> bytes:
    """The hub key id a token pins; :class:`LocalError` if it is not a token."""
    secret, dot, kid_hex = token.strip().rpartition(".")
    try:
        kid = bytes.fromhex(kid_hex)
    except ValueError:
        kid = b""
    if not dot or not secret or len(kid) != 8:
        raise LocalError("an enrollment token looks like '<secret>.<16 hex digits>'")
    return kid


def _check_sizes(gw: str, kid: bytes, nonce: bytes) -> None:
    check_sender(gw, kid)
    if len(nonce) != _NONCE_LEN:
        raise FrameError(f"protected header: nonce must be {_NONCE_LEN} bytes")


# --------------------------------------------------------------------------- request


@dataclass(frozen=True, slots=True)
class EnrollRequest:
    """A parsed enrollment request: well formed, signatures not yet checked."""

    gw: str
    kid: bytes
    pub: bytes
    token: str
    t: int
    nonce: bytes
    message: SignedMessage

    @property
    def is_rotation(self) -> bool:
        """Signed by another key than the one it enrolls."""
        return key_id(self.pub) != self.kid

    def verify(self, signer: PublicKeyLike) -> None:
        """Check the request signature (by ``signer``) and the proof of possession of ``pub``."""
        self.message.verify(ENROLL_DOMAIN, signer, kid=self.kid)
        pop = SignedMessage(self.message.protected, b"", self.message.payload)
        try:
            pop.verify(POP_DOMAIN, self.pub)
        except SignatureError as exc:
            raise SignatureError("no proof of possession of the enrolled key") from exc


def request(
    *,
    gateway: str,
    new_key: ed25519.PrivateKey,
    token: str = "",
    signer: ed25519.PrivateKey | None = None,
    now_ms: int,
    nonce: bytes | None = None,
) -> tuple[bytes, bytes]:
    """``(wire bytes, nonce)`` of a request to enroll ``new_key``.

    ``signer`` is the gateway's current key for a rotation; by default the new
    key signs (first enrollment, which needs a ``token``).
    """
    signer = signer or new_key
    if signer is new_key and not token:
        raise LocalError("a first enrollment needs a token")
    if len(token) > MAX_TOKEN_LEN:
        raise LocalError(f"a token has at most {MAX_TOKEN_LEN} characters")
    nonce = nonce if nonce is not None else secrets.token_bytes(_NONCE_LEN)
    protected: dict[str, str | bytes | int] = {
        "gw": gateway,
        "kid": key_id(signer),
        "pub": new_key.public_key().public_bytes_raw(),
        "token": token,
        "t": now_ms,
        "nonce": nonce,
    }
    # the very bytes sign_message packs: the proof covers what is sent
    pop = new_key.sign(signed_bytes(POP_DOMAIN, pack(protected), b""))
    return sign_message(ENROLL_DOMAIN, protected, pop, signer), nonce


def parse_request(data: bytes) -> EnrollRequest:
    """Structure only; :class:`FrameError` names what is malformed."""
    msg = parse_message(data)
    f = msg.fields(_REQUEST_SCHEMA)
    req = EnrollRequest(message=msg, **f)  # type: ignore[arg-type]  # types checked by fields()
    _check_sizes(req.gw, req.kid, req.nonce)
    if len(req.pub) != 32:
        raise FrameError("protected header: pub must be 32 bytes")
    if len(req.token) > MAX_TOKEN_LEN:
        raise FrameError(f"protected header: token longer than {MAX_TOKEN_LEN}")
    if len(msg.payload) != 64:
        raise FrameError("enrollment payload must be a 64-byte proof of possession")
    return req


# --------------------------------------------------------------------------- result


@dataclass(frozen=True, slots=True)
class EnrollResult:
    gw: str
    kid: bytes
    hub_pub: bytes
    nonce: bytes
    enrolled: bytes
    status: str
    detail: str
    t: int
    message: SignedMessage

    @property
    def ok(self) -> bool:
        return self.status == ENROLLED

    def verify(self, *, nonce: bytes, pinned_hub_kid: bytes | None) -> None:
        """Signed by the key it carries, that key pinned (if known), our nonce echoed."""
        if key_id(self.hub_pub) != self.kid:
            raise SignatureError("enrollment result kid does not match its hub key")
        if pinned_hub_kid is not None and not hmac.compare_digest(self.kid, pinned_hub_kid):
            raise SignatureError(
                f"enrollment result signed by hub key {self.kid.hex()}, "
                f"the token pins {pinned_hub_kid.hex()}"
            )
        self.message.verify(RESULT_DOMAIN, self.hub_pub)
        if not hmac.compare_digest(self.nonce, nonce):
            raise SignatureError("enrollment result answers another request (nonce)")


def result(
    *,
    gateway: str,
    hub_key: ed25519.PrivateKey,
    nonce: bytes,
    status: EnrollStatus,
    enrolled: bytes = b"",
    detail: str = "",
    now_ms: int,
) -> bytes:
    """The hub's signed answer to a request."""
    if len(nonce) != _NONCE_LEN:  # a malformed request: answer with a zero nonce
        nonce = bytes(_NONCE_LEN)
    protected: dict[str, str | bytes | int] = {
        "gw": gateway[:MAX_GATEWAY_LEN] or "?",
        "kid": key_id(hub_key),
        "hub_pub": hub_key.public_key().public_bytes_raw(),
        "nonce": nonce,
        "enrolled": enrolled,
        "status": status,
        "detail": detail[:MAX_DETAIL_LEN],
        "t": now_ms,
    }
    return sign_message(RESULT_DOMAIN, protected, b"", hub_key)


def parse_result(data: bytes) -> EnrollResult:
    msg = parse_message(data)
    f = msg.fields(_RESULT_SCHEMA)
    res = EnrollResult(message=msg, **f)  # type: ignore[arg-type]  # types checked by fields()
    _check_sizes(res.gw, res.kid, res.nonce)
    if len(res.hub_pub) != 32:
        raise FrameError("protected header: hub_pub must be 32 bytes")
    if res.enrolled and len(res.enrolled) != 8:
        raise FrameError("protected header: enrolled must be empty or 8 bytes")
    return res
