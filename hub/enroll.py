"""The hub's enrollment desk: one-time tokens, enrollment and key rotation.

An operator issues a token for a gateway id (:meth:`EnrollmentDesk.issue_token`,
``vitals hub token``) and hands it to the field technician; the gateway sends a
signed ``vitals/enroll/v1`` request (:mod:`protocols.enroll`) on
``{prefix}/enroll/{gw}``; :meth:`EnrollmentDesk.handle_enroll_request` checks
it and records the key through :meth:`HubCore.enroll`, and the signed answer
goes back on ``{prefix}/enroll/{gw}/result``.

Rules (``docs/security.md``):

* a token is stored only as its SHA-256, is bound to one gateway id, works
  once (an atomic ``UPDATE ... WHERE used IS NULL``), and not after its expiry;
* the request must prove possession of the enrolled key (and, for a rotation,
  be signed by the gateway's current, unrevoked key);
* a token enrollment is a new birth of the gateway: every other key of that
  gateway is revoked at once (a replaced SD card, a stolen unit);
* a rotation revokes the old key after ``rotation_grace_s`` (default one hour,
  so batches already spooled under the old key still arrive); 0 revokes it at
  once, for a rotation after a suspected compromise. One rotation per old key:
  the first one wins.

:func:`serve` runs the desk on its own MQTT connection beside the hub workers.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from hub.core import HubCore
from hub.reconnect import Outage
from hub.store import is_url
from protocols import ed25519, enroll, envelope, topics
from protocols.errors import KeyFormatError, LocalError, ProtocolError, SignatureError

__all__ = [
    "EnrollmentDesk",
    "hub_key_path",
    "load_or_create_hub_key",
    "result_topic",
    "serve",
]

log = logging.getLogger(__name__)

result_topic = topics.enroll_result  # the hub's signed answers


def load_or_create_hub_key(path: Path) -> ed25519.PrivateKey:
    """The hub's Ed25519 key (PEM, mode 0600), created on first use.

    Workers starting together may all find none: each writes a key of its own
    to a temporary file and links it into place (atomic, refused if one is
    there), so all of them use the one that won, never a half-written one."""
    if not path.exists():
        key = ed25519.PrivateKey.generate()
        pem = key.private_pem()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
            return key
        except FileExistsError:
            pass  # another worker's key won: read it below
        finally:
            os.unlink(tmp)
    if path.stat().st_mode & 0o077:
        raise LocalError(f"{path}: the hub key must not be readable by others (chmod 600)")
    try:
        return ed25519.PrivateKey.from_pem(path.read_bytes())
    except KeyFormatError as exc:
        raise KeyFormatError(f"{path}: not an Ed25519 PKCS#8 PEM key: {exc}") from exc


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.strip().encode()).digest()


class EnrollmentDesk:
    """Token issue and enrollment requests, over the hub's database."""

    def __init__(
        self,
        core: HubCore,
        hub_key: ed25519.PrivateKey,
        *,
        rotation_grace_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
        prefix: str | None = None,  # default: the core's
    ) -> None:
        self.core = core
        self.store = core.store
        self.hub_key = hub_key
        self.hub_public = hub_key.public_key().public_bytes_raw()
        self.rotation_grace_s = rotation_grace_s
        self.clock = clock
        self.prefix = core.prefix if prefix is None else prefix
        self._logged: set[tuple[str, str]] = set()

    # -- operator side --------------------------------------------------------

    def issue_token(self, gateway: str, ttl_s: float = 86400.0) -> str:
        """A one-time token to enroll ``gateway``, valid ``ttl_s`` seconds."""
        topics.enroll(gateway)  # validates the id
        token = enroll.new_token(self.hub_public)
        now = self.clock()
        self.store.add_token(_hash(token), gateway, now, now + ttl_s)
        log.info("enrollment token issued for %s, valid %.0f s", gateway, ttl_s)
        return token

    def retire_due(self) -> int:
        """Revoke the old keys of rotations whose grace period is over; how many."""
        now = self.clock()
        rows = self.store.due_rotations(now)
        for gw, kid in rows:
            self.core.revoke(gw, kid)
            self.store.finish_rotation(gw, kid)
            log.info("key %s of %s revoked (rotation grace over)", kid.hex(), gw)
        return len(rows)

    # -- messages -------------------------------------------------------------

    def handle_enroll_request(self, topic: str, data: bytes) -> tuple[str, bytes] | None:
        """``(result topic, signed result)`` for a request on ``topic``; None if not ours."""
        topic_gw = topics.enroll_gateway(topic, self.prefix)
        if topic_gw is None:
            return None
        self.retire_due()
        nonce = b""
        try:
            req = enroll.parse_request(data)
            nonce = req.nonce
            status, enrolled, detail = self._decide(topic_gw, req)
        except ProtocolError as exc:
            status, enrolled, detail = "malformed", b"", str(exc)
        self.core.counters[f"enroll.{status}"] += 1
        self.core.flush()  # the counters written now: enrollments are rare
        if status != enroll.ENROLLED and (topic_gw, status) not in self._logged:
            self._logged.add((topic_gw, status))
            log.warning("enrollment of %s refused: %s (%s)", topic_gw, status, detail)
        answer = enroll.result(
            gateway=topic_gw,
            hub_key=self.hub_key,
            nonce=nonce,
            status=status,
            enrolled=enrolled,
            detail=detail,
            now_ms=int(self.clock() * 1000),
        )
        return result_topic(topic_gw, self.prefix), answer

    def _decide(
        self, topic_gw: str, req: enroll.EnrollRequest
    ) -> tuple[enroll.EnrollStatus, bytes, str]:
        if req.gw != topic_gw:
            return "topic_mismatch", b"", f"request names {req.gw!r}"
        if req.is_rotation:
            return self._rotate(req)
        return self._first(req)

    def _first(self, req: enroll.EnrollRequest) -> tuple[enroll.EnrollStatus, bytes, str]:
        row = self.store.token(_hash(req.token))
        if row is None or row[0] != req.gw:
            return "bad_token", b"", "no such token for this gateway"
        if row[2] is not None:
            return "token_used", b"", "this token was used already"
        if self.clock() >= row[1]:
            return "token_expired", b"", "ask the operator for a new token"
        try:
            req.verify(req.pub)
        except SignatureError as exc:
            return "bad_signature", b"", str(exc)
        kid = envelope.key_id(req.pub)
        if not self.store.use_token(_hash(req.token), kid, self.clock()):
            return "token_used", b"", "this token was used already"  # another worker's desk
        others = self.store.other_keys(req.gw, kid)
        for old in others:
            self.core.revoke(req.gw, old)
        self.core.enroll(req.gw, req.pub)
        log.info(
            "gateway %s enrolled with key %s (%d older keys revoked)",
            req.gw,
            kid.hex(),
            len(others),
        )
        return enroll.ENROLLED, kid, ""

    def _rotate(self, req: enroll.EnrollRequest) -> tuple[enroll.EnrollStatus, bytes, str]:
        row = self.store.key(req.gw, req.kid)
        if row is None:
            return "unknown_key", b"", f"kid {req.kid.hex()} is not enrolled for {req.gw}"
        if row[1]:
            return "revoked_key", b"", f"kid {req.kid.hex()} is revoked"
        try:
            req.verify(row[0])
        except SignatureError as exc:
            return "bad_signature", b"", str(exc)
        new_kid = envelope.key_id(req.pub)
        done = self.store.rotation(req.gw, req.kid)
        if done is not None and done != new_kid:
            return "already_rotated", b"", f"kid {req.kid.hex()} was rotated to another key"
        if done is None:
            now = self.clock()
            self.core.enroll(req.gw, req.pub)
            self.store.add_rotation(req.gw, req.kid, new_kid, now, now + self.rotation_grace_s)
            log.info(
                "gateway %s rotated key %s -> %s (old one revoked in %.0f s)",
                req.gw,
                req.kid.hex(),
                new_kid.hex(),
                self.rotation_grace_s,
            )
            self.retire_due()
        return enroll.ENROLLED, new_kid, ""


