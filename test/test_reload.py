"""Hot reload of api.yaml: edits apply without restart, broken files keep the old config."""

from __future__ import annotations

import os
import sqlite3
import threading
import time

import openai
import pytest

from test.conftest import ADMIN_KEY, FREE, USER_KEY, keys_yaml
from test.servers import held_stream, streamed_text

ECHO = "providers:\n  - provider: echo\n    engine: echo\n    model: [echo-1]\n" + FREE + keys_yaml()
ECHO_TWO_MODELS = "providers:\n  - provider: echo\n    engine: echo\n    model: [echo-1, echo-2]\n" + FREE + keys_yaml()
MESSAGES = [{"role": "user", "content": "hi"}]


def test_edit_applies_without_restart(start_gateway):
    gateway = start_gateway(ECHO)
    client = gateway.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="echo-2", messages=MESSAGES)
    gateway.rewrite_config(ECHO_TWO_MODELS)
    assert client.chat.completions.create(model="echo-2", messages=MESSAGES).choices[0].message.content == "Echo: hi"
    assert gateway.status()["reload_count"] == 1


def test_in_place_write_is_picked_up(start_gateway):
    gateway = start_gateway(ECHO)
    gateway.config_path.write_text(ECHO_TWO_MODELS)  # not atomic: truncate + write
    gateway.wait_for(lambda s: s["models"] == 2 and s["last_error"] is None)


def test_broken_file_keeps_the_old_config_and_reports_the_line(start_gateway):
    gateway = start_gateway(ECHO)
    gateway.rewrite_config(ECHO.replace(FREE, FREE + "  cooldown_period: -1\n"))
    status = gateway.status()
    assert status["last_error"]["line"] == 7  # the cooldown_period line
    assert status["last_error"]["column"] == 3
    assert "cooldown_period must be >= 0" in status["last_error"]["reason"]
    assert status["last_error"]["file"] == str(gateway.config_path)
    assert gateway.client().chat.completions.create(model="echo-1", messages=MESSAGES).choices[0].message.content == "Echo: hi"
    gateway.rewrite_config(ECHO_TWO_MODELS)
    status = gateway.status()
    assert status["last_error"] is None and status["models"] == 2


def test_unset_variable_on_reload_keeps_the_old_config(start_gateway, monkeypatch):
    monkeypatch.delenv("TOLLGATE_TEST_UNSET", raising=False)
    gateway = start_gateway(ECHO)
    gateway.rewrite_config(ECHO.replace("name: ops", "name: ${TOLLGATE_TEST_UNSET}"))
    assert "TOLLGATE_TEST_UNSET is not set" in gateway.status()["last_error"]["reason"]
    assert gateway.http("GET", "/v1/models").status_code == 200


def test_yaml_only_ruamel_reads_loads_at_start_and_on_reload(start_gateway):
    """The fast C parser refuses the ':' of a timezone in a flow mapping; the file still loads."""
    flow = "    preferences: {billing_mode: token, credits: 10.0, created_at: 2024-01-01T00:00:00+08:00}\n"
    gateway = start_gateway(ECHO + flow)
    assert gateway.http("GET", "/v1/usage").json()["balance"]["credits"] == 10
    gateway.rewrite_config(ECHO_TWO_MODELS + flow)
    status = gateway.status()
    assert status["last_error"] is None and status["models"] == 2


def test_deleted_file_keeps_serving(start_gateway):
    gateway = start_gateway(ECHO)
    gateway.config_path.unlink()
    status = gateway.wait_for(lambda s: s["last_error"] is not None)
    assert "removed" in status["last_error"]["reason"]
    assert gateway.http("GET", "/v1/models").status_code == 200


def test_removed_key_is_refused_after_reload(start_gateway):
    gateway = start_gateway(ECHO)
    gateway.rewrite_config(
        "providers:\n  - provider: echo\n    engine: echo\n    model: [echo-1]\n" + FREE + "api_keys:\n  - api: " + ADMIN_KEY + "\n    role: admin\n"
    )
    assert gateway.http("GET", "/v1/models").status_code == 401


def test_symlink_swap_is_followed(start_gateway, tmp_path):
    """Kubernetes ConfigMaps: api.yaml -> ..data/api.yaml, and `..data` is a symlink that gets swapped."""
    gateway = start_gateway(ECHO)
    first, second = tmp_path / "v1", tmp_path / "v2"
    first.mkdir()
    second.mkdir()
    (first / "api.yaml").write_text(ECHO)
    (second / "api.yaml").write_text(ECHO_TWO_MODELS)
    os.symlink("v1", tmp_path / "..data")
    os.symlink("..data/api.yaml", tmp_path / "api.tmp")
    os.replace(tmp_path / "api.tmp", gateway.config_path)
    os.symlink("v2", tmp_path / "..data_tmp")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    gateway.wait_for(lambda s: s["models"] == 2)


