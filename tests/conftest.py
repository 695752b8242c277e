"""Shared fixtures: a private MQTT broker per test, on a free loopback port.

The suite uses Mosquitto wherever it is installed (CI installs it) and the
embedded amqtt broker otherwise; the header line of the run says which.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from simulator.broker import EmbeddedBroker, MosquittoBroker, make_broker, mosquitto_path


def pytest_report_header(config: pytest.Config) -> str:
    exe = mosquitto_path()
    if exe:
        return f"vitals: tests use Mosquitto ({exe}) on free 127.0.0.1 ports"
    return "vitals: Mosquitto not installed; tests use the embedded amqtt broker (Mosquitto-only tests skip)"


@pytest.fixture
async def broker() -> AsyncIterator[MosquittoBroker | EmbeddedBroker]:
    """Mosquitto when installed, else the embedded broker; stopped after the test."""
    b = make_broker("auto")
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


@pytest.fixture
async def mosquitto() -> AsyncIterator[MosquittoBroker]:
    """A real Mosquitto on a free loopback port; the test skips when it is not installed."""
    if not mosquitto_path():
        pytest.skip("needs the mosquitto binary (apt-get install mosquitto); .ci/run installs it")
    b = MosquittoBroker()
    await b.start()
    try:
        yield b
    finally:
        await b.stop()
