"""Chat templates: choosing one, rendering chats, and the assistant-only loss mask.

A model's template is saved with it (``tokenizer.chat_template``) and used unchanged by eval and
serving, so training renders through ``tokenizer.apply_chat_template`` too: one renderer, never
two that might drift. The loss mask is found from character spans (where each assistant turn
starts and ends in the rendered text) mapped onto tokens through the fast tokenizer's offsets,
which works for any template whose rendering of a prefix of the chat is a prefix of its
rendering of the whole chat (true of ChatML, Llama, SmolLM2 and the built-ins here).
"""

from __future__ import annotations

from dataclasses import dataclass

# ChatML, as a Jinja template for ``tokenizer.apply_chat_template``. Every turn ends with
# <|im_end|>, which is also the model's EOS, so "stop at end of turn" and "stop at EOS" agree.
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

# "System: …\nUser: …\nAssistant: …<eos>\n". The EOS after each answer is what teaches the model to stop.
SIMPLE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}{{- 'Assistant: ' + message['content'] + eos_token + '\\n' }}"
    "{%- else %}{{- message['role'] | capitalize }}{{- ': ' + message['content'] + '\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'Assistant: ' }}{%- endif %}"
)

# Alpaca: the system prompt as a preamble, user turns as ### Instruction, tool turns as ### Input.
ALPACA = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' %}{{- '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'tool' %}{{- '### Input:\\n' + message['content'] + '\\n\\n' }}"
    "{%- else %}{{- '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### Response:\\n' }}{%- endif %}"
)

BUILTIN = {"chatml": CHATML, "simple": SIMPLE, "alpaca": ALPACA}
IGNORE = -100  # label value cross-entropy skips


def select_template(tokenizer, name: str = "auto") -> dict:
    """Put the template ``name`` on ``tokenizer`` (in place) and say what was chosen.

    ``auto`` keeps the tokenizer's own template when it has one, else ChatML. ChatML on a
    tokenizer without its two tokens adds them as special tokens: the returned
    ``added_tokens`` tells the caller to resize the model's embeddings.
    """
    if name not in ("auto", *BUILTIN):
        raise ValueError(f"model.template: {name!r} is not one of auto, {', '.join(BUILTIN)}")
    added = 0
    source = name
    if name == "auto" and tokenizer.chat_template:
        source = "tokenizer"
    else:
        if name == "auto":
            name, source = "chatml", "chatml (tokenizer had none)"
        if name == "chatml":
            vocab = tokenizer.get_vocab()
            missing = [t for t in CHATML_TOKENS if t not in vocab]
            if missing:
                added = tokenizer.add_special_tokens({"additional_special_tokens": list(CHATML_TOKENS)})
            # With ChatML the end of a turn is the EOS, so generation stops there.
            tokenizer.eos_token = CHATML_TOKENS[1]
        tokenizer.chat_template = BUILTIN[name]
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token: the model could never learn to stop")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # pad == eos is fine: labels, not pad ids, decide what is learned
    return {"template": source, "added_tokens": added, "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token}


def render(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    """The chat as text, exactly as ``apply_chat_template`` renders it (eval and serving do the same)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and, per assistant turn, the character span that is trained on.

    A span runs from where the generation prompt ends to the end of the turn's last EOS string
    (whitespace the template puts after EOS is not learned). A turn whose rendering has no EOS is
    trained up to its end.
    """
    text = render(tokenizer, messages)
    eos = tokenizer.eos_token
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        end = len(render(tokenizer, messages[: i + 1]))
        if text[:end] != render(tokenizer, messages[: i + 1]) or (
                i and not text.startswith(render(tokenizer, messages[:i], add_generation_prompt=True))):
            raise ValueError("the chat template does not render a prefix of a chat as a prefix of the whole chat; "
                             "the assistant turns cannot be located (use model.template: chatml, simple or alpaca)")
        at = text.rfind(eos, start, end)
        if at >= 0:
            end = at + len(eos)
        spans.append((start, end))
    return text, spans


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where not trained on
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def encode_chat(tokenizer, messages: list[dict], max_len: int | None = None) -> Encoded:
    """Token ids (identical to ``apply_chat_template(tokenize=True)``) and labels that train only on
    assistant turns, each including its end-of-turn EOS, even when pad == eos."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    for j, (a, b) in enumerate(offsets):
        if b > a and any(a < e and b > s for s, e in spans):  # any overlap: ' Hello' after 'Assistant:'
            labels[j] = ids[j]
    truncated = bool(max_len and len(ids) > max_len)
    if truncated:
        ids, labels = ids[:max_len], labels[:max_len]
    return Encoded(ids, labels, truncated)


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Prepend the spec's default system prompt to a chat that has none."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages
