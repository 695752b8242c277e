"""The running agent's frames, for ``vitals diag trace --bus NAME``.

A Unix socket next to the status file (``$RUNTIME_DIRECTORY/trace.sock``, or
the state directory's), mode 0660: the service's user and group only (the
runtime directory itself is 0750). A client sends one JSON line,
``{"bus": "NAME"}``; the agent answers one line (``{"ok": true, ...}`` with the
link's timing, or ``{"ok": false, "error": ...}``), then streams every frame
its link sends and receives on that bus, one line each:
``{"t": <monotonic s>, "dir": "tx" | "rx", "hex": "..."}``. The answer says how
to cut them: ``"framing": "rtu"`` (serial, RTU over TCP) or ``"mbap"`` (Modbus
TCP: the link's requests and the bytes it reads, MBAP headers included). Polling
goes on as ever: the trace hook only copies bytes. One client per bus at a time; a
client that does not keep up (more than 1 MiB unread) is dropped. With no
client the link's hook is None: nothing is done per frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.fieldbus.links import ModbusLink

__all__ = ["TRACE_SOCKET", "serve_tap", "tap_socket_path"]

log = logging.getLogger(__name__)

TRACE_SOCKET = "trace.sock"
_MAX_UNREAD = 1 << 20


def tap_socket_path(state_dir: Path) -> Path:
    """Where the agent listens: beside its status file (agent/ops/status.py)."""
    rt = os.environ.get("RUNTIME_DIRECTORY")
    return (Path(rt.split(":")[0]) if rt else state_dir) / TRACE_SOCKET


async def serve_tap(links: Mapping[str, ModbusLink], path: Path) -> None:
    """Serve trace clients on ``path`` until cancelled (a task of the agent)."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link: ModbusLink | None = None
        try:
            async with asyncio.timeout(10):
                line = await reader.readline()
            try:
                name = json.loads(line)["bus"]
            except (ValueError, KeyError, TypeError):
                name = None
            link = links.get(name) if isinstance(name, str) else None
            if link is None:
                error = f"no Modbus bus named {name!r} in the running agent"
                _send(writer, {"ok": False, "error": error, "buses": sorted(links)})
                return
            if link.trace is not None:
                _send(writer, {"ok": False, "error": f"bus {name} is traced by another client"})
                link = None
                return
            _send(
                writer,
                {
                    "ok": True,
                    "bus": name,
                    "link": link.describe,
                    "timeout_s": link.timeout_s,
                    "inter_frame_s": link.inter_frame_s,
                    "char_s": getattr(link, "_char", 0.0),
                    # RTU links have a late window; a Modbus TCP link's frames carry MBAP
                    "framing": "rtu" if hasattr(link, "late_cap_s") else "mbap",
                    "t": time.monotonic(),
                },
            )
            transport = writer.transport

            def hook(direction: str, data: bytes) -> None:
                if transport.is_closing() or transport.get_write_buffer_size() > _MAX_UNREAD:
                    transport.abort()
                    return
                msg = {"t": time.monotonic(), "dir": direction, "hex": data.hex()}
                transport.write(json.dumps(msg).encode() + b"\n")

            link.trace = hook
            log.info("trace of bus %s: a client listens", name)
            await reader.read()  # until the client goes
        except (TimeoutError, OSError) as exc:
            log.debug("trace client: %s", exc)
        finally:
            if link is not None:
                link.trace = None
                log.info("trace of bus %s: the client left", name)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    _remove(path)  # left by an agent that was killed
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o660)  # the service's user and group only, before anyone connects
        server = await asyncio.start_unix_server(client, sock=sock)
    except OSError as exc:
        sock.close()
        log.warning(
            "trace socket %s: %s; 'vitals diag trace --bus' cannot tap this agent",
            path,
            exc.strerror or exc,
        )
        return
    try:
        async with server:
            await server.serve_forever()
    finally:
        _remove(path)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _send(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(json.dumps(obj).encode() + b"\n")
