"""Read training files into canonical chat records; a malformed row becomes a rejected row, never a crash.

Files are cut into shards on the driver (plain JSONL by byte ranges on line boundaries; gzip, CSV
and JSON arrays one shard per file since they cannot be split blindly), and each Ray worker reads
its shards with ``read_shard``. Every physical input row yields exactly one output row:
``{"order", "source", "record"}`` on success or ``{"order", "source", "reason", "detail", "raw"}``.

Formats (``data.format``, or ``auto`` per row): chat ``messages`` (``chat`` too; tool calls in
OpenAI ``tool_calls`` become the assistant's content as JSON), flat ``system``/``user``/
``assistant``, ``instruction``/``input``/``output`` (Alpaca), ``prompt``/``chosen``/``rejected``
preference pairs, CSV with ``data.columns`` (column -> role).
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
import zlib
from pathlib import Path
from typing import Any, Iterator

ROLES = ("system", "user", "assistant", "tool")
SHARD_BYTES = 4 << 20  # big enough that per-task overhead is small, small enough to spread over workers
RAW_CLIP = 2000


class Malformed(ValueError):
    """A row that cannot become a canonical record; ``reason`` is the short code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# -- files and shards (driver side) --------------------------------------------------------------
def expand_sources(patterns: list[str]) -> list[str]:
    """Files matching the spec's paths/globs, sorted and de-duplicated; a pattern matching nothing is an error."""
    files: list[str] = []
    for i, pattern in enumerate(patterns):
        found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not found:
            raise FileNotFoundError(f"data.train[{i}]: no file matches {pattern}")
        files += [str(Path(p).resolve()) for p in found if str(Path(p).resolve()) not in files]
    return files


def kind_of(path: str) -> str:
    name = path.lower().removesuffix(".gz")
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".json"):
        return "json"
    return "jsonl"


def plan_shards(files: list[str], names: dict[str, str], shard_bytes: int = SHARD_BYTES) -> list[dict]:
    """Shards ``{file_idx, path, name, kind, start, end, first_line}``; line numbers start at 1."""
    shards = []
    for idx, path in enumerate(files):
        kind, size = kind_of(path), os.path.getsize(path)
        base = {"file_idx": idx, "path": path, "name": names[path], "kind": kind}
        if kind != "jsonl" or path.endswith(".gz") or size <= shard_bytes:
            shards.append({**base, "start": 0, "end": size, "first_line": 1})
            continue
        with open(path, "rb") as f:
            start, line = 0, 1
            while start < size:
                f.seek(min(start + shard_bytes, size))
                f.readline()  # move to the next line boundary
                end = min(f.tell(), size)
                f.seek(start)
                lines = f.read(end - start).count(b"\n")
                shards.append({**base, "start": start, "end": end, "first_line": line})
                start, line = end, line + lines
    return shards


def short_names(paths: list[str]) -> dict[str, str]:
    """Paths relative to their common folder: sources read ``support.csv:17``, not a long absolute path."""
    if not paths:
        return {}
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    return {p: os.path.relpath(p, root) for p in paths}


# -- reading one shard (worker side) -------------------------------------------------------------
def read_shard(shard: dict, *, fmt: str = "auto", columns: dict[str, str] | None = None) -> list[dict]:
    """Every row of one shard, parsed: canonical records or rejected rows (see module docstring)."""
    rows = []
    for line_no, item in _raw_items(shard):
        source = f"{shard['name']}:{line_no}"
        order = shard["file_idx"] * 10**10 + line_no
        try:
            if isinstance(item, Malformed):
                raise item
            record = to_canonical(item, fmt=fmt, columns=columns or {}, kind=shard["kind"])
            record.setdefault("id", f"{Path(shard['name']).stem}-{line_no}")
            record["source"] = source
            rows.append({"order": order, "source": source, "record": json.dumps(record, ensure_ascii=False),
                         "reason": "", "detail": "", "raw": ""})
        except Malformed as e:
            rows.append({"order": order, "source": source, "record": "", "reason": f"malformed:{e.reason}",
                         "detail": e.detail, "raw": _raw_text(item)})
    return rows


def _raw_text(item: Any) -> str:
    if isinstance(item, Malformed):
        item = getattr(item, "raw", "")
    if isinstance(item, bytes):
        item = item.decode("utf-8", "backslashreplace")
    elif not isinstance(item, str):
        item = json.dumps(item, ensure_ascii=False, default=str)
    item = item.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return item[:RAW_CLIP]


def _bad(reason: str, detail: str, raw: Any = "") -> Malformed:
    e = Malformed(reason, detail)
    e.raw = raw
    return e


