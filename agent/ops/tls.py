"""The TLS context of the MQTT uplink, from ``[uplink.tls]``.

Server verification is on by default: the broker's chain is checked against
``ca_file`` (or the system's trust store when it is empty) and its name
against ``[uplink] host`` (a DNS name or an IP address SAN). ``cert_file`` and
``key_file`` add a client certificate (mutual TLS). ``insecure = true`` turns
both checks off, explicitly, and :func:`tls_context` logs a warning every time
it builds such a context (i.e. at every start): a bench setting, never a
street cabinet's. TLS 1.2 is the floor.
"""

from __future__ import annotations

import logging
import os
import ssl
import stat
from collections.abc import Sequence
from pathlib import Path

from agent.ops.config import TlsConfig
from protocols.errors import LocalError

__all__ = ["TlsError", "tls_context"]

log = logging.getLogger(__name__)


class TlsError(LocalError):
    """A TLS file is missing, unreadable, unsafe or does not match its key."""


def tls_context(cfg: TlsConfig) -> ssl.SSLContext | None:
    """The client context ``cfg`` describes, or None when TLS is not enabled.

    :class:`TlsError` names the file and what is wrong with it (missing,
    unreadable, readable by others, not a certificate or key, not matching),
    never an errno: the agent refuses to start with it, ``vitals diag uplink``
    shows it as its tls step."""
    if not cfg.enabled:
        if cfg.insecure or cfg.ca_file or cfg.cert_file:
            log.warning("[uplink.tls] has settings but enabled = false: the uplink is plain MQTT")
        return None
    try:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(cfg.ca_file) if cfg.ca_file else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(_why(exc, [("ca_file", cfg.ca_file)], "no certificate in it")) from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.cert_file is not None and cfg.key_file is not None:
        _check_key_file(cfg.key_file)
        try:
            ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
        except (OSError, ssl.SSLError) as exc:
            files = [("cert_file", cfg.cert_file), ("key_file", cfg.key_file)]
            raise TlsError(
                _why(exc, files, "the certificate or key cannot be used, or they do not match")
            ) from exc
    if cfg.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        log.warning(
            "[uplink.tls] insecure = true: the broker's certificate is NOT verified; "
            "anyone on the path can pose as the broker (bench use only)"
        )
    return ctx


def _why(
    exc: OSError | ssl.SSLError, files: Sequence[tuple[str, Path | None]], unusable: str
) -> str:
    """One line naming the file of ``files`` that made ``exc`` and what is wrong with it."""
    named = [(k, p) for k, p in files if p is not None]
    where = " / ".join(f"{k} {p}" for k, p in named) or "the system's certificates"
    for key, path in named:
        if not path.exists():
            return f"[uplink.tls] {key} {path}: no such file"
        if not os.access(path, os.R_OK):
            return f"[uplink.tls] {key} {path}: cannot read it (permission denied)"
    if isinstance(exc, ssl.SSLError):
        return f"[uplink.tls] {where}: {unusable} ({exc.reason or exc.library or 'SSL'})"
    return f"[uplink.tls] {where}: {exc.strerror or exc}"


def _check_key_file(path: Path) -> None:
    try:
        st = path.stat()
    except OSError as exc:
        raise TlsError(_why(exc, [("key_file", path)], "")) from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TlsError(
            f"[uplink.tls] key_file {path}: mode {stat.S_IMODE(st.st_mode):04o} lets other "
            f"users read the client key; run `chmod 600 {path}`"
        )
