"""Walk parsed TOML and report every problem with its key path (private).

Both loaders (:mod:`drivers.profiles` and ``agent.ops.config``) read their tables
through a :class:`Table`. Each getter checks the type and the range of one key
and, instead of raising, records a problem at the key's path
(``devices[3].slave``) and returns a usable fallback, so the walk goes on and
*all* problems of a file are reported at once. :meth:`Table.finish` reports
the keys nobody asked for, with a did-you-mean suggestion.

Paths follow the file: ``uplink.tls.ca_file``, ``devices[0].slave`` (arrays of
tables are indexed from 0, in file order).
"""

from __future__ import annotations

import datetime
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar, overload

from protocols.errors import ConfigError

__all__ = [
    "Problems",
    "Table",
    "describe",
    "did_you_mean",
    "read_toml",
    "type_name",
]

_S = TypeVar("_S", bound=str)


class Problems:
    """The problems found in one file, each as ``(where, message)``."""

    def __init__(self, source: str) -> None:
        self.source = source  # the file as shown to the user
        self.items: list[tuple[str, str]] = []

    def add(self, key: str, message: str) -> None:
        """Record a problem at key path ``key`` ("" for the file itself)."""
        where = f"{self.source}: {key}" if key else self.source
        item = (where, message)
        if item not in self.items:
            self.items.append(item)

    def extend(self, items: Iterable[tuple[str, str]]) -> None:
        """Add problems found elsewhere (another file), keeping their ``where``."""
        for item in items:
            if item not in self.items:
                self.items.append(item)

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(self.items)


def type_name(value: object) -> str:
    """The TOML name of the type of a parsed value."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, list):
        return "array"
    if isinstance(value, datetime.datetime):
        return "datetime"
    if isinstance(value, datetime.date):
        return "date"
    if isinstance(value, datetime.time):
        return "time"
    return type(value).__name__


def describe(value: object) -> str:
    """``string '9600'``, ``integer 3``, ``table`` — for "expected X, got Y"."""
    name = type_name(value)
    if isinstance(value, dict | list):
        return name
    text = repr(value).replace("True", "true").replace("False", "false")
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{name} {text}"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or ``""``."""
    import difflib  # for a mistake only: not loaded by every start

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


_TOML_POS = re.compile(r"^(?P<msg>.*?)\s*\(at line (?P<line>\d+), column (?P<col>\d+)\)$")


