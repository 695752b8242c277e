"""``vitals diag ports``: ports and the processes holding them."""

from __future__ import annotations

import json
import os
import pty
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.cli.diag import diag_app
from agent.cli.diag.ports import holders

runner = CliRunner()


@pytest.fixture
def pty_path() -> Iterator[tuple[str, int]]:
    master, slave = pty.openpty()
    try:
        yield os.ttyname(slave), slave
    finally:
        os.close(master)
        os.close(slave)


def test_holders_finds_this_process(pty_path: tuple[str, int]) -> None:
    path, _ = pty_path
    found, _hidden = holders([path])
    comm = Path(f"/proc/{os.getpid()}/comm").read_text().strip()
    assert (os.getpid(), comm) in found[path]


def test_cli_json_lists_the_given_port_with_its_holder(pty_path: tuple[str, int]) -> None:
    path, _ = pty_path
    r = runner.invoke(diag_app, ["ports", "--port", path, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    mine = next(p for p in out["ports"] if p["device"] == path)
    assert mine["exists"] and mine["access"]
    assert os.getpid() in [h["pid"] for h in mine["held_by"]]


def test_cli_table_and_missing_port() -> None:
    r = runner.invoke(diag_app, ["ports", "--port", "/dev/ttyNOPE-3"])
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if "/dev/ttyNOPE-3" in line)
    assert "missing" in row


def test_the_process_holding_a_port_exclusively_is_marked(pty_path: tuple[str, int]) -> None:
    from test_diag_scan import held_by_another_process

    path, _ = pty_path
    with held_by_another_process(path) as holder:
        r = runner.invoke(diag_app, ["ports", "--port", path, "--json"])
        table = runner.invoke(diag_app, ["ports", "--port", path], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    mine = next(p for p in json.loads(r.output)["ports"] if p["device"] == path)
    assert mine["locked_by"] == holder.pid
    assert holder.pid in [h["pid"] for h in mine["held_by"]]
    assert f"({holder.pid}, exclusive)" in table.output


def test_a_path_with_brackets_is_shown_as_is(tmp_path: Path) -> None:
    """A udev name like "[bus-1]" is text, not rich markup."""
    master, slave = pty.openpty()
    link = tmp_path / "[bus-1]"
    link.symlink_to(os.ttyname(slave))
    try:
        r = runner.invoke(diag_app, ["ports", "--port", str(link)], env={"COLUMNS": "250"})
    finally:
        os.close(master)
        os.close(slave)
    assert r.exit_code == 0, r.output
    assert f"{link}" in r.output


@pytest.mark.parametrize(
    ("comm", "argv", "short", "long"),
    [
        ("vitals", ["/usr/bin/python3", "/opt/vitals/bin/vitals", "run", "--config", "gw.toml"],
         "vitals", "vitals run"),
        ("python3", ["python3", "-m", "agent", "sim", "rtu", "--baud", "19200"],
         "vitals", "vitals sim rtu"),
        # vitals run replaces itself with the bare agent (same PID)
        ("python3", ["/usr/bin/python3", "-m", "agent.runner", "gw.toml", "", ""],
         "vitals", "vitals run"),
        ("minicom", ["minicom", "-D", "/dev/ttyUSB0"], "minicom", "minicom"),
    ],
)  # fmt: skip
def test_process_names(tmp_path: Path, comm: str, argv: list[str], short: str, long: str) -> None:
    from agent.fieldbus.portlock import process_name

    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "comm").write_text(comm + "\n")
    (tmp_path / "42" / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    assert process_name(42, tmp_path) == short
    assert process_name(42, tmp_path, command=True) == long
