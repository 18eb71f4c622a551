"""uni-api's `post_body_parameter_overrides`: fields a provider adds to, or removes from, the
JSON body it is sent, read once at load into steps, so a request costs a few dict updates.

As uni-api applies them: the provider-wide fields and `__remove__` first, then those under
the requested (public) model name; a mapping merges into a mapping already in the body, key
by key and as deep as both go; anything else replaces the field. The body is the one sent
to the vendor, after translation to its format. `stream` is never overridden: the gateway
reads the answer the way the client asked for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from core.config.reader import Section

KEY = "post_body_parameter_overrides"
REMOVE = "__remove__"
_KEPT = ("stream",)  # what the gateway decides itself


@dataclass(frozen=True, slots=True)
class OverrideStep:
    values: dict[str, Any]
    removals: tuple[str, ...] = ()

    def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        """A new body: the caller's (a request's, shared with billing) is never changed."""
        out = dict(body)
        for name, value in self.values.items():
            out[name] = _merged(out.get(name), value)
        for name in self.removals:
            out.pop(name, None)
        return out


@dataclass(frozen=True, slots=True)
class BodyOverrides:
    everything: tuple[OverrideStep, ...] = ()  # for a model without its own entry
    by_model: dict[str, tuple[OverrideStep, ...]] = field(default_factory=dict)  # public name: provider-wide step, then its own

    def apply(self, public_name: str, body: dict[str, Any]) -> dict[str, Any]:
        for step in self.by_model.get(public_name, self.everything):
            body = step.apply(body)
        return body


def _merged(current: Any, value: Any) -> Any:
    """`value` merged into `current` without changing either (both may be shared)."""
    if not (isinstance(current, dict) and isinstance(value, dict)):
        return value
    out = dict(current)
    for name, inner in value.items():
        out[name] = _merged(out.get(name), inner)
    return out


def read_body_overrides(prefs: Section, model_names: Iterable[str]) -> BodyOverrides | None:
    """The provider's overrides; `model_names` are its public model names, whose entries are
    per-model (any other entry is a field for every model, as in uni-api). None: there are none."""
    if not prefs.has(KEY):
        return None
    section = prefs.section(KEY)
    names = set(model_names)
    common = _step(section, lambda name: name not in names)
    by_model = {}
    for name in section.node:
        if str(name) not in names:
            continue
        if not isinstance(section.node[name], dict):
            section.warn(name, f"{section.where(str(name))} must be a mapping of fields for model '{name}'; it is ignored")
            continue
        own = _step(section.section(name), lambda _name: True)
        by_model[str(name)] = tuple(step for step in (common, own) if step is not None)
    everything = (common,) if common is not None else ()
    return BodyOverrides(everything, by_model) if everything or by_model else None


def _step(section: Section, wanted: Any) -> OverrideStep | None:
    values = {}
    for name, value in section.node.items():
        name = str(name)
        if name == REMOVE or not wanted(name):
            continue
        if name in _KEPT:
            section.warn(name, f"{section.where(name)} is ignored: the gateway streams as the client asked, and reads the answer that way")
            continue
        values[name] = _plain(value)
    removals = _removals(section)
    return OverrideStep(values, removals) if values or removals else None


def _removals(section: Section) -> tuple[str, ...]:
    """`__remove__`: a field name or a list of them (top-level fields of the body)."""
    raw = section.raw(REMOVE)
    if raw is None:
        return ()
    names = []
    for entry in raw if isinstance(raw, list) else [raw]:
        if not isinstance(entry, str):
            section.warn(REMOVE, f"{section.where(REMOVE)}: only field names are supported (uni-api's path rules are not) and {_kind(entry)} is ignored")
        elif entry.strip() in _KEPT:
            section.warn(REMOVE, f"{section.where(REMOVE)}: '{entry.strip()}' is ignored: the gateway streams as the client asked")
        elif entry.strip():
            names.append(entry.strip())
    return tuple(names)


def _kind(value: Any) -> str:
    return "a mapping" if isinstance(value, dict) else "a list" if isinstance(value, list) else f"'{value}'"


def _plain(value: Any) -> Any:
    """YAML's values as plain JSON ones (ruamel's located parse gives its own subclasses)."""
    if isinstance(value, dict):
        return {str(name): _plain(inner) for name, inner in value.items()}
    if isinstance(value, list):
        return [_plain(inner) for inner in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, date):
        return value.isoformat()
    return str(value)
