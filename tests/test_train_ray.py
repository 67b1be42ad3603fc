"""Real training runs: Ray Train with 2 CPU workers (gloo), LoRA through PEFT, DeepSpeed ZeRO-2/3,
checkpoints, a killed worker and ``--resume``. One local Ray for the module (the ray_local fixture)."""

from __future__ import annotations

import json

import pytest

from infra.registry import Registry
from pipelines.spec import spec_from_dict

pytestmark = pytest.mark.slow


def _rows(n: int, offset: int = 0) -> bytes:
    lines = []
    for i in range(offset, offset + n):
        a, b = i % 7, (i * 3) % 5
        msgs = [{"role": "user", "content": f"add {a} {b}"}, {"role": "assistant", "content": f"{a + b}"}]
        lines.append(json.dumps({"id": str(i), "messages": msgs, "source": f"t:{i}", "meta": {}}))
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    return Registry.open(f"file://{tmp_path_factory.mktemp('registry')}")


@pytest.fixture(scope="module")
def dataset(reg):
    return reg.create("dataset", "adder", files={"train.jsonl": _rows(64), "dev.jsonl": _rows(16, 1000)}).id


def _spec(tiny_model, **train):
    # packing off unless a test asks: 64 short rows pack into 2 steps/epoch, too few to watch learning
    base = {"workers": 2, "max_steps": 12, "micro_batch_size": 4, "lr": 3e-2, "scheduler": "constant",
            "packing": False, "warmup_ratio": 0.0, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "seed": 0}
    return spec_from_dict({"task": "adder", "model": {"base": str(tiny_model), "max_seq_len": 64},
                           "train": {**base, **train}})


@pytest.fixture(scope="module")
def lora_run(ray_local, reg, dataset, tiny_model):
    from pipelines.train import run

    return run(_spec(tiny_model, eval_every=6), reg, dataset)


def test_two_worker_lora_learns_and_registers(lora_run, reg, dataset, tiny_model):
    s = lora_run["summary"]
    assert s["steps"] == 12 and s["workers"] == 2
    losses = [h[1] for h in lora_run["run"].metadata["curves"]["train"]]
    # A random tiny model starts at ln(vocab) ~ 10.8 and its small tied embeddings bound how fast
    # LoRA can move the logits: a steady drop of a few tenths in 12 steps is learning.
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    dev = [d[1] for d in lora_run["run"].metadata["curves"]["dev"]]
    assert dev[-1] < dev[0], dev
    assert 0 < s["real_token_share"] <= 1 and s["tokens_per_s"] > 0
    run_m, model_m = lora_run["run"], lora_run["model"]
    assert run_m.inputs["dataset"] == dataset and model_m.inputs["run"] == run_m.id
    assert model_m.inputs["base_model"] == str(tiny_model)
    assert {"loss.png", "metrics.json", "checkpoint/trainable.safetensors", "checkpoint/state.json"} <= set(run_m.files)
    assert reg.read_file(run_m.id, "loss.png").startswith(b"\x89PNG")
    assert len(run_m.metadata["curves"]["dev"]) == 2  # eval every 6 of 12 steps
    assert "adapter_model.safetensors" in model_m.files and "adapter_config.json" in model_m.files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in model_m.files)


