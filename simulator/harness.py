"""An agent and the reference hub on one broker, in this event loop.

What the demo, the end-to-end tests and the HIL suite all need: enroll the
gateway's key at a hub, start the hub worker, start the agent, and at the end
stop the agent cleanly (it seals and delivers what it holds) and let the hub
catch up with everything the agent polled.

    async with agent_with_hub(config, identity, broker, db) as run:
        await asyncio.sleep(4)          # or watch run.agent / run.core live
    assert run.core.counters["readings"] == run.polled
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from agent.ops.config import Config
from agent.ops.state import Identity, save_hub_key
from agent.service import Agent
from hub.core import HubCore
from hub.enroll import hub_key_path, load_or_create_hub_key
from hub.worker import Hub

__all__ = ["Running", "agent_with_hub"]


@dataclass
class Running:
    agent: Agent
    core: HubCore
    hub: Hub
    stop: asyncio.Event
    agent_task: asyncio.Task[None]
    polled: int = 0  # readings the agent polled, known once the block has ended


@asynccontextmanager
async def agent_with_hub(
    config: Config,
    identity: Identity,
    broker_host: str,
    broker_port: int,
    db: Path,
    *,
    shared: bool = True,
    stop: asyncio.Event | None = None,
    catch_up_s: float = 15.0,
) -> AsyncIterator[Running]:
    """Run the agent of ``config`` and a hub (database ``db``) until the block ends.

    ``shared`` subscribes the hub through ``$share`` (Mosquitto; not amqtt). The
    hub signs receipts with the key beside ``db`` (created if new), whose public
    half is written to the agent's state directory (``hub.pub``).
    Leaving the block sets ``stop`` (unless the agent stopped already), waits for
    the agent's clean stop, then up to ``catch_up_s`` for the hub to hold every
    polled reading. The hub's database stays open: ``run.core.close()`` it.
    """
    core = HubCore(db, prefix=config.uplink.topic_prefix)  # the gateway's topics
    core.enroll(config.gateway.id, identity.public_raw)
    # the hub key beside the database, its public half in the agent's state directory
    # (what enrollment does): the agent keeps each batch until the hub's receipt
    hub_key = load_or_create_hub_key(hub_key_path(db))
    save_hub_key(config.gateway.state_dir, hub_key.public_key().public_bytes_raw())
    hub = Hub(core, host=broker_host, port=broker_port, shared=shared, hub_key=hub_key)
    agent = Agent(config, identity=identity)
    stop = stop or asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        hub_task = tg.create_task(hub.run(), name="hub")
        await asyncio.wait_for(hub.subscribed.wait(), 15)
        agent_task = tg.create_task(agent.run(stop), name="agent")
        run = Running(agent, core, hub, stop, agent_task)
        yield run
        stop.set()
        await agent_task
        run.polled = agent.batcher.readings_in if agent.batcher else 0
        deadline = time.monotonic() + catch_up_s
        # polling a counter the hub task bumps; no event to wait on
        while core.counters["readings"] < run.polled and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        # the hub's reconnect loop can miss one cancellation (aiomqtt raises MqttError
        # from a TaskGroup that drops it, Python 3.11): cancel until it has ended
        while not hub_task.done():
            hub_task.cancel()
            await asyncio.wait({hub_task}, timeout=1.0)
