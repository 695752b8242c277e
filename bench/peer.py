"""vitals against ThingsBoard IoT Gateway on the same Modbus TCP load: ``python -m bench.peer``.

The load: ``--devices`` emulated Modbus TCP terminals (``simulator.tcp``, one
process), each ``--registers`` input registers (u16 scaled by 0.1), polled at
``--hz``. The peer: ThingsBoard IoT Gateway, pinned (:data:`TB_VERSION`), from
the package index into its own virtual environment under the user's cache
(``--venv``; made once, reused), with its Modbus connector's pinned pymodbus
installed up front (the gateway would otherwise pip-install it at start). Its
configuration uses its best documented options for this load: one *wide range*
read per device and poll (``"address": "0-19"``, ``maxRegistersPerRequest``
125), telemetry sent as received, no remote configuration, no statistics
messages, memory storage, no rate limits (the default for a local host).
ThingsBoard's server side is a private Mosquitto (the gateway speaks MQTT to
it; no reply is needed for telemetry).

vitals and the peer run one after the other against the same terminals and
broker, ``--rounds`` times, the order alternating. For each run, after
``--warmup`` seconds, over ``--duration`` seconds:

* CPU % of one core: ``utime + stime`` of the gateway's process (all its threads);
* peak RSS: ``VmHWM`` at the end;
* Modbus requests per poll: requests the terminals served / polls delivered
  (values delivered / registers);
* wire bytes per value: the bytes the gateway's TCP connections to the broker
  sent (``ss``'s ``bytes_acked``: MQTT packets, headers and all) / values delivered;
* values/s delivered: values that reached a subscriber on the broker (vitals:
  batches parsed and decoded; ThingsBoard: ``v1/gateway/telemetry`` JSON).

Skipped, with the reason, where the peer cannot be installed or started (no
route to the package index, no ``python3 -m venv``); vitals is measured anyway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.bus import machine
from bench.tcp_fleet import cpu_s, status_kb

TB_VERSION = "3.8.5"
TB_PYMODBUS = (
    "3.9.2"  # what its Modbus connector 3.8.5 requires (it installs it at start otherwise)
)
GATEWAY = "gw-peer-1"
TB_LOGGERS = ("service", "connector", "converter", "tb_connection", "storage", "extension",
              "pymodbus")  # fmt: skip


# --------------------------------------------------------------------------- the load


def profile_toml(registers: int) -> str:
    lines = [
        "[profile]",
        'model = "PEER-BENCH"',
        'vendor = "vitals bench"',
        f'description = "{registers} input registers, u16 scaled by 0.1"',
        'datasheet = "none: a synthetic map"',
        "max_registers = 125",
        "max_gap = 0",
        "interval_s = 1.0",
        "",
    ]
    for i in range(registers):
        lines += [
            "[[points]]",
            f'name = "p{i}"',
            'space = "input"',
            f"address = {i}",
            'type = "u16"',
            "scale = 0.1",
            'unit = "x"',
            'domain = "bench"',
            'class = "peer"',
            f'indicator = "p{i}"',
            "",
        ]
    return "\n".join(lines)


async def serve(count: int, profile: Path) -> None:
    """The terminals; prints their ports, then the requests served on each line read."""
    from drivers.profiles import load_profile
    from simulator.tcp import TcpTerminal

    prof = load_profile(profile)
    terms = [TcpTerminal(prof, seed=i) for i in range(count)]
    for t in terms:
        await t.start()
    print(json.dumps({"ports": [t.port for t in terms]}), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        print(json.dumps({"requests": sum(t.requests for t in terms)}), flush=True)
    for t in terms:
        await t.stop()


class Emulators:
    def __init__(self, count: int, profile: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.peer", "--role", "emulators", "--count", str(count),
             "--profile", str(profile)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.ports: list[int] = json.loads(self.proc.stdout.readline())["ports"]

    def requests(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("?\n")
        self.proc.stdin.flush()
        return int(json.loads(self.proc.stdout.readline())["requests"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --------------------------------------------------------------------------- what arrives


# What a ThingsBoard server answers the gateway's "getSessionLimits" RPC with (its
# defaults: 64 KiB payloads, 100 messages in flight) and no rate limits: the gateway
# waits for this answer before it sends any telemetry.
SESSION_LIMITS = {"maxPayloadSize": 65536, "maxInflightMessages": 100, "rateLimits": {},
                  "gatewayRateLimits": {}}  # fmt: skip


class Counter:
    """A subscriber on the broker: values delivered, by the vitals and ThingsBoard
    topics; and the part of a ThingsBoard server the gateway needs to send."""

    def __init__(self, host: str, port: int) -> None:
        import paho.mqtt.client as paho

        self.values = 0
        self.messages = 0
        self.errors = 0
        self._lock = threading.Lock()
        self._client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="peer-counter")
        self._client.on_message = self._on_message
        self._client.connect(host, port)
        self._client.subscribe(
            [("vitals/#", 0), ("v1/gateway/telemetry", 0), ("v1/devices/me/rpc/request/+", 1)]
        )
        self._client.loop_start()

    def _on_message(self, client: object, userdata: object, msg: Any) -> None:
        n = 0
        try:
            if msg.topic.startswith("v1/devices/me/rpc/request/"):
                if json.loads(msg.payload).get("method") == "getSessionLimits":
                    rid = msg.topic.rsplit("/", 1)[1]
                    topic = f"v1/devices/me/rpc/response/{rid}"
                    self._client.publish(topic, json.dumps(SESSION_LIMITS), qos=1)
                return
            if msg.topic.endswith("/batch"):
                from protocols.envelope import parse

                n = len(parse(msg.payload).readings())
            elif msg.topic == "v1/gateway/telemetry":
                body = json.loads(msg.payload)
                for entries in body.values():
                    for e in entries if isinstance(entries, list) else [entries]:
                        n += len(e.get("values", e)) if isinstance(e, dict) else 0
        except Exception:  # counted; the run reports it
            with self._lock:
                self.errors += 1
            return
        with self._lock:
            self.values += n
            self.messages += 1

    def snapshot(self) -> int:
        with self._lock:
            return self.values

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def sent_bytes(pid: int, broker_port: int) -> int:
    """Bytes the TCP connections of ``pid`` to the broker sent and had acknowledged."""
    out = subprocess.run(
        ["ss", "-tinpH", "state", "established", "dport", "=", f":{broker_port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    total = 0
    current_is_ours = False
    for line in out.splitlines():
        if "users:(" in line:
            current_is_ours = f"pid={pid}," in line
        elif current_is_ours:
            m = re.search(r"bytes_acked:(\d+)", line)
            if m:
                total += int(m.group(1))
    return total


# --------------------------------------------------------------------------- the gateways


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vitals-bench" / f"thingsboard-gateway-{TB_VERSION}"


def ensure_peer(venv: Path) -> Path:
    """The peer's python, installing it first if needed; RuntimeError with the reason."""
    py = venv / "bin" / "python"
    probe = (
        "import importlib.metadata as m; "
        f"assert m.version('thingsboard-gateway') == {TB_VERSION!r}; "
        f"assert m.version('pymodbus') == {TB_PYMODBUS!r}"
    )
    if py.exists() and subprocess.run([py, "-c", probe], capture_output=True).returncode == 0:
        return py
    print(f"installing thingsboard-gateway {TB_VERSION} into {venv} (once)...", file=sys.stderr)
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
    if made.returncode:
        raise RuntimeError(f"cannot make a virtual environment: {made.stderr.strip()[-200:]}")
    pip = subprocess.run(
        [py, "-m", "pip", "install", "-q", f"thingsboard-gateway=={TB_VERSION}",
         f"pymodbus=={TB_PYMODBUS}", "pyserial", "pyserial-asyncio"],
        capture_output=True,
        text=True,
        timeout=1800,
    )  # fmt: skip
    if pip.returncode:
        last = (pip.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise RuntimeError(f"pip install thingsboard-gateway=={TB_VERSION} failed: {last}")
    return py


def tb_config(tmp: Path, ports: list[int], registers: int, hz: float, broker: int) -> Path:
    """The peer's configuration directory (tb_gateway.json, modbus.json, logs.json)."""
    conf = tmp / "tb-config"
    conf.mkdir(parents=True, exist_ok=True)
    gateway = {
        "thingsboard": {
            "host": "127.0.0.1",
            "port": broker,
            "remoteShell": False,
            "remoteConfiguration": False,
            "latencyDebugMode": False,
            "statistics": {"enable": False, "statsSendPeriodInSeconds": 3600},
            "deviceFiltering": {"enable": False},
            "maxPayloadSizeBytes": 8196,
            "minPackSendDelayMS": 50,
            "minPackSizeToSend": 500,
            "checkConnectorsConfigurationInSeconds": 3600,
            "handleDeviceRenaming": False,
            "security": {"type": "accessToken", "accessToken": "bench"},
            "qos": 1,
            "reportStrategy": {"type": "ON_RECEIVED"},
            "checkingDeviceActivity": {"checkDeviceInactivity": False},
        },
        "storage": {"type": "memory", "read_records_count": 100, "max_records_count": 1000000},
        "grpc": {"enabled": False},
        "connectors": [{"type": "modbus", "name": "modbus", "configuration": "modbus.json"}],
    }
    slaves = [
        {
            "host": "127.0.0.1",
            "port": port,
            "type": "tcp",
            "method": "socket",
            "unitId": 1,
            "deviceName": f"t{i}",
            "deviceType": "default",
            "timeout": 1,
            "byteOrder": "BIG",
            "wordOrder": "BIG",
            "retries": 1,
            "pollPeriod": round(1000 / hz),
            "connectAttemptTimeMs": 1000,
            "connectAttemptCount": 5,
            "waitAfterFailedAttemptsMs": 1000,
            "attributes": [],
            "timeseries": [
                {
                    "tag": "p${address}",
                    "type": "16uint",
                    "functionCode": 4,
                    "objectsCount": 1,
                    "address": f"0-{registers - 1}",
                    "maxRegistersPerRequest": 125,
                    "divider": 10,
                }
            ],
            "attributeUpdates": [],
            "rpc": [],
        }
        for i, port in enumerate(ports)
    ]
    logs = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"f": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "formatter": "f",
                "filename": str(tmp / "tb.log"),
                "level": "WARNING",
            }
        },
        "loggers": {
            name: {"handlers": ["file"], "level": "WARNING", "propagate": False}
            for name in TB_LOGGERS
        },
        "root": {"level": "WARNING", "handlers": ["file"]},
    }
    (conf / "tb_gateway.json").write_text(json.dumps(gateway, indent=1))
    (conf / "modbus.json").write_text(json.dumps({"master": {"slaves": slaves}}, indent=1))
    (conf / "logs.json").write_text(json.dumps(logs, indent=1))
    return conf


