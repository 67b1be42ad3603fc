"""``make bench``: speed figures as JSON, each with a baseline measured in the same run.

    python -m bench.run [--out bench/results] [--n 200]

- engines: the batched HF engine (left padding, KV cache) vs a one-prompt-at-a-time loop with
  no KV cache, same greedy tokens (checked), on a tiny model built here from ../shared's GPT-2
  tokenizer. Ratio (`speedup_examples_per_s`) = loop seconds ÷ batched seconds.
Results land in ``bench/results/<name>.json`` with the machine they ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), "platform": platform.platform()}


def local_env() -> None:
    """Offline, quiet tokenizers, local Ray on loopback: call before anything imports ray."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from infra.ray_env import prepare_local_env

    prepare_local_env()


def shared_tokenizer() -> Path:
    """../shared's GPT-2 tokenizer, which every benchmark builds its tiny model from."""
    tokenizer = ROOT.parent / "shared" / "tokenizers" / "gpt2"
    if not tokenizer.exists():
        raise SystemExit(f"{tokenizer} is missing: the benchmark builds its model from ../shared's tokenizer")
    return tokenizer


def save(name: str, result: dict, out: str | Path) -> None:
    """Write ``OUT/<name>.json`` and print it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def engines(n: int) -> dict:
    from pipelines.engines.bench import bench
    from pipelines.modeling import init_model

    tokenizer = shared_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        init_model(tmp, tokenizer=tokenizer, layers=2, hidden=64, heads=4, seed=0)
        return bench(tmp, n=n, max_new_tokens=32, batch_size=32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--n", type=int, default=200, help="prompts per system")
    args = ap.parse_args()
    started = time.time()
    result = {"name": "engines", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
              **engines(args.n)}
    result["wall_s"] = round(time.time() - started, 1)
    save("engines", result, args.out)


if __name__ == "__main__":
    main()
