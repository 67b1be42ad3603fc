"""Preference tuning (train.method: dpo): the loss math, the reference model, the factory's pairs,
and 40 real DPO steps on the shared preference data through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from typer.testing import CliRunner

from infra.registry import Registry
from jobs.cli import app
from pipelines.spec import load_spec
from pipelines.train.dpo import Reference, collate_pairs, encode_pairs, preference_loss, sequence_logps
from tests.conftest import shared

PREFS = ("datasets", "instructions", "instruction-data-with-preference.json")


def test_losses_at_the_reference_and_their_gradient_direction():
    import torch

    ref = torch.tensor([-5.0, -7.0, -6.0, -4.0])  # chosen rows 0-1, rejected rows 2-3
    beta = 0.5
    for loss, at_ref in (("sigmoid", math.log(2)), ("ipo", (1 / (2 * beta)) ** 2), ("hinge", 1.0)):
        policy = ref.clone().requires_grad_(True)
        losses, cr, rr = preference_loss(policy, ref, beta=beta, loss=loss)
        assert torch.allclose(losses, torch.full((2,), at_ref)), loss
        assert torch.equal(cr, torch.zeros(2)) and torch.equal(rr, torch.zeros(2))
        losses.sum().backward()
        # descending the loss raises the chosen answers' log-probs and lowers the rejected ones'
        assert (policy.grad[:2] < 0).all() and (policy.grad[2:] > 0).all(), loss
    with pytest.raises(ValueError, match="train.dpo.loss"):
        preference_loss(ref, ref, beta=beta, loss="kto")


def test_sequence_logps_counts_only_answer_tokens(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model)).eval()
    rec = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
           "meta": {"rejected_response": "I will not, and a much longer refusal follows here."}}
    (pair,), stats = encode_pairs(tok, [rec], max_len=128)
    assert stats == {"pairs": 1, "dropped_no_target": 0, "truncated": 0}
    batch = collate_pairs([pair], tok.pad_token_id)
    with torch.no_grad():
        got = sequence_logps(model, batch)
    with torch.no_grad():  # the same sum, the long way: every position's full log-softmax
        for row, enc in enumerate(pair):
            ids = torch.tensor([enc.input_ids])
            logp = model(input_ids=ids).logits[0].log_softmax(-1)
            want = sum(float(logp[t - 1, enc.input_ids[t]]) for t in range(1, len(enc.labels))
                       if enc.labels[t] != -100)
            assert abs(float(got[row]) - want) < 1e-3
    assert float(got[1]) < float(got[0])  # the long refusal has many more (random-model) tokens


def test_lora_reference_is_the_model_without_adapters(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.modeling import load_tokenizer
    from pipelines.train.model import apply_method

    tok = load_tokenizer(str(tiny_model))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
           "meta": {"rejected_response": "go away"}}
    batch = collate_pairs(encode_pairs(tok, [rec], 64)[0], tok.pad_token_id)
    with torch.no_grad():
        before = sequence_logps(base.eval(), batch)
    spec = load_spec_dict({"train": {"method": "dpo", "lora": {"r": 4, "dropout": 0.0}}}, tiny_model)
    model = apply_method(base, spec.train.model_copy(update={"method": "lora"}))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)  # the adapters now change the model
    ref = Reference(model, "lora")
    assert torch.allclose(ref.logps(batch, average=False), before, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(sequence_logps(model.eval(), batch), before, atol=1e-3)
    full = Reference(base, "full")  # a frozen copy: later updates to the policy do not move it
    assert all(not p.requires_grad for p in full.frozen.parameters())


def load_spec_dict(extra: dict, model):
    from pipelines.spec import Spec

    return Spec.model_validate({"task": "prefs", "contract": {"type": "text"}, "model": {"base": str(model)}, **extra})


def test_dpo_spec_keys_are_validated(tiny_model):
    spec = load_spec_dict({"train": {"method": "dpo", "dpo": {"beta": 0.2, "loss": "ipo", "weights": "full"}}},
                          tiny_model)
    assert (spec.train.dpo.beta, spec.train.dpo.loss, spec.train.dpo.weights) == (0.2, "ipo", "full")
    with pytest.raises(ValueError, match="dpo.loss"):
        load_spec_dict({"train": {"method": "dpo", "dpo": {"loss": "kto"}}}, tiny_model)
    with pytest.raises(ValueError, match="dpo.beta"):
        load_spec_dict({"train": {"method": "dpo", "dpo": {"beta": 0}}}, tiny_model)


def test_factory_reads_alpaca_style_preference_pairs():
    from pipelines.factory.read import to_canonical

    items = json.loads(shared(*PREFS).read_text())
    recs = [to_canonical(dict(it), fmt="preference") for it in items[:50]]
    for it, rec in zip(items, recs):
        user = it["instruction"] + ("\n\n" + it["input"] if it["input"] else "")
        assert [m["content"] for m in rec["messages"]] == [user, it["chosen"]]
        assert rec["meta"]["rejected_response"] == it["rejected"]
        assert rec["meta"]["output"] == it["output"]  # nothing of the row is lost


def write_prefs_spec(tmp_path, tiny_model, **train) -> tuple:
    reg_uri = f"file://{tmp_path / 'registry'}"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "task": "prefs", "registry": reg_uri, "contract": {"type": "text"},
        "data": {"train": [str(shared(*PREFS))], "format": "preference",
                 "split": {"train": 0.8, "dev": 0.2, "test": 0.0}},
        "model": {"base": str(tiny_model), "max_seq_len": 128},
        "train": {"method": "dpo", "workers": 1, "max_steps": 40, "micro_batch_size": 8, "lr": 3e-3,
                  "warmup_ratio": 0.0, "scheduler": "constant", "dpo": {"beta": 0.1}, **train}}))
    return spec, reg_uri


def test_a_dataset_without_pairs_is_refused_before_ray(tmp_path, tiny_model):
    spec, reg_uri = write_prefs_spec(tmp_path, tiny_model)
    rows = [{"id": "a1", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
             "meta": {}}]
    Registry.open(reg_uri).create("dataset", "prefs", files={"train.jsonl": (json.dumps(rows[0]) + "\n").encode()})
    res = CliRunner().invoke(app, ["train", str(spec), "--json"])
    assert res.exit_code == 2
    err = json.loads(res.stdout)["error"]
    assert "train.jsonl:1 (id a1)" in err and "data.format: preference" in err
    res = CliRunner().invoke(app, ["train", str(spec), "--json", "--set", "train.deepspeed.stage=2"])
    assert res.exit_code == 2 and "train.deepspeed" in json.loads(res.stdout)["error"]


@pytest.mark.slow
def test_forty_dpo_steps_raise_held_out_margin_and_accuracy(ray_local, tmp_path, tiny_model):
    spec, reg_uri = write_prefs_spec(tmp_path, tiny_model)
    res = CliRunner().invoke(app, ["factory", str(spec), "--json"])
    assert res.exit_code == 0, res.output
    ds = json.loads(res.stdout)
    assert ds["accepted"]["dev"] >= 100
    res = CliRunner().invoke(app, ["train", str(spec), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["method"] == "dpo" and doc["steps"] == 40
    dpo = doc["dpo"]
    before, after = dpo["dev_before"], dpo["dev_after"]
    assert before["pairs"] == after["pairs"] == ds["accepted"]["dev"]
    # The policy starts as the reference: every implicit reward, so the margin, is 0.
    assert abs(before["margin"]) < 1e-6 and before["accuracy"] == 0.0
    assert after["margin"] > before["margin"] + 0.05, dpo
    assert after["accuracy"] > max(before["accuracy"], 0.6), dpo  # better than chance on unseen pairs
    assert after["loss"] < before["loss"]
    reg = Registry.open(reg_uri)
    run = reg.get(doc["run"])
    assert run.metadata["dpo"]["dev_after"] == after and run.metadata["dpo"]["beta"] == 0.1
    hist = json.loads(reg.read_file(doc["run"], "metrics.json"))["history"]
    assert len(hist) == 40 and {"margin", "accuracy", "chosen_reward", "rejected_reward"} <= set(hist[0])
    model = reg.get(doc["model"])
    assert model.metadata["method"] == "dpo" and "adapter_config.json" in model.files


def test_an_sft_lora_model_as_base_is_merged_once_and_becomes_the_reference(tmp_path, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.modeling import load_tokenizer
    from pipelines.train.dpo import preflight
    from pipelines.train.model import apply_method

    spec_path, reg_uri = write_prefs_spec(tmp_path, tiny_model)
    reg = Registry.open(reg_uri)
    # An SFT LoRA model as training registers it: an adapter folder naming its base.
    sft = apply_method(AutoModelForCausalLM.from_pretrained(str(tiny_model)),
                       load_spec_dict({"train": {"lora": {"r": 4}}}, tiny_model).train)
    with torch.no_grad():
        for n, p in sft.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    folder = tmp_path / "sft"
    sft.save_pretrained(str(folder), safe_serialization=True)
    load_tokenizer(str(tiny_model)).save_pretrained(str(folder))
    adapter = reg.add_directory("model", "prefs", folder, inputs={"base_model": str(tiny_model)})
    rec = {"id": "p1", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
           "meta": {"rejected_response": "no"}}
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text(json.dumps(rec) + "\n")

    spec = load_spec(spec_path, [f"model.base={adapter.id}"], check_paths=False)
    pre = preflight(spec, reg, tmp_path / "ds")
    assert pre["merged_from"] == adapter.id and pre["base_ref"] != adapter.id and not pre["base"].adapter
    merged = reg.get(pre["base_ref"])
    assert merged.inputs["merged_from"] == adapter.id and "adapter_config.json" not in merged.files
    # The merged weights are the SFT model's: same log-probs as base + adapter.
    tok = load_tokenizer(str(tiny_model))
    batch = collate_pairs(encode_pairs(tok, [rec], 64)[0], tok.pad_token_id)
    with torch.no_grad():
        want = sequence_logps(sft.eval(), batch)
        got = sequence_logps(AutoModelForCausalLM.from_pretrained(str(reg.materialize(merged.id))).eval(), batch)
    assert torch.allclose(got, want, atol=1e-4)
    assert preflight(spec, reg, tmp_path / "ds")["base_ref"] == merged.id  # reused, not merged again