def vitals_config(tmp: Path, profile: Path, ports: list[int], hz: float, broker: int) -> Path:
    state = tmp / "vitals-state"
    subprocess.run(
        [sys.executable, "-m", "agent", "keygen", "--state-dir", str(state)],
        capture_output=True,
        check=True,
    )
    out = [
        "[gateway]",
        f'id = "{GATEWAY}"',
        f'state_dir = "{state}"',
        "[uplink]",
        'host = "127.0.0.1"',
        f"port = {broker}",
        "[log]",
        'level = "warning"',
    ]
    for i, port in enumerate(ports):
        out += ["[[buses]]", f'name = "tcp-{i}"', 'kind = "tcp"', 'host = "127.0.0.1"',
                f"tcp_port = {port}", "timeout_s = 1.0"]  # fmt: skip
    for i in range(len(ports)):
        out += ["[[devices]]", f'name = "t{i}"', f'bus = "tcp-{i}"', f'profile = "{profile}"',
                "slave = 1", f"interval_s = {1 / hz:g}"]  # fmt: skip
    cfg = tmp / "vitals.toml"
    cfg.write_text("\n".join(out) + "\n")
    return cfg


def run_one(
    name: str,
    cmd: list[str],
    env: dict[str, str],
    cwd: Path,
    emulators: Emulators,
    counter: Counter,
    broker_port: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=(cwd / f"{name}.err").open("ab")
    )
    try:
        time.sleep(args.warmup)
        if proc.poll() is not None:
            err = (cwd / f"{name}.err").read_text()[-300:].strip()
            raise RuntimeError(f"{name} exited with {proc.returncode} at start: {err}")
        c0, b0, v0, r0 = (
            cpu_s(proc.pid),
            sent_bytes(proc.pid, broker_port),
            counter.snapshot(),
            emulators.requests(),
        )
        t0 = time.monotonic()
        time.sleep(args.duration)
        c1, b1, v1, r1 = (
            cpu_s(proc.pid),
            sent_bytes(proc.pid, broker_port),
            counter.snapshot(),
            emulators.requests(),
        )
        wall = time.monotonic() - t0
        hwm = status_kb(proc.pid, "VmHWM")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    values = v1 - v0
    polls = values / args.registers
    return {
        "gateway": name,
        "cpu_pct_one_core": round(100 * (c1 - c0) / wall, 2),
        "peak_rss_mb": round(hwm / 1024, 1),
        "modbus_requests_per_poll": round((r1 - r0) / polls, 2) if polls else None,
        "wire_bytes_per_value": round((b1 - b0) / values, 2) if values else None,
        "values_per_s": round(values / wall),
        "values_expected_per_s": round(args.devices * args.registers * args.hz),
    }


