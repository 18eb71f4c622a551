"""The key forms of the admin pages, turned into what the keys API takes: a new key's entry and
a JSON merge patch of a key's settings (core/keys/admin.py validates and applies both). Text
becomes JSON values as routes/_forms.py says, for the account forms too.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from core.config import ApiKey
from core.errors import bad_request
from core.timeutil import to_unix
from routes._forms import form_number, form_text, preference_texts
from routes._http import whole_number

# The settings the forms edit: top-level fields of the entry, then its preferences.
TOP_FIELDS = ("name", "model")
PREFERENCE_FIELDS = ("billing_mode", "credits", "count_credits", "quota", "quota_type", "rate_limit", "concurrency_limit", "expires_at")
NUMBER_FIELDS = frozenset({"credits", "count_credits", "quota", "concurrency_limit"})
# What the edit form changes (the billing mode has its own form: it may be written to api.yaml).
EDIT_FIELDS = ("name", "model", *(name for name in PREFERENCE_FIELDS if name != "billing_mode"))
DEFAULTS = {"billing_mode": "", "quota_type": "tokens"}  # no mode: token, or a key's account's
EXPIRY_FORMAT = "%Y-%m-%dT%H:%M"  # what <input type="datetime-local"> shows and sends (UTC here)


def new_key_entry(form: dict[str, str]) -> dict[str, Any]:
    """The entry POST /v1/api_keys would take for the new key form; empty fields are left out.

    The form's one-time token names the key's id, so submitting the same form twice (a reload
    of the page that showed the secret) finds the key made the first time instead of a twin."""
    entry: dict[str, Any] = {}
    for name in (*TOP_FIELDS, *PREFERENCE_FIELDS):
        text = form.get(name, "").strip()
        if text:
            _place(entry, name, _typed(name, text))
    preferences = entry.get("preferences", {})
    if "quota" not in preferences:  # the select always sends a type; without a quota it means nothing
        preferences.pop("quota_type", None)
    if not preferences:
        entry.pop("preferences", None)
    if form.get("account", "").strip():  # the account whose balance it draws on
        entry["account"] = form["account"].strip()
    if form.get("idempotency_key"):
        entry["id"] = form_key_id(form["idempotency_key"])
    return entry


def form_key_id(token: str) -> str:
    """The id of the key a new key form with this one-time token makes (like generated ids)."""
    return "key_" + hashlib.sha256(token.encode()).hexdigest()[:16]


def settings_patch(key: ApiKey, form: dict[str, str]) -> dict[str, Any]:
    """The merge patch for the edit form: only the fields changed from what the form showed
    (so a stale form does not undo other changes); an emptied field removes the setting."""
    shown = settings_values(key)
    patch: dict[str, Any] = {}
    for name in EDIT_FIELDS:
        if name not in form:
            continue
        text = form[name].strip()
        if not _changed(name, text, shown[name], key):
            continue
        _place(patch, name, _typed(name, text) if text else None)
    return patch


def settings_values(key: ApiKey) -> dict[str, str]:
    """The key's settings as the forms show them (the entry as written, merged with API changes)."""
    values = preference_texts(key.entry, PREFERENCE_FIELDS)
    values["name"] = form_text(key.entry.get("name"))
    models = key.entry.get("model")
    values["model"] = ", ".join(str(m) for m in (models if isinstance(models, list) else [models])) if models is not None else ""
    expires = key.limits.expires_at
    values["expires_at"] = time.strftime(EXPIRY_FORMAT, time.gmtime(expires)) if expires is not None else ""
    for name, default in DEFAULTS.items():
        values[name] = values[name] or default
    return values


def grace_seconds(text: str) -> int:
    """The rotate form's grace period: empty is none."""
    text = text.strip()
    if not text:
        return 0
    seconds = whole_number(text)
    if seconds is None:
        raise bad_request("'grace_seconds' must be a whole number of seconds.", "invalid_grace_seconds", "grace_seconds")
    return seconds


def _place(entry: dict[str, Any], name: str, value: Any) -> None:
    if name in TOP_FIELDS:
        entry[name] = value
    else:
        entry.setdefault("preferences", {})[name] = value


def _typed(name: str, text: str) -> Any:
    if name == "model":
        return [part.strip() for part in text.split(",") if part.strip()]
    if name in NUMBER_FIELDS:
        return form_number(text)
    return text


def _changed(name: str, text: str, shown: str, key: ApiKey) -> bool:
    if name == "expires_at" and text:  # the browser may drop the seconds: compare the moments
        try:
            return to_unix(text) != key.limits.expires_at
        except ValueError:
            return True
    if name == "model":
        return _typed("model", text) != _typed("model", shown)
    return text != shown
