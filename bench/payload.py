"""The payload codec alone, layout 1 against layout 2: ``python -m bench.payload``.

A batch of the fleet's shape (``bench.tcp_fleet``: 500 devices of the 30
registers of ``FLEET-30``, u16/i16 scaled by 0.1, polled at 1 Hz on a 100 ms
grid; the agent's default batch of 5000 readings, so each point appears once),
values from the simulator's signal models through the real register codecs,
held as columns as the agent's batcher holds them (decisions 47).
For each payload layout: the bytes (``msgpack+zlib``), the encoder
(``encode_readings``), the whole seal (``envelope.seal``: encoder, zlib,
Ed25519), the decoder (``decode_readings``) and the hub's side (``parse``,
``verify``, ``readings()``). Times are CPU time of this process
(``time.process_time``) in ms, the median of ``--repeat`` rounds that
alternate the layouts.

The same for the demo's minute (``bench.wire``: six terminals, points repeat
within a batch), where the chosen layout is 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.bus import machine
from bench.tcp_fleet import POINTS, profile_toml
from drivers.profiles import load_profile
from protocols import ed25519, envelope
from protocols.modbus import decode, encode
from protocols.payload import (
    choose_layout,
    decode_readings,
    encode_readings,
    encode_readings_span,
)
from protocols.reading import Columns, Quality, Reading
from simulator.signals import ProfileRegisters

GATEWAY = "gw-fleet-1"
T0 = 1_780_000_000_000


def fleet_batch(
    n: int = 5000, devices: int = 500, seed: int = 1, mantissas: bool = True
) -> Columns:
    """The first ``n`` readings of the fleet, in arrival order (a device's 30 share a
    time), as columns: what the agent's batcher holds (decisions 47). With
    ``mantissas``, each poll's values come with their mantissas over 10 (scale 0.1),
    as the agent's poller hands them on (decisions 51); without, the encoder
    searches for the decimals itself (an older agent, or a profile that mixes)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fleet30.toml"
        path.write_text(profile_toml())
        profile = load_profile(path)
    rng = random.Random(seed)
    out = Columns()
    for dev in range(devices):
        regs = ProfileRegisters(profile, seed=dev)
        ts = T0 + (dev % 10) * 100 + rng.randint(1, 4)  # buses start on a 100 ms grid
        cache: dict[str, object] = {}
        values: list[float] = []
        quals: list[Quality] = []
        for point in profile.points:
            spec = point.spec
            value = decode(spec, encode(spec, regs.value(spec.name, ts / 1000, cache)))
            assert isinstance(value, float)
            low, high = point.range or (value, value)
            values.append(value)
            quals.append(Quality.GOOD if low <= value <= high else Quality.OUT_OF_RANGE)
        take = min(POINTS, n - len(out))
        ids = range(dev * POINTS, dev * POINTS + take)
        if mantissas:
            ms = [round(v * 10) for v in values[:take]]
            assert [m / 10 for m in ms] == values[:take]
            out.add(ids, ts, values[:take], quals[:take], ms, 1)
        else:
            out.add(ids, ts, list(values[:take]), quals[:take])
        if len(out) == n:
            break
    return out


STEPS = ("encode_ms", "seal_ms", "decode_ms", "hub_ms")


def steps(readings: Sequence[Reading], layout: int) -> tuple[int, dict[str, Callable[[], object]]]:
    """The payload's size and the four timed steps of one batch in ``layout``."""
    key = ed25519.PrivateKey.from_private_bytes(bytes(range(32)))
    pub = key.public_key()
    payload = encode_readings(readings, layout=layout)

    def seal() -> bytes:  # envelope.seal with the layout forced
        payload, t0, t1 = encode_readings_span(readings, layout=layout)
        protected = {
            "gw": GATEWAY,
            "kid": envelope.key_id(key),
            "epoch": 1,
            "seq": 0,
            "t0": t0,
            "t1": t1,
            "n": len(readings),
            "enc": "msgpack+zlib",
        }
        return envelope.sign_message(envelope.BATCH_DOMAIN, protected, payload, key)

    wire = seal()
    batch = envelope.parse(wire)
    batch.verify(pub)
    assert sorted(batch.readings()) == sorted(readings), "the batch does not round-trip"

    def hub() -> None:
        b = envelope.parse(wire)
        b.verify(pub)
        b.readings()

    return len(payload), {
        "encode_ms": lambda: encode_readings(readings, layout=layout),
        "seal_ms": seal,
        "decode_ms": lambda: decode_readings(payload),
        "hub_ms": hub,
    }


