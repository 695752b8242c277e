"""Signed commands from the hub: verify, refuse or execute, answer signed.

:class:`CommandExecutor` takes the bytes of a ``vitals/cmd/v1`` message
(:mod:`protocols.command`) and returns the bytes of a signed
``vitals/cmd-result/v1`` answer, or None when it does not answer. In order:

0. ``oversized``    more than :data:`MAX_COMMAND_BYTES`: refused before any
   decoding (the MQTT client drops it already: :meth:`CommandExecutor.on_drop`);
1. ``malformed``    not a well-formed command (unsigned bytes, garbage);
2. ``no_hub_key``   this gateway was never enrolled (it knows no hub key);
3. ``unknown_key`` / ``bad_signature``  not signed by the hub key learnt at enrollment;
4. ``misaddressed`` for another gateway;
5. ``expired``      its ``exp`` has passed (gateway clock);
   ``too_long``     valid for more than ``max_lifetime_s``: refused, so that
   remembering ids until their expiry stays bounded;
6. ``replayed``     its id was seen before (ids are remembered until their
   expiry, in ``state_dir/commands.seen`` when a path is given, so a reboot
   does not reopen the window);
7. ``unknown_op`` / ``bad_args``, then whatever the handler refuses
   (``not_writable``, ``out_of_range``, ``unknown_device``...).

Anyone with publish rights on the broker can send the gateway anything, so
a refusal costs as little as it can: oversized and malformed input is
counted, never answered (an answer costs a signature and a publish); a
well-formed command refused at steps 2 to 6 gets its signed reason at most
once per ``answer_interval_s`` (1 s), further refusals are only counted
(``unanswered``). A command that passed step 6 (signed by the hub, for us,
fresh, new) is always answered. Each refusal reason is logged once.

A handler is ``async (args) -> value``; it raises :class:`CommandRefused` to
refuse; any other exception makes the status ``failed``. :func:`agent_handlers`
builds the five operations for a running agent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from agent.fieldbus.links import ModbusLink
from agent.mqtt import Message, MqttClient, topic_matches
from agent.ops.config import Config, load_config
from protocols import command as cmdproto
from protocols import topics
from protocols.command import MAX_COMMAND_BYTES
from protocols.ed25519 import PrivateKey
from protocols.envelope import key_id
from protocols.errors import ConfigError, ProtocolError, SignatureError, VitalsError
from protocols.modbus import decode, register_count, write_request

__all__ = [
    "MAX_COMMAND_BYTES",
    "CommandExecutor",
    "CommandRefused",
    "Handler",
    "agent_handlers",
    "on_message",
]

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[object]]


class CommandRefused(VitalsError):
    """A handler will not execute the command; ``reason`` is sent back."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


