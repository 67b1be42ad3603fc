"""Two Ray nodes on one machine: a head and a worker node, each its own `ray start` on 127.0.0.1
with 1 CPU and a custom resource naming it, and an S3 registry (SeaweedFS) as on a real cluster.

With 1 CPU per node and 1 CPU per training worker, a 2-worker run must put one worker on each
node. The factory's Ray Data tasks run on the worker node while its driver runs on the head.
Checkpoints and artifacts go through S3: killing the worker node's processes mid-training (like losing the machine) and starting a fresh
worker node lets Ray Train restart the worker group from the last checkpoint in S3. A Serve
replica runs on the worker node. Every node is stopped by its own process group in the
finalizer, never with `ray stop` (other Ray sessions share the machine). `make cluster-test`, and
`make local-test` after the rest of the suite.
"""

from __future__ import annotations

import json
import secrets
import signal
import threading
import time
from pathlib import Path

import pytest

from infra.ray_env import start_local_head, start_local_worker, stop_process_group
from infra.registry import Registry
from tests.test_train_ray import _rows

pytestmark = [pytest.mark.slow, pytest.mark.two_nodes]
TASK = "adder"
STEPS = 30  # steps take ~0.1 s: enough of them after the kill that the run is still going
OBJECT_STORE = 200 * 1024 * 1024  # per node; Ray's default (30% of RAM each) is not needed here


def _alive_nodes(ray) -> dict[str, dict]:
    return {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}


