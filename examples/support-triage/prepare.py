"""Turn the customer-support CSV into triage examples: message -> {"intent", "category", "entity"}.

    python examples/support-triage/prepare.py ../shared/datasets/customer-support/support.csv OUT.jsonl

The factory then gates, deduplicates and splits OUT.jsonl like any other chat data.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def triage_record(row: dict, line: int) -> dict:
    entity = ({"type": row["entity_type"], "value": row["entity_value"]} if row.get("entity_type") else None)
    answer = {"intent": row["intent"], "category": row["category"], "entity": entity}
    return {"id": f"support-{line}",
            "messages": [{"role": "user", "content": row["instruction"]},
                         {"role": "assistant", "content": json.dumps(answer, separators=(", ", ": "))}],
            "meta": {"intent": row["intent"], "category": row["category"]}}


def main(src: str, dest: str) -> None:
    with open(src, newline="", encoding="utf-8") as f, open(dest, "w", encoding="utf-8") as out:
        n = 0
        for n, row in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
            out.write(json.dumps(triage_record(row, n)) + "\n")
    print(f"wrote {n - 1} examples to {Path(dest).resolve()}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
