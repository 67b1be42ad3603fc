"""One generation interface for teacher generation, evaluation, the judge and Serve.

An engine turns chats (lists of ``{"role", "content"}`` messages) into completions::

    engine = get_engine("hf", model="/path/to/model")      # or "vllm", "http", "auto"
    outs = engine.generate(chats, GenParams(max_new_tokens=64))
    outs[0].text, outs[0].prompt_tokens, outs[0].completion_tokens, outs[0].finish_reason

Implementations live in sibling modules (``hf``, ``vllm``, ``http``) and are imported lazily, so
importing this package costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

Chat = list[dict]  # [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0
    # constrained decoding: JSON text {"json_schema": {...}} or {"choice": [...]} (see pipelines.guide);
    # the HF engine enforces it token by token, vLLM with its structured outputs, http as response_format
    guide: str | None = None
    # per-token log-probabilities: None (off) or how many alternatives to list per token (0 = the chosen
    # token only); they land in ``Completion.extra["logprobs"]`` as OpenAI's ``logprobs.content`` entries
    logprobs: int | None = None
    # for a free decode (no ``guide``): stop as soon as the output leaves this grammar (JSON as in
    # ``guide``). Eval's free-first pass only needs to know whether it left; an engine that cannot
    # stop early decodes to the end, which gives the same verdict
    stop_outside: str | None = None


@dataclass
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # "stop" (EOS or a stop string) or "length"
    latency_s: float = 0.0
    extra: dict = field(default_factory=dict)


class Engine(Protocol):
    name: str

    def generate(self, chats: list[Chat], params: GenParams) -> list[Completion]: ...

    # optional: engines that can stream (the HF engine) also have
    # ``stream(chat, params) -> Iterator[str | Completion]``: text deltas, then the finished Completion


ENGINES = ("auto", "hf", "vllm", "http")


def pick_engine(name: str = "auto", model: str | None = None, registry=None, *, gguf_file: str | None = None) -> str:
    """``auto``: vLLM wherever it runs, else ``hf``.

    vLLM runs in this process when ``import vllm`` works with a CUDA GPU, or as a managed server
    from the vLLM venv (``pipelines.engines.vllm_server``, the CPU build) when that venv exists and
    can run ``model`` (a GGUF file, or a head size without a CPU kernel, stays on HF).
    """
    if name not in ENGINES:
        raise ValueError(f"engine {name!r}: choose one of {', '.join(ENGINES)}")
    if name != "auto":
        return name
    return "vllm" if vllm_unavailable(model, registry, gguf_file=gguf_file) is None else "hf"


def vllm_unavailable(model: str | None = None, registry=None, *, gguf_file: str | None = None) -> str | None:
    """None when the ``vllm`` engine can run ``model`` here, else why not."""
    import importlib.util

    from pipelines.engines import vllm_server

    if gguf_file:
        return "a GGUF file loads on the HF engine"
    gpu = False
    if importlib.util.find_spec("vllm") is not None:
        import torch

        gpu = torch.cuda.is_available()
        if gpu:
            return None
    if vllm_server.vllm_python() is None:
        return "no vLLM: neither `import vllm` with a GPU nor a vLLM venv (make setup-vllm, CRUCIBLE_VLLM_PYTHON)"
    if model is None:
        return None
    from pipelines.engines.loading import resolve_model

    try:
        r = resolve_model(model, registry)
    except (FileNotFoundError, ValueError, KeyError) as e:
        return f"cannot resolve {model!r}: {e}"
    if r.gguf_file:
        return "a GGUF file loads on the HF engine"
    return vllm_server.cpu_supports(r.weights_path)


def get_engine(name: str = "auto", model: str | None = None, url: str | None = None, adapter: str | None = None,
               *, registry=None, batch_size: int = 16, dtype: str = "auto", gguf_file: str | None = None,
               trust_remote_code: bool = False, api_key_env: str | None = None, concurrency: int = 8,
               progress: bool = False, **kwargs) -> Engine:
    """Build an engine by name: ``auto``, ``hf``, ``vllm`` or ``http``.

    - ``hf`` / ``vllm``: ``model`` is a local folder, a hub name or a registry ref (id or
      TASK@ALIAS; pass ``registry``). A LoRA adapter folder/ref works as ``model`` (its base is
      found from the adapter config or the manifest) or as ``adapter`` on top of ``model``.
    - ``http``: ``url`` of an OpenAI-compatible server, ``model`` the name sent in requests, the
      API key read from the env var named by ``api_key_env``; ``concurrency`` parallel requests.

    Every engine has ``generate(chats, GenParams) -> list[Completion]`` (same order as ``chats``)
    and ``default_system_prompt`` / ``default_guide`` (the model's saved prompt and decoding guide, or None).
    """
    name = pick_engine(name, model or adapter, registry, gguf_file=gguf_file)
    if name == "http":
        from pipelines.engines.http import HTTPEngine

        if not url:
            raise ValueError("engine 'http' needs a url (an OpenAI-compatible server)")
        return HTTPEngine(url, model, api_key_env=api_key_env, concurrency=concurrency, **kwargs)
    if not model and not adapter:
        raise ValueError(f"engine {name!r} needs a model (a folder, hub name or registry ref)")
    if name == "vllm":
        from pipelines.engines.vllm import open_vllm

        return open_vllm(model or adapter, registry, adapter=adapter, dtype=dtype,
                         trust_remote_code=trust_remote_code, **kwargs)
    from pipelines.engines.hf import HFEngine

    return HFEngine.load(model or adapter, registry, adapter=adapter, batch_size=batch_size, dtype=dtype,
                         gguf_file=gguf_file, trust_remote_code=trust_remote_code, progress=progress)
