"""``vitals diag bundle``: one tar.gz for support.

Holds: the configuration file with every password, secret, token and key
value redacted (and the resolved configuration, which redacts the same), the
agent's recent logs (``journalctl -u vitals`` when there is a journal, else a
note), the status file, versions (Python, OS, packages), the serial ports,
spool statistics, and a listing of the state directory (names, sizes, modes:
never the identity key itself). ``MANIFEST.json`` says what is in it and what
was skipped and why.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import time
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import typer

from agent.cli.diag._common import OK, DiagError, console, die, emit_json, escape, waiting

__all__ = ["bundle_command", "default_output", "make_bundle", "redact_toml"]

_SECRET_KEY = re.compile(r"(pass(word)?|secret|token|psk|private|credential|api_?key)", re.I)
_ASSIGN = re.compile(r"^(\s*)([A-Za-z0-9_.\"'-]+)(\s*=\s*)(.*)$")
PACKAGES = (
    "vitals-gateway",
    "pyserial",
    "msgpack",
    "cryptography",  # signs the batches (Ed25519)
    "typer",
    "rich",
)


def redact_toml(text: str) -> str:
    """``text`` with the value of every secret-looking key replaced by "***"."""
    out = []
    for line in text.splitlines():
        m = _ASSIGN.match(line)
        if m and _SECRET_KEY.search(m.group(2)) and not m.group(2).endswith("_file"):
            line = f'{m.group(1)}{m.group(2)}{m.group(3)}"***"'
        elif "-----BEGIN" in line and "PRIVATE KEY" in line:
            line = "# (private key material removed)"
        out.append(line)
    return "\n".join(out) + "\n"


def _spool_stats(db: Path) -> dict[str, Any]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2.0)
    try:
        n, size, oldest, newest = con.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(data)), 0), MIN(created), MAX(created) FROM batches"
        ).fetchone()
        gaps = con.execute("SELECT COUNT(*) FROM gaps").fetchone()[0]
    finally:
        con.close()
    now = time.time()
    return {
        "batches": n,
        "bytes": size,
        "oldest_age_s": None if oldest is None else round(now - oldest, 1),
        "newest_age_s": None if newest is None else round(now - newest, 1),
        "gap_rows": gaps,
        "file_bytes": db.stat().st_size,
    }


def _create(path: Path, exclusive: bool) -> BinaryIO:
    """``path`` opened for writing, mode 0600 from the start; with ``exclusive``
    it must not exist yet (FileExistsError)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)  # a file given with --output may have existed with another mode
    return os.fdopen(fd, "wb")


def default_output(directory: Path = Path()) -> Path:
    """``vitals-bundle-<UTC time>.tar.gz`` in ``directory``; ``-2``, ``-3``... when
    one of that second exists (two bundles in one second keep both)."""
    stem = f"vitals-bundle-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    path, n = directory / f"{stem}.tar.gz", 1
    while path.exists():
        n += 1
        path = directory / f"{stem}-{n}.tar.gz"
    return path


