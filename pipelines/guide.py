"""Constrained decoding: can this text still become a valid output of the contract?

A ``Guide`` compiles a JSON Schema (or a list of labels) into a character-level pushdown automaton.
``advance(state, text)`` is the state after ``text``, or None when no continuation of the text can
satisfy the schema; ``done(state)`` says the text is a complete output. Engines use it token by token
(``pipelines.engines.constrain``): the model's best token that keeps the text completable wins.

Supported: objects (properties, required, additionalProperties), arrays (items, minItems,
maxItems), strings, numbers, integers, booleans, null, enum, const, anyOf/oneOf, local ``$ref``.
Other keywords (pattern, minLength, minimum, …) are not enforced while decoding; the contract's
checker still judges the finished output, so a schema that uses them can still reject a row.

The grammar is the one vLLM's xgrammar backend applies to the same schema with whitespace turned
off (``disable_any_whitespace``, which our vLLM servers are started with), so both engines accept
the same outputs (tests/test_vllm_grammar.py checks it against xgrammar itself): compact JSON with
no whitespace outside strings, properties in the schema's order (optional ones may be left out),
extra properties only where ``additionalProperties`` allows them and only after the declared ones,
no ``-0`` integer. Compact, because with any whitespace allowed a small model can write newlines
until it runs out of tokens. One quirk is xgrammar's own: an untyped value (``{}``, or an
``object``/``array`` with no properties/items named) writes its commas as ``", "``.
"""

from __future__ import annotations

import functools
import json
from typing import Any

HEX = "0123456789abcdefABCDEF"
DIGITS = "0123456789"
NUM_ACCEPT = {"zero", "int", "frac", "expdig"}


# -- compiled schema nodes: plain objects hashed by identity, so states can be hashed cheaply ----
class Node:
    """A value position: any of ``alts``."""
    __slots__ = ("alts",)

    def __init__(self, alts=None):
        self.alts: list = alts or []


class Lit:
    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


class Str:
    __slots__ = ()


class Num:
    __slots__ = ("integer",)

    def __init__(self, integer: bool):
        self.integer = integer


class Obj:
    __slots__ = ("props", "required", "extra", "order", "raw_names", "sep")

    def __init__(self, props: dict[str, Node], required: frozenset, extra: Node | None, sep: str = ","):
        self.props, self.required, self.extra, self.sep = props, required, extra, sep
        self.order = {k: i for i, k in enumerate(props)}
        self.raw_names = frozenset(json.dumps(k, ensure_ascii=False)[1:-1] for k in props)

    def after(self, used: frozenset) -> list[str]:
        """Declared keys that may still come: those after the last one used (none once an extra came)."""
        if EXTRA in used:
            return []
        last = max((self.order[k] for k in used), default=-1)
        out = []
        for k in list(self.props)[last + 1:]:
            out.append(k)
            if k in self.required:  # skipping a required key would leave the object uncompletable
                break
        return out

    def extra_allowed(self, used: frozenset) -> bool:
        """An additional property may come next: allowed, and no required key is still due."""
        return self.extra is not None and self.required <= used


EXTRA = "\x00extra"  # marks "an additional property was used" in an object state's key set


class Arr:
    __slots__ = ("items", "lo", "hi", "sep")

    def __init__(self, items: Node, lo: int, hi: int | None, sep: str = ","):
        self.items, self.lo, self.hi, self.sep = items, lo, hi, sep


