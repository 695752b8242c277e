"""Ed25519 per call, libcrypto via ctypes vs cryptography: ``python -m bench.ed25519``.

Signs and verifies a message of ``--bytes`` (2 KB: a sealed batch of ~500
readings is 1.6-2 KB) with the same seed under both backends of
``protocols.ed25519`` and prints the best of ``--rounds`` rounds in µs per
call; also the cost of a key made from raw bytes (what the hub pays per
verification when it holds raw public keys). The resident-memory side is in
``docs/decisions.md`` (16).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from protocols import ed25519
from protocols.errors import LocalError


def best_us(fn: Callable[[], object], calls: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def measure(backend: str, size: int, calls: int, rounds: int) -> dict[str, float]:
    key = ed25519.PrivateKey.from_private_bytes(bytes(range(32)), backend=backend)
    pub = key.public_key()
    raw = pub.public_bytes_raw()
    msg = bytes(i % 251 for i in range(size))
    sig = key.sign(msg)
    return {
        "sign_us": round(best_us(lambda: key.sign(msg), calls, rounds), 1),
        "verify_us": round(best_us(lambda: pub.verify(sig, msg), calls // 2, rounds), 1),
        "public_from_raw_us": round(
            best_us(
                lambda: ed25519.PublicKey.from_public_bytes(raw, backend=backend), calls, rounds
            ),
            2,
        ),
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
    rows = {
        b: measure(b, args.bytes, args.calls, args.rounds)
        for b in ed25519.BACKENDS
        if b != "libcrypto" or _has_libcrypto()
    }
    if args.json:
        print(json.dumps({"bytes": args.bytes, "backends": rows}))
        return 0
    print(f"Ed25519, {args.bytes}-byte message, best of {args.rounds} x {args.calls} calls")
    print(f"{'backend':<14}{'sign µs':>9}{'verify µs':>11}{'key from raw µs':>17}")
    for name, r in rows.items():
        print(f"{name:<14}{r['sign_us']:>9}{r['verify_us']:>11}{r['public_from_raw_us']:>17}")
    return 0


def _has_libcrypto() -> bool:
    try:
        ed25519.PrivateKey.from_private_bytes(bytes(32), backend="libcrypto")
    except LocalError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
