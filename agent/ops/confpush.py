"""Configuration pushed by the hub: check, stage, apply on trial, keep or roll back.

A push (:mod:`protocols.confpush`) arrives on ``{prefix}/{gw}/config``. The
gateway refuses it, in order, when it is

1. malformed, or over :data:`protocols.confpush.MAX_CONFIG_BYTES` (counted, not answered);
2. ``no_hub_key`` / ``unknown_key`` / ``bad_signature``: not signed by the hub key
   learnt at enrollment; ``misaddressed``: for another gateway (these four are
   answered at most once a second, not retained: they may come from anyone);
3. ``replayed``: its version is not above every version this gateway has seen
   (a retained copy of the last one it took is ignored silently);
4. ``not_supported``: the agent runs in-process (demo, fleet) and cannot reload;
   ``busy``: another pushed configuration is on trial (neither uses the version up);
5. ``invalid``: it does not pass ``vitals config check`` (the problems are the reason);
6. ``identity``: it changes the gateway id, the state directory (the key lives
   there) or the TLS certificate and key.

Otherwise it is kept in ``state_dir/config/v{N}.toml``, made the active version,
and the agent reloads on it (the SIGHUP path: seal, spool, drain, start again).
The new agent has ``trial`` seconds to show it works: every enabled device
polled at least once (answering, or offline with its reason), every device that
was online before the push online again, and the uplink connected if ``[uplink]``
changed (else connected or spooling). Then the version is kept (``applied``);
otherwise, or if the agent cannot even start on it, or if the process dies during
the trial, the previous version comes back by itself (``rolled_back``). Every
outcome is a report signed with the gateway key, retained on
``{prefix}/{gw}/config/status`` (``vitals hub config status GW``).

The last :data:`KEEP` versions stay in ``state_dir/config``: ``vitals config
history`` lists them, ``vitals config rollback`` goes back to one (or to the local
file) by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.mqtt import Message, MqttClient, MqttError
from agent.ops.config import Config, load_config
from protocols import confpush, topics
from protocols.ed25519 import PrivateKey
from protocols.envelope import key_id
from protocols.errors import ConfigError, ProtocolError, SignatureError

__all__ = ["KEEP", "ConfigReceiver", "ConfigStore", "judge"]

log = logging.getLogger(__name__)

KEEP = 5
STATE_FILE = "state.json"
REPORT_FILE = "report.bin"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if os.geteuid() == 0:  # `sudo vitals config rollback`: the agent's user must read it
            st = os.stat(path.parent)
            os.fchown(fd, st.st_uid, st.st_gid)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class ConfigStore:
    """``state_dir/config``: the kept versions, which one is active, the trial, the
    history and the last signed report. Every change is written durably before it
    is acted on."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.state: dict[str, Any] = self._load()

    @classmethod
    def of(cls, state_dir: Path) -> ConfigStore:
        return cls(state_dir / "config")

    def _load(self) -> dict[str, Any]:
        fresh: dict[str, Any] = {"active": 0, "highest": 0, "trial": None, "history": []}
        try:
            doc = json.loads((self.dir / STATE_FILE).read_text())
        except FileNotFoundError:
            return fresh
        except (OSError, ValueError) as exc:
            log.error(
                "%s unreadable (%s): running the local configuration file",
                self.dir / STATE_FILE,
                exc,
            )
            return fresh
        return {**fresh, **doc} if isinstance(doc, dict) else fresh

    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_atomic(self.dir / STATE_FILE, json.dumps(self.state, indent=1).encode())

    # -- what runs ----------------------------------------------------------------

    @property
    def active(self) -> int:
        return int(self.state.get("active") or 0)

    @property
    def highest(self) -> int:
        return int(self.state.get("highest") or 0)

    @property
    def trial(self) -> dict[str, Any] | None:
        t = self.state.get("trial")
        return t if isinstance(t, dict) else None

    def path_of(self, version: int) -> Path:
        return self.dir / f"v{version}.toml"

    def kept(self) -> list[int]:
        return sorted(int(p.stem[1:]) for p in self.dir.glob("v*.toml") if p.stem[1:].isdigit())

    def effective(self, local: Path) -> Path:
        """The file the agent runs: the active pushed version, else ``local`` (read
        again from disk: the agent changes it)."""
        self.state = self._load()
        if self.active and self.path_of(self.active).is_file():
            return self.path_of(self.active)
        return local

    # -- changes --------------------------------------------------------------------

    def _record(self, version: int, status: str, reason: str = "", **extra: Any) -> None:
        hist: list[dict[str, Any]] = self.state.setdefault("history", [])
        for h in reversed(hist):
            if h.get("version") == version and h.get("status") == "trying":
                h.update(status=status, reason=reason, at=round(time.time(), 3), **extra)
                break
        else:
            hist.append(
                {
                    "version": version,
                    "status": status,
                    "reason": reason,
                    "at": round(time.time(), 3),
                }
                | extra
            )
        del hist[: max(0, len(hist) - 50)]

    def saw(self, version: int) -> None:
        self.state["highest"] = max(self.highest, version)

    def refuse(self, version: int, reason: str, *, consume: bool = True) -> None:
        if consume:
            self.saw(version)
        self._record(version, "refused", reason)
        self._save()

    def begin_trial(self, version: int, text: str, trial: dict[str, Any]) -> None:
        """Keep ``text`` as version ``version``, make it active, on trial."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_atomic(self.path_of(version), text.encode())
        self.saw(version)
        self.state["trial"] = {**trial, "version": version, "previous": self.active}
        self.state["active"] = version
        self._record(version, "trying", sha=trial.get("sha", ""))
        self._save()

    def commit(self) -> int:
        t = self.trial
        assert t is not None
        self.state["trial"] = None
        self._record(int(t["version"]), "applied")
        self._save()
        self._prune()
        return int(t["version"])

    def rollback(self, reason: str) -> tuple[int, int]:
        """End the trial: the previous version is active again. ``(tried, now active)``."""
        t = self.trial
        assert t is not None
        self.state["trial"] = None
        self.state["active"] = int(t.get("previous") or 0)
        self.state["unreported"] = {"version": int(t["version"]), "reason": reason}
        self._record(int(t["version"]), "rolled_back", reason)
        self._save()
        return int(t["version"]), self.active

    def set_active(self, version: int, why: str) -> None:
        """By hand (``vitals config rollback``): run ``version`` (0: the local file)."""
        if version and not self.path_of(version).is_file():
            raise FileNotFoundError(self.path_of(version))
        self.state["trial"] = None
        self.state["active"] = version
        self._record(version, "activated", why)
        self._save()

    def recover(self) -> str:
        """At process start: a trial still pending means the process running it died
        (a crash, a kill, a power cut): roll back. The reason, or ``""``."""
        if self.trial is None:
            return ""
        tried, now = self.rollback("the gateway restarted during the trial")
        return f"configuration version {tried} was on trial when the agent stopped: back to {_name(now)}"

    def _prune(self) -> None:
        keep = set(self.kept()[-KEEP:]) | {self.active}
        for v in self.kept():
            if v not in keep:
                self.path_of(v).unlink(missing_ok=True)

    # -- the last signed report -------------------------------------------------------

    def save_report(self, data: bytes) -> None:
        """The report to publish (retained) on each connection; a roll-back it tells of
        is no longer unreported."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_atomic(self.dir / REPORT_FILE, data)
        if self.state.pop("unreported", None) is not None:
            self._save()

    def report(self) -> bytes | None:
        try:
            return (self.dir / REPORT_FILE).read_bytes()
        except FileNotFoundError:
            return None


