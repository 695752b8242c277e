"""SIGHUP: reload the configuration, refuse a bad one and keep the old.

:func:`try_reload` validates the file again; a configuration that does not
load, or that changes what may not change under a running gateway (its id,
its state directory: the identity key and the spool live there), is refused
with the reason and the running one stays. :func:`supervise` runs the agent
and, on each accepted reload, stops it the normal way (seal, spool, drain:
nothing is lost) and starts it again on the new configuration.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from agent.config import Config, load_config
from agent.sdnotify import SdNotifier
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
) -> Config:
    """Run ``run_agent(config, agent_stop)`` until ``stop``; reload on ``hup``.

    Returns the configuration that was running last.
    """
    notifier = notifier or SdNotifier(None)
    cfg = config
    while True:
        agent_stop = asyncio.Event()
        restart = False
        async with asyncio.TaskGroup() as tg:
            agent = tg.create_task(run_agent(cfg, agent_stop), name="agent")
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
                    new, why = try_reload(path, cfg)
                    if new is None:
                        log.error(
                            "reload of %s refused, keeping the running configuration: %s", path, why
                        )
                        notifier.status(f"reload refused: {why}")
                        continue
                    log.info("reloading %s", path)
                    notifier.reloading()
                    cfg = new
                    restart = True
                    agent_stop.set()
                    break
        if not restart:
            return cfg
        notifier.ready("configuration reloaded")
