"""What flows between the server, the engine and the model registry: plain records, no torch.

A request is a prompt already formatted (with the adapter's training template) and
tokenized, the served name it asked for, and how to decode. The engine answers with
events, one choice (``n`` > 1: several) at a time.

Log-probabilities (``Logprob``) are the model's own: the log-softmax of its float32 logits,
before temperature, top-k, top-p or the n-gram rule reshape them for sampling (vLLM's
default, and what a client scoring text, such as lm-evaluation-harness, needs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

MAX_LOGPROBS = 20  # alternatives a token may list at most (vLLM's default bound; OpenAI's chat allows 20)
SEEDS = (-2**63, 2**63 - 1)  # a seed is a signed 64-bit integer (vLLM's bound): each one draws its own samples
# `ptune serve`'s defaults, here so that the CLI's flags and the library's keywords share them without
# the CLI importing torch
POLL_SECONDS = 5.0  # GTO tags are re-read this often: a promotion is served within 30 s
MAX_VERSIONS = 8  # adapters loaded besides the prod ones; each costs only its own parameters
MAX_TOKENS_LIMIT = 1024  # the most a request may ask for; the engine also stops at the context
DEFAULT_MAX_TOKENS = 128  # when a request (or `ptune generate`) names none: an E2E description is under 60 tokens
DRAIN_SECONDS = 25.0  # on SIGTERM: the requests in flight get this long (inside Kubernetes' 30 s grace period)


class QueueFull(RuntimeError):
    """More requests are waiting than the engine's queue bound: the server answers 429."""


class EngineClosed(RuntimeError):
    """The engine was closed (the server is shutting down): the server answers 503."""


class UnknownModel(KeyError):
    """A served name that resolves to nothing: the server answers 404 with what is served."""


@dataclass(frozen=True)
class Decoding:
    """How to decode one request (OpenAI's names where they exist)."""

    max_tokens: int = 64  # 0 with prompt_logprobs: the prompt scored, nothing generated (OpenAI's echo-only)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None  # sampling: the same seed gives the same sample
    stop: tuple[str, ...] = ()
    n: int = 1
    num_beams: int = 1  # > 1: beam search (n best beams returned, n <= num_beams)
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    logprobs: int | None = None  # each generated token's Logprob with this many alternatives; None: off
    prompt_logprobs: bool = False  # score the prompt too: a Prompt event before the first token

    def problems(self, max_batch: int | None = None) -> list[tuple[str, str]]:
        """(field, why) for each setting out of range; ``max_batch``: the rows ``n`` may fill."""
        rules = [("max_tokens", self.max_tokens >= (0 if self.prompt_logprobs else 1),  # 0: the prompt scored only
                  "must not be negative" if self.prompt_logprobs else "must be at least 1"),
                 ("n", self.n >= 1, "must be at least 1"),
                 ("n", max_batch is None or self.n <= max_batch, f"must be at most {max_batch} (the rows a batch holds)"),
                 *((name, math.isfinite(value), "must be a finite number") for name, value in  # nan passes no test
                   (("temperature", self.temperature), ("top_p", self.top_p), ("length_penalty", self.length_penalty))),
                 ("temperature", math.isnan(self.temperature) or self.temperature >= 0, "must not be negative"),
                 ("top_p", math.isnan(self.top_p) or 0 < self.top_p <= 1, "must be in (0, 1]"),
                 ("top_k", self.top_k >= 0, "must not be negative"),
                 ("stop", all(self.stop), "must not be an empty string (it would match anywhere)"),
                 ("seed", self.seed is None or SEEDS[0] <= self.seed <= SEEDS[1],
                  f"must be in [{SEEDS[0]}, {SEEDS[1]}] (a signed 64-bit integer)"),
                 ("num_beams", self.num_beams >= 1, "must be at least 1"),
                 ("n", self.num_beams == 1 or self.n <= self.num_beams, "must not exceed num_beams"),
                 ("temperature", self.num_beams == 1 or self.temperature == 0, "beam search is not sampled: set 0"),
                 ("no_repeat_ngram_size", self.no_repeat_ngram_size >= 0, "must not be negative"),
                 ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                  f"must be in [0, {MAX_LOGPROBS}]"),
                 ("logprobs", self.num_beams == 1 or (self.logprobs is None and not self.prompt_logprobs),
                  "not with beam search (num_beams > 1)")]
        return [(name, why) for name, ok, why in rules if not ok]


@dataclass(frozen=True)
class Request:
    model: str  # the exact served version, e.g. "e2e-adapter@v0.0.1" or "base"
    prompt_ids: tuple[int, ...]
    decoding: Decoding = field(default_factory=Decoding)


@dataclass(frozen=True)
class Logprob:
    """A token's log-probability where it stands, and the ``top`` most likely tokens there
    (id, log-probability; most likely first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Token:
    """One more piece of choice ``index``'s text (``text`` may be empty while a multi-byte
    character is incomplete); ``logprob`` when the request asked for them."""

    index: int
    token_id: int
    text: str
    logprob: Logprob | None = None


@dataclass(frozen=True)
class Prompt:
    """The request's prompt scored (``Decoding.prompt_logprobs``), once, before any Token:
    each prompt token's Logprob given the tokens before it (and the adapter's virtual tokens);
    None for the first, as OpenAI's ``echo`` gives it (the base model has nothing before it)."""

    logprobs: tuple[Logprob | None, ...]


@dataclass(frozen=True)
class Finished:
    index: int
    reason: Literal["stop", "length", "cancelled", "error"]
    text: str  # the whole choice, stop sequence excluded
    completion_tokens: int
    error: str | None = None
    token_ids: tuple[int, ...] = ()  # the choice's generated ids (its EOS included): what "token-identical" compares
    logprobs: tuple[Logprob, ...] = ()  # each generated token's, where the request asked (Decoding.logprobs)
