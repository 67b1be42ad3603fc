"""The transformers engine: batched generation with left padding and the KV cache.

Prompts are rendered with the model's own saved chat template (the one it was trained with), sorted
by length so each batch wastes little padding, generated together, and returned in input order.
Decoder-only models must be left-padded for batched generation: the new tokens then follow every
prompt directly.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from pipelines.engines import Chat, Completion, GenParams

# compiled guides kept per engine (least recently used dropped): a server that sees one schema
# per request must not grow without bound; each holds its per-state mask cache
MAX_GUIDES = 16


class HFEngine:
    name = "hf"
    reports_guide_interventions = True  # the guide runs here, token by token (engines.constrain)

    def __init__(self, model, tokenizer, *, batch_size: int = 16, resolved=None, progress: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.resolved = resolved
        self.progress = progress
        self.default_system_prompt = getattr(resolved, "system_prompt", None)
        self.default_guide = getattr(resolved, "guide", None)  # the contract it was trained for, if constrained
        eos = tokenizer.eos_token_id
        self._eos_ids = {eos} if eos is not None else set()
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if gen_eos is not None:
            self._eos_ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self._token_texts = None
        self._guides: OrderedDict[str, object] = OrderedDict()

    @classmethod
    def load(cls, model: str, registry=None, *, adapter: str | None = None, batch_size: int = 16,
             dtype: str = "auto", gguf_file: str | None = None, trust_remote_code: bool = False,
             progress: bool = False) -> "HFEngine":
        from pipelines.engines.loading import load_for_inference

        m, tok, resolved = load_for_inference(adapter or model, registry, dtype=dtype, gguf_file=gguf_file,
                                              trust_remote_code=trust_remote_code)
        return cls(m, tok, batch_size=batch_size, resolved=resolved, progress=progress)

    def render(self, chat: Chat) -> str:
        """The prompt text for a chat: the saved template with the assistant turn opened."""
        return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

    def generate(self, chats: list[Chat], params: GenParams = GenParams()) -> list[Completion]:
        import torch

        prompts = [self.render(c) for c in chats]
        # encode once without special tokens: the template already holds every marker it needs
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        results: list[Completion | None] = [None] * len(ids)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        bar = _progress(len(ids), self.progress)
        torch.manual_seed(params.seed)  # sampling is reproducible for the same inputs and batch size
        for batch in batches:
            for i, c in zip(batch, self._generate_batch([ids[i] for i in batch], params)):
                results[i] = c
            bar(len(batch))
        bar(0, done=True)
        return results  # type: ignore[return-value]

    def stream(self, chat: Chat, params: GenParams = GenParams()):
        """Yield one chat's output as it is generated (``str`` deltas), then the finished ``Completion``.

        The same generate call as a batch of one (guide, stop strings and seed included), run in a
        thread that hands each new token over. Text that could still be the start of a stop string,
        or an unfinished UTF-8 character, is held back until it is decided, so the deltas always join
        up to exactly the final text.
        """
        import queue
        import threading

        import torch
        from transformers.generation.streamers import BaseStreamer

        ids = self.tokenizer(self.render(chat), add_special_tokens=False)["input_ids"]
        tokens: queue.Queue = queue.Queue()

        class Handover(BaseStreamer):
            prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:  # generate hands the prompt over first
                    self.prompt_seen = True
                    return
                tokens.put(value.view(-1).tolist())

            def end(self):
                tokens.put(None)

        result: dict = {}
        closed = threading.Event()  # set when the consumer stops listening: generation ends at the next step

        def run():
            try:
                torch.manual_seed(params.seed)
                result["completion"] = self._generate_batch([ids], params, streamer=Handover(), cancel=closed)[0]
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                result["error"] = e
            finally:
                tokens.put(None)

        worker = threading.Thread(target=run, name="hf-stream", daemon=True)
        worker.start()
        row: list[int] = []
        sent = ""
        try:
            while (new := tokens.get()) is not None:
                row += [t for t in new if t not in self._eos_ids]
                text = self.tokenizer.decode(row, skip_special_tokens=True)
                safe = _settled(text, params.stop)
                if safe > len(sent) and text.startswith(sent):
                    yield text[len(sent):safe]
                    sent = text[:safe]
        finally:  # also on close(): the consumer went away
            closed.set()
        worker.join()
        if "error" in result:
            raise result["error"]
        final: Completion = result["completion"]
        if final.text.startswith(sent):
            if len(final.text) > len(sent):
                yield final.text[len(sent):]
        else:  # a tokenizer whose decode is not prefix-stable: what was sent stands
            final.text = sent
        yield final

    def _generate_batch(self, batch_ids: list[list[int]], params: GenParams, streamer=None,
                        cancel=None) -> list[Completion]:
        import torch

        pad = self.tokenizer.pad_token_id
        width = max(len(x) for x in batch_ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch_ids])
        attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch_ids])
        device = next(self.model.parameters()).device
        kw = dict(max_new_tokens=params.max_new_tokens, pad_token_id=pad, use_cache=True,
                  eos_token_id=sorted(self._eos_ids) or None)
        if params.temperature > 0:
            kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.stop or cancel is not None:
            kw["stopping_criteria"] = _stop_criteria(self.tokenizer, params.stop, width, cancel)
        if streamer is not None:
            kw["streamer"] = streamer
        if params.logprobs is not None:  # raw logits: the model's own distribution, before any guide
            kw.update(return_dict_in_generate=True, output_logits=True)
        guided = self._guided_logits(params, len(batch_ids), width) if params.guide else None
        if guided is not None:
            from transformers import LogitsProcessorList

            kw["logits_processor"] = LogitsProcessorList([guided])
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kw)
        elapsed = time.perf_counter() - start
        logits = out.logits if params.logprobs is not None else None
        seqs = out.sequences if params.logprobs is not None else out
        completions = []
        for r, (row, prompt) in enumerate(zip(seqs[:, width:].tolist(), batch_ids)):
            completions.append(self._finish(row, len(prompt), params, elapsed, len(batch_ids)))
            if logits is not None:
                c = completions[-1]
                c.extra["logprobs"] = self._logprobs(row[:c.completion_tokens], [step[r] for step in logits],
                                                     params.logprobs)
            if guided is not None:
                completions[-1].extra["guide_interventions"] = guided.interventions[r]
        return completions

    def _logprobs(self, row: list[int], step_logits: list, top: int) -> list[dict]:
        """OpenAI ``logprobs.content`` entries for the tokens of one output."""
        import torch

        def entry(tok: int, lp: float) -> dict:
            text = self.tokenizer.decode([tok])
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        out = []
        for tok, logits in zip(row, step_logits):
            lps = torch.log_softmax(logits.float(), dim=-1)
            item = entry(tok, float(lps[tok]))
            values, ids = lps.topk(top) if top else (lps[:0], lps[:0].long())
            item["top_logprobs"] = [entry(int(i), float(v)) for v, i in zip(values.tolist(), ids.tolist())]
            out.append(item)
        return out

    def _guided_logits(self, params: GenParams, batch: int, width: int):
        from pipelines.engines.constrain import GuidedLogits, TokenGuide, TokenTexts
        from pipelines.guide import Guide

        tg = self._guides.get(params.guide)
        if tg is None:
            if self._token_texts is None:  # ~1 s for a 50k vocabulary, once per engine
                vocab = self.model.get_output_embeddings().weight.shape[0]
                self._token_texts = TokenTexts(self.tokenizer, vocab)
            tg = self._guides[params.guide] = TokenGuide(Guide.from_spec(params.guide), self._token_texts)
            while len(self._guides) > MAX_GUIDES:
                self._guides.popitem(last=False)
        self._guides.move_to_end(params.guide)
        return GuidedLogits(tg, batch, width, self._eos_ids, sample=params.temperature > 0)

    def _finish(self, row: list[int], n_prompt: int, params: GenParams, elapsed: float, batch: int) -> Completion:
        n, reason = len(row), "length"
        for j, t in enumerate(row):
            if t in self._eos_ids:
                n, reason = j, "stop"
                break
        text = self.tokenizer.decode(row[:n], skip_special_tokens=True)
        for s in params.stop:  # generation stops after the token completing a stop string; cut it off
            k = text.find(s)
            if k >= 0:
                text, reason = text[:k], "stop"
        return Completion(text=text, prompt_tokens=n_prompt, completion_tokens=n, finish_reason=reason,
                          latency_s=elapsed, extra={"batch_size": batch})


def _settled(text: str, stops) -> int:
    """How much of a growing output can be sent: not a trailing unfinished character, nothing
    from a stop string on, nor a tail that may still become one."""
    safe = len(text.rstrip("\ufffd"))
    for s in stops:
        k = text.find(s)
        if k >= 0:
            safe = min(safe, k)
            continue
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                safe = min(safe, len(text) - n)
                break
    return safe


def _stop_criteria(tokenizer, stops: tuple[str, ...], width: int, cancel=None):
    """Stop each sequence once its decoded new text contains a stop string (every sequence once
    ``cancel``, a ``threading.Event``, is set).

    Decoding (rather than matching token ids, as transformers' ``stop_strings`` does) is exact
    however the tokenizer splits the string; the cost is one small decode per step and row.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnStrings(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if cancel is not None and cancel.is_set():
                return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            if not stops:
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            texts = tokenizer.batch_decode(input_ids[:, width:], skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stops) for t in texts], device=input_ids.device)

    return StoppingCriteriaList([StopOnStrings()])


def _progress(total: int, enabled: bool):
    """A tqdm bar when asked for and available, else a no-op."""
    if not enabled or total == 0:
        return lambda n, done=False: None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return lambda n, done=False: None
    bar = tqdm(total=total, unit="ex", desc="generate", leave=False)

    def step(n: int, done: bool = False):
        bar.update(n)
        if done:
            bar.close()

    return step
