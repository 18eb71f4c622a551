"""Billing: decides what a request costs, reserves before the upstream call, charges after.

Token-billed requests reserve an estimate (prompt estimate + the request's output-token
limit, `output_token_limit`, or the configured default plus the thinking budget a translating
adapter adds for `reasoning_effort`, at the model's prices), the output part capped by the key's
`max_reserve_completion_tokens`; count-billed requests reserve one count credit. The key's
limits (core/limits.py) are checked and held in the same synchronous step. Settlement charges
what the upstream reported, in full even past the reservation, and frees every hold.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from core.alerts import Alerts
from core.config import ApiKey, Config
from core.config.billing import KeyBilling
from core.errors import GatewayError, bad_request
from core.ledger import COUNT_CREDITS, Account, InsufficientBalance, Ledger, Reservation, UsageRecord
from core.limits import Limiter
from core.metering import ERROR, OK, Outcome
from core.money_format import count_text, usd_text
from core.pricing import COUNT, PRICED_BY_UNIT, count_price_json, format_usd
from core.pricing.book import PriceBook
from core.proxy import ProxyRequest, new_request_id
from core.request_checks import output_token_limit, reasoning_budget
from core.usage import Usage, estimate_media_prompt_tokens, estimate_prompt_tokens
from core.vendors.months import VendorMonths

ESTIMATED = "estimated"
# Endpoints that write no tokens: nothing is reserved for output.
_NO_OUTPUT_TOKENS = frozenset({"embeddings", "moderations", "audio/speech"})
WINDOW_NOT_STARTED = "billing_window_not_started"


# The endpoint whose prices a usage report with media units is charged at (one kind per report).
_REPORTED_UNITS = (("images", "images/generations"), ("audio_ms", "audio/transcriptions"), ("characters", "audio/speech"))


def reported_endpoint(usage: Usage) -> str:
    """What usage reported from elsewhere is priced as: the endpoint that sells its units
    (images, audio, characters read aloud), else a chat completion."""
    sold = [endpoint for unit, endpoint in _REPORTED_UNITS if getattr(usage, unit)]
    if len(sold) > 1:
        raise bad_request("A usage report carries one kind of media unit: images, audio_ms or characters.", "mixed_units")
    return sold[0] if sold else "chat/completions"


def count_credits_exhausted() -> GatewayError:
    return GatewayError(402, "insufficient_quota", "count_credits_exhausted", "This API key has no count credits left. Ask the operator to add count credits.")


def credit_balance_exhausted(key: ApiKey, needed_nanos: int, refusal: InsufficientBalance, estimate: str) -> GatewayError:
    """The 402 for a balance that cannot hold a request: what it needed reserved (`estimate`
    says of what) against what the key had, so the holder knows how much to ask for."""
    balance, held = refusal.balance_nanos, refusal.held_nanos
    needed, available = _distinct_usd(needed_nanos, max(balance - held, 0))
    whose = f"this API key's account '{key.account.name}'" if key.billing.owner and key.account is not None else "this API key"
    details = [f"balance {usd_text(balance)}"] if held or balance < 0 else []
    if held:
        details.append(f"{usd_text(held)} held by requests in flight")
    has = f"{available} available" + (f" ({', '.join(details)})" if details else "")
    message = f"This request needs up to {needed} reserved{estimate} but {whose} has {has}. Ask the operator to add credits."
    return GatewayError(402, "insufficient_quota", "credit_balance_exhausted", message)


def _distinct_usd(needed_nanos: int, available_nanos: int) -> tuple[str, str]:
    """Both amounts as pages show them, or to the nano-dollar when rounding would show two
    different amounts alike (`needs $0.05 but has $0.05`)."""
    needed, available = usd_text(needed_nanos), usd_text(available_nanos)
    if needed == available and needed_nanos != available_nanos:
        return f"${format_usd(needed_nanos)}", f"${format_usd(available_nanos)}"
    return needed, available


def token_estimate_text(model: str, prompt: int, completion: int) -> str:
    """What a token reservation is made of, for the 402's message."""
    output = f" + {count_text(completion)} output tokens" if completion else ""
    return f" (an estimated {count_text(prompt)} prompt tokens{output} at {model}'s prices)"