class _Compiler:
    def __init__(self, root: dict):
        self.root = root
        self.refs: dict[str, Node] = {}
        self._any: Node | None = None

    def any(self) -> Node:
        if self._any is None:  # recursive: any object holds any values
            self._any = node = Node()
            node.alts = [Obj({}, frozenset(), node, ", "), Arr(node, 0, None, ", "), Str(), Num(False),
                         Lit("true"), Lit("false"), Lit("null")]
        return self._any

    def node(self, schema: Any) -> Node:
        if schema is True or schema == {} or schema is None:
            return self.any()
        if schema is False:
            return Node([])
        if not isinstance(schema, dict):
            raise ValueError(f"not a JSON Schema: {schema!r}")
        if "$ref" in schema:
            return self.ref(schema["$ref"])
        if "enum" in schema or "const" in schema:
            values = schema["enum"] if "enum" in schema else [schema["const"]]
            return Node([Lit(json.dumps(v, ensure_ascii=False, separators=(",", ":"))) for v in values])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return Node([a for sub in schema[key] for a in self.node(sub).alts])
        if "allOf" in schema:  # best effort: merge the parts (the checker judges the result)
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                merged.update(part)
            return self.node(merged)
        types = schema.get("type")
        if types is None:
            types = "object" if "properties" in schema else "array" if "items" in schema else None
        if types is None:
            return self.any()
        node = Node()
        for t in ([types] if isinstance(types, str) else types):
            node.alts += self.alts_of(t, schema)
        return node

    def alts_of(self, t: str, schema: dict) -> list:
        if t == "object":
            if "properties" not in schema and "additionalProperties" not in schema:
                return [self.any().alts[0]]  # any object, as xgrammar reads it
            extra = schema.get("additionalProperties", False)  # strict, as vLLM's backend
            return [Obj({k: self.node(v) for k, v in schema.get("properties", {}).items()},
                        frozenset(schema.get("required", [])), None if extra is False else self.node(extra))]
        if t == "array":
            if "items" not in schema:
                return [Arr(self.any(), int(schema.get("minItems", 0)), schema.get("maxItems"), ", ")]
            return [Arr(self.node(schema.get("items", True)), int(schema.get("minItems", 0)), schema.get("maxItems"))]
        if t == "string":
            return [Str()]
        if t in ("number", "integer"):
            return [Num(t == "integer")]
        if t == "boolean":
            return [Lit("true"), Lit("false")]
        if t == "null":
            return [Lit("null")]
        raise ValueError(f"JSON Schema type {t!r} is not supported by constrained decoding")

    def ref(self, ref: str) -> Node:
        if ref in self.refs:
            return self.refs[ref]
        if not ref.startswith("#"):
            raise ValueError(f"$ref {ref!r}: only local references (#/...) are supported")
        target = resolve_local_ref(self.root, ref)
        if target is None:
            raise ValueError(f"$ref {ref!r}: names nothing in the schema")
        node = self.refs[ref] = Node()  # registered before compiling, so recursion terminates
        node.alts = self.node(target).alts
        return node


def resolve_local_ref(root: Any, ref: str) -> Any:
    """The part of ``root`` a local ``$ref`` (``#/$defs/x``, JSON Pointer escapes) names, or None."""
    target = root
    for part in [p for p in ref.lstrip("#").split("/") if p]:
        if not isinstance(target, dict):
            return None
        target = target.get(part.replace("~1", "/").replace("~0", "~"))
    return target


# -- the automaton: a state is a tuple of possible stacks; a stack is a tuple of frames ---------
def _step(stack: tuple, c: str) -> list[tuple]:
    """Every stack reachable from ``stack`` by reading the character ``c``."""
    if not stack:
        return []
    top, rest = stack[-1], stack[:-1]
    kind = top[0]
    if kind == "L":  # inside a literal: ("L", text, index)
        _, text, i = top
        if text[i] != c:
            return []
        return [rest if i + 1 == len(text) else rest + (("L", text, i + 1),)]
    if kind == "S":  # inside a string: ("S", 0) plain, -1 after a backslash, k > 0 hex digits still due
        esc = top[1]
        if esc == 0:
            if c == '"':
                return [rest]
            if c == "\\":
                return [rest + (("S", -1),)]
            return [] if c < " " else [stack]
        if esc == -1:
            return [rest + (("S", 0),)] if c in '"\\/bfnrt' else [rest + (("S", 4),)] if c == "u" else []
        return [rest + (("S", esc - 1),)] if c in HEX else []
    if kind == "X":  # an extra key while it may still spell a declared one: ("X", raw names, raw so far)
        _, names, raw = top
        if c == '"':
            return [] if raw in names else [rest]
        if any(n.startswith(raw + c) for n in names):
            return [rest + (("X", names, raw + c),)]
        return _step(rest + (("S", 0),), c)  # no longer a declared name: any string from here
    if kind == "N":  # inside a number: ("N", integer, phase)
        _, integer, phase = top
        nxt = _num_next(phase, c, integer)
        if nxt:
            return [rest + (("N", integer, nxt),)]
        return _step(rest, c) if phase in NUM_ACCEPT else []  # the number ended; c belongs to what follows
    if kind == "V":  # a value is due: ("V", node)
        node = top[1]
        out: list[tuple] = []
        for alt in node.alts:
            out += _start(alt, rest, c)
        return out
    if kind == "O":
        return _step_object(top, rest, c)
    return _step_array(top, rest, c)


