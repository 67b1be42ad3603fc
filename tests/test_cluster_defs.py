"""Cluster definitions and IaC: every file parses, has the fields its tool requires, and runs
commands that exist in this project."""

from __future__ import annotations

import re
import shlex

import hcl2
import pytest
import yaml

from tests.conftest import ROOT

CLUSTER = ROOT / "cluster"


def _load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def test_aws_cluster_launcher_config():
    cfg = _load("aws.yaml")
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, key
    assert cfg["provider"]["type"] == "aws" and cfg["head_node_type"] in cfg["available_node_types"]
    gpu = cfg["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] <= gpu["max_workers"] <= cfg["max_workers"]
    for node in cfg["available_node_types"].values():
        assert node["node_config"]["IamInstanceProfile"]["Name"] == "crucible-ray-node"
    setup = " ".join(cfg["setup_commands"])
    assert "torch==2.13.0" in setup and "-c constraints.txt" in setup  # same pins as make setup
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])


@pytest.mark.parametrize("name,kind", [("kuberay/raycluster.yaml", "RayCluster"), ("kuberay/rayjob.yaml", "RayJob")])
def test_kuberay_manifests(name, kind):
    doc = _load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind and doc["metadata"]["name"]
    cluster = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and head["resources"]["limits"]
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["maxReplicas"]
        worker = group["template"]["spec"]["containers"][0]
        assert worker["resources"]["limits"].get("nvidia.com/gpu")
    if kind == "RayJob":  # runs like `crucible submit`: the installed crucible, in the task's own folder
        folder = _task_folder(doc)
        assert _zip_working_dir(yaml.safe_load(doc["spec"]["runtimeEnvYAML"]))
        spec = _crucible_entrypoint(doc["spec"]["entrypoint"], folder)
        assert spec.registry.startswith("s3://") and spec.profile == "gpu"


def _task_folder(doc: dict):
    """The folder a manifest's working-dir zip is made from (its `crucible/task-folder` annotation)."""
    folder = ROOT / doc["metadata"]["annotations"]["crucible/task-folder"]
    assert folder.is_dir(), folder
    return folder


def _zip_working_dir(runtime_env: dict) -> bool:
    """A pod cannot upload a folder: the working dir is a remote zip Ray downloads on every node."""
    return re.fullmatch(r"s3://[a-z0-9.-]+/.+\.zip", runtime_env["working_dir"]) is not None


def _crucible_entrypoint(command: str, folder):
    """`crucible STAGE SPEC [--profile P] [--set k=v]...`: a registered command, a spec inside the
    task folder that validates with those options. Returns the spec."""
    from jobs.cli import app
    from pipelines.spec import load_spec

    words = shlex.split(command)
    assert words[0] == "crucible", "the job runs the installed crucible entry point"
    assert words[1] in {c.name for c in app.registered_commands}, words[1]
    assert (folder / words[2]).is_file(), words[2]
    overrides = [f"profile={v}" if k == "--profile" else v for k, v in zip(words[3::2], words[4::2])]
    assert all(k in ("--profile", "--set") for k in words[3::2]), words
    return load_spec(folder / words[2], overrides)


def test_runtime_env_ships_the_task_folder_not_its_caches():
    from jobs.submit import EXCLUDES

    env = _load("runtime_env.yaml")
    assert env["working_dir"] == "." and "pip" not in env  # the nodes have crucible installed
    assert env["excludes"] == EXCLUDES  # what `crucible submit` ships is what `ray job submit` ships


def test_terraform_registry_bucket_and_role():
    resources: dict[str, dict] = {}
    for path in sorted((ROOT / "infra" / "terraform").glob("*.tf")):
        doc = hcl2.loads(path.read_text())
        for block in doc.get("resource", []):
            for rtype, named in block.items():
                for name, body in named.items():
                    resources[f"{rtype.strip(chr(34))}.{name.strip(chr(34))}"] = body
    for needed in ("aws_s3_bucket.registry", "aws_s3_bucket_versioning.registry",
                   "aws_s3_bucket_server_side_encryption_configuration.registry",
                   "aws_s3_bucket_public_access_block.registry", "aws_s3_bucket_lifecycle_configuration.registry",
                   "aws_iam_role.ray_node", "aws_iam_role_policy.registry_access", "aws_iam_instance_profile.ray_node"):
        assert needed in resources, needed
    assert "Enabled" in str(resources["aws_s3_bucket_versioning.registry"]["versioning_configuration"])
    assert "aws:kms" in str(resources["aws_s3_bucket_server_side_encryption_configuration.registry"])
    rules = resources["aws_s3_bucket_lifecycle_configuration.registry"]["rule"]
    log_rule = next(r for r in rules if "logs" in str(r["filter"]))
    assert "expiration" in log_rule
    block = resources["aws_s3_bucket_public_access_block.registry"]
    assert all(block[k] is True or block[k] == "true" for k in ("block_public_acls", "restrict_public_buckets"))
    # The instance profile name is the one the launcher config uses.
    assert re.search(r'"?crucible-ray-node"?', str(resources["aws_iam_instance_profile.ray_node"]["name"]))


