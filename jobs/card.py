"""``crucible card MODEL``: the model's release card (MODEL_CARD.md + model_card.json) from the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from jobs.common import JsonOpt, RegistryOpt, command, emit, open_registry, out


def card_cmd(model: str = typer.Argument(..., metavar="MODEL", help="Registry id or TASK@ALIAS of a model."),
             out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder to write (default "
                                                    "cards/MODEL under the working directory)."),
             registry: Optional[str] = RegistryOpt, as_json: bool = JsonOpt):
    """Write the model's card from what the registry holds: intended use, base model and licence,
    data version (accepted/rejected rows, leak check), training recipe and cost (node-hours, MFU),
    eval tables with intervals against baselines, gate verdicts, failure clusters, export formats,
    lineage, and serving cost per 1k requests / valid answers (measured throughput x deploy.node_hour_usd).

    Example: `crucible card support-triage@production --out /tmp/card`. `--json` prints the card
    with "files" (the two paths). Figures the registry lacks read "not recorded".
    """
    from pipelines.card import write

    out_dir = out_dir or Path("cards") / model.replace("@", "-")
    card = write(open_registry(registry), model, out_dir)
    emit(card, as_json, lambda: out.print(f"wrote {card['files'][0]} and {card['files'][1]} for {card['model']}",
                                          highlight=False, markup=False))


def register(app: typer.Typer) -> None:
    app.command("card")(command(card_cmd))
