"""Ed25519 (RFC 8032, pure, no context): the one place vitals signs and verifies.

The agent must stay small: ``cryptography`` maps its own Rust + OpenSSL
library (6.5–7.5 MB resident) to sign ~30 batches a second. The system's
libcrypto (OpenSSL >= 1.1.1, the library Python's ``_ssl`` and ``_hashlib``
link against, already mapped once ``asyncio`` has imported ``ssl``) does
Ed25519 through its EVP interface, which this module calls with ``ctypes``::

    EVP_PKEY_new_raw_private_key / EVP_PKEY_new_raw_public_key   (a key from raw bytes)
    EVP_DigestSignInit(md=NULL) + EVP_DigestSign                  (one shot: Ed25519 has no pre-hash)
    EVP_DigestVerifyInit(md=NULL) + EVP_DigestVerify
    EVP_PKEY_get_raw_public_key / EVP_PKEY_get_raw_private_key

Backends, chosen at the first key made in the process:

* ``libcrypto``: the libcrypto this process has mapped already (from
  ``/proc/self/maps``), else ``libcrypto.so.3`` / ``libcrypto.so.1.1``, else
  what ``ctypes.util.find_library("crypto")`` names; each candidate must pass
  the RFC 8032 TEST 1 known answer before it is used;
* ``cryptography``: imported only when no usable libcrypto is found.

``VITALS_ED25519=libcrypto`` or ``=cryptography`` forces one (tests, odd
systems); the ``backend=`` argument of the constructors does the same per key.
Both give the same bytes: Ed25519 signatures are deterministic.

A key object holds the library's key (an ``EVP_PKEY``, freed with the object),
never a Python copy of the private seed; the buffers this module fills with a
seed are zeroed after use, but the ``bytes`` a caller passes in, ``os.urandom``
returns or base64 decodes to cannot be, and are only dropped. Each sign or verify uses its own
``EVP_MD_CTX``, so keys may be used from several threads at once (the calls
release the GIL). Verification failures raise
:class:`~protocols.errors.InvalidSignature`, a
:class:`~protocols.errors.SignatureError`; malformed keys raise
:class:`~protocols.errors.KeyFormatError` naming what is wrong.
"""

from __future__ import annotations

import binascii
import ctypes
import os
import sys
import threading
from typing import Any, Final, Protocol

from protocols.errors import InvalidSignature, KeyFormatError, LocalError

__all__ = [
    "BACKENDS",
    "PKCS8_PREFIX",
    "SPKI_PREFIX",
    "PrivateKey",
    "PublicKey",
    "backend_name",
]

SEED_LEN: Final = 32
PUBLIC_LEN: Final = 32
SIGNATURE_LEN: Final = 64
BACKENDS: Final = ("libcrypto", "cryptography")
ENV_VAR: Final = "VITALS_ED25519"

# RFC 8410: PrivateKeyInfo (version 0, AlgorithmIdentifier 1.3.101.112, no
# parameters) holding the OCTET STRING of the 32-byte CurvePrivateKey; what
# `openssl genpkey -algorithm ed25519` and cryptography write, 48 bytes in all.
PKCS8_PREFIX: Final = bytes.fromhex("302e020100300506032b657004220420")
# SubjectPublicKeyInfo: AlgorithmIdentifier 1.3.101.112, BIT STRING of the 32-byte key
SPKI_PREFIX: Final = bytes.fromhex("302a300506032b6570032100")
_ED25519_OID: Final = bytes.fromhex("06032b6570")
_PEM_PRIVATE: Final = "PRIVATE KEY"
_PEM_PUBLIC: Final = "PUBLIC KEY"

_NID_ED25519: Final = 1087  # EVP_PKEY_ED25519 = NID_ED25519, the same in 1.1.1 and 3.x

# RFC 8032 section 7.1, TEST 1: the known answer a libcrypto must give before it is used
_KAT_SEED: Final = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
_KAT_PUBLIC: Final = bytes.fromhex(
    "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
)
_KAT_SIGNATURE: Final = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
    "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


# --------------------------------------------------------------------------- backends


