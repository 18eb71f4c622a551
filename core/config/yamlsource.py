"""Read api.yaml into plain-ish nodes that still know their line numbers.

Validation errors must name file, line and reason, so we keep ruamel's round-trip nodes
(which carry positions) until the config is built, and expand `${VAR}` in place.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import SafeConstructor
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.resolver import VersionedResolver

from core.cooperate import cooperate

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """A config problem located in the source file: `file:line:column: reason` (1-based; the
    parts not known are left out)."""

    def __init__(self, file: str, line: int | None, reason: str, column: int | None = None):
        self.file = file
        self.line = line
        self.column = column if line else None
        self.reason = reason
        self.field: str | None = None  # the setting's dotted path, when a Section raised it
        self.warnings: tuple[ConfigWarning, ...] = ()  # those found before it (`--check-config` prints them)
        where = ":".join(str(part) for part in (file, line or None, self.column) if part is not None)
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True, slots=True)
class ConfigWarning:
    """Something the config says that loads but is not done as written (a uni-api option
    Tollgate ignores, a discovered model without a price): `file:line:column: reason`, kept
    with the config it was found in, logged and shown on the status page."""

    file: str
    line: int | None
    reason: str
    column: int | None = None

    def __str__(self) -> str:
        where = ":".join(str(part) for part in (self.file, self.line or None, self.column if self.line else None) if part is not None)
        return f"{where}: {self.reason}"


def warning_at(file: str, node: Any, key: Any, reason: str) -> ConfigWarning:
    """A ConfigWarning at `node[key]` (or at `node`), positioned like `error_at`."""
    line, column = position_of(node, key) or (None, None)
    return ConfigWarning(file, line, reason, column)


def error_at(file: str, node: Any, key: Any, reason: str) -> ConfigError:
    """A ConfigError at `node[key]` (or at `node`), with whatever position the parser recorded."""
    line, column = position_of(node, key) or (None, None)
    return ConfigError(file, line, reason, column)


def line_of(node: Any, key: Any = None) -> int | None:
    """1-based line of `node[key]` (or of `node` itself) when the YAML parser recorded it."""
    position = position_of(node, key)
    return position[0] if position else None


def position_of(node: Any, key: Any = None) -> tuple[int, int] | None:
    """1-based (line, column) of `node[key]`'s key or item (or of `node`), when recorded."""
    lc = getattr(node, "lc", None)
    if lc is None:
        return None
    try:
        if isinstance(node, CommentedMap) and key is not None and key in node:
            line, column = lc.key(key)
        elif isinstance(node, CommentedSeq) and isinstance(key, int) and 0 <= key < len(node):
            line, column = lc.item(key)
        else:
            line, column = lc.line, lc.col
        return int(line) + 1, int(column) + 1
    except (KeyError, TypeError, AttributeError):
        return None


class _OneVersionResolver(VersionedResolver):
    """ruamel's resolver, looking up the YAML version once per document instead of once per
    scalar. With the C parser that lookup always ends at the default version, through two
    caught AttributeErrors each time: a third of a 10,000-key parse (bench/reload_bench.py)."""

    _resolvers: Any = None

    @property
    def versioned_resolver(self) -> Any:
        cooperate()  # called for every scalar: where a reload in its thread gives way to the loop
        if self._resolvers is None:
            self._resolvers = VersionedResolver.versioned_resolver.fget(self)  # type: ignore[attr-defined]
        return self._resolvers


def parse_yaml(text: str, file: str, *, located: bool = True) -> Any:
    """Parse YAML text, turning parser errors into a located ConfigError.

    `located=False` tries the fast C loader first (plain dicts, no line numbers): about 5x
    faster on a 10,000-key file, so loads use it and re-parse with positions only to explain
    an error. libyaml is stricter than ruamel in places (it refuses the ':' of a timezone in
    `{created_at: 2024-01-01T00:00:00+08:00}`), so whatever it refuses goes to ruamel, whose
    answer is the one that counts: a tree, or the error to show.
    """
    if not located:
        try:
            return _load_fast(text)
        except (YAMLError, ValueError, TypeError, RecursionError):
            pass
    try:
        return YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        raise _syntax_error(exc, file) from None
    except YAMLError as exc:
        raise ConfigError(file, None, f"YAML error: {exc}") from None
    except (ValueError, TypeError, RecursionError) as exc:  # `!!int x`; nesting thousands deep
        raise ConfigError(file, None, f"YAML error: {exc or type(exc).__name__}") from None


