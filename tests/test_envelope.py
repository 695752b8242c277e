"""protocols.envelope: signed messages, batches, point tables, the test vector."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocols
from protocols.ed25519 import PrivateKey
from protocols.envelope import (
    BATCH_DOMAIN,
    META_DOMAIN,
    BatchHeader,
    key_id,
    parse,
    parse_message,
    parse_meta,
    seal,
    seal_meta,
    sign_message,
    signed_bytes,
)
from protocols.errors import DecodeError, FrameError, LocalError, ProtocolError, SignatureError
from protocols.payload import COLUMNS_TAG, PointInfo, encode_readings
from protocols.reading import Quality, Reading

VECTORS = Path(__file__).resolve().parent / "vectors"
KEY = PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = PrivateKey.from_private_bytes(bytes(range(1, 33)))
T = 1_767_225_600_000
READINGS = [
    Reading(1, T, 52.3),
    Reading(2, T, True),
    Reading(1, T + 1000, 52.9),
    Reading(2, T + 1000, None, Quality.COMM_ERROR),
]


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def sealed(**kw: object) -> bytes:
    args: dict[str, object] = {"gateway": "gw-1", "key": KEY, "epoch": 3, "seq": 9}
    args.update(kw)
    return seal(READINGS, **args)  # type: ignore[arg-type]


def header_map(**changes: object) -> dict[str, object]:
    h: dict[str, object] = {
        "gw": "gw-1",
        "kid": key_id(KEY),
        "epoch": 3,
        "seq": 9,
        "t0": T,
        "t1": T + 1000,
        "n": 4,
        "enc": "msgpack+zlib",
    }
    h.update(changes)
    return {k: v for k, v in h.items() if v is not None}


def hand_made(
    protected: bytes | None = None, payload: bytes | None = None, *, key: PrivateKey = KEY
) -> bytes:
    """A batch with hand-made parts, correctly signed."""
    prot = pack(header_map()) if protected is None else protected
    pl = encode_readings(READINGS) if payload is None else payload
    return pack([1, prot, pl, key.sign(signed_bytes(BATCH_DOMAIN, prot, pl))])


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("enc", ["msgpack", "msgpack+zlib"])
def test_seal_parse_verify_roundtrip(enc: str) -> None:
    batch = parse(sealed(enc=enc))
    assert batch.header == BatchHeader("gw-1", key_id(KEY), 3, 9, T, T + 1000, 4, enc)
    batch.verify(KEY.public_key())
    batch.verify(KEY.public_key().public_bytes_raw())
    out = batch.readings()
    assert [(r.point, r.ts, r.value, r.quality) for r in out] == [
        (1, T, 52.3, Quality.GOOD),
        (1, T + 1000, 52.9, Quality.GOOD),
        (2, T, True, Quality.GOOD),
        (2, T + 1000, None, Quality.COMM_ERROR),
    ]


def test_wire_shape_is_the_documented_one() -> None:
    wire = sealed()
    version, protected, payload, signature = msgpack.unpackb(wire)
    assert version == 1 and len(signature) == 64
    assert msgpack.unpackb(protected) == header_map()
    assert list(msgpack.unpackb(protected)) == ["gw", "kid", "epoch", "seq", "t0", "t1", "n", "enc"]
    KEY.public_key().verify(signature, pack(["vitals/batch/v1", protected, payload]))


def test_a_part_of_a_split_batch_names_its_original() -> None:
    """Optional, signed: (epoch, seq) of the batch a part was re-sealed from; a batch
    without it is byte for byte what it was before."""
    part = parse(sealed(split_of=(2, 41)))
    h = part.header
    assert (h.split_epoch, h.split_seq, h.split_of) == (2, 41, (2, 41))
    part.verify(KEY.public_key())
    assert parse(sealed()).header.split_of is None
    assert "split_epoch" not in msgpack.unpackb(msgpack.unpackb(sealed())[1])
    with pytest.raises(LocalError, match="split_seq"):
        sealed(split_of=(2, -1))


def test_key_id() -> None:
    raw = KEY.public_key().public_bytes_raw()
    assert key_id(KEY) == hashlib.sha256(raw).digest()[:8]
    assert key_id(KEY.public_key()) == key_id(raw) == key_id(KEY)
    with pytest.raises(LocalError, match="32 raw bytes"):
        key_id(raw[:31])


def test_wrong_key_or_kid_is_refused() -> None:
    batch = parse(sealed())
    with pytest.raises(SignatureError, match=r"kid [0-9a-f]{16} does not match"):
        batch.verify(OTHER.public_key())
    forged = parse(hand_made(key=OTHER))  # kid names KEY, signed by OTHER
    with pytest.raises(SignatureError, match="signature does not verify"):
        forged.verify(KEY.public_key())


def test_domain_separation() -> None:
    """A signature of one kind never verifies as another."""
    msg = parse_message(sealed())
    msg.verify(BATCH_DOMAIN, KEY.public_key())
    with pytest.raises(SignatureError, match="vitals/meta/v1 signature does not verify"):
        msg.verify(META_DOMAIN, KEY.public_key())


def test_generic_sign_message() -> None:
    wire = sign_message("vitals/gap/v1", {"gw": "gw-1", "from": 3, "to": 9}, b"", KEY)
    msg = parse_message(wire)
    msg.verify("vitals/gap/v1", KEY.public_key())
    assert msg.fields({"gw": str, "from": int, "to": int}) == {"gw": "gw-1", "from": 3, "to": 9}
    with pytest.raises(FrameError, match="missing key"):
        msg.fields({"gw": str, "from": int, "to": int, "why": str})
    with pytest.raises(LocalError, match="values must be str, bytes or int"):
        sign_message("x", {"a": 1.5}, b"", KEY)  # type: ignore[dict-item]
    with pytest.raises(LocalError, match="keys must be str"):
        sign_message("x", {1: 1}, b"", KEY)  # type: ignore[dict-item]


def test_seal_is_deterministic() -> None:
    assert sealed() == sealed()


SEAL_REFUSED: list[tuple[str, dict[str, object], str]] = [
    ("gateway empty", {"gateway": ""}, "gateway id"),
    ("gateway too long", {"gateway": "g" * 65}, "gateway id"),
    ("epoch negative", {"epoch": -1}, "epoch must be"),
    ("seq bool", {"seq": True}, "seq must be"),
    ("seq too big", {"seq": 2**63}, "seq must be"),
    ("enc unknown", {"enc": "gzip"}, "unknown payload encoding"),
]


@pytest.mark.parametrize(("case", "kw", "message"), SEAL_REFUSED, ids=[s[0] for s in SEAL_REFUSED])
def test_seal_refuses(case: str, kw: dict[str, object], message: str) -> None:
    with pytest.raises(LocalError, match=message):
        sealed(**kw)


# --------------------------------------------------------------------------- strict parse

GOOD_PROT = pack(header_map())
PAYLOAD = encode_readings(READINGS)
SIG = bytes(64)


def raw_map(pairs: list[tuple[object, object]]) -> bytes:
    """A msgpack map from pairs, duplicates kept."""
    out = bytearray([0x80 | len(pairs)])
    for k, v in pairs:
        out += pack(k) + pack(v)
    return bytes(out)


BAD_FRAMES: list[tuple[str, bytes, str]] = [
    ("not bytes", "x", "a signed message is bytes"),  # type: ignore[list-item]
    ("empty", b"", "not one msgpack value"),
    ("truncated", sealed()[:-1], "not one msgpack value"),
    ("trailing byte", sealed() + b"\x00", "not one msgpack value"),
    ("not an array", pack({"a": 1}), "not one msgpack value"),
    ("an int", pack(1), "must be a msgpack array, got int"),
    ("3 items", pack([1, GOOD_PROT, PAYLOAD]), "array of 4 items, got 3"),
    ("5 items", pack([1, GOOD_PROT, PAYLOAD, SIG, b""]), "not one msgpack value"),
    ("version str", pack(["1", GOOD_PROT, PAYLOAD, SIG]), "version must be an int, got str"),
    ("version 2", pack([2, GOOD_PROT, PAYLOAD, SIG]), "unknown message version 2"),
    ("version bool", pack([True, GOOD_PROT, PAYLOAD, SIG]), "version must be an int, got bool"),
    ("protected str", pack([1, "x", PAYLOAD, SIG]), "protected must be bin, got str"),
    ("payload array", pack([1, GOOD_PROT, [1], SIG]), "payload must be bin, got list"),
    ("signature nil", pack([1, GOOD_PROT, PAYLOAD, None]), "signature must be bin, got NoneType"),
    ("signature short", pack([1, GOOD_PROT, PAYLOAD, SIG[:63]]), "must be 64 bytes, got 63"),
    ("ext type", pack([1, GOOD_PROT, PAYLOAD, msgpack.ExtType(1, SIG)]), "not one msgpack"),
    (
        "bin16 for a short bin",
        b"\x94\x01" + b"\xc5\x00" + bytes([len(GOOD_PROT)]) + GOOD_PROT + pack(PAYLOAD) + pack(SIG),
        "not in msgpack's shortest encoding",
    ),
]


@pytest.mark.parametrize(("case", "data", "message"), BAD_FRAMES, ids=[b[0] for b in BAD_FRAMES])
def test_strict_frame(case: str, data: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=re.escape(message)):
        parse(data)


BAD_HEADERS: list[tuple[str, bytes, str]] = [
    ("not msgpack", b"\xc1", "protected header is not valid msgpack"),
    ("trailing", GOOD_PROT + b"\x00", "protected header is not valid msgpack"),
    ("an array", pack([1]), "protected header must be a msgpack map"),
    ("int key", raw_map([(1, 2)]), "protected header is not valid msgpack"),
    ("missing seq", pack(header_map(seq=None)), "missing key(s) seq"),
    ("missing all", pack({}), "missing key(s) gw, kid, epoch, seq, t0, t1, n, enc"),
    ("extra key", pack({**header_map(), "x": 1}), "unknown key 'x'"),
    ("duplicate key", raw_map([*header_map().items(), ("seq", 10)]), "key 'seq' appears twice"),
    ("gw bytes", pack(header_map(gw=b"gw")), "'gw' must be str, got bytes"),
    ("kid str", pack(header_map(kid="k" * 8)), "'kid' must be bytes, got str"),
    ("seq bool", pack(header_map(seq=False)), "'seq' must be int, got bool"),
    ("n float", pack(header_map(n=4.0)), "'n' must be int, got float"),
    ("gw empty", pack(header_map(gw="")), "gw must be 1 to 64 chars"),
    ("kid short", pack(header_map(kid=b"1234567")), "kid must be 8 bytes, got 7"),
    ("enc unknown", pack(header_map(enc="gzip")), "unknown enc 'gzip'"),
    ("epoch negative", pack(header_map(epoch=-1)), "epoch -1 is outside"),
    ("seq negative", pack(header_map(seq=-1)), "seq -1 is outside"),
    ("n zero", pack(header_map(n=0)), "n 0 is outside [1, 100000]"),
    ("n huge", pack(header_map(n=10**6)), "n 1000000 is outside"),
    ("t0 negative", pack(header_map(t0=-5)), "t0 -5 is outside"),
    ("t1 before t0", pack(header_map(t1=T - 1)), f"t1 {T - 1} is outside [{T}, "),
    ("split_seq alone", pack(header_map(split_seq=4)), "split_epoch and split_seq go together"),
    ("split_seq negative", pack(header_map(split_epoch=1, split_seq=-1)), "split_seq -1 is"),
]


@pytest.mark.parametrize(("case", "prot", "message"), BAD_HEADERS, ids=[b[0] for b in BAD_HEADERS])
def test_strict_header(case: str, prot: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=re.escape(message)):
        parse(hand_made(prot))


BAD_BODIES: list[tuple[str, dict[str, object], bytes | None, str]] = [
    ("n too big", {"n": 5}, None, "header says n=5, payload holds 4"),
    ("t0 wrong", {"t0": T - 1}, None, f"header says t0={T - 1} t1={T + 1000}, readings span {T}"),
    ("t1 wrong", {"t1": T + 999}, None, "t1=1767225600999"),
    ("enc lies", {"enc": "msgpack"}, None, "not valid msgpack"),
    ("payload garbage", {}, b"\x00\x01", "not valid zlib"),
]


@pytest.mark.parametrize(
    ("case", "changes", "payload", "message"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES]
)
def test_readings_checked_against_header(
    case: str, changes: dict[str, object], payload: bytes | None, message: str
) -> None:
    batch = parse(hand_made(pack(header_map(**changes)), payload))
    batch.verify(KEY.public_key())  # correctly signed: the payload itself disagrees
    with pytest.raises(DecodeError, match=re.escape(message)):
        batch.readings()


def test_every_bit_flip_is_caught() -> None:
    wire = sealed()
    pub = KEY.public_key()
    for bit in range(len(wire) * 8):
        flipped = bytearray(wire)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises((FrameError, SignatureError)):
            parse(bytes(flipped)).verify(pub)


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_fuzz_parse_bytes(data: bytes) -> None:
    try:
        batch = parse(data)
    except ProtocolError:
        return
    with contextlib.suppress(ProtocolError):
        batch.readings()
    assert isinstance(batch.header, BatchHeader)


@given(st.data())
def test_fuzz_mutated_batch(data: st.DataObject) -> None:
    """Any byte of a real batch replaced: parse/verify/readings raise only ProtocolError."""
    wire = bytearray(sealed(enc=data.draw(st.sampled_from(["msgpack", "msgpack+zlib"]))))
    i = data.draw(st.integers(0, len(wire) - 1))
    wire[i] = data.draw(st.integers(0, 255))
    try:
        batch = parse(bytes(wire))
        batch.readings()
        batch.verify(KEY.public_key())
    except ProtocolError:
        return
    assert bytes(wire) == sealed(enc=batch.header.enc)  # only a no-op change survives


# --------------------------------------------------------------------------- meta

POINTS = [
    PointInfo(1, "nm-01", "LAeq", "dB(A)", "noise", "sound_level_meter", "laeq_1s"),
    PointInfo(2, "nm-01", "overload", "", "noise", "sound_level_meter", "overload"),
]


def test_meta_roundtrip() -> None:
    meta = parse_meta(seal_meta(POINTS, gateway="gw-1", key=KEY, epoch=3))
    meta.verify(KEY.public_key())
    assert meta.points() == POINTS
    assert (meta.header.gw, meta.header.epoch, meta.header.n) == ("gw-1", 3, 2)


def test_meta_and_batch_do_not_cross() -> None:
    meta_wire = seal_meta(POINTS, gateway="gw-1", key=KEY, epoch=3)
    with pytest.raises(FrameError, match="missing key"):
        parse(meta_wire)
    with pytest.raises(FrameError, match="unknown key 'seq'"):
        parse_meta(sealed())
    with pytest.raises(SignatureError, match=r"kid [0-9a-f]{16} does not match"):
        parse_meta(meta_wire).verify(OTHER.public_key())


def test_meta_count_is_checked() -> None:
    prot = pack({"gw": "g", "kid": key_id(KEY), "epoch": 0, "n": 3, "enc": "msgpack"})
    pl = pack([[1, *"abcdef"]])
    wire = pack([1, prot, pl, KEY.sign(signed_bytes(META_DOMAIN, prot, pl))])
    with pytest.raises(DecodeError, match="meta header says n=3, payload holds 1"):
        parse_meta(wire).points()


# --------------------------------------------------------------------------- sans-IO

FORBIDDEN = {"asyncio", "serial", "socket", "selectors", "trio", "aiomqtt", "pymodbus"}


def test_protocols_imports_no_io() -> None:
    root = Path(protocols.__file__).resolve().parent
    modules = sorted(root.rglob("*.py"))
    assert len(modules) >= 4
    for path in modules:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
                names = ["<dynamic __import__>"]
            for name in names:
                top = name.split(".")[0]
                assert top not in FORBIDDEN, f"{path.name} imports {name}"
                assert not name.startswith("<"), f"{path.name} uses __import__"


# --------------------------------------------------------------------------- vectors


def _make_vectors() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vector_files_match_the_code() -> None:
    built: Mapping[str, bytes] = _make_vectors().build()
    assert len(built) == 18  # 11 files of the layout 1 batch and the key, 7 of the layout 2 batch
    for name, content in built.items():
        assert (VECTORS / name).read_bytes() == content, f"{name} is stale: run make_vectors.py"


def vector(name: str) -> bytes:
    return bytes.fromhex((VECTORS / name).read_text().strip())


# the batch of payload layout 1 (series by point) and the one of layout 2 (columns)
BATCH_VECTORS = pytest.mark.parametrize("prefix", ["", "columns_"], ids=["series", "columns"])


@BATCH_VECTORS
def test_vector_verifies_and_decodes(prefix: str) -> None:
    wire = vector(prefix + "batch.hex")
    batch = parse(wire)
    assert batch.protected == vector(prefix + "protected.hex")
    assert batch.payload == vector(prefix + "payload.hex")
    assert batch.signature == vector(prefix + "sig.hex")
    signed = signed_bytes(BATCH_DOMAIN, batch.protected, batch.payload)
    assert signed == vector(prefix + "signed.hex")
    batch.verify(vector("pub.hex"))
    key = PrivateKey.from_private_bytes(vector("seed.hex"))
    assert key_id(key) == vector("kid.hex") == batch.header.kid
    layout_tag = msgpack.unpackb(batch.payload)[0]
    assert (layout_tag == COLUMNS_TAG) == (prefix == "columns_")
    expected = json.loads((VECTORS / f"{prefix}readings.json").read_text())
    got = [
        {"point": r.point, "ts": r.ts, "value": r.value, "quality": r.quality.name}
        for r in batch.readings()
    ]
    assert got == expected
    assert [type(r["value"]) for r in got] == [type(r["value"]) for r in expected]


@BATCH_VECTORS
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not on PATH")
def test_vector_verifies_with_openssl(tmp_path: Path, prefix: str) -> None:
    (tmp_path / "signed.bin").write_bytes(vector(prefix + "signed.hex"))
    (tmp_path / "sig.bin").write_bytes(vector(prefix + "sig.hex"))
    cmd = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(VECTORS / "pub.pem")]
    cmd += ["-rawin", "-in", "signed.bin", "-sigfile", "sig.bin"]
    ok = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "Signature Verified Successfully" in ok.stdout, ok.stderr
    (tmp_path / "signed.bin").write_bytes(vector(prefix + "signed.hex")[:-1] + b"\x00")
    bad = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert bad.returncode != 0


DOC_RECIPE = """
import msgpack
version, protected, payload, sig = msgpack.unpackb(bytes.fromhex(open("batch.hex").read()))
assert version == 1
open("signed.bin", "wb").write(msgpack.packb(["vitals/batch/v1", protected, payload]))
open("sig.bin", "wb").write(sig)
print(msgpack.unpackb(protected))
"""


@BATCH_VECTORS
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not on PATH")
def test_doc_recipe_verifies_the_vector(tmp_path: Path, prefix: str) -> None:
    """The shell recipe of docs/envelope.md, with this interpreter as python3."""
    shutil.copy(VECTORS / f"{prefix}batch.hex", tmp_path / "batch.hex")
    shutil.copy(VECTORS / "pub.pem", tmp_path)
    subprocess.run([sys.executable, "-c", DOC_RECIPE], cwd=tmp_path, check=True)
    assert (tmp_path / "signed.bin").read_bytes() == vector(prefix + "signed.hex")
    out = subprocess.run(
        [
            "openssl",
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            "pub.pem",
            "-rawin",
            "-in",
            "signed.bin",
            "-sigfile",
            "sig.bin",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
