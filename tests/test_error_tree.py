"""One exception tree (protocols/errors.py): every public error class of vitals is a VitalsError.

A caller that catches :class:`~protocols.errors.VitalsError` (the runner, the
CLI's one-line error printer) must not see a traceback from a class of ours
that was left outside. Private classes (``_Name``) are control flow inside one
function and never leave it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from collections import Counter
from pathlib import Path

from protocols.errors import LocalError, VitalsError

PACKAGES = ("protocols", "drivers", "agent", "hub")


def _error_classes() -> list[type[BaseException]]:
    found: list[type[BaseException]] = []
    for name in PACKAGES:
        package = importlib.import_module(name)
        for info in pkgutil.walk_packages(package.__path__, f"{name}."):
            if info.name.endswith("__main__"):
                continue  # the entry point runs on import
            module = importlib.import_module(info.name)
            found += [
                obj
                for obj in vars(module).values()
                if inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == module.__name__
            ]
    return found


def test_every_public_error_class_is_a_vitals_error() -> None:
    classes = _error_classes()
    assert len(classes) > 20  # the walk found the tree
    outside = [
        f"{c.__module__}.{c.__qualname__}"
        for c in classes
        if not c.__name__.startswith("_") and not issubclass(c, VitalsError)
    ]
    assert not outside, f"outside the tree (protocols/errors.py): {outside}"


def test_the_cli_errors_joined_the_tree() -> None:
    from agent.cli.diag._common import DiagError
    from agent.cli.diag._serial import SettingRefused
    from agent.ops.status import StatusUnavailable

    assert issubclass(DiagError, VitalsError)
    assert issubclass(StatusUnavailable, LocalError)
    assert issubclass(SettingRefused, LocalError)


# A builtin raised where the tree has a place hides the cause from `except VitalsError`.
# Allowed: what a Python protocol prescribes (pickle refuses with TypeError).
BUILTINS = frozenset({"ValueError", "RuntimeError", "TypeError", "KeyError", "PermissionError"})
ALLOWED_BUILTIN_RAISES = {"protocols/ed25519.py": 1}  # __reduce__: a private key is not pickled
SCANNED = (
    "protocols",
    "drivers",
    "hub",
    "agent/ops/metrics.py",
    "agent/ops/health.py",
    "agent/ops/status.py",
)


def _builtin_raises(root: Path) -> Counter[str]:
    found: Counter[str] = Counter()
    for name in SCANNED:
        path = root / name
        for file in [path] if path.is_file() else sorted(path.rglob("*.py")):
            rel = file.relative_to(root).as_posix()
            for node in ast.walk(ast.parse(file.read_text(), rel)):
                exc = node.exc if isinstance(node, ast.Raise) else None
                if isinstance(exc, ast.Call):
                    exc = exc.func
                if isinstance(exc, ast.Name) and exc.id in BUILTINS:
                    found[rel] += 1
    return found


def test_no_builtin_raise_where_the_tree_has_a_place() -> None:
    found = _builtin_raises(Path(__file__).resolve().parent.parent)
    over = {f: n for f, n in found.items() if n > ALLOWED_BUILTIN_RAISES.get(f, 0)}
    assert not over, f"raise an error of protocols/errors.py instead: {over}"


def test_the_scan_sees_a_builtin_raise(tmp_path: Path) -> None:
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "x.py").write_text("def f():\n    raise ValueError('no')\n")
    assert _builtin_raises(tmp_path) == Counter({"hub/x.py": 1})
