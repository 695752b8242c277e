"""Ed25519 per call, protocols.ed25519 against cryptography bare: ``python -m bench.ed25519``.

Signs and verifies a message of ``--bytes`` (2 KB: a sealed batch of ~500
readings is 1.6-2 KB) with the same seed through ``protocols.ed25519`` and
through ``cryptography`` called directly (what our thin layer costs), and
prints the best of ``--rounds`` rounds in µs per call; also the cost of a key
made from raw bytes (what the hub pays per verification when it holds raw
public keys). The resident-memory side is in ``docs/decisions.md`` (36).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric import ed25519 as pyca

from protocols import ed25519


def best_us(fn: Callable[[], object], calls: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def measure(
    key: ed25519.PrivateKey | pyca.Ed25519PrivateKey,
    public_from_raw: Callable[[bytes], object],
    size: int,
    calls: int,
    rounds: int,
) -> dict[str, float]:
    pub = key.public_key()
    raw = pub.public_bytes_raw()
    msg = bytes(i % 251 for i in range(size))
    sig = key.sign(msg)
    return {
        "sign_us": round(best_us(lambda: key.sign(msg), calls, rounds), 1),
        "verify_us": round(best_us(lambda: pub.verify(sig, msg), calls // 2, rounds), 1),
        "public_from_raw_us": round(best_us(lambda: public_from_raw(raw), calls, rounds), 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.ed25519", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--bytes", type=int, default=2048, help="message size")
    ap.add_argument("--calls", type=int, default=5000, help="calls per round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; the best counts")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    seed = bytes(range(32))
    n = (args.bytes, args.calls, args.rounds)
    rows = {
        "protocols.ed25519": measure(
            ed25519.PrivateKey.from_private_bytes(seed), ed25519.PublicKey.from_public_bytes, *n
        ),
        "cryptography": measure(
            pyca.Ed25519PrivateKey.from_private_bytes(seed),
            pyca.Ed25519PublicKey.from_public_bytes,
            *n,
        ),
    }
    if args.json:
        print(json.dumps({"bytes": args.bytes, "implementations": rows}))
        return 0
    print(f"Ed25519, {args.bytes}-byte message, best of {args.rounds} x {args.calls} calls")
    print(f"{'':<19}{'sign µs':>9}{'verify µs':>11}{'key from raw µs':>17}")
    for name, r in rows.items():
        print(f"{name:<19}{r['sign_us']:>9}{r['verify_us']:>11}{r['public_from_raw_us']:>17}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
