"""``crucible repair``: targeted training rows for an eval's failure clusters; also ``python -m jobs.repair SPEC``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from jobs.common import JsonOpt, RegistryOpt, SetOpt, command, emit, open_registry, out, run_standalone


def _print(report: dict) -> None:
    from rich.table import Table

    from pipelines.factory.repair import focus_metric

    metric = focus_metric(report)
    has_after = any("after" in c for c in report["clusters"])
    table = Table(title=f"failures of {report['eval']} by cause → {report['dataset']}", title_justify="left")
    for col in ("cluster", "rows", "failed", "repair rows", "rejected", f"{metric} before",
                *((f"{metric} after", "delta") if has_after else ())):
        table.add_column(col, justify="left" if col in ("cluster", "rejected") else "right")
    for c in report["clusters"]:
        cells = [("* " if c["repaired"] else "  ") + c["cluster"], str(c["n"]), str(c["failed"]),
                 f"{c['rows']} of {c['rows_made']}" if c["repaired"] else "-",
                 ", ".join(f"{k} {v}" for k, v in sorted(c["rows_rejected"].items())) or "-",
                 f"{c['before'].get(metric, float('nan')):.3f}"]
        if has_after:
            cells += [f"{c['after'].get(metric, float('nan')):.3f}", f"{c['delta'].get(metric, float('nan')):+.3f}"]
        table.add_row(*cells)
    out.print(table)
    out.print(f"{report['rows_accepted']} of {report['rows_made']} repair row(s) accepted into "
              f"[bold]{report['dataset']}[/bold] (parent {report['parent_dataset']}); report {report['report']}",
              highlight=False)


def repair_cmd(spec_file: Path = typer.Argument(..., metavar="SPEC", help="The spec YAML file."),
               eval_ref: str = typer.Option(..., "--eval", metavar="EVAL", help="The eval run whose failures to repair."),
               after: Optional[str] = typer.Option(None, "--after", metavar="EVAL",
                                                   help="A later eval (of the retrained model): adds each cluster's "
                                                        "before/after."),
               per_cluster: Optional[int] = typer.Option(None, "--per-cluster", min=1,
                                                         help="Rows per cluster (default loop.repair.per_cluster)."),
               clusters: Optional[int] = typer.Option(None, "--clusters", min=1,
                                                      help="How many clusters to repair (default loop.repair.clusters)."),
               markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the report section here."),
               set_: Optional[list[str]] = SetOpt, registry: Optional[str] = RegistryOpt, as_json: bool = JsonOpt):
    """Cluster an eval's failures by cause and build a dataset version with targeted repair rows.

    Causes (first that fires): injection, case, typos, punctuation, length, then entity:<type> or
    label:<class>. Rows are perturbations of the parent dataset's accepted training rows (answer
    unchanged, seeded), plus teacher rewrites where data.teacher is set; every row goes through
    the factory's gates and leakage checks against the eval sets. The new dataset's lineage names
    the parent dataset and the eval.

    Examples:

      crucible repair spec.yaml --eval eval-20261202-abcd

      crucible repair spec.yaml --eval EVAL --after EVAL_OF_RETRAINED --json

    --json prints: eval, parent_dataset, dataset, rows_made, rows_accepted, report, markdown, and
    clusters (cluster, n, failed, per_set, before, repaired, rows, rows_made, rows_rejected,
    members, failures, and with --after: after, delta).
    """
    from pipelines.factory.repair import run
    from pipelines.spec import load_spec

    spec = load_spec(spec_file, set_ or [], check_paths=True)
    reg = open_registry(registry or spec.registry)
    log = (lambda msg: None) if as_json else (lambda msg: out.print(f"[dim]{msg}[/dim]", highlight=False))
    report = run(spec, reg, eval_ref, after=after, per_cluster=per_cluster, clusters=clusters, log=log,
                 progress=not as_json)
    if markdown:
        markdown.write_text(report["markdown"])
    emit(report, as_json, lambda: _print(report))


def register(app: typer.Typer) -> None:
    app.command("repair")(command(repair_cmd))


if __name__ == "__main__":
    run_standalone(repair_cmd)