class CommandExecutor:
    def __init__(
        self,
        gateway_id: str,
        hub_public_key: bytes | None,
        key: PrivateKey,
        handlers: Mapping[str, Handler] | None = None,
        *,
        clock: Callable[[], float] = time.time,
        seen_path: Path | None = None,
        max_lifetime_s: float = 3600.0,
        answer_interval_s: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.gateway_id = gateway_id
        self.hub_public_key = hub_public_key
        self._key = key
        self.handlers: dict[str, Handler] = {"ping": self._ping, **(handlers or {})}
        self.clock = clock
        self.seen_path = seen_path
        self.max_lifetime_ms = int(max_lifetime_s * 1000)
        self.answer_interval_s = answer_interval_s
        self._monotonic = monotonic
        self._next_refusal = -float("inf")  # when a refusal may be answered again
        self.counters: Counter[str] = Counter()
        self._logged: set[str] = set()
        self._seen: dict[bytes, int] = self._load_seen()

    # -- replay memory ----------------------------------------------------------

    def _load_seen(self) -> dict[bytes, int]:
        if self.seen_path is None:
            return {}
        try:
            raw = json.loads(self.seen_path.read_text())
            return {bytes.fromhex(k): int(v) for k, v in raw.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, AttributeError, TypeError) as exc:
            # refusing to start would block every command; a fresh memory with
            # the lifetime cap still refuses anything older than max_lifetime
            log.warning(
                "%s unreadable (%s); command replay memory starts empty", self.seen_path, exc
            )
            return {}

    def _remember(self, cid: bytes, exp: int, now: int) -> None:
        self._seen = {k: v for k, v in self._seen.items() if v > now}
        self._seen[cid] = exp
        if self.seen_path is None:
            return
        tmp = self.seen_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k.hex(): v for k, v in self._seen.items()}))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.seen_path)

    # -- handling ---------------------------------------------------------------

    def statistics(self) -> dict[str, int]:
        return dict(self.counters)

    async def _ping(self, args: dict[str, Any]) -> object:
        return {"gw": self.gateway_id, "t": int(self.clock() * 1000)}

    def _count(self, status: str, reason: str) -> None:
        self.counters[f"{status}.{reason}" if reason else status] += 1
        if status in ("refused", "dropped") and reason not in self._logged:
            self._logged.add(reason)
            log.warning("command %s: %s; further ones only counted", status, reason)

    def on_drop(self, why: str, topic: str, size: int) -> None:
        """The MQTT client dropped a message on the command topic (``agent.mqtt.OnDrop``):
        over :data:`MAX_COMMAND_BYTES` (``refused.oversized``), or one more than its
        queue holds while commands arrive faster than they are handled
        (``dropped.overflow``)."""
        self._count("refused" if why == "oversized" else "dropped", why)

    def _answer(
        self, cid: bytes, status: cmdproto.ResultStatus, reason: str = "", value: object = None
    ) -> bytes:
        self._count(status, reason)
        return cmdproto.result(
            gateway=self.gateway_id,
            key=self._key,
            command_id=cid,
            status=status,
            reason=reason,
            value=value,
            now_ms=int(self.clock() * 1000),
        )

    def _refuse(self, cid: bytes, reason: str) -> bytes | None:
        """A well-formed command refused before it was accepted: answered at most once
        per ``answer_interval_s``, else only counted."""
        now = self._monotonic()
        if now < self._next_refusal:
            self._count("refused", reason)
            self.counters["unanswered"] += 1
            return None
        self._next_refusal = now + self.answer_interval_s
        return self._answer(cid, "refused", reason)

    async def handle(self, data: bytes) -> bytes | None:
        """The signed result for the command ``data``, or None (not answered); never
        raises for bad input."""
        if len(data) > MAX_COMMAND_BYTES:
            self._count("refused", "oversized")  # before any decoding
            return None
        try:
            cmd = cmdproto.parse_command(data)
        except ProtocolError:
            self._count("refused", "malformed")
            return None
        if self.hub_public_key is None:
            return self._refuse(cmd.id, "no_hub_key")
        if cmd.kid != key_id(self.hub_public_key):
            return self._refuse(cmd.id, "unknown_key")
        try:
            cmd.verify(self.hub_public_key)
        except SignatureError:
            return self._refuse(cmd.id, "bad_signature")
        if cmd.gw != self.gateway_id:
            return self._refuse(cmd.id, "misaddressed")
        now = int(self.clock() * 1000)
        if now >= cmd.exp:
            return self._refuse(cmd.id, "expired")
        if cmd.exp - now > self.max_lifetime_ms:
            return self._refuse(cmd.id, "too_long")
        if cmd.id in self._seen:
            return self._refuse(cmd.id, "replayed")
        self._remember(cmd.id, cmd.exp, now)  # before running: a concurrent copy is a replay
        handler = self.handlers.get(cmd.op)
        if handler is None:
            return self._answer(cmd.id, "refused", "unknown_op", cmd.op)
        try:
            args = cmd.args()
        except ProtocolError as exc:
            return self._answer(cmd.id, "refused", "bad_args", str(exc))
        log.info("command %s %s from the hub", cmd.id.hex(), cmd.op)
        try:
            value = await handler(args)
        except CommandRefused as exc:
            return self._answer(cmd.id, "refused", exc.reason, str(exc))
        except Exception as exc:  # the one broad catch: a command always gets its answer
            log.warning("command %s %s failed: %s", cmd.id.hex(), cmd.op, exc)
            return self._answer(cmd.id, "failed", type(exc).__name__, str(exc))
        return self._answer(cmd.id, "ok", value=value)


# -- the MQTT side: called by the uplink for every message it receives ----------


