"""Chat templates: our rendering is the tokenizer's own; the loss mask trains assistant turns + EOS only."""

from __future__ import annotations

import pytest

from pipelines.modeling import load_tokenizer
from pipelines.templates import IGNORE, encode_chat, render, select_template
from tests.conftest import shared

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Name a colour"},
     {"role": "assistant", "content": '{"colour": "red"}'}, {"role": "user", "content": "Another"},
     {"role": "assistant", "content": '{"colour": "blue"}'}],
]


def _ids(x):
    return list(x["input_ids"]) if hasattr(x, "keys") else list(x)


@pytest.fixture(params=["smollm2", "tiny"])
def tokenizer(request, tiny_model):
    path = shared("tokenizers", "smollm2-135m-instruct") if request.param == "smollm2" else tiny_model
    tok = load_tokenizer(path)
    chosen = select_template(tok, "auto")
    assert chosen["template"] == "tokenizer"  # both have their own template: it is kept, not replaced
    return tok


@pytest.mark.parametrize("chat", CHATS, ids=["single", "multi-turn"])
def test_rendering_equals_apply_chat_template(tokenizer, chat):
    assert render(tokenizer, chat) == tokenizer.apply_chat_template(chat, tokenize=False)
    assert encode_chat(tokenizer, chat).input_ids == _ids(tokenizer.apply_chat_template(chat, tokenize=True))
    gen = render(tokenizer, chat[:-1], add_generation_prompt=True)
    assert gen == tokenizer.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)


def test_mask_trains_every_assistant_turn_and_eos_only(tokenizer):
    chat = CHATS[1]
    enc = encode_chat(tokenizer, chat)
    assert tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids(tokenizer.eos_token)  # pad == eos here
    trained = [i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE]
    eos = tokenizer.eos_token
    assert tokenizer.decode(trained) == '{"colour": "red"}' + eos + '{"colour": "blue"}' + eos
    eos_id = tokenizer.convert_tokens_to_ids(eos)
    eos_positions = [j for j, i in enumerate(enc.input_ids) if i == eos_id]
    trained_eos = [j for j in eos_positions if enc.labels[j] == eos_id]
    assert len(trained_eos) == 2  # the two assistant turns end with a learned EOS
    assert len(eos_positions) == 5  # one per turn; the system and user ones are not learned
    # Nothing from the system or user turns is trained on.
    prompt_only = [i for i, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE]
    assert "Name a colour" in tokenizer.decode(prompt_only) and "Answer in JSON." in tokenizer.decode(prompt_only)


def test_truncation_keeps_labels_aligned(tokenizer):
    enc = encode_chat(tokenizer, CHATS[1], max_len=12)
    assert enc.truncated and len(enc.input_ids) == len(enc.labels) == 12


@pytest.mark.parametrize("name,expect", [
    ("simple", "System: Answer in JSON.\nUser: Name a colour\nAssistant: {\"colour\": \"red\"}<|im_end|>\n"),
    ("alpaca", "Answer in JSON.\n\n### Instruction:\nName a colour\n\n### Response:\n{\"colour\": \"red\"}"
               "<|im_end|>\n\n"),
])
def test_builtin_templates(tiny_model, name, expect):
    tok = load_tokenizer(tiny_model)
    select_template(tok, name)
    chat = CHATS[1][:3]
    assert render(tok, chat) == expect
    enc = encode_chat(tok, chat)
    trained = tok.decode([i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE])
    assert trained.strip() == '{"colour": "red"}<|im_end|>'
    assert enc.input_ids == _ids(tok.apply_chat_template(chat, tokenize=True))


def test_chatml_on_a_bare_tokenizer_adds_its_tokens(gpt2_tokenizer):
    tok = load_tokenizer(gpt2_tokenizer)
    assert not tok.chat_template
    info = select_template(tok, "auto")
    assert info["template"].startswith("chatml") and info["added_tokens"] == 2
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None


def test_unknown_template_is_named():
    from transformers import PreTrainedTokenizerFast  # noqa: F401

    with pytest.raises(ValueError, match="model.template"):
        select_template(object(), "vicuna")
