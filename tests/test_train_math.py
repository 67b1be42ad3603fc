"""Pure-torch correctness of the training step: masking, EOS, packing, accumulation, schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipelines.modeling import load_tokenizer
from pipelines.spec import SpecError, spec_from_dict
from pipelines.templates import IGNORE, encode_chat, select_template
from pipelines.train.data import collate, encode_records, mix_repair, pack, plan_batches, shift_labels
from pipelines.train.loop import accumulate, forward_sum, lr_at


def _chat(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Add {i} and {i * 3} please" + " now" * (i % 5)},
            {"role": "assistant", "content": f"{i} + {i * 3} = {i * 4}" + "!" * (i % 3)}]


@pytest.fixture(scope="module")
def tok(tiny_model):
    t = load_tokenizer(tiny_model)
    select_template(t, "auto")
    return t


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    return m.eval()


@pytest.fixture(scope="module")
def examples(tok):
    return [encode_chat(tok, _chat(i)) for i in range(8)]


def test_masked_mean_is_over_trained_tokens_only(model, tok, examples):
    batch = collate([{"input_ids": e.input_ids, "labels": e.labels} for e in examples[:3]], tok.pad_token_id)
    with torch.no_grad():
        loss_sum, n = forward_sum(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = shift_labels(batch["labels"])
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).clamp(min=0),
                                reduction="none").view(targets.shape)
    mask = targets != IGNORE
    assert n == int(mask.sum()) == sum(e.trained_tokens for e in examples[:3]) - 0  # every trained token counted
    assert torch.allclose(loss_sum / n, per_token[mask].mean(), atol=1e-5)
    real = batch["attention_mask"].bool()
    assert not torch.allclose(loss_sum / n, per_token[real].mean(), atol=1e-3)  # not a mean over all tokens


def test_eos_is_a_target_even_when_pad_is_eos(tok, examples):
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    assert tok.pad_token_id == eos
    batch = collate([{"input_ids": e.input_ids, "labels": e.labels} for e in examples[:4]], tok.pad_token_id)
    targets = shift_labels(batch["labels"])
    per_row_eos_targets = ((targets == eos).sum(dim=1)).tolist()
    assert per_row_eos_targets == [1, 1, 1, 1]  # the assistant's end of turn, once per row
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["labels"][pad] == IGNORE).all()  # padding (also the eos id) is never learned


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked(tiny_model, tok, examples, attn):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attn).eval()
    rows = pack(examples[:3], max_len=4096)
    assert len(rows) == 1 and rows[0]["position_ids"].count(0) == 3
    packed = collate(rows, tok.pad_token_id)
    with torch.no_grad():
        logits = m(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        start = 0
        for e in examples[:3]:
            alone = m(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0]
            n = len(e.input_ids)
            assert torch.allclose(logits[start:start + n], alone, atol=1e-5), f"example at {start} saw its neighbours"
            start += n
        # Without the position resets the later examples would see earlier ones: the test has teeth.
        leaky = m(input_ids=packed["input_ids"], use_cache=False).logits[0]
        n0, n1 = len(examples[0].input_ids), len(examples[1].input_ids)
        assert not torch.allclose(leaky[n0:n0 + n1], logits[n0:n0 + n1], atol=1e-3)


def test_packed_targets_never_cross_examples(tok, examples):
    rows = pack(examples[:2], max_len=4096)
    b = collate(rows, tok.pad_token_id)
    targets = shift_labels(b["labels"], b["position_ids"])
    boundary = len(examples[0].input_ids) - 1  # last token of the first example
    assert targets[0, boundary] == IGNORE


def test_grad_accumulation_matches_one_big_batch(tiny_model, tok, examples):
    from transformers import AutoModelForCausalLM

    def grads(micro_size: int) -> dict:
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
        micro = [collate(rows[i:i + micro_size], tok.pad_token_id) for i in range(0, 8, micro_size)]
        accumulate(m, micro, lambda loss: loss.backward())
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    one, four = grads(8), grads(2)
    for name in one:
        assert torch.allclose(one[name], four[name], atol=1e-6, rtol=1e-4), name
    # The naive recipe (mean per micro-batch, divided by the count of micro-batches) differs,
    # because the examples have different numbers of trained tokens.
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM as A

    m = A.from_pretrained(tiny_model, dtype=torch.float32)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    for i in range(0, 8, 2):
        b = collate(rows[i:i + 2], tok.pad_token_id)
        s, n = forward_sum(m, b)
        (s / n / 4).backward()
    naive = {n: p.grad for n, p in m.named_parameters()}
    assert any(not torch.allclose(one[k], naive[k], atol=1e-6, rtol=1e-4) for k in one)


def test_length_grouping_and_packing_cut_padding(tok):
    exs = [encode_chat(tok, _chat(i)) for i in range(64)]
    grouped = plan_batches(exs, batch_size=8, packing=False, max_len=512, seed=0, epoch=0)
    packed = plan_batches(exs, batch_size=2, packing=True, max_len=256, seed=0, epoch=0)
    assert sum(len(b) for b in grouped) == 64
    assert sorted(sum((r["input_ids"] for b in packed for r in b), [])) == sorted(sum((e.input_ids for e in exs), []))

    def share(batches):
        cs = [collate(b, tok.pad_token_id) for b in batches]
        return sum(c["real_tokens"] for c in cs) / sum(c["total_tokens"] for c in cs)

    longest = max(len(e.input_ids) for e in exs)
    fixed_block = sum(len(e.input_ids) for e in exs) / (len(exs) * longest)
    assert share(grouped) > fixed_block  # padded to each batch's longest, not a fixed block
    assert share(packed) >= 0.95
    for b in grouped:  # every batch is padded to its own longest row
        assert collate(b, tok.pad_token_id)["input_ids"].shape[1] == max(len(r["input_ids"]) for r in b)
    # Reproducible per (seed, epoch), different across epochs.
    again = plan_batches(exs, batch_size=8, packing=False, max_len=512, seed=0, epoch=0)
    other = plan_batches(exs, batch_size=8, packing=False, max_len=512, seed=0, epoch=1)
    assert again == grouped and other != grouped


def test_cosine_schedule_with_warmup():
    t = spec_from_dict({"task": "t", "model": {"base": "x"}, "train": {"lr": 1e-3, "warmup_ratio": 0.1}}).train
    lrs = [lr_at(s, 100, t) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 1e-5 and lrs[55] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))


def test_qlora_on_cpu_fails_before_any_work():
    with pytest.raises(SpecError, match="train.*qlora.*GPU"):
        spec_from_dict({"task": "t", "model": {"base": "x"}, "train": {"method": "qlora"}})
    from pipelines.train.model import check_method

    t = spec_from_dict({"task": "t", "model": {"base": "x"}, "train": {"method": "qlora", "use_gpu": True}}).train
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train.method: 'qlora' needs a CUDA GPU"):
            check_method(t)


def test_repair_share_repeats_repair_rows_only():
    def row(i, repair=False):
        meta = {"intent": "x", **({"repair": {"cluster": "case", "origin": f"o{i}"}} if repair else {})}
        return {"id": f"{'r' if repair else 'o'}{i}", "messages": [], "meta": meta}
    records = [row(i) for i in range(300)] + [row(i, True) for i in range(100)]
    mixed, stats = mix_repair(records, 0.6, seed=1)
    repair = [r for r in mixed if "repair" in r["meta"]]
    assert len(mixed) - len(repair) == 300  # the original rows, each once
    assert abs(len(repair) / len(mixed) - 0.6) < 0.005
    assert {r["id"] for r in repair} == {f"r{i}" for i in range(100)}  # every repair row at least once
    assert stats == {"repair_rows": 100, "repair_repeats": 4.5}
    assert mix_repair(records, 0.6, seed=1)[0] == mixed  # seeded
    # already at or above the share, no share, or nothing to repeat: the records as they are
    for share, recs in ((0.2, records), (None, records), (0.6, records[:300])):
        out, stats = mix_repair(recs, share)
        assert out is recs and stats["repair_repeats"] == 1.0
    with pytest.raises(SpecError, match="repair_share.*dpo"):
        spec_from_dict({"task": "t", "model": {"base": "x"}, "train": {"method": "dpo", "repair_share": 0.5}})


def test_json_answers_are_trained_in_the_decoders_form(tok):
    """With constrained decoding on, the targets are the compact JSON the guide lets the model write."""
    from pipelines.contract import Checker
    from pipelines.spec import Contract

    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}
    record = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": '{"b": "y", "a": 1}'}]}
    for constrained, want in ((True, '{"a":1,"b":"y"}'), (False, '{"b": "y", "a": 1}')):
        form = Checker(Contract(type="json", schema=schema, constrained_decoding=constrained)).as_decoded
        (enc,), _ = encode_records(tok, [record], 64, None, form)
        assert tok.decode([t for t in enc.labels if t != IGNORE]).startswith(want)
