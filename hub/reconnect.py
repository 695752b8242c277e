"""How every MQTT loop of the hub (worker, enrollment desk) rides out a broker outage.

Jittered, capped, doubling back-off between attempts; the outage logged once
at WARNING when it starts ("lost the broker" only if the loop had it, "cannot
reach" if it never connected) and once at INFO when the loop is back, with how
long it was down. Nothing in between: a broker down for an hour is two lines.
"""

from __future__ import annotations

import logging
import random
import time

__all__ = ["Outage"]


class Outage:
    def __init__(
        self,
        log: logging.Logger,
        what: str,
        host: str,
        port: int,
        *,
        first_s: float = 0.25,
        cap_s: float = 5.0,
    ) -> None:
        self.log, self.what, self.where = log, what, f"{host}:{port}"
        self.first_s, self.cap_s = first_s, cap_s
        self.had = False  # connected at least once
        self.since: float | None = None  # monotonic start of the current outage
        self.attempts = 0
        self.outages = 0  # how many times the loop lost the broker

    def up(self) -> None:
        """Connected (and subscribed): log the recovery if there was an outage."""
        if self.since is not None:
            self.log.info(
                "%s back on the broker %s after %.1f s",
                self.what,
                self.where,
                time.monotonic() - self.since,
            )
        elif not self.had:
            self.log.info("%s on the broker %s", self.what, self.where)
        self.had, self.since, self.attempts = True, None, 0

    def down(self, exc: BaseException) -> float:
        """A connection failed or was lost: log it if it starts an outage; the delay
        before the next attempt (seconds)."""
        if self.since is None:
            self.since = time.monotonic()
            if self.had:
                self.outages += 1
                self.log.warning(
                    "%s lost the broker %s: %s; reconnecting (back-off up to %g s)",
                    self.what,
                    self.where,
                    exc,
                    self.cap_s,
                )
            else:
                self.log.warning(
                    "%s cannot reach the broker %s: %s; retrying (back-off up to %g s)",
                    self.what,
                    self.where,
                    exc,
                    self.cap_s,
                )
        delay = min(self.cap_s, self.first_s * 2 ** min(self.attempts, 16))
        self.attempts += 1
        return random.uniform(delay / 2, delay)
