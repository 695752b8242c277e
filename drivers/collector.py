"""The garbage collector as a long-running vitals process wants it.

The agent and the hub worker (and the benches that measure them) build
everything they keep at start-up (configuration, point table, pollers; the
store, the keys) and then allocate many short-lived tuples and lists, none of
them in a cycle. So once started they freeze what start-up built out of the
collector's scans and raise the gen-0 threshold: measured, 1.2 % of a core at
15,000 readings/s in the agent (decisions 45) and 9-20 % of the hub core's CPU
(decisions 49), collecting nothing.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["STEADY_THRESHOLDS", "steady_gc"]

#: gen-0 allocations between collections, and the older generations' ratios
STEADY_THRESHOLDS = (20_000, 20, 100)

_users = 0
_before = gc.get_threshold()


@contextlib.contextmanager
def steady_gc() -> Iterator[None]:
    """Freeze what exists and raise the thresholds; undo both when the last user of
    the process leaves (a reload starts a new agent whose old objects must go; tests
    and the demo run several agents and hubs in one process)."""
    global _users, _before
    if _users == 0:
        gc.collect()
        gc.freeze()
        _before = gc.get_threshold()
        gc.set_threshold(*STEADY_THRESHOLDS)
    _users += 1
    try:
        yield
    finally:
        _users -= 1
        if _users == 0:
            gc.unfreeze()
            gc.set_threshold(*_before)
