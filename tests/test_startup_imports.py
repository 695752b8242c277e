"""What ``vitals run`` imports at every start (docs/decisions.md 22 and 46).

A module a gateway needs only on a rare path or for one kind of bus is imported
there, not by every agent: the fleet's 48 MB bound (bench.tcp_fleet) is kept
by such cuts, and a new top-level import would undo one silently. The check
runs a fresh interpreter, as the agent does after ``vitals run`` replaces itself.
"""

from __future__ import annotations

import json
import subprocess
import sys

#: imported only where they are used: a serial-sensor bus, a firmware push, a serial
#: Modbus link, a mistake in the configuration; ``decimal`` not at all
RARE = (
    "agent.fieldbus.sensors",
    "drivers.serial_sensors",
    "agent.ops.fwupdate",
    "protocols.fwimage",
    "serial",
    "difflib",
    "decimal",
)
#: never in the agent (decisions 22: the CLI's parser and its help)
CLI = ("typer", "click", "rich", "pydantic")


def _modules_of_the_agent() -> set[str]:
    code = (
        "import json, sys\n"
        "import agent.runner, agent.service, agent.ops.reload, agent.ops.confpush\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(out.stdout))


def test_the_agent_does_not_import_what_only_rare_paths_need() -> None:
    loaded = _modules_of_the_agent()
    assert "agent.service" in loaded and "aiomqtt" in loaded  # the agent itself did load
    assert sorted(loaded & {*RARE, *CLI}) == []
