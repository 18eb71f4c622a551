"""Edits to api.yaml made by the admin API: the one value changes in the file's own text.

A round trip through ruamel (load, set, dump) re-indented every list, moved comment columns
and wrapped long flow mappings: one changed word became a 40-68 line diff. So the file is
parsed only to find the value: composed nodes carry exact start and end offsets in the text
(`.lc` on a loaded tree gives a start but no end). That span is replaced, or one line or one
flow entry inserted; every other byte stays. The result is parsed again to check that only
that value changed, then replaces the file atomically (the watcher never sees half a file).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from core.config.yamlsource import ConfigError, expand_env, parse_yaml

NULL_TAG = "tag:yaml.org,2002:null"
BOM = "\ufeff"
_SPACES_BEFORE_COMMENT = re.compile(r"( +)#")


class ConfigWriteError(Exception):
    """The file could not be changed (it can still be read: a broken one raises ConfigError)."""


class ConfigChangedError(ConfigWriteError):
    """Someone else (an editor, say) saved the file while this edit was being made."""


def set_key_preference(path: Path, secret: str, name: str, value: str) -> None:
    """Set `api_keys[<the key>].preferences.<name>` to the plain word `value` in the file at
    `path`. Raises ConfigError (located) if the file does not parse, ConfigWriteError else."""
    file = str(path)
    original = _read(path)
    # libyaml's offsets do not count a leading byte order mark: edit the text after it.
    bom = BOM if original.startswith(BOM) else ""
    text = original[len(bom) :]
    index, entry = _find_key(_compose(text, file), secret, file)
    edited = _with_preference(text, entry, name, value)
    _check_only_that_changed(text, edited, index, name, value, file)
    replace_text(path, original, bom + edited)


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")  # bytes, so that "\r\n" line ends stay as they are
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigWriteError(f"cannot read {path}: {exc}") from exc


def _compose(text: str, file: str) -> Node:
    """The node tree, with offsets: libyaml's fast composer, else ruamel's (which reads some
    YAML libyaml refuses), else ruamel's located error."""
    for yaml in (YAML(typ="safe", pure=False), YAML(typ="rt")):
        try:
            root = yaml.compose(text)
        except (YAMLError, ValueError, TypeError, RecursionError):
            continue
        if root is not None:
            return root
    parse_yaml(text, file)  # raises the error where it is
    raise ConfigWriteError("the config file is empty")


def _find_key(root: Node, secret: str, file: str) -> tuple[int, MappingNode]:
    keys = _value(root, "api_keys")
    for index, entry in enumerate(keys.value if isinstance(keys, SequenceNode) else []):
        api = _value(entry, "api")
        if not isinstance(api, ScalarNode):
            continue
        presented = expand_env({"api": api.value}, file)["api"] if "${" in api.value else api.value
        if presented == secret:
            return index, entry
    raise ConfigWriteError("the key is not in the config file")


def _pair(mapping: Node, name: str) -> tuple[Node, Node] | None:
    if not isinstance(mapping, MappingNode):
        return None
    found = [(key, value) for key, value in mapping.value if isinstance(key, ScalarNode) and key.value == name]
    return found[-1] if found else None


def _value(mapping: Node, name: str) -> Node | None:
    pair = _pair(mapping, name)
    return pair[1] if pair else None


def _with_preference(text: str, entry: MappingNode, name: str, value: str) -> str:
    """`text` with `preferences.<name>: value` set in `entry`: the value's span replaced, or
    one pair inserted (the whole `preferences` mapping, in flow style, when there is none)."""
    prefs = _pair(entry, "preferences")
    if prefs is None:
        return _insert_pair(text, entry, "preferences", f"{{{name}: {value}}}")
    prefs_key, prefs_node = prefs
    _require_inside(entry, prefs_node)
    if isinstance(prefs_node, MappingNode):
        current = _pair(prefs_node, name)
        if current is None:
            return _insert_pair(text, prefs_node, name, value)
        key, node = current
        _require_inside(entry, node)
        return _set_scalar(text, key, node, value)
    if isinstance(prefs_node, ScalarNode) and prefs_node.tag == NULL_TAG:  # `preferences:` left empty
        return _set_scalar(text, prefs_key, prefs_node, f"{{{name}: {value}}}")
    raise ConfigWriteError("this key's preferences are not a mapping")


