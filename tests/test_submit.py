"""Cluster mode for real: a Ray head started here, `crucible submit` through the Jobs API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infra.registry import Registry
from jobs.submit import build_job
from tests.conftest import ROOT
from tests.rayhead import ray_head

CRUCIBLE = Path(sys.executable).parent / "crucible"
ROWS = [{"messages": [{"role": "user", "content": f"Question number {i} about {w}?"},
                      {"role": "assistant", "content": f"An answer about {w} for question {i}."}]}
        for i, w in enumerate(["apples", "rivers", "clocks", "ladders", "violins", "glaciers", "pencils", "comets",
                               "bridges", "lanterns", "meadows", "engines"])]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with ray_head(tmp_path_factory.mktemp("rayhead"), num_cpus=2) as address:
        yield address


def _task_folder(tmp_path: Path, data_name: str = "rows.jsonl", **spec_keys) -> Path:
    """A user's own task folder, outside crucible's tree: spec, schema, data. Returns the spec."""
    folder = tmp_path / "my-task"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    spec = folder / "spec.yaml"
    raw = {"task": "submitted", "model": {"base": "org/unused-by-the-factory"},
           "data": {"train": [f"data/{data_name}"]}, "registry": "file://.crucible/registry"}
    spec.write_text(yaml.safe_dump({**raw, **spec_keys}))
    return spec


def _submit(*args, cwd: Path, timeout=600):
    return subprocess.run([str(CRUCIBLE), "submit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def test_job_ships_the_spec_folder_and_runs_the_installed_crucible(tmp_path, monkeypatch):
    spec = _task_folder(tmp_path)
    folder = spec.parent
    assert not folder.resolve().is_relative_to(ROOT)
    monkeypatch.chdir(folder)  # the registry is relative to where the user runs crucible
    job = build_job(Path("spec.yaml"), "factory", ["data.split.seed=3", "profile="], "http://127.0.0.1:8265")
    assert job["runtime_env"]["working_dir"] == str(folder) and ".venv" in job["runtime_env"]["excludes"]
    registry = f"file://{folder / '.crucible' / 'registry'}"
    assert job["entrypoint"] == f"crucible factory spec.yaml --set=data.split.seed=3 --set=profile= --set=registry={registry}"
    assert job["registry"] == registry and job["runtime_env"]["env_vars"]["CRUCIBLE_REGISTRY"] == registry
    with pytest.raises(ValueError, match="remote cluster"):
        build_job(spec, "factory", [], "http://10.0.0.5:8265")
    with pytest.raises(ValueError, match="choose one of"):
        build_job(spec, "nonsense", [], "http://127.0.0.1:8265")
    # --working-dir still works: a folder above the spec's is shipped, the spec path is relative to it
    job = build_job(spec, "train", [], "http://127.0.0.1:8265", working_dir=tmp_path, pip=["crucible==0.1.0"])
    assert job["entrypoint"].startswith("crucible train my-task/spec.yaml ") and job["runtime_env"]["pip"] == ["crucible==0.1.0"]
    with pytest.raises(ValueError, match=r"spec: .*outside the working dir"):
        build_job(spec, "train", [], "http://127.0.0.1:8265", working_dir=folder / "data")


def test_files_the_job_could_not_read_are_refused_by_name(tmp_path, tiny_model):
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text("{}\n")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"data": {"pii": "keep"}}))
    spec = _task_folder(tmp_path, extends="../base.yaml",
                        data={"train": ["data/rows.jsonl", str(outside), "s3://bucket/rows.jsonl"],
                              "eval": {"held": ".cache/held.jsonl"}})
    with pytest.raises(ValueError) as exc:
        build_job(spec, "factory", [], "http://127.0.0.1:8265")
    lines = str(exc.value).splitlines()[1:]
    assert [l.split(":")[0].strip() for l in lines] == ["data.train[1]", "data.eval.held", "extends"], lines
    assert str(outside) in lines[0] and "s3://" in lines[0] and "excluded from the upload" in lines[1]
    # a local base model: readable where it is by this machine's own cluster, never by a remote one
    local = _task_folder(tmp_path / "b", model={"base": str(tiny_model)}, registry="s3://bucket/crucible")
    assert build_job(local, "train", [], "http://127.0.0.1:8265")["entrypoint"].startswith("crucible train")
    with pytest.raises(ValueError, match=r"model.base: .*cannot read; register it"):
        build_job(local, "train", [], "http://10.0.0.5:8265")


def test_profile_travels_with_the_job(tmp_path):
    spec = _task_folder(tmp_path, profile="small", profiles={"small": {"train": {"max_steps": 3}},
                                                             "big": {"train": {"workers": 4}}})
    job = build_job(spec, "train", ["profile=big"], "http://127.0.0.1:8265")
    assert job["profile"] == "big" and "--set=profile=big" in job["entrypoint"]


@pytest.mark.slow
def test_submitted_factory_job_from_a_folder_outside_the_repo(cluster, tmp_path):
    spec = _task_folder(tmp_path)
    folder = spec.parent
    proc = _submit("spec.yaml", "--address", cluster, "--stage", "factory", "--json", cwd=folder)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # --json: one object, nothing else
    assert result["status"] == "SUCCEEDED" and result["job_id"] and result["working_dir"] == str(folder)
    assert result["entrypoint"].startswith("crucible factory spec.yaml ")
    datasets = Registry.open(f"file://{folder / '.crucible' / 'registry'}").list("dataset", "submitted")
    assert len(datasets) == 1  # the job wrote where we read
    assert datasets[0].metadata["input_rows"] == len(ROWS)  # it read the data shipped with the spec


@pytest.mark.slow
def test_failing_job_reports_its_reason(cluster, tmp_path):
    spec = _task_folder(tmp_path, data_name="absent.jsonl")  # valid spec, data missing: the job fails
    proc = _submit(str(spec), "--address", cluster, "--stage", "factory", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "failed" in proc.stderr.lower() and "exit code" in proc.stderr.lower()  # Ray's reason
    assert "absent.jsonl" in proc.stdout  # the job's own error reached the user through its logs
    assert not (spec.parent / ".crucible" / "registry" / "manifests").exists()
    as_json = _submit(str(spec), "--address", cluster, "--stage", "factory", "--json", cwd=tmp_path)
    assert as_json.returncode == 1
    error = json.loads(as_json.stdout)["error"]
    assert "failed" in error and "absent.jsonl" in error