def test_registered_adapter_loads_with_the_training_template(lora_run, reg, tiny_model):
    import torch

    from pipelines.engines.loading import load_for_inference
    from pipelines.modeling import load_tokenizer

    model, tok, resolved = load_for_inference(lora_run["model"].id, reg)
    assert resolved.adapter
    assert tok.chat_template == load_tokenizer(tiny_model).chat_template  # saved unchanged
    chat = [{"role": "user", "content": "add 3 4"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


@pytest.mark.parametrize("stage,precision", [(2, "bf16"), (3, "fp32")])
def test_deepspeed_zero_in_ray_train(ray_local, reg, dataset, tiny_model, stage, precision):
    from pipelines.train import run

    spec = _spec(tiny_model, max_steps=4, packing=True, deepspeed={"stage": stage, "precision": precision})
    result = run(spec, reg, dataset)
    s = result["summary"]
    assert s["deepspeed_stage"] == stage and s["steps"] == 4
    assert s["final_loss"] < s["first_loss"]
    assert s["real_token_share"] >= 0.9  # packed
    from safetensors.torch import load_file

    folder = reg.materialize(result["model"].id)
    weights = load_file(str(folder / "adapter_model.safetensors"))
    assert weights and all(w.numel() > 0 for w in weights.values())  # ZeRO-3 shards were gathered before saving
    assert any(float(w.abs().sum()) > 0 for k, w in weights.items() if "lora_B" in k)  # trained, not the init


def test_resume_a_run_continues_the_step_count(ray_local, reg, dataset, tiny_model, lora_run):
    from pipelines.train import run

    short = run(_spec(tiny_model, max_steps=6), reg, dataset)
    assert short["summary"]["steps"] == 6
    resumed = run(_spec(tiny_model), reg, dataset, resume_run=short["run"].id)
    assert resumed["run"].inputs["parent_run"] == short["run"].id
    assert short["summary"]["resumed_at_steps"] == [] and resumed["summary"]["resumed_at_steps"] == [6]
    hist = json.loads(reg.read_file(resumed["run"].id, "metrics.json"))["history"]
    assert [h["step"] for h in hist] == list(range(1, 13))
    want = [h["loss"] for h in json.loads(reg.read_file(lora_run["run"].id, "metrics.json"))["history"]]
    assert [h["loss"] for h in hist] == pytest.approx(want, rel=1e-3, abs=1e-4)


def test_early_stop_keeps_the_best_weights_not_the_last(ray_local, reg, dataset, tiny_model):
    """A learning rate that makes dev loss climb after the first eval: training stops after two
    worse evals and registers the weights of the best one (their dev loss is recomputed)."""
    from pipelines.train import run

    spec = _spec(tiny_model, method="full", workers=1, max_steps=40, lr=0.05, eval_every=2, early_stopping_patience=2)
    result = run(spec, reg, dataset)
    summary = result["summary"]
    assert summary["stopped_early"] and summary["steps"] < 40
    assert summary["restored_best_step"] is not None and summary["restored_best_step"] < summary["steps"]
    assert summary["dev_loss"] > summary["best_dev_loss"]  # the last eval was worse: restoring matters
    assert summary["final_dev_loss"] == pytest.approx(summary["best_dev_loss"], abs=1e-4)
    assert result["model"].metadata["dev_loss"] == pytest.approx(summary["best_dev_loss"], abs=1e-4)


def test_killed_deepspeed_worker_resumes_with_its_adam_moments(ray_local, reg, dataset, tiny_model, tmp_path):
    """ZeRO-2: each rank saves its fp32 master partition and Adam moments; after a worker dies at
    step 7 the group restarts from step 6 and the loss curve is the uninterrupted one (restarting
    the moments would change every update after step 6)."""
    from pipelines.train import run

    spec = _spec(tiny_model, max_steps=10, save_every=3, deepspeed={"stage": 2, "precision": "fp32"})
    whole = run(spec, reg, dataset)
    result = run(spec, reg, dataset, max_failures=1, fault={"step": 7, "marker": str(tmp_path / "killed")})
    assert (tmp_path / "killed").exists()
    (step,) = result["summary"]["resumed_at_steps"]  # one restart, from a checkpoint before the step-7 fault
    assert step in (3, 6)  # 6 unless the fault beat Ray Train to registering that checkpoint
    assert {"checkpoint/zero-optimizer-rank0.safetensors", "checkpoint/zero-optimizer-rank1.safetensors"} \
        <= set(result["run"].files)
    got = [h["loss"] for h in json.loads(reg.read_file(result["run"].id, "metrics.json"))["history"]]
    want = [h["loss"] for h in json.loads(reg.read_file(whole["run"].id, "metrics.json"))["history"]]
    assert len(got) == len(want) == 10
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
