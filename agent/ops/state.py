"""The gateway's persistent state: its identity key and its boot epoch.

Both live in the state directory (``/var/lib/vitals`` by default). The key file
is created with mode 0600 and refused at load when others can read it or when
another user owns it; it is never logged. The epoch is incremented and made
durable (write, fsync, rename, fsync of the directory) before the first batch
of a run is sealed, so a crash can never make the agent reuse an (epoch, seq).
On a full disk (no block for the new file) the number is written over the old
one in place, in the block the file already has.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from protocols import ed25519
from protocols.errors import KeyFormatError, LocalError

__all__ = [
    "HUB_KEY_FILE",
    "KEY_FILE",
    "PENDING_KEY_FILE",
    "Identity",
    "IdentityError",
    "commit_pending_key",
    "create_identity",
    "create_pending_key",
    "discard_pending_key",
    "load_hub_key",
    "load_identity",
    "load_pending_key",
    "next_epoch",
    "public_key_raw",
    "save_hub_key",
]

log = logging.getLogger(__name__)

KEY_FILE = "identity.key"
PENDING_KEY_FILE = "identity.key.new"  # a rotation in progress: enrolled, not yet in use
HUB_KEY_FILE = "hub.pub"  # the hub's public key (hex), learnt at enrollment
EPOCH_FILE = "epoch"


class IdentityError(LocalError):
    """The identity key is missing, unreadable, or unsafe to use."""


def public_key_raw(key: ed25519.PublicKey) -> bytes:
    return key.public_bytes_raw()


@dataclass(frozen=True)
class Identity:
    """A gateway's Ed25519 key pair and the names derived from it."""

    private_key: ed25519.PrivateKey
    path: Path

    @property
    def public_key(self) -> ed25519.PublicKey:
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

    @property
    def default_gateway_id(self) -> str:
        """A gateway id derived from the key, for a gateway provisioned without one."""
        return f"gw-{self.kid.hex()[:12]}"

    def __repr__(self) -> str:  # never print key material
        return f"Identity(path={str(self.path)!r}, kid={self.kid.hex()})"

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[object, ...]:  # no pickling a private key by accident
        raise TypeError("an Identity holds a private key and is not picklable")


def _write_new_key(path: Path) -> ed25519.PrivateKey | None:
    """A new key written to ``path`` (PKCS#8 PEM, mode 0600, fsynced); None if ``path`` exists."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ed25519.PrivateKey.generate()
    pem = key.private_pem()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path.parent)
    return key


def create_identity(state_dir: Path, *, exist_ok: bool = False) -> Identity:
    """Create a new identity key in ``state_dir`` with mode 0600.

    Refuses to overwrite an existing key unless ``exist_ok``, in which case the
    existing key is loaded and returned.
    """
    path = state_dir / KEY_FILE
    key = _write_new_key(path)
    if key is None:
        if exist_ok:
            return load_identity(state_dir)
        raise IdentityError(
            f"{path}: an identity key exists already; remove it first if you really "
            "mean to replace this gateway's identity (the hub will not know the new one)"
        )
    ident = Identity(key, path)
    log.info("created identity key %s (kid %s)", path, ident.kid.hex())
    return ident


def load_identity(state_dir: Path) -> Identity:
    return _load_key(state_dir / KEY_FILE, state_dir)


def _load_key(path: Path, state_dir: Path) -> Identity:
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
        key = ed25519.PrivateKey.from_pem(path.read_bytes())
    except OSError as exc:
        raise IdentityError(f"{path}: not a readable PEM private key ({exc})") from exc
    except KeyFormatError as exc:  # names what is wrong, never key material
        raise IdentityError(f"{path}: not a readable PEM private key: {exc}") from exc
    return Identity(key, path)


# -- key rotation: identity.key.new is enrolled first, then replaces identity.key


def create_pending_key(state_dir: Path) -> Identity:
    """The key a rotation enrolls: created (0600) once, reused on a retry."""
    path = state_dir / PENDING_KEY_FILE
    key = _write_new_key(path)
    if key is None:
        return _load_key(path, state_dir)
    ident = Identity(key, path)
    log.info("created the next identity key %s (kid %s)", path, ident.kid.hex())
    return ident


def load_pending_key(state_dir: Path) -> Identity | None:
    path = state_dir / PENDING_KEY_FILE
    return _load_key(path, state_dir) if path.exists() else None


def commit_pending_key(state_dir: Path) -> Identity:
    """Make the pending key the identity (atomic rename); the old key is gone."""
    pending = state_dir / PENDING_KEY_FILE
    ident = _load_key(pending, state_dir)  # the same checks before it is trusted
    os.replace(pending, state_dir / KEY_FILE)
    _fsync_dir(state_dir)
    log.info("identity key rotated: kid %s is now in use", ident.kid.hex())
    return Identity(ident.private_key, state_dir / KEY_FILE)


def discard_pending_key(state_dir: Path) -> None:
    (state_dir / PENDING_KEY_FILE).unlink(missing_ok=True)


# -- the hub's public key: learnt from a signed enrollment result


def save_hub_key(state_dir: Path, public_raw: bytes) -> Path:
    """Keep the hub's raw public key (hex, one line); it verifies commands."""
    if len(public_raw) != 32:
        raise IdentityError("a hub public key is 32 raw bytes")
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / HUB_KEY_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, public_raw.hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(state_dir)
    return path


def load_hub_key(state_dir: Path) -> bytes | None:
    """The hub's raw public key, or None before enrollment."""
    path = state_dir / HUB_KEY_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise IdentityError(f"{path}: not a hub public key (64 hex digits)")
    if os.stat(path).st_mode & stat.S_IWOTH or (
        hasattr(os, "geteuid") and os.stat(path).st_uid != os.geteuid()
    ):
        raise IdentityError(f"{path}: writable by others or owned by another user; refusing")
    return raw


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
    data = f"{new}\n".encode()
    tmp = path.with_suffix(".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or current == 0:
            raise
        # a full disk: the new file needs a block that is not there, the old one has
        # one (a number is a few bytes of its first sector, written in place: one write)
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        log.info("%s: the disk is full; epoch %d written in place", path, new)
        return new
    os.replace(tmp, path)
    _fsync_dir(state_dir)
    return new


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
