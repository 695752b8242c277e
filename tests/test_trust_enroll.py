"""Enrollment: the message kinds (protocols.enroll), the hub's desk, the identity files."""

from __future__ import annotations

import logging
import os
import pickle
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519 as pyca_ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from agent.ops import state
from hub.cli import hub_app
from hub.core import HubCore
from hub.enroll import (
    EnrollmentDesk,
    hub_key_path,
    load_or_create_hub_key,
    result_topic,
)
from protocols import enroll, envelope, topics
from protocols.ed25519 import PrivateKey
from protocols.errors import FrameError, LocalError, SignatureError
from protocols.reading import Reading

GW = "gw-enroll-1"
T0 = 1_767_225_600.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def desk(tmp_path: Path, clock: Clock) -> Iterator[EnrollmentDesk]:
    core = HubCore(tmp_path / "hub.sqlite3")
    yield EnrollmentDesk(core, PrivateKey.generate(), clock=clock, rotation_grace_s=600.0)
    core.close()


def ask(
    desk: EnrollmentDesk,
    key: PrivateKey,
    token: str = "",
    signer: PrivateKey | None = None,
    gw: str = GW,
    topic_gw: str = GW,
) -> enroll.EnrollResult:
    data, nonce = enroll.request(
        gateway=gw, new_key=key, token=token, signer=signer, now_ms=int(T0 * 1000)
    )
    answer = desk.handle_enroll_request(topics.enroll(topic_gw), data)
    assert answer is not None
    topic, wire = answer
    assert topic == result_topic(topic_gw)
    res = enroll.parse_result(wire)
    res.verify(nonce=nonce, pinned_hub_kid=envelope.key_id(desk.hub_public))
    return res


def batch(key: PrivateKey, seq: int) -> bytes:
    now_ms = time.time_ns() // 1_000_000  # readings are recent: the hub refuses very old ones
    return envelope.seal([Reading(1, now_ms, 1.5)], gateway=GW, key=key, epoch=1, seq=seq)


# --------------------------------------------------------------------------- protocol


def test_token_pins_the_hub_key() -> None:
    hub = PrivateKey.generate()
    token = enroll.new_token(hub.public_key())
    assert enroll.token_hub_kid(token) == envelope.key_id(hub.public_key())
    assert len(token.split(".")[0]) >= 26  # 128 random bits
    assert enroll.new_token(hub.public_key()) != token
    for bad in ("", "abc", "abc.xyz", ".0011223344556677", "s.00112233"):
        with pytest.raises(LocalError):
            enroll.token_hub_kid(bad)


def test_request_round_trip_and_proof_of_possession() -> None:
    key = PrivateKey.generate()
    data, nonce = enroll.request(gateway=GW, new_key=key, token="t.00", now_ms=5)
    req = enroll.parse_request(data)
    assert (req.gw, req.token, req.t, req.nonce) == (GW, "t.00", 5, nonce)
    assert req.pub == key.public_key().public_bytes_raw() and not req.is_rotation
    req.verify(key.public_key())
    with pytest.raises(SignatureError):
        req.verify(PrivateKey.generate().public_key())


def test_a_request_without_the_new_keys_proof_is_refused() -> None:
    """A rotation signed by the old key but enrolling someone else's public key."""
    old, new, victim = (PrivateKey.generate() for _ in range(3))
    data, _ = enroll.request(gateway=GW, new_key=new, signer=old, now_ms=1)
    msg = envelope.parse_message(data)
    fields = msg.fields(enroll._REQUEST_SCHEMA)
    fields["pub"] = victim.public_key().public_bytes_raw()  # swap the key, re-sign with old
    forged = envelope.sign_message(enroll.ENROLL_DOMAIN, fields, msg.payload, old)
    with pytest.raises(SignatureError, match="proof of possession"):
        enroll.parse_request(forged).verify(old.public_key())


