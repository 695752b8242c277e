"""Provisioning a gateway in the field, and rotating its key.

``vitals provision`` does, in one command and with one enrollment token:

1. plans the gateway's configuration: a new file from a template
   (``string.Template`` placeholders ``${gateway_id}``, ``${state_dir}``,
   ``${broker_host}``, ``${broker_port}``, ``${tls}``), or, with ``--force`` on
   an existing file, an edit of only the keys provision owns (``[uplink]`` host
   and port, in ``[uplink.tls]`` the keys TLS flags name, ``[gateway]`` id and
   state_dir only where missing): every other byte stays; validated before
   anything is written. An existing file without ``--force`` is refused and
   left byte-identical; its gateway id is never changed;
2. creates the identity key (0600), or uses the one already there
   (``vitals keygen``);
3. enrolls it: a signed ``vitals/enroll/v1`` request with the token and a
   proof of possession (:mod:`protocols.enroll`) on ``{prefix}/enroll/{gw}``,
   then waits for the hub's signed result on ``.../result``, checked against
   the hub key the token pins; the hub's public key is kept in the state
   directory (it verifies commands);
4. writes the configuration (atomically), and prints the label: gateway id and
   key fingerprint as text and a QR code (terminal, and a PNG when asked, with
   the id and fingerprint printed under the code).

A provision that fails leaves nothing behind: the key it created, the hub key
and any temporary file are removed, the configuration is not touched.
``--dry-run`` shows what would be written and sends nothing.

Run as root (``sudo``, as docs/install.md does: the configuration directory
belongs to root), the files in the state directory are made as the owner of
that directory (the service user), so the agent can load them; the
configuration is written 0640 with the group of its directory.

``vitals key rotate`` enrolls a new key with a request signed by the current
one, then swaps the key files; the agent must be restarted to use it.

The typer commands here are wired into ``vitals`` by ``agent/cli/main.py``; the
module also runs alone: ``python -m agent.ops.provision provision ...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import io
import json
import logging
import os
import ssl
import string
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, TextIO

import segno
import tomlkit
import typer
from tomlkit.exceptions import TOMLKitError

from agent.ops.config import Config, TlsConfig, UplinkConfig, load_config, parse_config
from agent.ops.state import (
    HUB_KEY_FILE,
    KEY_FILE,
    Identity,
    commit_pending_key,
    create_identity,
    create_pending_key,
    discard_pending_key,
    load_hub_key,
    load_identity,
    save_hub_key,
)
from agent.ops.tls import tls_context
from protocols import enroll, envelope, topics
from protocols.address import host_port
from protocols.ed25519 import PrivateKey
from protocols.errors import ConfigError, LocalError, ProtocolError, RemoteError, VitalsError

__all__ = [
    "DEFAULT_TEMPLATE",
    "BrokerUnreachable",
    "EnrollError",
    "EnrollRefused",
    "Outcome",
    "Plan",
    "ProvisionError",
    "cli",
    "edit_config",
    "enroll_key",
    "key_app",
    "keygen_command",
    "label_png",
    "label_qr",
    "label_text",
    "plan_config",
    "provision",
    "provision_command",
    "render_config",
    "rotate_key",
    "write_config",
]

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = """\
# Gateway configuration written by `vitals provision`.
# Add the buses and devices of this cabinet (docs/configuration.md), then
# check it with `vitals config check`.

[gateway]
id = "${gateway_id}"
state_dir = "${state_dir}"

