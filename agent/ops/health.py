"""``vitals health``: is this gateway working? Exit 0 healthy, 1 degraded, 2 failed.

The verdict is read from what the running agent already publishes, its status
file (:mod:`agent.ops.status`), so it needs no connection to the agent and works for
any user of the ``vitals`` group. It is what an OS updater (RAUC, Mender,
SWUpdate) asks before it marks a new system good (docs/updates.md).

=========  ==================================================================
failed     the agent is not running (no status file, stopped, gone, hung);
           or devices are configured and not one of them answers; or a
           device was never polled
degraded   running, but a device is degraded or offline (with its reason),
           the uplink is down (batches wait in the spool), or the disk is full
healthy    running, every device online, the uplink connected
=========  ==================================================================

With ``--require-uplink`` an uplink that is not connected is a failure: after an
OS update, a system that cannot reach the broker (a CA bundle gone, a broken
modem driver) should not be marked good. ``--wait S`` checks again every second
until the gateway is healthy or S seconds have passed (a new system's agent
needs a few polls before every device has answered), then gives the last verdict.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.ops.status import StatusUnavailable, _state_dir_of, default_status_paths, read_status

__all__ = ["DEGRADED", "FAILED", "HEALTHY", "LEVELS", "Check", "assess", "main", "verdict"]

HEALTHY, DEGRADED, FAILED = 0, 1, 2
LEVELS = ("healthy", "degraded", "failed")


@dataclass(frozen=True, slots=True)
class Check:
    """One finding: what (``agent``, ``uplink``, ``spool``, ``device NAME``), how bad, why."""

    name: str
    level: int
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "level": LEVELS[self.level], "detail": self.detail}


def _devices(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(bus, device, its status) of every polled device in a status document."""
    out = []
    for bus, b in (doc.get("buses") or {}).items():
        if not isinstance(b, dict):
            continue
        for name, d in (b.get("devices") or {}).items():
            if isinstance(d, dict):
                out.append((str(bus), str(name), d))
    return out


def assess(doc: dict[str, Any], why: str = "", *, require_uplink: bool = False) -> list[Check]:
    """The checks of a status document (:func:`agent.ops.status.read_status`'s ``doc``,
    ``why`` its reason for not being current, ``""`` when the agent runs)."""
    if why:
        return [Check("agent", FAILED, f"not running: {why}")]
    checks = [Check("agent", HEALTHY, f"running, pid {doc.get('pid')}")]
    devices = _devices(doc)
    answering = 0
    for bus, name, d in devices:
        state = str(d.get("state", "unknown"))
        reason = str(d.get("last_error") or "")
        label = f"device {name}"
        if state == "online":
            answering += 1
            checks.append(Check(label, HEALTHY, f"online on {bus}"))
        elif state == "degraded":
            answering += 1
            checks.append(
                Check(label, DEGRADED, f"degraded on {bus}: {reason or 'some polls fail'}")
            )
        elif state == "offline":
            checks.append(
                Check(label, DEGRADED, f"offline on {bus}: {reason or 'no reason given'}")
            )
        else:
            checks.append(Check(label, FAILED, f"not polled yet on {bus}"))
    if devices and not answering:
        checks.append(Check("devices", FAILED, f"none of the {len(devices)} devices answers"))
    up = doc.get("uplink") or {}
    spool = doc.get("spool") or {}
    waiting = int(spool.get("depth_batches") or 0)
    if up.get("connected"):
        checks.append(Check("uplink", HEALTHY, "connected"))
    else:
        err = str(up.get("last_error") or "not connected yet")
        level = FAILED if require_uplink else DEGRADED
        checks.append(Check("uplink", level, f"down ({err}); {waiting} batches in the spool"))
    if spool.get("disk_full"):
        checks.append(Check("spool", DEGRADED, "disk full: the oldest batches make room"))
    return checks


def verdict(checks: list[Check]) -> int:
    """The worst level of ``checks``: the exit status."""
    return max((c.level for c in checks), default=FAILED)


def _read(paths: list[Path], require_uplink: bool) -> tuple[int, list[Check], str]:
    try:
        path, doc, why = read_status(paths)
    except StatusUnavailable as exc:
        return FAILED, [Check("agent", FAILED, f"{exc.message} (hint: {exc.hint})")], ""
    checks = assess(doc, why, require_uplink=require_uplink)
    return verdict(checks), checks, str(path)


def main(
    *,
    config: Path | None,
    state_dir: Path | None,
    status_file: Path | None,
    as_json: bool,
    wait_s: float = 0.0,
    require_uplink: bool = False,
) -> int:
    """``vitals health``: print the checks (or one JSON object); return the exit status."""
    try:
        paths = (
            [status_file]
            if status_file
            else default_status_paths(state_dir or _state_dir_of(config))
        )
    except StatusUnavailable as exc:
        code, checks, where = (
            FAILED,
            [Check("agent", FAILED, f"{exc.message} (hint: {exc.hint})")],
            "",
        )
    else:
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            code, checks, where = _read(paths, require_uplink)
            if code == HEALTHY or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
    if as_json:
        doc = {
            "health": LEVELS[code],
            "exit": code,
            "status_file": where,
            "checks": [c.to_dict() for c in checks],
        }
        print(json.dumps(doc))
        return code
    print(LEVELS[code])
    for c in checks:
        print(f"  {LEVELS[c.level]:<8}  {c.name}: {c.detail}")
    return code
