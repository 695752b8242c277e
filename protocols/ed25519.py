"""Ed25519 (RFC 8032, pure, no context): the one place vitals signs and verifies.

A thin layer over ``cryptography`` (pyca): its ``Ed25519PrivateKey`` and
``Ed25519PublicKey`` hold the key inside its OpenSSL, never a Python copy of
the private seed; the buffers this module fills with a seed are zeroed after
use, but the ``bytes`` a caller passes in or asks for cannot be, and are only
dropped. Keys may be used from several threads at once. What this layer adds:
key files read strictly (the 48-byte RFC 8410 PKCS#8 that OpenSSL and
cryptography write, and an error naming what else was handed in), our error
tree (verification failures raise :class:`~protocols.errors.InvalidSignature`,
a :class:`~protocols.errors.SignatureError`; malformed keys raise
:class:`~protocols.errors.KeyFormatError`), and key objects that never print,
pickle or copy their secret. Why cryptography and not the system libcrypto
through ``ctypes`` any more: ``docs/decisions.md`` 36.
"""

from __future__ import annotations

import binascii
from typing import Any, Final

from cryptography.exceptions import InvalidSignature as _PycaInvalid
from cryptography.hazmat.primitives.asymmetric import ed25519 as _pyca

from protocols.errors import InvalidSignature, KeyFormatError

__all__ = ["PKCS8_PREFIX", "SPKI_PREFIX", "PrivateKey", "PublicKey"]

SEED_LEN: Final = 32
PUBLIC_LEN: Final = 32
SIGNATURE_LEN: Final = 64

# RFC 8410: PrivateKeyInfo (version 0, AlgorithmIdentifier 1.3.101.112, no
# parameters) holding the OCTET STRING of the 32-byte CurvePrivateKey; what
# `openssl genpkey -algorithm ed25519` and cryptography write, 48 bytes in all.
PKCS8_PREFIX: Final = bytes.fromhex("302e020100300506032b657004220420")
# SubjectPublicKeyInfo: AlgorithmIdentifier 1.3.101.112, BIT STRING of the 32-byte key
SPKI_PREFIX: Final = bytes.fromhex("302a300506032b6570032100")
_ED25519_OID: Final = bytes.fromhex("06032b6570")
_PEM_PRIVATE: Final = "PRIVATE KEY"
_PEM_PUBLIC: Final = "PUBLIC KEY"


# --------------------------------------------------------------------------- PEM


def _pem(label: str, der: bytes | bytearray) -> bytes:
    """PEM as cryptography and OpenSSL write it: base64 in lines of 64 characters."""
    b64 = binascii.b2a_base64(der, newline=False)
    lines = [b64[i : i + 64] + b"\n" for i in range(0, len(b64), 64)]
    return (
        f"-----BEGIN {label}-----\n".encode()
        + b"".join(lines)
        + f"-----END {label}-----\n".encode()
    )


def _unpem(label: str, data: bytes) -> bytes:
    """The DER inside ``-----BEGIN label-----`` ... ``-----END label-----``, nothing else around."""
    if not isinstance(data, bytes | bytearray):
        raise KeyFormatError(f"a PEM {label.lower()} is bytes, not {type(data).__name__}")
    begin, end = f"-----BEGIN {label}-----".encode(), f"-----END {label}-----".encode()
    lines = bytes(data).strip().splitlines()
    first = lines[0].strip() if lines else b""
    if first != begin:
        found = (
            f", found {first.decode('ascii', 'replace')!r}"
            if first.startswith(b"-----BEGIN ")
            else (" (empty input)" if not lines else " (no BEGIN line first)")
        )
        hint = ""
        if b"ENCRYPTED" in first:
            hint = "; an encrypted key is not supported"
        elif b"OPENSSH" in first:
            hint = "; an OpenSSH key is not PKCS#8"
        raise KeyFormatError(f"expected {begin.decode()} (PKCS#8 PEM){found}{hint}")
    if len(lines) < 2 or lines[-1].strip() != end:
        raise KeyFormatError(f"no {end.decode()} line at the end")
    body = b"".join(ln.strip() for ln in lines[1:-1])
    try:
        return binascii.a2b_base64(body, strict_mode=True)
    except binascii.Error as exc:
        raise KeyFormatError(
            f"the body of the PEM {label.lower()} is not base64 (PEM headers are not supported)"
        ) from exc


# --------------------------------------------------------------------------- keys


def _check_len(what: str, value: object, n: int) -> None:
    if not isinstance(value, bytes | bytearray):
        raise KeyFormatError(f"an Ed25519 {what} is {n} bytes, not a {type(value).__name__}")
    if len(value) != n:
        raise KeyFormatError(f"an Ed25519 {what} is {n} bytes, got {len(value)}")