def _name(version: int) -> str:
    return f"version {version}" if version else "the local configuration file"


def _devices(stats: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (str(name), d)
        for b in (stats.get("buses") or {}).values()
        for name, d in ((b or {}).get("devices") or {}).items()
        if isinstance(d, dict)
    ]


def judge(stats: dict[str, Any], trial: dict[str, Any], seen: set[str]) -> tuple[bool | None, str]:
    """The trial's verdict on the agent's statistics: ``(True, "")`` passed, ``(False,
    why)`` failed, ``(None, what is awaited)`` not yet. ``seen`` collects the devices
    seen online during the trial (give the same set on each call)."""
    before = set(trial.get("online") or ())
    waiting = []
    for name, d in _devices(stats):
        state = str(d.get("state", "unknown"))
        if state == "online":
            seen.add(name)
        if name in before and name not in seen:
            if state == "offline":
                why = d.get("last_error") or "no answer"
                return False, f"{name} was online before the push and is offline on it: {why}"
            waiting.append(f"{name} online again")
        elif state == "unknown":
            waiting.append(f"{name} polled")
    if trial.get("uplink_changed") and not (stats.get("uplink") or {}).get("connected"):
        waiting.append("the uplink connected on the new [uplink]")
    return (None, ", ".join(waiting)) if waiting else (True, "")


