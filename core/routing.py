"""Which providers serve a request, in which order: scheduling, cooldown and key rotation.

The config says what *can* serve a model; this module holds the little mutable state that
decides what *will*: round-robin positions, cooled-down routes, upstream key rotation. The
state is keyed by names, so it survives a config reload.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Sequence

from core.config import ApiKey, Config, ModelRoute, Provider
from core.endpoints import SERVED_BY
from core.errors import bad_request, forbidden, not_found


def routes_for(config: Config, model: str, key: ApiKey, endpoint: str = "chat/completions") -> tuple[ModelRoute, ...]:
    """Every route that may serve `model` at `endpoint` for `key`, in config order; 404 /
    400 / 403 otherwise. Providers whose engine cannot serve the endpoint are skipped."""
    routes = config.routes.get(model)
    if routes is None:
        raise not_found(f"The model '{model}' does not exist or is not served by this gateway.", "model_not_found")
    routes = _label_if_only_that_is_allowed(config, model, key, routes)
    engines = SERVED_BY.get(endpoint)
    if engines is not None:
        routes = tuple(route for route in routes if route.provider.engine in engines)
        if not routes:
            message = f"No provider of the model '{model}' serves /v1/{endpoint} (only {', '.join(sorted(engines))} providers do)."
            raise bad_request(message, "unsupported_endpoint", "model")
    if key.access.everything:
        return routes
    allowed = tuple(route for route in routes if key.access.allows(route))
    if not allowed:
        raise forbidden(f"This API key is not allowed to use the model '{model}'.", "model_not_allowed")
    return allowed


def _label_if_only_that_is_allowed(config: Config, model: str, key: ApiKey, routes: tuple[ModelRoute, ...]) -> tuple[ModelRoute, ...]:
    """`anthropic/claude-x` is both a model literally named so (on some provider) and the label
    of provider anthropic's claude-x: a key allowed the literal model gets it (as uni-api reads
    a request's model name), a key allowed only the label's route gets that, never a 403."""
    label = config.shadowed_labels.get(model)  # None for nearly every request: nothing to scan
    if label is None or key.access.everything or any(key.access.allows(route) for route in routes):
        return routes
    return (label,) if key.access.allows(label) else routes


def _lottery(routes: Sequence[ModelRoute]) -> list[ModelRoute]:
    """uni-api's lottery: weighted random, each route first with the chance weight / total,
    the rest drawn likewise among those left (Efraimidis-Spirakis keys: u ** (1 / weight))."""
    return sorted(routes, key=lambda route: random.random() ** (1 / route.provider.weight), reverse=True)


class Scheduler:
    """Orders candidate routes and remembers which ones failed recently."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._cooldown_until: dict[tuple[str, str], float] = {}
        self._round_robin: dict[str, itertools.count[int]] = {}
        self._smooth_weights: dict[str, dict[str, int]] = {}
        self._key_turn: dict[str, itertools.count[int]] = {}

    def order(self, model: str, routes: Sequence[ModelRoute], algorithm: str) -> list[ModelRoute]:
        """Routes to try, best first. Cooled-down routes go last rather than away: when every
        provider is cooling down, trying one beats failing the request outright."""
        ordered = self._schedule(model, routes, algorithm)
        if not self._cooldown_until:
            return ordered
        now = self._clock()
        ready = [r for r in ordered if not self._is_cooling(r, now)]
        if len(ready) == len(ordered):
            return ordered
        return ready + [r for r in ordered if self._is_cooling(r, now)]

    def cool_down(self, route: ModelRoute, seconds: float) -> None:
        if seconds > 0:
            self._cooldown_until[(route.provider.name, route.upstream_name)] = self._clock() + seconds

    def recovered(self, route: ModelRoute) -> None:
        if self._cooldown_until:
            self._cooldown_until.pop((route.provider.name, route.upstream_name), None)

    def is_cooling(self, route: ModelRoute) -> bool:
        return self._is_cooling(route, self._clock())

    def cooling(self) -> dict[str, list[str]]:
        """Each provider's upstream models cooling down now (the Providers page's status)."""
        now = self._clock()
        found: dict[str, list[str]] = {}
        for (provider, upstream), until in list(self._cooldown_until.items()):
            if until > now:
                found.setdefault(provider, []).append(upstream)
        return found

    def next_upstream_key(self, provider: Provider) -> str:
        keys = provider.upstream_keys
        if len(keys) == 1:
            return keys[0]
        turn = self._key_turn.setdefault(provider.name, itertools.count())
        return keys[next(turn) % len(keys)]

    def _is_cooling(self, route: ModelRoute, now: float) -> bool:
        until = self._cooldown_until.get((route.provider.name, route.upstream_name))
        if until is None:
            return False
        if until <= now:
            del self._cooldown_until[(route.provider.name, route.upstream_name)]
            return False
        return True

    def _schedule(self, model: str, routes: Sequence[ModelRoute], algorithm: str) -> list[ModelRoute]:
        if len(routes) == 1 or algorithm == "fixed_priority":
            return list(routes)
        if algorithm == "random":
            return random.sample(list(routes), len(routes))
        if algorithm == "lottery":
            return _lottery(routes)
        if algorithm == "round_robin":
            start = next(self._round_robin.setdefault(model, itertools.count())) % len(routes)
            return list(routes[start:]) + list(routes[:start])
        return self._weighted(model, routes)

    def _weighted(self, model: str, routes: Sequence[ModelRoute]) -> list[ModelRoute]:
        """Smooth weighted round robin (as nginx does): picks spread evenly in proportion to weight."""
        current = self._smooth_weights.setdefault(model, {})
        total = 0
        for route in routes:
            current[route.label] = current.get(route.label, 0) + route.provider.weight
            total += route.provider.weight
        first = max(routes, key=lambda r: current[r.label])
        current[first.label] -= total
        return [first] + [r for r in routes if r is not first]
