"""``make bench``: the HF engine (batched, KV cache) against the textbook sampler on the same prompts.

The textbook sampler generates one prompt at a time and, for every new token, runs the model over
the whole context again with no KV cache — what a from-scratch loop does. Both are greedy, so
they produce the same tokens and the comparison is like for like; the script checks that.

    python -m pipelines.engines.bench MODEL_DIR [--n 200] [--max-new-tokens 32] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import time


def textbook_generate(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    import torch

    ids = list(prompt_ids)
    new: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            t = int(logits.argmax())
            if t in eos:
                break
            ids.append(t)
            new.append(t)
    return new


def bench(model_dir: str, *, n: int = 200, max_new_tokens: int = 32, batch_size: int = 32) -> dict:
    from pipelines.engines import GenParams, get_engine

    engine = get_engine("hf", model=model_dir, batch_size=batch_size)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly boxed".split()
    chats = [[{"role": "user", "content": " ".join(words[(i + k) % len(words)] for k in range(3 + i % 20))}]
             for i in range(n)]
    params = GenParams(max_new_tokens=max_new_tokens)
    engine.generate(chats[:batch_size], params)  # warm-up
    t0 = time.perf_counter()
    outs = engine.generate(chats, params)
    fast_s = time.perf_counter() - t0
    fast_tokens = sum(o.completion_tokens for o in outs)
    tok = engine.tokenizer
    t0 = time.perf_counter()
    slow_tokens, same = 0, 0
    for chat, o in zip(chats, outs):
        ids = tok(engine.render(chat), add_special_tokens=False)["input_ids"]
        new = textbook_generate(engine.model, tok, ids, max_new_tokens, engine._eos_ids)
        slow_tokens += len(new)
        same += tok.decode(new, skip_special_tokens=True) == o.text
    slow_s = time.perf_counter() - t0
    return {"n": n, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
            "hf_batched": {"seconds": fast_s, "examples_per_s": n / fast_s, "tokens_per_s": fast_tokens / fast_s},
            "textbook": {"seconds": slow_s, "examples_per_s": n / slow_s, "tokens_per_s": slow_tokens / slow_s},
            "speedup_examples_per_s": slow_s / fast_s, "same_outputs": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    a = ap.parse_args()
    print(json.dumps(bench(a.model, n=a.n, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size), indent=2))


if __name__ == "__main__":
    main()
