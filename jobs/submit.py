"""`crucible submit`: run a stage (or the whole loop) on a Ray cluster through the Jobs API.

The job runs the same entry point as a laptop does (`python -m jobs.<stage> SPEC`), with the
project as its working dir and the registry URI and AWS credentials passed as env vars. The
command follows the job's logs and exits with its outcome: 0 succeeded, 1 failed or stopped.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Optional

import typer

from jobs.common import CheckFailed, JsonOpt, SetOpt, command, emit, err, out

# Stage name -> entry-point module (`python -m <module> SPEC`).
STAGE_MODULES = {"run": "jobs.run", "factory": "jobs.factory", "train": "jobs.train",
                 "eval": "jobs.evaluate", "serve": "jobs.serve"}
# Passed through from the submitting shell when set; secrets never go into the spec.
PASS_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
            "AWS_DEFAULT_REGION", "HF_TOKEN", "CRUCIBLE_ADMIN_TOKEN", "OPENAI_API_KEY")
EXCLUDES = [".venv", ".venv-*", ".cache", ".crucible", ".git", "**/__pycache__", "*.gguf", "*.safetensors"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def build_job(spec_path: Path, stage: str, overrides: list[str], address: str,
              working_dir: Path, pip: bool = False) -> dict:
    """The entrypoint and runtime env for a stage; validates the spec before anything is sent."""
    from infra.registry import resolve_registry_uri
    from pipelines.spec import load_spec

    if stage not in STAGE_MODULES:
        raise ValueError(f"--stage {stage!r}: choose one of {', '.join(STAGE_MODULES)}")
    spec = load_spec(spec_path, overrides)  # bad spec: exit 2 here, not minutes later on the cluster
    registry = spec.registry
    if registry.startswith("file://") or "://" not in registry:
        if not _is_loopback(address):
            raise ValueError(f"registry {registry!r} is a local folder, but {address} is a remote cluster: "
                             "its artifacts would land on the head node's disk; use --set registry=s3://…")
        registry = resolve_registry_uri(registry)  # absolute, so the job writes where we read
    try:
        rel_spec = spec_path.resolve().relative_to(working_dir.resolve())
    except ValueError:
        raise ValueError(f"{spec_path}: the spec must be inside the working dir {working_dir} "
                         "(it is shipped with the job)") from None
    args = [str(rel_spec), *[f"--set={o}" for o in overrides], f"--set=registry={registry}"]
    entrypoint = f"python -m {STAGE_MODULES[stage]} " + " ".join(shlex.quote(a) for a in args)
    env_vars = {k: os.environ[k] for k in PASS_ENV if os.environ.get(k)}
    env_vars["CRUCIBLE_REGISTRY"] = registry
    runtime_env = {"working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": env_vars}
    if pip:
        runtime_env["pip"] = ["-c constraints.txt", "-e ."]
    return {"task": spec.task, "entrypoint": entrypoint, "runtime_env": runtime_env, "registry": registry}


def _is_loopback(address: str) -> bool:
    from urllib.parse import urlparse

    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    return host in ("127.0.0.1", "localhost", "::1")


def follow(client, job_id: str, *, quiet: bool, poll_s: float = 1.0, timeout_s: float | None = None) -> tuple[str, str]:
    """Print the job's new log lines as they come; returns (status, full logs)."""
    shown, started = 0, time.time()
    while True:
        status = client.get_job_status(job_id)
        status = str(getattr(status, "value", status))
        logs = client.get_job_logs(job_id)
        if not quiet and len(logs) > shown:
            out.print(logs[shown:], end="", markup=False, highlight=False)
        shown = len(logs)
        if status in TERMINAL:
            return status, logs
        if timeout_s and time.time() - started > timeout_s:
            client.stop_job(job_id)
            raise CheckFailed(f"job {job_id} ran past {timeout_s:g}s and was stopped")
        time.sleep(poll_s)


def register(app: typer.Typer) -> None:
    @app.command("submit")
    @command
    def submit_cmd(spec: Path = typer.Argument(..., help="The spec YAML (inside the working dir)."),
                   address: str = typer.Option(..., "--address", envvar="RAY_JOBS_ADDRESS",
                                               help="The cluster's Jobs API, e.g. http://HEAD:8265."),
                   stage: str = typer.Option("run", "--stage", help="run (the whole loop), factory, train, "
                                             "eval or serve."),
                   set_: Optional[list[str]] = SetOpt,
                   working_dir: Path = typer.Option(Path("."), "--working-dir", help="Shipped with the job."),
                   pip: bool = typer.Option(False, "--pip", help="Install the project on the workers "
                                            "(when the cluster image does not have it)."),
                   no_follow: bool = typer.Option(False, "--no-follow", help="Print the job id and return."),
                   timeout: Optional[float] = typer.Option(None, help="Stop the job after this many seconds."),
                   as_json: bool = JsonOpt):
        """Submit a stage to a Ray cluster, follow its logs, exit with its status.

        The job runs **python -m jobs.<stage> SPEC** with the project as working dir;
        CRUCIBLE_REGISTRY and any AWS_* / HF_TOKEN set in your shell are passed to it. A local
        file:// registry is only allowed for a cluster on this machine.
        """
        from ray.job_submission import JobSubmissionClient

        job = build_job(spec, stage, set_ or [], address, working_dir, pip)
        client = JobSubmissionClient(address)
        job_id = client.submit_job(entrypoint=job["entrypoint"], runtime_env=job["runtime_env"],
                                   metadata={"crucible_task": job["task"], "crucible_stage": stage})
        if not as_json:
            out.print(f"submitted [bold]{job_id}[/bold] to {address}: {job['entrypoint']}", highlight=False)
        result = {"job_id": job_id, "address": address, "stage": stage, "entrypoint": job["entrypoint"],
                  "registry": job["registry"]}
        if no_follow:
            emit({**result, "status": "PENDING"}, as_json, lambda: None)
            return
        status, logs = follow(client, job_id, quiet=as_json, timeout_s=timeout)
        result["status"] = status
        if status != "SUCCEEDED":
            tail = "\n".join(logs.strip().splitlines()[-15:])
            if as_json:
                raise CheckFailed(f"job {job_id} {status.lower()}; last log lines:\n{tail}")
            err.print(f"[bold red]job {job_id} {status.lower()}[/bold red]", highlight=False)
            raise CheckFailed(f"job {job_id} {status.lower()} (see its logs above)")
        emit(result, as_json, lambda: out.print(f"[green]✓[/green] job {job_id} succeeded", highlight=False))
