"""Which texts vLLM's structured-outputs backend accepts for a JSON Schema, printed as JSON.

Run with the vLLM venv's python: ``python -m tests.vllm_grammar < cases.json`` where the input is
``{"schemas": [SCHEMA, ...], "cases": [[SCHEMA_INDEX, TEXT], ...]}``. Each schema is compiled the
way vLLM's xgrammar backend compiles a ``json_schema`` request on the servers we start
(``disable_any_whitespace``: xgrammar's JSON-schema grammar with ``any_whitespace`` off and the
compact separators, xgrammar's defaults otherwise: see vllm/v1/structured_output/backend_xgrammar.py),
and each text is matched to the end. Prints ``GRAMMAR-JSON [bool, ...]``.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string

    doc = json.load(sys.stdin)
    grammars = [xgr.Grammar.from_json_schema(json.dumps(s), any_whitespace=False,
                                              separators=(",", ":")) for s in doc["schemas"]]
    print("GRAMMAR-JSON " + json.dumps([_is_grammar_accept_string(grammars[i], text) for i, text in doc["cases"]]))


if __name__ == "__main__":
    main()
