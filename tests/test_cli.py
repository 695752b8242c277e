"""The ``vitals`` CLI as a user runs it: the installed command in a subprocess.

Every case checks the exit code and what the person reads: one ``error:`` line and
one ``hint:`` line for a mistake, never a traceback. The simulators' commands are
in tests/test_sim_cli.py.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.ops.status import write_status

REPO = Path(__file__).resolve().parent.parent
VITALS = Path(sys.executable).parent / "vitals"

pytestmark = pytest.mark.skipif(
    not VITALS.exists(), reason=f"the installed CLI is not at {VITALS} (pip install -e .)"
)


def vitals(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("VITALS_")}
    base.pop("RUNTIME_DIRECTORY", None)
    base["COLUMNS"] = "200"
    return subprocess.run(
        [str(VITALS), *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def assert_one_error(r: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    """Exit ``code``; stderr is one error line and one hint line; no traceback."""
    assert r.returncode == code, (r.stdout, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2, r.stderr
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: "), r.stderr
    assert "[]" not in lines[1], "a hint never offers an empty choice"
    for f in fragments:
        assert f in r.stderr, (f, r.stderr)


# -- one style for every command ------------------------------------------------------

COMMANDS = [
    [],
    ["run"],
    ["status"],
    ["keygen"],
    ["config", "check"],
    ["hub"],
    ["hub", "token"],
    ["hub", "stats"],
    ["demo"],
    ["sim", "tcp"],
    ["sim", "rtu"],
    ["sim", "firmware"],
    ["sim", "fleet"],
    ["diag"],
    ["provision"],
    ["key"],
]


def test_version_comes_from_the_package_metadata() -> None:
    r = vitals("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"vitals {importlib.metadata.version('vitals-gateway')}"
    m = subprocess.run(
        [sys.executable, "-m", "agent", "--version"], capture_output=True, text=True, check=False
    )
    assert m.returncode == 0 and m.stdout == r.stdout, m.stderr


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "vitals")
def test_every_command_has_the_same_help(command: list[str]) -> None:
    """typer's help for all (argparse once served run and sim rtu/firmware/fleet)."""
    r = vitals(*command, "--help")
    assert r.returncode == 0, r.stderr
    assert f"Usage: vitals {' '.join(command)}".rstrip() in r.stdout
    assert "─ Options ─" in r.stdout
    assert "usage: " not in r.stdout  # argparse's
    assert "<bool>" not in r.stdout  # a flag takes no value


def test_every_option_of_our_commands_says_what_it_is_for() -> None:
    import typer.main

    from agent.cli.main import app

    group = typer.main.get_command(app)
    seen = 0

    def walk(cmd: object, path: str) -> None:
        nonlocal seen
        import typer.core

        for p in getattr(cmd, "params", []):
            if isinstance(p, typer.core.TyperOption) and p.name != "help":
                seen += 1
                assert p.help, f"{path} {p.opts[0]} has no help text"
        for name, sub in getattr(cmd, "commands", {}).items():
            if name not in ("diag", "provision", "key"):  # their own suites check them
                walk(sub, f"{path} {name}")

    walk(group, "vitals")
    assert seen > 30


