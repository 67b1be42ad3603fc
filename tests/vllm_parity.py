"""Run our vLLM engine on a model (+ optional LoRA adapter) and print greedy outputs as JSON.

Run with the vLLM venv's python (vLLM pins transformers/numpy versions that differ from the main
venv, so it lives in .venv-vllm): ``python -m tests.vllm_parity MODEL [ADAPTER|-] [MAX_NEW] [GUIDE] < chats.json``.
vLLM starts its engine core with spawn, hence the ``__main__`` guard.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from pipelines.engines import GenParams
    from pipelines.engines.vllm import VLLMEngine

    model = sys.argv[1]
    adapter = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "-" else None
    max_new = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    chats = json.load(sys.stdin)
    engine = VLLMEngine(model, adapter=adapter, max_model_len=256, dtype="float32", max_lora_rank=16)
    outs = engine.generate(chats, GenParams(max_new_tokens=max_new))
    print("PARITY-JSON " + json.dumps([{"text": o.text, "completion_tokens": o.completion_tokens,
                                        "prompt_tokens": o.prompt_tokens} for o in outs]))
    if len(sys.argv) > 4:  # a guide (GenParams.guide JSON): the same chats under constrained decoding
        outs = engine.generate(chats, GenParams(max_new_tokens=max_new, guide=sys.argv[4]))
        print("GUIDED-JSON " + json.dumps([o.text for o in outs]))


if __name__ == "__main__":
    main()
