"""sd_notify datagrams, received on a real AF_UNIX datagram socket."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.ops.systemd import SdNotifier
from tests.virtual_time import VirtualClock


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    try:
        yield path, s
    finally:
        s.close()


def _recv(s: socket.socket) -> dict[str, str]:
    data = s.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


def test_ready_status_watchdog_stopping(listener: tuple[str, socket.socket]) -> None:
    path, s = listener
    n = SdNotifier.from_env({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("polling 3 buses")
    assert _recv(s) == {"READY": "1", "STATUS": "polling 3 buses"}
    n.watchdog()
    assert _recv(s) == {"WATCHDOG": "1"}
    n.status("spool 12 batches\nuplink down")
    assert _recv(s) == {"STATUS": "spool 12 batches uplink down"}
    n.reloading()
    got = _recv(s)
    assert got["RELOADING"] == "1" and int(got["MONOTONIC_USEC"]) > 0
    n.stopping()
    assert _recv(s) == {"STOPPING": "1"}
    assert n.sent == 5
    n.close()


def test_abstract_socket_name() -> None:
    name = f"vitals-test-{uuid.uuid4().hex}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(5)
    try:
        n = SdNotifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert _recv(s) == {"READY": "1"}
        n.close()
    finally:
        s.close()


def test_without_systemd_everything_is_a_no_op() -> None:
    n = SdNotifier.from_env({})
    assert not n.enabled
    assert not n.ready() and not n.watchdog() and not n.stopping()
    assert n.watchdog_s is None


def test_a_vanished_socket_is_counted_not_raised(tmp_path: Path) -> None:
    n = SdNotifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert not n.ready()
    assert n.errors == 1
    n.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({}, None),
    ],
)
def test_watchdog_period_from_env(env: dict[str, str], expected: float | None) -> None:
    assert SdNotifier.from_env(env).watchdog_s == expected


@pytest.mark.virtual_time
async def test_watchdog_task_pings_at_half_the_period_while_healthy(
    listener: tuple[str, socket.socket], virtual_clock: VirtualClock
) -> None:
    path, s = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    n = SdNotifier.from_env(env)
    healthy = True
    task = asyncio.create_task(n.run_watchdog(lambda: healthy))
    await asyncio.sleep(31)  # pings at 0, 15 and 30 s
    assert n.sent == 3
    assert [_recv(s) for _ in range(3)] == [{"WATCHDOG": "1"}] * 3
    healthy = False
    await asyncio.sleep(60)  # 45, 60, 75, 90: withheld while unhealthy
    assert n.sent == 3
    healthy = True
    await asyncio.sleep(15)  # 105: healthy again
    assert n.sent == 4 and _recv(s) == {"WATCHDOG": "1"}
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    n.close()


async def test_no_watchdog_configured_returns_at_once() -> None:
    n = SdNotifier.from_env({"NOTIFY_SOCKET": "/nonexistent"})
    await n.run_watchdog()
    assert n.sent == 0
    n.close()
