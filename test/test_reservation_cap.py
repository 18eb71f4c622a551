"""`max_reserve_completion_tokens`: admission reserves at most this many output tokens, so a
coding agent asking for 64,000 on every call can use a small balance; the settlement charges
what was used in full, even past the reservation, and the balance goes below zero by no more
than README's bound."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from decimal import Decimal
from typing import Any

import anthropic
import openai
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from core.config import build_config
from core.money_format import usd_text
from core.usage import estimate_prompt_tokens
from test.conftest import ADMIN_KEY, USER_KEY, keys_yaml
from test.servers import completion_body
from test.test_anthropic import STREAM as ANTHROPIC_STREAM

CLAUDE_CODE_MAX_TOKENS = 64000
PRICE = "15,75"  # USD per 1M input, output tokens: 64,000 output tokens cost $4.80, over the key's $1
INPUT_NANOS, OUTPUT_NANOS = 15_000, 75_000  # per token, in nano-dollars (exact: integer prices)
HELLO = [{"role": "user", "content": "hello there"}]


def config(engine: str, key_preferences: str = "", preferences: str = "") -> str:
    """One provider serving `opus` (a fake Anthropic, a fake OpenAI-style vendor or the echo
    engine), and a user key with $1 of credit."""
    provider = {
        "anthropic": "    base_url: {fake:p1}\n    engine: anthropic\n    api: secret\n",
        "openai": "    base_url: {fake:p1}\n    api: secret\n",
        "echo": "    engine: echo\n",
    }[engine]
    own = f", {key_preferences}" if key_preferences else ""
    return (
        f"providers:\n  - provider: p1\n{provider}    model: [opus]\n"
        + keys_yaml().replace("name: alice", f"name: alice\n    preferences: {{credits: 1{own}}}")
        + f"preferences:\n  model_price: {{opus: '{PRICE}'}}\n{preferences}"
    )


def anthropic_message(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": "opus",
        "content": [{"type": "text", "text": "Done."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    }


def claude(gateway: Any, key: str = USER_KEY) -> anthropic.Anthropic:
    # A timeout of its own: without one the SDK refuses a non-streamed 64,000-token request.
    return anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0, timeout=30)


def balance_nanos(gateway: Any, key: str = USER_KEY) -> int:
    """The key's remaining credit as the admin API says it, exactly (JSON numbers as Decimals)."""
    response = gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY)
    remaining = json.loads(response.text, parse_float=Decimal)["api_keys_states"][key]["remaining_credits"]
    return int(remaining * 10**9)


def charges(gateway: Any) -> list[tuple[str, int]]:
    """The ledger's rows, once everything settled so far is written (the states API flushes)."""
    gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY)
    with sqlite3.connect(gateway.config_path.parent / "data" / "tollgate.db") as db:
        return db.execute("SELECT status, cost_nanos FROM usage ORDER BY id").fetchall()


def refusal(model: str, prompt: int, output: int, has: str) -> str:
    needed = prompt * INPUT_NANOS + output * OUTPUT_NANOS
    return (
        f"This request needs up to {usd_text(needed)} reserved (an estimated {prompt:,} prompt tokens + {output:,} output tokens "
        f"at {model}'s prices) but this API key has {has}. Ask the operator to add credits."
    )


def test_claude_code_max_tokens_is_admitted_on_one_dollar_and_charged_the_usage(start_gateway, upstream):
    async def vendor(body: dict[str, Any], request: Request) -> Response:
        return JSONResponse(anthropic_message(20, 500))

    upstream.script("p1", vendor)
    gateway = start_gateway(config("anthropic"), upstream)
    message = claude(gateway).messages.create(model="opus", max_tokens=CLAUDE_CODE_MAX_TOKENS, messages=HELLO)
    assert message.usage.output_tokens == 500
    assert upstream.seen[0].body["max_tokens"] == CLAUDE_CODE_MAX_TOKENS, "the client's limit is sent as asked"
    cost = 20 * INPUT_NANOS + 500 * OUTPUT_NANOS  # $0.0378
    assert charges(gateway) == [("ok", cost)]
    assert balance_nanos(gateway) == 10**9 - cost


