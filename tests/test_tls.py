"""MQTT over TLS: agent.tls against a real Mosquitto with certificates made here.

A CA, a server certificate for 127.0.0.1 (IP SAN) and a client certificate
are generated at test time with ``cryptography``; a second, unrelated CA plays
the attacker's.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.ops.config import TlsConfig
from agent.ops.tls import TlsError, tls_context
from simulator.broker import HOST, MosquittoBroker, free_port, mosquitto_path

pytestmark = pytest.mark.skipif(
    mosquitto_path() is None, reason="needs the mosquitto binary (apt-get install mosquitto)"
)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _ca(tmp: Path, cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = tmp / f"{cn}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key, path


def _leaf(
    tmp: Path,
    name: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path],
    *,
    server: bool,
) -> tuple[Path, Path]:
    ca_cert, ca_key, _ = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False,
        )
    cert = b.sign(ca_key, hashes.SHA256())
    crt, keyfile = tmp / f"{name}.crt", tmp / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(keyfile, key)
    return crt, keyfile


@dataclass
class Pki:
    ca: Path
    wrong_ca: Path
    client_crt: Path
    client_key: Path
    rogue_crt: Path  # a client certificate from the wrong CA
    rogue_key: Path
    tls_port: int  # server verification only
    mtls_port: int  # client certificate required


@pytest.fixture
async def pki(tmp_path: Path) -> AsyncIterator[Pki]:
    ca = _ca(tmp_path, "vitals-test-ca")
    wrong = _ca(tmp_path, "attacker-ca")
    srv_crt, srv_key = _leaf(tmp_path, "broker", ca, server=True)
    cli_crt, cli_key = _leaf(tmp_path, "gw-tls-1", ca, server=False)
    rogue_crt, rogue_key = _leaf(tmp_path, "rogue", wrong, server=False)
    files = f"cafile {ca[2]}\ncertfile {srv_crt}\nkeyfile {srv_key}\n"
    for attempt in range(3):  # a free port can be taken before mosquitto binds it
        tls_port, mtls_port = free_port(), free_port()
        # run as root (CI containers), mosquitto drops to user "mosquitto" before
        # reading the files, which live in root's private pytest directory
        extra = ("user root\n" if os.geteuid() == 0 else "") + (
            f"listener {tls_port} {HOST}\n{files}"
            f"listener {mtls_port} {HOST}\n{files}require_certificate true\n"
        )
        broker = MosquittoBroker(extra_config=extra)
        try:
            await broker.start()
            break
        except RuntimeError:
            if attempt == 2:
                raise
    try:
        for port in (tls_port, mtls_port):
            for _ in range(100):
                try:
                    _, w = await asyncio.open_connection(HOST, port)
                    w.close()
                    break
                except OSError:
                    await asyncio.sleep(0.05)
        yield Pki(ca[2], wrong[2], cli_crt, cli_key, rogue_crt, rogue_key, tls_port, mtls_port)
    finally:
        await broker.stop()


async def _round_trip(port: int, ctx: ssl.SSLContext | None) -> bytes:
    """Subscribe and publish to ourselves over ``ctx``; the payload that came back."""
    async with aiomqtt.Client(HOST, port, tls_context=ctx, timeout=5) as client:
        await client.subscribe("vitals/v1/gw-tls-1/status", qos=1)
        await client.publish("vitals/v1/gw-tls-1/status", b"online", qos=1)
        async with asyncio.timeout(5):
            async for msg in client.messages:
                assert isinstance(msg.payload, bytes)
                return msg.payload
    raise AssertionError("no message came back")


# paho-mqtt leaves the socket of a failed TLS handshake registered with the
# event loop, which drops it unclosed (ResourceWarning) only later: a leak of the
# client library on a connection that failed anyway. Ignored on refusal tests only.
_PAHO_LEAK = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


async def _refused(port: int, ctx: ssl.SSLContext | None) -> str:
    """The error of a connection that must fail."""
    try:
        await _round_trip(port, ctx)
    except aiomqtt.MqttError as exc:
        return str(exc)
    raise AssertionError("the connection was not refused")


async def test_right_ca_connects(pki: Pki) -> None:
    ctx = tls_context(TlsConfig(enabled=True, ca_file=pki.ca))
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert await _round_trip(pki.tls_port, ctx) == b"online"


@_PAHO_LEAK
async def test_wrong_ca_is_refused(pki: Pki) -> None:
    ctx = tls_context(TlsConfig(enabled=True, ca_file=pki.wrong_ca))
    assert "certificate verify failed" in await _refused(pki.tls_port, ctx)


@_PAHO_LEAK
async def test_system_store_does_not_trust_a_private_ca(pki: Pki) -> None:
    ctx = tls_context(TlsConfig(enabled=True))  # no ca_file: the system's trust store
    assert "certificate verify failed" in await _refused(pki.tls_port, ctx)


async def test_mtls_required_and_given(pki: Pki) -> None:
    ctx = tls_context(
        TlsConfig(enabled=True, ca_file=pki.ca, cert_file=pki.client_crt, key_file=pki.client_key)
    )
    assert await _round_trip(pki.mtls_port, ctx) == b"online"


async def _client_refused(port: int, ctx: ssl.SSLContext | None) -> str:
    """The broker's TLS alert to a client it refuses, read right after the handshake.

    With TLS 1.3 the server checks the client's certificate after the client has
    finished its handshake, so the refusal arrives as an alert on the first read;
    MQTT clients see it only as a CONNECT that gets no CONNACK (a 5 s timeout)."""
    assert ctx is not None
    reader, writer = await asyncio.open_connection(HOST, port, ssl=ctx)
    try:
        async with asyncio.timeout(5):
            data = await reader.read(4)  # (writing first races the alert with a reset)
    except ssl.SSLError as exc:
        return str(exc)
    except TimeoutError:
        data = b"nothing for 5 s"  # an accepted client: the broker waits for its CONNECT
    finally:
        writer.transport.abort()  # refused: nothing to say goodbye to
    raise AssertionError(f"the broker answered {data!r}: not refused")


async def test_mtls_without_client_certificate_is_refused(pki: Pki) -> None:
    ctx = tls_context(TlsConfig(enabled=True, ca_file=pki.ca))
    assert "certificate required" in await _client_refused(pki.mtls_port, ctx)


async def test_mtls_with_a_foreign_client_certificate_is_refused(pki: Pki) -> None:
    ctx = tls_context(
        TlsConfig(enabled=True, ca_file=pki.ca, cert_file=pki.rogue_crt, key_file=pki.rogue_key)
    )
    assert "unknown ca" in await _client_refused(pki.mtls_port, ctx)


async def test_insecure_connects_and_warns_at_every_start(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agent.ops.tls")
    cfg = TlsConfig(enabled=True, ca_file=pki.wrong_ca, insecure=True)
    for _ in range(2):  # two starts, two warnings
        ctx = tls_context(cfg)
        assert ctx is not None and ctx.verify_mode == ssl.CERT_NONE
    warnings = [r for r in caplog.records if "NOT verified" in r.getMessage()]
    assert len(warnings) == 2
    assert await _round_trip(pki.tls_port, ctx) == b"online"


def test_disabled_is_plain_mqtt() -> None:
    assert tls_context(TlsConfig()) is None


def test_disabled_with_settings_warns(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.WARNING, logger="agent.ops.tls")
    assert tls_context(TlsConfig(enabled=False, ca_file=tmp_path / "ca.crt")) is None
    assert "enabled = false" in caplog.text


def test_missing_ca_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TlsError) as err:
        tls_context(TlsConfig(enabled=True, ca_file=tmp_path / "nope.crt"))
    assert str(err.value) == f"[uplink.tls] ca_file {tmp_path / 'nope.crt'}: no such file"


async def test_a_key_of_another_certificate_is_named_without_an_errno(pki: Pki) -> None:
    with pytest.raises(TlsError) as err:
        tls_context(
            TlsConfig(
                enabled=True, ca_file=pki.ca, cert_file=pki.client_crt, key_file=pki.rogue_key
            )
        )
    why = str(err.value)
    assert why.startswith(f"[uplink.tls] cert_file {pki.client_crt} / key_file {pki.rogue_key}: ")
    assert "do not match" in why and "Errno" not in why


async def test_client_key_readable_by_others_is_refused(pki: Pki) -> None:
    os.chmod(pki.client_key, 0o644)
    with pytest.raises(TlsError, match="chmod 600"):
        tls_context(
            TlsConfig(
                enabled=True, ca_file=pki.ca, cert_file=pki.client_crt, key_file=pki.client_key
            )
        )
