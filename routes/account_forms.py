"""The account forms of the admin pages, turned into what the accounts API takes: a new
account's entry and a JSON merge patch of its settings (core/keys/accounts.py validates and
applies both). Text becomes JSON values as for the key forms (routes/_forms.py).

The self-service checkbox is followed by a hidden field of the same name saying "no": a ticked
box sends "yes" first (read_form keeps the first value), an unticked one only the "no", so the
edit form can tell "unticked" from "not in this form" as it does for the other fields.
"""

from __future__ import annotations

from typing import Any

from core.config import ApiKey
from routes._forms import form_number, preference_texts

# The settings the forms edit, all under the entry's `preferences`.
PREFERENCE_FIELDS = ("billing_mode", "credits", "count_credits", "rate_limit", "concurrency_limit", "monthly_cost_limit")
NUMBER_FIELDS = frozenset({"credits", "count_credits", "concurrency_limit", "monthly_cost_limit"})
SELF_SERVICE = "self_service_keys"
TICKED = "yes"
NEW_ACCOUNT = dict.fromkeys(("name", *PREFERENCE_FIELDS, SELF_SERVICE), "")  # the new account form, empty


def new_account_entry(form: dict[str, str]) -> dict[str, Any]:
    """The entry POST /v1/accounts would take for the new account form; empty fields are left out."""
    preferences = {name: _typed(name, text) for name in PREFERENCE_FIELDS if (text := form.get(name, "").strip())}
    if form.get(SELF_SERVICE) == TICKED:
        preferences[SELF_SERVICE] = True
    entry: dict[str, Any] = {"name": form.get("name", "").strip()}
    if preferences:
        entry["preferences"] = preferences
    return entry


def account_patch(account: ApiKey, form: dict[str, str]) -> dict[str, Any]:
    """The merge patch for the edit form: only the fields changed from the account's settings
    (so a stale form does not undo other changes); an emptied field, or an unticked box,
    removes the setting (null)."""
    shown = account_values(account)
    changes: dict[str, Any] = {}
    for name in PREFERENCE_FIELDS:
        if name not in form:
            continue
        text = form[name].strip()
        if _typed(name, text) != _typed(name, shown[name]):
            changes[name] = _typed(name, text) if text else None
    if SELF_SERVICE in form and (form[SELF_SERVICE] == TICKED) != account.self_service_keys:
        changes[SELF_SERVICE] = True if form[SELF_SERVICE] == TICKED else None
    return {"preferences": changes} if changes else {}


def account_values(account: ApiKey) -> dict[str, str]:
    """The account's settings as the forms show them (the entry as written, merged with API changes)."""
    values = preference_texts(account.entry, PREFERENCE_FIELDS)
    values["name"] = account.name
    values[SELF_SERVICE] = TICKED if account.self_service_keys else ""
    return values


def _typed(name: str, text: str) -> Any:
    """`2.50` and `2.5` are the same credits: numbers compare as numbers."""
    return form_number(text) if name in NUMBER_FIELDS and text else text