def check_window_open(terms: KeyBilling, now: float, status: int = 403) -> None:
    """Nothing timed before a key's billing window counts (Account.in_window), so nothing is
    served (403), granted or reported (409) for the key before its `created_at`."""
    if now >= terms.created_at:
        return
    opens = datetime.fromtimestamp(terms.created_at, UTC).isoformat()
    if status == 403:
        raise GatewayError(403, "permission_error", WINDOW_NOT_STARTED, f"This API key's billing starts at {opens}; it cannot be used before then.")
    raise GatewayError(409, "conflict_error", WINDOW_NOT_STARTED, f"The key's billing window starts at {opens}: nothing before then would count.")


class BillingMeter:
    """The Meter that charges keys through the ledger and enforces their limits."""

    def __init__(self, ledger: Ledger, clock: Callable[[], float] = time.time):
        self.ledger = ledger
        self.clock = clock
        self.alerts: Alerts | None = None  # set by the app once the sender runs
        self.vendors: VendorMonths | None = None  # each budgeted provider's month, set by the app

    @property
    def limiter(self) -> Limiter:
        return self.ledger.limiter

    async def admit(self, config: Config, key: ApiKey, request: ProxyRequest) -> BillingTicket:
        now = self.clock()
        prices = config.preferences.prices
        terms = key.billing
        check_window_open(terms, now)
        cost_type = prices.cost_type(terms.mode, request.model)
        needs_estimate = key.limits.meters_anything or (cost_type != COUNT and not terms.unlimited_credits)
        prompt, completion = self._token_estimate(config, key, request) if needs_estimate else (0, 0)
        if cost_type == COUNT:
            nanos, balance_nanos, count = prices.count_price_nanos(request.model), 0, 1
        else:
            if not needs_estimate:
                nanos = 0
            elif request.endpoint in PRICED_BY_UNIT:
                units = request.units or Usage()
                nanos = prices.estimate_charge_nanos(request.model, request.endpoint, units, prompt, completion, terms.price_multiplier)
            else:
                nanos = prices.token_price(request.model, None, terms.price_multiplier).estimate_nanos(prompt, completion)
            balance_nanos, count = (0 if terms.unlimited_credits else nanos), 0
        try:
            reservation = await self.ledger.admit(key, nanos, balance_nanos, count, prompt + completion, now, request.request_id)
        except InsufficientBalance as refusal:
            if refusal.kind == COUNT_CREDITS:
                raise count_credits_exhausted() from None
            estimate = "" if request.endpoint in PRICED_BY_UNIT else token_estimate_text(request.model, prompt, completion)
            raise credit_balance_exhausted(key, balance_nanos, refusal, estimate) from None
        return BillingTicket(self, key, terms, prices, request, cost_type, reservation)

    async def admit_free(self, key: ApiKey, request: ProxyRequest) -> FreeTicket:
        """Admit a request the gateway answers free of charge (Anthropic's count_tokens): it
        must pass the key's limits and counts against its concurrency and request rate, as
        any request does, but holds nothing of its balance and leaves no ledger row."""
        now = self.clock()
        check_window_open(key.billing, now)
        try:
            reservation = await self.ledger.admit(key, 0, 0, 0, 0, now, request.request_id)
        except InsufficientBalance as refusal:  # nothing to hold, but a key at or below zero makes no requests
            if refusal.kind == COUNT_CREDITS:
                raise count_credits_exhausted() from None
            message = f"This API key's credit balance is exhausted ({usd_text(refusal.balance_nanos)}). Ask the operator to add credits."
            raise GatewayError(402, "insufficient_quota", "credit_balance_exhausted", message) from None
        return FreeTicket(self, key, reservation)

    async def record_external(self, config: Config, key: ApiKey, model: str, usage: Usage, provider: str) -> int:
        """Charge usage that happened elsewhere; it already happened, so no balance check.
        A `provider/model` name is billed as its public model, as on the proxy; media units
        are priced as the endpoint that sells them would price them."""
        endpoint = reported_endpoint(usage)
        check_window_open(key.billing, self.clock(), 409)
        routes = config.routes.get(model)
        upstream = model
        if routes:
            model = routes[0].public_name
            # The vendor's name for it on the reported provider (`provider/model` names the route).
            upstream = next((route.upstream_name for route in routes if route.provider.name == provider), routes[0].upstream_name)
        account = await self.ledger.account(key.id, key.billing)
        request = ProxyRequest(endpoint, {}, model, False, new_request_id())
        cost_type = config.preferences.prices.cost_type(key.billing.mode, model)
        ticket = BillingTicket(self, key, key.billing, config.preferences.prices, request, cost_type, Reservation(account, 0, 0))
        if self.vendors is not None and provider in config.budgeted:  # its month loaded, so the report counts in it
            await self.vendors.prepare(config, provider, self.clock())
        return ticket.charge(Outcome(provider, upstream, usage, OK))

    @staticmethod
    def _token_estimate(config: Config, key: ApiKey, request: ProxyRequest) -> tuple[int, int]:
        """(prompt, completion) tokens to reserve for: what this request may use at most, as
        far as we can tell, its output capped by the key's max_reserve_completion_tokens."""
        body = request.body
        completion = 0
        if request.endpoint not in _NO_OUTPUT_TOKENS:
            limit = output_token_limit(request.endpoint, body)
            completion = limit or config.preferences.reserve_completion_tokens + reasoning_budget(request.endpoint, body)
            cap = key.max_reserve_completion_tokens
            if cap and completion > cap:  # the rest is charged at settlement if used (README: Billing)
                completion = cap
        if request.endpoint in PRICED_BY_UNIT:
            images = request.units.images if request.units is not None else 0
            return estimate_media_prompt_tokens(request.endpoint, body), completion * max(images, 1)  # each image its own output
        return estimate_prompt_tokens(body), completion


