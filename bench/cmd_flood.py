"""A flood on the gateway's command topic: batches, refusals and memory during it.

``python -m bench.cmd_flood [--messages 3000] [--large 556] [--seconds 8] [--qos 1]``

A private Mosquitto on a free loopback port, two emulated Modbus TCP terminals
polled every 100 ms, and the real agent (``python -m agent run``) in its own
process, sealing a batch every 200 ms. A subscriber on the gateway's batch and
result topics counts what arrives. After ``--seconds`` of normal running, a
flooder publishes ``--messages`` messages at QoS 1 to the gateway's command
topic as fast as the broker takes them (issue 19's mix: random bytes, msgpack
that looks like a command, unsigned and forged signed envelopes, empty
payloads, and ``--large`` payloads of 70 KB to 900 KB), then the run goes on
for ``--seconds`` more and a valid signed ``ping`` is sent. The flooder
publishes at QoS 1 (``--qos 0``: without waiting for the broker, the quickest).

Reported: batches a second before, during and after the flood; the longest
gap between two batches; signed refusals published during the flood and per
second; the agent's VmRSS before and after (and its VmHWM); how long the
valid command after the flood took to be answered. The helpers here are the
ones ``tests/test_fault_cmd_flood.py`` uses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from agent.ops.state import create_identity, save_hub_key
from drivers.profiles import load_profile
from protocols import command, envelope, topics
from protocols.ed25519 import PrivateKey
from simulator.broker import MosquittoBroker
from simulator.tcp import TcpTerminal

VITALS = [sys.executable, "-m", "agent"]
PROFILES = ("sound_level_meter", "weather_station")


def write_config(
    path: Path,
    state: Path,
    *,
    gateway: str,
    broker_port: int,
    terminal_ports: Sequence[int],
    interval_s: float = 0.1,
    max_age_s: float = 0.2,
) -> None:
    """A gateway polling ``terminal_ports`` (one device each) and sealing often."""
    text = (
        f'[gateway]\nid = "{gateway}"\nstate_dir = "{state}"\n'
        f'[uplink]\nhost = "127.0.0.1"\nport = {broker_port}\n'
        f"[batch]\nmax_readings = 500\nmax_age_s = {max_age_s}\n"
    )
    for i, port in enumerate(terminal_ports):
        text += (
            f'[[buses]]\nname = "tcp-{i}"\nkind = "tcp"\nhost = "127.0.0.1"\n'
            f"tcp_port = {port}\ntimeout_s = 0.5\n"
            f'[[devices]]\nname = "dev-{i}"\nbus = "tcp-{i}"\n'
            f'profile = "{PROFILES[i % len(PROFILES)]}"\nslave = 1\ninterval_s = {interval_s}\n'
        )
    path.write_text(text)


def enroll(state: Path, hub: PrivateKey) -> PrivateKey:
    """A gateway identity in ``state`` that trusts ``hub``; its private key."""
    ident = create_identity(state)
    save_hub_key(state, hub.public_key().public_bytes_raw())
    return ident.private_key


async def start_terminals(n: int = 2) -> list[TcpTerminal]:
    terms = [TcpTerminal(load_profile(PROFILES[i % len(PROFILES)]), seed=i) for i in range(n)]
    for t in terms:
        await t.start()
    return terms


async def start_agent(cfg: Path, log_file: Path) -> asyncio.subprocess.Process:
    with log_file.open("ab") as err:
        return await asyncio.create_subprocess_exec(
            *VITALS, "run", "--config", str(cfg), stdout=subprocess.DEVNULL, stderr=err
        )


def acked(state: Path) -> tuple[float, int]:
    """(written_at, batches acknowledged by the broker) from the agent's status file."""
    doc = json.loads((state / "status.json").read_text())
    return float(doc["written_at"]), int(doc["uplink"]["batches_acked"])


