"""GET /metrics: Prometheus' text format (core/telemetry/metrics.py).

Needs an admin key unless `preferences.metrics.public` says the network is private: the
series name models, providers and, with `per_key`, key names.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.telemetry.metrics import Metrics
from routes._http import current_config, require_admin


async def metrics(request: Request) -> Response:
    config = current_config(request)
    if not config.preferences.metrics.public:
        require_admin(request, config)
    state = request.app.state
    metrics: Metrics = state.telemetry.metrics
    metrics.unwritten.set(state.ledger.health()["unwritten_rows"])  # as of now, not the last commit
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_PLAIN_0_0_4)


routes = [Route("/metrics", metrics, methods=["GET"])]
