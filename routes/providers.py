"""The vendor side's admin API: GET /v1/providers_states (core/vendors/states.py)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.vendors.states import provider_states
from routes._http import current_config, require_admin
from routes._json import ExactJSONResponse


async def providers_states(request: Request) -> Response:
    """Each provider's requests, vendor cost, billed amount, margin and budget, today and this
    month (`?month=YYYY-MM`: that month) in `preferences.timezone`."""
    config = current_config(request)
    require_admin(request, config)
    state = request.app.state
    gateway = state.gateway
    cooling, connections = gateway.scheduler.cooling(), gateway.gate.connections(config.providers)
    return ExactJSONResponse(await provider_states(config, state.ledger, state.clock(), request.query_params.get("month") or None, cooling, connections))


routes = [Route("/v1/providers_states", providers_states, methods=["GET"])]
