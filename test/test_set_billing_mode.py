"""set_billing_mode edits api.yaml by hand's width: the one value (or one inserted line or flow
entry) changes, every other byte of the file stays as its author wrote it."""

from __future__ import annotations

import asyncio
import difflib
import os
import stat

import httpx
import pytest

from core.config.writer import ConfigChangedError, ConfigWriteError, replace_text, set_key_preference
from test.conftest import ADMIN_KEY

LONG_FLOW = "{billing_mode: token, credits: 10, created_at: 2024-01-01T00:00:00+08:00, daily_cost_limit: 5, monthly_cost_limit: 50, count_credits: 0}"

CONFIG = f"""\
# Billing mode edits must change one line.
providers:
- provider: p1          # a list at zero indent
  base_url: {{fake:p1}}
  api: k
  model:
      - gpt-4o          # a deeper list
      - claude-3-5-sonnet
api_keys:
- api: {ADMIN_KEY}
  role: admin
- api: sk-block-0001
  name: block
  preferences:
     billing_mode: token          # odd indent, comment at a column of its own
     credits: 10
- api: sk-flow-0002
  preferences: {LONG_FLOW}
- api: sk-flowless-0003
  preferences: {{ credits: 10 }}
- api: sk-blockless-0004
  name: blockless   # no billing_mode yet
  preferences:
     credits: 10
- api: sk-bare-0005
  name: bare
- api: sk-only-0006
- api: sk-quoted-0007
  preferences: {{billing_mode: 'token'}}
preferences:
  model_price: {{gpt-4o: '1000,2000', claude-3-5-sonnet: '1000,2000'}}"""
CONFIG += "   \n"  # trailing spaces of the author's, which stay

CASES = {
    "block": ("sk-block-0001", "hybrid", ["-      billing_mode: token          # odd indent, comment at a column of its own",
                                          "+      billing_mode: hybrid         # odd indent, comment at a column of its own"]),
    "flow": ("sk-flow-0002", "count", [f"-   preferences: {LONG_FLOW}", "+   preferences: " + LONG_FLOW.replace("billing_mode: token", "billing_mode: count")]),
    "flow without billing_mode": ("sk-flowless-0003", "count", ["-   preferences: { credits: 10 }", "+   preferences: { billing_mode: count, credits: 10 }"]),
    "block without billing_mode": ("sk-blockless-0004", "count", ["+      billing_mode: count"]),
    "no preferences": ("sk-bare-0005", "count", ["+   preferences: {billing_mode: count}"]),
    "only the key": ("sk-only-0006", "hybrid", ["+   preferences: {billing_mode: hybrid}"]),
    "quoted": ("sk-quoted-0007", "count", ["-   preferences: {billing_mode: 'token'}", "+   preferences: {billing_mode: 'count'}"]),
}  # fmt: skip


def changed_lines(before: str, after: str) -> list[str]:
    return [line for line in difflib.ndiff(before.splitlines(), after.splitlines()) if line[:1] in "+-"]


@pytest.mark.parametrize("case", CASES)
def test_set_billing_mode_changes_exactly_one_line(start_gateway, upstream, case):
    key, mode, expected = CASES[case]
    gateway = start_gateway(CONFIG, upstream)
    gateway.config_path.chmod(0o640)
    before = gateway.config_path.read_bytes().decode()
    response = gateway.http("POST", "/v1/set_billing_mode", key=ADMIN_KEY, params={"paid_key": key, "billing_mode": mode})
    assert response.status_code == 200, response.text
    assert response.json()["api_key_state"]["billing_mode"] == mode
    after = gateway.config_path.read_bytes().decode()
    assert changed_lines(before, after) == expected
    assert len(after.splitlines()) == len(before.splitlines()) + (len(expected) == 1)
    assert after.endswith("'1000,2000'}   \n")
    assert stat.S_IMODE(os.stat(gateway.config_path).st_mode) == 0o640
    assert gateway.status()["last_error"] is None


def test_set_billing_mode_keeps_windows_line_ends(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream)
    gateway.config_path.write_bytes(CONFIG.replace("{fake:p1}", upstream.base_url("p1")).replace("\n", "\r\n").encode())
    gateway.wait_for(lambda s: s["last_error"] is None)
    before = gateway.config_path.read_bytes()
    response = gateway.http("POST", "/v1/set_billing_mode", key=ADMIN_KEY, params={"paid_key": "sk-bare-0005", "billing_mode": "count"})
    assert response.status_code == 200, response.text
    after = gateway.config_path.read_bytes()
    assert after.count(b"\r\n") == before.count(b"\r\n") + 1 and after.count(b"\n") == after.count(b"\r\n")


@pytest.mark.parametrize(
    ("entry", "edited"),
    [
        ("  preferences:\n", "  preferences: {billing_mode: count}\n"),
        ("  preferences: ~   # none yet\n", "  preferences: {billing_mode: count} # none yet\n"),
        ("  preferences: {}\n", "  preferences: {billing_mode: count}\n"),
        ("  preferences:\n    billing_mode:\n", "  preferences:\n    billing_mode: count\n"),
        ('  preferences: {billing_mode: "token", credits: 1}\n', '  preferences: {billing_mode: "count", credits: 1}\n'),
    ],
)
def test_empty_and_quoted_values_are_filled_in_place(tmp_path, entry, edited):
    path = tmp_path / "api.yaml"
    path.write_text("api_keys:\n- api: sk-x\n" + entry + "- api: sk-y\n")
    set_key_preference(path, "sk-x", "billing_mode", "count")
    assert path.read_text() == "api_keys:\n- api: sk-x\n" + edited + "- api: sk-y\n"


