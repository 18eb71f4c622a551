"""Admin endpoints (admin key required)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from core.key_settings import overrides
from core.ledger.postgres import PgLedger
from core.reload import ConfigStore, ReloadError
from routes._http import current_config, require_admin


async def config_status(request: Request) -> Response:
    """When the config was loaded, from what, and the last reload error if the file is broken."""
    config = current_config(request)
    require_admin(request, config)
    store: ConfigStore = request.app.state.store
    error = store.last_error
    body = {
        "path": str(store.path),
        "loaded_at": config.loaded_at,
        "source_hash": config.source_hash,
        "last_attempt_at": store.last_attempt_at,
        "reload_count": store.reload_count,
        "providers": len(config.providers),
        "api_keys": len(config.keys),
        "models": len(config.public_models),
        "last_error": None if error is None else _error_json(error),
    }
    ledger = request.app.state.ledger
    if isinstance(ledger, PgLedger):  # fleet mode: every live instance, and what the database overrides
        instances = await ledger.instances()
        body["instances"] = instances
        body["config_hashes_differ"] = len({instance["config_hash"] for instance in instances}) > 1
        body["database_settings"] = overrides(config, store.settings)
    return JSONResponse(body)


def _error_json(error: ReloadError) -> dict[str, object]:
    return {"message": error.message, "file": error.file, "line": error.line, "column": error.column, "reason": error.reason, "at": error.at}


async def health(request: Request) -> Response:
    """Liveness plus the ledger's state: "degraded" while writes fail (disk full, say), when
    answers still go out and their charges wait in memory, retried until they are written."""
    ledger = request.app.state.ledger.health()
    healthy = ledger["writing"] and ledger.get("database_reachable", True)
    return JSONResponse({"status": "ok" if healthy else "degraded", "ledger": ledger})


routes = [
    Route("/v1/config/status", config_status, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
]
