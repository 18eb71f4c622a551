"""Typed, located reads from YAML mappings: every wrong value becomes `file:line:column: reason`."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import date
from decimal import Decimal, InvalidOperation
from typing import Any

from core.config.yamlsource import ConfigError, ConfigWarning, error_at, line_of, position_of, warning_at

_MISSING = object()
# Every number in the config is at most this: counts, tokens, USD, seconds. Past 2**64 JSON
# encoders refuse an integer (every admin endpoint answered 500); past 2**53, JavaScript
# clients read a neighbour. 10^15 tokens or dollars is far beyond any real budget.
MAX_NUMBER = 10**15
MAX_NUMBER_TEXT = f"{MAX_NUMBER} (10^15)"

# Where `Section.warn` puts its warnings while a config is being built (None: nobody collects,
# as when the keys API validates one entry). A context variable, because reloads build
# configs in a worker thread while the loop may build another for `--check-config` or a test.
_warnings: ContextVar[list[ConfigWarning] | None] = ContextVar("config_warnings", default=None)


@contextmanager
def collecting_warnings() -> Iterator[list[ConfigWarning]]:
    """Collect the warnings of the config built inside the block, in the order found."""
    found: list[ConfigWarning] = []
    token = _warnings.set(found)
    try:
        yield found
    finally:
        _warnings.reset(token)


def warn(warning: ConfigWarning) -> None:
    """Record a warning for the config being built (dropped when nobody collects)."""
    sink = _warnings.get()
    if sink is not None:
        sink.append(warning)


class Section:
    """One YAML mapping being read, with a dotted path for messages (`providers[0].preferences`)."""

    def __init__(self, node: Any, file: str, path: str, parent: Any = None, key: Any = None):
        self.file = file
        self.path = path
        if node is None:
            node = {}
        if not isinstance(node, dict):
            holder, at = (parent, key) if position_of(parent, key) else (node, None)
            # A string list entry (`- sk-live-…` under api_keys) is likely a key: never quoted.
            got = "a string (not shown: it may be a key)" if isinstance(node, str) and path.endswith("]") else _kind(node)
            error = error_at(file, holder, at, f"{path} must be a mapping, got {got}")
            error.field = path
            raise error
        self.node = node

    def error(self, key: Any, reason: str) -> ConfigError:
        error = error_at(self.file, self.node, key, reason)
        error.field = self.where(str(key)) if key is not None else self.path  # the keys API names it as `param`
        return error

    def warn(self, key: Any, reason: str) -> None:
        """A warning at `key` (or at this mapping): the config loads, and says so."""
        warn(warning_at(self.file, self.node, key, reason))

    def warn_at(self, holder: Any, at: Any, reason: str) -> None:
        """A warning at `holder[at]`: a list item below this mapping."""
        warn(warning_at(self.file, holder, at, reason))

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def line(self, key: Any = None) -> int | None:
        return line_of(self.node, key)

    def reject_unknown(self, known: Iterable[str], also_allowed: Iterable[str] = ()) -> None:
        """An error for the first key not `known` (suggesting the nearest known one); keys in
        `also_allowed` pass without being suggested (uni-api's options, warned about)."""
        known = list(known)
        passed = frozenset(also_allowed)
        for key in self.node:
            if key not in known and key not in passed:
                hint = difflib.get_close_matches(str(key), known, n=1)
                suffix = f" (did you mean '{hint[0]}'?)" if hint else f" (known: {', '.join(known)})"
                raise self.error(key, f"unknown key '{key}' in {self.path or 'the top level'}{suffix}")

    def has(self, key: str) -> bool:
        return key in self.node and self.node[key] is not None

    def raw(self, key: str, default: Any = None) -> Any:
        value = self.node.get(key)
        return default if value is None else value

    def section(self, key: str) -> Section:
        return Section(self.node.get(key), self.file, self.where(key), self.node, key)

    def string(self, key: str, default: Any = _MISSING) -> str:
        value = self._get(key, default)
        if isinstance(value, date):  # YAML reads an unquoted 2024-06-01 as a date
            value = value.isoformat()
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.error(key, f"{self.where(key)} must be a string, got {_kind(value)}")
        text = str(value).strip()
        if not text:
            raise self.error(key, f"{self.where(key)} must not be empty")
        return text

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        value = self._get(key, default)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise self.error(key, f"{self.where(key)} must be true or false, got {_kind(value)}")

    def number(self, key: str, default: Any = _MISSING, *, minimum: Decimal | int | None = 0, allow_equal: bool = True) -> Decimal:
        """An exact number (Decimal, never float) with an optional lower bound."""
        value = self._get(key, default)
        return to_decimal(value, self, key, minimum=minimum, allow_equal=allow_equal)

    def integer(self, key: str, default: Any = _MISSING, *, minimum: int | None = 0) -> int:
        number = self.number(key, default, minimum=minimum)
        if number != number.to_integral_value():
            raise self.error(key, f"{self.where(key)} must be a whole number, got {number}")
        return int(number)

    def choice(self, key: str, choices: Iterable[str], default: Any = _MISSING) -> str:
        choices = list(choices)
        value = self.string(key, default)
        if value not in choices:
            raise self.error(key, f"{self.where(key)} must be one of {', '.join(choices)}; got '{value}'")
        return value

    def _get(self, key: str, default: Any) -> Any:
        value = self.node.get(key)
        if value is None:
            if default is _MISSING:
                error = error_at(self.file, self.node, None, f"{self.where(key)} is required")
                error.field = self.where(key)
                raise error
            return default
        return value


def to_decimal(value: Any, section: Section, key: Any, *, minimum: Decimal | int | None = 0, allow_equal: bool = True) -> Decimal:
    where = section.where(str(key))
    if isinstance(value, bool):
        raise section.error(key, f"{where} must be a number, got a boolean")
    try:
        number = value if isinstance(value, Decimal) else Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        raise section.error(key, f"{where} must be a number, got '{value}'") from None
    if not number.is_finite():
        raise section.error(key, f"{where} must be a finite number, got '{value}'")
    if minimum is not None and (number < minimum or (number == minimum and not allow_equal)):
        bound = f">= {minimum}" if allow_equal else f"> {minimum}"
        raise section.error(key, f"{where} must be {bound}, got {number}")
    if abs(number) > MAX_NUMBER:
        raise section.error(key, f"{where} must be at most {MAX_NUMBER_TEXT}, got {number}")
    return number


def items_of(section: Section, key: str) -> list[tuple[Any, Any]]:
    """The (index, item) pairs of a list value; an absent list is empty."""
    value = section.node.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise section.error(key, f"{section.where(key)} must be a list, got {_kind(value)}")
    return list(enumerate(value))


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, (int, float, Decimal)):
        return f"the number {value}"
    return f"'{value}'"
