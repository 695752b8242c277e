"""Hub throughput: ``python -m bench.hub [--cases core|mqtt|all]``.

Pre-built signed batches (``envelope.seal``, msgpack+zlib, from 50 gateways,
timestamps an hour old) are verified and stored. Two loads of as many readings:

* ``agent``: the agent's default batch (``BatchConfig.max_readings``, 5000
  readings) of the fleet (``bench.payload.fleet_batch``: 500 devices x 30
  points, each point once a batch, a third of the fleet's second): the
  encoder's rule gives them layout 2 (columns);
* ``mixed``: ``--per-batch`` (500) readings of 64 points, each about eight
  times: layout 1 (series by point), the load of the figures before issue 18.

The layout each load's batches got is printed. The cases (``--cases``):

1. ``core``: one :class:`~hub.core.HubCore` in this process, fed directly
   (parse, key lookup, Ed25519 verify, dedup, decode, buffered SQLite insert,
   final flush included): the ceiling of one worker. Both loads, ``--repeat``
   runs each, alternating, the median shown; readings per second of wall time
   and per CPU second of this process (the machine is shared: the second is
   what one core does when the worker has it), and the machine's 1-minute
   load before the runs.
2. ``mqtt x1`` and ``mqtt x2`` (the ``mqtt`` cases, on the ``mixed`` load): a private Mosquitto, one or two hub worker
   processes (:class:`~hub.worker.Hub`, persistent sessions) on the shared
   subscription ``$share/hub/vitals/v1/+/batch``, one SQLite database. Every
   batch is published (QoS 1) into the broker *before* the workers run: their
   sessions exist, so the broker queues the batches for them, split between
   the sessions; the publisher has finished and does not compete for the two
   cores. The workers build their core, say ready, and are started together;
   time runs from the first message any worker receives to the moment the
   database holds every batch. CPU of each worker and of Mosquitto over that
   window comes from ``/proc/<pid>/stat``.
3. ``sharded``: the same with each worker appending readings to a file of its
   own; the dedup claim stays in the shared file.
4. ``dedup``: two workers, every batch published twice in a row (so the
   copies land on different workers): the database must hold each batch
   exactly once.

``--db postgresql://USER@HOST:PORT/DB`` runs the same on PostgreSQL
(:mod:`hub.pg`) instead of SQLite: ``core``, ``mqtt x1``, ``mqtt x2`` and
``dedup`` (no ``sharded``: PostgreSQL has many writers). Each run gets a
database of its own, created next to the one named (the user needs CREATEDB)
and dropped after. ``python tests/pg_cluster.py`` starts a private server and
prints its URL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

from agent.ops.config import BatchConfig
from bench.payload import fleet_batch
from bench.tcp_fleet import POINTS
from hub.core import HubCore
from hub.store import is_url, open_readings
from protocols import ed25519, envelope, topics
from protocols.payload import COLUMNS_TAG
from protocols.reading import Quality, Reading

T0 = time.time_ns() // 1_000_000 - 3_600_000  # an hour ago: inside the hub's age window


def build(gateways: int, batches: int, per_batch: int) -> tuple[list[tuple[str, bytes]], dict]:  # type: ignore[type-arg]
    """``batches`` signed batches spread over ``gateways``, and their public keys."""
    rng = random.Random(1)
    keys = {f"gw-{g:04d}": ed25519.PrivateKey.generate() for g in range(gateways)}
    names = list(keys)
    out: list[tuple[str, bytes]] = []
    seqs = dict.fromkeys(names, 0)
    for b in range(batches):
        gw = names[b % gateways]
        seq = seqs[gw]
        seqs[gw] += 1
        base = T0 + seq * 5000
        readings = [
            Reading(
                i % 64,
                base + (i // 64) * 1000 + rng.randrange(20),
                round(40 + 20 * rng.random(), 1) if i % 7 else rng.randrange(1000),
                Quality.GOOD,
            )
            for i in range(per_batch)
        ]
        data = envelope.seal(readings, gateway=gw, key=keys[gw], epoch=1, seq=seq)
        out.append((topics.batch(gw), data))
    pubs = {gw: k.public_key().public_bytes_raw() for gw, k in keys.items()}
    return out, pubs


def build_agent(
    gateways: int, readings: int, per_batch: int = BatchConfig().max_readings
) -> tuple[list[tuple[str, bytes]], dict[str, bytes]]:
    """``readings`` in signed batches as the agent seals them by default: each gateway
    polls the fleet (500 devices x 30 points a second) and seals every
    ``per_batch`` readings; a batch holds each of its points once."""
    fleet = list(fleet_batch(500 * POINTS))
    shift = T0 - min(r.ts for r in fleet)  # inside the hub's age window
    cuts = [fleet[i : i + per_batch] for i in range(0, len(fleet), per_batch)]
    keys = {f"gw-{g:04d}": ed25519.PrivateKey.generate() for g in range(gateways)}
    names = list(keys)
    out: list[tuple[str, bytes]] = []
    seqs = dict.fromkeys(names, 0)
    for b in range(max(1, readings // per_batch)):
        gw = names[b % gateways]
        seq = seqs[gw]
        seqs[gw] += 1
        second, cut = divmod(seq, len(cuts))
        batch = [r._replace(ts=r.ts + shift + second * 1000) for r in cuts[cut]]
        data = envelope.seal(batch, gateway=gw, key=keys[gw], epoch=1, seq=seq)
        out.append((topics.batch(gw), data))
    pubs = {gw: k.public_key().public_bytes_raw() for gw, k in keys.items()}
    return out, pubs


def layouts(msgs: list[tuple[str, bytes]]) -> dict[int, int]:
    """How many batches got each payload layout, read from the payloads (a layout 2
    payload is an array starting with ``COLUMNS_TAG``)."""
    import msgpack

    def layout(data: bytes) -> int:
        payload = envelope.parse(data).payload
        return 2 if msgpack.unpackb(zlib.decompress(payload))[0] == COLUMNS_TAG else 1

    return dict(Counter(layout(d) for _, d in msgs))


def bench_core(
    msgs: list[tuple[str, bytes]], pubs: dict[str, bytes], db: str | Path, gc_worker: bool = True
) -> dict[str, float]:
    """One core run; with ``gc_worker`` the collector set as a worker sets it once
    started (:func:`drivers.collector.steady_gc`), else Python's defaults."""
    from drivers.collector import steady_gc

    core = HubCore(db)
    for gw, pub in pubs.items():
        core.enroll(gw, pub)
    load = os.getloadavg()[0]
    with steady_gc() if gc_worker else contextlib.nullcontext():
        t = time.perf_counter()
        cpu = time.process_time()
        for topic, data in msgs:
            core.handle(topic, data)
        core.flush()
        wall = time.perf_counter() - t
        cpu = time.process_time() - cpu
    n = core.counters["readings"]
    core.close()
    stored = _stored_rows(db)
    assert stored == n, (stored, n)
    return {
        "readings": n,
        "seconds": wall,
        "per_s": n / wall,
        "cpu_s": cpu,
        "per_cpu_s": n / cpu,
        "load_before": load,
    }


