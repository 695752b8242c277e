"""``vitals diag uplink``: can this gateway reach its broker, step by step?

1. **dns**: resolve the broker's host name;
2. **tcp**: connect to the port;
3. **tls** (when ``[uplink.tls] enabled``): handshake with the configured CA
   and client certificate; shows the server's certificate subject, issuer and
   the days until it expires (fails under 0, warns under 30);
4. **mqtt**: connect with the gateway's credentials (the broker's reason code
   on refusal);
5. **round trip**: subscribe to a test topic, publish to it at QoS 1 and
   receive it back;
6. **clock**: MQTT carries no time, so the offset is taken against the hub's
   retained ``{prefix}/hub/time`` message (a Unix time in seconds, as text or
   JSON ``{"t": ...}``) when the hub publishes one; otherwise the step is
   skipped with that reason.

The check makes the connection the agent makes: the same
:class:`agent.ops.config.UplinkConfig`, the same TLS context
(:func:`agent.ops.tls.tls_context`: TLS 1.2 at least, the client key refused
when others can read it) and the same MQTT client options
(:func:`agent.pipeline.uplink.mqtt_client`), as ``<client id>-diag-xxxxxx``.

Each step passes, fails with the reason, or is skipped because an earlier one
failed. Exit 0 when none failed; 3 when the broker cannot be reached at all
(dns or tcp failed: a refused or unreachable endpoint); 1 when a later step
failed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from agent.cli.diag._common import (
    FAILED,
    OK,
    PORT,
    USAGE,
    DiagError,
    console,
    die,
    emit_json,
    escape,
    waiting,
)
from agent.ops.config import UplinkConfig, load_config
from agent.ops.tls import TlsError, tls_context
from protocols import topics

if TYPE_CHECKING:  # imported when the check runs: `vitals hub token` needs no MQTT
    from agent.mqtt import MqttClient

__all__ = ["Step", "check_uplink", "uplink_command"]


@dataclass(slots=True)
class Step:
    name: str
    status: str  # pass | fail | warn | skip
    detail: str
    ms: float | None = None
    hint: str = ""  # what to do when it failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.name,
            "status": self.status,
            "detail": self.detail,
            "ms": None if self.ms is None else round(self.ms, 1),
            **({"hint": self.hint} if self.hint else {}),
        }


Progress = Callable[[str], None]


async def check_uplink(
    t: UplinkConfig, *, timeout_s: float = 5.0, progress: Progress | None = None
) -> list[Step]:
    """Every step in order, on the connection ``t`` describes; ``progress`` is told
    which step runs (a spinner's text)."""
    steps: list[Step] = []
    loop = asyncio.get_running_loop()
    say = progress or (lambda _text: None)

    def skip(*names: str) -> list[Step]:
        return steps + [Step(n, "skip", "an earlier step failed") for n in names]

    # 1. dns
    say(f"dns: resolving {t.host}")
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            infos = await loop.getaddrinfo(t.host, t.port, type=socket.SOCK_STREAM)
        addrs = sorted({str(i[4][0]) for i in infos})
        steps.append(
            Step(
                "dns", "pass", f"{t.host} -> {', '.join(addrs)}", (time.perf_counter() - t0) * 1000
            )
        )
    except (OSError, TimeoutError) as exc:
        why = "timeout" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        steps.append(
            Step(
                "dns",
                "fail",
                f"cannot resolve {t.host}: {why}",
                hint="check the host name in [uplink] and the DNS server ('resolvectl status')",
            )
        )
        return skip("tcp", "tls", "mqtt", "round trip", "clock")
    # 2. tcp
    say(f"tcp: connecting to {t.host}:{t.port}")
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            _, w = await asyncio.open_connection(t.host, t.port)
        w.close()
        steps.append(
            Step(
                "tcp", "pass", f"connected to {t.host}:{t.port}", (time.perf_counter() - t0) * 1000
            )
        )
    except (OSError, TimeoutError) as exc:
        if isinstance(exc, TimeoutError):
            why = "timeout (a firewall?)"
        else:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
        steps.append(
            Step(
                "tcp",
                "fail",
                f"{t.host}:{t.port}: {why}",
                hint="is the broker running and listening on that port (1883 plain, 8883 TLS)? "
                "a firewall between?",
            )
        )
        return skip("tls", "mqtt", "round trip", "clock")
    # 3. tls
    ctx: ssl.SSLContext | None = None
    if not t.tls.enabled:
        steps.append(Step("tls", "skip", "TLS not enabled in [uplink.tls]"))
    else:
        say("tls: handshake")
        t0 = time.perf_counter()
        try:
            ctx = tls_context(t.tls)  # the agent's own: TLS 1.2 at least, the key file checked
        except TlsError as exc:
            steps.append(
                Step(
                    "tls",
                    "fail",
                    str(exc),
                    hint="check ca_file, cert_file and key_file in [uplink.tls] (the paths, "
                    "the key matching the certificate, readable by the agent's user alone: "
                    "run this check as that user or with sudo)",
                )
            )
            return skip("mqtt", "round trip", "clock")
        try:
            async with asyncio.timeout(timeout_s):
                _, w = await asyncio.open_connection(
                    t.host, t.port, ssl=ctx, server_hostname=t.host
                )
            sslobj = w.get_extra_info("ssl_object")
            cert = sslobj.getpeercert() if sslobj is not None else None
            w.close()
            detail, status = _cert_detail(cert, sslobj)
            steps.append(Step("tls", status, detail, (time.perf_counter() - t0) * 1000))
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            if isinstance(exc, ssl.SSLCertVerificationError):
                why = f"the broker's certificate is not trusted ({exc.verify_message})"
            elif isinstance(exc, ssl.SSLError):
                why = exc.reason or str(exc)
            elif isinstance(exc, TimeoutError):
                why = "timeout (is this port TLS?)"
            else:
                why = exc.strerror or str(exc)
            steps.append(
                Step(
                    "tls",
                    "fail",
                    f"handshake failed: {why}",
                    hint="check ca_file, cert_file and key_file in [uplink.tls], and the clock "
                    "('timedatectl'): a certificate is only valid between its dates",
                )
            )
            return skip("mqtt", "round trip", "clock")
    # 4-6. mqtt
    steps += await _mqtt_steps(t, ctx, timeout_s, say)
    return steps


def _cert_detail(cert: dict[str, Any] | None, sslobj: Any) -> tuple[str, str]:
    if not cert:
        return (
            f"handshake ok ({sslobj.version() if sslobj else '?'}), certificate not verified (insecure)",
            "warn",
        )
    subject = ", ".join("=".join(x) for rdn in cert.get("subject", ()) for x in rdn)
    issuer = ", ".join("=".join(x) for rdn in cert.get("issuer", ()) for x in rdn)
    expires = datetime.fromtimestamp(ssl.cert_time_to_seconds(cert["notAfter"]), UTC)
    days = (expires - datetime.now(UTC)).days
    status = "pass" if days >= 30 else ("warn" if days >= 0 else "fail")
    return (
        f"{sslobj.version()}; subject {subject}; issuer {issuer}; expires {expires:%Y-%m-%d} "
        f"({days} days)",
        status,
    )


async def _mqtt_steps(
    t: UplinkConfig, ctx: ssl.SSLContext | None, timeout_s: float, say: Progress
) -> list[Step]:
    from agent.mqtt import MqttError
    from agent.pipeline.uplink import mqtt_client

    steps: list[Step] = []
    say("mqtt: connecting")
    # the agent's connection, but as <client id>-diag-xxxxxx: the running agent stays on
    client = mqtt_client(
        dataclasses.replace(t, connect_timeout_s=timeout_s),
        ctx,
        role=f"diag-{uuid.uuid4().hex[:6]}",
        ack_timeout=timeout_s,
    )
    client_id = client.client_id
    t0 = time.perf_counter()
    try:
        async with client:
            steps.append(
                Step("mqtt", "pass", f"connected as {client_id}", (time.perf_counter() - t0) * 1000)
            )
            # round trip
            topic = topics.diag(client_id, t.topic_prefix)
            say(f"round trip on {topic}")
            token = uuid.uuid4().hex.encode()
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(timeout_s):
                    await client.subscribe(topic, qos=1)
                    await client.publish(topic, token, qos=1)
                    async for m in client.messages:
                        if m.topic == topic and m.payload == token:
                            break
                steps.append(
                    Step(
                        "round trip",
                        "pass",
                        f"published and received on {topic}",
                        (time.perf_counter() - t0) * 1000,
                    )
                )
            except TimeoutError:
                steps.append(
                    Step(
                        "round trip",
                        "fail",
                        f"no message back on {topic} within {timeout_s:g} s",
                        hint="the broker's ACL may not let this user publish and subscribe there",
                    )
                )
            except MqttError as exc:
                steps.append(Step("round trip", "fail", f"{exc}"))
            say(f"clock: waiting for {topics.hub_time(t.topic_prefix)}")
            steps.append(await _clock_step(client, t.topic_prefix))
    except MqttError as exc:
        steps.append(
            Step(
                "mqtt",
                "fail",
                f"broker refused or dropped the connection: {exc}",
                hint="check username and password in [uplink] (and the client id the broker expects)",
            )
        )
        steps += [
            Step("round trip", "skip", "an earlier step failed"),
            Step("clock", "skip", "an earlier step failed"),
        ]
    return steps


async def _clock_step(client: MqttClient, prefix: str) -> Step:
    from agent.mqtt import MqttError

    topic = topics.hub_time(prefix)
    # the retained copy comes first but may be up to a second old: wait a little for a
    # fresh one (the hub publishes every second) and fall back on the retained one
    fallback: tuple[float, float] | None = None
    try:
        await client.subscribe(topic, qos=0)
        async with asyncio.timeout(2.5):
            async for m in client.messages:
                if m.topic != topic:
                    continue
                received = time.time()
                hub_t = _parse_time(m.payload)
                if hub_t is None:
                    return Step("clock", "warn", f"{topic}: cannot read a time in {m.payload!r}")
                if m.retain:
                    fallback = (received, hub_t)
                    continue
                return _clock_result(received - hub_t, topic, "live")
    except TimeoutError:
        pass
    except MqttError as exc:
        return Step("clock", "skip", f"cannot subscribe to {topic}: {exc}")
    if fallback is not None:
        return _clock_result(fallback[0] - fallback[1], topic, "retained, may be stale")
    return Step(
        "clock",
        "skip",
        f"the hub publishes no retained {topic}: offset unknown (check 'timedatectl')",
    )


def _clock_result(offset: float, topic: str, how: str) -> Step:
    status = "pass" if abs(offset) < 2.0 else ("warn" if abs(offset) < 30 else "fail")
    return Step("clock", status, f"local clock {offset:+.2f} s against the hub's {topic} ({how})")


def _parse_time(payload: bytes) -> float | None:
    try:
        text = payload.decode().strip()
        if text.startswith("{"):
            return float(json.loads(text)["t"])
        return float(text)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


_MARK = {
    "pass": "[green]pass[/]",
    "fail": "[red]FAIL[/]",
    "warn": "[yellow]warn[/]",
    "skip": "[dim]skip[/]",
}


def uplink_command(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="gateway configuration")
    ] = None,
    host: Annotated[str | None, typer.Option(help="broker host (instead of --config)")] = None,
    tcp_port: Annotated[
        int | None, typer.Option(help="broker port (default: the configuration's, else 1883)")
    ] = None,
    port_alias: Annotated[int | None, typer.Option("--port", hidden=True)] = None,
    timeout: Annotated[float, typer.Option(help="seconds per step")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
) -> None:
    """Check the uplink: DNS, TCP, TLS, MQTT connect, publish round trip, clock offset."""
    try:
        if tcp_port is not None and port_alias is not None and tcp_port != port_alias:
            raise DiagError(
                f"--tcp-port {tcp_port} and --port {port_alias}: which one?",
                "--port is the old name of --tcp-port: give one",
                USAGE,
            )
        if config is not None and host:
            raise DiagError(
                f"--config {config} and --host {host}: which one?",
                "--config checks the gateway's own uplink (host, port, credentials, TLS); "
                "--host a bare broker without credentials",
                USAGE,
            )
        if timeout <= 0:
            raise DiagError(f"--timeout {timeout}: more than 0 seconds", "", USAGE)
        target = _target(config, host, tcp_port if tcp_port is not None else port_alias)
    except DiagError as exc:
        die(exc, as_json=as_json)
    with waiting(f"checking the uplink to {target.host}:{target.port}", quiet=as_json) as say:
        steps = asyncio.run(check_uplink(target, timeout_s=timeout, progress=say))
    failed = [s.name for s in steps if s.status == "fail"]
    # no name or no connection: the endpoint cannot be used (3); a later step: 1
    code = OK if not failed else PORT if failed[0] in ("dns", "tcp") else FAILED
    if as_json:
        emit_json(
            {
                "broker": f"{target.host}:{target.port}",
                "ok": not failed,
                "code": code,
                "steps": [s.to_dict() for s in steps],
            }
        )
    else:
        tb = Table(title=escape(f"uplink to {target.host}:{target.port}"))
        for col in ("step", "result", "ms", "detail"):
            tb.add_column(col, justify="right" if col == "ms" else "left")
        for s in steps:
            tb.add_row(
                s.name, _MARK[s.status], "" if s.ms is None else f"{s.ms:.1f}", escape(s.detail)
            )
        con = console()
        con.print(tb)
        for s in steps:
            if s.status == "fail" and s.hint:
                con.print(escape(f"hint: {s.hint}"), soft_wrap=True)
    raise typer.Exit(code)


def _target(config: Path | None, host: str | None, port: int | None) -> UplinkConfig:
    """The gateway's own ``[uplink]`` (``--tcp-port`` may name another port), or a bare
    broker at ``host`` without credentials or TLS."""
    if host:
        return UplinkConfig(host=host, port=port or 1883, client_id="vitals")
    from protocols.errors import ConfigError

    path = config or Path("/etc/vitals/gateway.toml")
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        w, m = exc.problems[0] if exc.problems else (str(path), str(exc))
        raise DiagError(
            f"{w}: {m}", f"see every problem with 'vitals config check {path}'"
        ) from None
    return dataclasses.replace(cfg.uplink, port=port or cfg.uplink.port)
