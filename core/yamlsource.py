"""Read api.yaml into plain-ish nodes that still know their line numbers.

Validation errors must name file, line and reason, so we keep ruamel's round-trip nodes
(which carry positions) until the config is built, and expand `${VAR}` in place.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import SafeConstructor
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.resolver import VersionedResolver

from core.cooperate import cooperate

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """A config problem located in the source file: `file:line: reason`."""

    def __init__(self, file: str, line: int | None, reason: str):
        self.file = file
        self.line = line
        self.reason = reason
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {reason}")


def line_of(node: Any, key: Any = None) -> int | None:
    """1-based line of `node[key]` (or of `node` itself) when the YAML parser recorded it."""
    lc = getattr(node, "lc", None)
    if lc is None:
        return None
    try:
        if isinstance(node, CommentedMap) and key is not None and key in node:
            return int(lc.key(key)[0]) + 1
        if isinstance(node, CommentedSeq) and isinstance(key, int) and 0 <= key < len(node):
            return int(lc.item(key)[0]) + 1
        return int(lc.line) + 1
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
        except YAMLError:
            pass
    try:
        return YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        reason = " ".join(part for part in (exc.context, exc.problem) if part) or "invalid YAML"
        raise ConfigError(file, line, f"YAML syntax error: {reason}") from None
    except YAMLError as exc:
        raise ConfigError(file, None, f"YAML error: {exc}") from None


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
            raise ConfigError(file, line_of(parent, key), f"environment variable {name} is not set (use ${{{name}:-default}} for a default)")

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
