"""One exception tree (protocols/errors.py): every public error class of vitals is a VitalsError.

A caller that catches :class:`~protocols.errors.VitalsError` (the runner, the
CLI's one-line error printer) must not see a traceback from a class of ours
that was left outside. Private classes (``_Name``) are control flow inside one
function and never leave it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

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
    from agent.diag._common import DiagError
    from agent.diag._serial import SettingRefused
    from agent.status import StatusUnavailable

    assert issubclass(DiagError, VitalsError)
    assert issubclass(StatusUnavailable, LocalError)
    assert issubclass(SettingRefused, LocalError)
