"""The docs name files that exist: a reader who opens `agent/pipeline/spool.py` or
`protocols/modbus/` because a page said so finds it (the code moved into rooms in
issue 20; a page left behind would send an installer or a developer nowhere).

docs/decisions.md is history (a decision names the files of its day, some since
deleted) and is left out.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOPS = (
    "protocols",
    "drivers",
    "agent",
    "hub",
    "simulator",
    "bench",
    "hil",
    "tests",
    "firmware",
    "docs",
    ".ci",
)
_TOP = "|".join(map(re.escape, TOPS))
REF = re.compile(rf"(?<![\w/.-])((?:{_TOP})/[\w./*-]*[\w*/])")
PAGES = [ROOT / "README.md", ROOT / "bench" / "README.md"] + [
    p for p in sorted((ROOT / "docs").glob("*.md")) if p.name != "decisions.md"
]


def refs(page: Path) -> list[tuple[int, str]]:
    out = []
    for n, line in enumerate(page.read_text().splitlines(), 1):
        for m in REF.finditer(line):
            out.append((n, m.group(1).rstrip(".")))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_file_a_page_names_exists(page: Path) -> None:
    missing = [
        f"{page.relative_to(ROOT)}:{n}: {ref}"
        for n, ref in refs(page)
        if not (list(ROOT.glob(ref)) if "*" in ref else (ROOT / ref).exists())
    ]
    assert not missing, "\n".join(missing)


def test_the_check_sees_a_missing_file(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "see `agent/transport.py` and agent/fieldbus/links.py, `tests/test_fault_*.py`\n"
    )
    found = [ref for _, ref in refs(page)]
    assert found == ["agent/transport.py", "agent/fieldbus/links.py", "tests/test_fault_*.py"]
    assert not (ROOT / found[0]).exists() and (ROOT / found[1]).exists()
    assert list(ROOT.glob(found[2]))


def test_architecture_lists_the_files_of_a_readings_path() -> None:
    """docs/architecture.md's table of the path: at most eight files (issue 20), numbered,
    each real, and no glue: agent/service.py wires the tasks, it does not carry the
    reading (tests/test_service.py checks the wiring)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| (\d+) \| `([\w/.]+)` \|", text, re.M)
    assert 1 <= len(rows) <= 8, rows
    assert [int(n) for n, _ in rows] == list(range(1, len(rows) + 1))
    paths = [path for _, path in rows]
    assert len(set(paths)) == len(paths), paths
    assert "agent/service.py" not in paths
    for path in paths:
        assert (ROOT / path).is_file(), path