def read_toml(path: Path, source: str) -> dict[str, object]:
    """Read and parse a TOML file, raising :class:`ConfigError` naming ``source``.

    A syntax error is reported as ``source:line:col``.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError([(source, "no such file")]) from exc
    except IsADirectoryError as exc:
        raise ConfigError([(source, "is a directory, not a TOML file")]) from exc
    except PermissionError as exc:
        raise ConfigError([(source, "cannot read the file: permission denied")]) from exc
    except OSError as exc:
        raise ConfigError([(source, f"cannot read the file: {exc.strerror or exc}")]) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([(source, f"not UTF-8 text (bad byte at offset {exc.start})")]) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = _TOML_POS.match(str(exc))
        if m is None:
            raise ConfigError([(source, f"TOML syntax error: {exc}")]) from exc
        where = f"{source}:{m['line']}:{m['col']}"
        raise ConfigError([(where, f"TOML syntax error: {m['msg']}")]) from exc


class Table:
    """One TOML table being read; every getter records its own problems.

    Getters return the value when it is valid, else ``default`` (and a problem
    is recorded when the key is required or the value is wrong).
    """

    def __init__(
        self, problems: Problems, path: str, data: Mapping[str, object], *, absent: bool = False
    ) -> None:
        self.problems = problems
        self.path = path
        self.data = data
        self.absent = absent  # stands in for a missing or broken table: no "missing key"
        self._known: set[str] = set()

    # -- helpers ---------------------------------------------------------------

    def key(self, key: str) -> str:
        """The full path of ``key`` in this table."""
        return f"{self.path}.{key}" if self.path else key

    def add(self, key: str, message: str) -> None:
        """Record a problem at ``key`` of this table ("" = the table itself)."""
        self.problems.add(self.key(key) if key else self.path, message)

    def known(self, *keys: str) -> None:
        """Declare keys as part of the schema without reading them."""
        self._known.update(keys)

    def present(self, key: str) -> bool:
        return key in self.data

    def _fetch(self, key: str, required: bool) -> object | None:
        self._known.add(key)
        if key not in self.data:
            if required and not self.absent:
                self.add(key, "missing required key")
            return None
        return self.data[key]

    def _wrong_type(self, key: str, expected: str, value: object) -> None:
        self.add(key, f"expected {expected}, got {describe(value)}")

    # -- scalars ---------------------------------------------------------------

    def get_str(
        self,
        key: str,
        default: str = "",
        *,
        required: bool = False,
        pattern: re.Pattern[str] | None = None,
        pattern_help: str = "",
        choices: Sequence[str] | None = None,
        what: str = "",
        max_len: int | None = None,
        nonempty: bool = False,
    ) -> str:
        value = self._fetch(key, required)
        if value is None:
            return default
        if not isinstance(value, str):
            self._wrong_type(key, "string", value)
            return default
        if choices is not None and value not in choices:
            label = f"{what} " if what else ""
            self.add(
                key,
                f"unknown {label}'{value}'{did_you_mean(value, choices)}; "
                f"expected one of: {', '.join(choices)}",
            )
            return default
        if nonempty and not value:
            self.add(key, "must not be empty")
            return default
        if max_len is not None and len(value) > max_len:
            self.add(key, f"too long: {len(value)} characters, at most {max_len}")
            return default
        if pattern is not None and not pattern.fullmatch(value):
            self.add(key, f"invalid value '{value}': {pattern_help or pattern.pattern}")
            return default
        return value

    @overload
    def get_choice(self, key: str, choices: Sequence[_S], default: _S, *, what: str = "") -> _S: ...

    @overload
    def get_choice(
        self,
        key: str,
        choices: Sequence[_S],
        default: None = None,
        *,
        required: bool = False,
        what: str = "",
    ) -> _S | None: ...

    def get_choice(
        self,
        key: str,
        choices: Sequence[_S],
        default: _S | None = None,
        *,
        required: bool = False,
        what: str = "",
    ) -> _S | None:
        """One of ``choices``, typed as they are (a ``Literal`` kind stays one):
        ``default`` when the key is absent or (a problem recorded) none of them."""
        value = self.get_str(key, required=required, choices=choices, what=what)
        return next((c for c in choices if c == value), default)

    def get_int(
        self,
        key: str,
        default: int = 0,
        *,
        required: bool = False,
        lo: int | None = None,
        hi: int | None = None,
        choices: Sequence[int] | None = None,
    ) -> int:
        value = self._fetch(key, required)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self._wrong_type(key, "integer", value)
            return default
        if choices is not None and value not in choices:
            allowed = " or ".join(str(c) for c in choices)
            self.add(key, f"value {value} not allowed; expected {allowed}")
            return default
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            self.add(key, f"value {value} out of range {_range(lo, hi)}")
            return default
        return value

    def get_float(
        self,
        key: str,
        default: float = 0.0,
        *,
        required: bool = False,
        lo: float | None = None,
        hi: float | None = None,
    ) -> float:
        value = self.opt_float(key, required=required, lo=lo, hi=hi)
        return default if value is None else value

    def opt_float(
        self,
        key: str,
        *,
        required: bool = False,
        lo: float | None = None,
        hi: float | None = None,
    ) -> float | None:
        """A number (integer or float), or ``None`` when absent or invalid."""
        value = self._fetch(key, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self._wrong_type(key, "number", value)
            return None
        number = float(value)
        if number != number or number in (float("inf"), float("-inf")):
            self.add(key, f"value {value} is not a finite number")
            return None
        if (lo is not None and number < lo) or (hi is not None and number > hi):
            self.add(key, f"value {value} out of range {_range(lo, hi)}")
            return None
        return number

    def get_bool(self, key: str, default: bool = False, *, required: bool = False) -> bool:
        value = self._fetch(key, required)
        if value is None:
            return default
        if not isinstance(value, bool):
            self._wrong_type(key, "boolean (true or false)", value)
            return default
        return value

    # -- containers ------------------------------------------------------------

    def get_list(self, key: str, *, required: bool = False) -> list[object]:
        value = self._fetch(key, required)
        if value is None:
            return []
        if not isinstance(value, list):
            self._wrong_type(key, "array", value)
            return []
        return value

    def get_str_list(self, key: str) -> list[tuple[str, str]]:
        """An array of strings, as ``(path, value)`` pairs (bad items reported)."""
        out: list[tuple[str, str]] = []
        for i, item in enumerate(self.get_list(key)):
            if isinstance(item, str):
                out.append((f"{key}[{i}]", item))
            else:
                self._wrong_type(f"{key}[{i}]", "string", item)
        return out

    def get_table(self, key: str, *, required: bool = False) -> Table:
        """A sub-table; an absent or mistyped one reads as empty."""
        value = self._fetch(key, False)
        if value is None:
            if required and not self.absent:
                self.add(key, f"missing required table [{self.key(key)}]")
            return Table(self.problems, self.key(key), {}, absent=required)
        if not isinstance(value, dict):
            self._wrong_type(key, "table", value)
            return Table(self.problems, self.key(key), {}, absent=True)
        return Table(self.problems, self.key(key), value)

    def get_tables(self, key: str, *, required: bool = False) -> list[Table]:
        """An array of tables (``[[key]]``)."""
        value = self._fetch(key, False)
        if value is None:
            if required:
                self.add(key, f"missing required array of tables [[{self.key(key)}]]")
            return []
        if not isinstance(value, list):
            self._wrong_type(key, f"array of tables [[{self.key(key)}]]", value)
            return []
        out: list[Table] = []
        for i, item in enumerate(value):
            path = f"{self.key(key)}[{i}]"
            if isinstance(item, dict):
                out.append(Table(self.problems, path, item))
            else:
                self.problems.add(path, f"expected table, got {describe(item)}")
        return out

    def finish(self) -> None:
        """Report every key of this table that no getter asked for."""
        for key in self.data:
            if key not in self._known:
                self.add(key, f"unknown key{did_you_mean(key, sorted(self._known))}")


def _range(lo: float | None, hi: float | None) -> str:
    if lo is None:
        return f"..{hi}"
    if hi is None:
        return f"{lo}.."
    return f"{lo}..{hi}"
