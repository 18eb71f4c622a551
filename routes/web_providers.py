"""The Providers page: each provider's vendor cost, billed amount, margin and budget this month
(`?month=YYYY-MM`: a past one), its errors and failovers, a chart of cost vs billed per day and
a per-model table; the figures of GET /v1/providers_states (core/vendors/states.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.alerts import recent_alerts
from core.money_format import count_text, usd_text
from core.pricing import format_usd
from core.telemetry.facts import BUSY, ERROR, FAILOVER, TIMEOUT
from core.telemetry.metrics import Metrics
from core.upstream_gate import Connections
from core.vendors.states import ProviderState, ProviderTotals, daily_provider_series, month_bounds, provider_state_list
from routes._http import current_config
from routes._pages import render
from routes._web_auth import admin_visitor
from routes.web_views import alert_rows, cache_text, cost_chart, percent, use_level

CHART_DAYS = 30
FIRST_MONTH = "1970-01"  # the first month `?month=` takes


async def providers_page(request: Request) -> Response:
    config = current_config(request)
    me, session = admin_visitor(request, config)
    state = request.app.state
    now = state.clock()
    asked = request.query_params.get("month") or None
    gateway = state.gateway
    label, current, states = await provider_state_list(
        config, state.ledger, now, asked, gateway.scheduler.cooling(), gateway.gate.connections(config.providers)
    )
    start, end, _ = month_bounds(config.preferences.timezone, now, label)
    # The chart: the last 30 days, or the days of the past month shown.
    series = await daily_provider_series(config, state.ledger, now if current else end - 1, CHART_DAYS if current else round((end - start) / 86400))
    metrics: Metrics = state.telemetry.metrics
    outcomes = None if metrics.multiprocess else metrics.upstream_outcomes()
    total = ProviderTotals()
    for provider in states:
        total.merge(provider.entry.month)
    return render(
        request,
        "providers.html",
        me=me,
        csrf=session.csrf,
        active="providers",
        month=label,
        current=current,
        timezone=str(config.preferences.timezone),
        earlier=_shift(label, -1) if label > FIRST_MONTH else None,
        later=None if current else _shift(label, 1),
        total=money_cells(total),
        providers=[_provider_view(provider, series.get(provider.name, []), outcomes) for provider in states],
        export_url=f"/admin/export/providers.csv?start={datetime.fromtimestamp(start, config.preferences.timezone).date()}"
        f"&end={datetime.fromtimestamp(end - 1, config.preferences.timezone).date()}",
        alerts=alert_rows(await recent_alerts(state.ledger, None, limit=10, providers=True), config),
    )


def money(nanos: int, known: bool = True) -> dict[str, str]:
    """A cell's amount: the page's format, and the exact decimal (its tooltip); "unknown" when
    no vendor price applied, never $0."""
    return {"text": usd_text(nanos), "exact": format_usd(nanos)} if known else {"text": "unknown", "exact": ""}


def money_cells(totals: ProviderTotals) -> dict[str, Any]:
    """Vendor cost, billed and margin of some totals (the margin over the requests whose cost is known)."""
    return {
        "cost": money(totals.vendor_cost_nanos, totals.cost_known),
        "billed": money(totals.billed_nanos),
        "margin": money(totals.margin_nanos, totals.cost_known),
        "unknown": totals.unknown_cost if totals.cost_known else 0,  # requests left out of a known cost
        "requests": totals.requests,
    }


def _provider_view(state: ProviderState, days: list[tuple[str, ProviderTotals]], outcomes: dict[str, dict[str, int]] | None) -> dict[str, Any]:
    month, calls = state.entry.month, (outcomes or {}).get(state.name, {})
    return {
        "name": state.name,
        "configured": state.configured,
        "status": state.status,
        "cooling": ", ".join(state.cooling_down_models),
        "connections": _connections_text(state.connections),
        "today": money(state.entry.today.vendor_cost_nanos, state.entry.today.cost_known),
        **money_cells(month),
        "errors": month.errors,
        "failovers": None if outcomes is None else calls.get(FAILOVER, 0),
        "upstream_errors": None if outcomes is None else calls.get(ERROR, 0) + calls.get(TIMEOUT, 0),
        "busy": None if outcomes is None else calls.get(BUSY, 0),
        "budget": _budget(state),
        "chart": cost_chart(days),
        "models": [_model_row(model, totals) for model, totals in sorted(state.entry.models.items())],
    }


def _connections_text(connections: Connections | None) -> str:
    """A limited provider's calls now, beside its status: "3 of 5 connections, 2 waiting"."""
    if connections is None or connections.limit is None:
        return ""
    waiting = f", {connections.waiting:,} waiting" if connections.waiting else ""
    return f"{connections.in_flight:,} of {connections.limit:,} connections{waiting}"


def _budget(state: ProviderState) -> dict[str, Any] | None:
    if state.budget_nanos is None:
        return None
    spent, used = state.entry.month.vendor_cost_nanos, state.budget_used
    pct = percent(spent, state.budget_nanos)
    text = f"{usd_text(spent)} of {usd_text(state.budget_nanos)}"
    return {"pct": pct, "level": use_level(pct), "text": text, "title": f"{text} ({used} of the budget used)", "used": str(used), "action": state.budget_action}


def _model_row(model: str, totals: ProviderTotals) -> dict[str, Any]:
    tokens = f"{count_text(totals.prompt_tokens)} / {count_text(totals.completion_tokens)}"
    return {
        "model": model,
        "tokens": tokens + cache_text(totals.cached_tokens, totals.cache_write_tokens),
        "errors": totals.errors,
        **money_cells(totals),
    }


def _shift(month: str, by: int) -> str:
    """YYYY-MM `by` months later (earlier when negative)."""
    index = int(month[:4]) * 12 + int(month[5:7]) - 1 + by
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


routes = [Route("/admin/providers", providers_page, methods=["GET"])]