def test_streams_in_flight_finish_across_a_reload(start_gateway, upstream):
    """Requests keep the config they started with, even when the reload removes their model."""
    release = threading.Event()
    upstream.script("p1", held_stream(release, ["one", " two"]))
    config = (
        "providers:\n  - provider: p1\n    base_url: {fake:p1}\n    api: k\n    model: [gpt-4o]\n  - provider: echo\n    engine: echo\n    model: [echo-1]\n"
        + FREE
        + keys_yaml()
    )
    gateway = start_gateway(config, upstream)
    client = gateway.client()
    streams = [client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True) for _ in range(5)]
    firsts = [next(iter(stream)).choices[0].delta.content for stream in streams]
    gateway.rewrite_config(ECHO)  # gpt-4o is gone from the new config
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    release.set()
    rests = [streamed_text(stream) for stream in streams]
    assert firsts == ["one"] * 5
    assert rests == [" two"] * 5


BILLED = f"""
providers:
  - provider: echo
    engine: echo
    model: [echo-1]
api_keys:
  - api: {ADMIN_KEY}
    role: admin
  - api: {USER_KEY}
    name: NAME
    preferences: {{billing_mode: token, credits: 10}}
preferences:
  model_price: {{default: '1000,2000'}}
"""


def _broken_variants(valid: str) -> list[tuple[str, str | None]]:
    """(kind, file text or None for 'deleted'): every way a reload can fail."""
    return [
        ("syntax", valid + "  - [unclosed\n"),
        ("schema", valid.replace("billing_mode: token", "billing_mode: tokens")),
        ("unset variable", BILLED.replace("NAME", "${TOLLGATE_TEST_UNSET_VARIABLE}")),
        ("half-written", valid[: valid.index("billing_mode") + 8]),  # cut off inside a mapping
        ("deleted", None),
    ]


def test_two_hundred_reloads_under_load_fail_no_request(start_gateway):
    """Good and broken configs alternate 200 times while clients call without pause: every
    request is answered, every broken file keeps the last good config serving."""
    gateway = start_gateway(BILLED.replace("NAME", "alice-start"), watch=False)
    store = gateway.server.app.state.store
    stop, statuses = threading.Event(), []

    def client() -> None:
        with gateway.client(USER_KEY) as api:
            while not stop.is_set():
                try:
                    api.chat.completions.create(model="echo-1", messages=MESSAGES)
                    statuses.append(200)
                except openai.APIStatusError as exc:
                    statuses.append(exc.status_code)

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    failed_reloads = 0
    try:
        for round_ in range(200):
            valid = BILLED.replace("NAME", f"alice-{round_}")
            kind, text = _broken_variants(valid)[round_ % 5] if round_ % 4 == 3 else ("good", valid)
            if text is None:
                gateway.config_path.unlink()
            else:
                tmp = gateway.config_path.with_suffix(".tmp")
                tmp.write_text(text)
                os.replace(tmp, gateway.config_path)
            swapped = gateway.server.call(store.reload())
            time.sleep(0.01)  # let requests run on each config
            if kind == "good":
                assert swapped and store.last_error is None, store.last_error
            else:
                failed_reloads += 1
                assert not swapped and store.last_error is not None, kind
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert len(statuses) > 200 and set(statuses) == {200}
    assert store.reload_count >= 150 and failed_reloads == 50


def test_a_key_removed_from_the_config_keeps_its_history_and_gets_its_balance_back(start_gateway):
    gateway = start_gateway(BILLED.replace("NAME", "alice"))
    gateway.client(USER_KEY).chat.completions.create(model="echo-1", messages=MESSAGES)
    before = gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY).json()["api_keys_states"][USER_KEY]
    assert before["remaining_credits"] < 10

    without = BILLED.split(f"  - api: {USER_KEY}")[0] + "preferences:\n  model_price: {default: '1000,2000'}\n"
    gateway.rewrite_config(without)
    assert gateway.http("GET", "/v1/models", key=USER_KEY).status_code == 401
    with sqlite3.connect(gateway.config_path.parent / "data" / "tollgate.db") as db:
        assert db.execute("SELECT COUNT(*) FROM usage WHERE key_name = 'alice'").fetchone() == (1,)  # history kept

    gateway.rewrite_config(BILLED.replace("NAME", "alice"))
    after = gateway.http("GET", "/v1/api_keys_states", key=ADMIN_KEY).json()["api_keys_states"][USER_KEY]
    assert after["remaining_credits"] == before["remaining_credits"] and after["request_count"] == 1
