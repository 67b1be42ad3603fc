"""``crucible train`` and ``crucible inspect-batch``; also ``python -m jobs.train SPEC``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from jobs.common import JsonOpt, RegistryOpt, SetOpt, command, emit, open_registry, out, run_standalone

DatasetOpt = typer.Option(None, "--dataset", metavar="REF",
                          help="Dataset artifact id or TASK@ALIAS (default: the task's newest dataset).")


def train_cmd(spec_file: Path = typer.Argument(..., metavar="SPEC", help="The spec YAML file."),
              dataset: Optional[str] = DatasetOpt,
              resume: Optional[str] = typer.Option(None, "--resume", metavar="RUN",
                                                   help="Continue a registered run from its checkpoint "
                                                        "(step count, weights and optimizer state)."),
              set_: Optional[list[str]] = SetOpt, registry: Optional[str] = RegistryOpt, as_json: bool = JsonOpt):
    """Fine-tune model.base on a registered dataset with Ray Train; register a run and a model.

    The train section decides how: method lora / qlora (GPU only) / full, or dpo (preference
    pairs from a data.format: preference dataset; train.dpo: beta, loss sigmoid|ipo|hinge, weights
    lora|full; model.base may be an SFT run), workers,
    use_gpu, deepspeed.stage 0-3 (absent: plain DDP), packing, lr with warmup + cosine, max_steps or
    epochs, micro_batch_size × grad_accum, eval_every / early_stopping_patience on dev loss,
    save_every for checkpoints. Only assistant tokens (and their EOS) are trained on.

    Examples:

      crucible train spec.yaml --set train.max_steps=50 --set train.workers=2

      crucible train spec.yaml --set train.deepspeed.stage=3 --json

      crucible train spec.yaml --resume run-mytask-20260101120000-abcd1234

    --json prints: run, model, first_loss, final_loss, dev_loss, tokens_per_s, real_token_share,
    steps, wall_seconds, peak_rss_mb, packing, precision, mfu, peak_flops (FLOP/s per worker,
    measured once per node), model_flops_per_s; for dpo also dpo {dev_before, dev_after: margin, accuracy, ...}.
    Progress goes to stderr: a bar on a terminal.
    """
    from pipelines.spec import load_spec
    from pipelines.train import run

    spec = load_spec(spec_file, set_ or [], check_paths=False)
    reg = open_registry(registry or spec.registry)
    result = run(spec, reg, dataset, resume_run=resume)
    s = result["summary"]
    payload = {"run": result["run"].id, "model": result["model"].id, **{k: s[k] for k in (
        "first_loss", "final_loss", "dev_loss", "best_dev_loss", "tokens_per_s", "real_token_share", "steps",
        "stopped_early", "wall_seconds", "train_seconds", "peak_rss_mb", "method", "workers", "deepspeed_stage",
        "template", "packing", "precision", "mfu", "peak_flops", "model_flops_per_s")}, **({"dpo": s["dpo"]} if "dpo" in s else {})}

    def dpo_line() -> str:
        if "dpo" not in s or not s["dpo"]["dev_after"]:
            return ""
        b, a = s["dpo"]["dev_before"], s["dpo"]["dev_after"]
        return (f"  dev pairs: reward margin {b['margin']:+.3f} → {a['margin']:+.3f}, "
                f"accuracy {b['accuracy']:.1%} → {a['accuracy']:.1%}\n")

    emit(payload, as_json, lambda: out.print(
        f"trained {s['steps']} steps ({s['method']}, {s['workers']} worker(s)"
        + (f", ZeRO-{s['deepspeed_stage']}" if s["deepspeed_stage"] is not None else "") + ")\n"
        f"  loss {s['first_loss']:.4f} → {s['final_loss']:.4f}"
        + (f", dev {s['dev_loss']:.4f}" if s["dev_loss"] is not None else "")
        + (" (stopped early)" if s["stopped_early"] else "") + "\n"
        f"  {s['tokens_per_s']:,.0f} tokens/s, {s['real_token_share']:.1%} real tokens, {s['precision']}, "
        + (f"MFU {s['mfu']:.1%} of {s['peak_flops'] / 1e9:,.0f} GFLOP/s measured, " if s["mfu"] else "")
        + f"wall {s['wall_seconds']:.0f}s, peak {s['peak_rss_mb'] or 0:.0f} MB per worker\n" + dpo_line() +
        f"  run   [bold]{result['run'].id}[/bold] (loss.png, checkpoint)\n"
        f"  model [bold]{result['model'].id}[/bold]", highlight=False))


def inspect_batch_cmd(spec_file: Path = typer.Argument(..., metavar="SPEC", help="The spec YAML file."),
                      dataset: Optional[str] = DatasetOpt,
                      n: int = typer.Option(2, "-n", min=1, help="How many examples to show."),
                      set_: Optional[list[str]] = SetOpt, registry: Optional[str] = RegistryOpt,
                      as_json: bool = JsonOpt):
    """Show the first training examples as the model sees them: each token, and whether it is trained on.

    Trained tokens (the assistant's answer and its end-of-turn EOS) are printed in green,
    the rest dim. Use it to check a template and the loss mask before spending compute. No model
    weights are loaded. --json prints examples[] with text, tokens[{id, text, trained}], trained_tokens.
    """
    from pipelines.spec import load_spec
    from pipelines.templates import IGNORE, encode_chat, with_system_prompt
    from pipelines.train import find_dataset
    from pipelines.train.data import read_records
    from pipelines.train.model import load_tokenizer_for

    spec = load_spec(spec_file, set_ or [])
    reg = open_registry(registry or spec.registry)
    ds = find_dataset(spec, reg, dataset)
    tok, template, _ = load_tokenizer_for(spec, reg)
    records = read_records(reg.materialize(ds) / "train.jsonl")[:n]
    examples = []
    for r in records:
        msgs = with_system_prompt(r["messages"], spec.model.system_prompt)
        enc = encode_chat(tok, msgs, spec.model.max_seq_len)
        examples.append({"id": r.get("id"), "truncated": enc.truncated, "trained_tokens": enc.trained_tokens,
                         "tokens": [{"id": i, "text": tok.decode([i]), "trained": lab != IGNORE}
                                    for i, lab in zip(enc.input_ids, enc.labels)]})

    def human():
        from rich.text import Text

        out.print(f"dataset {ds}, template {template['template']}, eos {template['eos_token']!r}, "
                  f"pad {template['pad_token']!r}", highlight=False)
        for ex in examples:
            out.rule(f"example {ex['id']}: {len(ex['tokens'])} tokens, {ex['trained_tokens']} trained"
                     + (" (truncated)" if ex["truncated"] else ""))
            text = Text()
            for t in ex["tokens"]:
                text.append(t["text"], style="bold green" if t["trained"] else "dim")
                text.append("|", style="grey30")
            out.print(text)

    emit({"dataset": ds, **template, "examples": examples}, as_json, human)


def register(app: typer.Typer) -> None:
    app.command("train")(command(train_cmd))
    app.command("inspect-batch")(command(inspect_batch_cmd))


if __name__ == "__main__":  # python -m jobs.train SPEC [...] (locally or under `ray job submit`)
    run_standalone(train_cmd)