def test_a_claude_code_stream_is_admitted_on_one_dollar_and_charged_the_usage(start_gateway, upstream):
    async def vendor(body: dict[str, Any], request: Request) -> Response:
        return Response(ANTHROPIC_STREAM, media_type="text/event-stream")  # 1,125 prompt tokens (1,100 cached), 15 output

    upstream.script("p1", vendor)
    gateway = start_gateway(config("anthropic"), upstream)
    with claude(gateway).messages.stream(model="opus", max_tokens=CLAUDE_CODE_MAX_TOKENS, messages=HELLO) as stream:
        final = stream.get_final_message()
    assert final.usage.output_tokens == 15
    cost = 1125 * INPUT_NANOS + 15 * OUTPUT_NANOS  # no cache prices: cached tokens at the input price
    assert charges(gateway) == [("ok", cost)] and balance_nanos(gateway) == 10**9 - cost


def test_without_a_cap_the_full_limit_is_reserved_and_the_402_says_what_was_needed(start_gateway, upstream):
    gateway = start_gateway(config("anthropic", preferences="  max_reserve_completion_tokens: 0\n"), upstream)
    body = {"model": "opus", "max_tokens": CLAUDE_CODE_MAX_TOKENS, "messages": HELLO}
    with pytest.raises(anthropic.APIStatusError) as caught:
        claude(gateway).messages.create(**body)
    assert caught.value.status_code == 402
    error = caught.value.body["error"]
    assert error["type"] == "billing_error"
    assert error["message"] == refusal("opus", estimate_prompt_tokens(body), CLAUDE_CODE_MAX_TOKENS, "$1.00 available")
    assert upstream.seen == [] and charges(gateway) == []


def test_the_402_on_chat_keeps_its_code_and_names_both_amounts(start_gateway):
    gateway = start_gateway(config("echo", preferences="  max_reserve_completion_tokens: 0\n"))
    with pytest.raises(openai.APIStatusError) as caught:
        gateway.client().chat.completions.create(model="opus", messages=HELLO, max_tokens=CLAUDE_CODE_MAX_TOKENS)
    assert caught.value.status_code == 402
    body = caught.value.body
    prompt = estimate_prompt_tokens({"messages": HELLO})
    assert body == {
        "message": refusal("opus", prompt, CLAUDE_CODE_MAX_TOKENS, "$1.00 available"),
        "type": "insufficient_quota",
        "code": "credit_balance_exhausted",
        "param": None,
    }


LIMITED_REQUESTS = {
    "chat-max_tokens": lambda client: client.chat.completions.create(model="opus", messages=HELLO, max_tokens=CLAUDE_CODE_MAX_TOKENS),
    "chat-max_completion_tokens": lambda client: client.chat.completions.create(model="opus", messages=HELLO, max_completion_tokens=CLAUDE_CODE_MAX_TOKENS),
    "completions": lambda client: client.completions.create(model="opus", prompt="hello there", max_tokens=CLAUDE_CODE_MAX_TOKENS),
    "responses": lambda client: client.responses.create(model="opus", input="hello there", max_output_tokens=CLAUDE_CODE_MAX_TOKENS),
    # No limit: the default (40,000 here) plus the reasoning budget for `high` (24,576).
    "chat-default-with-reasoning": lambda client: client.chat.completions.create(model="opus", messages=HELLO, reasoning_effort="high"),
}


