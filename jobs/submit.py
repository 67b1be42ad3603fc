"""`crucible submit`: run a stage (or the whole loop) on a Ray cluster through the Jobs API.

The way Ray teaches it (`ray job submit --working-dir my-task -- crucible run spec.yaml`): the
spec's own folder is the job's working dir, and the job runs the `crucible` installed on the
cluster's nodes, not code shipped from here. Everything the spec reads must therefore travel with
it or live where every node can read it: files it names inside the folder are shipped, s3:// is
read in place, and anything else is refused before submitting, by name. The registry URI and AWS
credentials are passed as env vars. The command follows the job's logs and exits with its
outcome: 0 succeeded, 1 failed or stopped (with Ray's reason and the log tail).
"""

from __future__ import annotations

import fnmatch
import os
import shlex
import time
from pathlib import Path
from typing import Optional

import typer

from jobs.common import CheckFailed, JsonOpt, SetOpt, command, emit, err, out

# Stage name -> the `crucible` command the job runs (`crucible <command> SPEC`).
STAGE_COMMANDS = {"run": "run", "factory": "factory", "train": "train", "eval": "eval", "serve": "serve"}
# Passed through from the submitting shell when set; secrets never go into the spec.
PASS_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
            "AWS_DEFAULT_REGION", "HF_TOKEN", "CRUCIBLE_ADMIN_TOKEN", "OPENAI_API_KEY")
EXCLUDES = [".venv", ".venv-*", ".cache", ".crucible", ".git", "**/__pycache__", "*.gguf", "*.safetensors"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def build_job(spec_path: Path, stage: str, overrides: list[str], address: str,
              working_dir: Path | None = None, pip: list[str] | None = None) -> dict:
    """The entrypoint and runtime env for a stage; validates the spec and checks that the job can
    read every file it names before anything is sent. ``working_dir`` defaults to the spec's folder."""
    from infra.registry import resolve_registry_uri
    from pipelines.spec import load_spec

    if stage not in STAGE_COMMANDS:
        raise ValueError(f"--stage {stage!r}: choose one of {', '.join(STAGE_COMMANDS)}")
    spec = load_spec(spec_path, overrides)  # bad spec: exit 2 here, not minutes later on the cluster
    folder = (working_dir or spec_path.parent).resolve()
    if not folder.is_dir():
        raise ValueError(f"--working-dir {folder}: not a folder")
    remote = not _is_loopback(address)
    registry = spec.registry
    if registry.startswith("file://") or "://" not in registry:
        if remote:
            raise ValueError(f"registry {registry!r} is a local folder, but {address} is a remote cluster: "
                             "its artifacts would land on the head node's disk; use --set registry=s3://…")
        registry = resolve_registry_uri(registry)  # absolute, so the job writes where we read
    problems = unshippable(spec, folder, remote=remote)
    if problems:
        raise ValueError(f"{spec_path}: the job cannot read these (it ships {folder} and reads s3:// in place):\n  "
                         + "\n  ".join(problems))
    rel_spec = Path(spec.sources[0]).relative_to(folder)
    args = [str(rel_spec), *[f"--set={o}" for o in overrides], f"--set=registry={registry}"]
    entrypoint = f"crucible {STAGE_COMMANDS[stage]} " + " ".join(shlex.quote(a) for a in args)
    env_vars = {k: os.environ[k] for k in PASS_ENV if os.environ.get(k)}
    env_vars["CRUCIBLE_REGISTRY"] = registry
    runtime_env = {"working_dir": str(folder), "excludes": EXCLUDES, "env_vars": env_vars}
    if pip:
        runtime_env["pip"] = list(pip)
    return {"task": spec.task, "entrypoint": entrypoint, "runtime_env": runtime_env, "registry": registry,
            "working_dir": str(folder), "profile": spec.profile}


def unshippable(spec, folder: Path, *, remote: bool) -> list[str]:
    """``field: path: why`` for every file the spec reads that the job could not: outside the
    shipped folder and not on s3://, or inside it but excluded from the upload. A local base
    model folder is never shipped (weights are excluded); on this machine's own cluster the job
    can still read it where it is."""
    named = [(f"data.train[{i}]", p) for i, p in enumerate(spec.data.train)]
    named += [(f"data.eval.{k}", p) for k, p in spec.data.eval.items()]
    if isinstance(spec.contract.schema_, str):
        named.append(("contract.schema", spec.contract.schema_))
    named += [("extends", p) for p in spec.sources[1:]]
    problems = []
    if not _inside(Path(spec.sources[0]), folder):
        problems.append(f"spec: {spec.sources[0]}: outside the working dir {folder}")
    for field, path in named:
        if path.startswith("s3://") or ("://" in path and not path.startswith("file://")):
            continue
        local = Path(path.removeprefix("file://"))
        if not _inside(local, folder):
            problems.append(f"{field}: {path}: outside {folder} (move it inside, or put it on s3://)")
        elif _excluded(local.relative_to(folder)):
            problems.append(f"{field}: {path}: excluded from the upload ({', '.join(EXCLUDES)})")
    base = spec.model.base
    if base.startswith("/"):
        if _inside(Path(base), folder):
            problems.append(f"model.base: {base}: model weights are not shipped with a job; register the "
                            "folder (crucible registry add-model) and use its ref")
        elif remote:
            problems.append(f"model.base: {base}: a local folder the cluster's nodes cannot read; register it "
                            "in the S3 registry (crucible registry add-model) and use its ref")
    return problems


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder)


