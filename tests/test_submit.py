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


SPEC_DIR = ROOT / "tests" / "_submit_specs"  # inside the shipped working dir, not git-ignored


@pytest.fixture(autouse=True)
def _clean_spec_dir():
    yield
    import shutil

    shutil.rmtree(SPEC_DIR, ignore_errors=True)


def _spec(tmp_path: Path, data: Path, registry: Path) -> Path:
    # The spec travels with the job, so it must live inside the working dir.
    spec_dir = SPEC_DIR / tmp_path.name
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = spec_dir / "spec.yaml"
    spec.write_text(yaml.safe_dump({"task": "submitted", "model": {"base": "org/unused-by-the-factory"},
                                    "data": {"train": [str(data)]}, "registry": f"file://{registry}"}))
    return spec


def _submit(*args, timeout=600):
    return subprocess.run([str(CRUCIBLE), "submit", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def test_build_job_refuses_local_registry_on_remote_cluster(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    spec = _spec(tmp_path, data, tmp_path / "registry")
    with pytest.raises(ValueError, match="remote cluster"):
        build_job(spec, "factory", [], "http://10.0.0.5:8265", ROOT)
    job = build_job(spec, "factory", ["data.split.seed=3"], "http://127.0.0.1:8265", ROOT)
    assert job["entrypoint"].startswith("python -m jobs.factory tests/_submit_specs/")
    assert "--set=data.split.seed=3" in job["entrypoint"] and job["registry"] == f"file://{tmp_path / 'registry'}"
    assert ".venv" in job["runtime_env"]["excludes"]
    with pytest.raises(ValueError, match="choose one of"):
        build_job(spec, "nonsense", [], "http://127.0.0.1:8265", ROOT)


@pytest.mark.slow
def test_submitted_factory_job_registers_its_dataset(cluster, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    registry = tmp_path / "registry"
    proc = _submit(str(_spec(tmp_path, data, registry).relative_to(ROOT)), "--address", cluster,
                   "--stage", "factory", "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == "SUCCEEDED" and result["job_id"]
    datasets = Registry.open(f"file://{registry}").list("dataset", "submitted")
    assert len(datasets) == 1  # the job wrote where we read


@pytest.mark.slow
def test_failing_job_reports_status_and_logs(cluster, tmp_path):
    registry = tmp_path / "registry"
    spec = _spec(tmp_path, tmp_path / "absent.jsonl", registry)  # valid spec, data missing: the job fails
    proc = _submit(str(spec.relative_to(ROOT)), "--address", cluster, "--stage", "factory")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "failed" in proc.stderr.lower()
    assert "absent.jsonl" in proc.stdout  # the job's own error reached the user through its logs
    assert not (registry / "manifests").exists()