@pytest.mark.parametrize("send", LIMITED_REQUESTS.values(), ids=LIMITED_REQUESTS.keys())
@pytest.mark.parametrize(("cap", "admitted"), [("8192", True), ("0", False)])
def test_every_output_limit_is_reserved_up_to_the_cap(start_gateway, send, cap, admitted):
    preferences = f"  reserve_completion_tokens: 40000\n  max_reserve_completion_tokens: {cap}\n"
    gateway = start_gateway(config("echo", preferences=preferences))
    if admitted:
        send(gateway.client())
        ((status, cost),) = charges(gateway)
        assert status == "ok" and balance_nanos(gateway) == 10**9 - cost
    else:
        with pytest.raises(openai.APIStatusError) as caught:
            send(gateway.client())
        assert caught.value.status_code == 402 and caught.value.body["code"] == "credit_balance_exhausted"


@pytest.mark.parametrize(
    ("global_cap", "key_cap", "admitted", "reserved"),
    [
        (8192, 0, False, CLAUDE_CODE_MAX_TOKENS),  # the key opts out of the global cap: the strict old behaviour
        (8192, 20000, False, 20000),  # a higher cap of its own: $1.50 of output, over its $1
        (0, 2000, True, 2000),  # a cap of its own where the operator set none
    ],
)
def test_a_keys_own_cap_overrides_the_global_one(start_gateway, global_cap, key_cap, admitted, reserved):
    gateway = start_gateway(
        config("echo", key_preferences=f"max_reserve_completion_tokens: {key_cap}", preferences=f"  max_reserve_completion_tokens: {global_cap}\n")
    )
    body = {"model": "opus", "max_tokens": CLAUDE_CODE_MAX_TOKENS, "messages": HELLO}
    if admitted:
        assert claude(gateway).messages.create(**body).content[0].text == "Echo: hello there"
        return
    with pytest.raises(anthropic.APIStatusError) as caught:
        claude(gateway).messages.create(**body)
    assert caught.value.body["error"]["message"] == refusal("opus", estimate_prompt_tokens(body), reserved, "$1.00 available")


def openai_vendor_writing(completion_tokens: int | None, prompt_tokens: int, delay: float = 0.0):
    """A fake OpenAI-style vendor that writes `completion_tokens` (None: the request's whole
    `max_tokens`) and counts the prompt as `prompt_tokens`."""

    async def vendor(body: dict[str, Any], request: Request) -> Response:
        await asyncio.sleep(delay)
        written = body["max_tokens"] if completion_tokens is None else completion_tokens
        reply = completion_body(body)
        reply["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": written, "total_tokens": prompt_tokens + written}
        return JSONResponse(reply)

    return vendor


def test_usage_past_the_reservation_is_charged_in_full_and_the_balance_goes_below_zero(start_gateway, upstream):
    prompt = estimate_prompt_tokens({"messages": HELLO})
    upstream.script("p1", openai_vendor_writing(20000, prompt))  # more than the 8,192 reserved for
    gateway = start_gateway(config("openai"), upstream)
    client = gateway.client()
    raw = client.chat.completions.with_raw_response.create(model="opus", messages=HELLO, max_tokens=CLAUDE_CODE_MAX_TOKENS)
    cost = prompt * INPUT_NANOS + 20000 * OUTPUT_NANOS  # $1.50 and a bit: more than the key had
    assert charges(gateway) == [("ok", cost)]
    assert balance_nanos(gateway) == 10**9 - cost < 0
    assert Decimal(raw.headers["x-tollgate-credits-remaining"]) == Decimal(10**9 - cost) / 10**9
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="opus", messages=HELLO, max_tokens=CLAUDE_CODE_MAX_TOKENS)
    assert caught.value.body["message"] == refusal("opus", prompt, 8192, f"$0.00 available (balance {usd_text(10**9 - cost)})")
    assert len(upstream.seen) == 1


