"""Billing: decides what a request costs, reserves before the upstream call, charges after.

Token-billed requests reserve an estimate (prompt estimate + `max_tokens`, or the
configured default, at the model's prices); count-billed requests reserve one count
credit. Settlement charges what the upstream reported and frees the reservation.
"""

from __future__ import annotations

import time
import uuid
from decimal import Decimal

from core.config import ApiKey, Config
from core.config_billing import KeyBilling
from core.errors import GatewayError
from core.ledger import COUNT_CREDITS, InsufficientBalance, Ledger, Reservation, UsageRecord
from core.metering import ERROR, OK, Outcome
from core.pricing import COUNT, PriceBook, from_nanos, to_nanos
from core.proxy import ProxyRequest
from core.usage import Usage, estimate_prompt_tokens

ESTIMATED = "estimated"


def exhausted(kind: str) -> GatewayError:
    if kind == COUNT_CREDITS:
        return GatewayError(
            402, "insufficient_quota", "count_credits_exhausted", "This API key has no count credits left. Ask the operator to add count credits."
        )
    return GatewayError(402, "insufficient_quota", "credit_balance_exhausted", "This API key's credit balance is exhausted. Ask the operator to add credits.")


def format_usd(nanos: int) -> str:
    return format(from_nanos(nanos).normalize(), "f")


class BillingMeter:
    """The Meter that charges keys through the ledger."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    async def admit(self, config: Config, key: ApiKey, request: ProxyRequest) -> BillingTicket:
        prices = config.preferences.prices
        terms = key.billing
        cost_type = prices.cost_type(terms.mode, request.model)
        try:
            if cost_type == COUNT:
                reservation = await self.ledger.reserve(key.id, terms, 0, 1)
            else:
                reservation = await self.ledger.reserve(key.id, terms, self._token_estimate(config, terms, request), 0)
        except InsufficientBalance as exc:
            raise exhausted(exc.kind) from None
        return BillingTicket(self.ledger, key, terms, prices, request, cost_type, reservation)

    async def record_external(self, config: Config, key: ApiKey, model: str, usage: Usage, provider: str) -> int:
        """Charge usage that happened elsewhere; it already happened, so no balance check."""
        account = await self.ledger.account(key.id, key.billing)
        request = ProxyRequest("chat/completions", {}, model, False, f"ext_{uuid.uuid4().hex}")
        cost_type = config.preferences.prices.cost_type(key.billing.mode, model)
        ticket = BillingTicket(self.ledger, key, key.billing, config.preferences.prices, request, cost_type, Reservation(account, 0, 0))
        headers = ticket.settle(Outcome(provider, model, usage, OK))
        return to_nanos(Decimal(headers["x-tollgate-cost"]))

    @staticmethod
    def _token_estimate(config: Config, terms: KeyBilling, request: ProxyRequest) -> int:
        if terms.unlimited_credits:
            return 0
        body = request.body
        completion = 0
        if request.endpoint != "embeddings":
            limit = body.get("max_completion_tokens") or body.get("max_tokens")
            completion = limit if isinstance(limit, int) and limit > 0 else config.preferences.reserve_completion_tokens
        price = config.preferences.prices.token_price(request.model)
        return to_nanos(price.estimate(estimate_prompt_tokens(body), completion))


class BillingTicket:
    __slots__ = ("cost_type", "key", "ledger", "prices", "request", "reservation", "terms")

    def __init__(self, ledger: Ledger, key: ApiKey, terms: KeyBilling, prices: PriceBook, request: ProxyRequest, cost_type: str, reservation: Reservation):
        self.ledger = ledger
        self.key = key
        self.terms = terms
        self.prices = prices
        self.request = request
        self.cost_type = cost_type
        self.reservation = reservation

    def settle(self, outcome: Outcome) -> dict[str, str]:
        model = self.request.model
        if self.cost_type == COUNT:
            price = self.prices.count_price(model)
            cost, count, unit_prices = price, 1, {"count": str(price)}
        else:
            token_price = self.prices.token_price(model)
            cost, count = token_price.cost(outcome.usage), 0
            unit_prices = {"input": str(token_price.input), "output": str(token_price.output)}
            if token_price.cache_read is not None:
                unit_prices["cache_read"] = str(token_price.cache_read)
        status = ESTIMATED if outcome.status == OK and outcome.usage.estimated else outcome.status
        cost_nanos = to_nanos(cost)
        self.ledger.settle(self.reservation, self._record(outcome.provider, outcome.upstream_model, outcome.usage, unit_prices, cost_nanos, count, status))
        return self.headers(cost_nanos)

    def release(self) -> None:
        self.ledger.release(self.reservation, self._record("", "", Usage(), {}, 0, 0, ERROR))

    def headers(self, cost_nanos: int) -> dict[str, str]:
        account = self.reservation.account
        remaining = account.remaining_nanos(self.terms)
        return {
            "x-tollgate-cost": format_usd(cost_nanos),
            "x-tollgate-credits-remaining": "-1" if remaining is None else format_usd(remaining),
            "x-tollgate-count-credits-remaining": str(account.remaining_count(self.terms)),
        }

    def _record(self, provider: str, upstream_model: str, usage: Usage, unit_prices: dict[str, str], cost_nanos: int, count: int, status: str) -> UsageRecord:
        return UsageRecord(
            request_id=self.request.request_id,
            ts=time.time(),
            key_id=self.key.id,
            key_name=self.key.name,
            model=self.request.model,
            provider=provider,
            upstream_model=upstream_model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens,
            cost_type=self.cost_type,
            unit_prices=unit_prices,
            cost_nanos=cost_nanos,
            count_charged=count,
            status=status,
        )
