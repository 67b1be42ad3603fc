"""Chat templates. A model's template is saved with it and used unchanged by eval and serving."""

from __future__ import annotations

# ChatML, as a Jinja template for ``tokenizer.apply_chat_template``. Every turn ends with
# <|im_end|>, which is also the model's EOS, so "stop at end of turn" and "stop at EOS" agree.
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
