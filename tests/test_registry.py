"""The registry contract, run against the local folder and a real S3 server alike."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid

import pytest

from infra.registry import AliasConflict, CorruptBlob, RefError, Registry, parse_id
from infra.store import LocalStore, S3Store
from tests.conftest import ROOT


@pytest.fixture(params=["local", "s3"])
def registry_uri(request, tmp_path):
    if request.param == "local":
        return f"file://{tmp_path / 'registry'}"
    request.getfixturevalue("s3_env")
    return f"s3://{request.getfixturevalue('s3_server')['bucket']}/reg-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def reg(registry_uri, tmp_path):
    return Registry.open(registry_uri, cache_dir=tmp_path / "cache")


def _dataset(reg, task="demo", **inputs):
    return reg.create("dataset", task, files={"train.jsonl": b'{"id": "1"}\n', "report.md": b"# report\n"},
                      inputs=inputs, metadata={"rows": 1})


def test_create_get_list_and_read(reg):
    m = _dataset(reg, spec_hash="abc")
    assert parse_id(m.id) == {"kind": "dataset", "task": "demo", "stamp": m.id.split("-")[2], "rand": m.id[-8:]}
    again = reg.get(m.id)
    assert again.files == m.files and again.inputs["spec_hash"] == "abc" and again.inputs["code_version"]
    assert reg.read_file(m.id, "train.jsonl") == b'{"id": "1"}\n'
    other = reg.create("model", "other", files={"w.safetensors": b"w"})
    assert [x.id for x in reg.list()] == [m.id, other.id] or [x.id for x in reg.list()] == [other.id, m.id]
    assert [x.id for x in reg.list(kind="model")] == [other.id]
    assert [x.id for x in reg.list(task="demo")] == [m.id]
    with pytest.raises(RefError, match="no file"):
        reg.read_file(m.id, "missing.txt")


def test_list_is_in_creation_order_within_one_second(reg):
    """"The newest" (the loop's reuse, the latest deployment event) must not depend on random ids."""
    made = [reg.create("deployment", "order", metadata={"n": i}).id for i in range(12)]
    assert [m.id for m in reg.list("deployment", "order")] == made


def test_same_content_is_stored_once(reg):
    a, b = _dataset(reg), _dataset(reg)
    assert a.id != b.id and a.files == b.files
    assert len(list(reg.store.list("blobs/"))) == 2


def test_refs_and_aliases(reg):
    m1, m2 = _dataset(reg), _dataset(reg)
    with pytest.raises(RefError, match="not set"):
        reg.get("demo@production")
    reg.set_alias("demo", "production", m1.id, expected=None)
    assert reg.get("demo@production").id == m1.id
    record = reg.set_alias("demo", "production", m2.id, expected=m1.id)
    assert record["history"][0]["target"] == m1.id
    assert reg.aliases() == {"demo": {"production": m2.id}}
    with pytest.raises(AliasConflict, match="expected"):
        reg.set_alias("demo", "production", m1.id, expected=m1.id)  # stale belief
    other = reg.create("model", "other", files={})
    with pytest.raises(RefError, match="belongs to task 'other'"):
        reg.set_alias("demo", "canary", other.id)
    for bad in ("nonsense", "dataset-demo-1-2", "../x", "demo@Bad Alias"):
        with pytest.raises(RefError):
            reg.get(bad)


def test_alias_race_one_writer_wins(reg):
    models = [_dataset(reg) for _ in range(6)]
    barrier = threading.Barrier(len(models))
    results: list[str] = []

    def claim(m):
        barrier.wait()
        try:
            reg.set_alias("demo", "canary", m.id, expected=None)
            results.append(f"won:{m.id}")
        except AliasConflict:
            results.append("conflict")

    threads = [threading.Thread(target=claim, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r.startswith("won:")]
    assert len(winners) == 1 and results.count("conflict") == len(models) - 1
    assert reg.get("demo@canary").id == winners[0][4:]


def test_alias_race_between_processes_on_local_folder(tmp_path):
    reg = Registry.open(f"file://{tmp_path / 'r'}")
    ids = [_dataset(reg).id for _ in range(4)]
    script = ("import sys\nfrom infra.registry import Registry, AliasConflict\n"
              f"reg = Registry.open({reg.uri!r})\n"
              "try:\n    reg.set_alias('demo', 'production', sys.argv[1], expected=None); print('won')\n"
              "except AliasConflict:\n    print('conflict')\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, i], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for i in ids]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(outs) == ["conflict"] * 3 + ["won"]
    assert reg.get("demo@production").id == ids[outs.index("won")]


def test_writer_killed_before_manifest_leaves_nothing_visible(reg, registry_uri):
    script = f"""
import os
from infra.registry import Registry
reg = Registry.open({registry_uri!r})
real_put = reg.store.put
def put(key, data, **kw):
    if key.startswith("manifests/"):
        os._exit(9)  # the process dies after its blobs are up, before the manifest
    return real_put(key, data, **kw)
reg.store.put = put
reg.create("dataset", "demo", files={{"train.jsonl": b"orphan rows"}})
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert reg.list() == []  # no half artifact is visible
    assert len(list(reg.store.list("blobs/"))) == 1  # only the orphan blob
    kept = _dataset(reg)
    assert reg.gc(min_age_s=3600)["removed"] == 0  # too young: could be a writer in flight
    report = reg.gc(min_age_s=0)
    assert report["removed"] == 1 and report["referenced"] == 2
    assert reg.read_file(kept.id, "train.jsonl") == b'{"id": "1"}\n'  # referenced blobs survive


def test_corrupted_blob_is_detected_on_read(reg, tmp_path):
    m = _dataset(reg)
    sha = m.files["train.jsonl"]["sha256"]
    reg.store.put(f"blobs/sha256/{sha[:2]}/{sha}", b'{"id": "tampered"}\n')
    with pytest.raises(CorruptBlob, match="does not match"):
        reg.read_file(m.id, "train.jsonl")
    with pytest.raises(CorruptBlob):
        reg.materialize(m.id, tmp_path / "out")
    assert not (tmp_path / "out" / "train.jsonl").exists()  # nothing unverified lands
    with pytest.raises(CorruptBlob):
        reg.verify(m.id)


def test_materialize_and_lineage(reg, tmp_path):
    data = _dataset(reg, spec_hash="s1")
    base = reg.create("model", "demo", files={"config.json": b"{}"})
    run = reg.create("run", "demo", files={"metrics.json": b"{}"}, inputs={"dataset": data.id, "base_model": base.id})
    model = reg.create("model", "demo", files={"adapter_model.safetensors": b"w"},
                       inputs={"parent_run": run.id, "dataset": data.id})
    folder = reg.materialize(model.id)
    assert (folder / "adapter_model.safetensors").read_bytes() == b"w"
    assert reg.materialize(model.id) == folder  # cached
    chain = [(depth, via, m.id) for depth, via, m in reg.lineage(model.id)]
    assert chain[0] == (0, "", model.id)
    assert (1, "parent_run", run.id) in chain and (2, "base_model", base.id) in chain
    assert (1, "dataset", data.id) in chain and (2, "dataset", data.id) in chain


def test_gc_keeps_everything_referenced(reg):
    m = _dataset(reg)
    assert reg.gc(min_age_s=0) == {"removed": 0, "freed_bytes": 0, "kept_recent_unreferenced": 0,
                                   "referenced": 2, "dry_run": False}
    reg.store.put("blobs/sha256/ff/" + "f" * 64, b"stray")
    assert reg.gc(min_age_s=0, dry_run=True)["removed"] == 1
    assert len(list(reg.store.list("blobs/"))) == 3  # dry run removed nothing
    assert reg.gc(min_age_s=0)["freed_bytes"] == len(b"stray")
    reg.verify(m.id)


def test_s3_registry_honours_aws_endpoint_url(s3_env):
    reg = Registry.open(f"s3://{s3_env['bucket']}/endpoint-{uuid.uuid4().hex[:6]}")
    assert isinstance(reg.store, S3Store)
    m = _dataset(reg)
    raw = reg.store.client.get_object(Bucket=s3_env["bucket"], Key=f"{reg.store.prefix}/manifests/dataset/{m.id}.json")
    assert json.loads(raw["Body"].read())["id"] == m.id


def test_default_registry_is_local_under_working_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CRUCIBLE_REGISTRY", raising=False)
    reg = Registry.open()
    assert isinstance(reg.store, LocalStore) and reg.uri == f"file://{tmp_path / '.crucible' / 'registry'}"
    monkeypatch.setenv("CRUCIBLE_REGISTRY", str(tmp_path / "elsewhere"))
    assert Registry.open().uri == f"file://{tmp_path / 'elsewhere'}"