def test_the_running_agent_is_a_fresh_interpreter_without_the_cli(tmp_path: Path) -> None:
    """docs/decisions.md 22: `vitals run` parses with typer, then replaces itself (same
    PID, for systemd) with `python -m agent.runner`, which loads neither typer nor
    pydantic, rich, the diagnostics or provisioning."""
    code = (
        "import sys\n"
        "from agent.runner import _exec_main\n"
        "assert _exec_main(['/nonexistent/gateway.toml', '', '']) == 1\n"
        "print(sorted(m for m in ('typer', 'pydantic', 'rich', 'agent.cli.main', 'agent.cli.diag',"
        " 'agent.ops.provision') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    state = tmp_path / "state"
    assert vitals("keygen", "--state-dir", str(state)).returncode == 0
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        f'[gateway]\nid = "gw-exec"\nstate_dir = "{state}"\n'
        '[uplink]\nhost = "127.0.0.1"\nport = 1\n'
        '[[buses]]\nname = "tcp-1"\nkind = "tcp"\nhost = "127.0.0.1"\ntcp_port = 1\n'
        '[[devices]]\nname = "noise-1"\nbus = "tcp-1"\nprofile = "sound_level_meter"\n'
        "slave = 1\n"
    )
    exe = Path(sys.executable).parent / "vitals"
    proc = subprocess.Popen(
        [str(exe), "run", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        cmdline = ""
        while time.monotonic() < deadline and "agent.runner" not in cmdline:
            time.sleep(0.1)
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_text().replace("\0", " ")
        assert "-m agent.runner" in cmdline, cmdline  # the same PID, now the agent alone
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "pydantic_core" not in maps
        while time.monotonic() < deadline and not (state / "status.json").exists():
            time.sleep(0.1)  # running, its signal handlers in place
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_a_mistyped_command_is_matched_against_every_command() -> None:
    r = vitals("dag")
    assert r.returncode == 2 and "Did you mean 'diag'?" in r.stderr


def test_python_m_agent_runs_the_same_cli() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "agent", "sim", "rtu", "--device", "0=rain_gauge"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert_one_error(r, 2, "1..247")


# -- the agent -----------------------------------------------------------------------


def test_run_with_a_missing_config_says_which_file_and_how_to_name_another(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "gateway.toml"
    r = vitals("run", "--config", str(missing))
    assert_one_error(r, 1, str(missing), "--config FILE or VITALS_CONFIG")
    r = vitals("run", env={"VITALS_CONFIG": str(missing)})
    assert_one_error(r, 1, str(missing))


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["run", "--log-level", "loud"], 2, "debug, info, warning, error"),
        (["demo", "--broker", "nonsense"], 2, "HOST:PORT"),
        (["status", "--status-file", "/"], 1, "a directory"),
        (["hub", "token"], 2, "Missing argument"),
        (["status", "--jsn"], 2, "--jsn"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else str(v),
)
def test_agent_mistakes_are_one_line_and_a_hint(args: list[str], code: int, fragment: str) -> None:
    assert_one_error(vitals(*args), code, fragment)


def test_status_of_a_half_written_file_says_so(tmp_path: Path) -> None:
    (tmp_path / "status.json").write_text('{"format": 1, "sta')
    r = vitals("status", "--status-file", str(tmp_path / "status.json"))
    assert_one_error(r, 1, "not a status document", "try again")


def _config(tmp_path: Path, state: Path) -> Path:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[gateway]\nid = "gw-7"\nstate_dir = "{state}"\n')
    return cfg


def _status(state: Path, pid: int) -> None:
    write_status(
        state / "status.json",
        {
            "format": 1,
            "state": "running",
            "written_at": time.time(),
            "interval_s": 5.0,
            "pid": pid,
            "gateway": "gw-7",
            "uplink": {"connected": True, "batches_acked": 3},
            "buses": {},
        },
    )


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_status_finds_the_state_dir_through_the_config(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cfg = _config(tmp_path, state)
    _status(state, os.getpid())  # this test's process: alive
    r = vitals("status", "--config", str(cfg), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["running"] is True and doc["path"] == str(state / "status.json")
    r = vitals("status", env={"VITALS_CONFIG": str(cfg)})
    assert r.returncode == 0, r.stderr
    assert "running" in r.stdout and "gw-7" in r.stdout


def test_status_without_a_status_file_names_where_it_looked_and_how_to_point(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    r = vitals("status", "--state-dir", str(state))
    assert_one_error(r, 1, str(state / "status.json"), "--config FILE", "--state-dir DIR")
    r = vitals("status", "--config", str(tmp_path / "nope.toml"))
    assert_one_error(r, 1, "nope.toml", "vitals config check")


def test_a_stopped_agent_is_not_shown_connected(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _status(state, _dead_pid())  # it said connected, then died without a last status
    r = vitals("status", "--state-dir", str(state), "--json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["running"] is False and doc["state"] == "stopped"
    assert doc["uplink"]["connected"] is False
    r = vitals("status", "--state-dir", str(state))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "stopped" in r.stdout and "is gone" in r.stdout
    assert "not connected" in r.stdout
    assert not re.search(r"uplink\s+connected", r.stdout)


# -- config check ----------------------------------------------------------------------


def test_the_readme_config_check_sample_is_the_real_output() -> None:
    readme = (REPO / "README.md").read_text()
    m = re.search(r"```\n\$ cd docs/examples && vitals config check (\S+)\n(.*?)```", readme, re.S)
    assert m, "README shows `$ cd docs/examples && vitals config check FILE` and its output"
    r = vitals("config", "check", m[1], cwd=REPO / "docs" / "examples")
    assert r.returncode == 1
    assert r.stderr == m[2], "README.md's sample differs from what vitals prints"


def test_config_check_json(tmp_path: Path) -> None:
    r = vitals("config", "check", "--json", str(REPO / "docs/examples/gateway-mistakes.toml"))
    assert r.returncode == 1 and r.stderr == ""
    doc = json.loads(r.stdout)
    assert doc["ok"] is False
    assert [p["where"].split(": ")[1] for p in doc["problems"]] == [
        "buses[1].baud",
        "devices[0].slave",
        "devices[1].bus",
    ]
    r = vitals("config", "check", "--json", str(REPO / "docs/examples/gateway-minimal.toml"))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and doc["config"]["gateway"]["id"] == "gw-0001"


# -- the hub -------------------------------------------------------------------------


@pytest.fixture
def no_aiomqtt(tmp_path: Path) -> dict[str, str]:
    """An environment where `import aiomqtt` fails, as on a gateway without the demo extra."""
    shadow = tmp_path / "shadow" / "aiomqtt"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('aiomqtt is not installed here')\n")
    return {"PYTHONPATH": str(shadow.parent)}


def test_hub_token_and_stats_need_no_mqtt(tmp_path: Path, no_aiomqtt: dict[str, str]) -> None:
    db = tmp_path / "hub.sqlite3"
    r = vitals("hub", "token", "gw-silent", "--db", str(db), "--json", env=no_aiomqtt)
    assert r.returncode == 0, r.stderr
    tok = json.loads(r.stdout)
    assert tok["ok"] is True and tok["gateway"] == "gw-silent" and tok["token"]
    assert len(tok["hub_key_id"]) == 16
    r = vitals("hub", "--db", str(db), "token", "gw-other", env=no_aiomqtt)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "pins hub key" in r.stderr
    r = vitals("hub", "stats", "--db", str(db), "--json", env=no_aiomqtt)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["gateways"] == {}


def test_hub_stats_lists_gateways_enrolled_but_silent(tmp_path: Path) -> None:
    from hub.core import HubCore

    db = tmp_path / "hub.sqlite3"
    core = HubCore(db)
    try:
        core.enroll("gw-quiet", bytes(range(32)))
        core.flush()
    finally:
        core.close()
    for args in (
        ["hub", "--db", str(db), "stats", "--json"],
        ["hub", "stats", "--db", str(db), "--json"],
    ):
        r = vitals(*args)
        assert r.returncode == 0, r.stderr
        g = json.loads(r.stdout)["gateways"]
        assert g["gw-quiet"]["batches"] == 0 and g["gw-quiet"]["readings"] == 0
    r = vitals("hub", "stats", "--db", str(db))
    assert r.returncode == 0, r.stderr
    assert re.search(r"gw-quiet\s*│\s*0\s*│\s*0", r.stdout), r.stdout


@pytest.mark.parametrize(
    ("args", "code", "fragments"),
    [
        (["hub", "--trust", "gw=abcd"], 2, ["64 hex digits", "public key"]),
        (["hub", "--trust", "gw=zz"], 2, ["64 hex digits"]),
        (["hub", "--trust", "=" + "ab" * 32], 2, ["GATEWAY="]),
        (["hub", "--broker", "localhost"], 2, ["HOST:PORT"]),
        (["hub", "--sharded"], 2, ["--worker"]),
        (["hub", "stats", "--db", "/nonexistent/hub.sqlite3"], 1, ["no hub database", "--db"]),
        (["hub", "--db", "/"], 1, ["unable to open", "--db FILE"]),
        (["hub", "token", "GW 1", "--db", "/nonexistent/hub.sqlite3"], 1, ["--db"]),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else str(v),
)
def test_hub_mistakes_are_one_line_and_a_hint(
    args: list[str], code: int, fragments: list[str]
) -> None:
    assert_one_error(vitals(*args), code, *fragments)


def test_hub_token_refuses_a_bad_gateway_id(tmp_path: Path) -> None:
    r = vitals("hub", "token", "GW 1", "--db", str(tmp_path / "hub.sqlite3"))
    assert_one_error(r, 1, "GW 1")
    r = vitals("hub", "token", "GW 1", "--db", str(tmp_path / "hub.sqlite3"), "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["error"] and doc["hint"]
