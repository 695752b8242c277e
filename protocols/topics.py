"""MQTT topic names of vitals, in one place.

``{prefix}/{gateway}/batch``       signed reading batches, QoS 1
``{prefix}/{gateway}/meta``        signed point table (retained): names of point ids
``{prefix}/{gateway}/event``       signed edge events (threshold, rate, stuck, offline)
``{prefix}/{gateway}/gap``         signed gap notices: batches the gateway had to drop
``{prefix}/{gateway}/status``      retained "online"/"offline" (the MQTT will)
``{prefix}/{gateway}/cmd``         signed commands to the gateway
``{prefix}/{gateway}/cmd/result``  signed results of commands
``{prefix}/{gateway}/receipt``     the hub's signed receipts: what it has stored
``{prefix}/{gateway}/hb``          the gateway's signed heartbeat: last seq sealed, unconfirmed
``{prefix}/{gateway}/config``      the hub's signed configuration push (retained)
``{prefix}/{gateway}/config/status``  the gateway's signed report on it (retained)
``{prefix}/enroll/{gateway}``      enrollment requests (signed)
``{prefix}/enroll/{gateway}/result``  the hub's signed answer
``{prefix}/hub/time``              the hub's clock (retained, each second)
``{prefix}/diag/{client id}``      ``vitals diag uplink``'s round trip
The hub subscribes through a shared subscription (``$share/hub/...``) so that
several hub workers split the load.
"""

from __future__ import annotations

import re
from typing import Final, Literal, TypeAlias, get_args

from protocols.errors import LocalError

__all__ = [
    "DEFAULT_PREFIX",
    "GATEWAY_ID",
    "KINDS",
    "TopicKind",
    "batch",
    "cmd",
    "cmd_result",
    "config",
    "config_status",
    "diag",
    "enroll",
    "enroll_filter",
    "enroll_gateway",
    "enroll_result",
    "event",
    "gap",
    "gateway_of",
    "heartbeat",
    "hub_time",
    "meta",
    "parse",
    "receipt",
    "shared",
    "status",
    "subscription",
]

DEFAULT_PREFIX = "vitals/v1"
GATEWAY_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def _check(gateway: str) -> str:
    if not GATEWAY_ID.fullmatch(gateway):
        raise LocalError(f"invalid gateway id {gateway!r}: use a-z, 0-9 and '-', at most 63")
    return gateway


def batch(gateway: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}/{_check(gateway)}/batch"


def meta(gateway: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}/{_check(gateway)}/meta"


def status(gateway: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}/{_check(gateway)}/status"


def event(gateway: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}/{_check(gateway)}/event"


def gap(gateway: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}/{_check(gateway)}/gap"


def cmd(gateway: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}/{_check(gateway)}/cmd"


def cmd_result(gateway: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}/{_check(gateway)}/cmd/result"


def receipt(gateway: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The hub's signed receipts to ``gateway``."""
    return f"{prefix}/{_check(gateway)}/receipt"


def heartbeat(gateway: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The gateway's signed heartbeat to the hub."""
    return f"{prefix}/{_check(gateway)}/hb"


def config(gateway: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The hub's signed configuration push to ``gateway`` (retained)."""
    return f"{prefix}/{_check(gateway)}/config"


def config_status(gateway: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The gateway's signed report on its configuration (retained)."""
    return f"{prefix}/{_check(gateway)}/config/status"


def enroll(gateway: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}/enroll/{_check(gateway)}"


def enroll_result(gateway: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The hub's signed answer to an enrollment request."""
    return f"{enroll(gateway, prefix)}/result"


def shared(group: str, topic_filter: str) -> str:
    """A shared-subscription filter: the broker splits messages across the group."""
    return f"$share/{group}/{topic_filter}"


def gateway_of(topic: str, prefix: str = DEFAULT_PREFIX) -> str | None:
    """The gateway id in a per-gateway topic, or None if the topic is not ours."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    gw = topic[len(head) :].split("/", 1)[0]
    return gw if GATEWAY_ID.fullmatch(gw) else None


# what follows {prefix}/{gateway}/ in a per-gateway topic
TopicKind: TypeAlias = Literal[
    "batch",
    "meta",
    "event",
    "gap",
    "status",
    "cmd",
    "cmd/result",
    "receipt",
    "hb",
    "config",
    "config/status",
]
KINDS: Final[frozenset[TopicKind]] = frozenset(get_args(TopicKind))


def parse(topic: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, TopicKind] | None:
    """``(gateway, kind)`` of a per-gateway topic (kind as in :data:`KINDS`), or None."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    gw, _, kind = topic[len(head) :].partition("/")
    if kind not in KINDS or not GATEWAY_ID.fullmatch(gw):
        return None
    return gw, kind


def subscription(kind: TopicKind, prefix: str = DEFAULT_PREFIX) -> str:
    """The filter of one kind of message from every gateway: ``{prefix}/+/{kind}``."""
    if kind not in KINDS:
        raise LocalError(f"unknown topic kind {kind!r}")
    return f"{prefix}/+/{kind}"


def enroll_filter(prefix: str = DEFAULT_PREFIX) -> str:
    """The enrollment desk's filter: every gateway's requests."""
    return f"{prefix}/enroll/+"


def enroll_gateway(topic: str, prefix: str = DEFAULT_PREFIX) -> str | None:
    """The gateway id of an enrollment request's topic, or None if it is not one."""
    head = f"{prefix}/enroll/"
    if not topic.startswith(head):
        return None
    gw = topic[len(head) :]
    return gw if GATEWAY_ID.fullmatch(gw) else None


def diag(client_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``vitals diag uplink``'s round trip: a topic of its own client id."""
    if not client_id or any(c in client_id for c in "+#/"):
        raise LocalError(f"client id {client_id!r} cannot be a topic level")
    return f"{prefix}/diag/{client_id}"


def hub_time(prefix: str = DEFAULT_PREFIX) -> str:
    """The hub's clock, retained, each second (``vitals diag uplink`` compares)."""
    return f"{prefix}/hub/time"
