"""Entry points: ``crucible export`` (merged safetensors, or GGUF + Ollama Modelfile) and
``crucible chat`` (a terminal chat with a model).

Also runs as ``python -m jobs.export MODEL --format gguf``. Heavy imports stay inside the commands.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from jobs.common import JsonOpt, RegistryOpt, command, emit, err, human_size, open_registry, out, run_standalone

ModelArg = typer.Argument(..., metavar="MODEL", help="Registry id, TASK@ALIAS or folder (a full model or a LoRA "
                          "adapter).")


def export_cmd(model: str = ModelArg,
               fmt: str = typer.Option(..., "--format", help="gguf (llama.cpp / Ollama) or safetensors "
                                       "(transformers, crucible predict)."),
               quant: Optional[str] = typer.Option(None, "--quant", help="gguf: f16 (default), q8_0 or f32. "
                                                   "safetensors: f32, f16 or bf16 (default: as loaded, f32 on CPU)."),
               out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder to write (default "
                                                      "exports/NAME-FORMAT under the working directory)."),
               name: Optional[str] = typer.Option(None, "--name", help="File name stem for the GGUF (default: "
                                                  "the registry id, else the folder name)."),
               registry: Optional[str] = RegistryOpt, as_json: bool = JsonOpt):
    """Write a model for use outside crucible, a LoRA adapter merged into its base.

    **gguf**: `OUT/NAME.gguf` (llama architecture, byte-level BPE tokenizer; chat template and
    special token ids in its metadata) and `OUT/Modelfile` for Ollama (the same chat template in
    Go syntax, the saved system prompt as SYSTEM, stop tokens), so
    `cd OUT && ollama create NAME -f Modelfile` works. q8_0 quantises 2-D weights whose rows are a
    multiple of 32 (others stay f16); norms stay f32.

    **safetensors**: a transformers folder (weights, tokenizer with its chat template, generation
    config, crucible.json with the system prompt) that `crucible predict OUT` loads.

    A registry model's card (MODEL_CARD.md, model_card.json; see `crucible card`) is written beside it.

    Example: `crucible export support-triage@production --format gguf --quant q8_0 --out /tmp/triage`.
    Nothing is registered. `--json` prints {"out", "gguf", "modelfile", "size", "seconds", ...}.
    """
    from pipelines.export import export

    reg = open_registry(registry)
    if out_dir is None:
        stem = name or Path(str(model).replace("@", "-")).name
        out_dir = Path("exports") / f"{stem}-{fmt}"
    log = (lambda msg: None) if as_json else (lambda msg: err.print(msg, highlight=False, markup=False))
    info = export(model, out_dir, fmt=fmt, quant=quant, registry=reg, name=name, log=log, card=True)

    def human():
        what = f"{info['gguf']} ({info['quant']})" if fmt == "gguf" else f"{out_dir} ({info['dtype']})"
        out.print(f"wrote {what}: {human_size(info['size'])}, {info['parameters'] / 1e6:.1f}M parameters"
                  + (", LoRA adapter merged" if info["adapter_merged"] else "") + f", {info['seconds']:.1f}s",
                  highlight=False)
        if fmt == "gguf":
            out.print(f"Modelfile: chat template {info['template'] or '(not translated; Ollama uses the GGUF one)'}, "
                      f"stop {', '.join(info['stop'])}; next: cd {out_dir} && ollama create {info['name']} "
                      "-f Modelfile", highlight=False, markup=False)
        if info.get("card"):
            out.print(f"model card: {info['card'][0]}", highlight=False, markup=False)

    emit(info, as_json, human)


def chat_cmd(model: str = ModelArg,
             system: Optional[str] = typer.Option(None, "--system", help="System prompt (default: the one saved "
                                                  "with the model, if any)."),
             max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Longest reply, in tokens."),
             temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
             seed: int = typer.Option(0, "--seed", help="Sampling seed (temperature > 0)."),
             registry: Optional[str] = RegistryOpt):
    """Chat with a model in the terminal, replies streamed token by token.

    Uses the model's saved chat template and system prompt (the prompt eval and serving send).
    Reads one user message per line from the terminal or from piped stdin; **/reset** clears the
    conversation, **/exit** or end of input (Ctrl-D) ends. The KV cache is kept across turns: each
    turn only runs the tokens the previous turns have not already computed.

    Example: `printf 'Hi\\nAnd then?\\n' | crucible chat support-triage@production --max-new-tokens 64`
    prints one reply per message on stdout (status goes to stderr).
    """
    import torch

    from pipelines.engines.loading import load_for_inference
    from pipelines.export import ChatSession

    tty = sys.stdin.isatty()
    err.print(f"loading {model}…", highlight=False, markup=False)
    # merged: a LoRA adapter then costs nothing per generated token
    m, tok, resolved = load_for_inference(model, open_registry(registry), merge_adapter=True)
    torch.manual_seed(seed)
    session = ChatSession(m, tok, system_prompt=system if system is not None else resolved.system_prompt,
                          max_new_tokens=max_new_tokens, temperature=temperature)
    if tty:
        err.print("type a message; /reset clears the conversation, /exit or Ctrl-D ends", highlight=False)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    while True:
        try:
            line = input("you> ") if tty else sys.stdin.readline()
        except EOFError:
            break
        if not tty and not line:
            break  # end of piped input
        line = line.rstrip("\n")
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            session.reset()
            err.print("(conversation cleared)", highlight=False)
            continue
        if not line.strip():
            continue
        if tty:
            write("model> ")
        session.send(line, write)
        write("\n")


def merge_cmd(ref: str = typer.Argument(..., metavar="RUN_OR_MODEL", help="A training run or its model (id or "
                                         "TASK@ALIAS)."),
              registry: Optional[str] = RegistryOpt, as_json: bool = JsonOpt):
    """Merge a run's LoRA adapter into its base and register the merged model (safetensors).

    The merged model serves without PEFT (and is what a GGUF export would write). Its manifest
    names the adapter model and the run it came from, so `registry show --lineage` walks back.
    `--json` prints {"model", "merged_from", "run", "parameters"}.
    """
    from pipelines.export import merge_registered

    merged, m, info = merge_registered(open_registry(registry), ref)
    result = {"model": merged.id, "merged_from": m.id, "run": m.inputs.get("run"), "parameters": info["parameters"]}
    emit(result, as_json, lambda: out.print(f"registered [bold]{merged.id}[/bold]: {m.id} merged into its base "
                                            f"({info['parameters']:,} parameters)", highlight=False))


def register(app: typer.Typer) -> None:
    app.command("merge")(command(merge_cmd))
    app.command("export")(command(export_cmd))
    app.command("chat")(command(chat_cmd))


if __name__ == "__main__":  # python -m jobs.export MODEL --format gguf [...]
    run_standalone(export_cmd)
