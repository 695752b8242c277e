"""The Prometheus scrape endpoint the gateway and the hub both serve (one copy).

A tiny HTTP/1.1 responder on the caller's event loop: ``GET /metrics`` (or
``/``; ``HEAD`` too) answers the text ``render`` makes at that scrape, anything
else ``404``; one request a connection, closed after the answer. A client that
sends nothing for 10 s is dropped. Here because ``agent/`` and ``hub/`` share
only ``protocols/`` and ``drivers/``, and protocols/ does no I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

__all__ = ["start_endpoint"]

log = logging.getLogger(__name__)

_PATHS = ("/metrics", "/")


async def start_endpoint(
    render: Callable[[], Awaitable[bytes]], host: str, port: int, *, content_type: str
) -> asyncio.Server:
    """Listen on ``host:port`` (``OSError`` if it cannot be bound) and answer each
    scrape with ``await render()``; serves until the server is closed."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readline()
                while (await reader.readline()).strip():  # the headers: not needed
                    pass
            parts = request.decode("latin-1").split()
            if len(parts) >= 2 and parts[0] in ("GET", "HEAD") and parts[1].split("?")[0] in _PATHS:
                body, status, ctype = await render(), "200 OK", content_type
            else:
                body, status, ctype = b"not found: GET /metrics\n", "404 Not Found", "text/plain"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + (body if parts[:1] != ["HEAD"] else b""))
            await writer.drain()
        except (TimeoutError, OSError, UnicodeError) as exc:
            log.debug("metrics request: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(answer, host, port)
    log.info("metrics on http://%s:%d/metrics", host, server.sockets[0].getsockname()[1])
    return server