def _require_inside(entry: Node, node: Node) -> None:
    """A node written elsewhere and reached through an alias (`*shared`) is not this key's alone."""
    if not entry.start_mark.index <= node.start_mark.index < entry.end_mark.index:
        raise ConfigWriteError("this key's preferences come from a YAML alias shared with others; change them in the file by hand")


def _set_scalar(text: str, key: Node, node: Node, value: str) -> str:
    """Replace the scalar `node` (the value of `key`) with `value`, in its quotes if it had them."""
    if not isinstance(node, ScalarNode):
        raise ConfigWriteError("the current value is not a single word")
    start, end = node.start_mark.index, node.end_mark.index
    if start == end:  # an empty value: it goes right after the key's ':'
        start = end = text.index(":", key.end_mark.index) + 1
        value = " " + value
    elif node.style in ("'", '"'):
        value = f"{node.style}{value}{node.style}"
    return _replace(text, start, end, value)


def _replace(text: str, start: int, end: int, new: str) -> str:
    """Replace text[start:end], keeping a comment that follows on the line at its column."""
    after = end
    spaces = _SPACES_BEFORE_COMMENT.match(text, end)
    if spaces:
        width = len(spaces.group(1)) - (len(new) - (end - start))
        new += " " * max(1, width)
        after = spaces.end(1)
    return text[:start] + new + text[after:]


def _insert_pair(text: str, mapping: MappingNode, name: str, value: str) -> str:
    """Insert `name: value` into `mapping`: a first flow entry, or a line of its own at the
    indentation of the mapping's keys."""
    pair = f"{name}: {value}"
    if mapping.flow_style:
        if not mapping.value:
            return _replace(text, mapping.start_mark.index + 1, mapping.start_mark.index + 1, pair)
        return _replace(text, mapping.value[0][0].start_mark.index, mapping.value[0][0].start_mark.index, pair + ", ")
    newline = "\r\n" if "\r\n" in text else "\n"
    for key, _ in mapping.value:  # before the first key that starts its own line (not the `- api:` one)
        line_start = key.start_mark.index - key.start_mark.column
        if not text[line_start : key.start_mark.index].strip():
            return text[:line_start] + " " * key.start_mark.column + pair + newline + text[line_start:]
    first_key, last_value = mapping.value[0][0], mapping.value[-1][1]
    if not isinstance(last_value, ScalarNode):
        raise ConfigWriteError("cannot tell where to add a line to this key's entry")
    line_end = text.find("\n", last_value.end_mark.index)
    if line_end < 0:  # the last line, without its newline: it gets one (a line diff shows it as changed too)
        return text + newline + " " * first_key.start_mark.column + pair + newline
    return text[: line_end + 1] + " " * first_key.start_mark.column + pair + newline + text[line_end + 1 :]


def _check_only_that_changed(before: str, after: str, index: int, name: str, value: str, file: str) -> None:
    """Parse the edited text and compare it with the original plus the one change: an edit
    that reached further (through an anchor another key aliases, say) is not written."""
    try:
        edited = _unshared(parse_yaml(after, file, located=False))
    except ConfigError as exc:
        raise ConfigWriteError(f"the edited file would not parse ({exc}); it was not written") from None
    expected = _unshared(parse_yaml(before, file, located=False))
    entry = expected["api_keys"][index]
    entry["preferences"] = {**(entry.get("preferences") or {}), name: value}
    if edited != expected:
        raise ConfigWriteError(f"setting {name} would change more than this key's {name} (is it shared through a YAML anchor?); change it in the file by hand")


def _unshared(node: Any) -> Any:
    """A copy in which no two places share a mapping or list (YAML aliases do)."""
    if isinstance(node, dict):
        return {key: _unshared(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_unshared(item) for item in node]
    return node


def replace_text(path: Path, before: str, after: str) -> None:
    """Replace the file's text `before` with `after` atomically (the watcher never sees half a
    file). Raises ConfigChangedError, writing nothing, if the file no longer holds `before`:
    an operator who saved it meanwhile would otherwise lose their change without a word."""
    target = path.resolve()
    try:
        fd, tmp = tempfile.mkstemp(prefix=".api.yaml.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(after.encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
            mode = target.stat().st_mode & 0o777
            os.chmod(tmp, mode)
            if _read(path) != before:  # as late as can be: only a save in the last instant slips by
                raise ConfigChangedError(f"{path.name} changed while it was being edited; try again")
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise ConfigWriteError(f"cannot write {path}: {exc.strerror or exc}") from exc
