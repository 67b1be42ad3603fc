"""The ``crucible`` command. Thin: parse arguments, call a library function, report.

Every command prints a summary for people, or with ``--json`` one JSON object for scripts
(``jobs/common.py`` holds the shared options, error mapping and exit codes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.tree import Tree

from jobs.common import (JsonOpt, RegistryOpt, SetOpt, command, emit, err, human_size, open_registry,
                         out)

app = typer.Typer(
    name="crucible", no_args_is_help=True, rich_markup_mode="markdown", add_completion=False,
    help="Turn a narrow task into a small specialist model and keep it honest in production.\n\n"
         "Start with **crucible spec validate SPEC**; every stage reads the same spec and "
         "reads and writes artifacts in one registry (a local folder by default, or s3://).")
spec_app = typer.Typer(no_args_is_help=True, help="Check a spec file.")
registry_app = typer.Typer(no_args_is_help=True, help="Look at and manage the artifact registry.")
app.add_typer(spec_app, name="spec")
app.add_typer(registry_app, name="registry")

# -- spec ------------------------------------------------------------------------------------------
@spec_app.command("validate")
@command
def spec_validate(file: Path = typer.Argument(..., help="The spec YAML file."),
                  set_: Optional[list[str]] = SetOpt, as_json: bool = JsonOpt):
    """Validate a spec and print it resolved (defaults filled in, paths made absolute).

    Every problem is reported at once as **path.to.field: what is wrong**; unknown keys
    are errors. Exits 2 when the spec is invalid or names files that do not exist.
    """
    import yaml

    from pipelines.spec import load_spec

    spec = load_spec(file, set_ or [], check_paths=True)
    result = {"spec": spec.to_dict(), "spec_hash": spec.spec_hash(), "valid": True,
              "profile": spec.profile, "sources": spec.sources}
    emit(result, as_json, lambda: (
        out.print(f"[green]✓[/green] {file} is valid  (task [bold]{spec.task}[/bold], "
                  f"profile {spec.profile or 'none'}, spec hash {spec.spec_hash()})"
                  + "".join(f"\n  extends {s}" for s in spec.sources[1:]), highlight=False),
        out.print(yaml.safe_dump(spec.to_dict(), sort_keys=False), highlight=False, markup=False)))


# -- registry --------------------------------------------------------------------------------------
@registry_app.command("ls")
@command
def registry_ls(kind: Optional[str] = typer.Option(None, help="dataset, run, model, eval or deployment."),
                task: Optional[str] = typer.Option(None, help="Only this task's artifacts."),
                registry: Optional[str] = RegistryOpt, as_json: bool = JsonOpt):
    """List artifacts, oldest first, with the aliases that point at them."""
    reg = open_registry(registry)
    items = reg.list(kind=kind, task=task)
    aliases = reg.aliases(task)
    pointing: dict[str, list[str]] = {}
    for t, names in aliases.items():
        for alias, target in names.items():
            pointing.setdefault(target, []).append(f"{t}@{alias}")
    result = {"registry": reg.uri, "artifacts": [
        {"id": m.id, "kind": m.kind, "task": m.task, "created_at": m.created_at, "size": m.size,
         "files": len(m.files), "aliases": sorted(pointing.get(m.id, []))} for m in items],
        "aliases": aliases}

    def human():
        if not items:
            out.print(f"no artifacts in {reg.uri}" + (f" for task {task}" if task else ""), highlight=False)
            return
        table = Table(title=f"{len(items)} artifact(s) in {reg.uri}", title_justify="left")
        table.add_column("id", no_wrap=True)  # ids are copied into other commands: never wrap them
        for col in ("kind", "created", "files", "size", "aliases"):
            table.add_column(col, justify="right" if col in ("files", "size") else "left")
        for m in items:
            table.add_row(m.id, m.kind, m.created_at[:16].replace("T", " "), str(len(m.files)),
                          human_size(m.size), ", ".join(sorted(pointing.get(m.id, []))))
        out.print(table)

    emit(result, as_json, human)


@registry_app.command("show")
@command
def registry_show(ref: str = typer.Argument(..., help="An artifact id or TASK@ALIAS."),
                  lineage: bool = typer.Option(False, "--lineage", help="Also print what it was made from."),
                  verify: bool = typer.Option(False, "--verify", help="Read every blob and check its hash."),
                  registry: Optional[str] = RegistryOpt, as_json: bool = JsonOpt):
    """Show one artifact's manifest: inputs, figures, files; optionally its lineage chain."""
    reg = open_registry(registry)
    m = reg.verify(ref) if verify else reg.get(ref)
    chain = reg.lineage(m.id) if lineage else []
    result = {"manifest": json.loads(m.to_json()), "verified": verify}
    if lineage:
        result["lineage"] = [{"depth": d, "via": via, "id": x.id if x else None, "kind": x.kind if x else None}
                             for d, via, x in chain]

    def human():
        out.print(f"[bold]{m.id}[/bold]  {m.kind} of task {m.task}, created {m.created_at}"
                  + ("  [green](all blobs verified)[/green]" if verify else ""), highlight=False)
        for section, values in (("inputs", m.inputs), ("metadata", m.metadata)):
            if values:
                out.print(f"[bold]{section}[/bold]")
                for k, v in values.items():
                    out.print(f"  {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}", highlight=False)
        table = Table(title=f"{len(m.files)} file(s), {human_size(m.size)}", title_justify="left")
        for col in ("file", "size", "sha256"):
            table.add_column(col)
        for rel, e in sorted(m.files.items()):
            table.add_row(rel, human_size(e["size"]), e["sha256"][:16] + "…")
        out.print(table)
        if lineage:
            tree = Tree("[bold]lineage[/bold]")
            nodes = {-1: tree}
            for depth, via, x in chain:
                label = (f"{via}: " if via else "") + (f"{x.id} ({x.kind})" if x else "[red]missing[/red]")
                nodes[depth] = nodes[depth - 1].add(label)
            out.print(tree)

    emit(result, as_json, human)


