"""Helpers of the journey tests: a person's whole path through the installed CLI.

A journey runs ``vitals`` as that person would: the console script installed
in this virtual environment (``.venv/bin/vitals``), in a subprocess, with no
colours and a wide terminal; interactive steps run in tmux (send-keys,
capture-pane). Every step is checked the same way (:func:`check_clean`):

- no Python traceback, on stdout or stderr;
- no raw errno (``[Errno 13]``, ``Errno 111``) unless a ``hint:`` line says what to do;
- an exit code from the documented set (README.md: 0 ok, 1 failed or nothing
  found, 2 usage, 3 port or endpoint unusable), and the one the step expects.

Used by test_technician.py, test_hub_operator.py and test_installer.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from simulator.broker import MosquittoBroker, mosquitto_path

__all__ = [
    "DOCUMENTED_EXIT_CODES",
    "VITALS",
    "Background",
    "Result",
    "Tmux",
    "check_clean",
    "cli_env",
    "cli_for",
    "ensure_group_member",
    "ensure_system_user",
    "run",
    "start",
    "wait_for",
]

#: README.md: "0 ok, 1 failed or nothing found, 2 usage, 3 port or endpoint unusable"
DOCUMENTED_EXIT_CODES = frozenset({0, 1, 2, 3})

#: the console script pip installed beside this interpreter: what a person types
VITALS = Path(sys.prefix) / "bin" / "vitals"

_TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^\w+(Error|Exception): ", re.M)
_ERRNO = re.compile(r"\[Errno \d+\]|\bErrno \d+\b|\berrno \d+\b")


@dataclass
class Result:
    argv: list[str]
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err

    def __str__(self) -> str:  # what a failed assertion shows
        return (
            f"$ {shlex.join(self.argv)}\n(exit {self.code})\n"
            f"--- stdout\n{self.out}--- stderr\n{self.err}"
        )


def check_clean(
    argv: Sequence[str],
    code: int | None,
    out: str,
    err: str,
    *,
    expect: int | Sequence[int] | None = 0,
) -> Result:
    """Fail on a traceback, a raw errno without a hint, or an undocumented exit code."""
    res = Result(list(argv), -999 if code is None else code, out, err)
    text = res.text
    assert not _TRACEBACK.search(text), f"a traceback or a raw exception:\n{res}"
    if _ERRNO.search(text):
        assert re.search(r"^hint: ", text, re.M), f"a raw errno without a hint:\n{res}"
    assert res.code in DOCUMENTED_EXIT_CODES, f"exit code {res.code} is not documented:\n{res}"
    if expect is not None:
        wanted = {expect} if isinstance(expect, int) else set(expect)
        assert res.code in wanted, f"expected exit {sorted(wanted)}:\n{res}"
    return res


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a person's shell: no colours, a wide terminal, no test variables."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST_", "VITALS_", "RUNTIME_DIRECTORY", "JOURNAL_STREAM"))
    }
    env.update({"NO_COLOR": "1", "COLUMNS": "200", "TERM": "dumb", "LC_ALL": "C.UTF-8"})
    env.update(extra or {})
    return env


def _argv(args: Sequence[str | os.PathLike[str]], exe: str | os.PathLike[str] | None) -> list[str]:
    return [str(exe or VITALS), *map(str, args)]


def run(
    *args: str | os.PathLike[str],
    expect: int | Sequence[int] | None = 0,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    input: str | None = None,
    timeout: float = 60.0,
    user: str | None = None,
    groups: Sequence[str] = (),
    umask: int = -1,
    exe: str | os.PathLike[str] | None = None,
) -> Result:
    """``vitals ARGS`` (or ``exe ARGS``) to the end, checked by :func:`check_clean`.

    ``user`` (root only) runs it as that user, with its primary group and ``groups``.
    """
    if not VITALS.exists() and exe is None:
        pytest.skip(f"the vitals console script is not installed at {VITALS} (pip install -e .)")
    argv = _argv(args, exe)
    proc = subprocess.run(
        argv,
        input=input,
        capture_output=True,
        text=True,
        env=cli_env(env),
        cwd=cwd,
        timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL,
        **_as_user(user, groups),
        umask=umask,
    )
    return check_clean(argv, proc.returncode, proc.stdout, proc.stderr, expect=expect)


def _as_user(user: str | None, groups: Sequence[str]) -> dict[str, object]:
    if user is None:
        return {}
    pw = pwd.getpwnam(user)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": list(groups)}


@dataclass
class Background:
    """A long-running command (agent, hub, emulated bus); output kept in files."""

    argv: list[str]
    proc: subprocess.Popen[bytes]
    out_path: Path
    err_path: Path
    _stopped: bool = field(default=False, repr=False)

    @property
    def out(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_output(self, pattern: str, *, timeout: float = 20.0, stream: str = "both") -> str:
        """The first match of the regex ``pattern`` in its output; fails on exit or timeout."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            text = {"out": self.out, "err": self.err}.get(stream, self.out + self.err)
            m = rx.search(text)
            if m:
                return m.group(0)
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{shlex.join(self.argv)} exited {self.proc.returncode} before "
                    f"{pattern!r}:\n{self.out}{self.err}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {pattern!r} within {timeout:g} s from {shlex.join(self.argv)}:\n"
                    f"{self.out}{self.err}"
                )
            time.sleep(0.05)

    def stop(self, *, expect: int | Sequence[int] | None = 0, timeout: float = 30.0) -> Result:
        """SIGTERM (as systemd stops a unit), wait, and check its output like any step
        (``expect=None``: any documented code, or death by that SIGTERM)."""
        if not self._stopped:
            self._stopped = True
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"{shlex.join(self.argv)} did not stop within {timeout:g} s of SIGTERM:\n"
                    f"{self.out}{self.err}"
                ) from None
        code = self.proc.returncode
        if expect is None and code == -signal.SIGTERM:
            code = 0  # died of the SIGTERM it was sent (a simulator): no code of its own
        return check_clean(self.argv, code, self.out, self.err, expect=expect)

    def kill(self) -> None:
        self._stopped = True
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start(
    *args: str | os.PathLike[str],
    logs: Path,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    user: str | None = None,
    groups: Sequence[str] = (),
    umask: int = -1,
    exe: str | os.PathLike[str] | None = None,
) -> Background:
    """Start ``vitals ARGS`` in the background; stop it with :meth:`Background.stop`.

    ``logs`` is a directory for its stdout and stderr (created; readable by ``user``).
    """
    if not VITALS.exists() and exe is None:
        pytest.skip(f"the vitals console script is not installed at {VITALS} (pip install -e .)")
    argv = _argv(args, exe)
    logs.mkdir(parents=True, exist_ok=True)
    n = len(list(logs.glob("*.out")))
    out_path, err_path = logs / f"{n:02d}.out", logs / f"{n:02d}.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=cli_env(env),
            cwd=cwd,
            **_as_user(user, groups),
            umask=umask,
        )
    return Background(argv, proc, out_path, err_path)


