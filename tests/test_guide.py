"""Constrained decoding: the schema automaton against jsonschema, and the HF engine under it."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from pipelines.engines import GenParams, get_engine
from pipelines.guide import Guide, guide_for
from tests.evalkit import chats, lively_model

SCHEMA = {
    "$defs": {"tag": {"enum": ["red", "green", "blue"]}},
    "type": "object", "additionalProperties": False, "required": ["kind", "n", "entity"],
    "properties": {
        "kind": {"enum": ["cancel_order", "cancel", "track_order"]},  # one value a prefix of another
        "n": {"type": "integer"},
        "score": {"type": "number"},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 2},
        "entity": {"oneOf": [{"type": "null"}, {
            "type": "object", "additionalProperties": False, "required": ["type", "value"],
            "properties": {"type": {"type": "string"}, "value": {"type": "string"}}}]},
    },
}


def _valid_value(rng: random.Random) -> dict:
    v = {"kind": rng.choice(["cancel_order", "cancel", "track_order"]), "n": rng.randint(-50, 10**6),
         "entity": rng.choice([None, {"type": rng.choice(["id", "näme", 'q"uote\\']), "value": str(rng.random())}])}
    if rng.random() < 0.5:
        v["score"] = rng.choice([0, -1.5, 3.25e-3, 12.0, 1e21])
    if rng.random() < 0.5:
        v["ok"] = rng.random() < 0.5
    if rng.random() < 0.5:
        v["tags"] = rng.sample(["red", "green", "blue"], rng.randint(0, 2))
    # the schema's key order: the grammar vLLM enforces (and so ours) emits keys in that order
    return {k: v[k] for k in SCHEMA["properties"] if k in v}


def _mutate(v: dict, rng: random.Random) -> dict:
    v = dict(v)
    how = rng.randrange(7)
    if how == 0:
        v["kind"] = rng.choice(["edit_order", "cancel_", "CANCEL"])
    elif how == 1:
        v.pop(rng.choice(["kind", "n", "entity"]))
    elif how == 2:
        v["extra"] = 1
    elif how == 3:
        v["n"] = rng.choice([1.5, "7", None])
    elif how == 4:
        v["tags"] = ["red", "green", "blue"] if rng.random() < 0.5 else ["pink"]
    elif how == 5:
        v["entity"] = {"type": "id"}
    else:
        v["ok"] = "yes"
    return v


def _texts(v) -> list[tuple[str, bool]]:
    """(text, whether it is compact): the grammar is vLLM's with whitespace off, compact JSON only."""
    return [(json.dumps(v, separators=(",", ":")), True), (json.dumps(v, separators=(",", ":"), ensure_ascii=False), True),
            (json.dumps(v), False), (json.dumps(v, indent=2, ensure_ascii=False), False)]


def test_automaton_agrees_with_jsonschema_on_valid_and_broken_records():
    g = Guide.json_schema(SCHEMA)
    validator = jsonschema.Draft202012Validator(SCHEMA)
    rng = random.Random(0)
    checked = rejected = 0
    for _ in range(300):
        good = _valid_value(rng)
        for v in (good, _mutate(good, rng)):
            expect = validator.is_valid(v)
            for text, compact in _texts(v):
                assert g.accepts(text) == (expect and compact), (text, expect)
                checked += 1
                rejected += not expect
            if expect:  # every prefix of a valid text must stay completable
                text = json.dumps(v, separators=(",", ":"))
                state = g.start
                for i, c in enumerate(text):
                    state = g.advance(state, c)
                    assert state is not None, f"prefix {text[:i + 1]!r} rejected"
    assert checked > 1500 and rejected > 300


@pytest.mark.parametrize("prefix, ok", [
    ('{"kind":"cancel', True), ('{"kind":"cancel_', True), ('{"kind":"edit', False),
    ('{"kind":"cancel","n":01', False), ('{"kind":"cancel","n":-', True), ('{"kind":"cancel","n":1.', False), ('{"kind":"cancel","n":1,"entity":{"type":"a\\', True),
    ('{"kind":"cancel","n":1,"entity":{"type":"a\\x', False), ('{"kind":"cancel","kind"', False),  # a key twice
    ('{"kind":"cancel","n":1,', True),  # optional keys remain
    ('{"kind":"cancel","n":1,"entity":null,', False),  # entity is the last key: none may follow
    ('{"n":1', False), ('{"kind":"cancel","tags":[],"n"', False),  # keys in the schema's order only
    ('{"kind":"cancel","n":-0', False),  # no integer -0, as vLLM's grammar
    ('{"kind":"cancel","n":1,"entity":null}x', False), (" {", False),
    ('{"kind":"cancel","n":1,"tags":["red","green",', False),  # maxItems 2
    ('{ ', False), ('{"kind": ', False), ('{"kind":"cancel",\n', False),  # no whitespace outside strings
    ('{"kind":"cancel","n":1,"entity":{"type":"a b\\n', True),  # inside a string it is text
])
def test_prefixes(prefix, ok):
    g = Guide.json_schema(SCHEMA)
    assert (g.advance(g.start, prefix) is not None) == ok


def test_choice_and_guide_for_contracts():
    from pipelines.spec import Contract

    g = Guide.choice(["pos", "positive", "neg"])
    assert g.accepts("pos") and g.accepts("positive") and not g.accepts("po") and g.advance(g.start, "x") is None
    assert guide_for(Contract(type="label", labels=["a", "b"])) is None  # off unless asked for
    assert json.loads(guide_for(Contract(type="label", labels=["a", "b"], constrained_decoding=True))) == {
        "choice": ["a", "b"]}
    spec = json.loads(guide_for(Contract(type="json", schema=SCHEMA, constrained_decoding=True)))
    assert spec == {"json_schema": SCHEMA}
    with pytest.raises(ValueError, match="constrained_decoding"):
        Contract(type="text", constrained_decoding=True)