@registry_app.command("gc")
@command
def registry_gc(min_age: float = typer.Option(3600.0, "--min-age", help="Seconds an unreferenced blob must "
                                              "have existed before it is removed (protects writers in flight)."),
                dry_run: bool = typer.Option(False, "--dry-run", help="Report what would be removed."),
                registry: Optional[str] = RegistryOpt, as_json: bool = JsonOpt):
    """Remove blobs that no manifest references. Manifests and aliases are never touched."""
    reg = open_registry(registry)
    report = reg.gc(min_age_s=min_age, dry_run=dry_run)
    emit({"registry": reg.uri, **report}, as_json, lambda: out.print(
        f"{'would remove' if dry_run else 'removed'} {report['removed']} unreferenced blob(s), "
        f"{human_size(report['freed_bytes'])}; {report['referenced']} referenced; "
        f"{report['kept_recent_unreferenced']} recent unreferenced kept (younger than {min_age:g}s)",
        highlight=False))


@registry_app.command("add-model")
@command
def registry_add_model(folder: Path = typer.Argument(..., help="A model folder: config.json, *.safetensors, "
                                                      "tokenizer files."),
                       task: str = typer.Option(..., "--task", help="The task it belongs to."),
                       alias: Optional[str] = typer.Option(None, "--alias", help="Also point TASK@ALIAS at it."),
                       gguf_file: Optional[str] = typer.Option(None, "--gguf-file", help="Convert this GGUF file "
                                                               "in FOLDER to safetensors (once) and register that."),
                       registry: Optional[str] = RegistryOpt, as_json: bool = JsonOpt):
    """Register an existing model folder (bring your own model) and print its ref.

    Only safetensors weights are accepted: a folder with pickle weights (*.bin, *.pt, *.pth,
    *.pkl, *.ckpt) is refused, naming the file. A GGUF checkpoint is dequantised to fp32
    safetensors first with **--gguf-file NAME**.
    """
    import tempfile

    from pipelines.modeling import convert_gguf, describe_model_folder

    reg = open_registry(registry)
    inputs = {"source": str(folder.resolve())}
    with tempfile.TemporaryDirectory() as tmp:
        if gguf_file:
            if not as_json:
                out.print(f"converting {folder / gguf_file} to safetensors…", highlight=False)
            convert_gguf(folder, gguf_file, tmp)
            folder, inputs["gguf_file"] = Path(tmp), gguf_file
        facts = describe_model_folder(folder)
        m = reg.add_directory("model", task, folder, inputs=inputs, metadata=facts)
    if alias:
        reg.set_alias(task, alias, m.id)
    emit({"model": m.id, "alias": f"{task}@{alias}" if alias else None, "files": len(m.files), "size": m.size,
          **facts}, as_json,
         lambda: out.print(f"registered [bold]{m.id}[/bold]: {facts['model_type']}, "
                           f"{facts['parameters'] / 1e6:.1f}M parameters, {len(m.files)} files, "
                           f"{human_size(m.size)}" + (f"; {task}@{alias} → it" if alias else ""),
                           highlight=False))


