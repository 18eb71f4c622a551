"""Edits to api.yaml made by the admin API: ruamel round-trip (comments, order and
formatting kept) and an atomic replace, so the watcher never sees a half-written file."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from core.yamlsource import expand_env


class ConfigWriteError(Exception):
    pass


def set_key_preference(path: Path, secret: str, name: str, value: Any) -> None:
    """Set `api_keys[<the key>].preferences.<name>` in the file at `path`."""
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    try:
        text = path.read_text(encoding="utf-8")
        tree = yaml.load(text)
    except Exception as exc:
        raise ConfigWriteError(f"cannot read {path}: {exc}") from exc
    entry = _find_key(tree, secret, str(path))
    prefs = entry.get("preferences")
    if not isinstance(prefs, dict):
        prefs = CommentedMap()
        entry["preferences"] = prefs
    prefs[name] = value
    out = io.StringIO()
    yaml.dump(tree, out)
    _atomic_write(path, out.getvalue())


def _find_key(tree: Any, secret: str, file: str) -> Any:
    for entry in (tree or {}).get("api_keys") or []:
        if not isinstance(entry, dict):
            continue
        api = entry.get("api")
        expanded = expand_env({"api": api}, file).get("api") if isinstance(api, str) and "${" in api else api
        if expanded == secret:
            return entry
    raise ConfigWriteError("the key is not in the config file")


def _atomic_write(path: Path, text: str) -> None:
    target = path.resolve()
    try:
        fd, tmp = tempfile.mkstemp(prefix=".api.yaml.", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            mode = target.stat().st_mode & 0o777
            os.chmod(tmp, mode)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise ConfigWriteError(f"cannot write {path}: {exc.strerror or exc}") from exc
