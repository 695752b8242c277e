"""MQTT brokers for the demo and the tests, always on a free loopback port.

:class:`MosquittoBroker` runs the ``mosquitto`` binary (Debian package) with a
generated configuration that listens on 127.0.0.1 only; :class:`EmbeddedBroker`
runs amqtt inside the current event loop so the demo needs nothing installed.
Both are async context managers exposing ``host`` and ``port``; both can be
stopped and started again on the same port (outage tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

__all__ = [
    "Broker",
    "EmbeddedBroker",
    "MosquittoBroker",
    "free_port",
    "make_broker",
    "mosquitto_path",
]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def mosquitto_path() -> str | None:
    for cand in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if cand and Path(cand).exists():
            return cand
    return None


async def _wait_listening(port: int, within: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            _, w = await asyncio.open_connection(HOST, port)
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()
            return
        except OSError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)


class Broker(Protocol):
    host: str
    port: int
    kind: str
    shared_subscriptions: bool

    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class _Base:
    host = HOST
    kind = ""
    shared_subscriptions = False

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Any:
        await self.start()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class MosquittoBroker(_Base):
    """A private Mosquitto on a free loopback port, no persistence, anonymous."""

    kind = "mosquitto"
    shared_subscriptions = True

    def __init__(self, port: int | None = None, *, extra_config: str = "") -> None:
        super().__init__(port)
        exe = mosquitto_path()
        if exe is None:
            raise FileNotFoundError(
                "mosquitto is not installed (Debian: apt-get install mosquitto)"
            )
        self._exe = exe
        self._dir = Path(tempfile.mkdtemp(prefix="vitals-mosquitto-"))
        self._extra = extra_config
        self._proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)  # again after a stop
        conf = self._dir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} {HOST}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "max_inflight_messages 0\n"
            "max_queued_messages 100000\n"
            "log_dest stderr\n"
            "log_type error\n"
            "log_type warning\n" + self._extra
        )
        log_file = (self._dir / "mosquitto.log").open("ab")
        # a fork and exec, no waiting: harmless on the event loop
        self._proc = subprocess.Popen(  # noqa: ASYNC220
            [self._exe, "-c", str(conf)], stdout=log_file, stderr=log_file
        )
        log_file.close()
        try:
            await _wait_listening(self.port, 10.0)
        except OSError as exc:
            await self.stop()
            log_text = (self._dir / "mosquitto.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"mosquitto did not start on {HOST}:{self.port}: {log_text}"
            ) from exc

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)
        shutil.rmtree(self._dir, ignore_errors=True)  # its config and log


class EmbeddedBroker(_Base):
    """amqtt running in this event loop (demo only: no shared subscriptions)."""

    kind = "embedded"

    def __init__(self, port: int | None = None) -> None:
        super().__init__(port)
        self._broker: Any = None

    async def start(self) -> None:
        from amqtt.broker import Broker as AmqttBroker  # the demo extra

        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{HOST}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        self._broker = AmqttBroker(config)
        await self._broker.start()
        await _wait_listening(self.port, 10.0)

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            with contextlib.suppress(Exception):
                await broker.shutdown()


def make_broker(kind: str = "auto", port: int | None = None) -> MosquittoBroker | EmbeddedBroker:
    """``mosquitto``, ``embedded``, or ``auto`` (Mosquitto when installed)."""
    if kind == "mosquitto" or (kind == "auto" and mosquitto_path()):
        return MosquittoBroker(port)
    return EmbeddedBroker(port)
