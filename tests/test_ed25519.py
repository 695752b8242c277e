"""protocols.ed25519: RFC 8032 answers, the openssl tool agrees, strict key formats.

The module is a thin layer over ``cryptography``; what is checked here is the
layer: the RFC vectors through it, the system's ``openssl`` (another build of
OpenSSL) verifying what it signs and signing what it verifies, the PEM it
writes, the key files it refuses and why, and key objects that never leak.
"""

from __future__ import annotations

import base64
import copy
import os
import pickle
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import ed25519 as pyca
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.ops import state
from protocols import ed25519
from protocols.ed25519 import PrivateKey, PublicKey
from protocols.errors import InvalidSignature, KeyFormatError, SignatureError

ROOT = Path(__file__).resolve().parents[1]

# RFC 8032 section 7.1: (name, secret key, public key, message, signature), all hex
_TEST_1024_MESSAGE = (
    "08b8b2b733424243760fe426a4b54908632110a66c2f6591eabd3345e3e4eb98"
    "fa6e264bf09efe12ee50f8f54e9f77b1e355f6c50544e23fb1433ddf73be84d8"
    "79de7c0046dc4996d9e773f4bc9efe5738829adb26c81b37c93a1b270b20329d"
    "658675fc6ea534e0810a4432826bf58c941efb65d57a338bbd2e26640f89ffbc"
    "1a858efcb8550ee3a5e1998bd177e93a7363c344fe6b199ee5d02e82d522c4fe"
    "ba15452f80288a821a579116ec6dad2b3b310da903401aa62100ab5d1a36553e"
    "06203b33890cc9b832f79ef80560ccb9a39ce767967ed628c6ad573cb116dbef"
    "efd75499da96bd68a8a97b928a8bbc103b6621fcde2beca1231d206be6cd9ec7"
    "aff6f6c94fcd7204ed3455c68c83f4a41da4af2b74ef5c53f1d8ac70bdcb7ed1"
    "85ce81bd84359d44254d95629e9855a94a7c1958d1f8ada5d0532ed8a5aa3fb2"
    "d17ba70eb6248e594e1a2297acbbb39d502f1a8c6eb6f1ce22b3de1a1f40cc24"
    "554119a831a9aad6079cad88425de6bde1a9187ebb6092cf67bf2b13fd65f270"
    "88d78b7e883c8759d2c4f5c65adb7553878ad575f9fad878e80a0c9ba63bcbcc"
    "2732e69485bbc9c90bfbd62481d9089beccf80cfe2df16a2cf65bd92dd597b07"
    "07e0917af48bbb75fed413d238f5555a7a569d80c3414a8d0859dc65a46128ba"
    "b27af87a71314f318c782b23ebfe808b82b0ce26401d2e22f04d83d1255dc51a"
    "ddd3b75a2b1ae0784504df543af8969be3ea7082ff7fc9888c144da2af58429e"
    "c96031dbcad3dad9af0dcbaaaf268cb8fcffead94f3c7ca495e056a9b47acdb7"
    "51fb73e666c6c655ade8297297d07ad1ba5e43f1bca32301651339e22904cc8c"
    "42f58c30c04aafdb038dda0847dd988dcda6f3bfd15c4b4c4525004aa06eeff8"
    "ca61783aacec57fb3d1f92b0fe2fd1a85f6724517b65e614ad6808d6f6ee34df"
    "f7310fdc82aebfd904b01e1dc54b2927094b2db68d6f903b68401adebf5a7e08"
    "d78ff4ef5d63653a65040cf9bfd4aca7984a74d37145986780fc0b16ac451649"
    "de6188a7dbdf191f64b5fc5e2ab47b57f7f7276cd419c17a3ca8e1b939ae49e4"
    "88acba6b965610b5480109c8b17b80e1b7b750dfc7598d5d5011fd2dcc5600a3"
    "2ef5b52a1ecc820e308aa342721aac0943bf6686b64b2579376504ccc493d97e"
    "6aed3fb0f9cd71a43dd497f01f17c0e2cb3797aa2a2f256656168e6c496afc5f"
    "b93246f6b1116398a346f1a641f3b041e989f7914f90cc2c7fff357876e506b5"
    "0d334ba77c225bc307ba537152f3f1610e4eafe595f6d9d90d11faa933a15ef1"
    "369546868a7f3a45a96768d40fd9d03412c091c6315cf4fde7cb68606937380d"
    "b2eaaa707b4c4185c32eddcdd306705e4dc1ffc872eeee475a64dfac86aba41c"
    "0618983f8741c5ef68d3a101e8a3b8cac60c905c15fc910840b94c00a0b9d0"
)
RFC8032 = [
    (
        "TEST 1",
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "TEST 2",
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
        "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "TEST 3",
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
        "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
    (
        "TEST 1024",
        "f5e5767cf153319517630f226876b86c8160cc583bc013744c6bf255f5cc0ee5",
        "278117fc144c72340f67d0f2316e8386ceffbf2b2428c9c51fef7c597f1d426e",
        _TEST_1024_MESSAGE,
        "0aab4c900501b3e24d7cdf4663326a3a87df5e4843b2cbdb67cbf6e460fec350"
        "aa5371b1508f9f4528ecea23c436d94b5e8fcd4f681e30a6ac00a9704a188a03",
    ),
]


# --------------------------------------------------------------------------- RFC 8032


@pytest.mark.parametrize(("name", "sk", "pk", "msg", "sig"), RFC8032, ids=[v[0] for v in RFC8032])
def test_rfc8032_vectors_hold_for_the_reference(
    name: str, sk: str, pk: str, msg: str, sig: str
) -> None:
    """The vectors as typed here are the RFC's: cryptography agrees with every byte."""
    key = pyca.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(sk))
    assert key.public_key().public_bytes_raw().hex() == pk
    assert key.sign(bytes.fromhex(msg)).hex() == sig
    assert len(bytes.fromhex(msg)) == {"TEST 1": 0, "TEST 2": 1, "TEST 3": 2}.get(name, 1023)