@registry_app.command("alias")
@command
def registry_alias(name: str = typer.Argument(..., metavar="TASK@ALIAS"),
                   ref: str = typer.Argument(..., help="The artifact id (or another TASK@ALIAS) to point at."),
                   expect: Optional[str] = typer.Option(None, "--expect", help="Fail unless the alias points "
                                                        "here now ('none' when it must be unset)."),
                   registry: Optional[str] = RegistryOpt, as_json: bool = JsonOpt):
    """Point an alias at an artifact, atomically. Racing writers: one wins, the other exits 1."""
    if "@" not in name:
        raise ValueError(f"{name!r}: expected TASK@ALIAS")
    task, alias = name.split("@", 1)
    reg = open_registry(registry)
    kw = {} if expect is None else {"expected": None if expect.lower() == "none" else reg.resolve(expect)}
    record = reg.set_alias(task, alias, ref, **kw)
    previous = record["history"][0]["target"] if record["history"] else None
    emit({"alias": name, "target": record["target"], "previous": previous}, as_json,
         lambda: out.print(f"{name} → {record['target']}" + (f" (was {previous})" if previous else ""),
                           highlight=False))


# -- models ----------------------------------------------------------------------------------------
@app.command("init-model")
@command
def init_model_cmd(out_dir: Path = typer.Argument(..., metavar="OUT", help="Folder to write the model to."),
                   tokenizer: Path = typer.Option(..., help="A tokenizer folder, e.g. ../shared/tokenizers/gpt2."),
                   arch: str = typer.Option("llama", help="llama, qwen2 or mistral."),
                   layers: int = typer.Option(2, min=1), hidden: int = typer.Option(64, min=8),
                   heads: int = typer.Option(4, min=1), seed: int = typer.Option(0),
                   max_positions: int = typer.Option(2048, min=16),
                   task: Optional[str] = typer.Option(None, help="Also register it as a model of this task."),
                   registry: Optional[str] = RegistryOpt, as_json: bool = JsonOpt):
    """Write a tiny randomly initialised causal LM (safetensors) with a tokenizer and chat template.

    Tests and demos build their models this way: nothing is downloaded. A tokenizer without a
    chat template gets ChatML (<|im_start|>/<|im_end|>, with <|im_end|> as EOS and pad).
    """
    from pipelines.modeling import init_model

    info = init_model(out_dir, tokenizer=tokenizer, arch=arch, layers=layers, hidden=hidden, heads=heads,
                      max_positions=max_positions, seed=seed)
    if task:
        m = open_registry(registry).add_directory("model", task, out_dir, inputs={"source": "init-model"},
                                              metadata={"model_type": arch, "parameters": info["parameters"],
                                                        "random_init": True, "seed": seed})
        info["model"] = m.id
    emit(info, as_json, lambda: out.print(
        f"wrote {arch} model to {out_dir}: {info['parameters'] / 1e6:.2f}M parameters, {layers} layers, "
        f"hidden {hidden}, vocab {info['vocab_size']}" + (f"; registered {info['model']}" if task else ""),
        highlight=False))


# Each stage lives in its own module under jobs/ with a ``register(app)`` that adds its commands;
# the module also runs as ``python -m jobs.<stage> SPEC`` (locally or under ``ray job submit``).
STAGES = ("jobs.factory", "jobs.train", "jobs.evaluate", "jobs.serve", "jobs.run", "jobs.submit", "jobs.export",
          "jobs.card", "jobs.repair")


def _register_stages() -> None:
    import importlib
    import importlib.util

    for name in STAGES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(app)


_register_stages()


def main() -> None:
    from jobs.common import program_start

    program_start()  # before any stage imports ray
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
