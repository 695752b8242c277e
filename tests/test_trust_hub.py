"""The hub refuses what it must, through ``HubCore.handle`` (the hub's only door).

Unknown key, bad signature, malformed bytes, replays, a revoked key: each is
refused (or, for an exact replay, dropped as a duplicate without storing
anything), counted by reason, logged once per (gateway, reason), and never
raises. The openssl check of the published test vector lives in
``tests/test_envelope.py::test_vector_verifies_with_openssl`` and
``::test_doc_recipe_verifies_the_vector``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub.core import HubCore
from hub.stats import hub_stats
from protocols import envelope, topics
from protocols.ed25519 import PrivateKey
from protocols.reading import Quality, Reading

GW = "gw-trust-1"
TOPIC = topics.batch(GW)
REFUSALS = {
    "malformed",
    "topic_mismatch",
    "unknown_key",
    "revoked_key",
    "bad_signature",
    "bad_payload",
    "too_old",
}
ANSWERS = REFUSALS | {"stored", "duplicate", "ignored", "meta", "malformed_meta"}
NOW_MS = (time.time_ns() // 1_000_000 // 60_000) * 60_000 - 3_600_000  # within the hub's age window


def random_batch(rng: random.Random, key: PrivateKey, seq: int, epoch: int = 1) -> bytes:
    readings = []
    for _ in range(rng.randint(1, 40)):
        kind = rng.randrange(4)
        value: float | int | bool | None
        if kind == 0:
            value = round(rng.uniform(-50, 150), rng.randint(0, 3))
        elif kind == 1:
            value = rng.randint(-(2**31), 2**31)
        elif kind == 2:
            value = rng.random() < 0.5
        else:
            value = None
        quality = Quality.COMM_ERROR if value is None else rng.choice(list(Quality))
        readings.append(Reading(rng.randrange(64), NOW_MS + rng.randrange(60_000), value, quality))
    return envelope.seal(
        readings,
        gateway=GW,
        key=key,
        epoch=epoch,
        seq=seq,
        enc=rng.choice(["msgpack", "msgpack+zlib"]),
    )


def stored_readings(core: HubCore) -> int:
    return int(core.db.execute("SELECT count(*) FROM readings").fetchone()[0])


@pytest.fixture
def core(tmp_path: Path) -> Iterator[HubCore]:
    c = HubCore(tmp_path / "hub.sqlite3")
    yield c
    c.close()


KEY = PrivateKey.from_private_bytes(bytes(range(32)))


def test_one_flipped_bit_in_each_of_1000_random_batches_is_refused(core: HubCore) -> None:
    rng = random.Random(20260505)
    core.enroll(GW, KEY.public_key().public_bytes_raw())
    batches = [random_batch(rng, KEY, seq) for seq in range(1000)]
    reasons: dict[str, int] = {}
    for wire in batches:
        flipped = bytearray(wire)
        bit = rng.randrange(len(wire) * 8)
        flipped[bit // 8] ^= 1 << (bit % 8)
        answer = core.handle(TOPIC, bytes(flipped))
        assert answer in REFUSALS, (bit, answer)
        reasons[answer] = reasons.get(answer, 0) + 1
    assert sum(reasons.values()) == 1000
    assert stored_readings(core) == 0
    # every refusal is counted by its reason
    assert {k: core.counters[f"rejected.{k}"] for k in reasons} == reasons
    # flips land in the signature, the header and the payload alike
    assert reasons.get("bad_signature", 0) > 500 and reasons.get("malformed", 0) > 10
    # and the unflipped originals are all good: the refusals were for the flip
    assert [core.handle(TOPIC, w) for w in batches] == ["stored"] * 1000


def test_replays_are_dropped_without_storing(core: HubCore) -> None:
    rng = random.Random(7)
    core.enroll(GW, KEY.public_key().public_bytes_raw())
    batches = [random_batch(rng, KEY, seq) for seq in range(20)]
    assert {core.handle(TOPIC, b) for b in batches} == {"stored"}
    n = stored_readings(core)
    # the same bytes again, in any order, as often as an attacker likes
    for b in rng.sample(batches, len(batches)) * 3:
        assert core.handle(TOPIC, b) == "duplicate"
    assert stored_readings(core) == n
    assert core.counters["duplicates"] == 60


def test_same_epoch_and_seq_with_other_readings_is_not_stored_twice(core: HubCore) -> None:
    """A gateway can never be made to count twice for one (epoch, seq)."""
    rng = random.Random(8)
    core.enroll(GW, KEY.public_key().public_bytes_raw())
    first, second = random_batch(rng, KEY, 5), random_batch(rng, KEY, 5)
    assert first != second
    assert core.handle(TOPIC, first) == "stored"
    n = stored_readings(core)
    assert core.handle(TOPIC, second) == "duplicate"
    assert stored_readings(core) == n


def test_a_batch_far_behind_the_window_is_refused(core: HubCore) -> None:
    rng = random.Random(9)
    core.enroll(GW, KEY.public_key().public_bytes_raw())
    assert core.handle(TOPIC, random_batch(rng, KEY, 0, epoch=50)) == "stored"
    old = envelope.seal(
        [Reading(1, int(time.time() * 1000) - 400 * 86_400_000, 1.0)],
        gateway=GW,
        key=KEY,
        epoch=2,
        seq=0,
    )
    assert core.handle(TOPIC, old) in REFUSALS


def test_unknown_key_is_refused(core: HubCore) -> None:
    stranger = PrivateKey.generate()
    assert core.handle(TOPIC, random_batch(random.Random(1), stranger, 0)) == "unknown_key"
    assert core.counters["rejected.unknown_key"] == 1


def test_a_key_of_another_gateway_is_refused(core: HubCore) -> None:
    """A key enrolled for gw-other cannot speak for GW, even with its kid."""
    other = PrivateKey.generate()
    core.enroll("gw-other", other.public_key().public_bytes_raw())
    assert core.handle(TOPIC, random_batch(random.Random(2), other, 0)) == "unknown_key"


def test_topic_and_header_must_agree(core: HubCore) -> None:
    core.enroll(GW, KEY.public_key().public_bytes_raw())
    wire = random_batch(random.Random(3), KEY, 0)
    assert core.handle(topics.batch("gw-elsewhere"), wire) == "topic_mismatch"


def test_revoked_key_is_refused_and_a_new_key_works(core: HubCore) -> None:
    rng = random.Random(4)
    kid = core.enroll(GW, KEY.public_key().public_bytes_raw())
    assert core.handle(TOPIC, random_batch(rng, KEY, 0)) == "stored"
    core.revoke(GW, kid)
    assert core.handle(TOPIC, random_batch(rng, KEY, 1)) == "revoked_key"
    new = PrivateKey.generate()
    core.enroll(GW, new.public_key().public_bytes_raw())
    assert core.handle(TOPIC, random_batch(rng, new, 2)) == "stored"
    assert core.handle(TOPIC, random_batch(rng, KEY, 3)) == "revoked_key"


def test_revocation_survives_a_hub_restart(tmp_path: Path) -> None:
    db = tmp_path / "hub.sqlite3"
    core = HubCore(db)
    kid = core.enroll(GW, KEY.public_key().public_bytes_raw())
    core.revoke(GW, kid)
    core.close()
    again = HubCore(db)
    try:
        assert again.handle(TOPIC, random_batch(random.Random(5), KEY, 0)) == "revoked_key"
    finally:
        again.close()


def test_each_reason_is_logged_once_per_gateway(
    core: HubCore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hub.core")
    for _ in range(50):
        core.handle(TOPIC, b"\x94garbage")
    for _ in range(50):
        core.handle(TOPIC, random_batch(random.Random(6), PrivateKey.generate(), 0))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "malformed" in warnings[0] and "unknown_key" in warnings[1]
    assert core.counters["rejected.malformed"] == 50
    assert core.counters["rejected.unknown_key"] == 50


def test_counters_by_reason_are_persisted(tmp_path: Path) -> None:
    db = tmp_path / "hub.sqlite3"
    core = HubCore(db)
    core.handle(TOPIC, b"")
    core.close()
    assert hub_stats(db)["rejected"] == {"malformed": 1}
    again = HubCore(db)  # the same worker picks its counters up again
    assert again.counters["rejected.malformed"] == 1
    again.close()


# --------------------------------------------------------------------------- fuzz

_SEED_BATCH = random_batch(random.Random(11), KEY, 3)


@pytest.fixture(scope="module")
def fuzz_core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubCore]:
    """One hub for every example (module scope: hypothesis reruns the test body)."""
    c = HubCore(tmp_path_factory.mktemp("fuzz") / "hub.sqlite3")
    c.enroll(GW, KEY.public_key().public_bytes_raw())
    yield c
    c.close()


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.sampled_from([TOPIC, topics.meta(GW), "vitals/v1/+/batch", "junk", "vitals/v1//batch"]),
    st.binary(max_size=600),
)
def test_fuzz_hub_with_random_bytes(fuzz_core: HubCore, topic: str, data: bytes) -> None:
    assert fuzz_core.handle(topic, data) in ANSWERS


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.data())
def test_fuzz_hub_with_mutated_batches(fuzz_core: HubCore, data: st.DataObject) -> None:
    """Bytes replaced, inserted or cut in a genuine batch: an answer, never an exception."""
    wire = bytearray(_SEED_BATCH)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["set", "insert", "cut"]))
        i = data.draw(st.integers(0, max(len(wire) - 1, 0)))
        if op == "set" and wire:
            wire[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            wire[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del wire[i : i + data.draw(st.integers(1, 16))]
    answer = fuzz_core.handle(TOPIC, bytes(wire))
    assert answer in ANSWERS
    if answer in ("stored", "duplicate"):
        assert bytes(wire) == _SEED_BATCH  # only the genuine bytes get through