def rss_kb(pid: int, field_name: str = "VmRSS") -> int:
    """A process's resident memory (``VmRSS``, or ``VmHWM``: its peak), kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise LookupError(f"{field_name} not in /proc/{pid}/status")


@dataclass
class Watch:
    """A subscriber on a gateway's batch and command-result topics: arrival times."""

    gateway: str
    batches: list[float] = field(default_factory=list)
    results: list[tuple[float, bytes]] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, host: str, port: int) -> None:
        import aiomqtt

        batch, result = topics.batch(self.gateway), topics.cmd_result(self.gateway)
        async with aiomqtt.Client(host, port, identifier=f"watch-{os.getpid()}") as c:
            await c.subscribe(batch, qos=1)
            await c.subscribe(result, qos=1)
            self.ready.set()
            async for msg in c.messages:
                now = time.monotonic()
                if msg.topic.matches(batch):
                    self.batches.append(now)
                elif isinstance(msg.payload, bytes):
                    self.results.append((now, msg.payload))

    def batches_between(self, t0: float, t1: float) -> int:
        return sum(1 for t in self.batches if t0 <= t < t1)

    def longest_gap(self, t0: float, t1: float) -> float:
        """The longest time without a batch within [t0, t1]."""
        times = [t0, *(t for t in self.batches if t0 <= t < t1), t1]
        return max(b - a for a, b in itertools.pairwise(times))


def flood_mix(
    gateway: str, hub_public: bytes, *, n: int = 3000, large: int = 556, seed: int = 19
) -> list[bytes]:
    """Issue 19's flood: ``large`` payloads of 70 KB to 900 KB, the rest in equal parts
    random bytes, msgpack that looks like a command, unsigned envelopes, envelopes signed
    with an unknown key, envelopes that claim the hub's key with a forged signature, and
    empty payloads; shuffled."""
    rng = random.Random(seed)
    attacker = PrivateKey.generate()
    hub_kid = envelope.key_id(hub_public)
    now = int(time.time() * 1000)
    out = [rng.randbytes(rng.randint(70_000, 900_000)) for _ in range(large)]
    kinds = ("random", "msgpack", "unsigned", "unknown_key", "forged", "empty")
    for i in range(n - large):
        kind = kinds[i % len(kinds)]
        if kind == "random":
            out.append(rng.randbytes(rng.randint(1, 3000)))
        elif kind == "msgpack":
            out.append(
                msgpack.packb(
                    {"gw": gateway, "op": "write", "device": "dev-0", "value": rng.random()}
                )
            )
        elif kind == "unsigned":
            out.append(envelope._pack([1, envelope._pack({"gw": gateway}), b"\x80", b""]))
        elif kind == "unknown_key":
            wire, _ = command.command("write", {}, gateway=gateway, hub_key=attacker, now_ms=now)
            out.append(wire)
        elif kind == "forged":
            protected: dict[str, str | bytes | int] = {
                "gw": gateway,
                "kid": hub_kid,
                "id": rng.randbytes(16),
                "op": "write",
                "t": now,
                "exp": now + 60_000,
            }
            wire = envelope.sign_message(command.CMD_DOMAIN, protected, b"\x80", attacker)
            out.append(wire)
        else:
            out.append(b"")
    rng.shuffle(out)
    return out


async def flood(
    host: str, port: int, gateway: str, payloads: Sequence[bytes], *, qos: int = 1
) -> None:
    """Publish ``payloads`` to the gateway's command topic, back to back (at QoS 0 the
    flooder waits for nothing: the quickest flood)."""
    import aiomqtt

    topic = topics.cmd(gateway)
    async with aiomqtt.Client(host, port, identifier=f"flood-{os.getpid()}") as c:
        for p in payloads:
            await c.publish(topic, p, qos=qos)