@pytest.mark.parametrize(("name", "sk", "pk", "msg", "sig"), RFC8032, ids=[v[0] for v in RFC8032])
def test_rfc8032_vectors(name: str, sk: str, pk: str, msg: str, sig: str) -> None:
    key = PrivateKey.from_private_bytes(bytes.fromhex(sk))
    assert key.public_key().public_bytes_raw().hex() == pk
    assert key.private_bytes_raw().hex() == sk
    assert key.sign(bytes.fromhex(msg)).hex() == sig
    pub = PublicKey.from_public_bytes(bytes.fromhex(pk))
    pub.verify(bytes.fromhex(sig), bytes.fromhex(msg))
    assert pub == key.public_key()


# --------------------------------------------------------------------------- the reference


@settings(max_examples=200, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32), msg=st.binary(max_size=4096))
def test_random_seeds_and_messages_sign_as_the_reference(seed: bytes, msg: bytes) -> None:
    key = PrivateKey.from_private_bytes(seed)
    sig = key.sign(msg)
    assert sig == pyca.Ed25519PrivateKey.from_private_bytes(seed).sign(msg)
    key.public_key().verify(sig, msg)
    pyca.Ed25519PublicKey.from_public_bytes(key.public_key().public_bytes_raw()).verify(sig, msg)


def test_sign_accepts_bytes_like_and_nothing_else() -> None:
    key = PrivateKey.from_private_bytes(bytes(range(32)))
    msg = b"vitals" * 100
    assert key.sign(bytearray(msg)) == key.sign(memoryview(msg)) == key.sign(msg)  # type: ignore[arg-type]
    assert PrivateKey.from_private_bytes(bytearray(range(32))).sign(msg) == key.sign(msg)
    for wrong in (5, "vitals", None):  # the ctypes binding signed 5 as five zero bytes
        with pytest.raises(TypeError):
            key.sign(wrong)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- refusals