class _Backend(Protocol):
    """What a key needs from a library. A handle is the library's key object."""

    name: str

    def private(self, seed: bytes | bytearray) -> Any: ...
    def public(self, raw: bytes) -> Any: ...
    def sign(self, handle: Any, data: bytes) -> bytes: ...
    def verify(self, handle: Any, signature: bytes, data: bytes) -> bool: ...
    def public_raw(self, handle: Any) -> bytes: ...
    def seed_into(self, handle: Any, out: bytearray) -> None: ...
    def free(self, handle: Any) -> None: ...


class _LibCrypto:
    """The EVP functions of one libcrypto, with their C signatures."""

    name = "libcrypto"

    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        self.path = path
        vp, sz, c_int = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        psz = ctypes.POINTER(sz)

        def fn(name: str, restype: Any, *argtypes: Any) -> Any:
            f = getattr(lib, name)  # AttributeError: not this library
            f.restype = restype
            f.argtypes = argtypes
            return f

        # EVP_PKEY *EVP_PKEY_new_raw_private_key(int type, ENGINE *e, const unsigned char *key, size_t keylen)
        self._new_private = fn("EVP_PKEY_new_raw_private_key", vp, c_int, vp, vp, sz)
        self._new_public = fn("EVP_PKEY_new_raw_public_key", vp, c_int, vp, vp, sz)
        # int EVP_PKEY_get_raw_{public,private}_key(const EVP_PKEY *pkey, unsigned char *out, size_t *len)
        self._get_public = fn("EVP_PKEY_get_raw_public_key", c_int, vp, vp, psz)
        self._get_private = fn("EVP_PKEY_get_raw_private_key", c_int, vp, vp, psz)
        self._pkey_free = fn("EVP_PKEY_free", None, vp)
        self._ctx_new = fn("EVP_MD_CTX_new", vp)
        self._ctx_free = fn("EVP_MD_CTX_free", None, vp)
        # int EVP_DigestSignInit(EVP_MD_CTX *ctx, EVP_PKEY_CTX **pctx, const EVP_MD *type, ENGINE *e, EVP_PKEY *pkey)
        self._sign_init = fn("EVP_DigestSignInit", c_int, vp, vp, vp, vp, vp)
        # int EVP_DigestSign(EVP_MD_CTX *ctx, unsigned char *sig, size_t *siglen, const unsigned char *tbs, size_t tbslen)
        self._sign = fn("EVP_DigestSign", c_int, vp, vp, psz, vp, sz)
        self._verify_init = fn("EVP_DigestVerifyInit", c_int, vp, vp, vp, vp, vp)
        # int EVP_DigestVerify(EVP_MD_CTX *ctx, const unsigned char *sig, size_t siglen, const unsigned char *tbs, size_t tbslen)
        self._verify = fn("EVP_DigestVerify", c_int, vp, vp, sz, vp, sz)
        self._err_get = fn("ERR_get_error", ctypes.c_ulong)
        self._err_clear = fn("ERR_clear_error", None)

    def _failed(self, what: str) -> LocalError:
        code = self._err_get()
        self._err_clear()
        return LocalError(f"libcrypto {self.path}: {what} failed (error {code:#x})")

    def private(self, seed: bytes | bytearray) -> int:
        buf = seed if isinstance(seed, bytes) else (ctypes.c_char * len(seed)).from_buffer(seed)
        pkey: int | None = self._new_private(_NID_ED25519, None, buf, len(seed))
        if not pkey:
            raise self._failed("EVP_PKEY_new_raw_private_key")
        return pkey

    def public(self, raw: bytes) -> int:
        pkey: int | None = self._new_public(_NID_ED25519, None, raw, len(raw))
        if not pkey:
            raise self._failed("EVP_PKEY_new_raw_public_key")
        return pkey

    def sign(self, handle: int, data: bytes) -> bytes:
        sig = ctypes.create_string_buffer(SIGNATURE_LEN)
        siglen = ctypes.c_size_t(SIGNATURE_LEN)
        ctx = self._ctx_new()
        if not ctx:
            raise self._failed("EVP_MD_CTX_new")
        try:
            if self._sign_init(ctx, None, None, None, handle) != 1:
                raise self._failed("EVP_DigestSignInit")
            if self._sign(ctx, sig, ctypes.byref(siglen), data, len(data)) != 1:
                raise self._failed("EVP_DigestSign")
        finally:
            self._ctx_free(ctx)
        if siglen.value != SIGNATURE_LEN:
            raise LocalError(f"libcrypto {self.path}: a {siglen.value}-byte Ed25519 signature")
        return sig.raw

    def verify(self, handle: int, signature: bytes, data: bytes) -> bool:
        ctx = self._ctx_new()
        if not ctx:
            raise self._failed("EVP_MD_CTX_new")
        try:
            if self._verify_init(ctx, None, None, None, handle) != 1:
                raise self._failed("EVP_DigestVerifyInit")
            ok: int = self._verify(ctx, signature, len(signature), data, len(data))
        finally:
            self._ctx_free(ctx)
        if ok != 1:
            self._err_clear()  # a refused signature may leave an entry in this thread's queue
        return ok == 1

    def public_raw(self, handle: int) -> bytes:
        out = ctypes.create_string_buffer(PUBLIC_LEN)
        n = ctypes.c_size_t(PUBLIC_LEN)
        if self._get_public(handle, out, ctypes.byref(n)) != 1 or n.value != PUBLIC_LEN:
            raise self._failed("EVP_PKEY_get_raw_public_key")
        return out.raw

    def seed_into(self, handle: int, out: bytearray) -> None:
        buf = (ctypes.c_char * SEED_LEN).from_buffer(out)
        n = ctypes.c_size_t(SEED_LEN)
        if self._get_private(handle, buf, ctypes.byref(n)) != 1 or n.value != SEED_LEN:
            raise self._failed("EVP_PKEY_get_raw_private_key")

    def free(self, handle: int) -> None:
        self._pkey_free(handle)

    def known_answer(self) -> bool:
        """RFC 8032 TEST 1, signed and verified: this library does Ed25519 as we call it."""
        key = self.private(_KAT_SEED)
        try:
            ok = self.public_raw(key) == _KAT_PUBLIC and self.sign(key, b"") == _KAT_SIGNATURE
        finally:
            self.free(key)
        pub = self.public(_KAT_PUBLIC)
        try:
            return ok and self.verify(pub, _KAT_SIGNATURE, b"")
        finally:
            self.free(pub)


