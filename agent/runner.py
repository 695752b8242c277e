"""``vitals run``: the agent as a service, and the logging set-up of every command.

The typer command is in :mod:`agent.cli.main`; this module imports neither rich nor
the diagnostics, so the long-running agent does not either (docs/decisions.md, 22).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from protocols.errors import ConfigError, VitalsError

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_STATE",
    "exec_agent",
    "first_error",
    "one_malloc_arena",
    "run",
    "setup_logging",
]

DEFAULT_CONFIG = Path(os.environ.get("VITALS_CONFIG", "/etc/vitals/gateway.toml"))
DEFAULT_STATE = Path(os.environ.get("VITALS_STATE_DIR", "/var/lib/vitals"))


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Log to stderr; under systemd (JOURNAL_STREAM set) without our own timestamps."""
    journald = "JOURNAL_STREAM" in os.environ
    if fmt == "json":

        class _Json(logging.Formatter):
            def format(self, r: logging.LogRecord) -> str:
                return json.dumps(
                    {
                        "t": r.created,
                        "level": r.levelname.lower(),
                        "logger": r.name,
                        "msg": r.getMessage(),
                    }
                )

        formatter: logging.Formatter = _Json()
    elif journald:
        formatter = logging.Formatter("<%(levelno)s>%(name)s: %(message)s")
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def first_error(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def run(config: Path, state_dir: Path | None = None, log_level: str | None = None) -> int:
    """Run the agent until SIGTERM or Ctrl-C; SIGHUP reloads the configuration.

    Under systemd (Type=notify) it reports READY, WATCHDOG, STATUS and STOPPING.
    A new configuration that does not load is refused and the running one kept.
    Returns the exit status: 0 after a clean stop, 1 when it cannot start.
    """
    from agent.ops.config import Config, load_config
    from agent.ops.confpush import ConfigStore
    from agent.ops.reload import supervise
    from agent.ops.systemd import SdNotifier
    from agent.service import Agent

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        for where, problem in exc.problems:
            print(f"error: {where}: {problem}", file=sys.stderr)
        print(
            f"hint: 'vitals config check {config}' lists every problem; another file: "
            "--config FILE or VITALS_CONFIG",
            file=sys.stderr,
        )
        return 1
    setup_logging(log_level or cfg.log.level, cfg.log.format)

    async def _main() -> None:
        stop, hup = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, hup.set)
        notifier = SdNotifier.from_env()

        async def run_agent(c: Config, agent_stop: asyncio.Event) -> None:
            # the override applies to every (re)loaded file, so a reload never sees it as a change
            if state_dir is not None:
                c = replace(c, gateway=replace(c.gateway, state_dir=state_dir))
            await Agent(c, notifier=notifier, reload=hup.set).run(agent_stop)

        try:
            async with asyncio.TaskGroup() as tg:
                watchdog = tg.create_task(notifier.run_watchdog(), name="sd.watchdog")
                await supervise(
                    cfg,
                    config,
                    stop=stop,
                    hup=hup,
                    run_agent=run_agent,
                    notifier=notifier,
                    pushed=ConfigStore.of(state_dir or cfg.gateway.state_dir),
                )
                watchdog.cancel()
        finally:
            notifier.close()

    failure: BaseException | None = None
    try:
        asyncio.run(_main())
    except* VitalsError as group:
        failure = first_error(group)
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0


def exec_agent(config: Path, state_dir: Path | None, log_level: str | None) -> NoReturn:
    """Replace this process (same PID, so systemd's notify socket and watchdog
    still apply) with a fresh interpreter that runs only the agent.

    ``vitals run`` parses its options with typer like every command; typer 0.29
    converts option values through pydantic, and a long-running agent would keep
    those ~12 MB resident for nothing (docs/decisions.md 22). The arguments are
    already checked here; ``python -m agent.runner`` takes them as they are.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    args = [str(config), "" if state_dir is None else str(state_dir), log_level or ""]
    os.execv(sys.executable, [sys.executable, "-m", "agent.runner", *args])


def _exec_main(argv: list[str]) -> int:
    """The far end of :func:`exec_agent`: CONFIG STATE_DIR LOG_LEVEL (empty = unset)."""
    config, state_dir, log_level = argv
    one_malloc_arena()  # before any thread starts
    return run(Path(config), Path(state_dir) if state_dir else None, log_level or None)


def one_malloc_arena() -> None:
    """Have glibc serve every thread from one malloc arena.

    By default each thread that allocates (the spool's, the executor's) gets
    an arena of its own, and its free memory stays resident in it: ~1.4 MB
    for this agent's few threads, which allocate little and rarely at once.
    Anywhere but glibc this does nothing.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass


_M_ARENA_MAX = -8  # <malloc.h>


if __name__ == "__main__":
    sys.exit(_exec_main(sys.argv[1:]))
