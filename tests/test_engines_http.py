"""The http engine against a real OpenAI-compatible server on 127.0.0.1 serving the tiny model."""

from __future__ import annotations

import time

import pytest

from pipelines.engines import GenParams, get_engine
from pipelines.engines.http import HTTPError, chat_completions_url
from tests.evalkit import chats, lively_model
from tests.openai_server import serve


@pytest.fixture(scope="module")
def hf(tiny_model, tmp_path_factory):
    return get_engine("hf", model=str(lively_model(tiny_model, tmp_path_factory.mktemp("lively"))), batch_size=4)


def test_url_forms():
    for u in ("http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/chat/completions"):
        assert chat_completions_url(u) == "http://h:1/v1/chat/completions"


def test_same_outputs_as_the_engine_it_serves(hf, monkeypatch):
    monkeypatch.setenv("TEST_SERVER_KEY", "sekret")
    p = GenParams(max_new_tokens=8)
    with serve(hf, api_key="sekret") as (url, state):
        eng = get_engine("http", model="tiny", url=url + "/v1", api_key_env="TEST_SERVER_KEY", concurrency=3)
        got = eng.generate(chats(6), p)
        assert state["requests"] == 6
    want = [hf.generate([c], p)[0] for c in chats(6)]
    assert [g.text for g in got] == [w.text for w in want]
    assert [g.completion_tokens for g in got] == [w.completion_tokens for w in want]
    assert all(g.prompt_tokens > 0 and g.latency_s > 0 for g in got)


def test_api_key_comes_from_env_and_is_checked(hf, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ValueError, match="NO_SUCH_KEY_VAR"):
        get_engine("http", url="http://127.0.0.1:9", api_key_env="NO_SUCH_KEY_VAR")
    monkeypatch.setenv("WRONG_KEY", "nope")
    with serve(hf, api_key="sekret") as (url, state):
        eng = get_engine("http", url=url, api_key_env="WRONG_KEY", retries=3, backoff_s=0.01)
        with pytest.raises(HTTPError, match="401"):
            eng.generate(chats(1), GenParams(max_new_tokens=2))
        assert state["requests"] == 1, "a 401 must not be retried"


def test_retries_503_then_succeeds(hf):
    with serve(hf, fail_first=2) as (url, state):
        eng = get_engine("http", url=url, retries=3, backoff_s=0.01, concurrency=1)
        out = eng.generate(chats(1), GenParams(max_new_tokens=4))
        assert state["requests"] == 3
        assert out[0].extra["retries"] == 2
    with serve(hf, fail_first=10) as (url, state):
        eng = get_engine("http", url=url, retries=1, backoff_s=0.01, concurrency=1)
        with pytest.raises(HTTPError, match="after 2 attempts"):
            eng.generate(chats(1), GenParams(max_new_tokens=4))


def test_connection_refused_is_retried_then_reported():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    eng = get_engine("http", url=f"http://127.0.0.1:{port}", retries=2, backoff_s=0.01, timeout_s=2)
    start = time.perf_counter()
    with pytest.raises(HTTPError, match="ConnectError"):
        eng.generate(chats(1), GenParams(max_new_tokens=2))
    assert time.perf_counter() - start < 10
