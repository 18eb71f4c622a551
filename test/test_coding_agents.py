"""Claude Code and Codex CLI, installed from npm at pinned versions, run headless through the
gateway as a user runs them (README "Coding agents"), against strict fake vendors
(test/agent_vendors.py). Each test checks the agent's exit status and output, what reached
the vendor, and the exact charge in the ledger.

The agents are installed once into a cache folder (TOLLGATE_AGENTS_DIR, default
~/.cache/tollgate-test-agents). Where the npm registry cannot be reached the tests are
skipped, saying so; under CI (the CI variable, set by .ci/run) they fail instead.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import tempfile
import textwrap
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

from test.agent_vendors import ANTHROPIC_USAGE, CODEX_USAGE
from test.conftest import ADMIN_KEY, USER_KEY

CLAUDE_CODE = "@anthropic-ai/claude-code@2.1.332"
CODEX = "@openai/codex@0.171.0"
AGENTS_DIR = Path(os.environ.get("TOLLGATE_AGENTS_DIR") or Path.home() / ".cache" / "tollgate-test-agents") / "claude-code-2.1.332_codex-0.171.0"
QUIET = {"DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "NO_COLOR": "1"}
AGENT_TIMEOUT = 300


@dataclass(frozen=True)
class Agents:
    claude: Path
    codex: Path


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI runs the coding-agent tests, never skips them")
    pytest.skip(reason)


def _npm(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    npm = shutil.which("npm")
    assert npm is not None
    return subprocess.run([npm, *args, "--no-audit", "--no-fund", "--loglevel=error"], capture_output=True, text=True, timeout=timeout)


def _install() -> None:
    """Both agents into a fresh folder, renamed into place only once complete: a half-done
    install is never used, and concurrent runs do not see each other's."""
    AGENTS_DIR.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=AGENTS_DIR.parent, prefix="installing-"))
    try:
        done = _npm("install", "--prefix", str(staging), CLAUDE_CODE, CODEX, timeout=900)
        if done.returncode != 0:
            pytest.fail(f"npm install {CLAUDE_CODE} {CODEX} failed:\n{done.stderr[-2000:]}")
        try:
            staging.rename(AGENTS_DIR)
        except OSError:  # another run finished first: use its copy
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _claude_binary(root: Path) -> Path:
    """The `claude` wrapper, whose postinstall puts the native binary in place; the platform
    package's binary itself where that script did not run (an npm that blocks install scripts)."""
    wrapper = root / "node_modules" / ".bin" / "claude"
    if subprocess.run([wrapper, "--version"], capture_output=True, timeout=60).returncode == 0:
        return wrapper
    native = next((root / "node_modules" / "@anthropic-ai").glob("claude-code-linux-*/claude"), None)
    assert native is not None, "no Claude Code binary for this platform"
    return native


@pytest.fixture(scope="session")
def agents() -> Agents:
    if shutil.which("npm") is None or shutil.which("node") is None:
        _unavailable("Node.js and npm are not installed")
    if not AGENTS_DIR.exists():
        try:
            reachable = _npm("view", CLAUDE_CODE, "version", timeout=60).returncode == 0
        except subprocess.TimeoutExpired:
            reachable = False
        if not reachable:
            _unavailable("the npm registry cannot be reached: Claude Code and Codex CLI cannot be installed")
        _install()
    return Agents(_claude_binary(AGENTS_DIR), AGENTS_DIR / "node_modules" / ".bin" / "codex")


CONFIG = """
providers:
  - provider: p1
    base_url: {fake:p1}
    engine: anthropic
    api: vendor-anthropic-key
    model: [claude-sonnet-5-5, claude-haiku-5-5]
  - provider: p2
    base_url: {fake:p2}
    api: vendor-openai-key
    model: [gpt-5-codex]
api_keys:
  - api: sk-admin-test-0001
    role: admin
  - api: sk-user-test-0002
    name: agent
    preferences: {credits: 1}
preferences:
  model_price:
    claude-sonnet-5-5: {token_price: '5,25', cache_read_price: 0.5, cache_write_price: 6.25}
    claude-haiku-5-5: {token_price: '1,5', cache_read_price: 0.1, cache_write_price: 1.25}
    gpt-5-codex: {token_price: '1.25,10', cache_read_price: 0.125}
"""


def per_million(tokens: int, usd: str) -> int:
    return int(Decimal(tokens) * Decimal(usd) * 1000)


def claude_call_nanos(prices: tuple[str, str, str, str]) -> int:
    """A call the Anthropic fake answers, at (input, cache write, cache read, output) prices."""
    usage = ANTHROPIC_USAGE
    counts = (usage["input_tokens"], usage["cache_creation_input_tokens"], usage["cache_read_input_tokens"], usage["output_tokens"])
    return sum(per_million(count, price) for count, price in zip(counts, prices, strict=True))


CLAUDE_PRICES = {"claude-sonnet-5-5": ("5", "6.25", "0.5", "25"), "claude-haiku-5-5": ("1", "1.25", "0.1", "5")}


def ledger(gateway) -> list[tuple[str, str, int, int]]:
    gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY)  # the ledger has written what settled
    with sqlite3.connect(gateway.config_path.parent / "data" / "tollgate.db") as db:
        return db.execute("SELECT model, status, cache_write_tokens, cost_nanos FROM usage ORDER BY ts").fetchall()