class PublicKey:
    """An Ed25519 public key. Compares and hashes by its 32 raw bytes."""

    __slots__ = ("__weakref__", "_key", "_raw")

    def __init__(self, key: _pyca.Ed25519PublicKey, raw: bytes) -> None:
        """Internal: use :meth:`from_public_bytes` or :meth:`PrivateKey.public_key`."""
        self._key = key
        self._raw = raw

    @classmethod
    def from_public_bytes(cls, raw: bytes) -> PublicKey:
        """The key of 32 raw bytes (RFC 8032 encoding of the point A)."""
        _check_len("public key", raw, PUBLIC_LEN)
        raw = bytes(raw)
        return cls(_pyca.Ed25519PublicKey.from_public_bytes(raw), raw)

    def public_bytes_raw(self) -> bytes:
        return self._raw

    def public_pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM (``-----BEGIN PUBLIC KEY-----``), as ``openssl pkey -pubout``."""
        return _pem(_PEM_PUBLIC, SPKI_PREFIX + self._raw)

    def verify(self, signature: bytes, data: bytes) -> None:
        """Return if ``signature`` is this key's over ``data``; else raise :class:`InvalidSignature`.

        Both may be any bytes-like object; anything else is a ``TypeError``.
        """
        if len(memoryview(signature)) != SIGNATURE_LEN:
            raise InvalidSignature(
                f"an Ed25519 signature is 64 bytes, got {len(memoryview(signature))}"
            )
        try:
            self._key.verify(signature, data)
        except _PycaInvalid:
            raise InvalidSignature("Ed25519 signature does not verify") from None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PublicKey):
            return NotImplemented
        return self._raw == other._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"PublicKey({self._raw.hex()})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (PublicKey.from_public_bytes, (self._raw,))

    def __copy__(self) -> PublicKey:
        return self  # immutable

    def __deepcopy__(self, memo: object) -> PublicKey:
        return self


class PrivateKey:
    """An Ed25519 private key. Never printed, copied or pickled."""

    __slots__ = ("__weakref__", "_key", "_public")

    def __init__(self, key: _pyca.Ed25519PrivateKey) -> None:
        """Internal: use :meth:`generate`, :meth:`from_private_bytes` or :meth:`from_pem`."""
        self._key = key
        self._public: PublicKey | None = None

    @classmethod
    def generate(cls) -> PrivateKey:
        """A new key from OpenSSL's random generator (seeded by the kernel)."""
        return cls(_pyca.Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, seed: bytes | bytearray) -> PrivateKey:
        """The key of a 32-byte seed (RFC 8032's private key)."""
        _check_len("private key seed", seed, SEED_LEN)
        return cls(_pyca.Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def from_pem(cls, data: bytes) -> PrivateKey:
        """A key from unencrypted PKCS#8 PEM (``-----BEGIN PRIVATE KEY-----``).

        Exactly the RFC 8410 form OpenSSL and cryptography write: the 16 bytes
        of :data:`PKCS8_PREFIX` then the seed. Anything else (another
        algorithm, PKCS#8 v2 with the public key, PEM headers, encryption) is a
        :class:`KeyFormatError` saying which.
        """
        der = bytearray(_unpem(_PEM_PRIVATE, data))
        try:
            if len(der) != len(PKCS8_PREFIX) + SEED_LEN or not der.startswith(PKCS8_PREFIX):
                if _ED25519_OID not in der[:16]:
                    raise KeyFormatError(
                        f"a PKCS#8 key of {len(der)} bytes for another algorithm than "
                        "Ed25519 (OID 1.3.101.112)"
                    )
                raise KeyFormatError(
                    f"an Ed25519 PKCS#8 key of {len(der)} bytes, not the RFC 8410 form vitals "
                    f"reads and writes (48 bytes: version 0, no attributes, no public key, "
                    f"starting {PKCS8_PREFIX.hex()})"
                )
            return cls.from_private_bytes(der[len(PKCS8_PREFIX) :])
        finally:
            der[:] = bytes(len(der))

    def private_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM, byte for byte what cryptography and OpenSSL write."""
        der = bytearray(PKCS8_PREFIX + self._key.private_bytes_raw())
        try:
            return _pem(_PEM_PRIVATE, der)
        finally:
            der[:] = bytes(len(der))

    def private_bytes_raw(self) -> bytes:
        """The 32-byte seed."""
        return self._key.private_bytes_raw()

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data`` (any bytes-like object)."""
        return self._key.sign(data)

    def public_key(self) -> PublicKey:
        pub = self._public
        if pub is None:
            key = self._key.public_key()
            pub = self._public = PublicKey(key, key.public_bytes_raw())
        return pub

    def __repr__(self) -> str:  # never key material
        return f"PrivateKey(public={self.public_key().public_bytes_raw().hex()})"

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("a PrivateKey is not picklable (save it with private_pem())")

    def __copy__(self) -> PrivateKey:
        return self  # immutable

    def __deepcopy__(self, memo: object) -> PrivateKey:
        return self