class BillingTicket:
    """One admitted request's holds; it ends once, by `settle` (or `charge`) or `release`."""

    __slots__ = ("cost_type", "ended", "key", "meter", "prices", "report_every", "request", "reservation", "settled", "terms")

    def __init__(
        self,
        meter: BillingMeter,
        key: ApiKey,
        terms: KeyBilling,
        prices: PriceBook,
        request: ProxyRequest,
        cost_type: str,
        reservation: Reservation,
    ):
        self.meter = meter
        self.key = key
        self.terms = terms
        self.prices = prices
        self.request = request
        self.cost_type = cost_type
        self.reservation = reservation
        self.ended = False
        self.report_every = meter.ledger.report_every
        self.settled: UsageRecord | None = None  # the charged row, for the request's telemetry

    def settle(self, outcome: Outcome) -> dict[str, str]:
        """Charge the outcome; the x-tollgate-* and limit headers for the response."""
        return {**self.headers(self.charge(outcome)), **self.start_headers()}

    def charge(self, outcome: Outcome) -> int:
        """Write the charge to the ledger and free every hold; its cost in nano-dollars
        (0, and nothing written, if the ticket has already ended)."""
        if self.ended:
            return 0
        record = self._priced(outcome)
        cost_nanos = record.cost_nanos
        self.ended = True  # only now: should pricing above raise, a later release() still frees the holds
        try:
            seq = self.meter.ledger.settle(self.reservation, record)
            self.settled = record
        except BaseException:
            self.meter.ledger.release(self.reservation)  # settling raised half way: nothing may stay held
            raise
        if record.vendor_cost_nanos and self.meter.vendors is not None:
            self.meter.vendors.count(record, seq)
        if self.meter.alerts is not None:
            self.meter.alerts.check(self.key, self.reservation.account)
            if self.key.account is not None:  # the shared balance and limits, as the account's alerts
                self.meter.alerts.check(self.key.account, self.reservation.account.holder)
        return cost_nanos

    def report(self, outcome: Outcome) -> None:
        if not self.ended:
            self.meter.ledger.report(self.reservation, self._priced(outcome))

    def _priced(self, outcome: Outcome) -> UsageRecord:
        """The ledger record of an outcome, priced by the key's terms."""
        model = self.request.model
        if self.cost_type == COUNT:
            cost_nanos, count = self.prices.count_price_nanos(model), 1
            unit_prices = count_price_json(self.prices.count_price(model))
        elif self.request.endpoint in PRICED_BY_UNIT:
            cost_nanos, unit_prices = self.prices.charge_nanos(model, self.request.endpoint, outcome.usage, outcome.provider, self.terms.price_multiplier)
            count = 0
        else:
            token_price = self.prices.token_price(model, outcome.provider, self.terms.price_multiplier)
            cost_nanos, count = token_price.cost_nanos(outcome.usage), 0
            unit_prices = token_price.unit_prices()
        status = ESTIMATED if outcome.status == OK and outcome.usage.estimated else outcome.status
        # What the vendor charges for it: the provider that served it, at its price for the model
        # it was asked for (a failed stream the vendor bills counts too: its usage so far).
        vendor = self.prices.vendor_price(outcome.provider, outcome.upstream_model).cost(self.request.endpoint, outcome.usage)
        return self._record(outcome.provider, outcome.upstream_model, outcome.usage, unit_prices, cost_nanos, count, status, vendor)

    def release(self) -> None:
        if self.ended:
            return
        self.ended = True
        record = self._record("", "", Usage(), "{}", 0, 0, ERROR)
        try:
            self.meter.ledger.release(self.reservation, record)
        except BaseException:
            # Each hold frees once (its `open` flag): what the failed release freed stays freed.
            self.meter.ledger.release(self.reservation)
            raise

    def start_headers(self) -> dict[str, str]:
        if not self.key.limits.meters_anything:
            return {}
        return self.meter.limiter.headers(self.key, self.account, self.meter.clock())

    @property
    def account(self) -> Account:
        return self.reservation.account

    def headers(self, cost_nanos: int) -> dict[str, str]:
        account = self.reservation.account
        remaining = account.remaining_nanos(self.terms)
        return {
            "x-tollgate-cost": format_usd(cost_nanos),
            "x-tollgate-credits-remaining": "-1" if remaining is None else format_usd(remaining),
            "x-tollgate-count-credits-remaining": str(account.remaining_count(self.terms)),
        }

    def _record(
        self,
        provider: str,
        upstream_model: str,
        usage: Usage,
        unit_prices: str,
        cost_nanos: int,
        count: int,
        status: str,
        vendor: tuple[int | None, str] = (None, ""),
    ) -> UsageRecord:
        return UsageRecord(
            request_id=self.request.request_id,
            ts=self.meter.clock(),
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
            cache_write_tokens=usage.cache_write_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            account_id=self.terms.owner or "",
            images=usage.images,
            audio_ms=usage.audio_ms,
            characters=usage.characters,
            vendor_cost_nanos=vendor[0],
            vendor_unit_prices=vendor[1],
        )


class FreeTicket:
    """A free request's holds (BillingMeter.admit_free): it ends by freeing them, with no charge
    and no ledger row; its request still counts in the key's rate windows (the limiter counts a
    freed request as used, and the fleet's windows counted it at admission)."""

    __slots__ = ("ended", "key", "meter", "reservation")

    settled: UsageRecord | None = None
    report_every: float | None = None

    def __init__(self, meter: BillingMeter, key: ApiKey, reservation: Reservation):
        self.meter = meter
        self.key = key
        self.reservation = reservation
        self.ended = False

    def settle(self, outcome: Outcome) -> dict[str, str]:
        self.release()
        return self.start_headers()

    def release(self) -> None:
        if not self.ended:
            self.ended = True
            self.meter.ledger.release(self.reservation)

    def start_headers(self) -> dict[str, str]:
        if not self.key.limits.meters_anything:
            return {}
        return self.meter.limiter.headers(self.key, self.reservation.account, self.meter.clock())

    def report(self, outcome: Outcome) -> None:
        pass
