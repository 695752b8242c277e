"""Provisioning a gateway in the field, and rotating its key.

``vitals provision`` does, in one command and with one enrollment token:

1. writes the gateway's configuration from a template (``string.Template``
   placeholders ``${gateway_id}``, ``${state_dir}``, ``${broker_host}``,
   ``${broker_port}``, ``${tls}``), validated before it is written;
2. creates the identity key (0600), or reuses the one a failed attempt left;
3. enrolls it: a signed ``vitals/enroll/v1`` request with the token and a
   proof of possession (:mod:`protocols.enroll`) on ``{prefix}/enroll/{gw}``,
   then waits for the hub's signed result on ``.../result``, checked against
   the hub key the token pins; the hub's public key is kept in the state
   directory (it verifies commands);
4. prints the label: gateway id and key fingerprint as text and a QR code
   (terminal, and a PNG when asked).

``vitals key rotate`` enrolls a new key with a request signed by the current
one, then swaps the key files; the agent must be restarted to use it.

The typer commands here are wired into ``vitals`` by ``agent/cli.py``; the
module also runs alone: ``python -m agent.provision provision ...``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import string
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, TextIO

import segno
import typer

from agent.config import Config, TlsConfig, load_config, parse_config
from agent.mqtt import MqttClient, MqttError
from agent.state import (
    Identity,
    commit_pending_key,
    create_identity,
    create_pending_key,
    discard_pending_key,
    load_hub_key,
    load_identity,
    save_hub_key,
)
from agent.tls import tls_context
from protocols import enroll, envelope, topics
from protocols.errors import ConfigError, LocalError, ProtocolError, RemoteError, VitalsError

__all__ = [
    "DEFAULT_TEMPLATE",
    "EnrollError",
    "EnrollRefused",
    "Outcome",
    "cli",
    "enroll_key",
    "key_app",
    "label_qr",
    "label_text",
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


class EnrollError(RemoteError):
    """The hub did not answer, or answered something we cannot trust."""


class EnrollRefused(RemoteError):
    """The hub answered, signed, and refused; ``status`` says why."""

    def __init__(self, status: str, detail: str) -> None:
        self.status = status
        self.detail = detail
        super().__init__(
            f"the hub refused the enrollment: {status}" + (f" ({detail})" * bool(detail))
        )


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


def write_config(path: Path, text: str, *, force: bool = False) -> Config:
    """Validate ``text`` as ``path`` would be read, then write it atomically."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([(str(path), f"the rendered template is not TOML: {exc}")]) from exc
    parse_config(data, source=str(path), base=path.resolve().parent, path=path)
    if path.exists() and not force:
        raise LocalError(f"{path} exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return load_config(path)


# -- enrollment over MQTT ---------------------------------------------------------


async def enroll_key(
    *,
    gateway: str,
    new_key: Identity,
    token: str = "",
    signer: Identity | None = None,
    pinned_hub_kid: bytes | None,
    host: str,
    port: int,
    tls: ssl.SSLContext | None = None,
    username: str | None = None,
    password: str | None = None,
    prefix: str = topics.DEFAULT_PREFIX,
    timeout_s: float = 30.0,
) -> enroll.EnrollResult:
    """Send one enrollment request and return the hub's verified, successful answer.

    :class:`EnrollRefused` when the hub says no, :class:`EnrollError` when it
    does not answer in ``timeout_s`` or the broker cannot be reached.
    """
    data, nonce = enroll.request(
        gateway=gateway,
        new_key=new_key.private_key,
        token=token,
        signer=signer.private_key if signer else None,
        now_ms=int(time.time() * 1000),
    )
    request_topic = topics.enroll(gateway, prefix)
    answer_topic = request_topic + "/result"
    try:
        async with MqttClient(
            host,
            port,
            client_id=f"vitals-{gateway}-enroll",
            username=username,
            password=password,
            tls=tls,
            connect_timeout=timeout_s,
            ack_timeout=timeout_s,
        ) as client:
            await client.subscribe(answer_topic, qos=1)
            await client.publish(request_topic, data, qos=1)
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
            f"no answer from the hub within {timeout_s:.0f} s on {answer_topic} "
            "(is the hub's enrollment desk running?)"
        ) from None
    except MqttError as exc:
        raise EnrollError(f"cannot reach the broker {host}:{port}: {exc}") from exc
    raise EnrollError("the broker closed the connection before the hub answered")