def make_bundle(
    output: Path,
    *,
    config: Path | None,
    state_dir: Path | None,
    journal_lines: int = 2000,
    exclusive: bool = False,
) -> dict[str, Any]:
    """Write the archive; return its manifest. ``exclusive``: never replace a file."""
    files: dict[str, bytes] = {}
    notes: dict[str, str] = {}

    def add_json(name: str, obj: Any) -> None:
        files[name] = json.dumps(obj, indent=2, ensure_ascii=False, default=str).encode()

    # configuration
    cfg_obj = None
    if config is not None:
        try:
            files["config/" + config.name] = redact_toml(config.read_text()).encode()
        except OSError as exc:
            notes["config"] = f"{config}: {exc.strerror or exc}"
        else:
            from agent.ops.config import load_config
            from protocols.errors import ConfigError

            try:
                cfg_obj = load_config(config)
                add_json("config/resolved.json", cfg_obj.to_dict())
            except ConfigError as exc:
                files["config/problems.txt"] = str(exc).encode()
    else:
        notes["config"] = "no --config given"
    if state_dir is None:
        state_dir = cfg_obj.gateway.state_dir if cfg_obj else Path("/var/lib/vitals")
    # logs
    if shutil.which("journalctl"):
        try:
            r = subprocess.run(
                [
                    "journalctl",
                    "-u",
                    "vitals",
                    "--no-pager",
                    "-o",
                    "short-iso",
                    "-n",
                    str(journal_lines),
                ],
                capture_output=True,
                timeout=30,
                check=False,
            )
            files["logs/journal.txt"] = r.stdout
            if r.returncode != 0 or not r.stdout.strip():
                notes["logs"] = (
                    f"journalctl exit {r.returncode}: {r.stderr.decode(errors='replace').strip()[:200]}"
                )
        except (OSError, subprocess.TimeoutExpired) as exc:
            notes["logs"] = f"journalctl failed: {exc}"
    else:
        notes["logs"] = "no journalctl on this machine: logs skipped"
    # status
    from agent.ops.status import StatusUnavailable, default_status_paths, read_status

    try:
        path, doc, why = read_status(default_status_paths(state_dir))
        add_json("status.json", {"path": str(path), "running": not why, "why": why, **doc})
    except StatusUnavailable as exc:
        notes["status"] = exc.message
    # versions
    versions: dict[str, Any] = {
        "python": sys.version,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "packages": {},
    }
    for pkg in PACKAGES:
        try:
            versions["packages"][pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions["packages"][pkg] = None
    os_release = Path("/etc/os-release")
    if os_release.exists():
        versions["os_release"] = os_release.read_text()
    add_json("versions.json", versions)
    # ports
    from agent.cli.diag.ports import list_serial_ports

    infos, hidden = list_serial_ports()
    add_json("ports.json", {"ports": [i.to_dict() for i in infos], "processes_not_visible": hidden})
    # state dir: listing and spool stats; never the key
    listing = []
    if state_dir.is_dir():
        try:
            for p in sorted(state_dir.iterdir()):
                st = p.lstat()
                listing.append(
                    {
                        "name": p.name,
                        "bytes": st.st_size,
                        "mode": oct(st.st_mode & 0o7777),
                        "mtime": round(st.st_mtime),
                    }
                )
        except PermissionError:
            notes["state_dir"] = f"{state_dir}: permission denied (run with sudo)"
        add_json("state_dir.json", {"path": str(state_dir), "entries": listing})
        db = state_dir / "spool.sqlite3"
        if db.exists():
            try:
                add_json("spool.json", _spool_stats(db))
            except (sqlite3.Error, OSError) as exc:
                notes["spool"] = f"{db}: {exc}"
        else:
            notes["spool"] = f"no spool at {db}"
    else:
        notes["state_dir"] = f"{state_dir}: not a directory"
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": sorted(files),
        "skipped": notes,
    }
    add_json("MANIFEST.json", manifest)
    output.parent.mkdir(parents=True, exist_ok=True)
    root = output.name.removesuffix(".tar.gz")
    with _create(output, exclusive) as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(f"{root}/{name}")
            info.size = len(data)
            info.mtime = int(time.time())
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))
    return {"path": str(output), **manifest}


def bundle_command(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="gateway configuration")
    ] = Path("/etc/vitals/gateway.toml"),
    state_dir: Annotated[Path | None, typer.Option(help="the agent's state directory")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="archive to write")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the manifest as JSON")] = False,
) -> None:
    """One tar.gz for support: redacted config, logs, status, versions, ports, spool."""
    if config is not None and not config.exists():
        config = None
    out = output or default_output()
    try:
        with waiting("collecting logs, status and versions", quiet=as_json):
            while True:
                try:
                    manifest = make_bundle(
                        out, config=config, state_dir=state_dir, exclusive=output is None
                    )
                    break
                except FileExistsError:  # another bundle took the name meanwhile
                    out = default_output(out.parent)
    except OSError as exc:
        die(
            DiagError(
                f"{out}: {exc.strerror or exc}", "write it elsewhere with --output /tmp/x.tar.gz"
            ),
            as_json=as_json,
        )
    if as_json:
        emit_json(manifest)
    else:
        con = console()
        con.print(f"wrote [bold]{escape(manifest['path'])}[/] ({len(manifest['files'])} files)")
        for what, why in manifest["skipped"].items():
            con.print(escape(f"  skipped {what}: {why}"), soft_wrap=True)
    raise typer.Exit(OK)
