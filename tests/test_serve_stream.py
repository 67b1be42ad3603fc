"""The HF engine's incremental generation and log-probabilities, which streaming and ``logprobs``
in serving are built on: a real tiny model, no Serve."""

from __future__ import annotations

import json
import math

import pytest

from pipelines.engines import GenParams, get_engine
from pipelines.engines.hf import _settled

CHAT = [{"role": "user", "content": "where is my parcel"}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory, gpt2_tokenizer):
    from pipelines.modeling import init_model

    out = tmp_path_factory.mktemp("stream-model")
    init_model(out, tokenizer=gpt2_tokenizer, layers=1, hidden=32, heads=2, seed=5)
    return get_engine("hf", model=str(out))


def _stream(engine, params):
    parts = list(engine.stream(CHAT, params))
    assert all(isinstance(p, str) for p in parts[:-1]) and not isinstance(parts[-1], str)
    return parts[:-1], parts[-1]


@pytest.mark.parametrize("params", [
    GenParams(max_new_tokens=12, temperature=1.0, seed=7),
    GenParams(max_new_tokens=12, temperature=0.0),
    GenParams(max_new_tokens=16, guide=json.dumps({"choice": ["refund", "shipping"]})),
], ids=["sampled", "greedy", "guided"])
def test_stream_joins_up_to_the_batch_answer(engine, params):
    deltas, final = _stream(engine, params)
    whole = engine.generate([CHAT], params)[0]
    assert "".join(deltas) == final.text == whole.text
    assert (final.finish_reason, final.completion_tokens) == (whole.finish_reason, whole.completion_tokens)
    if params.guide:
        assert final.text in ("refund", "shipping")
    else:
        assert len(deltas) > 1  # it really came in pieces


def test_stream_cuts_at_a_stop_string_and_never_sends_part_of_it(engine):
    sampled = engine.generate([CHAT], GenParams(max_new_tokens=16, temperature=1.0, seed=7))[0].text
    words = sampled.split()
    assert len(words) >= 3, sampled
    stop = words[2][:4]  # a string the model is known to produce, somewhere in the middle
    params = GenParams(max_new_tokens=16, temperature=1.0, seed=7, stop=(stop,))
    deltas, final = _stream(engine, params)
    assert final.text == sampled[:sampled.find(stop)] and final.finish_reason == "stop"
    assert "".join(deltas) == final.text and stop not in "".join(deltas)


def test_settled_holds_back_what_may_become_a_stop_string():
    assert _settled("hello wor", ("world",)) == len("hello ")
    assert _settled("hello world!", ("world",)) == len("hello ")
    assert _settled("hello", ("xyz",)) == 5
    assert _settled("caf\ufffd", ()) == 3  # an unfinished UTF-8 character waits for its next byte


def test_logprobs_are_the_models_own_distribution(engine):
    out = engine.generate([CHAT], GenParams(max_new_tokens=6, logprobs=3))[0]
    entries = out.extra["logprobs"]
    assert len(entries) == out.completion_tokens
    for e in entries:
        assert e["logprob"] <= 0 and len(e["top_logprobs"]) == 3
        tops = [t["logprob"] for t in e["top_logprobs"]]
        assert tops == sorted(tops, reverse=True)
        # greedy decoding takes the most likely token: it heads its own alternatives
        assert math.isclose(e["logprob"], tops[0], abs_tol=1e-6) and e["token"] == e["top_logprobs"][0]["token"]
    # probabilities over the whole vocabulary sum to one (a real softmax, not a renormalised top-k)
    assert sum(math.exp(t["logprob"]) for t in entries[0]["top_logprobs"]) <= 1.0 + 1e-6
    assert "logprobs" not in engine.generate([CHAT], GenParams(max_new_tokens=2))[0].extra