def _num_next(phase: str, c: str, integer: bool) -> str | None:
    if phase == "start":
        return "sign" if c == "-" else "zero" if c == "0" else "int" if c in DIGITS else None
    if phase == "sign":  # vLLM's grammar has no integer -0 (a number may be -0)
        return ("zero" if not integer else None) if c == "0" else "int" if c in DIGITS else None
    if phase in ("int", "zero") and c in DIGITS:
        return "int" if phase == "int" else None
    if phase in ("int", "zero", "frac") and not integer and c in "eE":
        return "exp"
    if phase in ("int", "zero") and not integer and c == ".":
        return "dot"
    if phase in ("dot", "frac") and c in DIGITS:
        return "frac"
    if phase == "exp" and c in "+-":
        return "expsign"
    if phase in ("exp", "expsign", "expdig") and c in DIGITS:
        return "expdig"
    return None


def _start(alt, rest: tuple, c: str) -> list[tuple]:
    if isinstance(alt, Lit):
        return _step(rest + (("L", alt.text, 0),), c)
    if isinstance(alt, Str):
        return [rest + (("S", 0),)] if c == '"' else []
    if isinstance(alt, Num):
        return _step(rest + (("N", alt.integer, "start"),), c)
    if isinstance(alt, Obj):
        return [rest + (("O", alt, frozenset(), "first", None),)] if c == "{" else []
    if isinstance(alt, Arr):
        return [rest + (("A", alt, 0, "first"),)] if c == "[" else []
    return []


def _step_object(top: tuple, rest: tuple, c: str) -> list[tuple]:
    # ("O", obj, keys used, phase, current key); phases: first (after "{"), key (after ","), colon
    # (after a key), next (after a value)
    _, obj, used, phase, key = top
    if phase in ("first", "key"):
        if c == "}" and phase == "first" and obj.required <= used:
            return [rest]
        if c != '"':
            return []
        out = [rest + (("O", obj, used, "colon", k), ("L", json.dumps(k, ensure_ascii=False), 1))
               for k in obj.after(used)]
        if obj.extra_allowed(used):  # any other key (a declared one is not an extra)
            out.append(rest + (("O", obj, used, "colon", None), ("X", obj.raw_names, "")))
        return out
    if phase == "colon":
        if c != ":":
            return []
        value = obj.props[key] if key is not None else obj.extra
        return [rest + (("O", obj, used | {key if key is not None else EXTRA}, "next", None), ("V", value))]
    if c == "," and (obj.extra_allowed(used) or obj.after(used)):
        return [rest + (("O", obj, used, "key", None),) + _after_comma(obj.sep)]
    if c == "}" and obj.required <= used:
        return [rest]
    return []


def _step_array(top: tuple, rest: tuple, c: str) -> list[tuple]:
    # ("A", arr, items so far, phase); phases: first (after "["), next (after an item)
    _, arr, count, phase = top
    if phase == "first":
        if c == "]" and arr.lo == 0:
            return [rest]
        if arr.hi == 0:
            return []
        return _step(rest + (("A", arr, 1, "next"), ("V", arr.items)), c)
    if c == "," and (arr.hi is None or count < arr.hi):
        return [rest + (("A", arr, count + 1, "next"), ("V", arr.items)) + _after_comma(arr.sep)]
    if c == "]" and count >= arr.lo:
        return [rest]
    return []


def _after_comma(sep: str) -> tuple:
    """The frames still due after a comma: xgrammar's ``", "`` of untyped values wants its space."""
    return (("L", sep[1:], 0),) if len(sep) > 1 else ()


