"""protocols.address.host_port: the one HOST:PORT parser (brokers, the metrics listener)."""

from __future__ import annotations

import pytest

from protocols.address import host_port
from protocols.errors import LocalError

GOOD = [
    ("127.0.0.1:1883", ("127.0.0.1", 1883)),
    (" broker.example:8883 ", ("broker.example", 8883)),
    ("[::1]:9108", ("::1", 9108)),
    ("localhost:65535", ("localhost", 65535)),
]
BAD = [
    ("localhost", "is not HOST:PORT"),
    ("host:abc", "the port 'abc' is not a number"),
    ("host:²", "is not a number"),
    ("host:0", "outside 1..65535"),
    ("host:65536", "outside 1..65535"),
    (":1883", "is not HOST:PORT"),
    ("a host:1883", "is not HOST:PORT"),
]


@pytest.mark.parametrize(("text", "want"), GOOD)
def test_host_port_reads(text: str, want: tuple[str, int]) -> None:
    assert host_port(text) == want


@pytest.mark.parametrize(("text", "why"), BAD)
def test_host_port_refuses_saying_why(text: str, why: str) -> None:
    with pytest.raises(LocalError, match=why):
        host_port(text)


def test_an_empty_host_is_the_default_when_one_is_given() -> None:
    assert host_port(":1883", default_host="127.0.0.1") == ("127.0.0.1", 1883)
