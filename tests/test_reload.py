"""SIGHUP reload: a good new configuration restarts the agent on it, a bad one
is refused and the old one keeps running."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from agent.ops.config import Config, load_config
from agent.ops.reload import supervise, try_reload
from agent.ops.systemd import SdNotifier


class Recorder(SdNotifier):
    """Keeps what would go to systemd; sets ``seen`` on each message."""

    def __init__(self) -> None:
        super().__init__(None)
        self.messages: list[dict[str, str | int]] = []
        self.seen = asyncio.Event()

    def notify(self, **fields: str | int) -> bool:
        self.messages.append(fields)
        self.seen.set()
        return True


GOOD = '[gateway]\nid = "gw-1"\nstate_dir = "{state}"\n[batch]\nmax_readings = {n}\n'


def _write(path: Path, n: int, state: Path, gid: str = "gw-1") -> None:
    path.write_text(GOOD.format(state=state, n=n).replace("gw-1", gid))


def test_try_reload_accepts_good_refuses_bad(tmp_path: Path) -> None:
    f = tmp_path / "gw.toml"
    _write(f, 100, tmp_path)
    cur = load_config(f)
    _write(f, 200, tmp_path)
    new, why = try_reload(f, cur)
    assert new is not None and new.batch.max_readings == 200 and why == ""
    f.write_text(GOOD.format(state=tmp_path, n=0))  # max_readings out of range
    new, why = try_reload(f, cur)
    assert new is None and "max_readings" in why
    _write(f, 100, tmp_path, gid="gw-2")
    new, why = try_reload(f, cur)
    assert new is None and "gateway id changed" in why
    f.unlink()
    new, why = try_reload(f, cur)
    assert new is None


async def test_sighup_reloads_and_a_bad_file_keeps_the_old(tmp_path: Path) -> None:
    f = tmp_path / "gw.toml"
    _write(f, 100, tmp_path)
    runs: list[int] = []
    stopped: list[int] = []
    started = asyncio.Event()

    async def run_agent(cfg: Config, agent_stop: asyncio.Event) -> None:
        runs.append(cfg.batch.max_readings)
        started.set()
        await agent_stop.wait()
        stopped.append(cfg.batch.max_readings)

    stop, hup = asyncio.Event(), asyncio.Event()
    rec = Recorder()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, hup.set)
    try:
        task = asyncio.create_task(
            supervise(load_config(f), f, stop=stop, hup=hup, run_agent=run_agent, notifier=rec)
        )
        await started.wait()
        started.clear()
        # a broken file: refused, the agent keeps running on the old one
        f.write_text("[gateway\n")
        os.kill(os.getpid(), signal.SIGHUP)
        await rec.seen.wait()
        assert str(rec.messages[-1]["status"]).startswith("reload refused: invalid")
        assert runs == [100] and stopped == []
        # a good one: the agent stops and starts on it
        _write(f, 300, tmp_path)
        os.kill(os.getpid(), signal.SIGHUP)
        await started.wait()
        assert runs == [100, 300] and stopped == [100]
        stop.set()
        last = await task
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
    assert last.batch.max_readings == 300
    kinds = [next(iter(m)) for m in rec.messages]
    assert kinds == ["status", "reloading", "ready", "stopping"]
    assert stopped == [100, 300]