def core_runs(
    loads: dict[str, tuple[list[tuple[str, bytes]], dict[str, bytes]]],
    repeat: int,
    work: Path,
    gc_worker: bool = True,
) -> dict[str, dict[str, Any]]:
    """``repeat`` core runs of each load, alternating; per load the median (by wall
    readings/s) and every run's figures."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in loads}
    for i in range(repeat):
        for name, (msgs, pubs) in loads.items():
            db = work / f"core-{name}-{i}.sqlite3"
            runs[name].append(bench_core(msgs, pubs, db, gc_worker))
    out: dict[str, dict[str, Any]] = {}
    for name, rs in runs.items():
        out[name] = {
            **sorted(rs, key=lambda r: r["per_s"])[len(rs) // 2],
            "median_per_cpu_s": statistics.median(r["per_cpu_s"] for r in rs),
            "all_per_s": [round(r["per_s"]) for r in rs],
            "all_per_cpu_s": [round(r["per_cpu_s"]) for r in rs],
            "all_load_before": [round(r["load_before"], 2) for r in rs],
        }
    return out


def print_core(
    core: dict[str, dict[str, Any]], shapes: dict[str, tuple[int, int, dict[int, int]]]
) -> None:
    """The core table: per load, its batches and their layouts, the median run."""
    print(
        f"core: one HubCore, no broker; median of {len(next(iter(core.values()))['all_per_s'])} runs"
    )
    print(
        f"{'load':<8}{'batches':>9}{'x readings':>12}{'layout':>10}{'readings/s':>12}"
        f"{'per cpu-s':>12}{'cpu s':>8}  {'all runs (readings/s)':<28}{'load before'}"
    )
    for name, r in core.items():
        batches, per, got = shapes[name]
        layout = ", ".join(f"{k}: {v}" for k, v in sorted(got.items()))
        runs = ", ".join(f"{x:,}" for x in r["all_per_s"])
        loads = ", ".join(f"{x:.1f}" for x in r["all_load_before"])
        print(
            f"{name:<8}{batches:>9}{per:>12}{layout:>10}{r['per_s']:>12,.0f}"
            f"{r['median_per_cpu_s']:>12,.0f}{r['cpu_s']:>8.2f}  {runs:<28}{loads}"
        )


# -- processes ------------------------------------------------------------------

GROUP_FILTER = topics.shared("hub", f"{topics.DEFAULT_PREFIX}/+/batch")  # as Hub subscribes


def _client_id(worker: str) -> str:
    return f"bench-hub-{worker}"


def _worker(db: str | Path, port: int, name: str, sharded: bool) -> None:
    """A hub worker: build everything, say ``ready``, wait for ``go`` on stdin, then run.

    Prints the wall-clock times of its first message and of its last commit of
    batches when it stops.
    """
    from hub.worker import Hub

    core = HubCore(db, worker=name, sharded=sharded)
    first: list[float] = []
    handle = core.handle
    received = [0]

    def timed(topic: str, data: bytes) -> str:
        if not first:
            first.append(time.time())
        received[0] += 1
        return handle(topic, data)

    core.handle = timed  # type: ignore[method-assign,assignment]
    last: list[float] = [0.0]
    flush = core.flush

    def timed_flush() -> None:
        wrote = core.buffered
        flush()
        if wrote:
            last[0] = time.time()

    core.flush = timed_flush  # type: ignore[method-assign]
    print("ready", flush=True)
    sys.stdin.readline()

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        hub = Hub(core, port=port, client_id=_client_id(name), persistent=True)
        await hub.run()

    try:
        asyncio.run(main())
    except asyncio.CancelledError:
        pass
    finally:
        core.close()
        print(
            json.dumps(
                {"first": first[0] if first else None, "last": last[0], "received": received[0]}
            ),
            flush=True,
        )


async def _prime(port: int, workers: int) -> None:
    """Give each worker a persistent session on the shared subscription, then leave:
    the broker queues what is published for them, split between the sessions."""
    import aiomqtt

    for w in range(workers):
        async with aiomqtt.Client(
            "127.0.0.1", port, identifier=_client_id(f"w{w}"), clean_session=False
        ) as client:
            await client.subscribe(GROUP_FILTER, qos=1)


def _publisher(port: int, path: Path, copies: int) -> None:
    """Publish every batch QoS 1, ``copies`` times in a row (a redelivery's neighbour
    lands on the other worker of a shared subscription)."""
    import aiomqtt
    import msgpack

    msgs = msgpack.unpackb(path.read_bytes())

    async def main() -> None:
        async with aiomqtt.Client("127.0.0.1", port, max_inflight_messages=256) as client:
            client.pending_calls_threshold = 10_000
            sem = asyncio.Semaphore(200)

            async def one(topic: str, data: bytes) -> None:
                async with sem:
                    await client.publish(topic, data, qos=1)

            async with asyncio.TaskGroup() as tg:
                for topic, data in msgs:
                    for _ in range(copies):
                        tg.create_task(one(topic, data))

    asyncio.run(main())


def _connect(db: str | Path) -> Any:
    """A connection to the hub database: the SQLite file read-only, or PostgreSQL."""
    if is_url(db):
        import psycopg

        return psycopg.connect(str(db), autocommit=True)
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)


def _count(db: str | Path) -> tuple[int, int]:
    con = _connect(db)
    try:
        b, n = con.execute("SELECT count(*), coalesce(sum(n), 0) FROM batches").fetchone()
        return int(b), int(n)
    finally:
        con.close()


def _stored_rows(db: str | Path) -> int:
    """Reading rows that count: the file's, plus each shard's whose claim names it
    (PostgreSQL: the readings table)."""
    con = _connect(db) if is_url(db) else open_readings(Path(db))
    try:
        return int(con.execute("SELECT count(*) FROM readings").fetchone()[0])
    finally:
        con.close()


class PgDatabases:
    """A fresh PostgreSQL database per run, beside the one ``--db`` names."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.url, self.made = url, []  # type: ignore[var-annotated]
        self.admin = psycopg.connect(url, autocommit=True)
        self.version = self.admin.execute("SHOW server_version").fetchone()[0]
        self.settings = dict(
            self.admin.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN"
                " ('fsync', 'synchronous_commit', 'shared_buffers', 'wal_level')"
            ).fetchall()
        )

    def new(self) -> str:
        name = f"bench_hub_{os.getpid()}_{len(self.made)}"
        self.admin.execute(f"CREATE DATABASE {name}")
        self.made.append(name)
        return self.url.rsplit("/", 1)[0] + "/" + name

    def close(self) -> None:
        for name in self.made:
            self.admin.execute(f"DROP DATABASE IF EXISTS {name}")
        self.admin.close()


