"""LLM-as-judge: a judge engine scores each response 0–100 against the instruction and reference.

The judge is any engine (usually ``http`` to a larger model). Its reply is parsed robustly: a
``Score: N`` line wins, then ``N/100`` or ``N/10`` forms, then a lone number; a reply with no
usable number is recorded as unparsed (None), never as 0, so a chatty judge cannot sink a model.
"""

from __future__ import annotations

import re

from pipelines.engines import GenParams

DEFAULT_RUBRIC = ("Score how well the response fulfils the instruction, using the reference answer as the "
                  "standard: 100 = as good as or better than the reference, 50 = partly right, 0 = wrong or "
                  "unusable.")

PROMPT = """You are grading a model's response.

{rubric}

### Instruction
{instruction}

### Reference answer
{reference}

### Response to grade
{response}

Reply with one line of the form "Score: N" where N is an integer from 0 to 100, and nothing else."""

_SCORE_LINE = re.compile(r"score\s*[:=]?\s*\**\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*(100|10)\b)?", re.I)
_FRACTION = re.compile(r"(-?\d+(?:\.\d+)?)\s*/\s*(100|10)\b")
_NUMBER = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)(?![\w.])")


def parse_score(reply: str | None) -> float | None:
    """A 0–100 score from a judge's reply, or None when it holds no usable number."""
    if not reply:
        return None
    for pattern in (_SCORE_LINE, _FRACTION):
        m = pattern.search(reply)
        if m:
            value = float(m.group(1))
            scale = m.group(2)
            if scale == "10":
                value *= 10
            return value if 0 <= value <= 100 else None
    numbers = [float(x) for x in _NUMBER.findall(reply)]
    if len(numbers) == 1 and 0 <= numbers[0] <= 100:
        return numbers[0]
    return None  # none, or several numbers with no "Score:" to tell which one is meant


def judge_prompt(instruction: str, reference: str, response: str, rubric: str | None = None) -> list[dict]:
    return [{"role": "user", "content": PROMPT.format(rubric=rubric or DEFAULT_RUBRIC, instruction=instruction,
                                                      reference=reference, response=response)}]


def judge(engine, items: list[tuple[str, str, str]], *, rubric: str | None = None,
          max_new_tokens: int = 16, seed: int = 0, recipe=None, fan_out=None) -> list[dict]:
    """Score ``(instruction, reference, response)`` triples; returns ``{"judge": score|None, "judge_reply"}``.
    With ``recipe`` (``pipelines.fanout``) a large set is judged over Ray actors."""
    from pipelines import fanout

    chats = [judge_prompt(i, r, p, rubric) for i, r, p in items]
    outs = fanout.generate(engine, chats, GenParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=seed),
                           recipe=recipe, policy=fan_out)
    return [{"judge": parse_score(o.text), "judge_reply": o.text[:500]} for o in outs]
