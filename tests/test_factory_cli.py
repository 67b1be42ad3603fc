"""The factory's entry points and lineage: ``python -m jobs.factory``, ``data_fingerprint``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.factory import data_fingerprint
from pipelines.spec import load_spec
from tests.test_factory_pipeline import FIX, write_spec

ROOT = Path(__file__).resolve().parent.parent


def test_data_fingerprint_tracks_data_contract_model_and_file_bytes(tmp_path):
    data = tmp_path / "rows.jsonl"
    shutil.copyfile(FIX / "messy.jsonl", data)
    path = write_spec(tmp_path, tmp_path, train=[str(data)])
    fp = data_fingerprint(load_spec(path))
    assert fp == data_fingerprint(load_spec(path))
    # Sections the dataset does not depend on leave it alone (the loop can reuse the dataset).
    assert data_fingerprint(load_spec(path, ["train.lr=0.1", "deploy.port=9000"])) == fp
    for change in ("data.dedupe.threshold=0.7", "model.max_seq_len=128", "contract.type=text", "data.pii=reject"):
        assert data_fingerprint(load_spec(path, [change])) != fp, change
    with open(data, "a") as f:  # same spec, one more source line
        f.write(json.dumps({"messages": [{"role": "user", "content": "new row"},
                                         {"role": "assistant", "content": "{}"}]}) + "\n")
    assert data_fingerprint(load_spec(path)) != fp


@pytest.mark.slow
def test_python_m_jobs_factory_runs_the_same_command(ray_local, tiny_model, tmp_path):
    """``python -m jobs.factory SPEC`` in its own process, joining this session's Ray through --address."""
    spec = write_spec(tmp_path, tiny_model)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    address = ray_local.get_runtime_context().gcs_address
    done = subprocess.run([sys.executable, "-m", "jobs.factory", str(spec), "--json", "--address", address,
                           "--set", "data.split.seed=3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["input_rows"] == 18 == sum(summary["accepted"].values()) + sum(summary["rejected"].values())
    assert summary["dataset"].startswith("dataset-triage-")
    # A spec error exits 2 and names the field, without starting anything.
    bad = tmp_path / "bad.yaml"
    raw = yaml.safe_load(spec.read_text())
    raw["data"]["dedupe"] = {"treshold": 0.5}
    bad.write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "jobs.factory", str(bad)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "data.dedupe.treshold" in done.stdout + done.stderr
