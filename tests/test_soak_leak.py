"""What the soak found (bench/README.md, "soak"; decisions 45): nothing the agent
does again and again may define a new ctypes class.

Each ``ctypes.CDLL`` defines one (its ``_FuncPtr``), which only the cyclic
collector frees, and the running agent's collector seldom runs (agent.service's
thresholds). The clock asked the kernel once a second through a new ``CDLL``
while unsynchronised: ~3 KB a second, the whole RSS growth of ``bench.soak``.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Iterator

import pytest

from agent.clock import SystemClock, kernel_synced, libc
from agent.fieldbus.rtu import Timer


def _ctypes_function_classes() -> int:
    return len(ctypes._CFuncPtr.__subclasses__())  # type: ignore[attr-defined]


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Classes in cycles stay alive, as between the agent's rare collections."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.usefixtures("no_gc")
def test_asking_the_kernel_again_and_again_defines_no_ctypes_class() -> None:
    kernel_synced()  # the first call may load the library
    before = _ctypes_function_classes()
    for _ in range(50):
        kernel_synced()
    assert _ctypes_function_classes() == before


@pytest.mark.usefixtures("no_gc")
def test_an_unsynchronised_clock_stamping_for_minutes_defines_no_ctypes_class() -> None:
    # the real kernel_synced, asked at every stamp as if a second had passed
    clock = SystemClock()
    if clock.synced:
        pytest.skip("the kernel's clock is synchronised here: the clock never asks it again")
    clock.now_ms()
    before = _ctypes_function_classes()
    for _ in range(50):
        clock._asked -= 2_000_000_000
        clock.now_ms()
    assert _ctypes_function_classes() == before


@pytest.mark.usefixtures("no_gc")
def test_a_serial_link_reopened_again_and_again_defines_no_ctypes_class() -> None:
    Timer().close()
    before = _ctypes_function_classes()
    for _ in range(50):
        Timer().close()
    assert _ctypes_function_classes() == before


def test_the_c_library_is_loaded_once() -> None:
    assert libc() is libc()
