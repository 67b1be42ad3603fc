"""The OpenAI chat-completions protocol as this app speaks it: request and response models.

``ChatRequest`` is the body of ``POST /v1/chat/completions``. Every field a client may send is
declared; anything else answers 400 naming the parameter (``extra="forbid"``), and a declared field
we cannot honour (a penalty, a logit bias, an image part) answers 400 too: nothing is dropped
silently. ``params_for`` turns a request into what a replica receives (``ReplicaParams``) and
``guide_for_request`` into the decoding guide (response_format, vLLM's structured_outputs, tools,
or the contract's own guide).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from serving.errors import bad_request, unsupported


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- request ------------------------------------------------------------------------------------------
class FunctionCall(_Strict):
    name: str
    arguments: str = "{}"


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None  # text parts are joined (see _text_parts)
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v):
        if not isinstance(v, list):
            return v
        for part in v:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"content part type {kind!r} is not supported (text parts only)")
        return "".join(part["text"] for part in v)

    @model_validator(mode="after")
    def _has_content(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (a string or text parts)")
        return self

    def plain(self) -> dict:
        """``{role, content}`` for a chat template: text parts joined; a developer turn is a system
        turn; an assistant's earlier tool calls are written as the call JSON the model emits."""
        text = self.content or ""
        if self.tool_calls:
            calls = [{"name": c.function.name, "arguments": _args(c.function.arguments)} for c in self.tool_calls]
            text = (text + "\n" if text else "") + json.dumps(calls[0] if len(calls) == 1 else calls)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


