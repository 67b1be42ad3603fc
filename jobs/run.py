"""``crucible run``: the whole loop, resuming from what the registry has; also ``python -m jobs.run SPEC``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from jobs.common import CheckFailed, JsonOpt, RegistryOpt, SetOpt, command, emit, open_registry, out, run_standalone


def run_cmd(spec_file: Path = typer.Argument(..., metavar="SPEC", help="The spec YAML file."),
            until: str = typer.Option("deploy", "--until", help="Stop after this step: factory, train, eval, gate "
                                      "or deploy."),
            set_: Optional[list[str]] = SetOpt, registry: Optional[str] = RegistryOpt, as_json: bool = JsonOpt):
    """Run the loop: factory → train → eval (baselines side by side) → gate → deploy as canary.

    Resumes from the registry: an unchanged dataset is not rebuilt, a model already trained on it
    with the same model/train sections is not retrained, an identical eval is not rerun. A failed
    gate stops before deploy (exit 1) and leaves production untouched.

    Runs as is on a laptop, or on a cluster: `crucible submit SPEC --address http://HEAD:8265`
    (or `ray job submit --working-dir . -- python -m jobs.run SPEC`).
    """
    from pipelines.loop import run_loop
    from pipelines.spec import load_spec

    spec = load_spec(spec_file, set_ or [], check_paths=True)
    reg = open_registry(registry or spec.registry)
    result = run_loop(spec, reg, until=until, log=(lambda _: None) if as_json else
                      (lambda msg: out.print(msg, highlight=False, markup=False)))
    emit(result, as_json, lambda: out.print(
        f"loop for [bold]{spec.task}[/bold] done up to {list(result['steps'])[-1]}", highlight=False))
    if result.get("passed") is False:
        if as_json:  # the result (with each step and the failed gates) is the output; exit 1 says it failed
            raise typer.Exit(1)
        raise CheckFailed("the release gate failed: the candidate was not deployed "
                          f"({', '.join(result['steps']['gate']['failed'] or [])})")


def register(app: typer.Typer) -> None:
    app.command("run")(command(run_cmd))


if __name__ == "__main__":  # python -m jobs.run SPEC [...] (locally or under `ray job submit`)
    run_standalone(run_cmd)
