"""The `crucible` command as a user runs it: the installed entry point, real files, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

CRUCIBLE = Path(sys.executable).parent / "crucible"  # the entry point `make setup` installed


def crucible(*args: str, cwd: Path, registry: Path | None = None, check: int | None = 0):
    env = {**os.environ, "CRUCIBLE_REGISTRY": f"file://{registry}"} if registry else dict(os.environ)
    proc = subprocess.run([str(CRUCIBLE), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def last_json(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, gpt2_tokenizer):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    proc = crucible("init-model", str(out), "--tokenizer", str(gpt2_tokenizer), "--layers", "1",
                    "--hidden", "32", "--heads", "2", "--json", cwd=out.parent)
    info = last_json(proc)
    assert info["parameters"] > 0 and "model.safetensors" in info["files"]
    return out


def test_help_teaches_every_command(tmp_path):
    top = crucible("--help", cwd=tmp_path).stdout
    for word in ("spec", "registry", "init-model"):
        assert word in top
    reg = crucible("registry", "--help", cwd=tmp_path).stdout
    for word in ("ls", "show", "gc", "add-model", "alias"):
        assert word in reg
    assert crucible("registry", "nonsense", cwd=tmp_path, check=2).returncode == 2


def test_spec_validate(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"task": "demo", "model": {"base": "org/model"}}))
    ok = last_json(crucible("spec", "validate", str(spec), "--set", "train.max_steps=7", "--json", cwd=tmp_path))
    assert ok["valid"] and ok["spec"]["train"]["max_steps"] == 7 and ok["spec"]["contract"]["type"] == "text"
    human = crucible("spec", "validate", str(spec), cwd=tmp_path).stdout
    assert "is valid" in human and "max_seq_len: 1024" in human
    spec.write_text(yaml.safe_dump({"task": "demo", "modle": {"base": "x"}, "train": {"epochs": -1}}))
    bad = crucible("spec", "validate", str(spec), cwd=tmp_path, check=2)
    assert "modle: unknown key (did you mean 'model'?)" in bad.stderr
    assert "train.epochs: Input should be greater than 0" in bad.stderr and "model: required" in bad.stderr
    assert crucible("spec", "validate", str(tmp_path / "absent.yaml"), cwd=tmp_path, check=2).returncode == 2


def test_registry_commands_end_to_end(tmp_path, model_dir):
    reg = tmp_path / "registry"
    added = last_json(crucible("registry", "add-model", str(model_dir), "--task", "demo", "--alias", "production",
                               "--json", cwd=tmp_path, registry=reg))
    ref = added["model"]
    assert ref.startswith("model-demo-") and added["alias"] == "demo@production" and added["has_chat_template"]
    listing = last_json(crucible("registry", "ls", "--json", cwd=tmp_path, registry=reg))
    assert [a["id"] for a in listing["artifacts"]] == [ref] and listing["artifacts"][0]["aliases"] == ["demo@production"]
    shown = last_json(crucible("registry", "show", "demo@production", "--lineage", "--verify", "--json",
                               cwd=tmp_path, registry=reg))
    assert shown["manifest"]["id"] == ref and shown["verified"] and shown["lineage"][0]["id"] == ref
    assert "model.safetensors" in shown["manifest"]["files"]
    assert "model.safetensors" in crucible("registry", "show", ref, cwd=tmp_path, registry=reg).stdout
    gc = last_json(crucible("registry", "gc", "--min-age", "0", "--json", cwd=tmp_path, registry=reg))
    assert gc["removed"] == 0 and gc["referenced"] == len(shown["manifest"]["files"])
    # An alias that moved under us: the command fails its check (exit 1) and names the conflict.
    conflict = crucible("registry", "alias", "demo@production", ref, "--expect", "none", cwd=tmp_path,
                        registry=reg, check=1)
    assert "expected unset" in conflict.stderr
    missing = crucible("registry", "show", "demo@canary", "--json", cwd=tmp_path, registry=reg, check=2)
    assert "not set" in last_json(missing)["error"]


def test_add_model_refuses_pickle_weights(tmp_path, model_dir):
    folder = tmp_path / "pickled"
    folder.mkdir()
    for f in model_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    proc = crucible("registry", "add-model", str(folder), "--task", "demo", cwd=tmp_path,
                    registry=tmp_path / "registry", check=2)
    assert "pytorch_model.bin" in proc.stderr and "safetensors" in proc.stderr
    assert not (tmp_path / "registry" / "manifests").exists()  # nothing registered


def test_default_registry_lives_under_the_working_dir(tmp_path, model_dir):
    env_free = {k: v for k, v in os.environ.items() if k != "CRUCIBLE_REGISTRY"}
    proc = subprocess.run([str(CRUCIBLE), "registry", "add-model", str(model_dir), "--task", "demo", "--json"],
                          cwd=tmp_path, env=env_free, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ref = last_json(proc)["model"]
    assert (tmp_path / ".crucible" / "registry" / "manifests" / "model" / f"{ref}.json").is_file()


@pytest.mark.slow
def test_add_model_converts_a_real_gguf_once(tmp_path, smollm2_gguf):
    folder, name = smollm2_gguf
    reg = tmp_path / "registry"
    added = last_json(crucible("registry", "add-model", str(folder), "--gguf-file", name, "--task", "triage",
                               "--alias", "base", "--json", cwd=tmp_path, registry=reg))
    assert added["model_type"] == "llama" and added["has_chat_template"]
    assert 130e6 < added["parameters"] < 140e6  # SmolLM2-135M, dequantised
    from infra.registry import Registry

    model_dir = Registry.open(f"file://{reg}", cache_dir=tmp_path / "cache").materialize("triage@base")
    assert not list(model_dir.glob("*.gguf")) and (model_dir / "model.safetensors").is_file()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answer = tok.decode(model.generate(**ids, max_new_tokens=10, do_sample=False)[0, ids["input_ids"].shape[1]:])
    assert "Paris" in answer  # the pretrained weights survived the conversion


def test_commands_given_a_spec_use_its_registry(tmp_path):
    """A spec's `registry:` is where eval and gate look, as train and factory do (eval once read only
    --registry / $CRUCIBLE_REGISTRY and fell back to ./.crucible/registry)."""
    spec = tmp_path / "spec.yaml"
    (tmp_path / "held-out.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "where is my order"}, {"role": "assistant", "content": "track_order"}]}) + "\n")
    spec.write_text(yaml.safe_dump({"task": "demo", "model": {"base": "org/model"},
                                    "data": {"train": ["held-out.jsonl"], "eval": {"held-out": "held-out.jsonl"}},
                                    "registry": f"file://{tmp_path}/team-registry"}))
    env = {k: v for k, v in os.environ.items() if k != "CRUCIBLE_REGISTRY"}
    for args in (["eval", str(spec), "--model", "demo@production"], ["gate", "eval-demo-20261204000000-0123abcd", str(spec)]):
        proc = subprocess.run([str(CRUCIBLE), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode != 0
        assert f"file://{tmp_path}/team-registry" in proc.stderr, (args, proc.stderr)
    # a name that is neither a folder nor a registry ref is a hub name; not found there: an error, no traceback
    proc = subprocess.run([str(CRUCIBLE), "eval", str(spec), "--model", "model-demo-misspelt"], cwd=tmp_path,
                          env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "looked up on the Hugging Face hub" in proc.stderr and "registry ref" in proc.stderr
