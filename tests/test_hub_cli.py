"""`vitals hub` mistakes: one line naming what is wrong and one with what to do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

VITALS = [sys.executable, "-m", "agent"]


def test_a_hub_key_readable_by_others_is_one_line(tmp_path: Path) -> None:
    key = tmp_path / "hub.key"
    key.write_text("not even a key\n")
    key.chmod(0o644)
    r = subprocess.run(
        [*VITALS, "hub", "--db", str(tmp_path / "hub.sqlite3"), "--broker", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if not line[:4].isdigit()]  # no log lines
    assert (
        lines[0]
        == f"error: the hub key: {key}: the hub key must not be readable by others (chmod 600)"
    )
    assert lines[1].startswith("hint: ")
    assert "Traceback" not in r.stderr


def test_hub_stats_shows_enrollment_answers(tmp_path: Path) -> None:
    from hub.core import HubCore
    from hub.enroll import EnrollmentDesk
    from protocols import ed25519, topics

    db = tmp_path / "hub.sqlite3"
    core = HubCore(db)
    desk = EnrollmentDesk(core, ed25519.PrivateKey.generate())
    assert desk.handle_enroll_request(topics.enroll("gw-1"), b"garbage") is not None
    core.close()
    r = subprocess.run(
        [*VITALS, "hub", "--db", str(db), "stats"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "enrollment requests: {'malformed': 1}" in r.stdout
    assert "gw-1" not in r.stdout  # a refused request enrolls nobody


def test_a_database_password_never_shows() -> None:
    """`--db postgresql://user:PASSWORD@...` ends up in error lines and logs: without it."""
    from hub.store import shown

    assert (
        shown("postgresql://hub:s3cret@db.city:5433/vitals")
        == "postgresql://hub@db.city:5433/vitals"
    )
    assert shown("/var/lib/vitals-hub/hub.sqlite3") == "/var/lib/vitals-hub/hub.sqlite3"
    r = subprocess.run(
        [*VITALS, "hub", "stats", "--db", "postgresql://hub:s3cret@127.0.0.1:1/vitals"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1, r.stderr
    assert "s3cret" not in r.stdout + r.stderr
    assert "Traceback" not in r.stderr and r.stderr.startswith("error: ")
