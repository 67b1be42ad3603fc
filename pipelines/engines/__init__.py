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