def measure(bs: Sequence[Sequence[Reading]], repeat: int) -> dict[str, dict[str, float]]:
    """Both layouts over the batches ``bs``: rounds alternate the layouts (this
    machine's speed drifts), each figure the median of the rounds' sums."""
    prepared = {layout: [steps(b, layout) for b in bs] for layout in (1, 2)}
    times: dict[int, dict[str, list[float]]] = {lay: {s: [] for s in STEPS} for lay in (1, 2)}
    for r in range(repeat):
        for layout in (1, 2) if r % 2 else (2, 1):
            for step in STEPS:
                gc.collect()  # no step pays for the garbage of another
                t = time.process_time()
                for _, fns in prepared[layout]:
                    fns[step]()
                times[layout][step].append(time.process_time() - t)
    n = sum(map(len, bs))
    out: dict[str, dict[str, float]] = {}
    for layout, by_step in times.items():
        total = sum(size for size, _ in prepared[layout])
        row = {s: round(statistics.median(ts) * 1000, 3) for s, ts in by_step.items()}
        out[str(layout)] = {
            "readings": n,
            "batches": len(bs),
            "payload_bytes": total,
            "bytes_per_reading": round(total / n, 3),
            **row,
            "hub_readings_per_s": round(n / row["hub_ms"] * 1000) if row["hub_ms"] else 0,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.payload", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--repeat", type=int, default=31, help="rounds (median)")
    args = ap.parse_args(argv)
    from bench.wire import batches, realistic_minute

    cases = {"fleet": [fleet_batch()], "search": [fleet_batch(mantissas=False)]}
    cases["demo"] = list(batches(realistic_minute(), 500, 5000))
    rows = {name: measure(bs, args.repeat) for name, bs in cases.items()}
    chosen = {name: sorted({choose_layout(b) for b in bs}) for name, bs in cases.items()}

    m = machine()
    print(f"machine: {m['cpu']}, {m['nproc']} CPUs, Python {m['python']}")
    print("fleet: one 5000-reading batch of 500 devices x 30 points (each point once),")
    print("  with the poller's mantissas; search: the same batch without (the encoder")
    print("  searches for the decimals);")
    print("demo: bench.wire's minute in 12 batches (points repeat). Times: ms of CPU, median.")
    print()
    head = f"{'case':<7}{'layout':>7}{'B/reading':>11}{'encode':>9}{'seal':>9}{'decode':>9}{'hub':>9}{'hub r/s':>11}"
    print(head)
    for name, by_layout in rows.items():
        for layout, m in by_layout.items():
            mark = " <- chosen" if int(layout) in chosen[name] else ""
            print(
                f"{name:<7}{layout:>7}{m['bytes_per_reading']:>11}{m['encode_ms']:>9}"
                f"{m['seal_ms']:>9}{m['decode_ms']:>9}{m['hub_ms']:>9}"
                f"{m['hub_readings_per_s']:>11,}{mark}"
            )
    f1, f2 = rows["fleet"]["1"], rows["fleet"]["2"]
    print(
        f"\nfleet batch, layout 2 against 1: encode {f2['encode_ms'] / f1['encode_ms']:.2f}x, "
        f"seal {f2['seal_ms'] / f1['seal_ms']:.2f}x, "
        f"bytes {f2['payload_bytes'] / f1['payload_bytes']:.2f}x, "
        f"hub {f1['hub_ms'] / f2['hub_ms']:.1f}x faster"
    )
    print(json.dumps({"bench": "payload", "machine": machine(), "chosen": chosen, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
