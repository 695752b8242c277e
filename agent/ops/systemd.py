"""systemd's notify protocol, without a dependency.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``: a datagram socket
(a path, or an abstract name written with a leading ``@``) to which the
service sends newline-separated ``KEY=value`` assignments (sd_notify(3)):
``READY=1`` once it serves, ``WATCHDOG=1`` at least every ``$WATCHDOG_USEC``
microseconds when ``WatchdogSec=`` is set, ``RELOADING=1`` (with
``MONOTONIC_USEC``) and ``READY=1`` around a reload, ``STOPPING=1`` when it
begins to stop, ``STATUS=...`` as free text shown by ``systemctl status``.

:meth:`SdNotifier.from_env` gives a notifier that does nothing when the agent
does not run under systemd, so callers never test for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

__all__ = ["SdNotifier"]

log = logging.getLogger(__name__)


class SdNotifier:
    """Sends notify datagrams to ``address`` (None: every call is a no-op)."""

    def __init__(self, address: str | None, *, watchdog_s: float | None = None) -> None:
        self.address = address
        self.watchdog_s = watchdog_s  # systemd's WatchdogSec, None if off
        self.sent = 0
        self.errors = 0
        self._sock: socket.socket | None = None
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SdNotifier:
        """From ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``."""
        env = os.environ if env is None else env
        watchdog_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog_s = int(usec) / 1e6
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog_s=watchdog_s)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines (keyword names upper-cased); False if not sent."""
        if self._sock is None or self.address is None:
            return False
        text = "\n".join(f"{k.upper()}={v}" for k, v in fields.items())
        addr = self.address
        target = "\0" + addr[1:] if addr.startswith("@") else addr
        try:
            self._sock.sendto(text.encode(), target)
        except OSError as exc:
            self.errors += 1
            log.debug("sd_notify to %s failed: %s", addr, exc)
            return False
        self.sent += 1
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify(ready=1, **({"status": status} if status else {}))

    def reloading(self) -> bool:
        return self.notify(
            reloading=1, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        )

    def stopping(self, status: str = "") -> bool:
        return self.notify(stopping=1, **({"status": status} if status else {}))

    def status(self, text: str) -> bool:
        return self.notify(status=text.replace("\n", " "))

    def watchdog(self) -> bool:
        return self.notify(watchdog=1)

    async def run_watchdog(self, healthy: Callable[[], bool] | None = None) -> None:
        """Ping at half the watchdog period while ``healthy()`` holds; forever.

        The pings come from the event loop itself, so a blocked loop stops them
        and systemd restarts the agent. Returns at once when there is no watchdog.
        """
        if self.watchdog_s is None or self._sock is None:
            return
        period = self.watchdog_s / 2
        while True:
            if healthy is None or healthy():
                self.watchdog()
            else:
                log.warning("health check failed: withholding the watchdog ping")
            await asyncio.sleep(period)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
