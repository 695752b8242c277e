"""Regenerate the envelope test vectors: ``python tests/vectors/make_vectors.py``.

Deterministic: the key is fixed and Ed25519 signatures are deterministic, so
running this again must leave ``git diff`` empty (``tests/test_envelope.py``
checks that the files match what the code produces).

Files (hex files hold one line of lowercase hex):
  seed.hex       the Ed25519 private key seed (32 bytes) -- a TEST key, public
  pub.hex        the raw public key (32 bytes)
  pub.pem        the public key as SubjectPublicKeyInfo PEM (for openssl)
  kid.hex        the key id: SHA-256(raw public key)[:8]
  batch.hex      a whole batch as sent on the wire
  protected.hex  its protected header (msgpack map)
  payload.hex    its payload (enc "msgpack": plain msgpack)
  signed.hex     the bytes signed: msgpack ["vitals/batch/v1", protected, payload]
  sig.hex        the signature (64 bytes)
  header.json    the protected header, decoded (kid as hex)
  readings.json  the readings, decoded, in payload order

The files above hold a batch of payload layout 1 (series by point: points
repeat). The same seven files prefixed ``columns_`` hold a batch of layout 2
(columns: one poll of three devices, each point once), signed by the same key.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

from protocols.ed25519 import PrivateKey
from protocols.envelope import BATCH_DOMAIN, parse, seal, signed_bytes
from protocols.reading import Quality, Reading

HERE = Path(__file__).resolve().parent
SEED = hashlib.sha256(b"vitals test vector key v1").digest()
GATEWAY = "gw-0042"
EPOCH = 7
SEQ = 12
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def _f32(x: float) -> float:
    return float(struct.unpack(">f", struct.pack(">f", x))[0])


def vector_readings() -> list[Reading]:
    """Two devices polled three times: every value kind the payload knows."""
    out: list[Reading] = []
    noise = [52.3, 52.9, 61.0]
    temp = [21.5, 21.5, 21.6]
    pressure = [_f32(1013.2), _f32(1013.3), _f32(1013.3)]
    for k in range(3):
        ta = T0 + 1000 * k + (0, 2, 1)[k]  # device A: a noise meter
        out.append(Reading(1, ta, noise[k]))
        out.append(Reading(2, ta, [True, True, False][k]))  # overload flag
        out.append(Reading(3, ta, 4711 + k))  # sample counter
        tb = T0 + 40 + 1000 * k  # device B: a weather station
        out.append(Reading(10, tb, temp[k]))
        out.append(Reading(11, tb, pressure[k]))  # an f32 register
        out.append(Reading(12, tb, _f32(0.1 + k / 3)))  # f32, not a short decimal
        out.append(Reading(13, tb, "NE"))
    out[-1] = Reading(13, out[-1].ts, None, Quality.COMM_ERROR)
    out[-4] = Reading(10, out[-4].ts, 21.6, Quality.STALE)
    return out


def columns_readings() -> list[Reading]:
    """One poll of three devices, each point once (layout 2): every kind of value."""
    a, b, c = T0 + 2, T0 + 40, T0 + 101
    return [
        Reading(1, a, 52.3),  # device A, a noise meter
        Reading(2, a, True),  # overload flag
        Reading(3, a, 4711),  # sample counter
        Reading(4, a, 61.4),
        Reading(10, b, 21.5, Quality.STALE),  # device B, a weather station
        Reading(11, b, _f32(1013.2)),  # an f32 register
        Reading(12, b, _f32(1 / 3)),  # f32, not a short decimal
        Reading(13, b, "NE"),
        Reading(14, b, None, Quality.COMM_ERROR),  # a sensor behind it did not answer
        Reading(20, c, 12.5),  # device C: two registers of 0.1
        Reading(21, c, -3.5),
    ]


def build() -> dict[str, bytes]:
    """File name -> contents, exactly as written to tests/vectors/."""
    key = PrivateKey.from_private_bytes(SEED)
    pub = key.public_key()
    files = {
        "seed.hex": hexline(SEED),
        "pub.hex": hexline(pub.public_bytes_raw()),
        "pub.pem": pub.public_pem(),
        "kid.hex": hexline(hashlib.sha256(pub.public_bytes_raw()).digest()[:8]),
    }
    files.update(_batch_files("", _seal(key, vector_readings())))
    files.update(_batch_files("columns_", _seal(key, columns_readings())))
    return files


def _seal(key: PrivateKey, readings: list[Reading]) -> bytes:
    return seal(readings, gateway=GATEWAY, key=key, epoch=EPOCH, seq=SEQ, enc="msgpack")


def hexline(b: bytes) -> bytes:
    return b.hex().encode() + b"\n"


def jsonfile(obj: object) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()


def _batch_files(prefix: str, wire: bytes) -> dict[str, bytes]:
    batch = parse(wire)
    h = batch.header
    header = {
        "gw": h.gw,
        "kid": h.kid.hex(),
        "epoch": h.epoch,
        "seq": h.seq,
        "t0": h.t0,
        "t1": h.t1,
        "n": h.n,
        "enc": h.enc,
    }
    readings = [
        {"point": r.point, "ts": r.ts, "value": r.value, "quality": r.quality.name}
        for r in batch.readings()
    ]

    files = {
        "batch.hex": hexline(wire),
        "protected.hex": hexline(batch.protected),
        "payload.hex": hexline(batch.payload),
        "signed.hex": hexline(signed_bytes(BATCH_DOMAIN, batch.protected, batch.payload)),
        "sig.hex": hexline(batch.signature),
        "header.json": jsonfile(header),
        "readings.json": jsonfile(readings),
    }
    return {prefix + name: content for name, content in files.items()}


def main() -> int:
    for name, content in build().items():
        (HERE / name).write_bytes(content)
        print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