def _args(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


class Function(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: Function


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema: {name, schema}")
        return self


class StructuredOutputs(_Strict):
    """vLLM's per-request structured outputs (the subset both engines enforce)."""
    json_: dict[str, Any] | None = Field(None, alias="json")
    choice: list[str] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one(self):
        if (self.json_ is None) == (self.choice is None):
            raise ValueError("give exactly one of {json: SCHEMA} or {choice: [...]}")
        return self


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: Annotated[StrictInt, Field(ge=1, le=8)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: list[str] | None = None  # a single string is a list of one (see _one_stop)
    seed: StrictInt | None = None
    logprobs: bool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # declared so that their default (no effect) is accepted; any other value is refused below
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, v):
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _combinations(self):
        # raised as APIError (not ValueError) so the 400 names the exact parameter
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise unsupported(name, "only 0 (no penalty)")
        if self.logit_bias:
            raise unsupported("logit_bias")
        stops = self.stop_list()
        if len(stops) > 4 or not all(stops):
            raise bad_request("'stop': at most 4 non-empty strings", "stop")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("'top_logprobs' needs logprobs: true", "top_logprobs")
        if self.stream_options is not None and not self.stream:
            raise bad_request("'stream_options' is only allowed with stream: true", "stream_options")
        if self.stream and self.n > 1:
            raise unsupported("n", "n > 1 with stream: true; stream one choice or send stream: false")
        if self.stream and self.logprobs:
            raise unsupported("logprobs", "logprobs with stream: true; send stream: false")
        if self.response_format is not None and self.structured_outputs is not None:
            raise bad_request("give response_format or structured_outputs, not both", "structured_outputs")
        if self.tool_choice is not None and not self.tools and self.tool_choice != "none":
            raise bad_request("'tool_choice' needs tools", "tool_choice")
        return self

    def stop_list(self) -> list[str]:
        return list(self.stop or [])

    def sticky_id(self) -> str | None:
        """Who the request is for: ``user``, else OpenAI's newer ``safety_identifier`` /
        ``prompt_cache_key``."""
        return self.user or self.safety_identifier or self.prompt_cache_key or None

    def chat(self) -> list[dict]:
        return [m.plain() for m in self.messages]

    def tools_wanted(self, contract_type: str) -> bool:
        """Answers become ``message.tool_calls``: the client offered tools (and did not say none) to a
        tool_call contract. Without tools a client gets the call JSON as content, as it asked."""
        return contract_type == "tool_call" and bool(self.tools) and self.tool_choice != "none"


def parse_request(body: Any) -> ChatRequest:
    """The validated request, or an ``APIError`` (400) naming the first bad field."""
    from pydantic import ValidationError

    from serving.errors import APIError, from_validation

    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as e:
        raise from_validation(e) from None
    except APIError:
        raise


def guide_for_request(req: ChatRequest, contract, default_guide: str | None) -> str | None:
    """The decoding guide (JSON text, ``GenParams.guide``) for this request."""
    from pipelines.guide import Guide

    if req.response_format is not None:
        rf = req.response_format
        if rf.type == "text":
            return None
        g: dict = {"json_schema": {"type": "object"} if rf.type == "json_object" else rf.json_schema.schema_}
        param = "response_format"
    elif req.structured_outputs is not None:
        so = req.structured_outputs
        g = {"json_schema": so.json_} if so.json_ is not None else {"choice": [str(c) for c in so.choice]}
        param = "structured_outputs"
    elif req.tools_wanted(contract.type):
        g = {"json_schema": tool_call_schema(req, contract)}
        param = "tools"
    else:
        return default_guide
    try:
        Guide.from_spec(g)
    except (ValueError, KeyError, TypeError) as e:
        raise bad_request(f"'{param}': constrained decoding: {e}", param) from None
    return json.dumps(g)


def tool_call_schema(req: ChatRequest, contract) -> dict:
    """One call ``{"name", "arguments"}`` of a tool the request offers (narrowed by a named
    ``tool_choice``); every offered tool must be one of the contract's, which the model was trained on."""
    known = {t.name for t in contract.tools}
    offered = [t.function for t in req.tools or []]
    for i, f in enumerate(offered):
        if f.name not in known:
            raise bad_request(f"'tools[{i}].function.name': {f.name!r} is not a tool of this deployment's contract "
                              f"({sorted(known)})", f"tools[{i}].function.name")
    if isinstance(req.tool_choice, NamedToolChoice):
        offered = [f for f in offered if f.name == req.tool_choice.function.name]
        if not offered:
            raise bad_request(f"'tool_choice.function.name': {req.tool_choice.function.name!r} is not in tools",
                              "tool_choice.function.name")
    calls = [{"type": "object", "properties": {"name": {"const": f.name}, "arguments": f.parameters},
              "required": ["name", "arguments"], "additionalProperties": False} for f in offered]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def params_for(req: ChatRequest, cfg, guide: str | None) -> dict:
    """What a replica receives besides the messages (``serving.replica`` documents it)."""
    max_tokens = req.max_completion_tokens or req.max_tokens or min(64, cfg.max_new_tokens)
    if max_tokens > cfg.max_new_tokens:
        name = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise bad_request(f"'{name}' is {max_tokens}; this deployment allows at most {cfg.max_new_tokens}", name)
    return {"max_tokens": max_tokens, "temperature": float(req.temperature), "top_p": float(req.top_p),
            "stop": req.stop_list(), "seed": req.seed if req.seed is not None else 0, "n": req.n,
            "logprobs": (req.top_logprobs or 0) if req.logprobs else None,
            "max_prompt_tokens": cfg.max_prompt_tokens, "guide": guide}


# -- responses ----------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[dict] | None = None


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: str
    logprobs: dict | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    crucible: dict | None = None  # our extension: role served, contract verdict


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "crucible"
    role: str | None = None


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def as_tool_calls(text: str | None) -> list[dict] | None:
    """The model's output as OpenAI ``tool_calls`` (ids fresh, arguments as JSON text), or None
    when it is not a call (then it is answered as content)."""
    from pipelines.contract import normalize_tool_calls

    try:
        value = json.loads(text or "")
    except ValueError:
        return None
    calls = normalize_tool_calls(value)
    if not calls:
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}} for c in calls]


def sse(payload: BaseModel | str) -> bytes:
    """One server-sent event: ``data: <json>`` (or ``data: [DONE]``) and a blank line."""
    data = payload if isinstance(payload, str) else payload.model_dump_json(exclude_none=True)
    return f"data: {data}\n\n".encode()