class _Cryptography:
    """The fallback: pyca/cryptography, imported only when it is chosen."""

    name = "cryptography"

    def __init__(self) -> None:
        from cryptography.exceptions import InvalidSignature as _Invalid
        from cryptography.hazmat.primitives.asymmetric import ed25519

        self._private_cls = ed25519.Ed25519PrivateKey
        self._public_cls = ed25519.Ed25519PublicKey
        self._invalid = _Invalid

    def private(self, seed: bytes | bytearray) -> Any:
        return self._private_cls.from_private_bytes(seed)

    def public(self, raw: bytes) -> Any:
        return self._public_cls.from_public_bytes(raw)

    def sign(self, handle: Any, data: bytes) -> bytes:
        return handle.sign(data)  # type: ignore[no-any-return]

    def verify(self, handle: Any, signature: bytes, data: bytes) -> bool:
        try:
            handle.verify(signature, data)
        except self._invalid:
            return False
        return True

    def public_raw(self, handle: Any) -> bytes:
        if isinstance(handle, self._private_cls):
            handle = handle.public_key()
        return handle.public_bytes_raw()  # type: ignore[no-any-return]

    def seed_into(self, handle: Any, out: bytearray) -> None:
        out[:] = handle.private_bytes_raw()

    def free(self, handle: Any) -> None:
        pass


def _libcrypto_candidates() -> list[str]:
    """Where a libcrypto may be, the ones this process has mapped already first."""
    mapped: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = "/" + line.rstrip("\n").partition("/")[2]
                name = path.rpartition("/")[2]
                usable = ".so" in name and not name.endswith(" (deleted)")  # deleted: replaced
                if name.startswith("libcrypto") and usable and path not in mapped:
                    mapped.append(path)
    except OSError:
        pass  # not Linux: no maps, try the usual names
    # a wheel's private copy (site-packages/*.libs) only after the system's
    mapped.sort(key=lambda p: "-packages/" in p)
    return [*mapped, "libcrypto.so.3", "libcrypto.so.1.1"]