class Guide:
    """The automaton for one contract. States are hashable tuples; ``start`` is the empty text."""

    def __init__(self, start: tuple):
        self.start = start

    @classmethod
    def json_schema(cls, schema: dict) -> "Guide":
        return cls(((("V", _Compiler(schema).node(schema)),),))

    @classmethod
    def choice(cls, options: list[str]) -> "Guide":
        """Exactly one of ``options``, as raw text (a label contract)."""
        if not options:
            raise ValueError("a choice guide needs at least one option")
        return cls(tuple((("L", o, 0),) for o in dict.fromkeys(options) if o))

    @classmethod
    def from_spec(cls, guide: str | dict) -> "Guide":
        """From a guide spec ``{"json_schema": {...}}`` or ``{"choice": [...]}`` (JSON text or dict),
        as carried by ``GenParams.guide``."""
        g = json.loads(guide) if isinstance(guide, str) else guide
        if "json_schema" in g:
            return cls.json_schema(g["json_schema"])
        if "choice" in g:
            return cls.choice(list(g["choice"]))
        raise ValueError(f"guide: expected 'json_schema' or 'choice', got {sorted(g)}")

    @staticmethod
    def advance(state: tuple, text: str) -> tuple | None:
        for c in text:
            nxt: dict[tuple, None] = {}
            for stack in state:
                for s in _step(stack, c):
                    nxt[s] = None
            if not nxt:
                return None
            state = tuple(nxt)
        return state

    @staticmethod
    def done(state: tuple) -> bool:
        """The text so far is a complete output (a top-level number may still grow)."""
        return any(not s or (len(s) == 1 and s[0][0] == "N" and s[0][2] in NUM_ACCEPT) for s in state)

    @staticmethod
    def closed(state: tuple) -> bool:
        """Complete and nothing more can follow: only the end of text is left."""
        return all(not s for s in state)

    def accepts(self, text: str) -> bool:
        state = self.advance(self.start, text)
        return state is not None and self.done(state)

    def write(self, value: Any) -> str | None:
        """``value`` as the JSON text this grammar lets a decoder write (compact; commas as ``","`` or,
        in untyped parts, ``", "``), keys in the order ``value`` has them; None when the grammar
        accepts no writing of it (e.g. keys out of the schema's order)."""
        pieces = list(_pieces(value))

        def walk(i: int, state: tuple) -> str | None:
            text = []
            while i < len(pieces) and pieces[i] is not _COMMA:
                state = self.advance(state, pieces[i])
                if state is None:
                    return None
                text.append(pieces[i])
                i += 1
            if i == len(pieces):
                return "".join(text) if self.done(state) else None
            for sep in (",", ", "):  # the wrong one fails at its next character: no real search
                nxt = self.advance(state, sep)
                rest = walk(i + 1, nxt) if nxt is not None else None
                if rest is not None:
                    return "".join(text) + sep + rest
            return None

        try:
            return walk(0, self.start)
        except RecursionError:  # thousands of commas: not an answer a guide decodes
            return None


_COMMA = object()  # where a member or item separator goes in ``_pieces``


def _pieces(value: Any):
    """Compact JSON of ``value`` in pieces, with ``_COMMA`` where a separator goes."""
    if isinstance(value, dict):
        yield "{"
        for i, (k, v) in enumerate(value.items()):
            if i:
                yield _COMMA
            yield json.dumps(str(k), ensure_ascii=False) + ":"
            yield from _pieces(v)
        yield "}"
    elif isinstance(value, (list, tuple)):
        yield "["
        for i, v in enumerate(value):
            if i:
                yield _COMMA
            yield from _pieces(v)
        yield "]"
    else:
        yield json.dumps(value, ensure_ascii=False)


def guide_for(contract) -> str | None:
    """The guide spec (JSON text, for ``GenParams.guide``) that enforces ``contract`` while
    decoding, or None when the contract does not ask for constrained decoding."""
    if not getattr(contract, "constrained_decoding", False):
        return None
    if contract.type == "label":
        return json.dumps({"choice": list(contract.labels)})
    if contract.type == "json":
        from pipelines.contract import _schema_of

        return json.dumps({"json_schema": _schema_of(contract)})
    raise ValueError(f"contract.constrained_decoding: not available for contract type {contract.type!r} "
                     "(json and label only)")


@functools.lru_cache(maxsize=8)
def compiled(guide: str) -> Guide:
    """``Guide.from_spec`` of a ``GenParams.guide`` string, compiled once per process (a few kept):
    eval's checks and the http engine's streamed free decode use the same one."""
    return Guide.from_spec(guide)