async def _broker() -> Any:
    from simulator.broker import MosquittoBroker

    b = MosquittoBroker()
    await b.start()
    return b


def orchestrate(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str | None]:
    tmp = Path(tempfile.mkdtemp(prefix="vitals-peer-"))
    skip: str | None = None
    peer_py: Path | None = None
    try:
        peer_py = ensure_peer(args.venv)
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
        skip = str(exc)
    profile = tmp / "peer.toml"
    profile.write_text(profile_toml(args.registers))
    emulators = Emulators(args.devices, profile)
    loop = asyncio.new_event_loop()
    broker = loop.run_until_complete(_broker())
    counter = Counter(broker.host, broker.port)
    rows: list[dict[str, Any]] = []
    try:
        vitals_cmd = [sys.executable, "-m", "agent", "run", "--config",
                      str(vitals_config(tmp, profile, emulators.ports, args.hz, broker.port))]  # fmt: skip
        runs: dict[str, tuple[list[str], dict[str, str]]] = {
            "vitals": (vitals_cmd, dict(os.environ))
        }
        if peer_py is not None:
            conf = tb_config(tmp, emulators.ports, args.registers, args.hz, broker.port)
            env = {**os.environ, "TB_GW_CONFIG_DIR": str(conf)}
            env.pop("PYTHONPATH", None)
            runs["thingsboard"] = ([str(peer_py), "-m", "thingsboard_gateway.tb_gateway"], env)
        for r in range(args.rounds):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for name in order:
                cmd, env = runs[name]
                try:
                    row = run_one(name, cmd, env, tmp, emulators, counter, broker.port, args)
                except RuntimeError as exc:
                    if name == "vitals":
                        raise
                    skip = str(exc)
                    runs.pop(name)
                    break
                row["round"] = r + 1
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
        if counter.errors:
            print(f"{counter.errors} messages could not be counted", file=sys.stderr)
    finally:
        counter.close()
        loop.run_until_complete(broker.stop())
        loop.close()
        emulators.close()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows, skip


