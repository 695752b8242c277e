"""``HOST:PORT`` as written on a command line or in a configuration file (sans-IO).

The one parser of the project's addresses: a broker (``--broker``, ``vitals
provision``), a metrics listener (``[metrics] listen``). An IPv6 host is
written in brackets (``[::1]:9108``).
"""

from __future__ import annotations

from protocols.errors import LocalError

__all__ = ["host_port"]


def host_port(text: str, *, default_host: str | None = None) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT``; :class:`LocalError` saying what is wrong.

    An empty host (``:1883``) is ``default_host`` when one is given, else refused.
    """
    text = text.strip()
    host, colon, port_text = text.rpartition(":")
    if not colon:
        raise LocalError(f"{text!r} is not HOST:PORT")
    if not (port_text.isascii() and port_text.isdigit()):
        raise LocalError(f"{text!r}: the port {port_text!r} is not a number")
    port = int(port_text)
    if not 0 < port < 65536:
        raise LocalError(f"{text!r}: the port {port} is outside 1..65535")
    host = host.removeprefix("[").removesuffix("]")
    if not host and default_host is not None:
        host = default_host
    if not host or any(c.isspace() for c in host):
        raise LocalError(f"{text!r} is not HOST:PORT")
    return host, port
