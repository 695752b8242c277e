"""The technician's journey: docs/install.md, step by step, as written.

Sections 2, 4, 5 and 6 of the guide run word for word: each command below is
first found, verbatim, in docs/install.md, then run with only its paths moved
into a temporary root (``/etc/vitals`` -> ``ROOT/etc/vitals`` and so on), the
broker's address replaced by a local one and ``<token>`` by the token. A line
that starts with ``sudo -u vitals`` runs as the service user, ``sudo`` as
root, anything else as the technician: another user, a member of the
``vitals`` group (``sudo usermod -aG vitals $USER``). The agent runs as
``vitals`` with the unit's ``UMask`` (docs/systemd/vitals.service), against a
real hub: ``vitals hub`` and Mosquitto (TLS for the gateway, with a CA made
here by ``openssl``), the token from ``vitals hub token``.

Needs root (to create the users) and Mosquitto; skips saying why otherwise.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from journeys.conftest import (
    VITALS,
    Background,
    Result,
    cli_for,
    ensure_group_member,
    ensure_system_user,
    run,
    start,
    wait_for,
    wait_subscribed,
    world_readable_tmp,
)

from simulator.broker import HOST, MosquittoBroker, free_port, mosquitto_path

DOCS = Path(__file__).resolve().parents[2] / "docs"
INSTALL = (DOCS / "install.md").read_text()
UNIT = (DOCS / "systemd" / "vitals.service").read_text()
TECH = "vitals-tech"  # the technician: not root, in the group vitals
GW = "gw-0042"


def doc(command: str) -> str:
    """``command`` as docs/install.md has it (continuation lines joined); fails if the
    guide does not say it word for word."""
    lines = command.splitlines()
    assert all(line in INSTALL for line in lines), f"docs/install.md no longer says:\n{command}"
    return " ".join(line.rstrip("\\").strip() for line in lines)


@dataclass
class Root:
    """The temporary root and how a documented command maps onto it."""

    path: Path
    subst: dict[str, str]
    service_cli: Path  # the vitals the service user runs (/opt/vitals/venv/bin/vitals)
    tech_cli: Path

    def argv(self, command: str) -> tuple[str | None, list[str]]:
        """(user, argv) of a documented command line: its comment dropped, paths moved."""
        command = re.sub(r"\s+#.*$", "", command)
        keys = sorted(self.subst, key=len, reverse=True)  # one pass, longest first
        command = re.sub("|".join(map(re.escape, keys)), lambda m: self.subst[m[0]], command)
        argv = shlex.split(command.replace("$USER", TECH))
        user: str | None = TECH
        if argv[:3] == ["sudo", "-u", "vitals"]:
            user, argv = "vitals", argv[3:]
        elif argv[:1] == ["sudo"]:
            user, argv = None, argv[1:]  # root: this test
        if argv[0] == "vitals":
            argv[0] = str({None: VITALS, "vitals": self.service_cli}.get(user, self.tech_cli))
        return user, argv

    def run(self, command: str, *, expect: int = 0, cwd: Path | None = None) -> Result:
        user, argv = self.argv(doc(command))
        return run(
            *argv[1:],
            exe=argv[0],
            user=user,
            groups=_groups(user),
            expect=expect,
            cwd=cwd,
            env=_env(self, user),
        )

    def start(self, command: str) -> Background:
        user, argv = self.argv(doc(command))
        umask = int(re.search(r"^UMask=(\d+)$", UNIT, re.M).group(1), 8)  # type: ignore[union-attr]
        return start(
            *argv[1:],
            exe=argv[0],
            user=user,
            groups=_groups(user),
            umask=umask,  # as the unit runs it
            logs=self.path / "logs",
            env=_env(self, user),
        )


def _groups(user: str | None) -> list[str]:
    """The supplementary groups the user has (sudo -u sets them; Popen does not)."""
    if user is None:
        return []
    name = pwd.getpwnam(user).pw_name
    return [g.gr_name for g in grp.getgrall() if name in g.gr_mem]


def _env(root: Root, user: str | None) -> dict[str, str]:
    # the technician's `vitals status` looks in /run/vitals: here, ROOT/run/vitals
    return {"RUNTIME_DIRECTORY": root.subst["/run/vitals"]} if user == TECH else {}


def _tls_files(where: Path) -> tuple[Path, Path, Path]:
    """A CA, and a broker certificate for 127.0.0.1 signed by it (openssl, as a city would)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl (apt-get install openssl) to make the broker's certificate")
    where.mkdir(parents=True)
    ca_key, ca, key, csr, crt = (
        where / n for n in ("ca.key", "city-ca.pem", "b.key", "b.csr", "b.crt")
    )
    ext = where / "ext.cnf"
    ext.write_text("subjectAltName = IP:127.0.0.1\nextendedKeyUsage = serverAuth\n")
    for argv in (
        ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=city test CA"],
        ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", key, "-out", csr, "-subj", "/CN=broker"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", crt, "-days", "2", "-extfile", ext],
    ):  # fmt: skip
        subprocess.run(["openssl", *map(str, argv)], check=True, capture_output=True)
    for p in where.iterdir():
        p.chmod(0o644)
    return ca, crt, key


