"""The running agent's status file, and ``vitals status`` that reads it.

:class:`StatusWriter` runs as one task of the agent and replaces
``status.json`` atomically (write a temporary file beside it, ``os.replace``)
every ``interval_s`` seconds: uptime, each bus and device with its state and
last error, spool depth and the age of its oldest batch, the last batch the
broker acknowledged, counters. It goes to ``$RUNTIME_DIRECTORY`` (systemd's
``RuntimeDirectory=vitals``: ``/run/vitals``, a tmpfs, so a status written
every few seconds does not wear the SD card) or else to the state directory.
It holds no secrets (mode 0640 whatever the umask), so ``vitals status`` works for any user in
the ``vitals`` group.

:func:`read_status` and :func:`show` are the reader: a status older
than three intervals, or written by a process that is gone, means the agent
is not running (or is hung), and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeAlias

from protocols.errors import LocalError

__all__ = [
    "STATUS_FILE",
    "RunState",
    "StatusWriter",
    "build_status",
    "default_status_paths",
    "read_status",
    "show",
    "spool_oldest_age_s",
    "write_status",
]

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
FORMAT = 1
#: the document's ``state``: written by the agent ``running`` or ``stopped``; a reader
#: that finds it stale says ``stopped`` (the agent is gone) or ``hung``
RunState: TypeAlias = Literal["running", "stopped", "hung"]


def default_status_paths(state_dir: Path | None = None) -> list[Path]:
    """Where the status file may be, in the order the reader looks."""
    out: list[Path] = []
    rt = os.environ.get("RUNTIME_DIRECTORY")
    if rt:
        out.append(Path(rt.split(":")[0]) / STATUS_FILE)
    out.append(Path("/run/vitals") / STATUS_FILE)
    if state_dir is not None:
        out.append(state_dir / STATUS_FILE)
    out.append(Path(os.environ.get("VITALS_STATE_DIR", "/var/lib/vitals")) / STATUS_FILE)
    seen: list[Path] = []
    for p in out:
        if p not in seen:
            seen.append(p)
    return seen


def spool_oldest_age_s(db: Path, now: float | None = None) -> float | None:
    """Age of the oldest batch in the spool database (read only), None if empty."""
    if not db.exists():
        return None
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
        try:
            row = con.execute("SELECT MIN(created) FROM batches").fetchone()
        finally:
            con.close()
    except sqlite3.Error as exc:
        log.debug("spool %s: %s", db, exc)
        return None
    if not row or row[0] is None:
        return None
    return max(0.0, (now or time.time()) - float(row[0]))


def build_status(
    agent: Any, *, state: RunState = "running", interval_s: float = 5.0
) -> dict[str, Any]:
    """The status document of ``agent`` (an :class:`agent.service.Agent`)."""
    stats: dict[str, Any] = dict(agent.statistics())
    cfg = agent.config
    spool = dict(stats.get("spool") or {})
    # a spool opened on a full disk keeps its WAL index in memory: no other connection
    # can read it (it would wait for its lock)
    exclusive = getattr(getattr(agent, "spool", None), "exclusive", False)
    spool["oldest_age_s"] = (
        None if exclusive else spool_oldest_age_s(cfg.gateway.state_dir / "spool.sqlite3")
    )
    stats["spool"] = spool
    return {
        "format": FORMAT,
        "state": state,
        "written_at": round(time.time(), 3),
        "interval_s": interval_s,
        "pid": os.getpid(),
        "config": str(cfg.source),
        **stats,
    }


def write_status(path: Path, doc: dict[str, Any]) -> None:
    """Replace ``path`` atomically with ``doc`` as JSON (readers never see half).

    On a full disk (no block for the new file) the document is written over the
    old one in place, padded with spaces to the old length, so it needs no new
    block while it is no longer; a reader may then, rarely, catch it half written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # compact: 1.7 ms instead of 8 for a 500-bus status, and a smaller peak every write
    data = json.dumps(doc, ensure_ascii=False, default=str, separators=(",", ":")).encode()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.fchmod(fd, 0o640)  # the vitals group reads it whatever the umask (unit: 0077)
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        finally:
            os.close(fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _write_in_place(path, data)
        return
    os.replace(tmp, path)


def _write_in_place(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        old = os.fstat(fd).st_size
        if len(data) > old:  # may need a block: try, and keep the old document if not there
            os.posix_fallocate(fd, 0, len(data))
        os.pwrite(fd, data.ljust(old, b" "), 0)
    finally:
        os.close(fd)


class StatusWriter:
    """``StatusWriter(agent, path).run()``: one task of the agent's TaskGroup."""

    def __init__(
        self,
        agent: Any,
        path: Path | None = None,
        *,
        interval_s: float = 5.0,
        on_write: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.agent = agent
        if path is None:
            rt = os.environ.get("RUNTIME_DIRECTORY")
            base = Path(rt.split(":")[0]) if rt else agent.config.gateway.state_dir
            path = base / STATUS_FILE
        self.path = path
        self.interval_s = interval_s
        self.on_write = on_write  # e.g. SdNotifier.status with a one-line summary
        self.writes = 0
        self.errors = 0
        # one WARNING line when writing starts failing, one INFO line when it works again
        self._failing = False

    async def write_once(self, state: RunState = "running") -> None:
        doc = await asyncio.to_thread(
            build_status, self.agent, state=state, interval_s=self.interval_s
        )
        try:
            await asyncio.to_thread(write_status, self.path, doc)
        except OSError as exc:
            self.errors += 1
            if not self._failing:
                self._failing = True
                log.warning(
                    "status file %s cannot be written (%s); `vitals status` shows an old "
                    "status until it can (retrying every %.0f s)",
                    self.path,
                    exc.strerror or exc,
                    self.interval_s,
                )
            return
        if self._failing:
            self._failing = False
            log.info("status file %s written again", self.path)
        self.writes += 1
        if self.on_write is not None:
            self.on_write(doc)

    async def run(self) -> None:
        """Write every ``interval_s`` until cancelled; then a last 'stopped' status."""
        try:
            while True:
                await self.write_once()
                await asyncio.sleep(self.interval_s)
        finally:
            with contextlib.suppress(Exception):
                doc = build_status(self.agent, state="stopped", interval_s=self.interval_s)
                write_status(self.path, doc)


def summary(doc: dict[str, Any]) -> str:
    """One line for ``systemctl status`` (sd_notify STATUS=)."""
    buses = doc.get("buses") or {}
    devs = [d for b in buses.values() for d in (b.get("devices") or {}).values()]
    online = sum(1 for d in devs if d.get("state") == "online")
    spool = doc.get("spool") or {}
    up = "up" if (doc.get("uplink") or {}).get("connected") else "down"
    return f"{online}/{len(devs)} devices online, spool {spool.get('depth_batches', 0)} batches, uplink {up}"


# --------------------------------------------------------------------------- reader


class StatusUnavailable(LocalError):
    """No status document could be read: none written yet, unreadable, or not one."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def _load(path: Path, tries: int = 3) -> Any:
    """The status document; read again (50 ms apart) while it is not whole JSON: on a
    full disk the agent rewrites it in place (:func:`_write_in_place`), so a read can
    meet it half-written."""
    for _ in range(tries - 1):
        try:
            return json.loads(path.read_text())
        except ValueError:
            time.sleep(0.05)
    return json.loads(path.read_text())


def read_status(paths: list[Path], now: float | None = None) -> tuple[Path, dict[str, Any], str]:
    """The first status file found: ``(path, document, freshness)`` where freshness
    is ``""`` when the agent is alive, else why the status is not current. A status
    that is not current says so itself: ``state`` is ``stopped`` (or ``hung``) and the
    uplink is not claimed connected."""
    now = time.time() if now is None else now
    for p in paths:
        try:
            doc = _load(p)
        except FileNotFoundError:
            continue
        except PermissionError:
            raise StatusUnavailable(
                f"{p}: permission denied", "run as the vitals user or add yourself to its group"
            ) from None
        except IsADirectoryError:
            raise StatusUnavailable(
                f"{p}: a directory, not a status file", f"pass {p / STATUS_FILE}"
            ) from None
        except OSError as exc:
            raise StatusUnavailable(
                f"{p}: cannot be read ({exc.strerror or exc})", "is the disk failing?"
            ) from None
        except ValueError:
            raise StatusUnavailable(
                f"{p}: not a status document (not JSON)",
                "the agent rewrites it every few seconds: try again; else pass --status-file FILE",
            ) from None
        if not isinstance(doc, dict):
            raise StatusUnavailable(f"{p}: not a status document", "pass --status-file FILE")
        age = now - float(doc.get("written_at", 0))
        interval = float(doc.get("interval_s", 5.0))
        why, state = "", doc.get("state", "running")
        if doc.get("state") == "stopped":
            why, state = "the agent stopped", "stopped"
        elif not _alive(int(doc.get("pid", 0))):
            why, state = f"the agent (pid {doc.get('pid')}) is gone", "stopped"
        elif age > 3 * interval:
            why, state = f"the status is {age:.0f} s old: the agent is hung", "hung"
        if why:
            uplink = {**(doc.get("uplink") or {}), "connected": False}
            doc = {**doc, "state": state, "uplink": uplink, "age_s": round(age, 1)}
        return p, doc, why
    where = ", ".join(str(p) for p in paths)
    raise StatusUnavailable(
        f"no status file (looked at {where})",
        "is the agent running? 'systemctl status vitals'. If it runs with another "
        "configuration or state directory: vitals status --config FILE (or --state-dir DIR)",
    )


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _age(s: float | None) -> str:
    if s is None:
        return "—"
    s = float(s)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def render(path: Path, doc: dict[str, Any], why: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    con = Console(highlight=False)
    head = "[green]running[/]" if not why else f"[red]{doc.get('state', 'stopped')}[/]: {why}"
    con.print(
        f"gateway [bold]{doc.get('gateway', '?')}[/]  {head}  pid {doc.get('pid')}  "
        f"up {_age(doc.get('uptime_s'))}  epoch {doc.get('epoch')}  ({path})",
        soft_wrap=True,
    )
    up = doc.get("uplink") or {}
    last = up.get("last_acked")
    last_txt = f"epoch {last[0]} seq {last[1]}" if last else "—"
    if why:
        link = "[red]not connected[/] (the agent is not running)"
    else:
        link = "connected" if up.get("connected") else "[red]disconnected[/]"
    con.print(
        f"uplink  {link}  "
        f"acked {up.get('batches_acked', 0)} batches / {up.get('readings_acked', 0)} readings  "
        f"last acked {last_txt}"
        + (f"  last error: {escape(str(up['last_error']))}" if up.get("last_error") else ""),
        soft_wrap=True,
    )
    sp = doc.get("spool") or {}
    why_dropped = ", ".join(
        f"{sp[k]} {label}"
        for k, label in (
            ("dropped_disk_full", "disk full"),
            ("dropped_spool_full", "over max_bytes"),
            ("dropped_too_old", "too old"),
            ("lost_disk_full", "lost, disk full"),
        )
        if sp.get(k)
    )
    on_disk = (
        f", {sp['disk_bytes']} of {sp['max_bytes']} bytes on disk" if sp.get("max_bytes") else ""
    )
    con.print(
        f"spool   {sp.get('depth_batches', 0)} batches, {sp.get('depth_bytes', 0)} bytes"
        f"{on_disk}, oldest {_age(sp.get('oldest_age_s'))}, dropped {sp.get('dropped_batches', 0)}"
        + (f" ({why_dropped})" if why_dropped else "")
        + ("  [red]DISK FULL[/]: the oldest batches make room" if sp.get("disk_full") else ""),
        soft_wrap=True,
    )
    if up.get("confirm") == "receipt":
        con.print(
            f"hub     receipts on: sent {sp.get('sent', 0)}, confirmed {sp.get('confirmed', 0)}, "
            f"unconfirmed {sp.get('sent_unconfirmed', 0)} batches"
            f" (waiting longest {_age(sp.get('unconfirmed_oldest_s'))})"
            f", sent again {sp.get('republished', 0)}, split {sp.get('split', 0)}"
            + (
                f", [red]refused by the hub {sp['refused_by_hub']}[/] (see the log)"
                if sp.get("refused_by_hub")
                else ""
            )
            + (
                f", [red]{up['receipts_refused']} receipts refused[/] (not the hub's key)"
                if up.get("receipts_refused")
                else ""
            ),
            soft_wrap=True,
        )
    elif up.get("confirm") == "puback":
        con.print(
            "hub     [yellow]receipts off[/]: a batch leaves the spool on the broker's PUBACK; "
            "enroll with `vitals provision` to get hub receipts",
            soft_wrap=True,
        )
    title = "buses and devices"
    if why:
        title += f" at the last status, {_age(doc.get('age_s'))} ago"
    t = Table(title=title)
    for col in ("bus", "device", "state", "polls", "failed", "rtt ms", "last error"):
        t.add_column(col, justify="right" if col in ("polls", "failed", "rtt ms") else "left")
    colors = {"online": "green", "degraded": "yellow", "offline": "red"}
    for bus, b in (doc.get("buses") or {}).items():
        for name, d in (b.get("devices") or {}).items():
            st = str(d.get("state", "?"))
            t.add_row(
                bus,
                name,
                f"[{colors.get(st, 'white')}]{st}[/]",
                str(d.get("polls", 0)),
                str(d.get("polls_failed", 0)),
                str(d.get("rtt_ms", "")),
                escape(str(d.get("last_error", ""))),
            )
    con.print(t)
    counters = {
        f"bus {bus}": f"{b.get('state', 'online')}, "
        f"{b.get('transactions', 0)} transactions, {b.get('timeouts', 0)} timeouts, "
        f"{b.get('overruns', 0)} overruns, {b.get('link_downs', 0)} times down"
        + (f"; {escape(str(b['last_error']))}" if b.get("last_error") else "")
        for bus, b in (doc.get("buses") or {}).items()
    }
    batch = doc.get("batch") or {}
    if batch:
        counters["batches"] = (
            f"{batch.get('readings_in', 0)} readings in, {batch.get('batches_sealed', 0)} sealed"
        )
    for dev, fw in (doc.get("firmware") or {}).items():  # updates through the gateway
        if fw.get("state") == "done":
            verdict = "[green]updated[/]" if fw.get("ok") else "[red]failed[/]"
            counters[f"firmware {dev}"] = (
                f"{verdict} to {fw.get('image', '?')} (was {fw.get('version_before', '?')}, "
                f"now {fw.get('version_after', '?')}): {escape(str(fw.get('message', '')))}"
            )
        else:
            size, held = int(fw.get("size") or 0), int(fw.get("held") or 0)
            share = f" ({100 * held // size} %)" if size else ""
            counters[f"firmware {dev}"] = (
                f"{fw.get('state', '?')} {fw.get('image', '?')}: {held} of {size} bytes{share}"
            )
    for k, v in counters.items():
        con.print(f"{k}: {v}", soft_wrap=True)


def show(
    status_file: Path | None,
    state_dir: Path | None,
    as_json: bool,
    *,
    config: Path | None = None,
) -> int:
    """``vitals status``: print the running agent's state; the exit status (0 running).

    Without ``status_file`` it looks in ``/run/vitals``, then in the state directory:
    ``state_dir``, else the ``[gateway] state_dir`` of ``config`` (default
    ``/etc/vitals/gateway.toml`` when that file exists), else ``/var/lib/vitals``.
    """
    try:
        if status_file:
            paths = [status_file]
        else:
            paths = default_status_paths(state_dir or _state_dir_of(config))
        path, doc, why = read_status(paths)
    except StatusUnavailable as exc:
        if as_json:
            print(json.dumps({"running": False, "error": exc.message, "hint": exc.hint}))
        else:
            print(f"error: {exc.message}", file=sys.stderr)
            if exc.hint:
                print(f"hint: {exc.hint}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps({"running": not why, "why": why, "path": str(path), **doc}, default=str))
    else:
        render(path, doc, why)
    return 0 if not why else 1


def _state_dir_of(config: Path | None) -> Path | None:
    """The state directory a configuration names; None when the default file is absent
    or does not load (an explicit file that does not load is an error)."""
    from agent.ops.config import load_config
    from protocols.errors import ConfigError

    given = config is not None
    config = config or Path("/etc/vitals/gateway.toml")
    if not given and not config.exists():
        return None
    try:
        return load_config(config).gateway.state_dir
    except ConfigError as exc:
        if not given:  # the default file, mid-edit or unreadable: the default paths
            return None
        where, problem = exc.problems[0]
        raise StatusUnavailable(
            f"{where}: {problem}",
            f"'vitals config check {config}' lists every problem; or pass --state-dir DIR",
        ) from None
