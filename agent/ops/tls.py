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

from agent.ops.config import TlsConfig
from protocols.errors import LocalError

__all__ = ["TlsError", "tls_context"]

log = logging.getLogger(__name__)


class TlsError(LocalError):
    """A TLS file is missing, unreadable, unsafe or does not match its key."""


def tls_context(cfg: TlsConfig) -> ssl.SSLContext | None:
    """The client context ``cfg`` describes, or None when TLS is not enabled."""
    if not cfg.enabled:
        if cfg.insecure or cfg.ca_file or cfg.cert_file:
            log.warning("[uplink.tls] has settings but enabled = false: the uplink is plain MQTT")
        return None
    try:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(cfg.ca_file) if cfg.ca_file else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"[uplink.tls] ca_file {cfg.ca_file}: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.cert_file is not None and cfg.key_file is not None:
        _check_key_file(str(cfg.key_file))
        try:
            ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(
                f"[uplink.tls] cert_file {cfg.cert_file} / key_file {cfg.key_file}: {exc}"
            ) from exc
    if cfg.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        log.warning(
            "[uplink.tls] insecure = true: the broker's certificate is NOT verified; "
            "anyone on the path can pose as the broker (bench use only)"
        )
    return ctx


def _check_key_file(path: str) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise TlsError(f"[uplink.tls] key_file {path}: {exc.strerror}") from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TlsError(
            f"[uplink.tls] key_file {path}: mode {stat.S_IMODE(st.st_mode):04o} lets other "
            f"users read the client key; run `chmod 600 {path}`"
        )