@dataclass
class Hub:
    broker: MosquittoBroker
    tls_port: int
    db: Path
    proc: Background


@pytest.fixture
def root() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root: the journey creates the service user and a technician")
    if not mosquitto_path():
        pytest.skip("needs the mosquitto binary (apt-get install mosquitto); .ci/run installs it")
    with world_readable_tmp("vitals-journey-") as path:
        yield path


@pytest.fixture
def hub(root: Path) -> Iterator[Hub]:
    """The city side: Mosquitto (plain for the hub, TLS for gateways) and `vitals hub`."""
    ca, crt, key = _tls_files(root / "city")
    tls_port = free_port()
    broker = MosquittoBroker(
        extra_config="log_type subscribe\nuser root\n"
        f"listener {tls_port} {HOST}\ncafile {ca}\ncertfile {crt}\nkeyfile {key}\n"
    )
    import asyncio

    asyncio.run(broker.start())
    (root / "hub").mkdir()
    db = root / "hub" / "hub.sqlite3"
    proc = start(
        "hub", "--db", db, "--broker", f"{HOST}:{broker.port}", logs=root / "logs", cwd=root / "hub"
    )
    try:
        wait_subscribed(broker, "vitals/v1/enroll/+")
        yield Hub(broker, tls_port, db, proc)
    finally:
        proc.stop(expect=None)
        asyncio.run(broker.stop())


