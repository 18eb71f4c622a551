"""The prices page: what every served model costs, per provider, and where each price came
from (a model_price entry, the price catalog with its date, or the default)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.pricing.listing import price_rows
from routes._http import current_config
from routes._pages import render
from routes._web_auth import admin_visitor


async def prices_page(request: Request) -> Response:
    config = current_config(request)
    me, session = admin_visitor(request, config)
    prices = config.preferences.prices
    catalog = prices.catalog.name if prices.catalog is not None else None
    return render(request, "prices.html", me=me, csrf=session.csrf, rows=price_rows(prices), catalog=catalog, multiplier=prices.multiplier)


routes = [Route("/admin/prices", prices_page, methods=["GET"])]