def test_tampered_message_signature_or_key_is_refused() -> None:
    key = PrivateKey.from_private_bytes(bytes(range(32)))
    pub = key.public_key()
    msg = b"\x94\x01" + bytes(range(200))
    sig = key.sign(msg)
    pub.verify(sig, msg)
    for i in (0, 1, 31, 32, 63):
        for bit in (0, 7):
            bad = bytearray(sig)
            bad[i] ^= 1 << bit
            with pytest.raises(InvalidSignature, match="does not verify"):
                pub.verify(bytes(bad), msg)
    for i in (0, 100, len(msg) - 1):
        bad = bytearray(msg)
        bad[i] ^= 0x01
        with pytest.raises(InvalidSignature):
            pub.verify(sig, bytes(bad))
    with pytest.raises(InvalidSignature):
        pub.verify(sig, msg + b"\x00")
    with pytest.raises(InvalidSignature):
        PrivateKey.generate().public_key().verify(sig, msg)
    raw = bytearray(pub.public_bytes_raw())
    raw[5] ^= 0x20
    with pytest.raises(InvalidSignature):
        PublicKey.from_public_bytes(bytes(raw)).verify(sig, msg)
    with pytest.raises(InvalidSignature, match="64 bytes, got 63"):
        pub.verify(sig[:-1], msg)
    with pytest.raises(InvalidSignature, match="64 bytes, got 65"):
        pub.verify(sig + b"\x00", msg)
    pub.verify(bytearray(sig), bytearray(msg))  # type: ignore[arg-type]  # bytes-like, as cryptography
    with pytest.raises(TypeError):
        pub.verify(sig.hex(), msg)  # type: ignore[arg-type]


def test_invalid_signature_is_what_callers_catch() -> None:
    assert issubclass(InvalidSignature, SignatureError)


@pytest.mark.parametrize("n", [0, 16, 31, 33, 64])
def test_wrong_lengths_are_named(n: int) -> None:
    with pytest.raises(KeyFormatError, match=f"private key seed is 32 bytes, got {n}"):
        PrivateKey.from_private_bytes(bytes(n))
    with pytest.raises(KeyFormatError, match=f"public key is 32 bytes, got {n}"):
        PublicKey.from_public_bytes(bytes(n))


def test_wrong_types_are_named() -> None:
    with pytest.raises(KeyFormatError, match="not a str"):
        PrivateKey.from_private_bytes("0" * 32)  # type: ignore[arg-type]
    with pytest.raises(KeyFormatError, match="not a str"):
        PublicKey.from_public_bytes("0" * 32)  # type: ignore[arg-type]
    with pytest.raises(KeyFormatError, match="is bytes, not str"):
        PrivateKey.from_pem("-----BEGIN PRIVATE KEY-----")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- PEM