def _try_libcrypto(path: str) -> _LibCrypto | None:
    try:
        lib = _LibCrypto(ctypes.CDLL(path), path)
        return lib if lib.known_answer() else None
    except (OSError, AttributeError, LocalError):  # not loadable, too old, no Ed25519
        return None


def _load_libcrypto() -> tuple[_LibCrypto | None, list[str]]:
    """The first usable libcrypto, and what was tried (for an error message)."""
    tried: list[str] = []
    for path in _libcrypto_candidates():
        tried.append(path)
        if lib := _try_libcrypto(path):
            return lib, tried
    # the last resort runs ldconfig; on macOS it names the unversioned system
    # libcrypto, whose loading aborts the process, so Linux only
    if sys.platform.startswith("linux"):
        from ctypes.util import find_library

        found = find_library("crypto")
        if found and found not in tried:
            tried.append(found)
            if lib := _try_libcrypto(found):
                return lib, tried
    return None, tried


_lock = threading.Lock()
_backends: dict[str, _Backend] = {}
_default: list[_Backend] = []


def _backend(name: str | None) -> _Backend:
    """The backend called ``name``, or the process default (``VITALS_ED25519``) for None."""
    if name is None and _default:
        return _default[0]
    with _lock:
        if name is None:
            if not _default:
                forced = os.environ.get(ENV_VAR, "")
                if forced and forced not in BACKENDS:
                    raise LocalError(
                        f"{ENV_VAR}={forced!r}: expected one of {', '.join(BACKENDS)} (or unset)"
                    )
                _default.append(_backend_locked(forced or None))
            return _default[0]
        if name not in BACKENDS:
            raise LocalError(f"Ed25519 backend {name!r}: expected one of {', '.join(BACKENDS)}")
        return _backend_locked(name)


def _backend_locked(name: str | None) -> _Backend:
    tried: list[str] = []
    if name != "cryptography" and "libcrypto" not in _backends:
        lib, tried = _load_libcrypto()
        if lib is not None:
            _backends["libcrypto"] = lib
        elif name == "libcrypto":
            raise LocalError(
                f"no usable libcrypto with Ed25519 (OpenSSL >= 1.1.1); tried {', '.join(tried)}"
            )
    if name != "cryptography" and "libcrypto" in _backends:
        return _backends["libcrypto"]
    if "cryptography" not in _backends:
        try:
            _backends["cryptography"] = _Cryptography()
        except ImportError as exc:
            why = f"no usable libcrypto (tried {', '.join(tried)}) and " if tried else ""
            raise LocalError(
                f"Ed25519: {why}cryptography is not installed; install the system's "
                "OpenSSL (libssl3) or `pip install cryptography`"
            ) from exc
    return _backends["cryptography"]


def backend_name() -> str:
    """The backend new keys use in this process: ``libcrypto`` or ``cryptography``."""
    return _backend(None).name


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

    __slots__ = ("__weakref__", "_backend", "_handle", "_raw")

    def __init__(self, backend: _Backend, handle: Any, raw: bytes) -> None:
        """Internal: use :meth:`from_public_bytes` or :meth:`PrivateKey.public_key`."""
        self._backend = backend
        self._handle = handle
        self._raw = raw

    @classmethod
    def from_public_bytes(cls, raw: bytes, *, backend: str | None = None) -> PublicKey:
        """The key of 32 raw bytes (RFC 8032 encoding of the point A)."""
        _check_len("public key", raw, PUBLIC_LEN)
        raw = bytes(raw)
        be = _backend(backend)
        return cls(be, be.public(raw), raw)

    def public_bytes_raw(self) -> bytes:
        return self._raw

    def public_pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM (``-----BEGIN PUBLIC KEY-----``), as ``openssl pkey -pubout``."""
        return _pem(_PEM_PUBLIC, SPKI_PREFIX + self._raw)

    def verify(self, signature: bytes, data: bytes) -> None:
        """Return if ``signature`` is this key's over ``data``; else raise :class:`InvalidSignature`."""
        if type(signature) is not bytes:
            signature = bytes(memoryview(signature))  # any bytes-like; TypeError for the rest
        if len(signature) != SIGNATURE_LEN:
            raise InvalidSignature(f"an Ed25519 signature is 64 bytes, got {len(signature)}")
        if type(data) is not bytes:
            data = bytes(data)
        if not self._backend.verify(self._handle, signature, data):
            raise InvalidSignature("Ed25519 signature does not verify")

    @property
    def backend(self) -> str:
        return self._backend.name

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
        return self  # immutable; a copy must not share (and free twice) the handle

    def __deepcopy__(self, memo: object) -> PublicKey:
        return self

    def __del__(self) -> None:
        handle, self._handle = getattr(self, "_handle", None), None
        if handle is not None:
            self._backend.free(handle)