@dataclass(frozen=True)
class Outcome:
    config: Config
    identity: Identity
    hub_kid: bytes
    created_key: bool


async def provision(
    *,
    config_path: Path,
    gateway_id: str | None,
    state_dir: Path,
    broker_host: str,
    broker_port: int,
    token: str,
    template: str = DEFAULT_TEMPLATE,
    tls: TlsConfig = NO_TLS,
    force: bool = False,
    timeout_s: float = 30.0,
) -> Outcome:
    """Configuration, identity and enrollment: the whole of ``vitals provision``."""
    pin = enroll.token_hub_kid(token)  # a mistyped token fails before anything is written
    existed = (state_dir / "identity.key").exists()
    identity = create_identity(state_dir, exist_ok=True)  # a retry reuses the key
    gw = gateway_id or identity.default_gateway_id
    text = render_config(
        template,
        gateway_id=gw,
        state_dir=state_dir,
        broker_host=broker_host,
        broker_port=broker_port,
        tls=tls,
    )
    config = write_config(config_path, text, force=force or existed)
    up = config.uplink
    res = await enroll_key(
        gateway=gw,
        new_key=identity,
        token=token,
        pinned_hub_kid=pin,
        host=up.host,
        port=up.port,
        tls=tls_context(up.tls),
        username=up.username or None,
        password=up.password or None,
        prefix=up.topic_prefix,
        timeout_s=timeout_s,
    )
    save_hub_key(state_dir, res.hub_pub)
    log.info("gateway %s enrolled: key %s, hub key %s", gw, identity.kid.hex(), res.kid.hex())
    return Outcome(config, identity, res.kid, not existed)


async def rotate_key(config: Config, *, timeout_s: float = 30.0) -> Identity:
    """Enroll a new key (request signed by the current one), then put it in use."""
    state = config.gateway.state_dir
    current = load_identity(state)
    hub = load_hub_key(state)
    if hub is None:
        raise LocalError(f"{state}: no hub key; provision this gateway first")
    pending = create_pending_key(state)
    up = config.uplink
    try:
        await enroll_key(
            gateway=config.gateway.id,
            new_key=pending,
            signer=current,
            pinned_hub_kid=envelope.key_id(hub),
            host=up.host,
            port=up.port,
            tls=tls_context(up.tls),
            username=up.username or None,
            password=up.password or None,
            prefix=up.topic_prefix,
            timeout_s=timeout_s,
        )
    except EnrollRefused:
        discard_pending_key(state)  # a retry starts from a fresh key
        raise
    # (on EnrollError the pending key stays: a retry enrolls the same one)
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


def _print_label(gateway: str, identity: Identity, png: Path | None, out: TextIO) -> None:
    out.write(label_text(gateway, identity))
    qr = label_qr(gateway, identity)
    qr.terminal(out=out, compact=True)
    if png is not None:
        qr.save(str(png), scale=8, border=4)
        out.write(f"label PNG    {png}\n")


# -- the commands -----------------------------------------------------------------

DEFAULT_CONFIG = Path(os.environ.get("VITALS_CONFIG", "/etc/vitals/gateway.toml"))
DEFAULT_STATE = Path(os.environ.get("VITALS_STATE_DIR", "/var/lib/vitals"))


def _ask(value: str | None, flag: str, prompt: str, default: str | None = None) -> str:
    if value:
        return value
    if sys.stdin.isatty():
        return str(typer.prompt(prompt, default=default))
    if default is not None:
        return default
    typer.secho(f"error: {flag} is required (no terminal to ask on)", fg="red", err=True)
    raise typer.Exit(2)


