"""The installer's journey: find and check the terminals of a bus, as a person would.

docs/diagnostics.md, "Try it on an emulated bus", is the script: every
command of its block runs here word for word through the installed
``vitals`` (the port the emulated bus prints replaces the doc's
``/dev/pts/4``): an emulated RS-485 bus at a baud the installer does not
know, ``diag ports``, ``diag scan`` finding the baud and the terminals,
``diag read``'s live table in a real terminal (tmux) until Ctrl-C, ``diag
probe`` naming a word order, then the agent started on that bus and the next
scan refused at once because the agent holds the port. Every step is checked
by :func:`check_clean` (no traceback, no raw errno without a hint, a
documented exit code).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

from journeys.conftest import VITALS, Tmux, run, start, wait_for

from simulator.broker import free_port

DOC = Path(__file__).resolve().parents[2] / "docs" / "diagnostics.md"
DOC_PORT = "/dev/pts/4"  # the doc's example port; the emulated bus prints the real one


def doc_commands() -> list[list[str]]:
    """The ``vitals`` commands of the doc's installer block, in order."""
    text = DOC.read_text()
    assert "<!-- journey: installer -->" in text, "docs/diagnostics.md lost its installer block"
    block = text.split("<!-- journey: installer -->", 1)[1].split("```sh\n", 1)[1]
    block = block.split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.startswith("vitals ")]


def _rows(screen: str) -> dict[str, list[str]]:
    """A rich table's body rows, by their first cell."""
    rows = {}
    for line in screen.splitlines():
        if line.count("│") >= 3:
            cells = [c.strip() for c in line.split("│")[1:-1]]
            rows[cells[0]] = cells
    return rows


def _locked_by(port: str) -> int | None:
    out = json.loads(run("diag", "ports", "--port", port, "--json").out)
    return next(p["locked_by"] for p in out["ports"] if p["device"] == port)


def test_installer_finds_and_checks_the_terminals(tmp_path: Path) -> None:
    cmds = doc_commands()
    assert [c[:3] for c in cmds] == [
        ["vitals", "sim", "rtu"],
        ["vitals", "diag", "ports"],
        ["vitals", "diag", "scan"],
        ["vitals", "diag", "read"],
        ["vitals", "diag", "probe"],
        ["vitals", "run", "--config"],
        ["vitals", "diag", "scan"],
        ["vitals", "status", "--config"],
    ]
    sim, ports, scan, read, probe, agent_cmd, scan_again, status = cmds
    logs = tmp_path / "logs"

    # an emulated bus at 19200 baud, which the installer does not know
    bus = start(*sim[1:], logs=logs)
    try:
        port = bus.wait_output(r"^/dev/pts/\d+$", stream="out")

        def here(cmd: list[str]) -> list[str]:
            return [a.replace(DOC_PORT, port) for a in cmd[1:]]

        # 1. the port is there, we may open it, nobody holds it exclusively
        r = run(*here(ports))
        row = _rows(r.out)[port]
        assert row[-1] == "ok" and "exclusive" not in row[-2]

        # 2. the scan finds the bus's baud and its three terminals, nothing else
        r = run(*here(scan), timeout=180)
        assert "expected duration at most" in r.err
        assert "skipping 8E1" in r.err and "a pseudo terminal" in r.err
        found = {k: v for k, v in _rows(r.out).items() if k.isdigit()}
        assert sorted(map(int, found)) == [3, 7, 12], r
        assert {v[1] for v in found.values()} == {"19200 8N1"}
        assert "bus settings: 19200 8N1" in r.out.replace("\n", " ")

        # 3. the live table in a real terminal, until Ctrl-C. Ctrl-C reaches the whole
        # foreground group, the helper's sh too: a bash that outlives it (trap) says
        # how vitals ended, and the pane stays to be read
        shell = 'trap : INT; "$0" "$@"; echo "[read exit $?]"; sleep 600'
        with Tmux(["bash", "-c", shell, VITALS, *here(read)]) as tm:
            tmux = ["tmux", "-L", tm.name]
            subprocess.run([*tmux, "set-option", "-t", tm.name, "remain-on-exit", "on"], check=True)
            tm.wait(r"sample [2-9]\b", timeout=30)
            screen = tm.screen()
            subprocess.run([*tmux, "send-keys", "-t", tm.name, "C-c"], check=True)
            code = int(tm.wait(r"\[read exit \d+\]")[11:-1])
            last = tm.screen()
        assert code == 0, last
        assert "Traceback" not in last
        assert f"{port} 19200 8N1  slave 3  profile sound_level_meter" in screen
        laeq = _rows(screen)["laeq"]
        assert laeq[2] == "dB(A)" and laeq[3] == "good", screen
        assert 20.0 <= float(laeq[1]) <= 140.0

        # 4. the word order of the pump meter's voltage
        r = run(*here(probe))
        assert 'order: ABCD (type f32): write order = "ABCD" in the profile' in r.out

        # 5. the agent takes the bus (a technician's config and key: docs/install.md)
        state = tmp_path / "state"
        (tmp_path / "gateway.toml").write_text(
            f'[gateway]\nid = "gw-installer"\nstate_dir = "{state}"\n'
            f'[uplink]\nhost = "127.0.0.1"\nport = {free_port()}\n'  # no broker: it spools
            f'[[buses]]\nname = "rs485-1"\nkind = "rtu"\nport = "{port}"\n'
            'baud = 19200\nparity = "N"\n'
            '[[devices]]\nname = "noise-3"\nbus = "rs485-1"\nprofile = "sound_level_meter"\n'
            "slave = 3\n"
        )
        run("keygen", "--state-dir", state)
        agent = start(*agent_cmd[1:], logs=logs, cwd=tmp_path)
        try:
            wait_for("the agent holding the port", lambda: _locked_by(port) == agent.proc.pid)
            # 6. refused at once, naming the agent, the line untouched
            r = run(*here(scan_again), expect=3)
            assert f"port busy: held by vitals (PID {agent.proc.pid})" in r.err
            assert "hint: the agent is polling this port" in r.err
            assert "expected duration" not in r.err  # refused before planning anything
            r = run(*here(read), "--samples", "1", expect=3)
            assert f"port busy: held by vitals (PID {agent.proc.pid})" in r.err
            r = run("diag", "ports", "--port", port)
            assert f"vitals run ({agent.proc.pid}, exclusive)" in r.out
            # 7. the agent polls the bus, untroubled by the refused scan
            wait_for(
                "the agent's status naming its bus",
                lambda: "rs485-1" in run(*status[1:], cwd=tmp_path, expect=None).out,
            )
            r = run(*status[1:], cwd=tmp_path)
            assert "noise-3" in r.out
        finally:
            agent.stop()
        assert not re.search(r"garbage|CRC|degraded", agent.err), agent.err
    finally:
        bus.stop()