# -- the HF engine on a tiny random model: its free outputs are gibberish ---------------------------
ENUM_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["label", "flag", "sub"],
               "properties": {"label": {"enum": ["alpha", "bravo", "charlie delta"]}, "flag": {"type": "boolean"},
                              "sub": {"anyOf": [{"type": "null"}, {"type": "object", "required": ["x"],
                                      "additionalProperties": False, "properties": {"x": {"enum": [1, 2]}}}]}}}


@pytest.fixture(scope="module")
def engine(tiny_model, tmp_path_factory):
    return get_engine("hf", model=str(lively_model(tiny_model, tmp_path_factory.mktemp("lively"))), batch_size=4)


def test_every_guided_output_is_valid_where_free_ones_are_not(engine):
    validator = jsonschema.Draft202012Validator(ENUM_SCHEMA)
    cs = chats(6)
    free = engine.generate(cs, GenParams(max_new_tokens=60))
    guide = json.dumps({"json_schema": ENUM_SCHEMA})
    for params in (GenParams(max_new_tokens=200, guide=guide),
                   GenParams(max_new_tokens=200, guide=guide, temperature=1.0, seed=3)):
        out = engine.generate(cs, params)
        for o in out:
            assert o.finish_reason == "stop", o.text
            assert validator.is_valid(json.loads(o.text)), o.text
    assert not any(_parses(o.text) for o in free), "the random model should not write JSON on its own"
    assert all(o.extra["guide_interventions"] > 0 for o in engine.generate(cs, GenParams(max_new_tokens=200, guide=guide)))


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def test_no_intervention_means_the_free_output(engine):
    cs = chats(5)
    free = engine.generate(cs, GenParams(max_new_tokens=8))
    # the model's own outputs are all allowed: greedy decoding must not change a single one
    own = json.dumps({"choice": [f.text for f in free]})
    guided = engine.generate(cs, GenParams(max_new_tokens=8, guide=own))
    assert [g.text for g in guided] == [f.text for f in free]
    assert [g.extra["guide_interventions"] for g in guided] == [0] * len(cs)
    # outputs the model would not write: it is steered into one of them, and the steering is counted
    other = ["alpha", "bravo bravo"]
    steered = engine.generate(cs, GenParams(max_new_tokens=8, guide=json.dumps({"choice": other})))
    assert all(s.text in other and s.extra["guide_interventions"] >= 1 for s in steered)


def test_training_targets_are_written_as_the_guide_makes_the_model_write_them():
    """Data written with ", " and ": " (as the demo's prepare.py does) is trained in the grammar's
    compact form, properties in schema order: the guide accepts exactly the trained tokens."""
    from pipelines.contract import Checker
    from pipelines.spec import Contract

    schema = json.loads(open("examples/support-triage/schema.json").read())
    contract = Contract(type="json", schema=schema, constrained_decoding=True)
    guide = Guide.from_spec(guide_for(contract))
    spaced = json.dumps({"entity": {"value": "Zoë 42", "type": "name"}, "category": "ORDER",
                         "intent": "cancel_order"}, separators=(", ", ": "), ensure_ascii=False)
    assert not guide.accepts(spaced)  # what the model would learn, and then be forbidden to write
    decoded = Checker(contract).as_decoded(spaced)
    assert guide.accepts(decoded) and json.loads(decoded) == json.loads(spaced)
    assert decoded == '{"intent":"cancel_order","category":"ORDER","entity":{"type":"name","value":"Zoë 42"}}'
    null_entity = Checker(contract).as_decoded('{"intent": "review", "category": "FEEDBACK", "entity": null}')
    assert guide.accepts(null_entity) and null_entity.endswith('"entity":null}')
    # invalid answers, free decoding and other contract types: left as written
    for c, text in ((contract, '{"intent": "teleport"}'), (Contract(type="json", schema=schema), spaced),
                    (Contract(type="label", labels=["a", "b"], constrained_decoding=True), " a ")):
        assert Checker(c).as_decoded(text) == text


def test_training_targets_follow_refs_and_untyped_parts_as_the_guide_writes_them():
    """Keys reached through a local $ref are put in the referenced schema's order, and an untyped
    value is written with xgrammar's ", " between its members: text the guide accepts."""
    from pipelines.contract import Checker
    from pipelines.spec import Contract

    schema = {"type": "object", "required": ["order", "extra"], "additionalProperties": False,
              "$defs": {"order": {"type": "object", "required": ["id", "items"], "additionalProperties": False,
                                  "properties": {"id": {"type": "integer"}, "items": {"type": "array",
                                                                                      "items": {"type": "string"}}}}},
              "properties": {"order": {"$ref": "#/$defs/order"}, "extra": {}}}
    contract = Contract(type="json", schema=schema, constrained_decoding=True)
    guide = Guide.from_spec(guide_for(contract))
    text = json.dumps({"extra": {"b": [1, 2], "a": "x, y"}, "order": {"items": ["a", "b"], "id": 7}}, indent=2)
    decoded = Checker(contract).as_decoded(text)
    assert decoded == '{"order":{"id":7,"items":["a","b"]},"extra":{"b":[1, 2], "a":"x, y"}}'
    assert guide.accepts(decoded) and json.loads(decoded) == json.loads(text)
    assert guide.write({"extra": 1, "order": {"id": 1, "items": []}}) is None  # keys out of the schema's order
