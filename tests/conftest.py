"""Shared fixtures: a private MQTT broker per test, on a free loopback port.

The suite uses Mosquitto wherever it is installed (CI installs it) and the
embedded amqtt broker otherwise; the header line of the run says which. Also
here: the ``system`` marker, the order of the files for xdist, and
``@pytest.mark.virtual_time`` (scheduling tests on tests/virtual_time.py's loop).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping

import pytest

from simulator.broker import EmbeddedBroker, MosquittoBroker, make_broker, mosquitto_path
from tests.virtual_time import VirtualClock, VirtualLoop

# The slow system tests: whole processes, real brokers, databases and firmware
# restarted or killed, faults injected for real, minutes of traffic. Marked
# ``system`` here, by file (or by test where a file is mostly quick), so a developer
# runs the rest alone with ``pytest -m "not system"``; CI runs everything.
SYSTEM_FILES = frozenset(
    {
        "test_crash.py",  # kill -9 under load, 22 times
        "test_outage.py",
        "test_fleet.py",
        "test_e2e.py",
        "test_lying_broker.py",
        "test_firmware_hil.py",  # the HIL suite against the firmware under MicroPython
        "test_fwupdate.py",  # firmware updates under MicroPython: power cuts, restarts
        "test_firmware_push.py",  # the hub pushes firmware through Mosquitto to a real agent
        "test_hub_pg.py",  # a PostgreSQL cluster of its own
        "test_hub_resilience.py",  # Mosquitto restarted twenty times under a live hub
    }
)
SYSTEM_PREFIXES = ("test_fault_",)  # the field's faults, injected for real
SYSTEM_DIRS = frozenset({"journeys"})  # a person's whole path through the installed CLI
# and every test parametrized "postgresql": a private cluster of its own (tests/pg_cluster.py)
SYSTEM_TESTS = frozenset(  # a real agent in a subprocess, from start to verified batch
    {
        "test_confpush.py::test_pushes_through_mosquitto_to_a_real_agent",
        "test_health.py::test_three_outcomes_of_a_real_agent",
        "test_diag_trace.py::test_tap_the_running_agents_modbus_tcp_bus",
        "test_provision.py::test_from_nothing_to_a_verified_batch_with_one_command",
    }
)


def _is_system(item: pytest.Item) -> bool:
    name = item.path.name
    return (
        name in SYSTEM_FILES
        or name.startswith(SYSTEM_PREFIXES)
        or item.path.parent.name in SYSTEM_DIRS
        or f"{name}::{getattr(item, 'originalname', item.name)}" in SYSTEM_TESTS
        or "postgresql" in getattr(getattr(item, "callspec", None), "id", "").split("-")
    )


# The longest files first, the longest at the top (seconds of test time in two runs of
# the README's command on 2 shared cores, 7 Dec 2026: about 1,200 s of test time in
# all). ``-n 6 --dist loadfile`` hands each worker one file at a time in collection
# order, so these start at once and the many quick files fill the gaps after them;
# left to xdist's default order (by number of tests) the long system files ran last
# and left one worker alone for a minute and a half. A file not listed keeps its
# place after these; re-measure with ``--junitxml`` when a file grows.
LONGEST_FIRST = (
    "test_lying_broker.py",  # 132-145
    "test_fwupdate.py",  # 102
    "test_outage.py",  # 71 (one test: two 30 s outages)
    "test_fault_cmd_flood.py",  # 60
    "test_fault_rtu_late.py",  # 56-59
    "test_cli.py",  # 52-56
    "test_fault_disk.py",  # 52-55
    "test_fleet.py",  # 51-82
    "test_crash.py",  # 46
    "test_installer.py",  # 28-43 (journeys)
    "test_diag_trace.py",  # 36-40
    "test_provision.py",  # 17-39
    "test_firmware_hil.py",  # 32
    "test_firmware_push.py",  # 28
    "test_hub_resilience.py",  # 26
    "test_sim_realism.py",  # 20-25
    "test_fault_tcp.py",  # 23
    "test_technician.py",  # 9 to 65 (journeys; sudo)
    "test_hub_pg.py",  # 19-46
    "test_payload.py",  # 12-19
    "test_hub_operator.py",  # 8-17 (journeys)
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "virtual_time: the async test runs on a VirtualLoop (tests/virtual_time.py)"
    )
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep LONGEST_FIRST's order
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _is_system(item):
            item.add_marker(pytest.mark.system)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # a stable sort: the tests of a file keep their order
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """``@pytest.mark.virtual_time``: the async test runs on a VirtualLoop (tests/virtual_time.py).

    Every other async test gets the loop it would get anyway (the policy's).
    """
    if item.get_closest_marker("virtual_time"):
        return {"virtual": VirtualLoop}
    return {"asyncio": lambda: asyncio.get_event_loop_policy().new_event_loop()}


@pytest.fixture
async def virtual_clock() -> VirtualClock:
    """The agent's Clock on the running VirtualLoop (the test is marked ``virtual_time``)."""
    loop = asyncio.get_running_loop()
    if not isinstance(loop, VirtualLoop):
        pytest.fail("virtual_clock needs @pytest.mark.virtual_time on the test", pytrace=False)
    return VirtualClock(loop)


@pytest.fixture(autouse=True)
def _logging_as_found() -> Iterator[None]:
    """Each test leaves the levels of the root, ``agent`` and ``hub`` loggers, and
    the handlers of the last two, as it found them. A test that runs an agent in
    this process at DEBUG once left ``agent`` there, and every later test on its
    worker captured the agent's INFO and DEBUG records (one of them named a test's
    directory, ``test_clock_stepped_...``, and a search for "stepped" found three
    clock steps of two). The root's handlers are pytest's own, per phase."""
    named = [logging.getLogger(n) for n in ("agent", "hub")]
    root = logging.getLogger()
    levels = [(lg, lg.level) for lg in (root, *named)]
    handlers = [(lg, list(lg.handlers)) for lg in named]
    yield
    for lg, level in levels:
        lg.setLevel(level)
    for lg, hs in handlers:
        lg.handlers[:] = hs


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
