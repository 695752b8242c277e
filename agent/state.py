"""The gateway's persistent state: its identity key and its boot epoch.

Both live in the state directory (``/var/lib/vitals`` by default). The key file
is created with mode 0600 and refused at load when others can read it or when
another user owns it; it is never logged. The epoch is incremented and made
durable (write, fsync, rename, fsync of the directory) before the first batch
of a run is sealed, so a crash can never make the agent reuse an (epoch, seq).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocols.errors import LocalError

__all__ = [
    "KEY_FILE",
    "Identity",
    "IdentityError",
    "create_identity",
    "load_identity",
    "next_epoch",
    "public_key_raw",
]

log = logging.getLogger(__name__)

KEY_FILE = "identity.key"
EPOCH_FILE = "epoch"


class IdentityError(LocalError):
    """The identity key is missing, unreadable, or unsafe to use."""


def public_key_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class Identity:
    """A gateway's Ed25519 key pair and the names derived from it."""

    private_key: Ed25519PrivateKey
    path: Path

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def public_raw(self) -> bytes:
        return public_key_raw(self.public_key)

    @property
    def kid(self) -> bytes:
        """Key id as in the envelope: the first 8 bytes of SHA-256 of the raw public key."""
        return hashlib.sha256(self.public_raw).digest()[:8]

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the raw public key, grouped for reading aloud over a phone."""
        h = hashlib.sha256(self.public_raw).hexdigest()
        return ":".join(h[i : i + 4] for i in range(0, 32, 4))

    def __repr__(self) -> str:  # never print key material
        return f"Identity(path={str(self.path)!r}, kid={self.kid.hex()})"


def create_identity(state_dir: Path, *, exist_ok: bool = False) -> Identity:
    """Create a new identity key in ``state_dir`` with mode 0600.

    Refuses to overwrite an existing key unless ``exist_ok``, in which case the
    existing key is loaded and returned.
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / KEY_FILE
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if exist_ok:
            return load_identity(state_dir)
        raise IdentityError(
            f"{path}: an identity key exists already; remove it first if you really "
            "mean to replace this gateway's identity (the hub will not know the new one)"
        ) from None
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(state_dir)
    log.info(
        "created identity key %s (kid %s)",
        path,
        hashlib.sha256(public_key_raw(key.public_key())).hexdigest()[:16],
    )
    return Identity(key, path)


def load_identity(state_dir: Path) -> Identity:
    path = state_dir / KEY_FILE
    try:
        st = path.stat()
    except FileNotFoundError:
        raise IdentityError(
            f"{path}: no identity key; create one with `vitals keygen --state-dir {state_dir}`"
        ) from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets other users read the key; "
            f"run `chmod 600 {path}`"
        )
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise IdentityError(f"{path}: owned by uid {st.st_uid}, not by this user ({os.geteuid()})")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as exc:
        raise IdentityError(
            f"{path}: not a readable PEM private key ({type(exc).__name__})"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path}: the key is not an Ed25519 key")
    return Identity(key, path)


def next_epoch(state_dir: Path) -> int:
    """Increment the persisted boot epoch and return the new value, durably."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / EPOCH_FILE
    try:
        text = path.read_text().strip()
        current = int(text) if text else 0
    except FileNotFoundError:
        current = 0
    except ValueError as exc:
        raise LocalError(f"{path}: not an integer epoch; refusing to guess one") from exc
    new = current + 1
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, f"{new}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(state_dir)
    return new


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
