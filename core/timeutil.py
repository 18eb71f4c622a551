"""Timestamps from config and query parameters: ISO 8601, naive means UTC."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta


def to_unix(value: object) -> float:
    """Seconds since the epoch for a datetime, a date or an ISO 8601 string; ValueError otherwise."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        moment = datetime.fromisoformat(value.strip())
    else:
        raise ValueError(f"not a timestamp: {value!r}")
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def days_before(day: date, days: int) -> date:
    """`day` minus `days` days, stopping at the first day of the calendar (not an OverflowError):
    a range that would start before year 1 starts at year 1."""
    return day - timedelta(days=min(days, (day - date.min).days))
