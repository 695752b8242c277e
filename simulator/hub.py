"""The reference hub: verify, deduplicate and store what the gateways send.

:class:`HubCore` is the hub without I/O to the broker: ``handle(topic, data)``
parses a message, looks up the gateway's enrolled key by (gateway, kid),
verifies the signature, drops duplicates by (gateway, epoch, seq) and stores
the readings in SQLite. Every refusal is counted by reason and logged once per
(gateway, reason). :class:`Hub` feeds it from MQTT through a shared
subscription, so several hub workers split the load of one broker.

Storage is SQLite by default; the schema (``readings``, ``batches``,
``gateways``, ``points``) is plain SQL so a deployment can put PostgreSQL
behind the same statements.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from protocols import envelope, topics
from protocols.errors import ProtocolError, SignatureError

__all__ = ["Hub", "HubCore", "hub_stats"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS gateways (
    gw TEXT NOT NULL, kid BLOB NOT NULL, pubkey BLOB NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0, enrolled REAL NOT NULL,
    PRIMARY KEY (gw, kid)
);
CREATE TABLE IF NOT EXISTS batches (
    gw TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
    n INTEGER NOT NULL, t0 INTEGER NOT NULL, t1 INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (gw, epoch, seq)
);
CREATE TABLE IF NOT EXISTS readings (
    gw TEXT NOT NULL, point INTEGER NOT NULL, ts INTEGER NOT NULL,
    value, quality INTEGER NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS points (
    gw TEXT NOT NULL, id INTEGER NOT NULL, device TEXT, name TEXT, unit TEXT,
    domain TEXT, cls TEXT, indicator TEXT, epoch INTEGER NOT NULL,
    PRIMARY KEY (gw, id)
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass
class HubCore:
    """Verification, dedup and storage; no network."""

    db_path: Path
    counters: Counter[str] = field(default_factory=Counter)
    _logged: set[tuple[str, str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        self._keys: dict[tuple[str, bytes], tuple[bytes, bool]] = {}
        for gw, kid, pub, revoked in self.db.execute(
            "SELECT gw, kid, pubkey, revoked FROM gateways"
        ):
            self._keys[(gw, bytes(kid))] = (bytes(pub), bool(revoked))
        for name, value in self.db.execute("SELECT name, value FROM counters"):
            self.counters[name] = int(value)

    # -- keys -----------------------------------------------------------------

    def enroll(self, gateway: str, public_raw: bytes) -> bytes:
        """Trust ``public_raw`` (32 bytes) as a key of ``gateway``; returns its kid."""
        kid = envelope.key_id(public_raw)
        self.db.execute(
            "INSERT OR REPLACE INTO gateways (gw, kid, pubkey, revoked, enrolled) VALUES (?, ?, ?, 0, ?)",
            (gateway, kid, public_raw, time.time()),
        )
        self._keys[(gateway, kid)] = (public_raw, False)
        return kid

    def revoke(self, gateway: str, kid: bytes) -> None:
        self.db.execute("UPDATE gateways SET revoked = 1 WHERE gw = ? AND kid = ?", (gateway, kid))
        if (gateway, kid) in self._keys:
            self._keys[(gateway, kid)] = (self._keys[(gateway, kid)][0], True)

    # -- messages -------------------------------------------------------------

    def _refuse(self, reason: str, gateway: str, detail: str) -> str:
        self.counters[f"rejected.{reason}"] += 1
        if (gateway, reason) not in self._logged:
            self._logged.add((gateway, reason))
            log.warning(
                "hub refused a message from %s: %s (%s); further ones only counted",
                gateway or "?",
                reason,
                detail,
            )
        return reason

    def _key(self, gw: str, kid: bytes) -> bytes | str:
        entry = self._keys.get((gw, kid))
        if entry is None:
            return "unknown_key"
        pub, revoked = entry
        return "revoked_key" if revoked else pub

    def handle(self, topic: str, data: bytes) -> str:
        """Process one message; returns "stored", "duplicate", "meta" or the refusal reason."""
        if topic.endswith("/meta"):
            return self._handle_meta(topic, data)
        if not topic.endswith("/batch"):
            return "ignored"
        topic_gw = topics.gateway_of(topic) or ""
        try:
            batch = envelope.parse(data)
        except ProtocolError as exc:
            return self._refuse("malformed", topic_gw, str(exc))
        h = batch.header
        if h.gw != topic_gw:
            return self._refuse("topic_mismatch", topic_gw, f"header names {h.gw!r}")
        key = self._key(h.gw, h.kid)
        if isinstance(key, str):
            return self._refuse(key, h.gw, f"kid {h.kid.hex()}")
        try:
            batch.verify(key)
        except SignatureError as exc:
            return self._refuse("bad_signature", h.gw, str(exc))
        if self.db.execute(
            "SELECT 1 FROM batches WHERE gw = ? AND epoch = ? AND seq = ?", (h.gw, h.epoch, h.seq)
        ).fetchone():
            self.counters["duplicates"] += 1
            self.counters["duplicate_readings"] += h.n
            return "duplicate"
        try:
            readings = batch.readings()
        except ProtocolError as exc:
            return self._refuse("bad_payload", h.gw, str(exc))
        now = time.time_ns() // 1_000_000
        db = self.db
        db.execute("BEGIN")
        db.execute(
            "INSERT INTO batches (gw, epoch, seq, n, t0, t1, received_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (h.gw, h.epoch, h.seq, h.n, h.t0, h.t1, now),
        )
        db.executemany(
            "INSERT INTO readings (gw, point, ts, value, quality, epoch, seq) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(h.gw, r.point, r.ts, r.value, int(r.quality), h.epoch, h.seq) for r in readings],
        )
        self.counters["batches"] += 1
        self.counters["readings"] += len(readings)
        self._save_counters()
        db.execute("COMMIT")
        return "stored"

    def _handle_meta(self, topic: str, data: bytes) -> str:
        topic_gw = topics.gateway_of(topic) or ""
        try:
            meta = envelope.parse_meta(data)
            key = self._key(meta.header.gw, meta.header.kid)
            if isinstance(key, str):
                return self._refuse(key, meta.header.gw, "meta")
            if meta.header.gw != topic_gw:
                return self._refuse("topic_mismatch", topic_gw, "meta")
            meta.verify(key)
            points = meta.points()
        except ProtocolError as exc:
            return self._refuse("malformed_meta", topic_gw, str(exc))
        self.db.execute("BEGIN")
        self.db.executemany(
            "INSERT OR REPLACE INTO points (gw, id, device, name, unit, domain, cls, indicator, epoch)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    topic_gw,
                    p.id,
                    p.device,
                    p.name,
                    p.unit,
                    p.domain,
                    p.cls,
                    p.indicator,
                    meta.header.epoch,
                )
                for p in points
            ],
        )
        self.db.execute("COMMIT")
        self.counters["meta"] += 1
        return "meta"

    def _save_counters(self) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)",
            list(self.counters.items()),
        )

    def close(self) -> None:
        self.db.execute("BEGIN")
        self._save_counters()
        self.db.execute("COMMIT")
        self.db.close()


def _ranges(seqs: Iterable[int]) -> list[list[int]]:
    """Missing [first, last] ranges below the highest seq seen."""
    s = sorted(seqs)
    out: list[list[int]] = []
    expected = 0
    for q in s:
        if q > expected:
            out.append([expected, q - 1])
        expected = q + 1
    return out


def hub_stats(db_path: Path) -> dict[str, Any]:
    """What the hub has: counters, and per gateway the delivered and missing batches."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        counters = {name: int(v) for name, v in db.execute("SELECT name, value FROM counters")}
        gateways: dict[str, Any] = {}
        rows = db.execute(
            "SELECT gw, epoch, seq, n FROM batches ORDER BY gw, epoch, seq"
        ).fetchall()
        per: dict[tuple[str, int], list[int]] = {}
        for gw, epoch, seq, n in rows:
            g = gateways.setdefault(gw, {"batches": 0, "readings": 0, "epochs": {}})
            g["batches"] += 1
            g["readings"] += n
            per.setdefault((gw, epoch), []).append(seq)
        for (gw, epoch), seqs in per.items():
            gateways[gw]["epochs"][str(epoch)] = {
                "batches": len(seqs),
                "last_seq": max(seqs),
                "missing": _ranges(seqs),
            }
        return {
            "batches": counters.get("batches", 0),
            "readings": counters.get("readings", 0),
            "duplicates": counters.get("duplicates", 0),
            "rejected": {
                k.split(".", 1)[1]: v for k, v in counters.items() if k.startswith("rejected.")
            },
            "gateways": gateways,
        }
    finally:
        db.close()