async def on_message(
    client: MqttClient,
    message: Message,
    executor: CommandExecutor,
    *,
    prefix: str = topics.DEFAULT_PREFIX,
) -> bool:
    """Handle ``message`` if it is a command for us; whether it was one.

    The uplink subscribes to ``topics.cmd(gateway)`` (QoS 1) on its connection,
    made with ``max_message_size=MAX_COMMAND_BYTES`` and
    ``on_drop=executor.on_drop``, and hands every message here; a signed result,
    when there is one, goes to ``topics.cmd_result(gateway)`` at QoS 1. Its
    PUBACK is not awaited: the command path never waits on the connection that
    the batches share.
    """
    if not topic_matches(topics.cmd(executor.gateway_id, prefix), message.topic):
        return False
    answer = await executor.handle(message.payload)
    if answer is not None:
        done = client.publish_nowait(topics.cmd_result(executor.gateway_id, prefix), answer)
        done.add_done_callback(_retrieved)
    await asyncio.sleep(0)  # a flood of commands takes turns with the polls and the batches
    return True


def _retrieved(fut: asyncio.Future[None]) -> None:
    """A result's PUBACK came, or the connection failed (which the uplink handles)."""
    if not fut.cancelled():
        fut.exception()


# -- the agent's operations ------------------------------------------------------


def _set_level(level: str, logger: str) -> None:
    logging.getLogger(logger or None).setLevel(level.upper())


def agent_handlers(
    config: Config,
    links: Mapping[str, ModbusLink],
    *,
    reload: Callable[[], Awaitable[None]] | None = None,
    set_level: Callable[[str, str], None] = _set_level,
) -> dict[str, Handler]:
    """``read``, ``write``, ``reload`` and ``log_level`` for an agent.

    ``links`` are the agent's Modbus links, shared with the bus pollers: a link
    runs one transaction at a time, so a command's read or write waits for the
    poll on the wire to finish (a bus is half duplex).
    """

    def _device_point(args: dict[str, Any], want_point: bool) -> tuple[Any, Any, str]:
        name = args.get("device")
        if type(name) is not str:
            raise CommandRefused("bad_args", "'device' (str) is required")
        try:
            dev = config.device(name)
        except KeyError:
            raise CommandRefused("unknown_device", name) from None
        if not dev.enabled:
            raise CommandRefused("device_disabled", name)
        point = None
        if want_point:
            pname = args.get("point")
            point = next((p for p in dev.profile.points if p.name == pname), None)
            if point is None:
                raise CommandRefused("unknown_point", f"{name}.{pname}")
        if dev.bus not in links:
            raise CommandRefused(
                "not_modbus", f"{name} is a serial sensor: it cannot be read or written"
            )
        return dev, point, dev.bus

    async def read(args: dict[str, Any]) -> object:
        dev, _, bus = _device_point(args, want_point=False)
        wanted = args.get("points")
        points = [p for p in dev.profile.points if wanted is None or p.name in wanted]
        if not points:
            raise CommandRefused("unknown_point", f"none of {wanted!r} on {dev.name}")
        out: dict[str, object] = {}
        for p in points:
            words = await links[bus].read(
                p.spec.space, p.spec.address, register_count(p.spec), dev.slave
            )
            out[p.name] = decode(p.spec, words)
        return out

    async def write(args: dict[str, Any]) -> object:
        dev, point, bus = _device_point(args, want_point=True)
        value = args.get("value")
        if not point.writable:
            raise CommandRefused("not_writable", f"{dev.name}.{point.name}")
        if not isinstance(value, int | float | bool):
            raise CommandRefused("bad_args", "'value' must be a number or a bool")
        if type(value) is not bool and not point.in_range(value):
            raise CommandRefused(
                "out_of_range", f"{value} outside {point.range} for {dev.name}.{point.name}"
            )
        try:
            fc, address, payload = write_request(point.spec, value)
        except VitalsError as exc:
            raise CommandRefused("bad_value", str(exc)) from exc
        await links[bus].write(fc, address, payload, dev.slave)
        return {"written": value}

    async def do_reload(args: dict[str, Any]) -> object:
        try:
            fresh = await asyncio.to_thread(load_config, config.source)
        except ConfigError as exc:
            raise CommandRefused("config_invalid", str(exc)) from exc
        if reload is None:
            raise CommandRefused("not_supported", "this agent cannot reload")
        await reload()
        return {"devices": len(fresh.devices), "points": len(fresh.points)}

    async def log_level(args: dict[str, Any]) -> object:
        level, logger = args.get("level"), args.get("logger", "")
        if level not in ("debug", "info", "warning", "error") or type(logger) is not str:
            raise CommandRefused("bad_args", "level: debug|info|warning|error; logger: str")
        set_level(level, logger)
        return {"level": level, "logger": logger}

    return {"read": read, "write": write, "reload": do_reload, "log_level": log_level}
