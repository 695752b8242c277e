"""The signed edge event: "rule R fired (or cleared) on point P" (sans-IO).

A gateway evaluates rules on every reading (``agent.edge.rules``); when one fires
or clears it sends an event at once, ahead of the batch backlog. An event is a
signed message of the common envelope (:func:`protocols.envelope.sign_message`)
with domain ``vitals/event/v1``, published QoS 1 on ``{prefix}/{gateway}/event``
(:func:`event_topic`)::

    protected = {"gw": str, "kid": bin(8), "epoch": int, "seq": int, "enc": "msgpack"}
    payload   = msgpack [rule, kind, state, device, point, pid, value, ts, since, detail]

``seq`` numbers the events of one boot ``epoch`` from 0, apart from the batch
seqs (the hub deduplicates events on (gw, epoch, seq) as it does batches).
In the payload: ``rule`` is the rule id of the gateway configuration, ``kind``
one of :data:`KINDS`, ``state`` ``"fired"`` or ``"cleared"``, ``device`` and
``point`` the names of the point (``point`` is ``""`` for a device-offline
rule), ``pid`` its gateway point id (-1 for a whole device), ``value`` the
value that decided (int, float, bool or nil), ``ts`` the time of the decision
and ``since`` the time the condition began (both ms, UTC; ``since <= ts``),
``detail`` one human sentence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias, get_args

from protocols import ed25519, topics
from protocols.envelope import (
    MAX_GATEWAY_LEN,
    MAX_U63,
    Sealed,
    check_sender,
    key_id,
    pack,
    parse_message,
    sign_message,
    unpack,
)
from protocols.errors import DecodeError, FrameError, LocalError
from protocols.payload import MAX_TS

__all__ = [
    "EVENT_DOMAIN",
    "KINDS",
    "STATES",
    "Event",
    "EventHeader",
    "EventKind",
    "EventState",
    "SealedEvent",
    "event_topic",
    "parse_event",
    "seal_event",
]

EVENT_DOMAIN: Final = "vitals/event/v1"
EventKind: TypeAlias = Literal["threshold", "rate", "stuck", "offline"]
EventState: TypeAlias = Literal["fired", "cleared"]
KINDS: Final[tuple[EventKind, ...]] = get_args(EventKind)
STATES: Final[tuple[EventState, ...]] = get_args(EventState)
MAX_TEXT: Final = 256  # rule ids, names and details
_SCHEMA: Final = {"gw": str, "kid": bytes, "epoch": int, "seq": int, "enc": str}

EventValue = int | float | bool | None


event_topic = topics.event  # signed edge events, QoS 1


@dataclass(frozen=True, slots=True)
class Event:
    """One edge event, as the rule engine makes it and the hub reads it."""

    rule: str
    kind: EventKind
    state: EventState
    device: str
    point: str
    pid: int
    value: EventValue
    ts: int
    since: int
    detail: str = ""

    @property
    def fired(self) -> bool:
        return self.state == "fired"


@dataclass(frozen=True, slots=True)
class EventHeader:
    gw: str
    kid: bytes
    epoch: int
    seq: int
    enc: str


def _check_event(e: Event, err: type[Exception]) -> None:
    for name in ("rule", "device"):
        text = getattr(e, name)
        if type(text) is not str or not 1 <= len(text) <= MAX_TEXT:
            raise err(f"event {name} must be a str of 1 to {MAX_TEXT} chars")
    for name in ("point", "detail"):
        text = getattr(e, name)
        if type(text) is not str or len(text) > MAX_TEXT:
            raise err(f"event {name} must be a str of at most {MAX_TEXT} chars")
    if e.kind not in KINDS:
        raise err(f"event kind {e.kind!r} is not one of {', '.join(KINDS)}")
    if e.state not in STATES:
        raise err(f"event state {e.state!r} is not 'fired' or 'cleared'")
    if type(e.pid) is not int or not -1 <= e.pid <= MAX_U63:
        raise err(f"event pid must be an int >= -1, got {e.pid!r}")
    if e.value is not None and type(e.value) not in (int, float, bool):
        raise err(f"event value must be int, float, bool or nil, got {type(e.value).__name__}")
    if type(e.value) is float and not math.isfinite(e.value):
        raise err("event value must be finite")
    if type(e.value) is int and not -(2**63) <= e.value <= MAX_U63:
        raise err("event value out of int64 range")
    for name in ("ts", "since"):
        v = getattr(e, name)
        if type(v) is not int or not 0 <= v <= MAX_TS:
            raise err(f"event {name} must be an int in [0, {MAX_TS}]")
    if e.since > e.ts:
        raise err("event since must not be after ts")


@dataclass(frozen=True, slots=True)
class SealedEvent(Sealed[EventHeader]):
    """A parsed event: header checked, signature not yet verified."""

    DOMAIN = EVENT_DOMAIN

    def event(self) -> Event:
        """The event, every field checked; :class:`DecodeError` if anything is off."""
        obj = unpack(
            self.message.payload, "event payload", max_array_len=10, max_map_len=0, max_ext_len=0
        )
        if type(obj) is not list or len(obj) != 10:
            raise DecodeError("event payload must be an array of 10 items")
        rule, kind, state, device, point, pid, value, ts, since, detail = obj
        for name, v in (
            ("rule", rule),
            ("kind", kind),
            ("state", state),
            ("device", device),
            ("point", point),
            ("detail", detail),
        ):
            if type(v) is not str:
                raise DecodeError(f"event {name} must be str, got {type(v).__name__}")
        for name, v in (("pid", pid), ("ts", ts), ("since", since)):
            if type(v) is not int:
                raise DecodeError(f"event {name} must be int, got {type(v).__name__}")
        event = Event(rule, kind, state, device, point, pid, value, ts, since, detail)
        _check_event(event, DecodeError)
        return event


def seal_event(
    event: Event, *, gateway: str, key: ed25519.PrivateKey, epoch: int, seq: int
) -> bytes:
    """The wire bytes of ``event``, signed by ``key`` as event ``seq`` of ``epoch``."""
    if type(gateway) is not str or not 1 <= len(gateway) <= MAX_GATEWAY_LEN:
        raise LocalError(f"gateway id must be a str of 1 to {MAX_GATEWAY_LEN} chars")
    for name, v in (("epoch", epoch), ("seq", seq)):
        if type(v) is not int or not 0 <= v <= MAX_U63:
            raise LocalError(f"{name} must be an int in [0, 2**63-1], got {v!r}")
    _check_event(event, LocalError)
    payload = pack(
        [
            event.rule,
            event.kind,
            event.state,
            event.device,
            event.point,
            event.pid,
            event.value,
            event.ts,
            event.since,
            event.detail,
        ]
    )
    protected: dict[str, str | bytes | int] = {
        "gw": gateway,
        "kid": key_id(key),
        "epoch": epoch,
        "seq": seq,
        "enc": "msgpack",
    }
    return sign_message(EVENT_DOMAIN, protected, payload, key)


def parse_event(data: bytes) -> SealedEvent:
    """An event's parts and checked header; no crypto. :class:`FrameError` if malformed."""
    msg = parse_message(data)
    f = msg.fields(_SCHEMA)
    header = EventHeader(**f)  # type: ignore[arg-type]  # types checked by fields()
    check_sender(header.gw, header.kid)
    if header.enc != "msgpack":
        raise FrameError(f"event header: unknown enc {header.enc!r}")
    if not 0 <= header.epoch <= MAX_U63 or not 0 <= header.seq <= MAX_U63:
        raise FrameError("event header: epoch or seq out of range")
    return SealedEvent(header, msg)