def _pyca_pem(key: pyca.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_pem_is_byte_for_byte_cryptographys() -> None:
    for _ in range(10):
        ref = pyca.Ed25519PrivateKey.generate()
        pem = _pyca_pem(ref)
        key = PrivateKey.from_pem(pem)
        assert key.private_bytes_raw() == ref.private_bytes_raw()
        assert key.private_pem() == pem
        back = serialization.load_pem_private_key(key.private_pem(), password=None)
        assert isinstance(back, pyca.Ed25519PrivateKey)
        assert back.private_bytes_raw() == ref.private_bytes_raw()
        spki = ref.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert key.public_key().public_pem() == spki
    fresh = PrivateKey.generate()
    assert PrivateKey.from_pem(fresh.private_pem()).private_bytes_raw() == (
        fresh.private_bytes_raw()
    )


def test_pem_tolerates_crlf_and_surrounding_whitespace() -> None:
    pem = _pyca_pem(pyca.Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
    for variant in (pem.replace(b"\n", b"\r\n"), b"\n  " + pem + b"\n\n", pem.rstrip(b"\n")):
        assert PrivateKey.from_pem(variant).private_bytes_raw() == bytes(range(32))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not on PATH")
def test_openssl_reads_our_pem_and_we_read_its(tmp_path: Path) -> None:
    key = PrivateKey.from_private_bytes(bytes(range(32)))
    (tmp_path / "ours.pem").write_bytes(key.private_pem())
    out = subprocess.run(
        ["openssl", "pkey", "-in", str(tmp_path / "ours.pem"), "-pubout"],
        capture_output=True,
        check=True,
    ).stdout
    assert out == key.public_key().public_pem()
    gen = subprocess.run(
        ["openssl", "genpkey", "-algorithm", "ed25519"], capture_output=True, check=True
    ).stdout
    theirs = PrivateKey.from_pem(gen)
    assert theirs.private_pem() == gen  # OpenSSL writes the same 48-byte form


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not on PATH")
def test_openssl_verifies_what_we_sign_and_we_verify_what_it_signs(tmp_path: Path) -> None:
    """The openssl tool is another build of OpenSSL (the system's) than cryptography's wheel."""

    def openssl(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["openssl", *args], capture_output=True, cwd=tmp_path)

    ours = PrivateKey.from_private_bytes(bytes(range(32)))
    (tmp_path / "pub.pem").write_bytes(ours.public_key().public_pem())
    (tmp_path / "theirs.pem").write_bytes(openssl("genpkey", "-algorithm", "ed25519").stdout)
    theirs = PrivateKey.from_pem((tmp_path / "theirs.pem").read_bytes())
    for i, msg in enumerate([b"v", b"\x94\x01" + bytes(range(256)) * 8]):  # openssl: not b""
        (tmp_path / f"m{i}").write_bytes(msg)
        (tmp_path / f"s{i}").write_bytes(ours.sign(msg))
        verify = ("pkeyutl", "-verify", "-rawin", "-pubin", "-inkey", "pub.pem", "-in", f"m{i}")
        assert openssl(*verify, "-sigfile", f"s{i}").returncode == 0
        (tmp_path / f"m{i}").write_bytes(msg + b"x")
        refused = openssl(*verify, "-sigfile", f"s{i}")
        assert refused.returncode == 1 and b"Verification Failure" in refused.stdout
        (tmp_path / f"m{i}").write_bytes(msg)
        signed = openssl("pkeyutl", "-sign", "-rawin", "-inkey", "theirs.pem", "-in", f"m{i}")
        assert signed.returncode == 0, signed.stderr
        theirs.public_key().verify(signed.stdout, msg)
        assert signed.stdout == theirs.sign(msg)  # Ed25519 is deterministic


def _pem(der: bytes, label: str = "PRIVATE KEY") -> bytes:
    return f"-----BEGIN {label}-----\n{base64.b64encode(der).decode()}\n-----END {label}-----\n".encode()


_SEED = bytes(range(32))
_OPENSSH = pyca.Ed25519PrivateKey.generate().private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
)
_ENCRYPTED = pyca.Ed25519PrivateKey.generate().private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8,
    serialization.BestAvailableEncryption(b"pw"),
)
_EC = ec.generate_private_key(ec.SECP256R1()).private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)
# PKCS#8 v2 (OneAsymmetricKey, RFC 5958 / RFC 8410): version 1, the public key appended
_V2 = bytes.fromhex("3051020101300506032b657004220420") + _SEED + bytes.fromhex("8121") + bytes(33)

