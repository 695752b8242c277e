"""The subset of MQTT 3.1.1 a gateway speaks, sans-IO (OASIS standard, 29 October 2014).

Encoders return the bytes of the packets a client sends: CONNECT, PUBLISH
(QoS 0/1), PUBACK, SUBSCRIBE, PINGREQ, DISCONNECT. :class:`Decoder` is fed the
bytes a server sends, in any chunking, and returns the packets they complete:
CONNACK, PUBLISH (QoS 0, 1 and 2: its fields are decoded, the QoS 2 exchange
is the caller's business), PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK
and PINGRESP. A PUBLISH whose payload is over the decoder's ``max_payload`` is
not buffered: it comes out as :class:`Skipped` (topic, size, QoS, packet id) as
soon as its head is in, and the rest of its bytes are discarded as they arrive,
so a flood of large messages costs no memory. Bytes that break the standard raise :class:`FrameError` (the
fixed header: type, flags, length) or :class:`DecodeError` (a field of a
well-framed packet), both :class:`ProtocolError`; the message names what was
wrong. A client's own mistakes (a wildcard in a topic name, a string longer than
65,535 bytes) raise :class:`LocalError`.

:func:`topic_matches` matches a topic name against a subscription filter
(``+``, ``#``, ``$``-topics, ``$share/...``), for dispatching received messages.

Section numbers (§) and normative statements ([MQTT-x.y.z-n]) are the standard's.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Final

from protocols.errors import DecodeError, FrameError, LocalError

__all__ = [
    "CONNACK_REASONS",
    "MAX_PACKET_SIZE",
    "SUBACK_FAILURE",
    "ConnAck",
    "Decoder",
    "Packet",
    "PingResp",
    "PubAck",
    "PubComp",
    "PubRec",
    "PubRel",
    "Publish",
    "Skipped",
    "SubAck",
    "UnsubAck",
    "encode_connect",
    "encode_disconnect",
    "encode_pingreq",
    "encode_puback",
    "encode_publish",
    "encode_subscribe",
    "topic_matches",
    "validate_filter",
    "validate_topic",
]

# §2.2.1 control packet types
CONNECT: Final = 1
CONNACK: Final = 2
PUBLISH: Final = 3
PUBACK: Final = 4
PUBREC: Final = 5
PUBREL: Final = 6
PUBCOMP: Final = 7
SUBSCRIBE: Final = 8
SUBACK: Final = 9
UNSUBSCRIBE: Final = 10
UNSUBACK: Final = 11
PINGREQ: Final = 12
PINGRESP: Final = 13
DISCONNECT: Final = 14

_NAMES: Final = {
    CONNECT: "CONNECT",
    CONNACK: "CONNACK",
    PUBLISH: "PUBLISH",
    PUBACK: "PUBACK",
    PUBREC: "PUBREC",
    PUBREL: "PUBREL",
    PUBCOMP: "PUBCOMP",
    SUBSCRIBE: "SUBSCRIBE",
    SUBACK: "SUBACK",
    UNSUBSCRIBE: "UNSUBSCRIBE",
    UNSUBACK: "UNSUBACK",
    PINGREQ: "PINGREQ",
    PINGRESP: "PINGRESP",
    DISCONNECT: "DISCONNECT",
}

#: §3.2.2.3 the CONNACK return codes, as an installer reads them
CONNACK_REASONS: Final = {
    0: "connection accepted",
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}

#: §3.9.3 the SUBACK return code of a refused subscription
SUBACK_FAILURE: Final = 0x80

#: the largest packet a :class:`Decoder` accepts by default (header included), and
#: the largest PUBLISH payload it passes on; a gateway receives commands and
#: acknowledgements, all small
MAX_PACKET_SIZE: Final = 1 << 20

_MAX_REMAINING: Final = 268_435_455  # §2.2.3: four bytes of 7 bits
_MAX_UINT16: Final = 0xFFFF

# -------------------------------------------------------------------------- packets


@dataclass(frozen=True, slots=True)
class ConnAck:
    """§3.2: the server's answer to CONNECT."""

    session_present: bool
    return_code: int

    @property
    def accepted(self) -> bool:
        return self.return_code == 0

    @property
    def reason(self) -> str:
        """The return code's meaning, e.g. ``"bad user name or password"``."""
        return CONNACK_REASONS.get(self.return_code, f"unknown return code {self.return_code}")


