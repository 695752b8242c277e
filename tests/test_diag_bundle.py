"""``vitals diag bundle``: one archive, secrets redacted, the key never in it."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.cli.diag import diag_app
from agent.cli.diag.bundle import redact_toml

runner = CliRunner()

CONFIG = """[gateway]
id = "gw-9"
state_dir = "{state}"

[uplink]
host = "broker.example"
username = "gw-9"
password = "hunter2-secret"
"""


def test_redact_toml() -> None:
    text = 'password = "a"\napi_token="b"\nkey_file = "x.key"\nhost = "h"\n  mqtt.secret = 3\n'
    out = redact_toml(text)
    assert 'password = "***"' in out and 'api_token="***"' in out
    assert 'mqtt.secret = "***"' in out
    assert 'key_file = "x.key"' in out and 'host = "h"' in out
    assert '"a"' not in out and '"b"' not in out


def test_bundle_holds_what_support_needs_and_no_secret(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "identity.key").write_bytes(b"PRIVATE-KEY-BYTES")
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(CONFIG.format(state=state))
    out = tmp_path / "b.tar.gz"
    r = runner.invoke(diag_app, ["bundle", "--config", str(cfg), "--output", str(out), "--json"])
    assert r.exit_code == 0, r.output
    manifest = json.loads(r.output)
    with tarfile.open(out) as tar:
        names = {m.name.split("/", 1)[1] for m in tar.getmembers()}
        blob = b"".join(f.read() for m in tar.getmembers() if (f := tar.extractfile(m)) is not None)
    assert {
        "config/gateway.toml",
        "config/resolved.json",
        "versions.json",
        "ports.json",
        "state_dir.json",
        "MANIFEST.json",
    } <= names
    assert b"hunter2-secret" not in blob and b"PRIVATE-KEY-BYTES" not in blob
    assert b'"identity.key"' in blob  # listed by name only
    assert b'"pyserial"' in blob and b'"cryptography"' in blob  # versions.json
    assert "spool" in manifest["skipped"]  # no spool database yet: said, not failed
    assert "status" in manifest["skipped"]
    assert (out.stat().st_mode & 0o777) == 0o600


def test_two_bundles_in_one_second_keep_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.strftime", lambda fmt, *a: "20261206-120000")  # the same second
    codes = [runner.invoke(diag_app, ["bundle", "--json"]).exit_code for _ in range(3)]
    assert codes == [0, 0, 0]
    names = sorted(p.name for p in tmp_path.glob("vitals-bundle-*.tar.gz"))
    assert names == [
        "vitals-bundle-20261206-120000-2.tar.gz",
        "vitals-bundle-20261206-120000-3.tar.gz",
        "vitals-bundle-20261206-120000.tar.gz",
    ]
    for p in tmp_path.glob("vitals-bundle-*.tar.gz"):
        assert (p.stat().st_mode & 0o777) == 0o600
        with tarfile.open(p) as tar:
            assert any(m.name.endswith("MANIFEST.json") for m in tar.getmembers())


def test_skipped_notes_keep_their_brackets(tmp_path: Path) -> None:
    """A note naming [uplink.tls] or a path with brackets is printed as is, not as markup."""
    state = tmp_path / "[state]"
    out = tmp_path / "b.tar.gz"
    r = runner.invoke(
        diag_app, ["bundle", "--config", str(tmp_path / "none.toml"), "--state-dir", str(state),
                   "--output", str(out)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert f"{state}: not a directory" in r.output.replace("\n", "")
