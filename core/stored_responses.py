"""Which key made each stored response, and which provider holds it (OpenAI's Responses API).

Follow-ups on a stored response (`previous_response_id`; retrieve, delete, cancel, list its
input items) must reach the provider that holds it, and only the key that made it may make
them. The ledger keeps each record durably, written in its batches off the request path;
this process also keeps the recent ones in a bounded map, so a follow-up sent right after
the create finds its record before the batch commits, and most follow-ups cost no query. A
miss reads the database (twice, 0.1 s apart): in a fleet, the create may have gone through
another instance, whose batch commits within 10 ms.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from core.config import ApiKey, Config, ModelRoute
from core.errors import GatewayError, bad_request, forbidden, not_found
from core.ledger import RESPONSE_RETENTION_SECONDS, Ledger, StoredResponse

MAX_REMEMBERED = 100_000  # recent records kept in memory (~200 bytes each); older ones are read
# An unknown id is looked up once more after this: well past the ledgers' 10 ms group commit,
# so a follow-up sent to one instance right after the create went through another finds it.
UNCOMMITTED_WAIT_SECONDS = 0.1


class StoredResponses:
    def __init__(self, ledger: Ledger, clock: Callable[[], float]):
        self._ledger = ledger
        self._clock = clock
        self._recent: dict[str, StoredResponse] = {}  # oldest first (insertion order)

    def remember(self, response_id: str, key_id: str, provider: str) -> None:
        """Record a response the upstream stores: in memory now, in the ledger at its next commit."""
        stored = StoredResponse(response_id, key_id, provider, self._clock())
        recent = self._recent
        recent.pop(response_id, None)
        recent[response_id] = stored
        if len(recent) > MAX_REMEMBERED:
            del recent[next(iter(recent))]
        self._ledger.remember_response(stored)

    async def owned(self, response_id: str, key: ApiKey, param: str | None = None) -> StoredResponse:
        """The record of a response `key` made; 404 for one it did not make, an unknown one and
        one past its retention alike (a key learns nothing of other keys' responses)."""
        stored = self._recent.get(response_id)
        if stored is None:
            stored = await self._ledger.stored_response(response_id)
        if stored is None:  # fleet: made through another instance, whose batch may not have committed yet
            await asyncio.sleep(UNCOMMITTED_WAIT_SECONDS)
            stored = await self._ledger.stored_response(response_id)
        if stored is None or stored.key_id != key.id or stored.created_at < self._clock() - RESPONSE_RETENTION_SECONDS:
            raise response_not_found(response_id, param)
        return stored

    async def routes_following(self, config: Config, key: ApiKey, model: str, previous_id: str, routes: tuple[ModelRoute, ...]) -> tuple[ModelRoute, ...]:
        """The routes a create continuing `previous_id` may take: those of the provider holding
        it (no other has it). A clear 4xx when none of the request's routes is one."""
        stored = await self.owned(previous_id, key, "previous_response_id")
        held = tuple(route for route in routes if route.provider.name == stored.provider)
        if held:
            return held
        raise _not_routable(config, key, model, previous_id, stored.provider)


def _not_routable(config: Config, key: ApiKey, model: str, previous_id: str, provider: str) -> GatewayError:
    holding = [route for route in config.routes.get(model, ()) if route.provider.name == provider]
    where = f"The response '{previous_id}' is held by provider '{provider}'"
    if any(key.access.allows(route) for route in holding):
        return bad_request(f"{where}; the request names another provider.", "previous_response_provider_mismatch", "previous_response_id")
    if holding:
        return forbidden(f"{where}, which this API key may not use for the model '{model}'.", "previous_response_not_allowed")
    return bad_request(f"{where}, which does not serve the model '{model}'.", "previous_response_provider_mismatch", "previous_response_id")


def response_not_found(response_id: str, param: str | None = None) -> GatewayError:
    return not_found(f"No response with id '{response_id}' found.", "response_not_found", param)