def test_first_enrollment_needs_a_token() -> None:
    with pytest.raises(LocalError):
        enroll.request(gateway=GW, new_key=PrivateKey.generate(), now_ms=1)


def test_enrollment_domains_do_not_cross_with_batches() -> None:
    key = PrivateKey.generate()
    data, _ = enroll.request(gateway=GW, new_key=key, token="x.00", now_ms=1)
    msg = envelope.parse_message(data)
    with pytest.raises(SignatureError):
        msg.verify(envelope.BATCH_DOMAIN, key.public_key())
    with pytest.raises(FrameError):
        envelope.parse(data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_parsers_raise_only_protocol_errors(data: bytes) -> None:
    for parse in (enroll.parse_request, enroll.parse_result):
        try:
            out = parse(data)
        except FrameError:
            continue
        assert isinstance(out, enroll.EnrollRequest | enroll.EnrollResult)


# --------------------------------------------------------------------------- the desk


def test_token_enrolls_once_and_the_batch_then_verifies(desk: EnrollmentDesk) -> None:
    key = PrivateKey.generate()
    token = desk.issue_token(GW)
    res = ask(desk, key, token)
    assert res.ok and res.enrolled == envelope.key_id(key.public_key())
    assert res.hub_pub == desk.hub_public
    assert desk.core.handle(topics.batch(GW), batch(key, 0)) == "stored"
    # the same token again, even with the same key: used
    again = ask(desk, key, token)
    assert (again.ok, again.status) == (False, "token_used")
    assert desk.core.counters["enroll.enrolled"] == 1
    assert desk.core.counters["enroll.token_used"] == 1


def test_tokens_are_stored_hashed(desk: EnrollmentDesk) -> None:
    token = desk.issue_token(GW)
    dump = "\n".join(desk.core.db.iterdump())
    assert token.split(".")[0] not in dump


def test_expired_token_is_refused(desk: EnrollmentDesk, clock: Clock) -> None:
    token = desk.issue_token(GW, ttl_s=3600)
    clock.now += 3600
    assert ask(desk, PrivateKey.generate(), token).status == "token_expired"


def test_token_of_another_gateway_is_refused(desk: EnrollmentDesk) -> None:
    token = desk.issue_token("gw-other")
    assert ask(desk, PrivateKey.generate(), token).status == "bad_token"
    assert ask(desk, PrivateKey.generate(), "nope.0011").status == "bad_token"


def test_topic_and_request_must_agree(desk: EnrollmentDesk) -> None:
    token = desk.issue_token(GW)
    res = ask(desk, PrivateKey.generate(), token, topic_gw="gw-elsewhere")
    assert res.status == "topic_mismatch"
    # and the token was not spent by the refused request
    assert ask(desk, PrivateKey.generate(), token).ok


def test_forged_request_does_not_spend_the_token(desk: EnrollmentDesk) -> None:
    token = desk.issue_token(GW)
    key = PrivateKey.generate()
    data, _ = enroll.request(gateway=GW, new_key=key, token=token, now_ms=1)
    forged = bytearray(data)
    forged[-1] ^= 1  # the request signature
    answer = desk.handle_enroll_request(topics.enroll(GW), bytes(forged))
    assert answer is not None
    assert enroll.parse_result(answer[1]).status == "bad_signature"
    assert ask(desk, key, token).ok


def test_malformed_request_gets_a_signed_refusal(
    desk: EnrollmentDesk, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hub.enroll")
    for _ in range(5):
        answer = desk.handle_enroll_request(topics.enroll(GW), b"\x00garbage")
        assert answer is not None
        res = enroll.parse_result(answer[1])
        res.message.verify(enroll.RESULT_DOMAIN, desk.hub_public)
        assert res.status == "malformed"
    assert len(caplog.records) == 1  # logged once
    assert desk.handle_enroll_request("vitals/v1/enroll/gw-1/result", b"") is None
    assert desk.handle_enroll_request("vitals/v1/gw-1/batch", b"") is None


def test_a_new_token_enrollment_revokes_the_old_keys(desk: EnrollmentDesk) -> None:
    """A replaced SD card, a stolen unit: the gateway is born again."""
    first, second = PrivateKey.generate(), PrivateKey.generate()
    assert ask(desk, first, desk.issue_token(GW)).ok
    assert ask(desk, second, desk.issue_token(GW)).ok
    assert desk.core.handle(topics.batch(GW), batch(first, 0)) == "revoked_key"
    assert desk.core.handle(topics.batch(GW), batch(second, 0)) == "stored"


def test_rotation_keeps_the_old_key_for_the_grace_period(
    desk: EnrollmentDesk, clock: Clock
) -> None:
    old, new = PrivateKey.generate(), PrivateKey.generate()
    assert ask(desk, old, desk.issue_token(GW)).ok
    res = ask(desk, new, signer=old)
    assert res.ok and res.enrolled == envelope.key_id(new.public_key())
    handle = desk.core.handle
    assert handle(topics.batch(GW), batch(new, 0)) == "stored"
    assert handle(topics.batch(GW), batch(old, 1)) == "stored"  # spooled before the rotation
    clock.now += 601
    assert desk.retire_due() == 1
    assert handle(topics.batch(GW), batch(old, 2)) == "revoked_key"
    assert handle(topics.batch(GW), batch(new, 3)) == "stored"
    # the retired key can rotate no more
    assert ask(desk, PrivateKey.generate(), signer=old).status == "revoked_key"


def test_rotation_with_no_grace_revokes_at_once(desk: EnrollmentDesk) -> None:
    desk.rotation_grace_s = 0
    old, new = PrivateKey.generate(), PrivateKey.generate()
    assert ask(desk, old, desk.issue_token(GW)).ok
    assert ask(desk, new, signer=old).ok
    assert desk.core.handle(topics.batch(GW), batch(old, 0)) == "revoked_key"


def test_one_rotation_per_key_and_a_retry_is_idempotent(desk: EnrollmentDesk) -> None:
    old, new, thief = (PrivateKey.generate() for _ in range(3))
    assert ask(desk, old, desk.issue_token(GW)).ok
    assert ask(desk, new, signer=old).ok
    assert ask(desk, new, signer=old).ok  # the answer was lost: the same request again
    assert ask(desk, thief, signer=old).status == "already_rotated"
    assert desk.core.handle(topics.batch(GW), batch(thief, 0)) == "unknown_key"


def test_rotation_by_an_unknown_key_is_refused(desk: EnrollmentDesk) -> None:
    res = ask(desk, PrivateKey.generate(), signer=PrivateKey.generate())
    assert res.status == "unknown_key"


def test_result_from_another_hub_key_is_refused(desk: EnrollmentDesk) -> None:
    token = desk.issue_token(GW)
    key = PrivateKey.generate()
    data, nonce = enroll.request(gateway=GW, new_key=key, token=token, now_ms=1)
    impostor = enroll.result(
        gateway=GW,
        hub_key=PrivateKey.generate(),
        nonce=nonce,
        status="enrolled",
        enrolled=envelope.key_id(key.public_key()),
        now_ms=1,
    )
    with pytest.raises(SignatureError, match="pins"):
        enroll.parse_result(impostor).verify(
            nonce=nonce, pinned_hub_kid=enroll.token_hub_kid(token)
        )
    answer = desk.handle_enroll_request(topics.enroll(GW), data)
    assert answer is not None
    with pytest.raises(SignatureError, match="nonce"):  # our answer, but to another request
        enroll.parse_result(answer[1]).verify(nonce=bytes(16), pinned_hub_kid=None)


def test_hub_key_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "hub.key"
    key = load_or_create_hub_key(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_or_create_hub_key(path).public_key() == key.public_key()
    path.chmod(0o644)
    with pytest.raises(LocalError, match="chmod 600"):
        load_or_create_hub_key(path)


# --------------------------------------------------------------------------- identity


def test_identity_is_never_printed_or_pickled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ident = state.create_identity(tmp_path)
    seed = ident.private_key.private_bytes_raw()
    pem = ident.path.read_text()
    for shown in (repr(ident), str(ident), f"{ident}", caplog.text):
        assert seed.hex() not in shown and pem.splitlines()[1] not in shown
        assert seed.hex()[:16] not in shown
    assert ident.kid.hex() in repr(ident)
    with pytest.raises(TypeError):
        pickle.dumps(ident)


def test_identity_names_are_derived(tmp_path: Path) -> None:
    ident = state.create_identity(tmp_path)
    assert ident.kid == envelope.key_id(ident.public_key)
    assert ident.default_gateway_id == f"gw-{ident.kid.hex()[:12]}"
    assert topics.GATEWAY_ID.fullmatch(ident.default_gateway_id)
    assert len(ident.fingerprint.split(":")) == 8


def test_key_file_checks(tmp_path: Path) -> None:
    ident = state.create_identity(tmp_path)
    assert os.stat(ident.path).st_mode & 0o777 == 0o600
    with pytest.raises(state.IdentityError, match="exists already"):
        state.create_identity(tmp_path)
    ident.path.chmod(0o640)
    with pytest.raises(state.IdentityError, match="chmod 600"):
        state.load_identity(tmp_path)
    ident.path.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(ident.path, 12345, -1)
        with pytest.raises(state.IdentityError, match="owned by uid 12345"):
            state.load_identity(tmp_path)
        os.chown(ident.path, 0, -1)
    ident.path.write_bytes(
        pyca_ed25519.Ed25519PrivateKey.generate().private_bytes(  # a real OpenSSH key file
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(state.IdentityError, match="not a readable PEM"):
        state.load_identity(tmp_path)


def test_pending_key_rotation_files(tmp_path: Path) -> None:
    old = state.create_identity(tmp_path)
    pending = state.create_pending_key(tmp_path)
    assert state.create_pending_key(tmp_path).kid == pending.kid  # a retry reuses it
    assert state.load_identity(tmp_path).kid == old.kid  # not in use yet
    now = state.commit_pending_key(tmp_path)
    assert now.kid == pending.kid == state.load_identity(tmp_path).kid
    assert state.load_pending_key(tmp_path) is None
    state.create_pending_key(tmp_path)
    state.discard_pending_key(tmp_path)
    assert state.load_pending_key(tmp_path) is None


def test_hub_key_storage(tmp_path: Path) -> None:
    assert state.load_hub_key(tmp_path) is None
    raw = bytes(random.Random(1).randbytes(32))
    state.save_hub_key(tmp_path, raw)
    assert state.load_hub_key(tmp_path) == raw
    (tmp_path / state.HUB_KEY_FILE).write_text("zz\n")
    with pytest.raises(state.IdentityError):
        state.load_hub_key(tmp_path)
    state.save_hub_key(tmp_path, raw)
    (tmp_path / state.HUB_KEY_FILE).chmod(0o666)
    with pytest.raises(state.IdentityError, match="writable by others"):
        state.load_hub_key(tmp_path)


def test_hub_token_command(tmp_path: Path) -> None:
    """`vitals hub --db DB token GW`: a token that pins the hub key kept beside DB."""
    db = tmp_path / "hub.sqlite3"
    out = CliRunner().invoke(hub_app, ["--db", str(db), "token", GW, "--ttl", "2"])
    assert out.exit_code == 0, out.output
    token = out.stdout.strip()
    hub_key = load_or_create_hub_key(hub_key_path(db))
    assert enroll.token_hub_kid(token) == envelope.key_id(hub_key.public_key())
    core = HubCore(db)
    try:
        desk = EnrollmentDesk(core, hub_key)
        assert ask(desk, PrivateKey.generate(), token).ok
    finally:
        core.close()