@contextlib.asynccontextmanager
async def gateway_under_test(
    workdir: Path, broker: MosquittoBroker, hub: PrivateKey, gateway: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, Watch, PrivateKey, Path]]:
    """Terminals, a subscriber and the agent, batches flowing: (agent, watch, gateway key,
    agent log). The agent is stopped with SIGTERM at the end (its exit status checked by
    the caller through ``returncode``)."""
    state = workdir / "state"
    gw_key = enroll(state, hub)
    terms = await start_terminals()
    cfg = workdir / "gateway.toml"
    write_config(
        cfg, state, gateway=gateway, broker_port=broker.port, terminal_ports=[t.port for t in terms]
    )
    watch = Watch(gateway)
    log = workdir / "agent.log"
    proc: asyncio.subprocess.Process | None = None
    try:
        async with asyncio.TaskGroup() as tg:
            watcher = tg.create_task(watch.run(broker.host, broker.port))
            await asyncio.wait_for(watch.ready.wait(), 10)
            proc = await start_agent(cfg, log)
            for _ in range(300):
                if len(watch.batches) >= 5:
                    break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"the agent sent no batches: {log.read_text()[-2000:]}")
            yield proc, watch, gw_key, log
            proc.send_signal(15)
            await asyncio.wait_for(proc.wait(), 30)
            watcher.cancel()
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        for t in terms:
            await t.stop()


async def _run(
    messages: int, large: int, seconds: float, qos: int, workdir: Path
) -> dict[str, object]:
    from hub.commander import Commander
    from hub.core import HubCore

    gw = "gw-bench-flood"
    hub = PrivateKey.generate()
    broker = MosquittoBroker()
    await broker.start()
    try:
        async with gateway_under_test(workdir, broker, hub, gw) as (proc, watch, gw_key, log):
            payloads = flood_mix(gw, hub.public_key().public_bytes_raw(), n=messages, large=large)
            await asyncio.sleep(seconds)
            t0 = time.monotonic()
            rss_before = rss_kb(proc.pid)
            acked_before = acked(workdir / "state")
            t_before = t0 - seconds
            await flood(broker.host, broker.port, gw, payloads, qos=qos)
            t1 = time.monotonic()
            await asyncio.sleep(seconds)
            t2 = time.monotonic()
            rss_after = rss_kb(proc.pid)
            hwm = rss_kb(proc.pid, "VmHWM")
            acked_after = acked(workdir / "state")
            core = HubCore(workdir / "hub.sqlite3")
            core.enroll(gw, gw_key.public_key().public_bytes_raw())
            import aiomqtt

            async with aiomqtt.Client(broker.host, broker.port, identifier="bench-hub") as c:
                sent = time.monotonic()
                try:
                    res = (await Commander(core, hub).send(c, gw, "ping", timeout_s=10)).status
                except TimeoutError:
                    res = "no answer in 10 s"
                answered_s = time.monotonic() - sent
            core.close()
            lost = log.read_text().count(" lost: ")
            refusals = [t for t, _ in watch.results if t0 <= t < t1 + 1.0]
    finally:
        await broker.stop()
    flood_s = t1 - t0
    return {
        "messages": messages,
        "large": large,
        "qos": qos,
        "flood_s": round(flood_s, 2),
        "batches_per_s_before": round(watch.batches_between(t_before, t0) / seconds, 2),
        "batches_per_s_during": round(watch.batches_between(t0, t1) / flood_s, 2),
        "batches_per_s_after": round(watch.batches_between(t1, t2) / (t2 - t1), 2),
        "longest_batch_gap_s": round(watch.longest_gap(t_before, t2), 2),
        # PUBACKs the agent got, from its status file (written every 5 s)
        "acked_per_s_across_flood": round(
            (acked_after[1] - acked_before[1]) / (acked_after[0] - acked_before[0]), 2
        ),
        "refusals_published": len(refusals),
        "refusals_per_s": round(len(refusals) / (flood_s + 1.0), 2),
        "rss_before_mb": round(rss_before / 1024, 1),
        "rss_after_mb": round(rss_after / 1024, 1),
        "hwm_mb": round(hwm / 1024, 1),
        "uplink_lost": lost,
        "ping_after_flood": res,
        "ping_answered_s": round(answered_s, 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cmd_flood", description=__doc__)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--large", type=int, default=556)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--qos", type=int, choices=(0, 1), default=1, help="the flooder's QoS")
    args = ap.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vitals-bench-flood-") as tmp:
        out = asyncio.run(_run(args.messages, args.large, args.seconds, args.qos, Path(tmp)))
    print("| figure | value |\n|---|---|")
    for k, v in out.items():
        print(f"| {k} | {v} |")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