@dataclass(frozen=True, slots=True)
class Publish:
    """§3.3: an application message; ``packet_id`` is 0 at QoS 0."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int = 0


@dataclass(frozen=True, slots=True)
class Skipped:
    """A PUBLISH whose payload (``size`` bytes) is over the decoder's ``max_payload``:
    discarded unread. At QoS 1 the receiver still acknowledges it (§4.3.2: it owns it)."""

    topic: str
    size: int
    qos: int = 0
    packet_id: int = 0


@dataclass(frozen=True, slots=True)
class PubAck:
    """§3.4: QoS 1 acknowledgement."""

    packet_id: int


@dataclass(frozen=True, slots=True)
class PubRec:
    """§3.5: QoS 2, part 1."""

    packet_id: int


@dataclass(frozen=True, slots=True)
class PubRel:
    """§3.6: QoS 2, part 2."""

    packet_id: int


@dataclass(frozen=True, slots=True)
class PubComp:
    """§3.7: QoS 2, part 3."""

    packet_id: int


@dataclass(frozen=True, slots=True)
class SubAck:
    """§3.9: one return code per filter of the SUBSCRIBE: the granted QoS, or 0x80."""

    packet_id: int
    return_codes: tuple[int, ...]

    @property
    def failed(self) -> bool:
        """Whether the server refused any of the filters."""
        return SUBACK_FAILURE in self.return_codes


@dataclass(frozen=True, slots=True)
class UnsubAck:
    """§3.11."""

    packet_id: int


@dataclass(frozen=True, slots=True)
class PingResp:
    """§3.13."""


Packet = (
    ConnAck | Publish | Skipped | PubAck | PubRec | PubRel | PubComp | SubAck | UnsubAck | PingResp
)

# -------------------------------------------------------------------------- encoders


def _remaining(n: int) -> bytes:
    """§2.2.3 the Remaining Length: 7 bits a byte, least significant first."""
    if n > _MAX_REMAINING:
        raise LocalError(f"an MQTT packet holds at most {_MAX_REMAINING} bytes, not {n}")
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        if n:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def _u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def _string(s: str, what: str) -> bytes:
    """§1.5.3 a UTF-8 encoded string: 2-byte length, no U+0000 [MQTT-1.5.3-2]."""
    try:
        data = s.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate [MQTT-1.5.3-1]
        raise LocalError(f"{what} {s!r} is not valid Unicode: {exc.reason}") from exc
    if len(data) > _MAX_UINT16:
        raise LocalError(f"{what} is {len(data)} bytes in UTF-8; MQTT allows 65535")
    if "\0" in s:
        raise LocalError(f"{what} {s!r} contains U+0000, which MQTT forbids")
    return _u16(len(data)) + data


def _binary(b: bytes, what: str) -> bytes:
    if len(b) > _MAX_UINT16:
        raise LocalError(f"{what} is {len(b)} bytes; MQTT allows 65535")
    return _u16(len(b)) + b


def _packet_id(packet_id: int) -> bytes:
    if not 0 < packet_id <= _MAX_UINT16:
        raise LocalError(f"packet id {packet_id} is outside 1..65535")  # [MQTT-2.3.1-1]
    return _u16(packet_id)


def validate_topic(topic: str) -> None:
    """Raise :class:`LocalError` unless ``topic`` may be published to (§4.7).

    At least one character [MQTT-4.7.3-1], no wildcard [MQTT-3.3.2-2], no U+0000.
    """
    if not topic:
        raise LocalError("a topic name has at least one character")
    if "+" in topic or "#" in topic:
        raise LocalError(f"topic name {topic!r} contains a wildcard (+ or #)")
    if "\0" in topic:
        raise LocalError(f"topic name {topic!r} contains U+0000")


def validate_filter(topic_filter: str) -> None:
    """Raise :class:`LocalError` unless ``topic_filter`` is a valid subscription (§4.7.1).

    ``#`` only as the whole last level [MQTT-4.7.1-2], ``+`` only as a whole level
    [MQTT-4.7.1-3], at least one character, no U+0000.
    """
    if not topic_filter:
        raise LocalError("a topic filter has at least one character")
    if "\0" in topic_filter:
        raise LocalError(f"topic filter {topic_filter!r} contains U+0000")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise LocalError(f"topic filter {topic_filter!r}: '#' must be the whole last level")
        if "+" in level and level != "+":
            raise LocalError(f"topic filter {topic_filter!r}: '+' must be a whole level")


@functools.lru_cache(maxsize=64)
def _topic_field(topic: str) -> bytes:
    """The topic name field of a PUBLISH; cached (a gateway publishes to a few topics)."""
    validate_topic(topic)
    return _string(topic, "topic name")


def encode_connect(
    client_id: str,
    *,
    keepalive: int = 60,
    clean_session: bool = True,
    username: str | None = None,
    password: str | bytes | None = None,
    will_topic: str | None = None,
    will_payload: bytes = b"",
    will_qos: int = 0,
    will_retain: bool = False,
) -> bytes:
    """§3.1 CONNECT, protocol "MQTT" level 4.

    ``keepalive`` is in seconds, 0 turns it off. A will is sent when
    ``will_topic`` is given. A password needs a user name [MQTT-3.1.2-22]; an
    empty client id needs a clean session [MQTT-3.1.3-7].
    """
    if not 0 <= keepalive <= _MAX_UINT16:
        raise LocalError(f"keepalive {keepalive} s is outside 0..65535")
    if password is not None and username is None:
        raise LocalError("MQTT 3.1.1 sends a password only with a user name")
    if not client_id and not clean_session:
        raise LocalError("an empty client id needs clean_session=True")
    if will_qos not in (0, 1, 2):
        raise LocalError(f"will QoS {will_qos} is not 0, 1 or 2")
    flags = 0x02 if clean_session else 0
    payload = [_string(client_id, "client id")]
    if will_topic is not None:
        validate_topic(will_topic)
        flags |= 0x04 | will_qos << 3 | (0x20 if will_retain else 0)
        payload += [_string(will_topic, "will topic"), _binary(will_payload, "will payload")]
    elif will_qos or will_retain:
        raise LocalError("will QoS and retain need a will topic")  # [MQTT-3.1.2-13], -15
    if username is not None:
        flags |= 0x80
        payload.append(_string(username, "user name"))
    if password is not None:
        flags |= 0x40
        pw = password.encode("utf-8") if isinstance(password, str) else password
        payload.append(_binary(pw, "password"))
    body = b"\x00\x04MQTT\x04" + bytes((flags,)) + _u16(keepalive) + b"".join(payload)
    return b"\x10" + _remaining(len(body)) + body


def encode_publish(
    topic: str,
    payload: bytes,
    *,
    qos: int = 0,
    retain: bool = False,
    dup: bool = False,
    packet_id: int = 0,
) -> bytes:
    """§3.3 PUBLISH at QoS 0 or 1 (a packet id in 1..65535 at QoS 1)."""
    field = _topic_field(topic)
    if qos == 1:
        pid = _packet_id(packet_id)
    elif qos == 0:
        if dup:
            raise LocalError("DUP is 0 on a QoS 0 PUBLISH [MQTT-3.3.1-2]")
        pid = b""
    else:
        raise LocalError(f"this client publishes at QoS 0 or 1, not {qos}")
    first = 0x30 | (dup << 3) | (qos << 1) | retain
    return b"".join(
        (bytes((first,)), _remaining(len(field) + len(pid) + len(payload)), field, pid, payload)
    )


def encode_puback(packet_id: int) -> bytes:
    """§3.4 PUBACK."""
    return b"\x40\x02" + _packet_id(packet_id)


def encode_subscribe(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    """§3.8 SUBSCRIBE: ``(filter, requested QoS)`` pairs, at least one."""
    if not filters:
        raise LocalError("SUBSCRIBE needs at least one topic filter")  # [MQTT-3.8.3-3]
    body = [_packet_id(packet_id)]
    for topic_filter, qos in filters:
        validate_filter(topic_filter)
        if qos not in (0, 1, 2):
            raise LocalError(f"requested QoS {qos} is not 0, 1 or 2")
        body += [_string(topic_filter, "topic filter"), bytes((qos,))]
    data = b"".join(body)
    return b"\x82" + _remaining(len(data)) + data  # flags 0b0010 [MQTT-3.8.1-1]


def encode_pingreq() -> bytes:
    """§3.12 PINGREQ."""
    return b"\xc0\x00"


def encode_disconnect() -> bytes:
    """§3.14 DISCONNECT: the server discards the will."""
    return b"\xe0\x00"


# -------------------------------------------------------------------------- decoder


def _name(ptype: int) -> str:
    return _NAMES.get(ptype, f"type {ptype}")


class Decoder:
    """Incremental decoder of the packets a server sends.

    ``receive(data)`` buffers bytes; ``next_packet()`` returns the next complete
    packet, or None until more bytes arrive. A header is parsed once: a packet
    that arrives a byte at a time costs no re-parsing. The first malformed
    packet raises a :class:`ProtocolError`, and every later call raises it again
    (the stream cannot be resynchronised); packets decoded before it were
    returned already. ``feed(data)`` does both for callers that want a list.

    A packet other than PUBLISH longer than ``max_packet_size`` bytes (fixed
    header included) is refused as soon as its header says so, before its body
    is buffered. A PUBLISH whose payload is longer than ``max_payload`` bytes is
    no error (anyone may publish a large message to a topic we subscribe to):
    once its topic and packet id are in it is returned as :class:`Skipped` and
    its payload is dropped as it arrives, never buffered. ``topic_caps`` gives
    topics (exact names) a cap of their own instead of ``max_payload``.
    """

    __slots__ = (
        "_buf",
        "_error",
        "_flags",
        "_hdr",
        "_need",
        "_pos",
        "_skip",
        "_type",
        "max_packet_size",
        "max_payload",
        "topic_caps",
    )

    # §2.2.2 the fixed-header flags each packet type must carry; PUBLISH's vary
    _FLAGS: ClassVar[dict[int, int]] = {
        CONNACK: 0,
        PUBACK: 0,
        PUBREC: 0,
        PUBREL: 2,
        PUBCOMP: 0,
        SUBACK: 0,
        UNSUBACK: 0,
        PINGRESP: 0,
    }
    # the Remaining Length each fixed-size packet must have
    _LENGTH: ClassVar[dict[int, int]] = {
        CONNACK: 2,
        PUBACK: 2,
        PUBREC: 2,
        PUBREL: 2,
        PUBCOMP: 2,
        UNSUBACK: 2,
        PINGRESP: 0,
    }
    _ID_ONLY: ClassVar[dict[int, type[PubAck | PubRec | PubRel | PubComp | UnsubAck]]] = {
        PUBACK: PubAck,
        PUBREC: PubRec,
        PUBREL: PubRel,
        PUBCOMP: PubComp,
        UNSUBACK: UnsubAck,
    }

    def __init__(
        self,
        *,
        max_packet_size: int = MAX_PACKET_SIZE,
        max_payload: int = MAX_PACKET_SIZE,
        topic_caps: Mapping[str, int] | None = None,
    ) -> None:
        if max_packet_size < 2:
            raise LocalError("max_packet_size must be at least 2 bytes")
        if max_payload < 0:
            raise LocalError("max_payload must be at least 0 bytes")
        self.max_packet_size = max_packet_size
        self.max_payload = max_payload
        self.topic_caps = dict(topic_caps or {})
        self._skip = 0  # payload bytes of a skipped PUBLISH still to discard on arrival
        self._buf = bytearray()
        self._pos = 0  # start of the next packet in _buf
        self._need = 0  # total bytes of the packet at _pos once its header is parsed, else 0
        self._hdr = 0  # bytes of that packet's fixed header
        self._type = 0
        self._flags = 0
        self._error: FrameError | DecodeError | None = None

    @property
    def buffered(self) -> bytes:
        """The bytes received but not yet returned as a packet."""
        return bytes(self._buf[self._pos :])

    def state(self) -> tuple[bytes, int, int, int, str | None]:
        """Everything the decoder remembers: buffered bytes, parsed header, bytes still
        to skip, error."""
        err = str(self._error) if self._error else None
        return (self.buffered, self._need, self._hdr, self._skip, err)

    def receive(self, data: bytes) -> None:
        """Buffer ``data`` (any chunk of the stream), less what a skipped PUBLISH still owns."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            self._buf += memoryview(data)[n:]
        else:
            self._buf += data

    def feed(self, data: bytes) -> list[Packet]:
        """``receive(data)``, then every packet now complete."""
        self.receive(data)
        out: list[Packet] = []
        while (p := self.next_packet()) is not None:
            out.append(p)
        return out

    def next_packet(self) -> Packet | None:
        """The next complete packet, or None (more bytes needed)."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except (FrameError, DecodeError) as exc:
            self._error = exc
            raise

    def _next(self) -> Packet | None:
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if not self._need:
            if not avail:
                return None
            first = buf[pos]
            ptype, flags = first >> 4, first & 0x0F
            if ptype in (CONNECT, SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT):
                raise FrameError(f"{_name(ptype)} (packet type {ptype}) is never sent by a server")
            if ptype == PUBLISH:
                if flags & 0x06 == 0x06:
                    raise FrameError("PUBLISH with QoS 3 (both QoS bits set)")  # [MQTT-3.3.1-4]
            elif ptype not in self._FLAGS:
                raise FrameError(f"unknown packet type {ptype} (first byte 0x{first:02x})")
            elif flags != self._FLAGS[ptype]:
                raise FrameError(
                    f"{_name(ptype)} with fixed-header flags 0x{flags:x}, "
                    f"expected 0x{self._FLAGS[ptype]:x}"
                )
            # §2.2.3 Remaining Length: at most four bytes
            length = 0
            i = 1
            while True:
                if i >= avail:
                    return None  # the length is not complete yet
                digit = buf[pos + i]
                length |= (digit & 0x7F) << (7 * (i - 1))
                i += 1
                if not digit & 0x80:
                    break
                if i > 4:
                    raise FrameError(
                        f"{_name(ptype)} remaining length is longer than 4 bytes (malformed)"
                    )
            total = i + length
            if total > self.max_packet_size and ptype != PUBLISH:
                raise FrameError(
                    f"{_name(ptype)} of {total} bytes is larger than the limit of "
                    f"{self.max_packet_size} bytes"
                )
            want = self._LENGTH.get(ptype)
            if want is not None and length != want:
                raise FrameError(f"{_name(ptype)} remaining length {length}, expected {want}")
            if ptype == SUBACK and length < 3:
                raise FrameError(f"SUBACK remaining length {length}, expected at least 3")
            self._need, self._hdr, self._type, self._flags = total, i, ptype, flags
        need = self._need
        if self._type == PUBLISH and need - self._hdr - 2 > self.max_payload:
            # maybe too large: read its head (topic, packet id) and skip the rest
            hdr = self._hdr
            if avail < hdr + 2:
                return None
            tlen = buf[pos + hdr] << 8 | buf[pos + hdr + 1]
            head = hdr + 2 + tlen + (2 if self._flags & 0x06 else 0)  # with the packet id
            if need - head > self.max_payload:
                if avail < head:
                    return None
                topic, qos, packet_id, _ = self._publish_head(
                    buf, pos + hdr, pos + need, self._flags
                )
                if need - head > self.topic_caps.get(topic, self.max_payload):
                    taken = min(avail, need)
                    self._pos = pos + taken
                    self._skip = need - taken
                    self._need = 0
                    return Skipped(topic, need - head, qos, packet_id)
        if avail < need:
            return None
        start = pos + self._hdr
        end = pos + need
        self._pos = end
        self._need = 0
        ptype = self._type
        cls = self._ID_ONLY.get(ptype)
        if cls is not None:
            packet_id = buf[start] << 8 | buf[start + 1]
            if not packet_id:
                raise DecodeError(f"{_name(ptype)} with packet id 0")  # [MQTT-2.3.1-1]
            return cls(packet_id)
        if ptype == PUBLISH:
            return self._publish(buf, start, end, self._flags)
        if ptype == CONNACK:
            ack_flags, rc = buf[start], buf[start + 1]
            if ack_flags & 0xFE:
                raise DecodeError(f"CONNACK with reserved acknowledge flags 0x{ack_flags:02x}")
            return ConnAck(bool(ack_flags), rc)
        if ptype == SUBACK:
            packet_id = buf[start] << 8 | buf[start + 1]
            if not packet_id:
                raise DecodeError("SUBACK with packet id 0")
            codes = tuple(buf[start + 2 : end])
            for c in codes:
                if c not in (0, 1, 2, SUBACK_FAILURE):
                    raise DecodeError(f"SUBACK return code 0x{c:02x} is not 0, 1, 2 or 0x80")
            return SubAck(packet_id, codes)
        return PingResp()  # the last type the header check lets through

    @classmethod
    def _publish(cls, buf: bytearray, start: int, end: int, flags: int) -> Publish:
        topic, qos, packet_id, at = cls._publish_head(buf, start, end, flags)
        return Publish(topic, bytes(buf[at:end]), qos, bool(flags & 1), bool(flags & 8), packet_id)

    @staticmethod
    def _publish_head(
        buf: bytearray, start: int, end: int, flags: int
    ) -> tuple[str, int, int, int]:
        """A PUBLISH's topic, QoS and packet id, and where its payload starts."""
        qos = (flags >> 1) & 0x03
        if end - start < 2:
            raise DecodeError("PUBLISH is truncated: no topic length")
        tlen = buf[start] << 8 | buf[start + 1]
        at = start + 2 + tlen
        if at + (2 if qos else 0) > end:
            raise DecodeError(
                f"PUBLISH is truncated: a topic of {tlen} bytes"
                f"{' and a packet id' if qos else ''} in {end - start} bytes"
            )
        try:
            topic = buf[start + 2 : at].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"PUBLISH topic is not valid UTF-8: {exc.reason}") from exc
        if not topic:
            raise DecodeError("PUBLISH with an empty topic name")  # [MQTT-4.7.3-1]
        if "+" in topic or "#" in topic or "\0" in topic:
            raise DecodeError(f"PUBLISH topic {topic!r} contains a wildcard or U+0000")
        packet_id = 0
        if qos:
            packet_id = buf[at] << 8 | buf[at + 1]
            if not packet_id:
                raise DecodeError(f"PUBLISH at QoS {qos} with packet id 0")
            at += 2
        return topic, qos, packet_id, at


# -------------------------------------------------------------------------- topics


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` (a topic name) matches ``topic_filter`` (§4.7).

    ``+`` matches one whole level, ``#`` the parent level and every level below
    it; a filter starting with a wildcard does not match a topic starting with
    ``$`` [MQTT-4.7.2-1]. A shared subscription ``$share/{group}/{filter}``
    matches what its filter matches.
    """
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        if len(parts) < 3:
            return False
        topic_filter = parts[2]
    if topic_filter == topic:
        return "+" not in topic and "#" not in topic
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    levels = topic.split("/")
    wants = topic_filter.split("/")
    n = len(levels)
    for i, want in enumerate(wants):
        if want == "#":
            return True
        if i >= n or (want != "+" and want != levels[i]):
            return False
    return len(wants) == n