def wait_for(what: str, predicate: object, *, timeout: float = 20.0) -> None:
    """Poll ``predicate()`` until it is true; fail naming ``what`` after ``timeout``."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.1)


# -- users: the service user and a technician in its group --------------------------


def _need_root(why: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"needs root to {why} (run the suite as root, as CI does)")
    for tool in ("useradd", "groupadd", "usermod"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (Debian: passwd package) to {why}")


def ensure_system_user(name: str = "vitals", groups: Sequence[str] = ()) -> pwd.struct_passwd:
    """The service user, as install.md §2 creates it (``useradd --system``), kept if present."""
    _need_root(f"create the system user {name!r}")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    argv = ["useradd", "--system", "--home-dir", "/nonexistent", "--no-create-home"]
    argv += ["--shell", "/usr/sbin/nologin", "--user-group"]
    existing = [g for g in groups if _group_exists(g)]
    if existing:
        argv += ["--groups", ",".join(existing)]
    subprocess.run([*argv, name], check=True, capture_output=True, text=True)
    return pwd.getpwnam(name)


def ensure_group_member(name: str, group: str) -> pwd.struct_passwd:
    """A plain user (a technician) who is a member of ``group``."""
    _need_root(f"create the user {name!r}")
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--no-create-home", "--home-dir", "/nonexistent", "--shell",
             "/usr/sbin/nologin", "--groups", group, name],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        pw = pwd.getpwnam(name)
    else:
        subprocess.run(["usermod", "-aG", group, name], check=True, capture_output=True)
    return pw


def _group_exists(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def readable_by(user: str, path: Path) -> bool:
    """Whether ``user`` can run ``path`` (every directory above it searchable)."""
    probe = subprocess.run(["test", "-x", str(path)], **_as_user(user, ()), check=False)
    return probe.returncode == 0


def cli_for(user: str, where: Path) -> Path:
    """A ``vitals`` that ``user`` can run: the installed one when this interpreter is
    open to that user, else one made in ``where`` (which ``user`` must be able to read).

    pytest's interpreter may live where other users cannot look (a pyenv under
    /root, mode 0700). Then, as install.md §3 does, ``python3 -m venv`` makes a
    virtual environment from the system's Python of the same version, and a
    ``.pth`` file points it at this checkout and the packages already installed
    here (no network, no pip): the same code and the same packages, run by
    ``where/venv/bin/vitals``.
    """
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import agent.cli.main"],
            **_as_user(user, ()),
            capture_output=True,
        )
        if probe.returncode == 0:
            return VITALS
    except PermissionError:  # the exec itself
        pass
    import sysconfig

    import agent

    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    python3 = shutil.which(f"python{version}", path="/usr/local/bin:/usr/bin:/bin")
    if python3 is None:
        pytest.skip(
            f"{sys.executable} is not readable by {user!r} and there is no system "
            f"python{version} to make a virtual environment it can run"
        )
    venv = where / "venv"
    subprocess.run([python3, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    project = Path(agent.__file__).resolve().parents[1]
    here = Path(sysconfig.get_path("purelib"))
    (site / "vitals-journey.pth").write_text(f"{project}\n{here}\n")
    script = venv / "bin" / "vitals"
    script.write_text(
        f"#!{venv}/bin/python\nimport sys\nfrom agent.__main__ import main\nsys.exit(main())\n"
    )
    script.chmod(0o755)
    check = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import agent.cli.main"],
        **_as_user(user, ()),
        check=False,
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        pytest.skip(f"cannot make a vitals that {user!r} can run: {check.stderr.strip()[-300:]}")
    return script


@contextlib.contextmanager
def world_readable_tmp(prefix: str) -> Iterator[Path]:
    """A temporary root other users may enter (pytest's tmp_path is private to root)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- a broker for the hub and the gateway ------------------------------------------


@pytest.fixture
def journey_broker() -> Iterator[MosquittoBroker]:
    """A real Mosquitto on a free loopback port that logs subscriptions (see
    :func:`wait_subscribed`); skips when Mosquitto is not installed."""
    if not mosquitto_path():
        pytest.skip("needs the mosquitto binary (apt-get install mosquitto); .ci/run installs it")
    broker = MosquittoBroker(extra_config="log_type subscribe\n")
    asyncio.run(broker.start())
    try:
        yield broker
    finally:
        asyncio.run(broker.stop())


def wait_subscribed(broker: MosquittoBroker, topic_filter: str, timeout: float = 20.0) -> None:
    """Wait until some client subscribed to ``topic_filter`` (Mosquitto's own log says so)."""
    log = broker._dir / "mosquitto.log"

    def seen() -> bool:
        return log.exists() and topic_filter in log.read_text(errors="replace")

    wait_for(f"a subscription to {topic_filter} at the broker", seen, timeout=timeout)


# -- tmux: interactive steps ------------------------------------------------------


class Tmux:
    """One detached tmux session running a command in a real terminal.

    ``send(keys)`` types (``enter=True`` presses Enter), ``screen()`` is the
    pane's text, ``wait(pattern)`` polls the pane for a regex.
    """

    def __init__(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        width: int = 200,
        height: int = 50,
    ) -> None:
        if shutil.which("tmux") is None:
            pytest.skip("needs tmux (apt-get install tmux); .ci/run installs it")
        self.name = f"vitals-journey-{os.getpid()}-{id(self):x}"
        self._sock = ["tmux", "-L", self.name]
        merged = cli_env({"TERM": "xterm-256color", **(env or {})})
        # keep the pane after the command exits, so its last words can be read
        cmd = shlex.join(map(str, argv)) + '; echo "[exit $?]"; sleep 600'
        subprocess.run(
            [*self._sock, "new-session", "-d", "-s", self.name, "-x", str(width),
             "-y", str(height), "sh", "-c", cmd],
            check=True, env=merged,
        )  # fmt: skip

    def send(self, keys: str, *, enter: bool = True) -> None:
        subprocess.run([*self._sock, "send-keys", "-t", self.name, "-l", keys], check=True)
        if enter:
            subprocess.run([*self._sock, "send-keys", "-t", self.name, "Enter"], check=True)

    def screen(self) -> str:
        return subprocess.run(
            [*self._sock, "capture-pane", "-p", "-J", "-S", "-200", "-t", self.name],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip

    def wait(self, pattern: str, *, timeout: float = 20.0) -> str:
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            m = rx.search(text)
            if m:
                return m.group(0)
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} on the screen within {timeout:g} s:\n{text}")
            time.sleep(0.1)

    def exit_code(self, timeout: float = 30.0) -> int:
        """The command's exit code, once it ended (the pane stays open to be read)."""
        return int(self.wait(r"\[exit \d+\]", timeout=timeout)[6:-1])

    def close(self) -> None:
        subprocess.run([*self._sock, "kill-server"], check=False, capture_output=True)

    def __enter__(self) -> Tmux:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
