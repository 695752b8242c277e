"""Bytes per reading on the wire: ``python -m bench.wire``.

One realistic minute of the demo's six terminals (noise meter, weather
station, water-level radar, PM monitor, gas box, manhole sensor), polled at
the demo's intervals with a few ms of jitter, values from the simulator's
signal models passed through the real register codecs (so they carry exactly
the resolution a device gives). The readings are cut into batches by the
default batch rule (500 readings or 5 s), sealed, and each batch is measured
as the MQTT 3.1.1 PUBLISH packet that carries it (fixed header, topic, packet
id, payload): protected header and signature amortised. TCP/IP headers and
the 4-byte PUBACK coming back are not counted (the PUBACK is shown apart).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator

from agent.ops.config import BatchConfig
from drivers.profiles import load_profile
from protocols import ed25519, envelope, topics
from protocols.modbus import decode, encode, plan
from protocols.reading import Quality, Reading
from simulator.demo import DEMO_DEVICES
from simulator.signals import ProfileRegisters

GATEWAY = "gw-0042-district-07"  # a realistic id length


def mqtt_publish_len(topic: str, payload_len: int, qos: int = 1) -> int:
    """Size of an MQTT 3.1.1 PUBLISH packet (section 3.3)."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + payload_len
    varint = 1
    while remaining >= 128**varint:
        varint += 1
    return 1 + varint + remaining


def realistic_minute(seconds: float = 60.0, seed: int = 7) -> list[Reading]:
    """Readings in arrival order, as the demo's pollers would produce them."""
    rng = random.Random(seed)
    t0 = 1_780_000_000_000
    events: list[tuple[int, Reading]] = []
    pid = 0
    for dev_i, (_, profile_name, interval) in enumerate(DEMO_DEVICES):
        profile = load_profile(profile_name)
        ids = {}
        for p in profile.points:
            ids[p.spec] = (pid, p)
            pid += 1
        regs = ProfileRegisters(profile, seed=dev_i)  # the demo's terminals' values
        groups: dict[float, list] = {}
        for p in profile.points:
            groups.setdefault(p.interval_s or interval or profile.interval_s, []).append(p.spec)
        for every, specs in groups.items():
            reqs = plan(specs, max_registers=profile.max_registers, max_gap=profile.max_gap)
            k = 0
            while k * every < seconds:
                base = t0 + int(k * every * 1000) + dev_i * 37
                for r_i, req in enumerate(reqs):
                    ts = base + r_i * 9 + rng.randint(0, 6)  # a TCP round trip or two later
                    cache: dict[str, object] = {}
                    for spec in req.points:
                        point_id, point = ids[spec]
                        value = decode(spec, encode(spec, regs.value(spec.name, ts / 1000, cache)))
                        q = Quality.GOOD
                        if (
                            point.range
                            and not isinstance(value, (str, bool))
                            and not point.range[0] <= value <= point.range[1]
                        ):
                            q = Quality.OUT_OF_RANGE
                        events.append((ts, Reading(point_id, ts, value, q)))
                k += 1
    events.sort(key=lambda e: e[0])
    return [r for _, r in events]


def batches(readings: list[Reading], max_n: int, max_age_ms: int) -> Iterator[list[Reading]]:
    cur: list[Reading] = []
    for r in readings:
        if cur and r.ts - cur[0].ts >= max_age_ms:
            yield cur
            cur = []
        cur.append(r)
        if len(cur) >= max_n:
            yield cur
            cur = []
    if cur:
        yield cur


def measure(readings: list[Reading], enc: str, max_n: int, max_age_ms: int) -> dict[str, float]:
    key = ed25519.PrivateKey.from_private_bytes(bytes(range(32)))
    topic = topics.batch(GATEWAY)
    n_batches = wire = payload = 0
    for seq, b in enumerate(batches(readings, max_n, max_age_ms)):
        data = envelope.seal(b, gateway=GATEWAY, key=key, epoch=1, seq=seq, enc=enc)
        n_batches += 1
        payload += len(data)
        wire += mqtt_publish_len(topic, len(data))
    n = len(readings)
    return {
        "readings": n,
        "batches": n_batches,
        "readings_per_batch": round(n / n_batches, 1),
        "envelope_bytes_per_reading": round(payload / n, 3),
        "wire_bytes_per_reading": round(wire / n, 3),
        "puback_bytes_per_reading": round(4 * n_batches / n, 3),
    }


def naive_json_per_poll(readings: list[Reading]) -> float:
    """Bytes per value of a ThingsBoard-style JSON telemetry message per poll, for scale."""
    by_ts: dict[int, list[Reading]] = {}
    for r in readings:
        by_ts.setdefault(r.ts, []).append(r)
    total = 0
    for ts, rs in by_ts.items():
        body = json.dumps({"ts": ts, "values": {f"p{r.point}": r.value for r in rs}}).encode()
        total += mqtt_publish_len("v1/gateway/telemetry", len(body))
    return round(total / len(readings), 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.wire", description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args(argv)
    defaults = BatchConfig()
    readings = realistic_minute(args.seconds)
    max_age_ms = int(defaults.max_age_s * 1000)
    rows = {
        enc: measure(readings, enc, defaults.max_readings, max_age_ms)
        for enc in ("msgpack+zlib", "msgpack")
    }
    naive = naive_json_per_poll(readings)
    print(f"one minute of the demo's {len(DEMO_DEVICES)} terminals: {len(readings)} readings")
    print(
        f"batch rule: {defaults.max_readings} readings or {defaults.max_age_s:g} s (the defaults)"
    )
    print()
    print(
        f"{'encoding':<14}{'batches':>8}{'per batch':>11}{'envelope B/r':>14}{'wire B/r':>10}{'PUBACK B/r':>12}"
    )
    for enc, m in rows.items():
        print(
            f"{enc:<14}{m['batches']:>8}{m['readings_per_batch']:>11}"
            f"{m['envelope_bytes_per_reading']:>14}{m['wire_bytes_per_reading']:>10}"
            f"{m['puback_bytes_per_reading']:>12}"
        )
    print(
        f"{'JSON per poll':<14}{'':>8}{'':>11}{'':>14}{naive:>10}   (ThingsBoard-style, unsigned, for scale)"
    )
    default = rows[defaults.encoding]
    ok = default["wire_bytes_per_reading"] <= 6.0
    print(
        f"\ndefault encoding {defaults.encoding}: {default['wire_bytes_per_reading']} bytes/reading on the wire "
        f"({'within' if ok else 'OVER'} the 6-byte budget)"
    )
    print(
        json.dumps(
            {
                "bench": "wire",
                "encoding": defaults.encoding,
                **default,
                "by_encoding": rows,
                "json_per_poll_bytes_per_value": naive,
                "budget": 6.0,
                "ok": ok,
            }
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