def run(args: list[str], home: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    environment = {"PATH": os.environ["PATH"], "HOME": str(home), "TMPDIR": str(home), **QUIET, **env}
    return subprocess.run(args, env=environment, cwd=home, capture_output=True, text=True, timeout=AGENT_TIMEOUT, stdin=subprocess.DEVNULL)


def claude(agents: Agents, gateway, home: Path, prompt: str) -> subprocess.CompletedProcess[str]:
    env = {
        "ANTHROPIC_BASE_URL": gateway.url,
        "ANTHROPIC_API_KEY": USER_KEY,
        "ANTHROPIC_MODEL": "claude-sonnet-5-5",
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": "claude-haiku-5-5",
    }
    return run([str(agents.claude), "-p", prompt], home, env)


def test_claude_code_prints_its_answer_through_the_gateway_on_a_one_dollar_key_billed_exactly(agents, start_gateway, upstream, agent_vendors, tmp_path):
    messages_vendor, _ = agent_vendors
    gateway = start_gateway(CONFIG, upstream)
    done = claude(agents, gateway, tmp_path, "Reply with pong.")
    assert done.returncode == 0, done.stderr
    assert messages_vendor.reply in done.stdout
    assert messages_vendor.refused == [], "every beta-only field came with its beta"
    calls = [seen for seen in upstream.seen if seen.path.endswith("/messages")]
    assert calls and len(calls) == len(messages_vendor.messages)
    for call in calls:
        betas = call.headers["anthropic-beta"].split(",")
        assert any(beta.startswith("claude-code-") for beta in betas)
        assert "context_management" not in call.body or any(beta.startswith("context-management-") for beta in betas)
        assert call.headers["x-api-key"] == "vendor-anthropic-key" and USER_KEY not in str(call.headers)
    asked = [call.body["max_tokens"] for call in calls]
    assert max(asked) * Decimal("0.000025") > 1, f"Claude Code asks for more output ({asked}) than $1 could reserve in full"
    rows = ledger(gateway)
    assert [(model, status, written) for model, status, written, _ in rows] == [(call.body["model"], "ok", 3000) for call in calls]
    assert [cost for *_, cost in rows] == [claude_call_nanos(CLAUDE_PRICES[model]) for model, *_ in rows]
    state = gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY).json()["api_keys_states"][USER_KEY]
    assert Decimal(str(state["remaining_credits"])) == 1 - Decimal(sum(cost for *_, cost in rows)) / 10**9
    by_model = {detail["model"]: detail for detail in state["cost_details"]["billing_details"]}
    assert {model: detail["cache_write_tokens"] for model, detail in by_model.items()} == {
        model: 3000 * sum(1 for row in rows if row[0] == model) for model in by_model
    }, "the cache writes are shown"


def test_claude_code_context_asks_the_vendor_to_count_and_costs_nothing(agents, start_gateway, upstream, agent_vendors, tmp_path):
    messages_vendor, _ = agent_vendors
    gateway = start_gateway(CONFIG, upstream)
    done = claude(agents, gateway, tmp_path, "/context")
    assert done.returncode == 0, done.stderr
    assert "Context Usage" in done.stdout and "claude-sonnet-5-5" in done.stdout
    counts = [seen for seen in upstream.seen if seen.path.endswith("/messages/count_tokens")]
    assert counts, "Claude Code asked the gateway to count"
    assert all("token-counting-" in seen.headers.get("anthropic-beta", "") or "claude-code-" in seen.headers.get("anthropic-beta", "") for seen in counts)
    assert messages_vendor.messages == [], "no billed max_tokens: 1 calls in place of counting"
    assert ledger(gateway) == []


def test_codex_exec_works_through_the_gateway_and_is_billed_exactly(agents, start_gateway, upstream, agent_vendors, tmp_path):
    _, responses_vendor = agent_vendors
    gateway = start_gateway(CONFIG, upstream)
    codex_home = tmp_path / ".codex"
    codex_home.mkdir()
    # As README "Coding agents" gives it; supports_websockets makes Codex try a WebSocket first,
    # as it does with OpenAI itself: the gateway's 426 must send it to HTTPS without retrying.
    (codex_home / "config.toml").write_text(
        textwrap.dedent(f"""
        model = "gpt-5-codex"
        model_provider = "tollgate"

        [model_providers.tollgate]
        name = "Tollgate"
        base_url = "{gateway.url}/v1"
        env_key = "TOLLGATE_API_KEY"
        wire_api = "responses"
        supports_websockets = true
        """)
    )
    done = run(
        [str(agents.codex), "exec", "--skip-git-repo-check", "Reply with pong."], tmp_path, {"TOLLGATE_API_KEY": USER_KEY, "CODEX_HOME": str(codex_home)}
    )
    assert done.returncode == 0, done.stderr
    assert responses_vendor.reply in done.stdout
    assert "Reconnecting" not in done.stderr, "Codex fell back from the WebSocket at once"
    (create,) = responses_vendor.creates
    assert create["model"] == "gpt-5-codex" and create["stream"] is True and create["store"] is False
    assert create["input"][0]["role"] == "developer" and create["input"][-1]["content"][0]["text"] == "Reply with pong."
    cached = CODEX_USAGE["input_tokens_details"]["cached_tokens"]  # type: ignore[index]
    uncached = CODEX_USAGE["input_tokens"] - cached  # type: ignore[operator]
    expected = per_million(uncached, "1.25") + per_million(cached, "0.125") + per_million(CODEX_USAGE["output_tokens"], "10")  # type: ignore[arg-type]
    assert ledger(gateway) == [("gpt-5-codex", "ok", 0, expected)]