def _file_bytes(shard: dict) -> bytes | Malformed:
    with open(shard["path"], "rb") as f:
        f.seek(shard["start"])
        data = f.read(shard["end"] - shard["start"])
    if shard["path"].endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            return _bad("bad_gzip", f"not a readable gzip file: {e}")
    return data


def _raw_items(shard: dict) -> Iterator[tuple[int, Any]]:
    """(line or row number, parsed JSON / CSV dict / Malformed) for each row of the shard."""
    data = _file_bytes(shard)
    if isinstance(data, Malformed):
        yield 1, data
        return
    if shard["kind"] == "jsonl":
        for i, line in enumerate(data.split(b"\n")):
            if line.strip():
                yield shard["first_line"] + i, _parse_json_line(line)
    elif shard["kind"] == "json":
        yield from _json_array_items(data)
    else:
        yield from _csv_rows(data)


def _parse_json_line(line: bytes) -> Any:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return _bad("bad_utf8", f"invalid UTF-8 at byte {e.start}", line)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return _bad("bad_json", f"{e.msg} at column {e.colno}", text)


def _json_array_items(data: bytes) -> Iterator[tuple[int, Any]]:
    """A ``.json`` file: an array of rows (numbered by position, from 1), or one object."""
    text = data.decode("utf-8", "surrogateescape")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        yield e.lineno, _bad("bad_json", f"the file is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", text)
        return
    items = value if isinstance(value, list) else [value]
    for i, item in enumerate(items, 1):
        if _has_surrogates(item):
            yield i, _bad("bad_utf8", "invalid UTF-8 in this item", item)
        else:
            yield i, item


def _csv_rows(data: bytes) -> Iterator[tuple[int, Any]]:
    """CSV rows as dicts, numbered by the line where each row starts (the header is line 1)."""
    reader = csv.reader(io.StringIO(data.decode("utf-8", "surrogateescape"), newline=""))
    try:
        header = next(reader)
    except (StopIteration, csv.Error):
        return
    start = reader.line_num + 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield start, _bad("bad_csv", str(e))
            start = reader.line_num + 1
            continue
        line, start = start, reader.line_num + 1
        if not any(f.strip() for f in fields):
            continue
        if _has_surrogates(fields):
            yield line, _bad("bad_utf8", "invalid UTF-8 in this row", ",".join(fields))
        elif len(fields) != len(header):
            yield line, _bad("bad_shape", f"{len(fields)} fields, the header has {len(header)}", ",".join(fields))
        else:
            yield line, {"__csv__": True, **dict(zip(header, fields))}