[uplink]
host = "${broker_host}"
port = ${broker_port}
${tls}
"""


NO_TLS = TlsConfig()


class ProvisionError(LocalError):
    """Provisioning cannot go on; ``hint`` says what to do."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class EnrollError(RemoteError):
    """The hub did not answer, or answered something we cannot trust."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class BrokerUnreachable(EnrollError):
    """The broker could not be reached at all (exit 3: endpoint unusable)."""


class EnrollRefused(RemoteError):
    """The hub answered, signed, and refused; ``status`` says why."""

    def __init__(self, status: str, detail: str) -> None:
        self.status = status
        self.detail = detail
        self.hint = _REFUSAL_HINTS.get(status, "ask the hub operator for a new token")
        super().__init__(
            f"the hub refused the enrollment: {status}" + (f" ({detail})" * bool(detail))
        )


_REFUSAL_HINTS = {
    "token_used": "each token enrolls once: ask the hub operator for a new one "
    "(`vitals hub token GATEWAY`)",
    "token_expired": "ask the hub operator for a new token",
    "bad_token": "the hub has no such token for this gateway id: check --gateway-id against "
    "the id the token was issued for, and copy the token again",
    "unknown_key": "this key is not enrolled for this gateway: provision it with a new token",
    "revoked_key": "this key was revoked: provision the gateway again with a new token",
    "already_rotated": "the key was rotated already: restart the agent, or provision again",
}


# -- the configuration ----------------------------------------------------------


def _toml_str(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _tls_block(tls: TlsConfig) -> str:
    if not tls.enabled:
        return ""
    lines = ["", "[uplink.tls]", "enabled = true"]
    for key in ("ca_file", "cert_file", "key_file"):
        value = getattr(tls, key)
        if value is not None:
            lines.append(f'{key} = "{_toml_str(str(value))}"')
    if tls.insecure:
        lines.append("insecure = true  # bench only: the broker is NOT verified")
    return "\n".join(lines) + "\n"


def render_config(
    template: str,
    *,
    gateway_id: str,
    state_dir: Path,
    broker_host: str,
    broker_port: int,
    tls: TlsConfig = NO_TLS,
) -> str:
    """The template with its placeholders filled; :class:`LocalError` for an unknown one."""
    try:
        return string.Template(template).substitute(
            gateway_id=_toml_str(gateway_id),
            state_dir=_toml_str(str(state_dir)),
            broker_host=_toml_str(broker_host),
            broker_port=str(int(broker_port)),
            tls=_tls_block(tls),
        )
    except (KeyError, ValueError) as exc:
        raise LocalError(
            f"the configuration template has an unknown or broken placeholder: {exc}"
        ) from exc


#: ``{table: {key: value, or None to remove the key}}``
Edits = dict[str, dict[str, str | int | bool | None]]


def edit_config(text: str, edits: Edits) -> str:
    """``text`` with only the keys in ``edits`` changed, added or removed.

    tomlkit keeps everything else as it was: comments (a changed key's own
    comment too), blank lines, the order of tables and keys, dotted keys.
    A key already set to the wanted value is not touched, so provisioning the
    same gateway again leaves the file byte-identical.
    """
    try:
        doc = tomlkit.parse(text)
    except TOMLKitError as exc:
        raise ProvisionError(
            f"the existing configuration is not valid TOML ({exc}); it was not changed",
            "fix it (`vitals config check FILE` names the line) or move it away",
        ) from exc
    for name, keys in edits.items():
        node: Any = doc
        for part in name.split("."):
            if part not in node:
                node[part] = tomlkit.table()
            node = node[part]
        for key, value in keys.items():
            if value is None:
                node.pop(key, None)
            elif key not in node or node[key] != value:
                node[key] = value
    return tomlkit.dumps(doc)


def _owned_edits(
    existing: dict[str, Any],
    *,
    gateway_id: str,
    state_dir: Path,
    broker_host: str,
    broker_port: int,
    tls: TlsConfig | None,
) -> Edits:
    """The keys provision sets in an existing configuration."""
    gw = existing.get("gateway") if isinstance(existing.get("gateway"), dict) else {}
    assert isinstance(gw, dict)
    edits: Edits = {
        "gateway": {},
        "uplink": {"host": broker_host, "port": broker_port},
    }
    if "id" not in gw:
        edits["gateway"]["id"] = gateway_id
    if "state_dir" not in gw:
        edits["gateway"]["state_dir"] = str(state_dir)
    if not edits["gateway"]:
        del edits["gateway"]
    if tls is not None:  # only what the flags say: other TLS keys stay as they are
        t: dict[str, str | int | bool | None] = {"enabled": tls.enabled}
        for key in ("ca_file", "cert_file", "key_file"):
            value = getattr(tls, key)
            if value is not None:
                t[key] = str(value)
        if tls.insecure:
            t["insecure"] = True
        uplink = existing.get("uplink")
        if tls.enabled or (isinstance(uplink, dict) and "tls" in uplink):
            edits["uplink.tls"] = t
    return edits


@dataclass(frozen=True)
class Plan:
    """What provision will do with the configuration file."""

    path: Path
    text: str
    old_text: str | None  # None: the file does not exist yet
    config: Config  # the configuration that ``text`` is

    @property
    def gateway_id(self) -> str:
        return self.config.gateway.id

    @property
    def state_dir(self) -> Path:
        return self.config.gateway.state_dir

    @property
    def action(self) -> str:
        if self.old_text is None:
            return "created"
        return "unchanged" if self.old_text == self.text else "edited"

    def diff(self) -> str:
        old = [] if self.old_text is None else self.old_text.splitlines(keepends=True)
        return "".join(
            difflib.unified_diff(
                old,
                self.text.splitlines(keepends=True),
                fromfile=str(self.path) if self.old_text is not None else "/dev/null",
                tofile=str(self.path),
            )
        )


def _existing_config(path: Path) -> tuple[str, dict[str, Any]] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except PermissionError:
        raise ProvisionError(
            f"cannot read {path}: permission denied",
            "run provision with sudo (the configuration belongs to root: docs/install.md §4)",
        ) from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return text, {}


def plan_config(
    path: Path,
    *,
    gateway_id: str | None,
    state_dir: Path | None,
    broker_host: str,
    broker_port: int,
    template: str | None = None,
    tls: TlsConfig | None = None,
    force: bool = False,
    key_id: str | None = None,
) -> Plan:
    """The configuration provision would write, validated; nothing is written.

    An existing file is refused without ``force``; with it, only the keys
    provision owns change (:func:`edit_config`), and the gateway id in the file
    is kept: a different ``gateway_id`` is refused. ``key_id`` is the id derived
    from the key, used when neither the file nor ``gateway_id`` name one.
    """
    existing = _existing_config(path)
    if existing is None:
        gw = gateway_id or key_id or "gw-000000000000"
        sd = state_dir or DEFAULT_STATE
        text = render_config(
            template or DEFAULT_TEMPLATE,
            gateway_id=gw,
            state_dir=sd,
            broker_host=broker_host,
            broker_port=broker_port,
            tls=tls or NO_TLS,
        )
        old_text = None
    else:
        old_text, data = existing
        gw_table = data.get("gateway") if isinstance(data.get("gateway"), dict) else {}
        assert isinstance(gw_table, dict)
        file_id, file_state = gw_table.get("id"), gw_table.get("state_dir")
        described = f"{path} exists" + (f" (gateway {file_id})" if file_id else "")
        if not force:
            raise ProvisionError(
                f"{described}; nothing was changed",
                "pass --force to set only its [uplink] broker (and TLS) and keep everything "
                "else, or --dry-run --force to see that change first",
            )
        if template is not None:
            raise ProvisionError(
                f"{described}; --template applies to a new configuration only",
                "move the file away to have a new one written from the template",
            )
        if gateway_id and isinstance(file_id, str) and gateway_id != file_id:
            raise ProvisionError(
                f"{described}; --gateway-id {gateway_id} would change its id",
                "a gateway keeps its id: leave out --gateway-id, or move the file away "
                "to provision a new gateway",
            )
        if state_dir and isinstance(file_state, str) and Path(file_state) != state_dir:
            raise ProvisionError(
                f"{described} with state_dir {file_state}; --state-dir {state_dir} "
                "would move its keys",
                f"leave out --state-dir, or pass --state-dir {file_state}",
            )
        gw = file_id if isinstance(file_id, str) else gateway_id or key_id or "gw-000000000000"
        sd = Path(file_state) if isinstance(file_state, str) else state_dir or DEFAULT_STATE
        text = edit_config(
            old_text,
            _owned_edits(
                data,
                gateway_id=gw,
                state_dir=sd,
                broker_host=broker_host,
                broker_port=broker_port,
                tls=tls,
            ),
        )
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([(str(path), f"the rendered template is not TOML: {exc}")]) from exc
    cfg = parse_config(data, source=str(path), base=path.resolve().parent, path=path)
    return Plan(path, text, old_text, cfg)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file beside it, then rename; no temporary
    file is left behind on failure. Mode 0640 (it may hold the MQTT password) and,
    as root, the group of its directory; an existing file keeps mode and owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            st = path.stat()
            mode, uid, gid = st.st_mode & 0o7777, st.st_uid, st.st_gid
        except FileNotFoundError:
            mode, uid, gid = 0o640, -1, path.parent.stat().st_gid
        if os.geteuid() == 0:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        os.write(fd, text.encode())
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


def write_config(path: Path, text: str, *, force: bool = False) -> Config:
    """Validate ``text`` as ``path`` would be read, then write it atomically."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([(str(path), f"the rendered template is not TOML: {exc}")]) from exc
    parse_config(data, source=str(path), base=path.resolve().parent, path=path)
    if path.exists() and not force:
        raise ProvisionError(f"{path} exists", "pass --force to replace it")
    _write_atomic(path, text)
    return load_config(path)