FIGURES = (
    ("cpu_pct_one_core", "CPU % of one core"),
    ("peak_rss_mb", "peak RSS, MB"),
    ("modbus_requests_per_poll", "Modbus requests per poll"),
    ("wire_bytes_per_value", "wire bytes per value"),
    ("values_per_s", "values/s delivered"),
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--registers", type=int, default=20)
    ap.add_argument("--hz", type=float, default=10.0, help="polls a second of each device")
    ap.add_argument("--duration", type=float, default=30.0, help="measured seconds a run")
    ap.add_argument("--warmup", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=2, help="runs of each gateway, alternating")
    ap.add_argument("--venv", type=Path, default=cache_dir(), help="the peer's virtual environment")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument(
        "--role", choices=("bench", "emulators"), default="bench", help=argparse.SUPPRESS
    )
    ap.add_argument("--count", type=int, default=50, help=argparse.SUPPRESS)
    ap.add_argument("--profile", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "emulators":
        asyncio.run(serve(args.count, args.profile))
        return 0
    m = machine()
    rows, skip = orchestrate(args)
    print(f"machine: {m['cpu']}, {m['nproc']} CPUs, Python {m['python']}")
    print(
        f"load: {args.devices} Modbus TCP devices x {args.registers} registers at {args.hz:g} Hz "
        f"({args.devices * args.registers * args.hz:,.0f} values/s), {args.rounds} alternating "
        f"rounds of {args.duration:g} s"
    )
    names = ["vitals", "thingsboard"]
    summary: dict[str, dict[str, float | None]] = {}
    for name in names:
        mine = [r for r in rows if r["gateway"] == name]
        if not mine:
            continue
        summary[name] = {}
        for key, _ in FIGURES:
            vals = [r[key] for r in mine if r[key] is not None]
            summary[name][key] = round(statistics.median(vals), 2) if vals else None
    print()
    label = f"ThingsBoard IoT Gateway {TB_VERSION}"
    print(f"{'figure (median of the rounds)':<32}{'vitals':>14}{label:>30}")
    for key, title in FIGURES:
        v = summary.get("vitals", {}).get(key)
        t = summary.get("thingsboard", {}).get(key)
        print(f"{title:<32}{'' if v is None else v:>14}{'skipped' if t is None else t:>30}")
    if skip:
        print(f"\nThingsBoard IoT Gateway skipped: {skip}")
    print(json.dumps({"bench": "peer", "machine": m, "peer_version": TB_VERSION,
                      "load": {"devices": args.devices, "registers": args.registers, "hz": args.hz},
                      "summary": summary, "runs": rows, "skipped": skip}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