def test_install_md_as_written(root: Path, hub: Hub) -> None:
    # -- section 2: the service user, its directories, the technician in its group
    useradd = (
        "sudo useradd --system --home-dir /var/lib/vitals --shell /usr/sbin/nologin "
        "--groups dialout vitals"
    )
    subst = {
        "/etc/vitals": str(root / "etc/vitals"),
        "/var/lib/vitals": str(root / "var/lib/vitals"),
        "/run/vitals": str(root / "run/vitals"),
        "/opt/vitals": str(root / "opt/vitals"),
        "/tmp/label.png": str(root / "tmp/label.png"),
        "mqtt.city.example:8883": f"{HOST}:{hub.tls_port}",
    }
    try:
        pwd.getpwnam("vitals")
    except KeyError:  # word for word (the home directory does not matter here)
        subprocess.run(shlex.split(doc(useradd))[1:], check=True)
    ensure_system_user("vitals", ["dialout"])
    ensure_group_member(TECH, "vitals")
    (root / "opt").mkdir()
    (root / "tmp").mkdir(mode=0o1777)
    r = Root(root, subst, VITALS, VITALS)
    r.run("sudo install -d -o root   -g root   -m 0755 /opt/vitals          # the software")
    # section 3 (pip from the network) is replaced by a venv the other users can run
    r.service_cli = cli_for("vitals", root / "opt" / "vitals")
    r.tech_cli = (
        cli_for(TECH, root / "opt" / "vitals") if r.service_cli == VITALS else r.service_cli
    )
    if r.service_cli != VITALS:
        subst["/opt/vitals/venv/bin/vitals"] = str(r.service_cli)
    r.run("sudo install -d -o root   -g vitals -m 0750 /etc/vitals          # configuration")
    r.run("sudo install -d -o vitals -g vitals -m 0700 /var/lib/vitals      # key, spool, epoch")
    r.run("sudo usermod -aG vitals $USER")

    # -- section 4: the CA, the token, one provision command
    (root / "city" / "city-ca.pem").chmod(0o644)
    r.run(
        "sudo install -o root -g vitals -m 0640 city-ca.pem /etc/vitals/city-ca.pem",
        cwd=root / "city",
    )
    token = run(
        *shlex.split(doc("they run `vitals hub --db hub.sqlite3 token gw-0042`").split("`")[1])[1:],
        cwd=root / "hub",
    ).out.strip()
    subst["<token>"] = token
    provision = """sudo vitals provision --token <token> --gateway-id gw-0042 \\
    --broker mqtt.city.example:8883 --tls --ca-file /etc/vitals/city-ca.pem \\
    --config /etc/vitals/gateway.toml --state-dir /var/lib/vitals --label-png /tmp/label.png"""
    out = r.run(provision).out
    assert f"enrolled     {GW}" in out and "(created)" in out
    etc, state = root / "etc/vitals", root / "var/lib/vitals"
    config = etc / "gateway.toml"
    assert _owner(config) == ("root", "vitals", 0o640)
    assert _owner(state / "identity.key") == ("vitals", "vitals", 0o600)
    assert _owner(state / "hub.pub")[0] == "vitals"
    assert (root / "tmp/label.png").read_bytes()[:4] == b"\x89PNG"
    (root / "tmp/label.png").unlink()
    label = r.run(
        "sudo vitals key show --config /etc/vitals/gateway.toml --label-png /tmp/label.png"
    )
    assert GW in label.out and (root / "tmp/label.png").exists()
    # the technician alone may not read the key: one line and a hint, not a traceback
    _, argv = r.argv("vitals key show --config /etc/vitals/gateway.toml")
    denied = run(*argv[1:], exe=r.tech_cli, user=TECH, groups=["vitals"], expect=1)
    assert "permission denied" in denied.err and "hint: run it with sudo" in denied.err
    # the same command again: refused, the file byte-identical (it never destroys)
    before = config.read_bytes()
    again = r.run(provision, expect=1)
    assert "exists (gateway gw-0042); nothing was changed" in again.err
    assert config.read_bytes() == before
    # as the service user (the guide's old advice): one line and a hint, nothing made
    _, argv = r.argv(provision.replace("sudo vitals", "vitals").replace("\\\n", " "))
    denied = run(*argv[1:], "--force", exe=r.service_cli, user="vitals", expect=1)
    assert "permission denied" in denied.err and "hint: run provision with sudo" in denied.err
    assert config.read_bytes() == before

    # -- section 5: the buses and devices (sudoedit), then the check as the technician
    term = start("sim", "tcp", "--profile", "sound_level_meter", logs=root / "logs")
    try:
        port = int(term.wait_output(r"127\.0\.0\.1:(\d+)", stream="out").rsplit(":", 1)[1])
        minimal = (DOCS / "examples" / "gateway-minimal.toml").read_text()
        sections = minimal[minimal.index("[[buses]]") :]
        sections = sections.replace(
            'kind = "rtu"\nport = "/dev/ttyUSB0"',
            f'kind = "tcp"\nhost = "127.0.0.1"\ntcp_port = {port}',
        )
        with config.open("a") as f:  # what the technician types in sudoedit
            f.write("\n[batch]\nmax_age_s = 1\n\n" + sections)
        checked = r.run(
            "vitals config check /etc/vitals/gateway.toml      # exit 0 and the resolved config, or every problem"
        )
        assert '"id": "gw-0042"' in checked.out

        # -- section 6: a first run by hand, as the unit runs it; status from the group
        r.run(
            "sudo install -d -o vitals -g vitals -m 0750 /run/vitals      # systemd makes it at each start"
        )
        agent = r.start(
            "sudo -u vitals env RUNTIME_DIRECTORY=/run/vitals /opt/vitals/venv/bin/vitals run --config /etc/vitals/gateway.toml"
        )
        try:
            agent.wait_output(r"uplink connected to 127\.0\.0\.1", timeout=30)
            status_file = root / "run/vitals/status.json"
            wait_for("the agent's status file", status_file.exists)
            wait_for("a batch of gw-0042 at the hub", lambda: _hub_batches(hub.db) > 0, timeout=30)
            status = r.run(
                "vitals status                    # buses, devices, spool and uplink in detail"
            )
            assert GW in status.out and "noise-1" in status.out
        finally:
            stopped = agent.stop()
        assert "Traceback" not in stopped.err
        assert not re.search(r"WARNING|ERROR", stopped.err), stopped.err
    finally:
        term.stop(expect=None)
    # every file in the state directory belongs to the service user; only the hub's
    # public key may be read by others (the directory is 0700 anyway)
    for p in state.rglob("*"):
        st = p.stat()
        assert pwd.getpwuid(st.st_uid).pw_name == "vitals", p
        if p.name != "hub.pub":
            assert not st.st_mode & 0o007, f"{p} is open to others: {st.st_mode & 0o777:o}"
    assert _owner(state) == ("vitals", "vitals", 0o700)


def _owner(p: Path) -> tuple[str, str, int]:
    st = p.stat()
    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, st.st_mode & 0o777


def _hub_batches(db: Path) -> int:
    res = run("hub", "--db", db, "stats", "--json")
    return int(json.loads(res.out)["gateways"].get(GW, {}).get("batches", 0))


def test_the_unit_is_valid_and_names_this_guide(tmp_path: Path) -> None:
    """systemd's own check of docs/systemd/vitals.service (no unknown key, no bad
    value), with ExecStart pointed at this install; its Documentation= is the
    guide where install.md §3 puts the source."""
    assert "Documentation=file:///opt/vitals/src/docs/install.md" in UNIT
    assert "sudo cp /opt/vitals/src/docs/systemd/vitals.service /etc/systemd/system/" in INSTALL
    assert "sudo git clone https://example.invalid/vitals.git /opt/vitals/src" in INSTALL
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze (the systemd package) to verify the unit")
    unit = tmp_path / "vitals.service"
    unit.write_text(UNIT.replace("/opt/vitals/venv/bin/vitals", str(VITALS)))
    res = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
