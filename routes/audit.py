"""The audit log: a web page, a CSV export, and the admin API's JSON."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from core.audit import describe
from core.config import ACCOUNT_ID_PREFIX, Config
from core.errors import bad_request
from core.ledger import Ledger
from routes._http import current_config, require_admin, whole_number
from routes._pages import render
from routes._web_auth import admin_visitor
from routes.web_export import csv_stream, download
from routes.web_views import when

PAGE_SIZE = 100
MAX_API_LIMIT = 1000
COLUMNS = ("id", "ts", "actor", "actor_key_id", "address", "action", "target_key_id", "target_name", "before", "after", "detail")


def _paging(request: Request, default_limit: int) -> tuple[int, int | None, str | None]:
    params = request.query_params
    limit, raw_before = whole_number(params.get("limit", str(default_limit))), params.get("before")
    if limit is None or not 1 <= limit <= MAX_API_LIMIT:
        raise bad_request(f"The 'limit' parameter must be a whole number from 1 to {MAX_API_LIMIT}.", "invalid_limit", "limit")
    before = whole_number(raw_before)
    if raw_before and before is None:
        raise bad_request("The 'before' parameter must be an entry id.", "invalid_before", "before")
    return limit, before, params.get("key") or None


async def audit_page(request: Request) -> Response:
    config = current_config(request)
    me, session = admin_visitor(request, config)
    _, before, key_id = _paging(request, PAGE_SIZE)
    entries = await request.app.state.ledger.audit_entries(PAGE_SIZE + 1, before, key_id)
    rows = [_view(config, entry) for entry in entries[:PAGE_SIZE]]
    next_before = entries[PAGE_SIZE - 1]["id"] if len(entries) > PAGE_SIZE else None
    return render(request, "audit.html", me=me, csrf=session.csrf, entries=rows, next_before=next_before, key_id=key_id)


async def audit_csv(request: Request) -> Response:
    config = current_config(request)
    admin_visitor(request, config)
    key_id = request.query_params.get("key") or None
    return download(csv_stream(COLUMNS, _all_rows(request.app.state.ledger, key_id)), "audit_log.csv")


async def audit_api(request: Request) -> Response:
    """GET /v1/audit_log?limit=&before=&key=: newest first; page with `before` = the last id."""
    config = current_config(request)
    require_admin(request, config)
    limit, before, key_id = _paging(request, PAGE_SIZE)
    entries = await request.app.state.ledger.audit_entries(limit, before, key_id)
    return JSONResponse({"entries": entries, "next_before": entries[-1]["id"] if len(entries) == limit else None})


async def _all_rows(ledger: Ledger, key_id: str | None) -> AsyncIterator[tuple[Any, ...]]:
    before = None
    while True:
        entries = await ledger.audit_entries(500, before, key_id)
        for entry in entries:
            yield tuple(entry[column] for column in COLUMNS)
        if len(entries) < 500:
            return
        before = entries[-1]["id"]


def _view(config: Config, entry: dict[str, Any]) -> dict[str, Any]:
    change, note = describe(entry)
    return {**entry, "when": when(entry["ts"]), "target_url": _target_url(config, entry["target_key_id"]), "change": change, "note": note}


def _target_url(config: Config, target_id: str | None) -> str | None:
    """The page of the key (a deleted key's page stays) or account an entry is about."""
    if target_id in config.keys_by_id or target_id in config.deleted_keys:
        return f"/admin/keys/{target_id}"
    name = target_id.removeprefix(ACCOUNT_ID_PREFIX) if target_id is not None and target_id.startswith(ACCOUNT_ID_PREFIX) else None
    if name is not None and (name in config.accounts or name in config.deleted_accounts):  # a deleted account's page stays too
        return f"/admin/accounts/{name}"
    return None


routes = [
    Route("/admin/audit", audit_page, methods=["GET"]),
    Route("/admin/audit.csv", audit_csv, methods=["GET"]),
    Route("/v1/audit_log", audit_api, methods=["GET"]),
]
