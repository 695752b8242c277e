"""SIGHUP: reload the configuration, refuse a bad one and keep the old.

:func:`try_reload` validates the file again; a configuration that does not
load, or that changes what may not change under a running gateway (its id,
its state directory: the identity key and the spool live there), is refused
with the reason and the running one stays. :func:`supervise` runs the agent
and, on each accepted reload, stops it the normal way (seal, spool, drain:
nothing is lost) and starts it again on the new configuration.

With a :class:`agent.ops.confpush.ConfigStore` (``pushed``), the file it runs and
re-reads is the active version the hub pushed (``state_dir/config/v{N}.toml``)
rather than ``path``, which stays the fallback; a version on trial that the agent
cannot start on, or that was on trial when the process died, is rolled back here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from agent.ops.config import Config, load_config
from agent.ops.confpush import ConfigStore, roll_back_on_failure
from agent.ops.systemd import SdNotifier
from protocols.errors import ConfigError

__all__ = ["supervise", "try_reload"]

log = logging.getLogger(__name__)

RunAgent = Callable[[Config, asyncio.Event], Coroutine[Any, Any, None]]


def try_reload(path: Path, current: Config) -> tuple[Config | None, str]:
    """``(new config, "")`` if ``path`` may replace ``current``, else ``(None, why)``."""
    try:
        new = load_config(path)
    except ConfigError as exc:
        first = "; ".join(f"{w}: {m}" for w, m in exc.problems[:3])
        more = f" (+{len(exc.problems) - 3} more)" if len(exc.problems) > 3 else ""
        return None, f"invalid: {first}{more}"
    except OSError as exc:
        return None, f"unreadable: {exc}"
    if new.gateway.id != current.gateway.id:
        return None, (
            f"gateway id changed ({current.gateway.id} -> {new.gateway.id}): restart the service "
            "to change identity"
        )
    if new.gateway.state_dir != current.gateway.state_dir:
        return None, "state_dir changed: restart the service to move the key and the spool"
    return new, ""


async def supervise(
    config: Config,
    path: Path,
    *,
    stop: asyncio.Event,
    hup: asyncio.Event,
    run_agent: RunAgent,
    notifier: SdNotifier | None = None,
    pushed: ConfigStore | None = None,
) -> Config:
    """Run ``run_agent(config, agent_stop)`` until ``stop``; reload on ``hup``.

    Returns the configuration that was running last.
    """
    notifier = notifier or SdNotifier(None)
    cfg = config
    if pushed is not None:
        why = pushed.recover()
        if why:
            log.error("%s", why)
        cfg = _pushed_or(pushed, path, cfg)

    def current() -> Path:
        return path if pushed is None else pushed.effective(path)

    async def guarded(c: Config, agent_stop: asyncio.Event) -> bool:
        """Run the agent; True when it failed on a version on trial (rolled back)."""
        try:
            await run_agent(c, agent_stop)
        except Exception as exc:
            why = "" if pushed is None else roll_back_on_failure(pushed, exc)
            if not why:
                raise
            log.error("%s", why)
            return True
        return False

    while True:
        agent_stop = asyncio.Event()
        restart = False
        async with asyncio.TaskGroup() as tg:
            agent = tg.create_task(guarded(cfg, agent_stop), name="agent")
            while not agent.done():
                waiters = [asyncio.ensure_future(e.wait()) for e in (stop, hup)]
                await asyncio.wait([*waiters, agent], return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
                if stop.is_set():
                    notifier.stopping()
                    agent_stop.set()
                    break
                if hup.is_set():
                    hup.clear()
                    new, why = try_reload(current(), cfg)
                    if new is None:
                        log.error(
                            "reload of %s refused, keeping the running configuration: %s", path, why
                        )
                        notifier.status(f"reload refused: {why}")
                        continue
                    log.info("reloading %s", current())
                    notifier.reloading()
                    cfg = new
                    restart = True
                    agent_stop.set()
                    break
        if agent.result() and pushed is not None:  # failed on a version on trial
            cfg = _pushed_or(pushed, path, config)
            restart = True
        if not restart:
            return cfg
        notifier.ready("configuration reloaded")


def _pushed_or(pushed: ConfigStore, path: Path, fallback: Config) -> Config:
    """The configuration of the active pushed version, else ``fallback`` (``path``'s)."""
    eff = pushed.effective(path)
    if eff == path:
        return fallback
    new, why = try_reload(eff, fallback)
    if new is None:
        log.error("the pushed configuration %s cannot run (%s): running %s", eff, why, path)
        return fallback
    log.info("running the configuration the hub pushed: %s (fallback %s)", eff, path)
    return new
