"""``crucible factory``, ``crucible dataset export`` and ``crucible generate``; also ``python -m jobs.factory SPEC``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from jobs.common import JsonOpt, RegistryOpt, SetOpt, command, emit, open_registry, out, run_standalone

AddressOpt = typer.Option(None, "--address", metavar="ADDR", envvar="RAY_ADDRESS",
                          help="A Ray cluster (ray://host:10001 or host:6379); default: a local Ray on this machine.")
SUMMARY_KEYS = ("dataset", "input_rows", "accepted", "rejected", "duplicate_clusters", "leaked")


def _print_summary(s: dict) -> None:
    from rich.table import Table

    acc, rej = sum(s["accepted"].values()), sum(s["rejected"].values())
    table = Table(title=f"{s['input_rows']} input rows → {acc} accepted, {rej} rejected", title_justify="left")
    table.add_column("")
    table.add_column("rows", justify="right")
    for split, n in s["accepted"].items():
        table.add_row(f"[green]accepted[/green] {split}", str(n))
    for reason, n in sorted(s["rejected"].items(), key=lambda kv: -kv[1]):
        table.add_row(f"[red]rejected[/red] {reason}", str(n))
    out.print(table)
    out.print(f"{s['duplicate_clusters']} duplicate cluster(s); {s['leaked']} training row(s) removed as eval leaks"
              + "".join(f" ({k}: {v})" for k, v in s.get("leaked_by_set", {}).items())
              + f"; {s['rows_per_s']:,.0f} rows/s", highlight=False)
    out.print(("reused " if s.get("reused") else "registered ") + f"[bold]{s['dataset']}[/bold]  "
              f"(crucible dataset export {s['dataset']} DIR)", highlight=False)


def factory_cmd(spec_file: Path = typer.Argument(..., metavar="SPEC", help="The spec YAML file."),
                set_: Optional[list[str]] = SetOpt, address: Optional[str] = AddressOpt,
                progress: bool = typer.Option(True, "--progress/--no-progress", help="Ray Data progress bars."),
                registry: Optional[str] = RegistryOpt, as_json: bool = JsonOpt):
    """Build a dataset version from data.train on Ray Data and register it.

    Stages: **read** (JSONL, JSONL.gz, JSON arrays, CSV with data.columns; chat messages,
    system/user/assistant, instruction/input/output, prompt/chosen/rejected, tool calls), **gates**
    (contract, empty/short turns, length in the base model's tokens, leaked instructions, PII/secrets
    per data.pii), **leakage** (training rows repeating a data.eval row are removed), **dedupe**
    (exact + MinHash-LSH near duplicates at data.dedupe.threshold), **split** (by cluster, seeded,
    stable), **balance** (data.balance_field, data.cap_per_class) and **report.md**.

    Nothing is lost: every input row is accepted into one split or rejected with a reason.
    A rerun on the same input and spec reuses the same dataset version.

    Examples:

      crucible factory spec.yaml

      crucible factory spec.yaml --set data.dedupe.threshold=0.7 --set data.pii=reject --json

    --json prints: dataset, input_rows, accepted (per split), rejected (per reason),
    duplicate_clusters, leaked (plus leaked_by_set, per_class, rows_per_s, wall_s, reused).
    """
    from pipelines.factory import build
    from pipelines.spec import load_spec

    spec = load_spec(spec_file, set_ or [], check_paths=True)
    reg = open_registry(registry or spec.registry)
    log = (lambda msg: None) if as_json else (lambda msg: out.print(f"[dim]{msg}[/dim]", highlight=False))
    _, summary = build(spec, reg, address=address, progress=progress and not as_json, log=log)
    emit(summary, as_json, lambda: _print_summary(summary))


def export_cmd(ref: str = typer.Argument(..., help="A dataset artifact id or TASK@ALIAS."),
               dest: Path = typer.Argument(..., metavar="DIR", help="Folder to write the files into."),
               registry: Optional[str] = RegistryOpt, as_json: bool = JsonOpt):
    """Write a dataset version's files into DIR: train/dev/test.jsonl, rejected.jsonl, report.md, eval/, stats.json.

    Every row carries its source (file:line, CSV start line, or JSON array position); rejected
    rows also carry reason and detail. Files are checked against their hashes on the way out.
    """
    import shutil

    reg = open_registry(registry)
    m = reg.get(ref)
    if m.kind != "dataset":
        raise ValueError(f"{ref}: is a {m.kind}, not a dataset")
    folder = reg.materialize(m.id)
    written = []
    for rel in sorted(m.files):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / rel, target)
        written.append(rel)
    emit({"dataset": m.id, "dir": str(dest.resolve()), "files": written}, as_json,
         lambda: out.print(f"wrote {len(written)} file(s) of {m.id} to {dest}: {', '.join(written)}", highlight=False))


def generate_cmd(spec_file: Path = typer.Argument(..., metavar="SPEC", help="The spec YAML file (needs data.teacher)."),
                 out_file: Optional[Path] = typer.Option(None, "--out", help="Where to write accepted rows "
                                                         "(default: .cache/crucible/generated/<task>.jsonl)."),
                 run_factory: bool = typer.Option(True, "--factory/--no-factory",
                                                  help="Then run the factory with the generated rows as an extra source."),
                 set_: Optional[list[str]] = SetOpt, address: Optional[str] = AddressOpt,
                 registry: Optional[str] = RegistryOpt, as_json: bool = JsonOpt):
    """Teacher generation: new candidate rows from seed rows, scored by a rubric judge, fed to the factory.

    For each seed row (from data.train) the teacher (data.teacher: an OpenAI-compatible URL, or an
    hf/vllm model) writes data.teacher.per_seed new examples from a prompt naming the task, the
    contract, the seed's category, a difficulty and an edge case. A judge scores each on realism,
    correctness, format, difficulty, diversity, learnability and safety (1-5); a candidate is
    accepted at total >= min_total (26/35), correctness >= 4, format = 5, safety >= 4 (settable).
    Accepted rows then go through the same factory gates as any other source.

    --json prints: generated, accepted, rejected (per reason), out, and with --factory the
    factory's keys under "factory".
    """
    from pipelines.factory.teacher import generate
    from pipelines.spec import load_spec

    spec = load_spec(spec_file, set_ or [], check_paths=True)
    reg = open_registry(registry or spec.registry)
    log = (lambda msg: None) if as_json else (lambda msg: out.print(f"[dim]{msg}[/dim]", highlight=False))
    result = generate(spec, reg, out_file=out_file, log=log, progress=not as_json)
    if run_factory:
        from pipelines.factory import build

        _, result["factory"] = build(spec, reg, address=address, extra_sources=[result["out"]],
                                     progress=not as_json, log=log)

    def human():
        out.print(f"teacher wrote {result['generated']} candidate(s): {result['accepted']} accepted by the judge"
                  + "".join(f", {n} {r}" for r, n in result["rejected"].items()) + f" → {result['out']}",
                  highlight=False)
        if "factory" in result:
            _print_summary(result["factory"])

    emit(result, as_json, human)


def register(app: typer.Typer) -> None:
    app.command("factory")(command(factory_cmd))
    app.command("generate")(command(generate_cmd))
    dataset_app = typer.Typer(no_args_is_help=True, help="Work with registered dataset versions.")
    dataset_app.command("export")(command(export_cmd))
    app.add_typer(dataset_app, name="dataset")


if __name__ == "__main__":
    run_standalone(factory_cmd)