class PrivateKey:
    """An Ed25519 private key. Never printed, copied or pickled."""

    __slots__ = ("__weakref__", "_backend", "_handle", "_public")

    def __init__(self, backend: _Backend, handle: Any) -> None:
        """Internal: use :meth:`generate`, :meth:`from_private_bytes` or :meth:`from_pem`."""
        self._backend = backend
        self._handle = handle
        self._public: PublicKey | None = None

    @classmethod
    def generate(cls, *, backend: str | None = None) -> PrivateKey:
        """A new key from 32 bytes of ``os.urandom``."""
        seed = bytearray(os.urandom(SEED_LEN))
        try:
            return cls.from_private_bytes(seed, backend=backend)
        finally:
            seed[:] = bytes(SEED_LEN)

    @classmethod
    def from_private_bytes(
        cls, seed: bytes | bytearray, *, backend: str | None = None
    ) -> PrivateKey:
        """The key of a 32-byte seed (RFC 8032's private key)."""
        _check_len("private key seed", seed, SEED_LEN)
        be = _backend(backend)
        return cls(be, be.private(seed))

    @classmethod
    def from_pem(cls, data: bytes, *, backend: str | None = None) -> PrivateKey:
        """A key from unencrypted PKCS#8 PEM (``-----BEGIN PRIVATE KEY-----``).

        Exactly the RFC 8410 form OpenSSL and cryptography write: the 16 bytes
        of :data:`PKCS8_PREFIX` then the seed. Anything else (another
        algorithm, PKCS#8 v2 with the public key, PEM headers, encryption) is a
        :class:`KeyFormatError` saying which.
        """
        der = _unpem(_PEM_PRIVATE, data)
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
        seed = bytearray(der[len(PKCS8_PREFIX) :])
        try:
            return cls.from_private_bytes(seed, backend=backend)
        finally:
            seed[:] = bytes(SEED_LEN)

    def private_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM, byte for byte what cryptography writes."""
        der = bytearray(PKCS8_PREFIX + bytes(SEED_LEN))
        seed = bytearray(SEED_LEN)
        try:
            self._backend.seed_into(self._handle, seed)
            der[len(PKCS8_PREFIX) :] = seed
            return _pem(_PEM_PRIVATE, der)
        finally:
            seed[:] = bytes(SEED_LEN)
            der[:] = bytes(len(der))

    def private_bytes_raw(self) -> bytes:
        """The 32-byte seed."""
        seed = bytearray(SEED_LEN)
        try:
            self._backend.seed_into(self._handle, seed)
            return bytes(seed)
        finally:
            seed[:] = bytes(SEED_LEN)

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        return self._backend.sign(self._handle, data if type(data) is bytes else bytes(data))

    def public_key(self) -> PublicKey:
        pub = self._public
        if pub is None:
            raw = self._backend.public_raw(self._handle)
            pub = self._public = PublicKey(self._backend, self._backend.public(raw), raw)
        return pub

    @property
    def backend(self) -> str:
        return self._backend.name

    def __repr__(self) -> str:  # never key material
        return f"PrivateKey(public={self.public_key().public_bytes_raw().hex()})"

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("a PrivateKey is not picklable (save it with private_pem())")

    def __copy__(self) -> PrivateKey:
        return self  # immutable; a copy must not share (and free twice) the handle

    def __deepcopy__(self, memo: object) -> PrivateKey:
        return self

    def __del__(self) -> None:
        handle, self._handle = getattr(self, "_handle", None), None
        if handle is not None:
            self._backend.free(handle)