def _has_surrogates(value: Any) -> bool:
    if isinstance(value, str):
        return any("\udc80" <= c <= "\udcff" for c in value)
    if isinstance(value, dict):
        return any(_has_surrogates(k) or _has_surrogates(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogates(v) for v in value)
    return False


# -- normalising one row -------------------------------------------------------------------------
def detect_format(item: dict) -> str:
    if "messages" in item or "chat" in item:
        return "messages"
    if "prompt" in item and "chosen" in item:
        return "preference"
    if "instruction" in item:
        return "instruction"
    if "user" in item or "assistant" in item:
        return "chat"
    raise Malformed("bad_shape", f"unknown row shape (keys: {', '.join(sorted(item)) or 'none'}); expected "
                                 "messages, system/user/assistant, instruction/input/output or prompt/chosen/rejected")


def to_canonical(item: Any, *, fmt: str = "auto", columns: dict[str, str] | None = None, kind: str = "jsonl") -> dict:
    """One input row as ``{"id"?, "messages", "meta"}``; raises ``Malformed`` naming what is wrong."""
    if not isinstance(item, dict):
        raise Malformed("bad_shape", f"a row must be a JSON object, got {type(item).__name__}")
    if item.pop("__csv__", False) or kind == "csv" or fmt == "csv":
        return _from_csv(item, columns or {})
    fmt = detect_format(item) if fmt == "auto" else fmt
    if fmt == "messages":
        msgs = item.get("messages", item.get("chat"))
        rest = {k: v for k, v in item.items() if k not in ("messages", "chat", "id", "meta", "source")}
        record = {"messages": _messages(msgs), "meta": {**_meta(item), **rest}}
    elif fmt == "chat":
        msgs = [{"role": r, "content": item[r]} for r in ("system", "user", "assistant") if item.get(r) is not None]
        rest = {k: v for k, v in item.items() if k not in ("system", "user", "assistant", "id", "meta", "source")}
        record = {"messages": _messages(msgs), "meta": {**_meta(item), **rest}}
    elif fmt == "instruction":
        record = _from_instruction(item)
    elif fmt == "preference":
        record = _from_preference(item)
    else:
        raise Malformed("bad_shape", f"unknown data.format {fmt!r}")
    if item.get("id") not in (None, ""):
        record["id"] = str(item["id"])
    return record


def _meta(item: dict) -> dict:
    meta = item.get("meta", {})
    if not isinstance(meta, dict):
        raise Malformed("bad_shape", "'meta' must be an object")
    return dict(meta)


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise Malformed("bad_shape", f"{field} must be a string, got {type(value).__name__}")
    return value


def _messages(msgs: Any) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise Malformed("bad_shape", "'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise Malformed("bad_shape", f"messages[{i}] is not an object")
        role = m.get("role")
        if role is None:
            raise Malformed("missing_role", f"messages[{i}] has no role")
        if role not in ROLES:
            raise Malformed("bad_role", f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}")
        content = m.get("content")
        if role == "assistant" and m.get("tool_calls"):
            content = _tool_call_text(m["tool_calls"], i)
        elif isinstance(content, (dict, list)) and role in ("assistant", "tool"):
            content = json.dumps(content, ensure_ascii=False)
        out.append({"role": role, "content": _text(content, f"messages[{i}].content")})
    _check_roles(out)
    return out


def _tool_call_text(calls: Any, i: int) -> str:
    from pipelines.contract import normalize_tool_calls

    norm = normalize_tool_calls(calls)
    if norm is None:
        raise Malformed("bad_shape", f"messages[{i}].tool_calls: expected [{{name, arguments}}] or OpenAI tool_calls")
    return json.dumps(norm[0] if len(norm) == 1 else norm, ensure_ascii=False)


def _check_roles(msgs: list[dict]) -> None:
    if not any(m["role"] == "user" for m in msgs):
        raise Malformed("missing_role", "no user turn")
    if msgs[-1]["role"] != "assistant":
        raise Malformed("missing_role", "the last turn is not the assistant's (nothing to learn)")


def _from_instruction(item: dict) -> dict:
    if "output" not in item:
        raise Malformed("missing_role", "instruction row without 'output'")
    user = _text(item["instruction"], "instruction")
    if item.get("input"):
        user += "\n\n" + _text(item["input"], "input")
    msgs = ([{"role": "system", "content": _text(item["system"], "system")}] if item.get("system") else []) + \
           [{"role": "user", "content": user}, {"role": "assistant", "content": _text(item["output"], "output")}]
    _check_roles(msgs)
    rest = {k: v for k, v in item.items() if k not in ("instruction", "input", "output", "system", "id", "meta")}
    return {"messages": msgs, "meta": {**_meta(item), **rest}}


def _from_preference(item: dict) -> dict:
    if "chosen" not in item:
        raise Malformed("missing_role", "preference row without 'chosen'")
    prompt = item.get("prompt")
    if prompt is None and "instruction" in item:  # Alpaca-style pairs: instruction (+ input) is the prompt
        keep = {k: item[k] for k in ("instruction", "input", "system") if k in item}
        msgs = _from_instruction({**keep, "output": _text(item["chosen"], "chosen")})["messages"]
    elif isinstance(prompt, list):
        msgs = _messages(prompt + [{"role": "assistant", "content": item["chosen"]}])
    else:
        msgs = [{"role": "user", "content": _text(prompt, "prompt")},
                {"role": "assistant", "content": _text(item["chosen"], "chosen")}]
    _check_roles(msgs)
    meta = _meta(item)
    if "rejected" in item:
        meta["rejected_response"] = _text(item["rejected"], "rejected")
    meta.update({k: v for k, v in item.items() if k not in ("prompt", "instruction", "input", "system", "chosen",
                                                            "rejected", "id", "meta", "source")})
    return {"messages": msgs, "meta": meta}


def _from_csv(row: dict, columns: dict[str, str]) -> dict:
    if not columns:  # no mapping: the header must name roles or an Alpaca shape
        return to_canonical(dict(row), kind="jsonl")
    missing = [c for c in columns if c not in row]
    if missing:
        raise Malformed("bad_shape", f"data.columns names {', '.join(map(repr, missing))}, not in the CSV header")
    by_role: dict[str, str] = {}
    meta: dict[str, Any] = {}
    rid = None
    for col, role in columns.items():
        if role in ("system", "user", "assistant"):
            by_role[role] = row[col]
        elif role == "id":
            rid = row[col]
        elif role == "label":
            meta["label"] = row[col]
            by_role.setdefault("assistant_label", row[col])
        else:
            meta[col] = row[col]
    meta.update({k: v for k, v in row.items() if k not in columns})  # unmapped columns: kept as metadata
    if "assistant" not in by_role and "assistant_label" in by_role:
        by_role["assistant"] = by_role["assistant_label"]
    msgs = [{"role": r, "content": by_role[r]} for r in ("system", "user", "assistant") if by_role.get(r)]
    _check_roles(msgs)
    record = {"messages": msgs, "meta": meta}
    if rid:
        record["id"] = rid
    return record