async def serve(
    desk: EnrollmentDesk,
    *,
    host: str = "127.0.0.1",
    port: int = 1883,
    tls: ssl.SSLContext | None = None,
    ready: asyncio.Event | None = None,
    retire_every_s: float = 60.0,
    shared: bool = True,
    backoff_max_s: float = 5.0,
) -> None:
    """Answer enrollment requests from the broker until cancelled, reconnecting with
    back-off when it goes away (:class:`~hub.reconnect.Outage`).

    ``shared``: the desks of several hub workers split the requests (``$share``),
    so one request gets one answer (without it, every desk would answer, and all
    but the first with ``token_used``)."""
    import aiomqtt  # the hub extra: `vitals hub token` works without it

    flt = topics.enroll_filter(desk.prefix)
    if shared:
        flt = topics.shared("hub-enroll", flt)
    outage = Outage(log, "enrollment desk", host, port, cap_s=backoff_max_s)
    while True:
        try:
            async with aiomqtt.Client(
                host,
                port,
                identifier=f"vitals-enroll-desk-{os.getpid()}-{id(desk):x}",
                tls_context=tls,
                timeout=5.0,
                logger=logging.getLogger("hub.mqtt"),  # quiet: hub.worker
            ) as client:
                await client.subscribe(flt, qos=1)
                if ready is not None:
                    ready.set()
                outage.up()
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(_retire(desk, retire_every_s), name="enroll.retire")
                    async for msg in client.messages:
                        if not isinstance(msg.payload, bytes | bytearray):
                            continue
                        answer = desk.handle_enroll_request(str(msg.topic), bytes(msg.payload))
                        if answer is not None:
                            await client.publish(answer[0], answer[1], qos=1)
        except* aiomqtt.MqttError as group:  # raised inside the TaskGroup too: a group
            if ready is not None:
                ready.clear()
            await asyncio.sleep(outage.down(group.exceptions[0]))


async def _retire(desk: EnrollmentDesk, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        desk.retire_due()


def hub_key_path(db: str | Path) -> Path:
    """Where the hub key lives: beside an SQLite database (``hub.sqlite3`` -> ``hub.key``);
    ``hub.key`` in the working directory for a PostgreSQL URL."""
    if is_url(db):
        return Path("hub.key")
    return Path(db).with_suffix(".key")
