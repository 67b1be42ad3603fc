"""Reading eval and prediction rows: a chat to send and, when there is one, the reference answer.

Accepted row shapes (JSONL, JSONL.gz or CSV), the ones the factory reads:
- canonical ``{"id", "messages": [...]}`` (also ``"chat"``): the reference is the last assistant
  message (its ``content``, or its ``tool_calls``); the prompt is everything before it;
- instruction ``{"instruction", "input", "output"}`` (Alpaca);
- ``{"prompt", "completion"|"output"|"response"}``.
Rows without an ``id`` get ``line-N``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Example:
    id: str
    chat: list[dict]
    reference: Any = None
    meta: dict = field(default_factory=dict)

    @property
    def instruction(self) -> str:
        """The last user turn, what a judge is shown as the instruction."""
        users = [m["content"] for m in self.chat if m.get("role") == "user"]
        return users[-1] if users else ""


def read_records(path: str | Path) -> list[dict]:
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    if path.name.removesuffix(".gz").endswith(".csv"):
        return [dict(r) for r in csv.DictReader(io.StringIO(raw))]
    if path.name.removesuffix(".gz").endswith(".json"):
        data = json.loads(raw)
        return data if isinstance(data, list) else [data]
    records = []
    for n, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return records


def to_example(record: dict, n: int, *, need_reference: bool = True) -> Example:
    rid = str(record.get("id") if record.get("id") not in (None, "") else f"line-{n}")
    msgs = record.get("messages") or record.get("chat")
    if msgs:
        msgs = [dict(m) for m in msgs]
        ref = None
        if msgs[-1].get("role") == "assistant":
            last = msgs.pop()
            ref = last.get("tool_calls") if last.get("tool_calls") else last.get("content")
        if not any(m.get("role") == "user" for m in msgs):
            raise ValueError(f"row {rid}: its messages hold no user turn")
        return _checked(Example(rid, msgs, ref, record.get("meta") or {}), need_reference)
    if "instruction" in record:
        user = str(record["instruction"])
        if record.get("input"):
            user += "\n\n" + str(record["input"])
        chat = ([{"role": "system", "content": record["system"]}] if record.get("system") else []) + \
               [{"role": "user", "content": user}]
        return _checked(Example(rid, chat, record.get("output")), need_reference)
    for key in ("prompt", "user", "input"):
        if key in record:
            chat = ([{"role": "system", "content": record["system"]}] if record.get("system") else []) + \
                   [{"role": "user", "content": str(record[key])}]
            ref = next((record[k] for k in ("completion", "output", "response", "assistant", "label")
                        if k in record), None)
            return _checked(Example(rid, chat, ref), need_reference)
    raise ValueError(f"row {rid}: no messages, instruction or prompt field (keys: {', '.join(sorted(record))})")


def _checked(ex: Example, need_reference: bool) -> Example:
    if need_reference and ex.reference is None:
        raise ValueError(f"row {ex.id}: no reference answer (a final assistant message or an output field)")
    return ex


def read_examples(path: str | Path, *, need_reference: bool = True) -> list[Example]:
    return [to_example(r, n, need_reference=need_reference) for n, r in enumerate(read_records(path), 1)]


def without_system(chat: list[dict]) -> list[dict]:
    return [m for m in chat if m.get("role") != "system"]


def reference_text(ref: Any) -> str:
    return ref if isinstance(ref, str) else json.dumps(ref, ensure_ascii=False)