def test_kuberay_rayservice():
    """The RayService's Serve config: every application's import path is a real callable of this
    project taking the entry's args, the spec it names exists, and model entries are named the
    way the router looks them up."""
    import importlib
    import inspect

    from pipelines.spec import load_spec
    from serving.app import app_name

    doc = _load("kuberay/rayservice.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService" and doc["metadata"]["name"]
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and head["resources"]["limits"]
    assert 8000 in [p["containerPort"] for p in head["ports"]]
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])  # a YAML document inside a string
    assert serve_cfg["http_options"]["port"] == 8000
    apps = serve_cfg["applications"]
    names = [a["name"] for a in apps]
    assert len(set(names)) == len(names)
    routed = [a for a in apps if a.get("route_prefix")]
    assert len(routed) == 1 and routed[0]["route_prefix"] == "/"
    for entry in apps:
        module_name, _, attr = entry["import_path"].partition(":")
        assert attr, f"{entry['import_path']}: Serve needs module:attribute"
        assert (ROOT / (module_name.replace(".", "/") + ".py")).is_file(), module_name
        builder = getattr(importlib.import_module(module_name), attr)
        assert callable(builder) and list(inspect.signature(builder).parameters) == ["args"], entry["import_path"]
        assert _zip_working_dir(entry["runtime_env"]), entry["name"]  # the task's folder, as for a job
        spec = load_spec(_task_folder(doc) / entry["args"]["spec"], entry["args"].get("set"))
        assert spec.profile == "gpu"
        assert entry["args"]["registry"].startswith("s3://")
        if entry.get("route_prefix"):  # the router: named after the task
            assert entry["import_path"] == "serving.app:build_app" and entry["name"] == spec.task
        else:
            assert entry["import_path"] == "serving.app:build_model_app"
            assert entry["name"] == app_name(spec.task, entry["args"]["model"]), entry["name"]


def test_app_builders_build_the_router_and_a_model_from_the_registry(tmp_path, tiny_model):
    """The builders a config imports, run for real against a file registry (nothing deployed)."""
    from infra.registry import Registry
    from serving.app import build_app, build_model_app

    reg = Registry.open(f"file://{tmp_path / 'registry'}")
    ref = reg.add_directory("model", "built", tiny_model).id
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"task": "built", "model": {"base": str(tiny_model)}, "registry": reg.uri}))
    with pytest.raises(ValueError, match="production is not set"):
        build_app({"spec": str(spec)})
    reg.set_alias("built", "production", ref)
    router = build_app({"spec": str(spec), "registry": reg.uri})
    plan = router._bound_deployment.init_args[1]
    assert plan["models"] == {"production": ref, "canary": None, "shadow": None}
    model = build_model_app({"spec": str(spec), "model": "built@production"})
    assert model._bound_deployment.init_args[:2] == (ref, reg.uri)
    with pytest.raises(ValueError, match="'spec'"):
        build_app({})


def test_every_ray_node_exports_metrics_on_one_port():
    """Serve's metrics (crucible_requests, latency histograms) are scraped from Ray's metrics port:
    every node type starts Ray with it, and the serving pods expose it as the ``metrics`` port."""
    cfg = _load("aws.yaml")
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "--metrics-export-port=8080" in cmd, cmd
    for name in ("raycluster.yaml", "rayservice.yaml", "rayjob.yaml"):
        doc = _load(f"kuberay/{name}")
        cluster = doc["spec"].get("rayClusterConfig") or doc["spec"].get("rayClusterSpec") or doc["spec"]
        groups = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
        for group in groups:
            assert group["rayStartParams"]["metrics-export-port"] == "8080", (name, group.get("groupName"))
            if name != "rayjob.yaml":  # a batch job is not scraped
                ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
                assert ports["metrics"] == 8080, (name, group.get("groupName"))