def _syntax_error(exc: MarkedYAMLError, file: str) -> ConfigError:
    """Located where the mistake is. The parser often notices one on a later line than the
    one it is on (a key without its ':', an unclosed quote or bracket); it then names where
    the broken thing starts as its context, and that is the place to point at."""
    context, problem = exc.context_mark, exc.problem_mark
    starts_earlier = context is not None and problem is not None and problem.line > context.line
    at_start = starts_earlier and str(exc.context or "").startswith(("while scanning a", "while parsing a flow"))
    mark = context if at_start else (problem or context)
    reason = f"YAML syntax error: {_without_values(exc.problem) or exc.context or 'invalid YAML'}"
    if exc.problem and exc.context:
        since = f" that starts at line {context.line + 1}, column {context.column + 1}" if context is not None and mark is not context else ""
        reason += f" ({exc.context}{since})"
    if mark is None:
        return ConfigError(file, None, reason)
    return ConfigError(file, mark.line + 1, reason, mark.column + 1)


def _without_values(problem: str | None) -> str | None:
    """The parser's words without the values it quotes: a duplicate `api:` line would put
    both keys in the log, the config status, 409 answers and every admin page's banner.
    `found duplicate key "api" with value "sk-…" (original value: "sk-…")` keeps its first part."""
    if problem and problem.startswith(_DUPLICATE_KEY):
        return problem.split(_DUPLICATE_VALUE, 1)[0] + '"'
    return problem


_DUPLICATE_KEY, _DUPLICATE_VALUE = "found duplicate key ", '" with value "'


def _load_fast(text: str) -> Any:
    """`YAML(typ="safe", pure=False).load(text)`, done in its two steps so that the node tree
    in between is freed a node at a time. Left to `load`, the last reference to the tree of
    a 10,000-key file went in one C-level cascade: a 15 ms stretch in which the reload's
    thread kept the GIL and the event loop could not run (bench/reload_bench.py)."""
    yaml = YAML(typ="safe", pure=False)
    yaml.Resolver = _OneVersionResolver
    yaml.Constructor = _CooperativeConstructor
    constructor, parser = yaml.get_constructor_parser(text)
    try:
        node = parser.get_single_node()
        data = None if node is None else constructor.construct_document(node)
    finally:
        parser.dispose()
    if node is not None:
        _free_tree_in_pieces(node)
    return data


class _CooperativeConstructor(SafeConstructor):
    """The safe constructor, with a point per node where a reload gives way to the loop
    (construction is a quarter of a parse, and the resolver's point covers only composing)."""

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        cooperate()
        return super().construct_object(node, deep)


def _free_tree_in_pieces(root: Any) -> None:
    """Take a composed node tree apart in pieces of FREE_CHUNK subtrees (a 10,000-key list
    goes 64 keys at a time), giving the event loop its turns in between."""
    stack = [root]
    del root
    while stack:
        node = stack.pop()
        children = node.value
        if not isinstance(children, list):
            continue
        for child in children:  # long lists further down are taken apart the same way
            for sub in child if isinstance(child, tuple) else (child,):
                if isinstance(sub.value, list) and len(sub.value) > FREE_CHUNK:
                    stack.append(sub)
        node.value = None
        while children:
            del children[-FREE_CHUNK:]
            cooperate()


FREE_CHUNK = 64


def expand_env(node: Any, file: str, environ: Mapping[str, str] | None = None) -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string value, in place.

    An unset variable without a default is an error: silently sending an empty API key
    upstream is worse than refusing the config.
    """
    env = os.environ if environ is None else environ

    def expand(value: str, parent: Any, key: Any) -> str:
        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise error_at(file, parent, key, f"environment variable {name} is not set (use ${{{name}:-default}} for a default)")

        return _ENV_REF.sub(substitute, value)

    def walk(container: Any) -> None:
        items = container.items() if isinstance(container, dict) else enumerate(container)
        for key, value in list(items):
            if isinstance(value, str) and "${" in value:
                container[key] = expand(value, container, key)
            elif isinstance(value, (dict, list)):
                walk(value)

    if isinstance(node, (dict, list)):
        walk(node)
    return node