def _check_writable(path: Path) -> None:
    """Fail before anything is made when the configuration cannot be written."""
    where = path.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not os.access(where, os.W_OK | os.X_OK):
        raise ProvisionError(
            f"cannot write {path}: permission denied ({where} belongs to "
            f"{_owner(where)}); nothing was changed",
            "run provision with sudo: the configuration belongs to root, group vitals "
            "(docs/install.md §4)",
        )


def _owner(path: Path) -> str:
    import grp
    import pwd

    st = path.stat()
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{user}:{group}, mode {st.st_mode & 0o777:04o}"


@contextlib.contextmanager
def as_owner_of(directory: Path) -> Iterator[None]:
    """Run as root, files made inside belong to the owner of ``directory`` (the
    service user of /var/lib/vitals), so the agent can load them; otherwise a no-op."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        yield
        return
    try:
        st = directory.stat()
    except FileNotFoundError:
        yield
        return
    if st.st_uid == 0:
        yield
        return
    os.setegid(st.st_gid)
    os.seteuid(st.st_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


# -- enrollment over MQTT ---------------------------------------------------------

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


async def enroll_key(
    *,
    uplink: UplinkConfig,
    new_key: Identity,
    token: str = "",
    signer: Identity | None = None,
    pinned_hub_kid: bytes | None,
    tls: ssl.SSLContext | None = None,
    timeout_s: float = 30.0,
    progress: Progress = _quiet,
) -> enroll.EnrollResult:
    """Send one enrollment request for ``uplink.gateway`` and return the hub's
    verified, successful answer.

    The connection is the uplink's (``uplink`` whole, its TLS context ``tls``:
    :func:`agent.pipeline.uplink.mqtt_client`) as ``<client id>-enroll``.
    :class:`EnrollRefused` when the hub says no, :class:`EnrollError` when it
    does not answer in ``timeout_s``, :class:`BrokerUnreachable` when the broker
    cannot be reached. ``progress`` is told each step (for a spinner).
    """
    # imported here: `vitals keygen`, `vitals hub token` need no MQTT client
    from agent.mqtt import MqttError
    from agent.pipeline.uplink import explain, mqtt_client

    gateway, prefix, host, port = uplink.gateway, uplink.topic_prefix, uplink.host, uplink.port

    data, nonce = enroll.request(
        gateway=gateway,
        new_key=new_key.private_key,
        token=token,
        signer=signer.private_key if signer else None,
        now_ms=int(time.time() * 1000),
    )
    request_topic = topics.enroll(gateway, prefix)
    answer_topic = topics.enroll_result(gateway, prefix)
    connected = False
    progress(f"connecting to the broker {host}:{port}")
    try:
        async with mqtt_client(
            replace(uplink, connect_timeout_s=min(timeout_s, uplink.connect_timeout_s)),
            tls,
            role="enroll",
            ack_timeout=timeout_s,
        ) as client:
            connected = True
            await client.subscribe(answer_topic, qos=1)
            await client.publish(request_topic, data, qos=1)
            progress(f"waiting for the hub's answer (up to {timeout_s:g} s)")
            async with asyncio.timeout(timeout_s):
                async for msg in client.messages:
                    try:
                        res = enroll.parse_result(msg.payload)
                        res.verify(nonce=nonce, pinned_hub_kid=pinned_hub_kid)
                    except ProtocolError as exc:
                        # someone else's answer, or a forgery: keep waiting for ours
                        log.warning("ignored an enrollment answer: %s", exc)
                        continue
                    if not res.ok:
                        raise EnrollRefused(res.status, res.detail)
                    if res.enrolled != new_key.kid:
                        raise EnrollError("the hub enrolled another key than ours")
                    return res
    except TimeoutError:
        raise EnrollError(
            f"no answer from the hub within {timeout_s:g} s on {answer_topic}",
            "is the hub's enrollment desk running (`vitals hub`) on this broker? "
            "A slow link: --timeout 60",
        ) from None
    except MqttError as exc:
        why = explain(exc, host, port)
        if not connected:
            raise BrokerUnreachable(f"cannot reach the broker: {why.message}", why.hint) from exc
        raise EnrollError(f"the broker connection failed: {why.message}", why.hint) from exc
    raise EnrollError(
        "the broker closed the connection before the hub answered",
        "try again; `vitals diag uplink` checks the broker",
    )


@dataclass(frozen=True)
class Outcome:
    config: Config
    identity: Identity
    hub_kid: bytes
    created_key: bool
    config_action: str = "created"


def _key_path(state_dir: Path) -> Path:
    return state_dir / KEY_FILE


async def provision(
    *,
    config_path: Path,
    gateway_id: str | None,
    state_dir: Path | None,
    broker_host: str,
    broker_port: int,
    token: str,
    template: str | None = None,
    tls: TlsConfig | None = None,
    force: bool = False,
    timeout_s: float = 30.0,
    progress: Progress = _quiet,
) -> Outcome:
    """Configuration, identity and enrollment: the whole of ``vitals provision``.

    Nothing is written before the token, the configuration and the permissions
    are checked; on any failure the key it created, the hub key it saved and the
    temporary files are removed and the configuration is left as it was.
    """
    pin = enroll.token_hub_kid(token)  # a mistyped token fails before anything is written
    kwargs: dict[str, Any] = dict(
        gateway_id=gateway_id,
        broker_host=broker_host,
        broker_port=broker_port,
        template=template,
        tls=tls,
        force=force,
    )
    plan = plan_config(config_path, state_dir=state_dir, **kwargs)  # refusals come first
    state = plan.state_dir
    _check_writable(config_path)
    made_dir = not state.exists()
    key_file = _key_path(state)
    had_key = key_file.exists()
    had_hub_key = (state / HUB_KEY_FILE).exists()
    done = False
    try:
        with as_owner_of(state if not made_dir else state.parent):
            identity = create_identity(state, exist_ok=True)
        plan = plan_config(
            config_path, state_dir=state, key_id=identity.default_gateway_id, **kwargs
        )
        up = plan.config.uplink
        res = await enroll_key(
            uplink=up,
            new_key=identity,
            token=token,
            pinned_hub_kid=pin,
            tls=tls_context(up.tls),
            timeout_s=timeout_s,
            progress=progress,
        )
        with as_owner_of(state):
            save_hub_key(state, res.hub_pub)
        if plan.action != "unchanged":
            _write_atomic(config_path, plan.text)
        done = True
    finally:
        if not done:
            _undo(state, made_dir=made_dir, had_key=had_key, had_hub_key=had_hub_key)
    log.info(
        "gateway %s enrolled: key %s, hub key %s",
        plan.gateway_id,
        identity.kid.hex(),
        res.kid.hex(),
    )
    return Outcome(plan.config, identity, res.kid, not had_key, plan.action)


def _undo(state: Path, *, made_dir: bool, had_key: bool, had_hub_key: bool) -> None:
    """Remove what a failed provision made in the state directory."""
    with contextlib.suppress(OSError):
        if not had_key:
            _key_path(state).unlink(missing_ok=True)
        if not had_hub_key:
            (state / HUB_KEY_FILE).unlink(missing_ok=True)
        if made_dir:
            state.rmdir()  # only if empty


async def rotate_key(
    config: Config, *, timeout_s: float = 30.0, progress: Progress = _quiet
) -> Identity:
    """Enroll a new key (request signed by the current one), then put it in use."""
    state = config.gateway.state_dir
    with as_owner_of(state):
        current = load_identity(state)
        hub = load_hub_key(state)
        if hub is None:
            raise ProvisionError(
                f"{state}: no hub key; this gateway was never provisioned",
                "provision it first (`vitals provision`, docs/install.md §4)",
            )
        pending = create_pending_key(state)
    up = config.uplink
    try:
        await enroll_key(
            uplink=up,
            new_key=pending,
            signer=current,
            pinned_hub_kid=envelope.key_id(hub),
            tls=tls_context(up.tls),
            timeout_s=timeout_s,
            progress=progress,
        )
    except EnrollRefused:
        discard_pending_key(state)  # a retry starts from a fresh key
        raise
    # (on EnrollError the pending key stays: a retry enrolls the same one)
    with as_owner_of(state):
        return commit_pending_key(state)


# -- the label ----------------------------------------------------------------------


def label_text(gateway: str, identity: Identity) -> str:
    return (
        f"gateway      {gateway}\n"
        f"key id       {identity.kid.hex()}\n"
        f"fingerprint  {identity.fingerprint}\n"
    )


def label_qr(gateway: str, identity: Identity) -> segno.QRCode:
    """``VITALS1:<gateway>:<kid hex>:<SHA-256 of the public key, hex>``, error correction M."""
    digest = identity.fingerprint.replace(":", "")
    return segno.make(f"VITALS1:{gateway}:{identity.kid.hex()}:{digest}", error="m", micro=False)


def label_png(gateway: str, identity: Identity, *, scale: int = 8, border: int = 4) -> bytes:
    """The label as a PNG: the QR code, and under it the gateway id, key id and
    fingerprint in print a person can read (and compare with `vitals key show`)."""
    from PIL import Image, ImageDraw, ImageFont  # only when a PNG is asked for

    buf = io.BytesIO()
    label_qr(gateway, identity).save(buf, kind="png", scale=scale, border=border)
    code = Image.open(io.BytesIO(buf.getvalue())).convert("L")
    fp = identity.fingerprint.split(":")
    lines = [
        (gateway, 4 * scale),
        (f"key id {identity.kid.hex()}", 2 * scale),
        ("fingerprint", 2 * scale),
        (":".join(fp[: len(fp) // 2]), 2 * scale),
        (":".join(fp[len(fp) // 2 :]), 2 * scale),
    ]
    margin = border * scale
    fonts = [ImageFont.load_default(size) for _, size in lines]
    width = max(
        code.width,
        *(int(f.getlength(t)) + 2 * margin for (t, _), f in zip(lines, fonts, strict=True)),
    )
    height = code.height + sum(size * 3 // 2 for _, size in lines) + margin
    page = Image.new("L", (width, height), 255)
    page.paste(code, (0, 0))
    draw = ImageDraw.Draw(page)
    y = code.height
    for (text, size), font in zip(lines, fonts, strict=True):
        draw.text((margin, y), text, fill=0, font=font)
        y += size * 3 // 2
    out = io.BytesIO()
    page.save(out, format="PNG")
    return out.getvalue()


def _print_label(gateway: str, identity: Identity, png: Path | None, out: TextIO) -> None:
    out.write(label_text(gateway, identity))
    label_qr(gateway, identity).terminal(out=out, compact=True)
    if png is not None:
        out.write(f"label PNG    {png}\n")


def _save_png(gateway: str, identity: Identity, png: Path) -> None:
    png.write_bytes(label_png(gateway, identity))


def _identity_json(gateway: str | None, ident: Identity) -> dict[str, Any]:
    return {
        "gateway": gateway,
        "key_file": str(ident.path),
        "public_key": ident.public_raw.hex(),
        "key_id": ident.kid.hex(),
        "fingerprint": ident.fingerprint,
    }


# -- the commands -----------------------------------------------------------------

DEFAULT_CONFIG = Path(os.environ.get("VITALS_CONFIG", "/etc/vitals/gateway.toml"))
DEFAULT_STATE = Path(os.environ.get("VITALS_STATE_DIR", "/var/lib/vitals"))

_BROKER_HINT = "the broker is HOST:PORT, e.g. mqtt.city.example:8883 (1883 without TLS)"


def _fail(message: str, hint: str = "", code: int = 1, *, as_json: bool = False) -> typer.Exit:
    if as_json:
        typer.echo(json.dumps({"ok": False, "error": message, "hint": hint or None}))
    typer.echo(f"error: {message}", err=True)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    return typer.Exit(code)


def _error(exc: BaseException, *, as_json: bool) -> typer.Exit:
    """One line and a hint for what provisioning can run into; exit 3 when the broker
    cannot be reached (an endpoint unusable), 1 otherwise."""
    hint = str(getattr(exc, "hint", "") or "")
    code = 3 if isinstance(exc, BrokerUnreachable) else 1
    if isinstance(exc, ConfigError):
        return _fail(
            f"the configuration would be invalid: {exc}",
            hint or "fix the template or the flags; nothing was written",
            as_json=as_json,
        )
    if isinstance(exc, PermissionError):
        return _fail(
            f"{exc.filename}: permission denied",
            "run it with sudo: the configuration belongs to root, the key to the "
            "service user (docs/install.md §2)",
            as_json=as_json,
        )
    if isinstance(exc, OSError):
        return _fail(
            f"{exc.filename or 'a file'}: {exc.strerror or exc}",
            "check the path and the free space",
            as_json=as_json,
        )
    return _fail(str(exc), hint, code, as_json=as_json)


def parse_broker(text: str) -> tuple[str, int]:
    """``HOST:PORT`` as (host, port); :class:`LocalError` with the reason."""
    text = text.strip()
    if topics.GATEWAY_ID.fullmatch(text):
        raise LocalError(f"{text!r} is not HOST:PORT (that looks like a gateway id)")
    return host_port(text)


def _check_gateway_id(text: str) -> str:
    if not topics.GATEWAY_ID.fullmatch(text):
        raise LocalError(
            f"{text!r} is not a gateway id: lower-case letters, digits and '-', "
            "at most 63, e.g. gw-0042"
        )
    return text


def _check_token(text: str) -> str:
    enroll.token_hub_kid(text)  # LocalError with the reason
    return text.strip()


def _ask(
    value: str | None,
    flag: str,
    prompt: str,
    check: Callable[[str], object],
    hint: str,
    default: str | None = None,
    *,
    as_json: bool = False,
    required: bool = True,
) -> str | None:
    """A flag's value, checked (``check`` raises :class:`LocalError`); else asked on the
    terminal until the answer is valid."""
    if value is not None:
        try:
            check(value)
        except LocalError as exc:
            raise _fail(f"{flag}: {exc}", hint, 2, as_json=as_json) from None
        return value
    if not sys.stdin.isatty():
        if default is not None or not required:
            return default
        raise _fail(
            f"{flag} is required (no terminal to ask on)",
            f"pass {flag}; {hint}",
            2,
            as_json=as_json,
        )
    while True:
        answer = str(
            typer.prompt(prompt, default=default or "", show_default=bool(default), err=True)
        )
        if not answer and not required:
            return None
        try:
            check(answer)
        except LocalError as exc:
            typer.echo(f"  {exc}; {hint}", err=True)
            continue
        return answer


@contextlib.contextmanager
def _spinner(enabled: bool) -> Iterator[Progress]:
    """A spinner on stderr while waiting, when stderr is a terminal; else silent."""
    if not enabled or not sys.stderr.isatty():
        yield _quiet
        return
    from rich.console import Console

    with Console(stderr=True).status("starting") as status:
        yield lambda text: status.update(text)


def provision_command(
    token: Annotated[
        str | None, typer.Option(help="one-time enrollment token from the hub operator")
    ] = None,
    gateway_id: Annotated[
        str | None,
        typer.Option(
            "--gateway-id",
            help="gateway id (default: the one in an existing file, else derived from the key)",
        ),
    ] = None,
    broker: Annotated[
        str | None, typer.Option(help="MQTT broker HOST:PORT", show_default=False)
    ] = None,
    config: Annotated[
        Path, typer.Option("--config", "-c", help="configuration file to write")
    ] = DEFAULT_CONFIG,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            help=f"where the keys are kept (default: the file's, else {DEFAULT_STATE})",
            show_default=False,
        ),
    ] = None,
    template: Annotated[
        Path | None, typer.Option(help="configuration template (default: a minimal one)")
    ] = None,
    ca_file: Annotated[Path | None, typer.Option(help="TLS: CA of the broker")] = None,
    cert_file: Annotated[Path | None, typer.Option(help="TLS: client certificate")] = None,
    key_file: Annotated[Path | None, typer.Option(help="TLS: client key")] = None,
    tls: Annotated[
        bool | None,
        typer.Option(
            "--tls/--no-tls",
            help="MQTT over TLS (default: off for a new file, as it is for an existing one)",
            show_default=False,
        ),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="TLS without verifying the broker (bench only)")
    ] = False,
    label_png: Annotated[
        Path | None, typer.Option(help="also save the label (QR, id, fingerprint) as PNG")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="edit an existing configuration: only the broker (uplink host, port, TLS) "
            "changes, the rest stays",
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="show what would be written; write and send nothing")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="the outcome as one JSON object")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the hub")] = 30.0,
) -> None:
    """Write the configuration, create the identity, enroll it with the hub, print the label.

    Exit 0 enrolled, 1 refused or failed (nothing left behind), 2 usage, 3 broker unreachable.
    """
    if not dry_run or token is not None:
        token = _ask(
            token,
            "--token",
            "enrollment token",
            _check_token,
            "the hub operator's `vitals hub token GATEWAY` prints it",
            as_json=as_json,
        )
    broker = _ask(
        broker,
        "--broker",
        "MQTT broker HOST:PORT",
        parse_broker,
        _BROKER_HINT,
        "127.0.0.1:1883",
        as_json=as_json,
    )
    gateway_id = _ask(
        gateway_id,
        "--gateway-id",
        "gateway id (empty: the file's, else derived from the key)",
        _check_gateway_id,
        "the id on the token's paper, e.g. gw-0042",
        as_json=as_json,
        required=False,
    )
    assert broker is not None
    host, port = parse_broker(broker)
    tls_cfg: TlsConfig | None = None
    if tls is not None or insecure or any((ca_file, cert_file, key_file)):
        tls_cfg = TlsConfig(
            enabled=tls is not False,
            ca_file=ca_file.resolve() if ca_file else None,
            cert_file=cert_file.resolve() if cert_file else None,
            key_file=key_file.resolve() if key_file else None,
            insecure=insecure,
        )
    state = state_dir.resolve() if state_dir else None
    try:
        template_text = template.read_text() if template else None
        if dry_run:
            _dry_run(config, gateway_id, state, host, port, template_text, tls_cfg, force, as_json)
            return
        assert token is not None
        with _spinner(not as_json) as progress:
            outcome = asyncio.run(
                provision(
                    config_path=config,
                    gateway_id=gateway_id,
                    state_dir=state,
                    broker_host=host,
                    broker_port=port,
                    token=token,
                    template=template_text,
                    tls=tls_cfg,
                    force=force,
                    timeout_s=timeout,
                    progress=progress,
                )
            )
        gw = outcome.config.gateway.id
        if label_png is not None:
            _save_png(gw, outcome.identity, label_png)
    except (VitalsError, OSError) as exc:
        raise _error(exc, as_json=as_json) from None
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "ok": True,
                    **_identity_json(gw, outcome.identity),
                    "config": str(config),
                    "config_action": outcome.config_action,
                    "key": "created" if outcome.created_key else "kept",
                    "hub_key_id": outcome.hub_kid.hex(),
                    "label_png": str(label_png) if label_png else None,
                }
            )
        )
        return
    _warn_root_owned(outcome.identity.path)
    typer.echo(f"config       {config} ({outcome.config_action})")
    typer.echo(
        f"identity     {outcome.identity.path} ({'created' if outcome.created_key else 'kept'})"
    )
    typer.secho(f"enrolled     {gw} with the hub (hub key {outcome.hub_kid.hex()})", fg="green")
    _print_label(gw, outcome.identity, label_png, sys.stdout)


def _warn_root_owned(key: Path) -> None:
    """Run as root on a state directory that root owns, while a service user exists:
    the agent will not be able to load the key. Say how to fix it (install.md §2)."""
    import pwd

    try:
        service = pwd.getpwnam("vitals")
    except KeyError:
        return
    if os.geteuid() == 0 and key.stat().st_uid == 0:
        typer.echo(
            f"note: {key.parent} belongs to root, so the agent (user vitals) cannot load "
            f"its key; hint: sudo chown -R {service.pw_name}:{service.pw_name} {key.parent}",
            err=True,
        )


def _dry_run(
    config: Path,
    gateway_id: str | None,
    state: Path | None,
    host: str,
    port: int,
    template: str | None,
    tls: TlsConfig | None,
    force: bool,
    as_json: bool,
) -> None:
    """What provision would write, without writing or sending anything."""
    kwargs: dict[str, Any] = dict(
        gateway_id=gateway_id,
        broker_host=host,
        broker_port=port,
        template=template,
        tls=tls,
        force=force,
    )
    plan = plan_config(config, state_dir=state, **kwargs)
    key_file = _key_path(plan.state_dir)
    key_id = None
    with as_owner_of(plan.state_dir):
        existing_key = load_identity(plan.state_dir) if key_file.exists() else None
    if existing_key is not None:
        key_id = existing_key.default_gateway_id
    else:  # the id a new key would give, shown as such
        key_id = Identity(PrivateKey.generate(), key_file).default_gateway_id
    plan = plan_config(config, state_dir=plan.state_dir, key_id=key_id, **kwargs)
    derived = gateway_id is None and plan.old_text is None and existing_key is None
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "ok": True,
                    "dry_run": True,
                    "config": str(config),
                    "config_action": plan.action,
                    "config_text": plan.text,
                    "diff": plan.diff(),
                    "gateway": None if derived else plan.gateway_id,
                    "key_file": str(key_file),
                    "key": "kept" if existing_key else "created",
                    "broker": f"{host}:{port}",
                }
            )
        )
        return
    typer.echo("dry run: nothing is written, nothing is sent")
    typer.echo(f"config       {config} (would be {plan.action})")
    if plan.action != "unchanged":
        sys.stdout.write(plan.diff())
    typer.echo(
        f"identity     {key_file} "
        + (f"(kept, key id {existing_key.kid.hex()})" if existing_key else "(would be created)")
    )
    who = "an id derived from the new key" if derived else plan.gateway_id
    typer.echo(f"enroll       {who} through {host}:{port}")


key_app = typer.Typer(help="The gateway's identity key.", no_args_is_help=True)


def _load_for_label(config: Path) -> tuple[Config, Identity]:
    cfg = load_config(config)
    with as_owner_of(cfg.gateway.state_dir):
        return cfg, load_identity(cfg.gateway.state_dir)


@key_app.command("show")
def key_show(
    config: Annotated[Path, typer.Option("--config", "-c")] = DEFAULT_CONFIG,
    label_png: Annotated[
        Path | None, typer.Option(help="also save the label (QR, id, fingerprint) as PNG")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
) -> None:
    """Print the label of this gateway: id, key id, fingerprint, QR."""
    try:
        cfg, ident = _load_for_label(config)
        if label_png is not None:
            _save_png(cfg.gateway.id, ident, label_png)
    except (VitalsError, OSError) as exc:
        raise _error(exc, as_json=as_json) from None
    if as_json:
        doc = _identity_json(cfg.gateway.id, ident)
        typer.echo(
            json.dumps({"ok": True, **doc, "label_png": str(label_png) if label_png else None})
        )
        return
    _print_label(cfg.gateway.id, ident, label_png, sys.stdout)


@key_app.command("rotate")
def key_rotate(
    config: Annotated[Path, typer.Option("--config", "-c")] = DEFAULT_CONFIG,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the hub")] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
) -> None:
    """Enroll a new key signed by the current one, then use it (restart the agent)."""
    try:
        cfg = load_config(config)
        with _spinner(not as_json) as progress:
            ident = asyncio.run(rotate_key(cfg, timeout_s=timeout, progress=progress))
    except (VitalsError, OSError) as exc:
        raise _error(exc, as_json=as_json) from None
    if as_json:
        typer.echo(json.dumps({"ok": True, **_identity_json(cfg.gateway.id, ident)}))
        return
    typer.secho(f"rotated      {cfg.gateway.id} now uses key {ident.kid.hex()}", fg="green")
    typer.echo("restart the agent to sign with it (systemctl restart vitals)")
    _print_label(cfg.gateway.id, ident, None, sys.stdout)


def keygen_command(
    state_dir: Annotated[Path, typer.Option(help="where the key is kept")] = DEFAULT_STATE,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
) -> None:
    """Create this gateway's Ed25519 identity (mode 0600) and show its key id."""
    try:
        with as_owner_of(state_dir):
            ident = create_identity(state_dir)
    except (VitalsError, OSError) as exc:
        raise _error(exc, as_json=as_json) from None
    if as_json:
        typer.echo(json.dumps({"ok": True, **_identity_json(None, ident)}))
        return
    typer.echo(f"key file     {ident.path}")
    typer.echo(f"public key   {ident.public_raw.hex()}")
    typer.echo(f"key id       {ident.kid.hex()}")
    typer.echo(f"fingerprint  {ident.fingerprint}")


cli = typer.Typer(
    help="Provisioning (also wired into `vitals`).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
cli.command("provision")(provision_command)
cli.command("keygen")(keygen_command)
cli.add_typer(key_app, name="key")

if __name__ == "__main__":
    cli()