def provision_command(
    token: Annotated[
        str | None, typer.Option(help="one-time enrollment token from the hub operator")
    ] = None,
    gateway_id: Annotated[
        str | None,
        typer.Option("--gateway-id", help="gateway id (default: derived from the new key)"),
    ] = None,
    broker: Annotated[str | None, typer.Option(help="MQTT broker HOST:PORT")] = None,
    config: Annotated[
        Path, typer.Option("--config", "-c", help="configuration file to write")
    ] = DEFAULT_CONFIG,
    state_dir: Annotated[Path, typer.Option(help="where the keys are kept")] = DEFAULT_STATE,
    template: Annotated[
        Path | None, typer.Option(help="configuration template (default: a minimal one)")
    ] = None,
    ca_file: Annotated[Path | None, typer.Option(help="TLS: CA of the broker")] = None,
    cert_file: Annotated[Path | None, typer.Option(help="TLS: client certificate")] = None,
    key_file: Annotated[Path | None, typer.Option(help="TLS: client key")] = None,
    tls: Annotated[bool, typer.Option("--tls/--no-tls", help="MQTT over TLS")] = False,
    insecure: Annotated[
        bool, typer.Option(help="TLS without verifying the broker (bench only)")
    ] = False,
    label_png: Annotated[Path | None, typer.Option(help="also save the label QR as PNG")] = None,
    force: Annotated[bool, typer.Option(help="replace an existing configuration")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the hub")] = 30.0,
) -> None:
    """Write the configuration, create the identity, enroll it with the hub, print the label."""
    token = _ask(token, "--token", "enrollment token")
    broker = _ask(broker, "--broker", "MQTT broker HOST:PORT", "127.0.0.1:1883")
    if gateway_id is None and sys.stdin.isatty():
        gateway_id = typer.prompt("gateway id (empty: derived from the key)", default="") or None
    host, _, port_text = broker.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        typer.secho(f"error: --broker {broker!r} is not HOST:PORT", fg="red", err=True)
        raise typer.Exit(2) from None
    tls_cfg = TlsConfig(
        enabled=tls or insecure or any((ca_file, cert_file, key_file)),
        ca_file=ca_file.resolve() if ca_file else None,
        cert_file=cert_file.resolve() if cert_file else None,
        key_file=key_file.resolve() if key_file else None,
        insecure=insecure,
    )
    try:
        outcome = asyncio.run(
            provision(
                config_path=config,
                gateway_id=gateway_id,
                state_dir=state_dir.resolve(),
                broker_host=host or "127.0.0.1",
                broker_port=port,
                token=token,
                template=template.read_text() if template else DEFAULT_TEMPLATE,
                tls=tls_cfg,
                force=force,
                timeout_s=timeout,
            )
        )
    except (VitalsError, OSError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    gw = outcome.config.gateway.id
    typer.echo(f"config       {config} (written)")
    typer.echo(
        f"identity     {outcome.identity.path} ({'created' if outcome.created_key else 'kept'})"
    )
    typer.secho(f"enrolled     {gw} with the hub (hub key {outcome.hub_kid.hex()})", fg="green")
    _print_label(gw, outcome.identity, label_png, sys.stdout)


key_app = typer.Typer(help="The gateway's identity key.", no_args_is_help=True)


@key_app.command("show")
def key_show(
    config: Annotated[Path, typer.Option("--config", "-c")] = DEFAULT_CONFIG,
    label_png: Annotated[Path | None, typer.Option(help="also save the label as PNG")] = None,
) -> None:
    """Print the label of this gateway: id, key id, fingerprint, QR."""
    try:
        cfg = load_config(config)
        ident = load_identity(cfg.gateway.state_dir)
    except VitalsError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    _print_label(cfg.gateway.id, ident, label_png, sys.stdout)


@key_app.command("rotate")
def key_rotate(
    config: Annotated[Path, typer.Option("--config", "-c")] = DEFAULT_CONFIG,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the hub")] = 30.0,
) -> None:
    """Enroll a new key signed by the current one, then use it (restart the agent)."""
    try:
        cfg = load_config(config)
        ident = asyncio.run(rotate_key(cfg, timeout_s=timeout))
    except (VitalsError, OSError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    typer.secho(f"rotated      {cfg.gateway.id} now uses key {ident.kid.hex()}", fg="green")
    typer.echo("restart the agent to sign with it (systemctl restart vitals)")
    _print_label(cfg.gateway.id, ident, None, sys.stdout)


cli = typer.Typer(
    help="Provisioning (also wired into `vitals`).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
cli.command("provision")(provision_command)
cli.add_typer(key_app, name="key")

if __name__ == "__main__":
    cli()
