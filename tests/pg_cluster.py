"""A private PostgreSQL cluster for the tests and the hub bench.

``initdb`` in a temporary directory, ``postgres`` on a free 127.0.0.1 port with
its socket in that directory, one database, trust authentication (nothing but
this machine's loopback can reach it), stopped and removed afterwards. Never a
system service. PostgreSQL refuses to run as root: as root, the cluster runs as
the ``postgres`` user of Debian's package (else ``nobody``).

``python tests/pg_cluster.py`` starts one and prints its URL until Ctrl-C or
``kill`` (``python -m bench.hub --db`` that URL).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["pg_bindir", "private_cluster"]

USER = "vitals"
DATABASE = "vitals"


def pg_bindir() -> Path | None:
    """Where ``initdb`` and ``postgres`` are: Debian keeps them off PATH, by version."""
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(d, "initdb").exists() and Path(d, "postgres").exists():
            return Path(d)
    exe = shutil.which("initdb")
    return Path(exe).parent if exe and shutil.which("postgres") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as() -> tuple[int, int] | None:
    """The (uid, gid) to run PostgreSQL as: None when not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(name)
            return pw.pw_uid, pw.pw_gid
    raise RuntimeError("running as root and no 'postgres' or 'nobody' user to run PostgreSQL as")


def _ready(bindir: Path, proc: subprocess.Popen[bytes], port: int, root: Path, last: bool) -> bool:
    """Wait until the cluster answers; False if it lost its port to another process."""
    deadline = time.monotonic() + 30
    while True:
        ready = subprocess.run(
            [bindir / "pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port), "-U", USER],
            check=False,
        )
        if ready.returncode == 0:
            return True
        if proc.poll() is not None or time.monotonic() > deadline:
            text = (root / "postgres.log").read_text(errors="replace")
            if proc.poll() is not None and "Address already in use" in text and not last:
                return False
            raise RuntimeError("private PostgreSQL did not start: " + text[-2000:])
        time.sleep(0.1)


@contextlib.contextmanager
def private_cluster(*, settings: dict[str, str] | None = None) -> Iterator[str]:
    """Start a private cluster; yields ``postgresql://vitals@127.0.0.1:PORT/vitals``.

    ``settings`` are server settings (``-c name=value``): the tests turn fsync off,
    the bench keeps PostgreSQL's durable defaults.
    """
    bindir = pg_bindir()
    if bindir is None:
        raise FileNotFoundError("no PostgreSQL binaries (apt-get install postgresql)")
    owner = _run_as()
    root = Path(tempfile.mkdtemp(prefix="vitals-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if owner:
        for p in (root, sock):
            os.chown(p, *owner)
    kw: dict[str, object] = {"user": owner[0], "group": owner[1]} if owner else {}
    env = {**os.environ, "LC_ALL": "C", "TZ": "UTC"}
    proc: subprocess.Popen[bytes] | None = None
    try:
        init = subprocess.run(
            [bindir / "initdb", "-D", data, "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync"],
            check=False,
            capture_output=True,
            env=env,
            cwd=root,
            **kw,
        )
        if init.returncode:
            raise RuntimeError(f"initdb failed: {init.stderr.decode(errors='replace')[-2000:]}")
        # a free port can be taken by another process before postgres binds it (two
        # suites at once): start again on another one
        for attempt in range(5):
            port = _free_port()
            opts = {
                "listen_addresses": "127.0.0.1",
                "unix_socket_directories": str(sock),
                "port": str(port),
                "max_wal_size": "4GB",  # no checkpoint storm in the middle of a bench
                **(settings or {}),
            }
            cmd: list[object] = [bindir / "postgres", "-D", data]
            for k, v in opts.items():
                cmd += ["-c", f"{k}={v}"]
            log = open(root / "postgres.log", "wb")  # noqa: SIM115 - closed below
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, **kw
            )
            log.close()
            if _ready(bindir, proc, port, root, last=attempt == 4):
                break
        subprocess.run(
            [bindir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", USER, DATABASE],
            check=True,
            capture_output=True,
        )
        yield f"postgresql://{USER}@127.0.0.1:{port}/{DATABASE}"
    finally:
        if proc is not None and proc.poll() is None:
            subprocess.run(
                [bindir / "pg_ctl", "stop", "-D", data, "-m", "fast", "-w"],
                check=False,
                capture_output=True,
                env=env,
                cwd=root,
                **kw,
            )
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    import signal
    import sys

    # Ctrl-C, or `kill` of a background run: stop the server and remove its files
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(0))
    with private_cluster() as url:
        print(url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
