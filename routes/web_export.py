"""CSV downloads: the request log, the per-key summary and the per-provider days for a date range, streamed."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, date, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from core import reports
from core.errors import bad_request, forbidden, not_found
from core.keys.states import effective_mode
from core.ledger import Ledger
from core.ledger.sums import Window
from core.pricing import format_usd
from core.timeutil import days_before
from core.units_format import CSV_HEADER, units_csv
from core.vendors.states import day_range, provider_days
from routes._http import current_config
from routes._web_auth import admin_visitor, visitor

DEFAULT_DAYS = 30
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet reads as a formula (OWASP's CSV injection)
REQUEST_HEADER = ("time", "request_id", "key_id", "key_name", "model", "provider", "upstream_model", "prompt_tokens", "completion_tokens", "cached_tokens",
                  "cost_type", "unit_prices", "cost_usd", "count_credits", "status", "cache_write_tokens", "reasoning_tokens", *CSV_HEADER)  # fmt: skip
PROVIDER_HEADER = ("day", "provider", "upstream_model", "requests", "prompt_tokens", "completion_tokens", "cached_tokens",
                   "vendor_cost_usd", "billed_usd", "margin_usd", "unknown_cost_requests", "errors", "cache_write_tokens")  # fmt: skip
SUMMARY_HEADER = (
    "key_id",
    "key_name",
    "masked_key",
    "billing_mode",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cost_usd",
    "count_credits",
    "errors",
    *CSV_HEADER,  # the media units, after the columns older files have
    "cache_write_tokens",  # added later still
)


def date_range(request: Request) -> tuple[float, float, str]:
    """[start day 00:00, end day + 1 00:00) in UTC from `start`/`end` (YYYY-MM-DD); last 30 days by default."""
    start, end = days_asked(request, datetime.now(UTC).date())
    since = datetime(start.year, start.month, start.day, tzinfo=UTC).timestamp()
    until = datetime(end.year, end.month, end.day, tzinfo=UTC).timestamp() + 86400
    return since, until, f"{start.isoformat()}_{end.isoformat()}"


def days_asked(request: Request, today: date) -> tuple[date, date]:
    """The first and last day of `start`/`end` (YYYY-MM-DD); the 30 days up to `today` by default."""
    params = request.query_params
    try:
        end = date.fromisoformat(params["end"]) if params.get("end") else today
        start = date.fromisoformat(params["start"]) if params.get("start") else days_before(end, DEFAULT_DAYS - 1)
    except ValueError:
        raise bad_request("Dates must look like 2024-01-31.", "invalid_date") from None
    if start > end:
        raise bad_request("The start date is after the end date.", "invalid_date")
    return start, end


def text_cell(value: str) -> str:
    """A name from outside (a provider's, a model's as a vendor lists it) as a CSV cell a
    spreadsheet shows as text: one starting like a formula gets a leading apostrophe."""
    return "'" + value if value.startswith(FORMULA_STARTS) else value


async def csv_stream(header: Iterable[str], rows: AsyncIterator[Iterable[Any]]) -> AsyncIterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    count = 0
    async for row in rows:
        writer.writerow(row)
        count += 1
        if count % 500 == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def download(body: AsyncIterator[str], filename: str) -> StreamingResponse:
    return StreamingResponse(
        body, media_type="text/csv; charset=utf-8", headers={"Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "no-store"}
    )


async def _request_rows(ledger: Ledger, key_id: str | None, since: float, until: float) -> AsyncIterator[tuple[Any, ...]]:
    async for row in reports.iter_requests(ledger, key_id, since, until):
        record = dict(zip(reports.EXPORT_COLUMNS, row, strict=True))
        yield (
            datetime.fromtimestamp(record["ts"], UTC).isoformat(),
            record["request_id"],
            record["key_id"],
            text_cell(record["key_name"]),  # names people chose (a self-service holder's key): text, never a formula
            text_cell(record["model"]),
            text_cell(record["provider"]),
            text_cell(record["upstream_model"]),
            record["prompt_tokens"],
            record["completion_tokens"],
            record["cached_tokens"],
            record["cost_type"],
            record["unit_prices"],
            format_usd(record["cost_nanos"]),
            record["count_charged"],
            record["status"],
            record["cache_write_tokens"],
            record["reasoning_tokens"],
            *units_csv(record["images"], record["audio_ms"], record["characters"]),
        )


async def admin_requests_csv(request: Request) -> StreamingResponse:
    config = current_config(request)
    admin_visitor(request, config)
    key_id = request.query_params.get("key") or None
    if key_id is not None and key_id not in config.keys_by_id and key_id not in config.deleted_keys:  # a deleted key's history stays readable
        raise not_found("No such key.", "key_not_found")
    since, until, label = date_range(request)
    name = f"requests_{key_id[:8] if key_id else 'all'}_{label}.csv"
    return download(csv_stream(REQUEST_HEADER, _request_rows(request.app.state.ledger, key_id, since, until)), name)


async def own_requests_csv(request: Request) -> StreamingResponse:
    config = current_config(request)
    me, _ = visitor(request, config)
    if request.query_params.get("key") not in (None, "", me.id):
        raise forbidden("You may only export your own key.", "not_your_key")
    since, until, label = date_range(request)
    return download(csv_stream(REQUEST_HEADER, _request_rows(request.app.state.ledger, me.id, since, until)), f"requests_{label}.csv")


async def keys_csv(request: Request) -> StreamingResponse:
    config = current_config(request)
    admin_visitor(request, config)
    since, until, label = date_range(request)
    ledger: Ledger = request.app.state.ledger
    totals = await ledger.totals([Window(key.id, since, until) for key in config.keys])

    async def rows() -> AsyncIterator[tuple[Any, ...]]:
        for key in config.keys:
            t = totals.get((key.id,))
            if t is None:
                yield (key.id, text_cell(key.name), key.masked, effective_mode(config, key), 0, 0, 0, 0, "0", 0, 0, *units_csv(0, 0, 0), 0)
            else:
                yield (key.id, text_cell(key.name), key.masked, effective_mode(config, key), t.requests, t.prompt_tokens, t.completion_tokens, t.cached_tokens,
                       format_usd(t.cost_nanos), t.count_charged, t.errors, *units_csv(t.images, t.audio_ms, t.characters), t.cache_write_tokens)  # fmt: skip

    return download(csv_stream(SUMMARY_HEADER, rows()), f"keys_{label}.csv")


async def providers_csv(request: Request) -> StreamingResponse:
    """Per provider, day (preferences.timezone) and upstream model: requests, tokens, vendor
    cost (empty when unknown), billed, margin (over the requests of known cost), errors."""
    config = current_config(request)
    admin_visitor(request, config)
    zone = config.preferences.timezone
    start, end = days_asked(request, datetime.fromtimestamp(request.app.state.clock(), zone).date())
    try:
        since, until = day_range(zone, start, end)
    except OverflowError:  # the day after 9999-12-31
        raise bad_request("The end date is past the last day there is.", "invalid_date") from None

    async def rows() -> AsyncIterator[tuple[Any, ...]]:
        async for day, provider, model, t in provider_days(config, request.app.state.ledger, since, until):
            known = t.cost_known
            yield (day, text_cell(provider), text_cell(model), t.requests, t.prompt_tokens, t.completion_tokens, t.cached_tokens,
                   format_usd(t.vendor_cost_nanos) if known else "", format_usd(t.billed_nanos), format_usd(t.margin_nanos) if known else "",
                   t.unknown_cost, t.errors, t.cache_write_tokens)  # fmt: skip

    return download(csv_stream(PROVIDER_HEADER, rows()), f"providers_{start.isoformat()}_{end.isoformat()}.csv")


routes = [
    Route("/admin/export/providers.csv", providers_csv, methods=["GET"]),
    Route("/admin/export/requests.csv", admin_requests_csv, methods=["GET"]),
    Route("/admin/export/keys.csv", keys_csv, methods=["GET"]),
    Route("/usage/export/requests.csv", own_requests_csv, methods=["GET"]),
]
