"""Training speed work that must not change the maths: the LM head only at labelled positions,
bf16 autocast, best-fit-decreasing packing planned once, the node probe and MFU figures."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from pipelines.modeling import load_tokenizer
from pipelines.spec import spec_from_dict
from pipelines.templates import IGNORE, Encoded, encode_chat, select_template
from pipelines.train.data import (collate, leaks_across_packed_examples, pack, packing_supported, plan_batches,
                                  shift_labels)
from pipelines.train.loop import accumulate, forward_sum


def _chat(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Please add {i} and {i * 7}, then explain" + " carefully" * (i % 6)},
            {"role": "assistant", "content": f"{i} + {i * 7} = {i * 8}" + " indeed" * (i % 4)}]


@pytest.fixture(scope="module")
def tok(tiny_model):
    t = load_tokenizer(tiny_model)
    select_template(t, "auto")
    return t


@pytest.fixture(scope="module")
def examples(tok):
    return [encode_chat(tok, _chat(i)) for i in range(24)]


def _model(tiny_model, lora: bool = False, **lora_keys):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    if lora:
        from pipelines.train.model import apply_method

        t = spec_from_dict({"task": "t", "model": {"base": "x"},
                            "train": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0, **lora_keys}}}).train
        m = apply_method(m, t)
        with torch.no_grad():  # LoRA B starts at zero; make the adapter matter to the gradient check
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
    return m


def _full_loss(model, batch):
    """The plain computation: every position's logits, cross-entropy where there is a label."""
    kw = {"position_ids": batch["position_ids"]} if "position_ids" in batch else \
        {"attention_mask": batch["attention_mask"]}
    logits = model(input_ids=batch["input_ids"], use_cache=False, **kw).logits.float()
    targets = shift_labels(batch["labels"], batch.get("position_ids"))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")


@pytest.mark.parametrize("lora,packed", [(False, False), (True, True)])
def test_head_only_at_labels_gives_the_full_loss_and_gradients(tiny_model, tok, examples, lora, packed):
    rows = pack(examples[:6], 512) if packed else [{"input_ids": e.input_ids, "labels": e.labels}
                                                     for e in examples[:6]]
    batch = collate(rows, tok.pad_token_id)
    grads = []
    losses = []
    for fn in (lambda m: forward_sum(m, batch)[0], lambda m: _full_loss(m, batch)):
        m = _model(tiny_model, lora)
        loss = fn(m)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4), n
    # The selection really skips positions: far fewer labelled positions than tokens.
    n_targets = forward_sum(_model(tiny_model), batch)[1]
    assert n_targets < 0.5 * batch["real_tokens"]


def test_best_fit_decreasing_is_optimal_on_small_cases_and_fast():
    rng = random.Random(0)

    def brute_best_fit(lengths, cap):  # the definition, quadratic: tightest row, longest first
        free = []
        for n in sorted(lengths, reverse=True):
            fits = [i for i, f in enumerate(free) if f >= n]
            if fits:
                free[min(fits, key=lambda i: free[i])] -= n
            else:
                free.append(cap - n)
        return len(free)

    for _ in range(100):
        lengths = [rng.randint(1, 64) for _ in range(rng.randint(1, 50))]
        rows = pack([Encoded([7] * n, [7] * n) for n in lengths], 64)
        assert len(rows) == brute_best_fit(lengths, 64)
        assert all(len(r["input_ids"]) <= 64 for r in rows)
        assert sorted(n for r in rows for n in _lengths(r)) == sorted(lengths)  # every example, once
    many = [Encoded([1] * rng.randint(10, 500), [1]) for _ in range(20_000)]
    rows = pack(many, 512)
    assert sum(len(r["input_ids"]) for r in rows) / (512 * len(rows)) > 0.99  # first-fit-in-order gave ~0.9


def _lengths(row):
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
    return [b - a for a, b in zip(starts, starts[1:])]


def test_packed_example_loss_equals_its_unpacked_loss(tiny_model, tok, examples):
    m = _model(tiny_model).eval()
    rows = pack(examples[:5], 4096)
    assert len(rows) == 1
    with torch.no_grad():
        packed = forward_sum(m, collate(rows, tok.pad_token_id))[0]
        alone = sum(forward_sum(m, collate([{"input_ids": e.input_ids, "labels": e.labels}], tok.pad_token_id))[0]
                    for e in examples[:5])
    assert float(packed) == pytest.approx(float(alone), rel=1e-5)
    assert not leaks_across_packed_examples(m, examples)


def test_packing_support_is_known_per_architecture():
    assert packing_supported("llama") and packing_supported("qwen2")
    assert not packing_supported("bloom")  # builds its own alibi mask from attention_mask only
    assert not packing_supported("no-such-model")


def test_plan_is_reproducible_and_epochs_differ(examples):
    a = plan_batches(examples, batch_size=2, packing=True, max_len=128, seed=3, epoch=0)
    assert a == plan_batches(examples, batch_size=2, packing=True, max_len=128, seed=3, epoch=0)
    assert a != plan_batches(examples, batch_size=2, packing=True, max_len=128, seed=3, epoch=1)