def _wait(condition, what: str, timeout: float = 120.0, every: float = 0.5):
    """Poll ``condition`` until it returns something truthy (a state check, not a fixed sleep)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := condition():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    """{ray, reg, head, worker (node ids), start_worker()}: two nodes joined, the driver connected."""
    import ray

    import shutil
    import tempfile

    from tests.conftest import CACHE

    CACHE.mkdir(parents=True, exist_ok=True)  # short: Ray's unix socket paths must stay under 108 bytes
    root = Path(tempfile.mkdtemp(prefix="r2n-", dir=CACHE))
    creds = {"AWS_ENDPOINT_URL": s3_server["endpoint"], "AWS_ACCESS_KEY_ID": s3_server["AWS_ACCESS_KEY_ID"],
             "AWS_SECRET_ACCESS_KEY": s3_server["AWS_SECRET_ACCESS_KEY"], "AWS_REGION": "us-east-1"}
    mp = pytest.MonkeyPatch()
    for k, v in creds.items():
        mp.setenv(k, v)  # the driver reads and writes the registry too
    if ray.is_initialized():  # another module's local Ray: this module drives the cluster instead
        ray.shutdown()
    procs = []

    def interrupted(signum, frame):  # `timeout`/CI stopping pytest: still stop the nodes in the finally
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        head, gcs, _ = start_local_head(root / "ray", num_cpus=1, dashboard=False, resources={"head_node": 1},
                                        env=creds, timeout=240, object_store_memory=OBJECT_STORE)
        procs.append(head)

        def start_worker():
            before = set(_alive_nodes(ray))
            proc = start_local_worker(gcs, root / "logs", num_cpus=1, resources={"worker_node": 1}, env=creds,
                                      timeout=240, temp_dir=root / "ray", object_store_memory=OBJECT_STORE)
            procs.append(proc)
            new = _wait(lambda: set(_alive_nodes(ray)) - before, "the worker node to join")
            return proc, new.pop()

        ray.init(address=gcs, log_to_driver=True)
        (head_id,) = _alive_nodes(ray)  # only the head so far
        worker_proc, worker_id = start_worker()
        reg = Registry.open(f"s3://{s3_server['bucket']}/two-nodes-{secrets.token_hex(3)}")
        yield {"ray": ray, "reg": reg, "head": head_id, "worker": worker_id, "worker_proc": worker_proc,
               "start_worker": start_worker}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for proc in reversed(procs):
            stop_process_group(proc.pid, proc)
        mp.undo()
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def base(cluster, tiny_model) -> str:
    """The base model in the S3 registry: the nodes read it from there, not from a local path."""
    return cluster["reg"].add_directory("model", TASK, tiny_model).id


@pytest.fixture(scope="module")
def trained(cluster, base):
    """A dataset in the S3 registry and a reference (unbroken) 2-worker run across the nodes."""
    from pipelines.train import run

    reg = cluster["reg"]
    dataset = reg.create("dataset", TASK, files={"train.jsonl": _rows(64), "dev.jsonl": _rows(16, 1000)}).id
    result = run(_spec(base), reg, dataset)
    return {"base": base, "dataset": dataset, "result": result}


def _spec(base: str, **train):
    from pipelines.spec import spec_from_dict

    t = {"workers": 2, "cpus_per_worker": 1, "threads_per_worker": 1, "max_steps": STEPS, "micro_batch_size": 4,
         "lr": 3e-2, "scheduler": "constant", "warmup_ratio": 0.0, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
         "seed": 0, **train}
    return spec_from_dict({"task": TASK, "model": {"base": base, "max_seq_len": 64}, "train": t})


def _keys(reg) -> set[str]:
    return {o.key for o in reg.store.list("ray-train/")}


def _actors(class_prefix: str, state: str | None = None) -> list[dict]:
    """Actors from the GCS actor table (no dashboard needed: on a loaded 2-core machine the
    dashboard's modules sometimes failed to start), as {actor_id, node_id, state, class_name}."""
    from ray._private.state import actors

    return [{"actor_id": i, "node_id": a["Address"]["NodeID"], "state": a["State"], "class_name": a["ActorClassName"]}
            for i, a in actors().items()
            if a["ActorClassName"].startswith(class_prefix) and (state is None or a["State"] == state)]


def _train_workers(ray) -> list[dict]:
    return _actors("RayTrainWorker")


def _task_nodes(*names: str) -> dict[str, set[str]]:
    """{task name: node ids it ran on} for the tasks whose name holds one of ``names``, from the
    GCS's task events (no dashboard needed)."""
    from ray._private.state import state

    found: dict[str, set[str]] = {}
    for e in state._get_all_task_events():
        name = e.task_info.name or e.task_info.func_or_class_name
        node = e.state_updates.node_id.hex() or e.task_info.node_id.hex()
        if node and any(n in name for n in names):
            found.setdefault(name, set()).add(node)
    return found


def test_two_worker_training_puts_one_worker_on_each_node(cluster, trained):
    ray = cluster["ray"]
    nodes = {a["node_id"] for a in _train_workers(ray)}
    assert nodes == {cluster["head"], cluster["worker"]}  # 1 CPU per node, 1 per worker: one each
    hist = json.loads(cluster["reg"].read_file(trained["result"]["run"].id, "metrics.json"))["history"]
    assert [h["step"] for h in hist] == list(range(1, STEPS + 1)) and hist[-1]["loss"] < hist[0]["loss"]
    keys = _keys(cluster["reg"])
    assert any("ray-train/" in k and "checkpoint_" in k for k in keys)  # Ray Train's checkpoints went to S3


def _hold_head_cpu(ray):
    """An actor holding the head's only CPU: while it lives, every task and replica that needs a CPU
    is placed on the worker node (Ray's SPREAD is best effort: a few short tasks reuse one worker's
    lease, so without this, where they run is up to timing)."""

    @ray.remote(num_cpus=1, resources={"head_node": 0.01})
    class HoldHeadCpu:
        def ready(self):
            return True

    hold = HoldHeadCpu.remote()
    ray.get(hold.ready.remote(), timeout=120)
    return hold


def test_factory_runs_its_tasks_on_the_worker_node(cluster, base, tmp_path):
    """Four raw files (one shard each) through the factory, driven from the head while its Ray Data
    tasks run on the worker node: every row is accounted for and the dataset lands in the S3
    registry, so nothing in the factory depends on the driver's node."""
    from pipelines.factory import build
    from pipelines.spec import spec_from_dict

    files = []
    for f in range(4):
        lines = [json.dumps({"id": f"{f}-{i}", "messages": [{"role": "user", "content": f"add {f * 1000 + i} {i * 7}"},
                                                            {"role": "assistant", "content": str(f * 1000 + i * 8)}]})
                 for i in range(150)]
        lines.insert(5, "{not json")  # one malformed row per file: rejected with its reason, not lost
        path = tmp_path / f"part-{f}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        files.append(str(path))
    spec = spec_from_dict({"task": TASK, "model": {"base": base, "max_seq_len": 64},
                           "data": {"train": files, "dedupe": {"near": False}}})
    ray = cluster["ray"]
    hold = _hold_head_cpu(ray)
    try:
        manifest, summary = build(spec, cluster["reg"], progress=False)
    finally:
        ray.kill(hold)
    assert summary["input_rows"] == 4 * 151
    assert summary["rejected"].get("malformed:bad_json") == 4
    assert summary["input_rows"] == sum(summary["accepted"].values()) + sum(summary["rejected"].values())
    assert {"train.jsonl", "rejected.jsonl", "stats.json"} <= set(cluster["reg"].get(manifest.id).files)
    names = {cluster["head"]: "head", cluster["worker"]: "worker"}

    def where() -> dict[str, list[str]]:  # {task name: the nodes it ran on}
        return {task: sorted(names.get(n, n) for n in nodes) for task, nodes in _task_nodes("read_shard", "gate_batch").items()}

    # each node reports its task events to the GCS about once a second: wait for both stages
    ran = _wait(lambda: (r := where()) and len(r) == 2 and r, "the factory's task events", timeout=60)
    assert ran == {"FlatMap(read_shard)": ["worker"], "MapBatches(gate_batch)": ["worker"]}, ran


def test_losing_the_worker_node_resumes_from_the_last_checkpoint(cluster, trained):
    """The worker node's processes are killed (SIGKILL, like a lost machine) once three checkpoints
    of the run are in S3; a fresh node joins; the run restarts its worker group from that checkpoint
    and its loss curve matches the unbroken run's."""
    from pipelines.train import run

    ray, reg = cluster["ray"], cluster["reg"]
    before = {a["actor_id"] for a in _train_workers(ray)}
    seen_ckpts = {k for k in _keys(reg) if "checkpoint_" in k}
    killed: dict = {}

    def kill_after_third_checkpoint():
        # Not at the first: a checkpoint in S3 is not one Ray Train resumes from until its controller
        # has taken rank 0's report (it polls), and a kill in between restarted the run from step 0
        # (seen: 1 run in 3). By the third, the first has been taken; any of them will do.
        try:
            _wait(lambda: len({k for k in _keys(reg) if "checkpoint_" in k and k.endswith("state.json")}
                              - seen_ckpts) >= 3, "three checkpoints of the new run in S3", timeout=300, every=0.1)
            proc = cluster["worker_proc"]
            killed["stopped"] = stop_process_group(proc.pid, proc, grace=0)  # SIGKILL at once
            killed["proc"], killed["node"] = cluster["start_worker"]()
        except BaseException as e:  # reported by the test, not lost in the thread
            killed["error"] = e

    watcher = threading.Thread(target=kill_after_third_checkpoint, daemon=True)
    watcher.start()
    result = run(_spec(trained["base"], save_every=2, max_failures=2), reg, trained["dataset"])
    watcher.join(timeout=300)
    assert "error" not in killed, killed.get("error")
    lost = cluster["worker"]
    # the module's state first, so a failed assertion below does not mislead the tests after it
    cluster["worker_proc"], cluster["worker"] = killed["proc"], killed["node"]
    assert killed["stopped"], "the worker node's processes were still alive after SIGKILL"
    assert killed["node"] != lost
    restarted = [a for a in _train_workers(ray) if a["actor_id"] not in before]
    assert {a["node_id"] for a in restarted} >= {cluster["head"], killed["node"]}  # a new group, on the new node
    # from a checkpoint, once, not from scratch: the run's own record, not forwarded worker log lines
    resumed = result["summary"]["resumed_at_steps"]
    assert len(resumed) == 1 and 2 <= resumed[0] < STEPS, resumed
    got = json.loads(reg.read_file(result["run"].id, "metrics.json"))["history"]
    want = json.loads(reg.read_file(trained["result"]["run"].id, "metrics.json"))["history"]
    assert [h["step"] for h in got] == list(range(1, STEPS + 1))  # the curve continues from the checkpoint
    assert [h["loss"] for h in got] == pytest.approx([h["loss"] for h in want], rel=1e-3, abs=1e-4)


def test_serve_replica_on_the_worker_node_answers(cluster, trained):
    import httpx
    from ray import serve

    from pipelines.spec import spec_from_dict
    from serving.app import deploy
    from pipelines.release import read_plan
    from tests.s3server import free_port

    ray, reg = cluster["ray"], cluster["reg"]
    model = trained["result"]["model"].id
    reg.set_alias(TASK, "production", model)
    spec = spec_from_dict({"task": TASK, "model": {"base": trained["base"]}, "registry": reg.uri,
                           "deploy": {"num_cpus": 1, "threads_per_replica": 1, "max_new_tokens": 8}})

    hold = _hold_head_cpu(ray)  # the replica lands on the worker node
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        deploy(spec, read_plan(reg, TASK, spec.deploy.canary_weight), reg.uri)
        ray.kill(hold)
        replicas = [a for a in _actors("ServeReplica:", "ALIVE") if "ModelReplica" in a["class_name"]]
        assert [a["node_id"] for a in replicas] == [cluster["worker"]]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            r = client.post("/v1/chat/completions", json={"model": TASK, "max_tokens": 4,
                                                          "messages": [{"role": "user", "content": "add 2 3"}]})
        assert r.status_code == 200, r.text
        assert r.headers["x-crucible-model"] == model and r.json()["choices"][0]["message"]["role"] == "assistant"
    finally:
        serve.shutdown()
