"""QoS 1 publish round trips: aiomqtt as it comes against aiomqtt through the agent's
adapter (agent/mqtt.py), in process.

``python -m bench.mqtt_client [--publishes 2000] [--window 32] [--rounds 5]``

A private Mosquitto on a free loopback port; each client publishes
``--publishes`` messages of 750 bytes (a signed batch of ~250 readings) at QoS 1
to one topic with ``--window`` in flight, the way each uplink does it:

- ``aiomqtt``: aiomqtt's own API: a Semaphore and one task per publish awaiting
  ``client.publish`` (``max_inflight_messages = window + 4``; MQTT 3.1.1);
- ``vitals``: the uplink: the adapter's ``publish_nowait`` and a done-callback
  per Future, no task (MQTT 5);
- ``vitals-tasks``: ``await client.publish`` through the adapter in one task per
  publish, like the aiomqtt pattern, to separate the adapter's cost from the
  pattern's.

Reported per publish (median of the rounds): wall time, and this process's CPU
time (client, event loop and the kernel's share of our socket calls; the
broker runs in its own process and is not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable

from simulator.broker import MosquittoBroker

TOPIC = "bench/v1/gw-1/batch"


async def _aiomqtt(host: str, port: int, n: int, window: int, payload: bytes) -> None:
    import aiomqtt

    async with aiomqtt.Client(
        host, port, identifier="bench-aiomqtt", max_inflight_messages=window + 4
    ) as client:
        client.pending_calls_threshold = window * 2 + 8
        await _task_per_publish(lambda: client.publish(TOPIC, payload, qos=1), n, window)


async def _vitals(host: str, port: int, n: int, window: int, payload: bytes) -> None:
    from agent.mqtt import MqttClient

    async with MqttClient(host, port, client_id="bench-vitals") as client:
        room = asyncio.Semaphore(window)
        done = asyncio.Event()
        left = [n]

        def acked(fut: asyncio.Future[None]) -> None:
            room.release()
            fut.result()
            left[0] -= 1
            if not left[0]:
                done.set()

        for _ in range(n):
            await room.acquire()
            await client.drain()
            client.publish_nowait(TOPIC, payload, qos=1).add_done_callback(acked)
        await done.wait()


async def _vitals_tasks(host: str, port: int, n: int, window: int, payload: bytes) -> None:
    from agent.mqtt import MqttClient

    async with MqttClient(host, port, client_id="bench-vitals-tasks") as client:
        await _task_per_publish(lambda: client.publish(TOPIC, payload, qos=1), n, window)


async def _task_per_publish(publish: Callable[[], Awaitable[None]], n: int, window: int) -> None:
    """``n`` publishes, each a task awaiting its acknowledgement, ``window`` at a time."""
    room = asyncio.Semaphore(window)

    async def one() -> None:
        try:
            await publish()
        finally:
            room.release()

    async with asyncio.TaskGroup() as tg:
        for _ in range(n):
            await room.acquire()
            tg.create_task(one())


Runner = Callable[[str, int, int, int, bytes], Awaitable[None]]
CLIENTS: dict[str, Runner] = {
    "aiomqtt": _aiomqtt,
    "vitals": _vitals,
    "vitals-tasks": _vitals_tasks,
}


async def _measure(
    run: Runner, broker: MosquittoBroker, n: int, window: int
) -> tuple[float, float]:
    payload = os.urandom(750)
    await run(broker.host, broker.port, 200, window, payload)  # warm up, imports done
    wall0, cpu0 = time.perf_counter(), time.process_time()
    await run(broker.host, broker.port, n, window, payload)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return wall / n * 1e6, cpu / n * 1e6


async def main(publishes: int, window: int, rounds: int) -> dict[str, dict[str, float]]:
    broker = MosquittoBroker()
    await broker.start()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in CLIENTS}
    try:
        for _ in range(rounds):
            for name, run in CLIENTS.items():  # interleaved: drift hits every client alike
                results[name].append(await _measure(run, broker, publishes, window))
    finally:
        await broker.stop()
    return {
        name: {
            "wall_us_per_publish": round(statistics.median(w for w, _ in r), 1),
            "cpu_us_per_publish": round(statistics.median(c for _, c in r), 1),
        }
        for name, r in results.items()
    }


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--publishes", type=int, default=2000)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    out = asyncio.run(main(a.publishes, a.window, a.rounds))
    print(json.dumps({"publishes": a.publishes, "window": a.window, **out}, indent=1))


if __name__ == "__main__":
    cli()