def test_concurrent_requests_overshoot_no_more_than_the_documented_bound(start_gateway, upstream):
    # Each request asks for 4,000 output tokens and writes them all; the key reserves 1,000.
    limit, cap = 4000, 1000
    prompt = estimate_prompt_tokens({"messages": HELLO})  # the vendor counts the prompt as estimated
    upstream.script("p1", openai_vendor_writing(None, prompt, delay=0.05))
    gateway = start_gateway(config("openai", key_preferences=f"max_reserve_completion_tokens: {cap}"), upstream)

    results = gateway.fire(USER_KEY, 60, model="opus", messages=HELLO, max_tokens=limit)
    reservation = prompt * INPUT_NANOS + cap * OUTPUT_NANOS
    in_flight_at_most = 10**9 // reservation  # the holds of requests in flight never pass the balance
    bound = in_flight_at_most * (limit - cap) * OUTPUT_NANOS  # README: (limit - cap) x output price each
    balance = balance_nanos(gateway)
    assert set(results) == {200, 402} and results.count(200) == len(upstream.seen)
    assert -bound <= balance < 0, "the overshoot happened, within the bound"
    assert balance == 10**9 - sum(cost for _, cost in charges(gateway)) and len(charges(gateway)) == results.count(200)


def test_the_cap_is_resolved_per_key_at_load():
    text = config("echo", key_preferences="max_reserve_completion_tokens: 100") + "  max_reserve_completion_tokens: 5000\n"
    loaded = build_config(text, "api.yaml")
    admin, user = loaded.keys
    assert (loaded.preferences.max_reserve_completion_tokens, admin.max_reserve_completion_tokens, user.max_reserve_completion_tokens) == (5000, 5000, 100)
    assert build_config(config("echo"), "api.yaml").preferences.max_reserve_completion_tokens == 8192


def test_a_negative_cap_is_a_located_config_error():
    from core.config.yamlsource import ConfigError

    with pytest.raises(ConfigError) as caught:
        build_config(config("echo", key_preferences="max_reserve_completion_tokens: -1"), "api.yaml")
    assert "max_reserve_completion_tokens" in caught.value.reason and ">= 0" in caught.value.reason


def test_a_key_in_an_account_is_told_the_accounts_balance(start_gateway):
    text = config("echo", preferences="  max_reserve_completion_tokens: 0\n").replace("{credits: 1}", "{}")
    gateway = start_gateway(
        text.replace("api_keys:", "accounts:\n  - name: acme\n    preferences: {credits: 1}\napi_keys:").replace(
            "name: alice", "name: alice\n    account: acme"
        )
    )
    with pytest.raises(openai.APIStatusError) as caught:
        gateway.client().chat.completions.create(model="opus", messages=HELLO, max_tokens=CLAUDE_CODE_MAX_TOKENS)
    prompt = estimate_prompt_tokens({"messages": HELLO})
    assert caught.value.body["message"] == refusal("opus", prompt, CLAUDE_CODE_MAX_TOKENS, "$1.00 available").replace(
        "this API key has", "this API key's account 'acme' has"
    )


def test_the_402_says_how_much_requests_in_flight_hold(start_gateway, upstream):
    prompt = estimate_prompt_tokens({"messages": HELLO})
    upstream.script("p1", openai_vendor_writing(10, prompt, delay=1.0))
    gateway = start_gateway(config("openai"), upstream)

    async def two_at_once() -> list[Any]:
        client = gateway.async_client()
        send = [client.chat.completions.create(model="opus", messages=HELLO, max_tokens=CLAUDE_CODE_MAX_TOKENS) for _ in range(2)]
        return await asyncio.gather(*send, return_exceptions=True)

    results = asyncio.run(two_at_once())
    refused = [result for result in results if isinstance(result, openai.APIStatusError)]
    assert len(refused) == 1 and refused[0].status_code == 402
    held = prompt * INPUT_NANOS + 8192 * OUTPUT_NANOS
    has = f"{usd_text(10**9 - held)} available (balance $1.00, {usd_text(held)} held by requests in flight)"
    assert refused[0].body["message"] == refusal("opus", prompt, 8192, has)
