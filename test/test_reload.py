"""Hot reload of api.yaml: edits apply without restart, broken files keep the old config."""

from __future__ import annotations

import os
import threading

import openai
import pytest

from test.conftest import ADMIN_KEY, keys_yaml
from test.servers import held_stream, streamed_text

ECHO = "providers:\n  - provider: echo\n    engine: echo\n    model: [echo-1]\n" + keys_yaml()
ECHO_TWO_MODELS = "providers:\n  - provider: echo\n    engine: echo\n    model: [echo-1, echo-2]\n" + keys_yaml()
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
    gateway.rewrite_config(ECHO + "preferences:\n  cooldown_period: -1\n")
    status = gateway.status()
    assert status["last_error"]["line"] == len(ECHO.splitlines()) + 2  # the cooldown_period line
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


def test_deleted_file_keeps_serving(start_gateway):
    gateway = start_gateway(ECHO)
    gateway.config_path.unlink()
    status = gateway.wait_for(lambda s: s["last_error"] is not None)
    assert "removed" in status["last_error"]["reason"]
    assert gateway.http("GET", "/v1/models").status_code == 200


def test_removed_key_is_refused_after_reload(start_gateway):
    gateway = start_gateway(ECHO)
    gateway.rewrite_config("providers:\n  - provider: echo\n    engine: echo\n    model: [echo-1]\napi_keys:\n  - api: " + ADMIN_KEY + "\n    role: admin\n")
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
