"""The hub's side of commands: build and sign them, send them, verify the results.

A command (:mod:`protocols.command`) is signed with the hub key the gateway
learnt at enrollment; the result is verified against the gateway's enrolled,
unrevoked key in the hub database (:class:`hub.core.HubCore`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiomqtt

from hub.core import HubCore
from protocols import command, ed25519, topics
from protocols.errors import ProtocolError, SignatureError

__all__ = ["Commander"]


class Commander:
    def __init__(
        self,
        core: HubCore,
        hub_key: ed25519.PrivateKey,
        *,
        clock: Callable[[], float] = time.time,
        prefix: str = topics.DEFAULT_PREFIX,
    ) -> None:
        self.core = core
        self.hub_key = hub_key
        self.clock = clock
        self.prefix = prefix

    def build(
        self,
        gateway: str,
        op: command.Op,
        args: Mapping[str, Any] | None = None,
        *,
        ttl_s: float = 60.0,
    ) -> tuple[bytes, bytes]:
        """``(wire bytes, command id)``."""
        return command.command(
            op,
            args,
            gateway=gateway,
            hub_key=self.hub_key,
            now_ms=int(self.clock() * 1000),
            ttl_ms=int(ttl_s * 1000),
        )

    def verify_result(self, gateway: str, data: bytes) -> command.CommandResult:
        """The result, verified against ``gateway``'s enrolled key; ProtocolError if not."""
        res = command.parse_result(data)
        if res.gw != gateway:
            raise SignatureError(f"result names {res.gw!r}, expected {gateway!r}")
        row = self.core.store.key(gateway, res.kid)
        if row is None or row[1]:
            raise SignatureError(
                f"result signed by kid {res.kid.hex()}, not a valid key of {gateway}"
            )
        res.verify(row[0])
        return res

    async def send(
        self,
        client: aiomqtt.Client,
        gateway: str,
        op: command.Op,
        args: Mapping[str, Any] | None = None,
        *,
        ttl_s: float = 60.0,
        timeout_s: float = 10.0,
        data: bytes | None = None,
    ) -> command.CommandResult:
        """Publish a command (or the given ``data``) and wait for its verified result.

        ``client`` must not be consuming its messages elsewhere. Answers that do
        not verify, or answer another command, are skipped.
        """
        cid = b""
        if data is None:
            data, cid = self.build(gateway, op, args, ttl_s=ttl_s)
        else:
            try:
                cid = command.parse_command(data).id
            except ProtocolError:
                cid = b""  # garbage on purpose: its answer carries no id
        await client.subscribe(topics.cmd_result(gateway, self.prefix), qos=1)
        await client.publish(topics.cmd(gateway, self.prefix), data, qos=1)
        async with asyncio.timeout(timeout_s):
            async for msg in client.messages:
                if not isinstance(msg.payload, bytes | bytearray):
                    continue
                try:
                    res = self.verify_result(gateway, bytes(msg.payload))
                except ProtocolError:
                    continue
                if res.id == cid:
                    return res
        raise TimeoutError  # unreachable: the message stream only ends with an error
