"""``--json`` prints exactly one JSON object on stdout, whatever else runs: Ray worker logs,
progress, prints from library code, child processes. Each long command runs through the real
``crucible`` program (its own process, its own local Ray) and its stdout is parsed whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from jobs.common import command, emit, json_stdout

ROOT = Path(__file__).resolve().parent.parent


def crucible(*args: str, cwd: Path, code: int = 0, env: dict | None = None, timeout: int = 600
             ) -> tuple[dict, str]:
    """(the parsed stdout, stderr) of one ``crucible ... --json`` process that must exit ``code``."""
    done = subprocess.run([sys.executable, "-m", "jobs.cli", *args, "--json"], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    try:
        doc = json.loads(done.stdout)  # the whole of stdout: one object, nothing before or after it
    except json.JSONDecodeError:
        pytest.fail(f"crucible {args[0]} --json: stdout is not one JSON object:\n{done.stdout[-3000:]}\n"
                    f"--- stderr ---\n{done.stderr[-3000:]}")
    assert isinstance(doc, dict)
    assert done.returncode == code, f"crucible {args[0]}: exit {done.returncode}: {doc}\n{done.stderr[-3000:]}"
    return doc, done.stderr


def test_everything_written_to_stdout_while_a_json_command_runs_goes_to_stderr(capfd):
    """Python prints, fd-1 writes (as C code and Ray's log thread make) and child processes: stderr."""
    app = typer.Typer()

    @app.command()
    @command
    def noisy(as_json: bool = typer.Option(False, "--json")):
        print("a library print")
        os.write(1, b"an fd-1 write\n")
        subprocess.run([sys.executable, "-c", "print('a child process')"], check=True)
        emit({"ok": True}, as_json, lambda: print("human"))

    with json_stdout():  # the wrapper's mechanism on its own, seen at the fd level
        print("inside")
        os.write(1, b"raw\n")
    fd = capfd.readouterr()
    assert fd.out == "" and "inside" in fd.err and "raw" in fd.err
    res = CliRunner().invoke(app, ["--json"])
    fd = capfd.readouterr()
    assert res.exit_code == 0 and json.loads(res.stdout) == {"ok": True}
    assert "a library print" in res.stderr
    assert fd.out == "" and "an fd-1 write" in fd.err and "a child process" in fd.err


def test_a_crash_or_two_results_still_print_one_object():
    app = typer.Typer()

    @app.command()
    @command
    def twice(as_json: bool = typer.Option(False, "--json"), boom: bool = False):
        if boom:
            raise KeyError("no such thing")
        emit({"n": 1}, as_json, lambda: None)
        emit({"n": 2}, as_json, lambda: None)

    res = CliRunner().invoke(app, ["--json"])
    assert res.exit_code == 1 and "two results" in json.loads(res.stdout)["error"]
    res = CliRunner().invoke(app, ["--json", "--boom"])
    assert res.exit_code == 1 and json.loads(res.stdout)["error"] == "KeyError: 'no such thing'"
    assert "Traceback" in res.stderr


@pytest.fixture
def ray_head_env(tmp_path_factory):
    """A Ray head of our own (its process group stopped at the end) that every command joins:
    one start instead of one per command, which on a loaded machine is where Ray times out.
    Worker logs reach each command the same way (``log_to_driver``)."""
    from infra.ray_env import local_ray_env, start_local_head, stop_process_group

    proc, gcs, _ = start_local_head(tmp_path_factory.mktemp("rayhead"), num_cpus=2, dashboard=False, timeout=180)
    try:
        yield {**local_ray_env(), "RAY_ADDRESS": gcs}
    finally:
        stop_process_group(proc.pid, proc)


@pytest.mark.slow
def test_every_long_command_prints_one_json_object(tmp_path, tiny_model, ray_head_env):
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"please repeat the number {i} back to me"},
                                         {"role": "assistant", "content": f"{i}"}]} for i in range(10, 50)]
    golden = [{"id": f"g{i}", "messages": [{"role": "user", "content": f"repeat this: {i} {i}"},
                                           {"role": "assistant", "content": f"{i}"}]} for i in (100, 200, 300)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "golden.jsonl").write_text("".join(json.dumps(r) + "\n" for r in golden))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "task": "echo", "contract": {"type": "text"}, "registry": f"file://{tmp_path / 'registry'}",
        "data": {"train": ["train.jsonl"], "eval": {"golden": "golden.jsonl"}},
        "model": {"base": str(tiny_model), "max_seq_len": 64},
        "train": {"workers": 1, "max_steps": 2, "micro_batch_size": 4},
        "eval": {"engine": "hf", "max_new_tokens": 4, "bootstrap": 0},
        "gates": [{"metric": "token_f1", "eval_set": "golden", "min": 0.0}]}))
    s = str(spec)
    env = {**ray_head_env, "CRUCIBLE_REGISTRY": f"file://{tmp_path / 'registry'}"}  # eval, gate, predict

    ds, _ = crucible("factory", s, cwd=tmp_path, env=env)
    assert ds["dataset"].startswith("dataset-echo-")
    trained, stderr = crucible("train", s, cwd=tmp_path, env=env)
    assert trained["steps"] == 2 and trained["model"].startswith("model-echo-")
    assert "[crucible train]" in stderr  # the worker's log lines still reach the terminal, on stderr
    ev, _ = crucible("eval", s, "--model", trained["model"], cwd=tmp_path, env=env)
    assert ev["eval"].startswith("eval-echo-")
    verdict, _ = crucible("gate", ev["eval"], cwd=tmp_path, env=env)
    assert verdict["passed"] is True
    verdict, _ = crucible("gate", ev["eval"], s, "--set", "gates=[{metric: token_f1, eval_set: golden, min: 1.1}]",
                          cwd=tmp_path, env=env, code=1)
    assert verdict["passed"] is False  # a failed gate: exit 1, the verdict is still the one object
    pred, _ = crucible("predict", trained["model"], "--input", str(tmp_path / "golden.jsonl"),
                       "--output", str(tmp_path / "out.jsonl"), "--max-new-tokens", "4", cwd=tmp_path, env=env)
    assert pred["n"] == 3 == len((tmp_path / "out.jsonl").read_text().splitlines())
    loop, _ = crucible("run", s, "--until", "gate", cwd=tmp_path, env=env)
    assert list(loop["steps"]) == ["factory", "train", "eval", "gate"]
    bad, _ = crucible("train", s, "--set", "train.lr=-1", cwd=tmp_path, env=env, code=2)
    assert "train.lr" in " ".join(bad["details"])