class Hub:
    """A hub worker: :class:`HubCore` fed from MQTT through a shared subscription."""

    def __init__(
        self,
        core: HubCore,
        *,
        host: str = "127.0.0.1",
        port: int = 1883,
        prefix: str = topics.DEFAULT_PREFIX,
        group: str = "hub",
        shared: bool = True,
        client_id: str = "",
    ) -> None:
        self.core = core
        self.host, self.port, self.prefix, self.group = host, port, prefix, group
        self.shared = shared  # amqtt (the demo's embedded broker) has no shared subscriptions
        self.client_id = client_id or f"vitals-hub-{id(self):x}"
        self.subscribed = asyncio.Event()
        self.results: Counter[str] = Counter()

    async def run(self) -> None:
        """Receive until cancelled, reconnecting when the broker goes away."""
        batch_filter = f"{self.prefix}/+/batch"
        if self.shared:
            batch_filter = topics.shared(self.group, batch_filter)
        meta_filter = f"{self.prefix}/+/meta"
        while True:
            try:
                async with aiomqtt.Client(
                    self.host,
                    self.port,
                    identifier=self.client_id,
                    clean_session=True,
                    max_queued_incoming_messages=100_000,
                ) as client:
                    await client.subscribe(batch_filter, qos=1)
                    await client.subscribe(meta_filter, qos=1)
                    self.subscribed.set()
                    async for msg in client.messages:
                        payload = msg.payload
                        if isinstance(payload, (bytes, bytearray)):
                            self.results[self.core.handle(str(msg.topic), bytes(payload))] += 1
            except aiomqtt.MqttError as exc:
                self.subscribed.clear()
                log.warning("hub lost the broker %s:%d: %s; retrying", self.host, self.port, exc)
                await asyncio.sleep(1.0)
