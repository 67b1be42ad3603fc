"""What a valid output is — the one definition the factory gates, eval metrics and live canary share.

``Checker(contract).check(text)`` returns a ``Verdict``: valid or not, a short machine reason
(``json_parse``, ``schema``, ``format``, ``label``, ``unknown_tool``, ``tool_arguments``, ``empty``)
with a human detail, and the parsed value (the label, the JSON object, the list of tool calls).

JSON Schema ``format`` keywords are enforced (jsonschema's FormatChecker) for the formats in
``FORMATS_CHECKED``: date, time, date-time, email, idn-email, hostname, idn-hostname, ipv4, ipv6,
uri, uri-reference, uri-template, json-pointer, relative-json-pointer, regex, uuid (date-time,
hostname, uri and the pointers through small pure-Python packages we pin). A format outside that
set cannot be checked; ``Checker.unchecked_formats`` names those a contract uses, and eval reports them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from pipelines.spec import Contract


@dataclass(frozen=True)
class Verdict:
    valid: bool
    reason: str | None = None  # short code, stable for scripts and reports
    detail: str = ""  # for people: which field, which value
    value: Any = None

    def __str__(self) -> str:
        return "valid" if self.valid else f"{self.reason}: {self.detail}" if self.detail else str(self.reason)


FORMAT_CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER
FORMATS_CHECKED = frozenset(FORMAT_CHECKER.checkers)


def _schema_of(contract: Contract) -> dict | None:
    s = contract.schema_
    return json.loads(Path(s).read_text()) if isinstance(s, str) else s


def _validator(schema: dict):
    return jsonschema.validators.validator_for(schema)(schema, format_checker=FORMAT_CHECKER)


def formats_in(schema: Any) -> set[str]:
    """Every ``format`` value named anywhere in a JSON Schema."""
    found: set[str] = set()
    if isinstance(schema, dict):
        if isinstance(schema.get("format"), str):
            found.add(schema["format"])
        for v in schema.values():
            found |= formats_in(v)
    elif isinstance(schema, list):
        for v in schema:
            found |= formats_in(v)
    return found


class Checker:
    def __init__(self, contract: Contract):
        self.contract = contract
        self.type = contract.type
        schema = self._schema = _schema_of(contract)
        self._validator = _validator(schema) if schema else None
        self._labels = {l.strip().lower(): l for l in contract.labels or []}
        self._tools = {t.name: _validator(t.parameters) for t in contract.tools}
        used = formats_in(schema) | set().union(*(formats_in(t.parameters) for t in contract.tools))
        self.unchecked_formats = sorted(used - FORMATS_CHECKED)
        self._guide = None  # the decoding grammar, compiled when as_decoded first needs it

    def check(self, text: str | None) -> Verdict:
        if text is None or not str(text).strip():
            return Verdict(False, "empty", "the output is empty")
        text = str(text).strip()
        if self.type == "text":
            return Verdict(True, value=text)
        if self.type == "label":
            label = self._labels.get(text.rstrip(".").strip().lower())
            if label is None:
                return Verdict(False, "label", f"{_clip(text)!r} is not one of {sorted(self._labels.values())}")
            return Verdict(True, value=label)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            return Verdict(False, "json_parse", f"{e.msg} at line {e.lineno} column {e.colno}")
        if self.type == "json":
            return self._check_schema(value)
        return self._check_tool_calls(value)

    def as_decoded(self, text: str) -> str:
        """A valid JSON answer written the way constrained decoding makes the model write it (compact,
        properties in the schema's order: ``pipelines.guide``'s grammar), so training teaches the
        tokens the decoder will allow; any other text, or a contract decoded freely, as it is. Data
        written with ``", "`` and ``": "`` would otherwise be trained on tokens the guide then forbids:
        every answer overridden, the model off its own distribution after the first key."""
        if self.type != "json" or not self.contract.constrained_decoding:
            return text
        verdict = self.check(text)
        if not verdict.valid:
            return text
        ordered = _in_schema_order(verdict.value, self._schema, self._schema)
        if self._guide is None:
            from pipelines.guide import Guide

            self._guide = Guide.json_schema(self._schema)
        written = self._guide.write(ordered)
        return written if written is not None else json.dumps(ordered, separators=(",", ":"), ensure_ascii=False)

    def _check_schema(self, value: Any) -> Verdict:
        if self._validator is not None:
            error = jsonschema.exceptions.best_match(self._validator.iter_errors(value))
            if error is not None:
                where = "/".join(str(p) for p in error.absolute_path) or "(root)"
                reason = "format" if error.validator == "format" else "schema"
                return Verdict(False, reason, f"{where}: {error.message}", value)
        return Verdict(True, value=value)

    def _check_tool_calls(self, value: Any) -> Verdict:
        calls = normalize_tool_calls(value)
        if calls is None:
            return Verdict(False, "tool_shape", 'expected {"name": …, "arguments": {…}} or a list of them', value)
        for call in calls:
            validator = self._tools.get(call["name"])
            if validator is None:
                return Verdict(False, "unknown_tool", f"{call['name']!r} is not one of {sorted(self._tools)}", calls)
            error = jsonschema.exceptions.best_match(validator.iter_errors(call["arguments"]))
            if error is not None:
                where = "/".join(str(p) for p in error.absolute_path) or "(root)"
                return Verdict(False, "tool_arguments", f"{call['name']}: {where}: {error.message}", calls)
        return Verdict(True, value=calls)


def normalize_tool_calls(value: Any) -> list[dict] | None:
    """``{"name", "arguments"}``, OpenAI's ``{"tool_calls": [{"function": …}]}``, or a list of
    either, as a list of ``{"name": str, "arguments": dict}``; None when it is none of these."""
    if isinstance(value, dict) and "tool_calls" in value:
        value = value["tool_calls"]
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict):
            return None
        item = item.get("function", item)
        args = item.get("arguments", {})
        if isinstance(args, str):  # OpenAI sends arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(item.get("name"), str) or not isinstance(args, dict):
            return None
        calls.append({"name": item["name"], "arguments": args})
    return calls or None


def _in_schema_order(value: Any, schema: Any, root: Any = None) -> Any:
    """``value`` with each object's declared properties first, in the schema's order (the others after,
    as they were), following local ``$ref`` (into ``root``), ``properties``, ``items`` and the first
    ``anyOf``/``oneOf`` branch whose properties cover the object's keys."""
    from pipelines.guide import resolve_local_ref

    for _ in range(32):  # a $ref chain; a cycle of bare refs gives up
        if not (isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and schema["$ref"].startswith("#")):
            break
        schema = resolve_local_ref(root, schema["$ref"])
    if not isinstance(schema, dict):
        return value
    if isinstance(value, list):
        return [_in_schema_order(v, schema.get("items"), root) for v in value]
    if not isinstance(value, dict):
        return value
    branches = [schema, *(resolve_local_ref(root, b["$ref"]) if isinstance(b, dict) and "$ref" in b else b
                          for b in [*schema.get("anyOf", []), *schema.get("oneOf", [])])]
    declared = next((b["properties"] for b in branches if isinstance(b, dict) and isinstance(b.get("properties"), dict)
                     and set(value) <= set(b["properties"])), None)
    declared = declared or next((b["properties"] for b in branches if isinstance(b, dict)
                                 and isinstance(b.get("properties"), dict)), {})
    keys = [k for k in declared if k in value] + [k for k in value if k not in declared]
    return {k: _in_schema_order(value[k], declared.get(k), root) for k in keys}


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