def _children_named(name: str) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        if comm == name and ppid == os.getpid():
            out.append(int(stat.parent.name))
    return out


def bench_mqtt(
    msgs: list[tuple[str, bytes]],
    pubs: dict[str, bytes],
    workdir: Path,
    *,
    workers: int,
    copies: int = 1,
    sharded: bool = False,
    pg: PgDatabases | None = None,
) -> dict[str, Any]:
    """Pre-publish into the broker, then time the workers draining it."""
    import msgpack

    from simulator.broker import MosquittoBroker

    workdir.mkdir(parents=True, exist_ok=True)
    db: str | Path = pg.new() if pg else workdir / f"hub-{workers}-{copies}-{int(sharded)}.sqlite3"
    core = HubCore(db)
    for gw, pub in pubs.items():
        core.enroll(gw, pub)
    core.close()
    blob = workdir / "msgs.msgpack"
    blob.write_bytes(msgpack.packb(msgs, use_bin_type=True))
    total_batches = len(msgs)
    total = sum(envelope.parse(d).header.n for _, d in msgs)
    broker = MosquittoBroker()
    asyncio.run(broker.start())
    (broker_pid,) = _children_named("mosquitto")
    pg_pids: list[int] = []
    procs: list[subprocess.Popen[str]] = []
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    base = [sys.executable, "-m", "bench.hub", "--port", str(broker.port)]
    try:
        # 1. sessions, 2. every batch queued in the broker (the publisher is done and gone)
        asyncio.run(_prime(broker.port, workers))
        subprocess.run(
            [*base, "--publish", str(blob), "--copies", str(copies)], env=env, check=True
        )
        # 3. workers start, build their core, and wait for the word
        for w in range(workers):
            cmd = [*base, "--worker", f"w{w}", "--db", str(db)]
            procs.append(
                subprocess.Popen(
                    [*cmd, *(["--sharded"] if sharded else [])],
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        pg_pids = _pg_backends(db) if pg else []
        cpu0 = {pid: _cpu(pid) for pid in (*(p.pid for p in procs), broker_pid, *pg_pids)}
        load = os.getloadavg()[0]  # the machine's 1-minute load before the run (others' jobs)
        machine0 = _machine_cpu()
        t = time.perf_counter()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        deadline = t + 120
        b = n = 0
        poll = _connect(db)
        while time.perf_counter() < deadline:
            time.sleep(0.05)  # the workers report their own times: this is only the stop
            b, n = poll.execute("SELECT count(*), coalesce(sum(n), 0) FROM batches").fetchone()
            if b >= total_batches:
                break
        poll.close()
        elapsed = time.perf_counter() - t
        machine = _machine_cpu() - machine0
        cpu = {pid: _cpu(pid) - c for pid, c in cpu0.items()}
        if copies > 1:
            time.sleep(1.0)  # let the late copies arrive and be refused
            b, n = _count(db)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        times = []
        for p in procs:
            out, _ = p.communicate(timeout=30)
            times.append(json.loads(out.strip().splitlines()[-1]))
        asyncio.run(broker.stop())
    starts = [w["first"] for w in times if w["first"] is not None]
    # from the first message any worker received to the last commit of batches
    wall = max(w["last"] for w in times) - min(starts) if starts else elapsed
    if b < total_batches:  # a run that stopped short: its rate over the whole wait
        wall = elapsed
        print(
            f"run with {workers} worker(s) stored {b} of {total_batches} batches in"
            f" {elapsed:.0f} s; messages received by each worker:"
            f" {[w.get('received') for w in times]}",
            file=sys.stderr,
        )
    rows = _stored_rows(db)
    con = _connect(db)
    per_worker: dict[str, int] = {}
    flushes: dict[str, int] = {}
    dups = across = 0
    for k, v in con.execute("SELECT name, value FROM counters"):
        w, _, name = k.partition("/")
        if name == "duplicates":
            dups += int(v)
        if name == "duplicates_across_workers":
            across += int(v)
        if name == "batches":
            per_worker[w] = int(v)
        if name == "flushes":
            flushes[w] = int(v)
    con.close()
    return {
        "workers": workers,
        "readings": n,
        "expected": total,
        "reading_rows": rows,
        "batches": b,
        "batches_per_worker": [per_worker.get(f"w{w}", 0) for w in range(workers)],
        "received_per_worker": [w.get("received") for w in times],
        "flushes_per_worker": [flushes.get(f"w{w}", 0) for w in range(workers)],
        "duplicates_dropped": dups,
        "duplicates_across_workers": across,
        "seconds": wall,
        "per_s": n / wall,
        "worker_cpu_s": [round(cpu[p.pid], 2) for p in procs],
        "broker_cpu_s": round(cpu[broker_pid], 2),
        "postgres_cpu_s": round(sum(cpu.get(p, 0.0) for p in pg_pids), 2),
        "ours_cpu_s": round(sum(cpu.values()), 2),
        # every process's CPU over the same window: what is not ours is other jobs'
        "machine_cpu_s": round(machine, 2),
        "load_before": round(load, 2),
    }


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # a PostgreSQL backend that ended: its CPU is not counted
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_cpu() -> float:
    """CPU seconds spent by the whole machine (all cores, /proc/stat), idle excluded."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def _pg_backends(db: str | Path) -> list[int]:
    """The server processes of the workers' connections (on this machine), and the
    WAL writer and checkpointer: PostgreSQL's share of the CPU."""
    con = _connect(db)
    try:
        rows = con.execute(
            "SELECT pid FROM pg_stat_activity WHERE (datname = current_database()"
            " AND application_name LIKE 'vitals-hub %') OR backend_type IN"
            " ('walwriter', 'checkpointer', 'background writer')"
        ).fetchall()
    finally:
        con.close()
    return [int(r[0]) for r in rows if Path(f"/proc/{r[0]}").exists()]


def bench_pg(
    url: str, msgs: list[tuple[str, bytes]], pubs: dict[str, bytes], repeat: int, per_batch: int
) -> int:
    """The PostgreSQL cases: core, one worker, two workers (interleaved, median), dedup."""
    pg = PgDatabases(url)
    try:
        with tempfile.TemporaryDirectory(prefix="vitals-bench-hub-") as tmp:
            work = Path(tmp)
            core = bench_core(msgs, pubs, pg.new())
            runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
            for i in range(repeat):
                for workers in (1, 2):
                    r = bench_mqtt(msgs, pubs, work / f"r{i}", workers=workers, pg=pg)
                    runs[workers].append(r)
            quarter = msgs[: len(msgs) // 4]
            dedup = bench_mqtt(quarter, pubs, work, workers=2, copies=2, pg=pg)
    finally:
        pg.close()

    def median(w: int) -> dict[str, Any]:
        return sorted(runs[w], key=lambda r: r["per_s"])[len(runs[w]) // 2]

    one, two = median(1), median(2)
    speedup = two["per_s"] / one["per_s"]
    dedup_ok = bool(
        dedup["readings"] == dedup["expected"] == dedup["reading_rows"]
        and dedup["batches"] == len(quarter)
    )
    print(
        f"PostgreSQL {pg.version} ({', '.join(f'{k}={v}' for k, v in sorted(pg.settings.items()))});"
        f" MQTT cases: median of {repeat} interleaved runs (by readings/s)"
    )
    print(
        f"{'run':<10}{'readings':>10}{'seconds':>9}{'readings/s':>12}"
        f"{'worker cpu s':>16}{'postgres cpu s':>16}{'broker cpu s':>14}{'batches/worker':>16}"
        f"{'ours/machine cpu s':>20}{'load before':>13}"
    )
    print(
        f"{'core':<10}{core['readings']:>10}{core['seconds']:>9.2f}{core['per_s']:>12,.0f}"
        f"{core['cpu_s']:>16.2f}"
    )
    for name, r in (("pg x1", one), ("pg x2", two)):
        cpus = " + ".join(f"{c:.2f}" for c in r["worker_cpu_s"])
        split = "/".join(str(b) for b in r["batches_per_worker"])
        print(
            f"{name:<10}{r['readings']:>10}{r['seconds']:>9.2f}{r['per_s']:>12,.0f}"
            f"{cpus:>16}{r['postgres_cpu_s']:>16.2f}{r['broker_cpu_s']:>14.2f}{split:>16}"
            f"{r['ours_cpu_s']:>11.2f} / {r['machine_cpu_s']:<6.2f}{r['load_before']:>13.2f}"
        )
    print(
        f"{'dedup x2':<10}{dedup['readings']:>10}  every batch sent twice: stored once each "
        f"{'yes' if dedup_ok else 'NO'}, {dedup['duplicates_dropped']} duplicates dropped "
        f"({dedup['duplicates_across_workers']} claimed by the other worker first)"
    )
    print(f"two workers / one: {speedup:.2f}x")
    print(
        json.dumps(
            {
                "bench": "hub",
                "store": "postgresql",
                "server_version": pg.version,
                "server_settings": pg.settings,
                "readings_per_batch": per_batch,
                "repeat": repeat,
                "all_runs_readings_per_s": {
                    f"pg_{w}": [round(r["per_s"]) for r in rs] for w, rs in runs.items()
                },
                "core_readings_per_s": round(core["per_s"]),
                "pg_1_worker_readings_per_s": round(one["per_s"]),
                "pg_2_workers_readings_per_s": round(two["per_s"]),
                "speedup_2_over_1": round(speedup, 2),
                "postgres_cpu_s": [one["postgres_cpu_s"], two["postgres_cpu_s"]],
                # CPU of the workers, PostgreSQL and Mosquitto, and of the whole machine,
                # over each median run: the difference is other jobs on the machine
                "ours_cpu_s": [one["ours_cpu_s"], two["ours_cpu_s"]],
                "machine_cpu_s": [one["machine_cpu_s"], two["machine_cpu_s"]],
                "load_before": [one["load_before"], two["load_before"]],
                "dedup_two_workers_ok": dedup_ok,
                "duplicates_dropped": dedup["duplicates_dropped"],
                "lost": sum(r["expected"] - r["readings"] for rs in runs.values() for r in rs),
            }
        )
    )
    lost = sum(r["expected"] - r["readings"] for rs in runs.values() for r in rs)
    return 0 if dedup_ok and not lost else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gateways", type=int, default=50)
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--per-batch", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=3, help="runs per MQTT case (median shown)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--publish", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--copies", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument(
        "--db",
        help="postgresql://USER@HOST:PORT/DB: bench PostgreSQL (a database per run is made"
        " beside it) instead of SQLite",
    )
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--sharded", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--cases",
        choices=("core", "mqtt", "all"),
        default="all",
        help="core: one HubCore in this process, both loads (seconds); mqtt: the broker"
        " and worker processes, mixed load (minutes); all: both (default)",
    )
    ap.add_argument(
        "--gc",
        choices=("worker", "default"),
        default="worker",
        help="core: the collector as a running worker sets it (frozen start-up objects,"
        " gen-0 threshold 20,000; default) or Python's defaults (before decisions 49)",
    )
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.db if is_url(args.db) else Path(args.db), args.port, args.worker, args.sharded)
        return 0
    if args.publish:
        _publisher(args.port, args.publish, args.copies)
        return 0

    t = time.perf_counter()
    msgs, pubs = build(args.gateways, args.batches, args.per_batch)
    per_agent = BatchConfig().max_readings
    loads = {
        "agent": build_agent(args.gateways, args.batches * args.per_batch, per_agent),
        "mixed": (msgs, pubs),
    }
    shapes = {
        "agent": (len(loads["agent"][0]), per_agent, layouts(loads["agent"][0])),
        "mixed": (len(msgs), args.per_batch, layouts(msgs)),
    }
    print(
        f"built {len(msgs)} signed batches x {args.per_batch} readings and"
        f" {shapes['agent'][0]} x {per_agent} from {args.gateways} gateways in"
        f" {time.perf_counter() - t:.1f} s",
        file=sys.stderr,
    )
    if args.db:
        if not is_url(args.db):
            ap.error("--db takes a postgresql:// URL (SQLite is the default: no --db)")
        return bench_pg(args.db, msgs, pubs, args.repeat, args.per_batch)
    with tempfile.TemporaryDirectory(prefix="vitals-bench-hub-") as tmp:
        work = Path(tmp)
        core = (
            core_runs(loads, args.repeat, work, args.gc == "worker") if args.cases != "mqtt" else {}
        )
        if core:
            print_core(core, shapes)
        core_json = {
            "core": {
                name: {
                    "batches": shapes[name][0],
                    "readings_per_batch": shapes[name][1],
                    "layouts": shapes[name][2],
                    "readings_per_s": round(r["per_s"]),
                    "readings_per_cpu_s": round(r["median_per_cpu_s"]),
                    "all_runs_readings_per_s": r["all_per_s"],
                    "all_runs_readings_per_cpu_s": r["all_per_cpu_s"],
                    "load_before": r["all_load_before"],
                }
                for name, r in core.items()
            }
        }
        if args.cases == "core":
            print(json.dumps({"bench": "hub", "repeat": args.repeat, **core_json}))
            return 0
        runs: dict[tuple[int, bool], list[dict[str, Any]]] = {}
        for i in range(args.repeat):  # interleaved, so a noisy neighbour hits all alike
            for workers, sharded in ((1, False), (2, False), (1, True), (2, True)):
                r = bench_mqtt(msgs, pubs, work / f"r{i}", workers=workers, sharded=sharded)
                runs.setdefault((workers, sharded), []).append(r)

        def median(key: tuple[int, bool]) -> dict[str, Any]:
            return sorted(runs[key], key=lambda r: r["per_s"])[len(runs[key]) // 2]

        one, two = median((1, False)), median((2, False))
        one_s, two_s = median((1, True)), median((2, True))
        quarter = msgs[: len(msgs) // 4]
        dedup = bench_mqtt(quarter, pubs, work, workers=2, copies=2)
        dedup_s = bench_mqtt(quarter, pubs, work, workers=2, copies=2, sharded=True)
    speedup = two["per_s"] / one["per_s"]
    speedup_s = two_s["per_s"] / one_s["per_s"]

    def exact(r: dict[str, Any]) -> bool:
        return bool(
            r["readings"] == r["expected"]
            and r["reading_rows"] == r["expected"]
            and r["batches"] == len(quarter)
        )

    dedup_ok = exact(dedup) and exact(dedup_s)
    print(f"MQTT cases (mixed load): median of {args.repeat} interleaved runs (by readings/s)")
    print(
        f"{'run':<12}{'readings':>10}{'seconds':>9}{'readings/s':>12}"
        f"{'worker cpu s':>16}{'broker cpu s':>14}{'batches/worker':>16}{'flushes':>10}"
    )
    for name, r in (
        ("mqtt x1", one),
        ("mqtt x2", two),
        ("sharded x1", one_s),
        ("sharded x2", two_s),
    ):
        cpus = " + ".join(f"{c:.2f}" for c in r["worker_cpu_s"])
        split = "/".join(str(b) for b in r["batches_per_worker"])
        print(
            f"{name:<12}{r['readings']:>10}{r['seconds']:>9.2f}{r['per_s']:>12,.0f}"
            f"{cpus:>16}{r['broker_cpu_s']:>14.2f}{split:>16}"
            f"{'/'.join(str(f) for f in r['flushes_per_worker']):>10}"
        )
    for name, r in (("dedup x2", dedup), ("dedup shard", dedup_s)):
        print(
            f"{name:<12}{r['readings']:>10}  every batch sent twice: stored once each "
            f"{'yes' if exact(r) else 'NO'}, {r['duplicates_dropped']} duplicates dropped "
            f"({r['duplicates_across_workers']} claimed by the other worker first)"
        )
    print(f"two workers / one: {speedup:.2f}x one database, {speedup_s:.2f}x readings sharded")
    print(
        json.dumps(
            {
                "bench": "hub",
                "readings_per_batch": args.per_batch,
                "repeat": args.repeat,
                "all_runs_readings_per_s": {
                    f"{'sharded' if sh else 'mqtt'}_{w}": [round(r["per_s"]) for r in rs]
                    for (w, sh), rs in runs.items()
                },
                **core_json,
                "mqtt_1_worker_readings_per_s": round(one["per_s"]),
                "mqtt_2_workers_readings_per_s": round(two["per_s"]),
                "speedup_2_over_1": round(speedup, 2),
                "sharded_1_worker_readings_per_s": round(one_s["per_s"]),
                "sharded_2_workers_readings_per_s": round(two_s["per_s"]),
                "sharded_speedup_2_over_1": round(speedup_s, 2),
                "dedup_two_workers_ok": dedup_ok,
                "duplicates_dropped": dedup["duplicates_dropped"],
                "lost": sum(r["expected"] - r["readings"] for r in (one, two, one_s, two_s)),
            }
        )
    )
    return 0 if dedup_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