def _excluded(rel: Path) -> bool:
    parts = rel.parts
    return any(fnmatch.fnmatch(part, pat) for pat in EXCLUDES if "/" not in pat for part in parts)


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
    def submit_cmd(spec: Path = typer.Argument(..., help="The spec YAML; its folder is shipped with the job."),
                   address: str = typer.Option(..., "--address", envvar="RAY_JOBS_ADDRESS",
                                               help="The cluster's Jobs API, e.g. http://HEAD:8265."),
                   stage: str = typer.Option("run", "--stage", help="run (the whole loop), factory, train, "
                                             "eval or serve."),
                   set_: Optional[list[str]] = SetOpt,
                   working_dir: Optional[Path] = typer.Option(None, "--working-dir", help="Ship this folder "
                                                              "instead of the spec's (the spec must be inside)."),
                   pip: Optional[list[str]] = typer.Option(None, "--pip", metavar="REQUIREMENT",
                                                           help="Install this for the job (repeatable), when the "
                                                           "cluster image has no crucible."),
                   no_follow: bool = typer.Option(False, "--no-follow", help="Print the job id and return."),
                   timeout: Optional[float] = typer.Option(None, help="Stop the job after this many seconds."),
                   as_json: bool = JsonOpt):
        """Submit a stage to a Ray cluster, follow its logs, exit with its status.

        The spec's folder (or --working-dir) is shipped as the job's working dir and the job runs
        **crucible <stage> SPEC** with the crucible installed on the cluster. Files the spec names
        must be inside that folder or on s3://; anything else is refused, by name, before
        submitting. CRUCIBLE_REGISTRY and any AWS_* / HF_TOKEN set in your shell are passed to the
        job. A local file:// registry is only allowed for a cluster on this machine.
        """
        from ray.job_submission import JobSubmissionClient

        job = build_job(spec, stage, set_ or [], address, working_dir, pip or [])
        client = JobSubmissionClient(address)
        job_id = client.submit_job(entrypoint=job["entrypoint"], runtime_env=job["runtime_env"],
                                   metadata={"crucible_task": job["task"], "crucible_stage": stage})
        if not as_json:
            out.print(f"submitted [bold]{job_id}[/bold] to {address}: {job['entrypoint']}", highlight=False)
        result = {"job_id": job_id, "address": address, "stage": stage, "entrypoint": job["entrypoint"],
                  "registry": job["registry"], "working_dir": job["working_dir"], "profile": job["profile"]}
        if no_follow:
            emit({**result, "status": "PENDING"}, as_json, lambda: None)
            return
        status, logs = follow(client, job_id, quiet=as_json, timeout_s=timeout)
        result["status"] = status
        if status != "SUCCEEDED":
            reason = (client.get_job_info(job_id).message or "").strip()  # Ray's own: exit code, runtime env error
            tail = "\n".join(logs.strip().splitlines()[-15:])
            if as_json:
                raise CheckFailed(f"job {job_id} {status.lower()}: {reason}\nlast log lines:\n{tail}")
            err.print(f"[bold red]job {job_id} {status.lower()}[/bold red]", highlight=False)
            raise CheckFailed(f"job {job_id} {status.lower()}: {reason} (its logs are above)")
        emit(result, as_json, lambda: out.print(f"[green]✓[/green] job {job_id} succeeded", highlight=False))