class ConfigReceiver:
    """The agent's side: pushes in (through the uplink's connection), the trial, reports out."""

    def __init__(
        self,
        *,
        gateway: str,
        hub_key: bytes | None,
        key: PrivateKey,
        store: ConfigStore,
        config: Config,
        stats: Callable[[], dict[str, Any]],
        reload: Callable[[], None] | None,
        prefix: str = topics.DEFAULT_PREFIX,
        clock: Callable[[], float] = time.time,
        poll_s: float = 0.25,
    ) -> None:
        self.gateway = gateway
        self.hub_key = hub_key
        self._key = key
        self.store = store
        self.config = config
        self._stats = stats
        self._reload = reload
        self.prefix = prefix
        self.clock = clock
        self.poll_s = poll_s
        self.topic = topics.config(gateway, prefix)
        self.counters: Counter[str] = Counter()
        self._client: MqttClient | None = None
        self._next_answer = -float("inf")
        self._lock = asyncio.Lock()  # one change of the store at a time (they run in threads)

    def statistics(self) -> dict[str, Any]:
        t = self.store.trial
        return {
            "running": self.store.active,
            "trial": None if t is None else int(t["version"]),
            **self.counters,
        }

    # -- MQTT ---------------------------------------------------------------------

    async def attach(self, client: MqttClient) -> None:
        """On each connection: subscribe to pushes, publish the last report (retained)."""
        self._client = client
        await client.subscribe(self.topic, qos=1)
        gone = self.store.state.get("unreported")
        if gone:  # rolled back by the supervisor (the agent failed, or the process died)
            report = self._report(int(gone["version"]), "rolled_back", str(gone["reason"]))
            await asyncio.to_thread(self.store.save_report, report)
        data = self.store.report()
        if data is not None:
            self._publish(data, retain=True)

    def _publish(self, data: bytes, *, retain: bool) -> None:
        client = self._client
        if client is None or not client.connected:
            return  # the next connection publishes the stored report
        try:
            done = client.publish_nowait(
                topics.config_status(self.gateway, self.prefix), data, qos=1, retain=retain
            )
        except MqttError:
            return
        done.add_done_callback(lambda f: None if f.cancelled() else f.exception())

    async def on_message(self, client: MqttClient, msg: Message) -> bool:
        """Handle ``msg`` if it is a push for us; whether it was one."""
        if msg.topic != self.topic:
            return False
        self._client = client
        online = [name for name, d in _devices(self._stats()) if d.get("state") == "online"]
        async with self._lock:
            answer, retain, reload = await asyncio.to_thread(
                self.handle, msg.payload, msg.retain, online
            )
        if answer is not None:
            self._publish(answer, retain=retain)
        if reload and self._reload is not None:
            self._reload()
        return True

    # -- a push -------------------------------------------------------------------------

    def _report(
        self, version: int, status: confpush.ReportStatus, reason: str = "", details: object = None
    ) -> bytes:
        self.counters[f"{status}.{reason.split(':')[0]}" if status == "refused" else status] += 1
        return confpush.report(
            gateway=self.gateway,
            key=self._key,
            version=version,
            status=status,
            reason=reason,
            running=self.store.active,
            now_ms=int(self.clock() * 1000),
            details=details,
        )

    def _refuse_unverified(self, version: int, reason: str) -> tuple[bytes | None, bool, bool]:
        now = time.monotonic()
        if now < self._next_answer:
            self.counters[f"refused.{reason}"] += 1
            return None, False, False
        self._next_answer = now + 1.0
        log.warning("configuration push refused: %s", reason)
        return self._report(version, "refused", reason), False, False

    def _refuse(
        self, version: int, reason: str, *, consume: bool = True
    ) -> tuple[bytes | None, bool, bool]:
        """Refused for good (``consume``: the version is used up), or for now (busy)."""
        log.warning("configuration version %d refused: %s", version, reason)
        self.store.refuse(version, reason, consume=consume)
        data = self._report(version, "refused", reason)
        self.store.save_report(data)
        return data, True, False

    def handle(
        self, data: bytes, retained: bool = False, online: list[str] | None = None
    ) -> tuple[bytes | None, bool, bool]:
        """``(report or None, retain it, reload now)`` for the push ``data`` (blocking:
        file writes with fsync; the uplink calls it in a thread); ``online``: the devices
        online now, which must be online again on the new version."""
        try:
            p = confpush.parse_push(data)
        except ProtocolError:
            self.counters["refused.malformed"] += 1
            return None, False, False
        if self.hub_key is None:
            return self._refuse_unverified(p.v, "no_hub_key")
        if p.kid != key_id(self.hub_key):
            return self._refuse_unverified(p.v, "unknown_key")
        try:
            p.verify(self.hub_key)
        except SignatureError:
            return self._refuse_unverified(p.v, "bad_signature")
        if p.gw != self.gateway:
            return self._refuse_unverified(p.v, "misaddressed")
        store = self.store
        if p.v <= store.highest:
            if retained and p.v == store.highest:
                return None, False, False  # the retained copy of the last one taken
            return self._refuse(p.v, f"replayed: version {p.v} is not above {store.highest}")
        if self._reload is None:  # an agent run in-process (demo, fleet): cannot reload
            return self._refuse(p.v, "not_supported: this agent cannot reload", consume=False)
        if store.trial is not None:
            # not used up: its retained copy comes again on a later connection
            return self._refuse(
                p.v, f"busy: version {store.trial['version']} is on trial", consume=False
            )
        try:
            text = p.text()
        except ProtocolError as exc:
            return self._refuse(p.v, f"invalid: {exc}")
        staged = store.dir / f".staged-{p.v}.toml"
        try:
            store.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            staged.write_text(text)
            new = load_config(staged)
        except ConfigError as exc:
            first = "; ".join(
                f"{w.replace(str(staged), 'config')}: {m}" for w, m in exc.problems[:3]
            )
            more = f" (+{len(exc.problems) - 3} more)" if len(exc.problems) > 3 else ""
            return self._refuse(p.v, f"invalid: {first}{more}")
        finally:
            staged.unlink(missing_ok=True)
        cur = self.config
        changed = [
            what
            for what, a, b in (
                ("gateway id", cur.gateway.id, new.gateway.id),
                ("state_dir", cur.gateway.state_dir, new.gateway.state_dir),
                ("TLS certificate", cur.uplink.tls.cert_file, new.uplink.tls.cert_file),
                ("TLS key", cur.uplink.tls.key_file, new.uplink.tls.key_file),
            )
            if a != b
        ]
        if changed:
            return self._refuse(
                p.v, f"identity: it changes the {' and the '.join(changed)}; only an installer may"
            )
        store.begin_trial(
            p.v,
            text,
            {
                "trial_s": p.trial,
                "pushed_at": round(self.clock(), 3),
                "online": online or [],
                "uplink_changed": new.uplink != cur.uplink,
                "sha": p.sha.hex(),
            },
        )
        log.info(
            "configuration version %d accepted: reloading on it, %d s to show it works",
            p.v,
            p.trial,
        )
        data = self._report(p.v, "trying", f"{p.trial} s to show it works")
        store.save_report(data)
        return data, True, True

    # -- the trial, in the agent that runs the new version ---------------------------------

    async def run_trial(self) -> None:
        """If this agent runs a version on trial: keep it once :func:`judge` passes, roll
        back at the deadline. A task of the agent; returns when the trial is over."""
        trial = self.store.trial
        if trial is None or int(trial["version"]) != self.store.active:
            return
        version = int(trial["version"])
        # from this agent's start: stopping the previous one (its drain) is not the trial's
        until = self.clock() + float(trial["trial_s"])
        seen: set[str] = set()
        while True:
            ok, why = judge(self._stats(), trial, seen)
            if ok is None and self.clock() >= until:
                ok, why = False, f"not within {trial['trial_s']} s: still waiting for {why}"
            if ok is False:
                await self._roll_back(version, why)
                return
            if ok:
                async with self._lock:
                    await asyncio.to_thread(self.store.commit)
                log.info("configuration version %d works: kept", version)
                data = self._report(version, "applied")
                await asyncio.to_thread(self.store.save_report, data)
                self._publish(data, retain=True)
                return
            await asyncio.sleep(self.poll_s)

    async def _roll_back(self, version: int, reason: str) -> None:
        async with self._lock:
            _, now = await asyncio.to_thread(self.store.rollback, reason)
        log.error("configuration version %d rolled back to %s: %s", version, _name(now), reason)
        data = self._report(version, "rolled_back", reason)
        await asyncio.to_thread(self.store.save_report, data)
        self._publish(data, retain=True)
        await asyncio.sleep(0.2)  # let the report go out before the reload stops the uplink
        if self._reload is not None:
            self._reload()


def roll_back_on_failure(store: ConfigStore, exc: BaseException) -> str:
    """The agent failed on a version on trial: roll back (the supervisor restarts on the
    previous one). The log line, or ``""`` when no trial was running."""
    store.state = store._load()  # the agent changed it
    if store.trial is None:
        return ""
    with contextlib.suppress(OSError):
        tried, now = store.rollback(f"the agent failed on it: {exc}")
        return f"configuration version {tried} failed ({exc}): back to {_name(now)}"
    return ""
