"""One choice being decoded: how its next token is picked, and its text as it streams.

Token choice: greedy is the arg-max of the float32 logits (what ``generate`` does without
sampling). Sampling applies transformers' own temperature, top-k and top-p warpers to the
row alone and draws with the choice's own ``torch.Generator``, so a seeded choice draws
the same tokens whatever else is in the batch (up to the float rounding a batch's shape
can change). ``no_repeat_ngram_size`` is transformers' processor over prompt + output.

Text: incremental detokenization as vLLM and TGI do it (decode a short window of recent
tokens and keep what it adds), holding back an incomplete multi-byte character and any
tail that may still become a stop sequence, so the streamed pieces add up to the final
text and never include a stop sequence.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

from serving.types import Decoding, Logprob

GOLDEN = 0x9E3779B97F4A7C15  # spreads choice indexes over the seed space (Fibonacci hashing)
MASK = 2**64 - 1


def choice_seed(seed: int | None, index: int) -> int:
    """The generator seed of choice ``index`` of a request seeded ``seed`` (a signed 64-bit
    integer, ``types.SEEDS``), so ``n`` > 1 gives different samples that are each reproducible.

    Mixed through splitmix64's finalizer, a bijection on 64 bits whose low 32 bits depend on
    all 64: torch's CPU generator (mt19937) keeps only the low 32 bits of its seed, so seeds
    2**32 apart (0, 2**32, 2**40) drew the same samples there. Now distinct seeds give distinct
    64-bit seeds (CUDA's Philox keeps all 64) and, on CPU, share samples only by the chance
    of a 32-bit hash collision."""
    if seed is None:
        return secrets.randbits(64)
    x = (seed + index * GOLDEN) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def warpers(d: Decoding):
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    chain = LogitsProcessorList([TemperatureLogitsWarper(d.temperature)])
    if d.top_k > 0:
        chain.append(TopKLogitsWarper(d.top_k))
    if d.top_p < 1.0:
        chain.append(TopPLogitsWarper(d.top_p))
    return chain


class TextStream:
    """The text of a growing token sequence, released in pieces that add up to it."""

    WINDOW = 5  # tokens of context re-decoded with the new ones: enough for word-boundary rules

    def __init__(self, tok, stops: tuple[str, ...]):
        self.tok, self.stops = tok, tuple(s for s in stops if s)
        self.ids: list[int] = []
        self.text = ""  # decoded so far (complete characters only)
        self.sent = 0  # characters already released
        self._prefix = self._read = 0  # the window: ids[_prefix:_read] are decoded into text already

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        before = self._decode(self._prefix, self._read)
        after = self._decode(self._prefix, len(self.ids))
        if len(after) > len(before) and not after.endswith("\ufffd"):  # a character may still be incomplete
            self.text += after[len(before):]
            self._prefix, self._read = max(0, len(self.ids) - self.WINDOW), len(self.ids)

    def flush(self) -> None:
        """At the end: whatever the last tokens decode to, an incomplete character included."""
        before = self._decode(self._prefix, self._read)
        self.text += self._decode(self._prefix, len(self.ids))[len(before):]
        self._prefix = self._read = len(self.ids)

    def stop_at(self) -> int | None:
        """Where the earliest stop sequence starts in the text, if one has appeared."""
        found = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def release(self, end: int | None = None) -> str:
        """The next piece: up to ``end`` (the final text's end) or, while decoding, up to
        the longest tail that could still begin a stop sequence."""
        if end is None:
            end = len(self.text) - self._held()
        piece = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece

    def _held(self) -> int:
        return max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)

    def _decode(self, start: int, end: int) -> str:
        return self.tok.decode(self.ids[start:end], skip_special_tokens=True)


@dataclass(eq=False)
class Choice:
    """One row of the running batch: choice ``index`` of a request."""

    handle: object  # the engine's Handle
    index: int
    prompt: tuple[int, ...]
    stream: TextStream
    generator: torch.Generator | None = None  # sampling only
    processors: object = None  # sampling warpers
    no_repeat: object = None
    last: int = -1  # the token to feed next
    ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)  # each token's, where the request asked

    @property
    def decoding(self) -> Decoding:
        return self.handle.request.decoding

    @property
    def greedy(self) -> bool:
        return self.decoding.temperature == 0

    def pick(self, scores: torch.Tensor) -> torch.Tensor:
        """The next token from this row's float32 logits, [1, vocab] -> [1]."""
        if self.no_repeat is not None:
            history = torch.tensor([self.prompt + tuple(self.ids)], device=scores.device)
            scores = self.no_repeat(history, scores)
        if self.greedy:
            return scores.argmax(-1)
        probs = torch.softmax(self.processors(None, scores), dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]


def new_choice(handle, index: int, tok, device) -> Choice:
    from transformers import NoRepeatNGramLogitsProcessor

    d = handle.request.decoding
    choice = Choice(handle, index, handle.request.prompt_ids, TextStream(tok, d.stop))
    if d.no_repeat_ngram_size > 0:
        choice.no_repeat = NoRepeatNGramLogitsProcessor(d.no_repeat_ngram_size)
    if d.temperature > 0:
        choice.processors = warpers(d)
        choice.generator = torch.Generator(device=device)
        choice.generator.manual_seed(choice_seed(d.seed, index))
    return choice


def pick_all(choices: list[Choice], logits: torch.Tensor) -> list[int]:
    """Next tokens for a batch's rows: one arg-max for plain greedy rows, row by row for the rest."""
    logits = logits.float()
    picked = logits.argmax(-1)
    for i, c in enumerate(choices):
        if not c.greedy or c.no_repeat is not None:
            picked[i] = c.pick(logits[i:i + 1])[0]
    return picked.tolist()


def logprobs_of(logits: torch.Tensor, chosen: list[int], top: list[int]) -> list[Logprob]:
    """Row i of ``logits`` ([rows, vocab]) -> token ``chosen[i]``'s Logprob with the row's
    ``top[i]`` most likely tokens: the model's log-softmax in float32, before any warper."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    picked = lp.gather(1, torch.tensor(chosen, device=lp.device)[:, None])[:, 0].tolist()
    k = max(top, default=0)
    values, ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    values, ids = values.tolist(), ids.tolist()
    return [Logprob(t, p, tuple(zip(ids[i][:top[i]], values[i][:top[i]]))) for i, (t, p) in enumerate(zip(chosen, picked))]


def scored(choices: list[Choice], logits: torch.Tensor, tokens: list[int]) -> list[Logprob | None]:
    """The picked ``tokens``' Logprobs for the rows whose request asked for them, else None."""
    want = [i for i, c in enumerate(choices) if c.decoding.logprobs is not None]
    out: list[Logprob | None] = [None] * len(choices)
    if want:
        index = torch.tensor(want, device=logits.device)
        found = logprobs_of(logits.index_select(0, index), [tokens[i] for i in want],
                            [choices[i].decoding.logprobs for i in want])
        for i, lp in zip(want, found):
            out[i] = lp
    return out


class LogprobText:
    """Log-probabilities in OpenAI's two shapes, with each token as its text (vLLM's way: the
    token decoded alone, ``bytes`` its UTF-8, a partial character as U+FFFD)."""

    def __init__(self, tokenizer):
        self.tokenizer, self._text = tokenizer, {}

    def text(self, token_id: int) -> str:
        if token_id not in self._text:  # bounded by the vocabulary
            self._text[token_id] = self.tokenizer.decode([token_id])
        return self._text[token_id]

    def completion(self, entries: list[tuple[int, Logprob | None]], offset: int = 0) -> dict:
        """Completions' ``logprobs``: parallel lists; ``text_offset`` counts from ``offset``."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, lp in entries:
            text = self.text(token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp.logprob if lp else None)
            out["top_logprobs"].append({self.text(t): v for t, v in lp.top} if lp else None)
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    def chat(self, logprobs: list[Logprob]) -> dict:
        """Chat's ``logprobs``: a ``content`` entry per generated token."""
        def entry(token_id: int, value: float) -> dict:
            text = self.text(token_id)
            return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in logprobs], "refusal": None}
