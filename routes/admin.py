"""Admin endpoints (admin key required)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from core.config import ACCOUNT_ID_PREFIX, API, FILE, Config
from core.config.reload import ConfigStore, ReloadError
from core.keys.admin import jsonable
from core.ledger.postgres import PgLedger
from routes._http import current_config, require_admin
from routes._json import ExactJSONResponse


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
        "warnings": [{"message": str(w), "file": w.file, "line": w.line, "column": w.column, "reason": w.reason} for w in config.warnings],
        "api_keys_defined_in": _key_sources(config),
        "api_key_changes": _key_changes(store),
        "account_changes": _account_changes(store),
    }
    ledger = request.app.state.ledger
    if isinstance(ledger, PgLedger):  # fleet mode: every live instance, and what the database overrides
        instances = await ledger.instances()
        body["instances"] = instances
        body["config_hashes_differ"] = len({instance["config_hash"] for instance in instances}) > 1
    return ExactJSONResponse(body)


def _key_sources(config: Config) -> dict[str, int]:
    """How many keys api.yaml defines, how many the keys API made, and how many were deleted."""
    made = sum(1 for key in config.keys if key.defined_in == API)
    return {FILE: len(config.keys) - made, API: made, "deleted": len(config.deleted_keys)}


def _account_changes(store: ConfigStore) -> list[dict[str, Any]]:
    """The same for accounts: what the database changes of api.yaml's accounts, which accounts
    it made, and every stored change not in force, with why."""
    problems = store.current.key_problems
    return [
        {
            "name": name,
            "defined_in": record.defined_in,
            "changes": jsonable(record.entry) if record.defined_in == FILE else None,
            "deleted": record.deleted_at is not None,
            "problem": problems.get(ACCOUNT_ID_PREFIX + name),
        }
        for name, record in sorted(store.account_records.items())
    ]


def _key_changes(store: ConfigStore) -> list[dict[str, Any]]:
    """What the database changes of api.yaml's keys (core/keys/records.py), and every stored
    change that is not in force, with why."""
    config = store.current
    changes = []
    for key_id, record in sorted(store.records.items()):
        key = config.keys_by_id.get(key_id) or config.deleted_keys.get(key_id)
        problem = config.key_problems.get(key_id)
        if record.defined_in != FILE and problem is None:
            continue
        changes.append({
            "key_id": key_id,
            "name": key.name if key is not None else None,
            "changes": jsonable(record.entry),
            "secret_rotated": record.digest is not None,
            "deleted": record.deleted_at is not None,
            "problem": problem,
        })  # fmt: skip
    return changes


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
