"""What the admin forms for keys and accounts share: form text turned into the JSON values their
APIs take, an entry's settings turned back into form text, and the field an error names.

Form fields are text; numbers become JSON numbers (exactly: a decimal a float cannot hold stays
text, which the config reader reads exactly too), and anything else is passed on as typed, so a
mistake gets the same message the API and api.yaml give for it.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from core.config.reader import MAX_NUMBER
from core.errors import GatewayError
from core.keys.admin import jsonable


def form_number(text: str) -> Any:
    """An int, or a float that is exactly the decimal typed (JSON's numbers, as the APIs get
    them); text that is not a number, or one no float holds, stays text."""
    try:
        number = Decimal(text)
    except InvalidOperation:
        return text
    if not number.is_finite() or abs(number) > MAX_NUMBER:  # the config reader says why
        return text
    if number == number.to_integral_value():
        return int(number)
    as_float = float(number)
    return as_float if Decimal(repr(as_float)) == number else text


def form_text(value: Any) -> str:
    """A setting as a form field shows it: empty when it is not set."""
    return "" if value is None else str(value)


def preference_texts(entry: dict[str, Any], names: tuple[str, ...]) -> dict[str, str]:
    """The entry's preferences as written (api.yaml's, merged with API changes), as form text."""
    preferences = jsonable(entry.get("preferences") or {}, fragments=False)
    return {name: form_text(preferences.get(name)) for name in names}


def invalid_field(error: GatewayError) -> str | None:
    """The form field to mark from the error's `param` (`preferences.quota` → quota)."""
    return error.param.rsplit(".", 1)[-1] if error.param else None
