"""The packages import each other in one direction only:

    protocols <- drivers <- {agent, hub} <- simulator

Nothing outside simulator/ (and the tests, benches and bench rigs that drive it)
imports the simulator; agent and hub do not import each other, but for the one
lazy mount of ``vitals hub`` in agent/cli/main.py; protocols and drivers import neither.
Checked on the source (every import statement, at any depth), not by importing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# what each package may import of ours
ALLOWED = {
    "protocols": {"protocols"},
    "drivers": {"protocols", "drivers"},
    "agent": {"protocols", "drivers", "agent"},
    "hub": {"protocols", "drivers", "hub"},
}
OURS = {"protocols", "drivers", "agent", "hub", "simulator", "bench", "hil", "tests", "firmware"}
# (file, imported module): the only crossings, each a lazy import inside a function
EXCEPTIONS = {
    ("agent/cli/main.py", "hub.cli"),  # `vitals hub`, mounted lazily: `vitals run` never loads it
    ("agent/cli/main.py", "simulator"),  # `vitals demo` and `vitals sim ...`, lazily too
}


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module, line, top level) of every import of the file."""
    tree = ast.parse(path.read_text(), str(path))
    top = set(map(id, tree.body))
    out: list[tuple[str, int, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [node.module]
            if node.module in OURS:  # `from simulator import rtu`
                mods = [f"{node.module}.{a.name}" for a in node.names]
            out += [(m, node.lineno, id(node) in top) for m in mods]
    return out


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_layers_below(package: str) -> None:
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for module, line, top in _imports(path):
            root = module.split(".", 1)[0]
            if root not in OURS or root in ALLOWED[package]:
                continue
            if not top and any(
                rel == f and (module == m or module.startswith(m + ".")) for f, m in EXCEPTIONS
            ):
                continue
            wrong.append(f"{rel}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_a_crossing(tmp_path: Path) -> None:
    """The walk finds imports inside functions too (the lazy ones the rule is about)."""
    f = tmp_path / "x.py"
    f.write_text("import os\n\ndef f():\n    from simulator.hub import Hub\n    import hub.core\n")
    assert _imports(f) == [("os", 1, True), ("simulator.hub", 4, False), ("hub.core", 5, False)]


def test_vitals_run_does_not_import_the_hub() -> None:
    """The module `vitals run` loads (agent.cli, then agent.runner) pulls in no hub code."""
    import subprocess
    import sys

    code = (
        "import sys, agent.cli, agent.runner;"
        "print(sorted(m for m in sys.modules if m == 'hub' or m.startswith(('hub.', 'simulator'))))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


# -- one Modbus codec -------------------------------------------------------------------

# where Modbus bytes may be framed: the codec, and the firmware's own MicroPython slave
CODEC_HOMES = ("protocols/modbus/", "firmware/")
# the tests keep their own oracles (a bitwise CRC, frames written out by hand)
CODEC_SCANNED = ("agent", "bench", "drivers", "hil", "hub", "protocols", "simulator")
# struct formats of Modbus frames: the MBAP header (">HHHB", ">HHHBBHH", ...) and the
# request PDUs of functions 1-6 (">BHH") and 15, 16 (">BHHB...")
_FRAME_FORMATS = (">HHH", "!HHH", ">BHH", "!BHH")


def _codec_copies(path: Path, rel: str) -> list[str]:
    """Where ``path`` frames Modbus itself: a CRC-16/MODBUS, an RTU or MBAP encoder."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Constant) and node.value == 0xA001 and type(node.value) is int:
            found.append(f"{rel}:{line}: the CRC-16/MODBUS polynomial 0xA001")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.startswith(_FRAME_FORMATS):
                found.append(f"{rel}:{line}: a Modbus frame's struct format {node.value!r}")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if node.name.lower().lstrip("_").startswith("crc"):
                found.append(f"{rel}:{line}: a CRC function {node.name}()")
        elif isinstance(node, ast.Name | ast.Attribute) and isinstance(node.ctx, ast.Store):
            name = node.id if isinstance(node, ast.Name) else node.attr
            if "MBAP" in name.upper() or "CRC_TABLE" in name.upper():
                found.append(f"{rel}:{line}: a frame codec of its own ({name})")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            inner = node.func.value  # crc16(frame).to_bytes(2, "little"): an RTU frame by hand
            if node.func.attr == "to_bytes" and isinstance(inner, ast.Call):
                callee = inner.func
                name = callee.id if isinstance(callee, ast.Name) else getattr(callee, "attr", "")
                if "crc" in name.lower():
                    found.append(f"{rel}:{line}: an RTU frame built by hand ({name}(...))")
    return found


def test_one_modbus_codec() -> None:
    """No CRC-16/MODBUS, RTU frame or MBAP encoder outside protocols/modbus/ and firmware/:
    every master and slave (agent, diag, HIL, simulators) frames through the one codec."""
    copies = []
    for package in CODEC_SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if not rel.startswith(CODEC_HOMES):
                copies += _codec_copies(path, rel)
    assert not copies, "\n".join(copies)


def test_the_codec_check_sees_the_copies_there_were(tmp_path: Path) -> None:
    """The shapes of the copies the agent and the TCP simulator had before the codec."""
    f = tmp_path / "x.py"
    f.write_text(
        "import struct\n"
        '_MBAP = struct.Struct(">HHHB")\n'
        '_READ_FRAME = struct.Struct(">HHHBBHH")\n'
        "def read_pdu(fc, a, n):\n"
        '    return struct.pack(">BHH", fc, a, n)\n'
        "def frame(slave, pdu):\n"
        "    f = bytes([slave]) + pdu\n"
        '    return f + crc16(f).to_bytes(2, "little")\n'
        "def _crc_table():\n"
        "    return [(c >> 1) ^ 0xA001 for c in range(256)]\n"
    )
    found = _codec_copies(f, "x.py")
    assert sorted({int(s.split(":")[1]) for s in found}) == [2, 3, 5, 8, 9, 10], found