GARBAGE = [
    ("empty", b"", "expected -----BEGIN PRIVATE KEY----- .*empty input"),
    ("text", b"hello", r"expected -----BEGIN PRIVATE KEY----- .*no BEGIN line"),
    ("public key", _pem(ed25519.SPKI_PREFIX + _SEED, "PUBLIC KEY"), "found '-----BEGIN PUBLIC KEY"),
    ("openssh", _OPENSSH, "an OpenSSH key is not PKCS#8"),
    ("encrypted", _ENCRYPTED, "an encrypted key is not supported"),
    ("no end", _pem(ed25519.PKCS8_PREFIX + _SEED)[:-10], "no -----END PRIVATE KEY----- line"),
    ("bad base64", b"-----BEGIN PRIVATE KEY-----\n%%%%\n-----END PRIVATE KEY-----\n", "not base64"),
    (
        "pem headers",
        b"-----BEGIN PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\nAAAA\n-----END PRIVATE KEY-----\n",
        "not base64",
    ),
    ("ec key", _EC, "another algorithm than Ed25519"),
    (
        "short seed",
        _pem(bytes.fromhex("302d020100300506032b657004210420") + _SEED[:31]),
        "47 bytes",
    ),
    ("long", _pem(ed25519.PKCS8_PREFIX + _SEED + b"\x00"), "49 bytes, not the RFC 8410 form"),
    ("v2 with public key", _pem(_V2), "83 bytes, not the RFC 8410 form"),
    ("version 1", _pem(bytes.fromhex("302e020101300506032b657004220420") + _SEED), "48 bytes"),
]


@pytest.mark.parametrize(("data", "match"), [g[1:] for g in GARBAGE], ids=[g[0] for g in GARBAGE])
def test_garbage_pem_is_refused_with_a_reason(data: bytes, match: str) -> None:
    with pytest.raises(KeyFormatError, match=match) as info:
        PrivateKey.from_pem(data)
    assert _SEED.hex() not in str(info.value)  # never key material in a message


# --------------------------------------------------------------------------- existing key files


def test_key_files_written_by_cryptography_still_load(tmp_path: Path) -> None:
    """agent/ops/state.py wrote identity.key with cryptography until now: same bytes, same key."""
    ref = pyca.Ed25519PrivateKey.from_private_bytes(bytes(range(7, 39)))
    path = tmp_path / state.KEY_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, _pyca_pem(ref))
    os.close(fd)
    ident = state.load_identity(tmp_path)
    assert ident.public_raw == ref.public_key().public_bytes_raw()
    new = state.create_identity(tmp_path / "new")
    loaded = serialization.load_pem_private_key(new.path.read_bytes(), password=None)
    assert isinstance(loaded, pyca.Ed25519PrivateKey)
    assert loaded.public_key().public_bytes_raw() == new.public_raw
    assert new.path.read_bytes() == _pyca_pem(loaded)


# --------------------------------------------------------------------------- object behaviour


def test_public_keys_compare_hash_and_pickle() -> None:
    a = PrivateKey.from_private_bytes(bytes(range(32))).public_key()
    b = PublicKey.from_public_bytes(a.public_bytes_raw())
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != PrivateKey.generate().public_key()
    assert a != a.public_bytes_raw()
    assert pickle.loads(pickle.dumps(b)) == a
    assert copy.copy(a) is a and copy.deepcopy(a) is a
    assert a.public_bytes_raw().hex() in repr(a)


def test_private_keys_do_not_leak_or_copy() -> None:
    key = PrivateKey.from_private_bytes(bytes(range(32)))
    assert bytes(range(32)).hex() not in repr(key) + str(key)
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(key)
    assert copy.copy(key) is key and copy.deepcopy(key) is key


def test_threads_sign_and_verify_at_once() -> None:
    key = PrivateKey.from_private_bytes(bytes(range(32)))
    pub = key.public_key()
    expected = {
        i: pyca.Ed25519PrivateKey.from_private_bytes(bytes(range(32))).sign(bytes([i]) * 500)
        for i in range(8)
    }
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(200):
                sig = key.sign(bytes([i]) * 500)
                assert sig == expected[i]
                pub.verify(sig, bytes([i]) * 500)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
