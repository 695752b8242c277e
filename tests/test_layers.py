"""The packages import each other in one direction only:

    protocols <- drivers <- {agent, hub} <- simulator

Nothing outside simulator/ (and the tests, benches and bench rigs that drive it)
imports the simulator; agent and hub do not import each other, but for the one
lazy mount of ``vitals hub`` in agent/cli.py; protocols and drivers import neither.
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
    ("agent/cli.py", "hub.cli"),  # `vitals hub`, mounted lazily: `vitals run` never loads it
    ("agent/cli.py", "simulator"),  # `vitals demo` and `vitals sim ...`, lazily too
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