def test_bf16_autocast_loss_curve_tracks_fp32(tiny_model, tok, examples):
    """20 AdamW steps on the same batches: bf16 autocast (fp32 master weights) stays within 2% of
    the fp32 loss at every step, and both learn."""
    batches = [collate(b, tok.pad_token_id)
               for b in plan_batches(examples, batch_size=4, packing=False, max_len=256, seed=0, epoch=0)]

    def curve(precision):
        m = _model(tiny_model).train()
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        out = []
        for step in range(20):
            loss, _ = accumulate(m, [batches[step % len(batches)]], lambda x: x.backward(), precision=precision)
            opt.step()
            opt.zero_grad()
            out.append(loss)
        assert all(p.dtype == torch.float32 for p in m.parameters())  # the master copy stays fp32
        return out

    fp32, bf16 = curve("fp32"), curve("bf16")
    assert fp32[-1] < fp32[0] - 1.0 and bf16[-1] < bf16[0] - 1.0
    assert max(abs(a - b) / a for a, b in zip(fp32, bf16)) < 0.02, list(zip(fp32, bf16))
    assert fp32 != bf16  # bf16 really ran


def test_precision_probe_is_cached_and_auto_follows_the_measurement(tmp_path, monkeypatch):
    from pipelines.train import perf

    monkeypatch.setenv("CRUCIBLE_CACHE", str(tmp_path))
    chosen, probe = perf.choose_precision("auto", use_gpu=False)
    table = json.loads((tmp_path / "peak-flops.json").read_text())
    assert len(table) == 2 and all(v > 1e8 for v in table.values())  # fp32 and bf16, measured
    fast = "bf16" if probe["peak_flops_bf16"] >= perf.BF16_MIN_SPEEDUP * probe["peak_flops_fp32"] else "fp32"
    assert chosen == fast and probe["peak_flops"] == probe[f"peak_flops_{fast}"]
    # The second call reads the cache: a doctored entry comes back as is.
    key = next(k for k in table if "|fp32|" in k)
    table[key] = 123.0
    (tmp_path / "peak-flops.json").write_text(json.dumps(table))
    assert perf.peak_flops("fp32") == 123.0
    # A fresh probe (a benchmark's) returns what it measured and mends a cached figure below it...
    fresh = perf.peak_flops("fp32", cache=False)
    assert fresh > 1e8 and perf.peak_flops("fp32") == fresh
    # ...but never lowers one: a probe on a busy node must not undo a good one
    table = json.loads((tmp_path / "peak-flops.json").read_text())
    table[key] = 1e18
    (tmp_path / "peak-flops.json").write_text(json.dumps(table))
    assert perf.peak_flops("fp32", cache=False) < 1e18 and perf.peak_flops("fp32") == 1e18


def test_step_flops_matches_the_6n_rule_for_full_training(tiny_model):
    from pipelines.train.perf import model_shape, step_flops

    m = _model(tiny_model)
    shape = model_shape(m)
    assert shape["body_params"] == shape["trainable_body_params"] > 0
    f = step_flops(shape, tokens=100, label_tokens=0, attn_pairs=0)
    assert f == 6 * shape["body_params"] * 100
    lora = model_shape(_model(tiny_model, lora=True))
    assert 0 < lora["trainable_body_params"] < 0.2 * lora["body_params"]


def test_last_layers_adapts_only_the_top_layers_and_backward_stops_there(tiny_model, tok, examples):
    """lora.last_layers: 1 on the 2-layer model: adapters on every linear of layer 1 only; its
    gradients are the ones all-layer LoRA computes for the same adapters (same loss), nothing
    is recorded below it, and the step's FLOP count drops by layer 0's backward."""
    from pipelines.train.model import last_layer_targets
    from pipelines.train.perf import model_shape, step_flops

    top, every = _model(tiny_model, lora=True, last_layers=1), _model(tiny_model, lora=True)
    names = {n for n, p in top.named_parameters() if p.requires_grad}
    assert names and all(".layers.1." in n for n in names)
    linears = {n.split(".layers.1.")[1].split(".lora_")[0] for n in names}
    assert linears == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    with torch.no_grad():  # the same adapter weights on layer 1 in both; layer 0's adapters stay zero
        own = dict(every.named_parameters())
        for n, p in own.items():
            if ".layers.0." in n and "lora_B" in n:
                p.zero_()
        for n, p in top.named_parameters():
            if p.requires_grad:
                own[n].copy_(p)
    batch = collate(pack(examples[:6], 512), tok.pad_token_id)
    hidden_grad = {}

    def record(_module, _args, out):  # returns None: the layer's output is left as it is
        hidden_grad.setdefault("h", (out[0] if isinstance(out, tuple) else out).requires_grad)

    top.get_base_model().model.layers[0].register_forward_hook(record)
    losses = []
    for m in (top, every):
        loss = forward_sum(m, batch)[0]
        loss.backward()
        losses.append(float(loss))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert hidden_grad["h"] is False  # layer 0 builds no graph: backward stops at layer 1
    grads = dict(every.named_parameters())
    for n, p in top.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, grads[n].grad, atol=1e-6, rtol=1e-4), n
    shape, full = model_shape(top), model_shape(every)
    assert shape["backprop_layers"] == 1 and full["backprop_layers"] == 2
    assert 0 < shape["backprop_body_params"] < full["backprop_body_params"] == full["body_params"]
    assert step_flops(shape, tokens=100, label_tokens=0, attn_pairs=50) < \
        step_flops(full, tokens=100, label_tokens=0, attn_pairs=50)
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match=r"train.lora.last_layers: 3 is more than the model's 2 layers"):
        last_layer_targets(AutoModelForCausalLM.from_pretrained(tiny_model), spec_from_dict(
            {"task": "t", "model": {"base": "x"}, "train": {"lora": {"last_layers": 3}}}).train.lora)