def test_a_file_that_starts_with_a_byte_order_mark_is_edited_and_keeps_it(tmp_path):
    path = tmp_path / "api.yaml"
    before = "\ufeffapi_keys:\n- api: sk-x\n  preferences:\n    billing_mode: token\n- api: sk-y\n"
    path.write_bytes(before.encode())
    set_key_preference(path, "sk-x", "billing_mode", "count")
    after = path.read_bytes().decode()
    assert after.startswith("\ufeff") and changed_lines(before, after) == ["-     billing_mode: token", "+     billing_mode: count"]


def test_a_file_without_a_last_newline_gets_the_line_appended(tmp_path):
    path = tmp_path / "api.yaml"
    path.write_text("api_keys:\n- api: sk-x")
    set_key_preference(path, "sk-x", "billing_mode", "count")
    assert path.read_text() == "api_keys:\n- api: sk-x\n  preferences: {billing_mode: count}\n"


@pytest.mark.parametrize("secret", ["sk-a", "sk-b"])
def test_preferences_shared_through_an_alias_are_not_edited(tmp_path, secret):
    path = tmp_path / "api.yaml"
    text = "api_keys:\n- api: sk-a\n  preferences: &shared {billing_mode: token}\n- api: sk-b\n  preferences: *shared\n"
    path.write_text(text)
    with pytest.raises(ConfigWriteError, match="by hand"):
        set_key_preference(path, secret, "billing_mode", "count")
    assert path.read_text() == text


def broken(config: str, line: int) -> str:
    """`config` with a key missing its ':' on `line` (1-based)."""
    lines = config.splitlines(keepends=True)
    lines.insert(line - 1, "  name alice\n")
    return "".join(lines)


def test_set_billing_mode_on_a_file_with_a_syntax_error_names_it(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream, watch=False)  # the action looks at the file itself
    mistake_line = CONFIG.splitlines().index("- api: sk-bare-0005") + 2
    gateway.config_path.write_text(broken(gateway.config_path.read_text(), mistake_line))
    before = gateway.config_path.read_text()
    response = gateway.http("POST", "/v1/set_billing_mode", key=ADMIN_KEY, params={"paid_key": "sk-block-0001", "billing_mode": "count"})
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "config_invalid"
    assert error["message"] == (
        f"api.yaml has an error at line {mistake_line}, column 3: YAML syntax error: could not find expected ':' (while scanning a simple key); fix it first"
    )
    assert gateway.config_path.read_text() == before


def test_set_billing_mode_on_a_file_that_does_not_validate_leaves_it_alone(start_gateway, upstream):
    gateway = start_gateway(CONFIG, upstream, watch=False)
    gateway.config_path.write_text(gateway.config_path.read_text().replace("role: admin", "role: [admin]"))
    before = gateway.config_path.read_text()
    response = gateway.http("POST", "/v1/set_billing_mode", key=ADMIN_KEY, params={"paid_key": "sk-block-0001", "billing_mode": "count"})
    assert response.status_code == 409 and response.json()["error"]["code"] == "config_invalid"
    assert response.json()["error"]["message"].startswith("api.yaml has an error at line 11, column 3: api_keys[0].role must be a string, got a list")
    assert gateway.config_path.read_text() == before


PARALLEL_KEYS = [f"sk-parallel-{n:04d}" for n in range(6)]
PARALLEL_CONFIG = f"""\
providers:
- provider: p1
  base_url: {{fake:p1}}
  api: k
  model: [gpt-4o]
api_keys:
- api: {ADMIN_KEY}
  role: admin
""" + "".join(f"- api: {key}\n  name: parallel{n}\n" for n, key in enumerate(PARALLEL_KEYS))


def test_concurrent_set_billing_mode_calls_all_land(start_gateway, upstream):
    gateway = start_gateway(PARALLEL_CONFIG, upstream)

    async def all_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gateway.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as client:
            calls = (client.post("/v1/set_billing_mode", params={"paid_key": key, "billing_mode": "count"}) for key in PARALLEL_KEYS)
            return list(await asyncio.gather(*calls))

    responses = asyncio.run(all_at_once())
    assert [response.status_code for response in responses] == [200] * len(PARALLEL_KEYS), [r.text for r in responses]
    text = gateway.config_path.read_text()
    assert text.count("preferences: {billing_mode: count}") == len(PARALLEL_KEYS)
    states = gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY).json()["api_keys_states"]
    assert sorted(state["name"] for state in states.values() if state["billing_mode"] == "count") == [f"parallel{n}" for n in range(6)]
    entries = gateway.http("GET", "/v1/audit_log", key=ADMIN_KEY).json()["entries"]
    assert sorted(entry["target_name"] for entry in entries if entry["action"] == "set_billing_mode") == [f"parallel{n}" for n in range(6)]
    assert all(entry["after"] == '{"billing_mode":"count"}' for entry in entries)


def test_a_file_saved_by_someone_else_during_the_edit_is_not_overwritten(tmp_path):
    path = tmp_path / "api.yaml"
    path.write_text("api_keys:\n- api: sk-x\n  name: saved by the operator\n")
    with pytest.raises(ConfigChangedError, match=r"api\.yaml changed while it was being edited; try again"):
        replace_text(path, "api_keys:\n- api: sk-x\n", "api_keys:\n- api: sk-x\n  preferences: {billing_mode: count}\n")
    assert path.read_text() == "api_keys:\n- api: sk-x\n  name: saved by the operator\n"
    assert [p.name for p in tmp_path.iterdir()] == ["api.yaml"]  # no temporary file left behind
