"""``ptune serve``: the registry's versions behind an OpenAI-compatible HTTP API.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both streaming as
server-sent events with ``stream: true``), ``GET /v1/models``, ``GET /health``,
Prometheus ``GET /metrics``, and vLLM's ``GET /tokenizer_info``, ``POST /tokenize`` and
``POST /detokenize``. Names and prompt formats are serving.models'; decoding is the
engine's (serving.engine), the path ``evaluate`` scored with.

What a request may say beyond OpenAI's parameters (extensions, top level as vLLM takes
them): ``top_k``, ``num_beams``, ``length_penalty``, ``no_repeat_ngram_size``, and for
completions ``raw_prompt`` (the prompt is sent to the model as it is, no template). A
completion's ``prompt`` may be an object of the task's input fields, token ids (sent as they
are, no template), or a batch (a list of texts or of token id lists; its choices come prompt
by prompt, ``n`` each, all from one version). ``temperature`` defaults to 0 (greedy, what
``evaluate`` scored), not OpenAI's 1. ``logprobs`` (completions: how many alternatives;
chat: ``logprobs`` and ``top_logprobs``) are the model's own log-softmax, before sampling's
warpers; completions' ``echo`` with ``logprobs`` scores the prompt too, as
lm-evaluation-harness' ``local-completions`` asks for log-likelihoods. OpenAI parameters
ptune does not implement (penalties, logit_bias, best_of, suffix, tools) are refused by name
unless they hold their neutral value, never silently ignored.

Errors have OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``): 400
naming the field, 401 without the API key, 404 for a name that is not served (listing
those that are), 429 with ``Retry-After`` when the engine's queue is full.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anyio
import uvicorn
from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines import conversations
from pipelines.common import StageError
from serving.decoding import LogprobText
from serving.engine import BASE, Engine
from serving.models import BadRequest, Models, NotServable, Served
from serving.types import (DEFAULT_MAX_TOKENS, DRAIN_SECONDS, MAX_LOGPROBS, MAX_TOKENS_LIMIT, POLL_SECONDS, SEEDS,
                           Decoding, EngineClosed, Finished, Logprob, Prompt, QueueFull, Token, UnknownModel)

log = logging.getLogger("ptune.serve")

API_KEY_ENV = "PTUNE_API_KEY"
MAX_STOP = 4  # OpenAI's own bound on stop sequences
MAX_BODY = 1 << 20  # bytes; the largest context (8k tokens) is ~32 KB of text, so 1 MiB is generous
DISCONNECT_CHECK_S = 0.25  # how often a waiting (not streamed) answer asks whether its client left
RETRY_AFTER_S = 1  # a full queue drains by a batch every few steps; ask the client back soon
RATE_WINDOW_S = 10.0  # tokens/s is the rate over this window (Prometheus' rate() gives any other)
# Seconds; decode steps on CPU are tens of ms, a long answer tens of seconds.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
OPEN = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Limits:
    max_tokens: int = MAX_TOKENS_LIMIT  # the most a request may ask for; the engine also stops at the context
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    max_beams: int = 8  # beam search holds the running batch while it runs (serving.engine)


# -- request bodies -----------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Body(BaseModel):
    """Parameters common to both endpoints (OpenAI's names; extensions marked)."""

    # allow_inf_nan: Python's json reads NaN and Infinity, which pass no range check
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str = Field(min_length=1)
    max_tokens: int | None = None
    temperature: float = Field(0.0, ge=0, le=2)  # 0: greedy; OpenAI defaults to 1
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=SEEDS[0], le=SEEDS[1])  # a signed 64-bit integer, as vLLM
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # OpenAI's end-user id for abuse monitoring: accepted, unused
    top_k: int = Field(0, ge=0)  # extension
    num_beams: int = Field(1, ge=1)  # extension: > 1 is beam search
    length_penalty: float = 1.0  # extension (beam search)
    no_repeat_ngram_size: int = Field(0, ge=0)  # extension
    # OpenAI parameters not implemented: accepted at their neutral values only.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionBody(_Body):
    # One prompt (text, the task's fields, or token ids) or a batch of them (texts, fields or token id lists).
    prompt: str | dict[str, str | int] | list[int] | list[str] | list[list[int]] | list[dict[str, str | int]]
    raw_prompt: bool = False  # extension: the prompt is the model's input as it is
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # OpenAI allows 5; vLLM, as here, 20
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[TextPart]
    name: str | None = None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None


class TokenizeBody(BaseModel):
    """vLLM's ``POST /tokenize``: text as it is, or a conversation in the model's chat format."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = Field(None, min_length=1)  # messages: whose chat format (default base)
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    add_special_tokens: bool = True  # prompt only, as vLLM (ptune's tokenizers add none)


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = Field(None, min_length=1)
    tokens: list[int]


NEUTRAL = {"frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
           "best_of": (None, 1), "suffix": (None,), "tools": (None, []), "tool_choice": (None, "none"),
           "response_format": (None, {"type": "text"})}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}.get(self.status, "server_error")
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}},
                            self.status, headers=self.headers)


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*|dict\[.*|literal\[.*|function-.*)$", re.I)


def _param(loc: tuple) -> str:
    """A pydantic error location as the request's field path (``messages.0.content``),
    without the union-member tags pydantic inserts (``stop.list[str]``)."""
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and _UNION_TAG.match(p))) or "body"


def parse(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """The body as ``model``, or a 400 naming the first field that is wrong."""
    try:
        body = model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        if first["type"] in ("json_invalid", "json_type", "model_type") and not first["loc"]:
            raise ApiError(400, f"request body: not a JSON object ({first['msg']})", "body") from None
        param = _param(first["loc"])
        same = list(dict.fromkeys(e["msg"] for e in errors if _param(e["loc"]) == param))
        if first["type"] == "missing":
            message = f"{param}: missing; it is required"
        elif first["type"] == "extra_forbidden":
            message = f"{param}: not a parameter ptune serve accepts"
        else:
            message = f"{param}: " + " or ".join(m[0].lower() + m[1:] for m in same)
        raise ApiError(400, message, param) from None
    for name, neutral in NEUTRAL.items():
        value = getattr(body, name, None)
        if value not in neutral:
            raise ApiError(400, f"{name}: not supported by ptune serve (leave it out)", name)
    return body


def decoding(body: _Body, limits: Limits, engine: Engine) -> Decoding:
    asked = getattr(body, "max_completion_tokens", None)
    name = "max_completion_tokens" if asked is not None else "max_tokens"
    max_tokens = asked if asked is not None else body.max_tokens
    completion = isinstance(body, CompletionBody)
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    elif max_tokens == 0 and completion and not (body.echo and body.logprobs is not None):
        raise ApiError(400, f"{name}: 0 only with echo and logprobs (the prompt scored, nothing generated)", name)
    elif not (0 if completion else 1) <= max_tokens <= limits.max_tokens:
        raise ApiError(400, f"{name}: {max_tokens} is outside [1, {limits.max_tokens}] (this server's bound)", name)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > MAX_STOP or not all(stop):
        raise ApiError(400, f"stop: at most {MAX_STOP} sequences, none empty", "stop")
    if body.n > engine.max_batch:
        raise ApiError(400, f"n: {body.n} is more than the {engine.max_batch} rows a batch holds", "n")
    if body.num_beams > limits.max_beams:
        raise ApiError(400, f"num_beams: {body.num_beams} is more than this server's {limits.max_beams}", "num_beams")
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options: only with stream: true", "stream_options")
    if isinstance(body, ChatBody):
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs: only with logprobs: true", "top_logprobs")
        logprobs, scored = (body.top_logprobs or 0) if body.logprobs else None, False
    else:
        logprobs, scored = body.logprobs, body.echo and body.logprobs is not None
    return Decoding(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                    seed=body.seed, stop=stop, n=body.n, num_beams=body.num_beams,
                    length_penalty=body.length_penalty, no_repeat_ngram_size=body.no_repeat_ngram_size,
                    logprobs=logprobs, prompt_logprobs=scored)


def prompts(body: _Body) -> list:
    """A completion's prompts (a batch, or the one prompt); a chat's one conversation."""
    if isinstance(body, ChatBody):
        return [body.messages]
    if body.prompt == []:
        raise ApiError(400, "prompt: empty; send text, the task's fields, token ids, or a list of texts, of "
                            "fields or of token id lists", "prompt")
    batch = isinstance(body.prompt, list) and isinstance(body.prompt[0], (str, list, dict))
    return body.prompt if batch else [body.prompt]


def _text(content) -> str:
    return conversations.content_text(content if isinstance(content, str) else [p.model_dump() for p in content])


def _model_object(entry: dict, created: int) -> dict:
    """A served name as OpenAI's model object; what ptune knows of it under ``ptune``."""
    entry = dict(entry)
    return {"id": entry.pop("id"), "object": "model", "created": created, "owned_by": "ptune",
            "root": entry.pop("root"), "ptune": entry}


def _turns(messages: list[Message]) -> list[dict[str, str]]:
    """Messages as the chat template takes them (a developer message is the system turn)."""
    return [{"role": conversations.role_of(m.role), "content": _text(m.content)} for m in messages]


# -- metrics ------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics on a registry of their own (one per app: tests run several)."""

    def __init__(self, engine: Engine, models: Models):
        self.engine, self.models = engine, models
        self.registry = CollectorRegistry()
        self.requests = Counter("ptune_requests", "Requests answered, by endpoint, served version and status",
                                ["endpoint", "model", "status"], registry=self.registry)
        self.latency = Histogram("ptune_request_latency_seconds", "From request to its last token",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("ptune_time_to_first_token_seconds", "From request to its first generated token",
                              ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self._samples: deque[tuple[float, int]] = deque()
        self.registry.register(self)

    def sample(self) -> None:
        now, tokens = time.monotonic(), self.engine.stats().tokens_generated
        self._samples.append((now, tokens))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW_S:
            self._samples.popleft()

    def tokens_per_s(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def collect(self):
        """Read at each scrape: the engine's own counts, never a copy that could drift."""
        s = self.engine.stats()
        yield GaugeMetricFamily("ptune_queue_depth", "Requests waiting to join the running batch", value=s.waiting)
        yield GaugeMetricFamily("ptune_running_batch_size", "Rows (choices) decoding in the running batch",
                                value=s.running)
        yield CounterMetricFamily("ptune_generated_tokens", "Tokens generated since start", value=s.tokens_generated)
        yield CounterMetricFamily("ptune_prompt_tokens", "Prompt tokens prefilled since start (a request's once, "
                                  "whatever its n)", value=s.prompt_tokens)
        yield GaugeMetricFamily("ptune_generated_tokens_per_second",
                                f"Generated tokens per second over the last {RATE_WINDOW_S:.0f} s",
                                value=self.tokens_per_s())
        yield GaugeMetricFamily("ptune_loaded_models", "Versions loaded in the engine, base included",
                                value=s.adapters)
        yield CounterMetricFamily("ptune_prod_swaps", "Times a name moved to another prod version",
                                  value=self.models.swaps)
        served = GaugeMetricFamily("ptune_serving", "1 for the version each name serves now", labels=["name", "version"])
        for name, exact in sorted(self.models.aliases().items()):
            served.add_metric([name, exact], 1)
        yield served


# -- the app ------------------------------------------------------------------------


@dataclass(eq=False)
class _Part:
    """One prompt of a request: its engine request and what came back for it."""

    handle: object
    prompt_ids: tuple[int, ...]
    finished: dict[int, Finished] = field(default_factory=dict)
    scored: Prompt | None = None  # the prompt's log-probabilities (echo with logprobs)


class _Job:
    """One HTTP request in the engine (an engine request per prompt): its events, delivered
    from the engine's thread to the loop as (prompt index, event)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, started: float):
        self.loop, self.started = loop, started
        self.events: asyncio.Queue = asyncio.Queue()
        self.served: Served | None = None
        self.parts: list[_Part] = []
        self.first_token: float | None = None

    def listener(self, part: int):
        def on_event(event) -> None:
            # Raises once the loop is gone (server stopping): the engine then cancels the request.
            self.loop.call_soon_threadsafe(self.events.put_nowait, (part, event))
        return on_event

    @property
    def n(self) -> int:
        return self.parts[0].handle.request.decoding.n

    @property
    def wants_logprobs(self) -> bool:
        return self.parts[0].handle.request.decoding.logprobs is not None

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.prompt_ids) for p in self.parts)

    def open(self) -> bool:
        return any(len(p.finished) < self.n for p in self.parts)

    def finished(self) -> list[Finished]:
        return [f for p in self.parts for f in p.finished.values()]

    def cancel(self, engine: Engine) -> None:
        for p in self.parts:
            if len(p.finished) < self.n:
                engine.cancel(p.handle)

    def take(self, part: int, event) -> None:
        """Keep what a response is made of: the prompt's scores and each choice's end (its
        text, tokens and their log-probabilities)."""
        p = self.parts[part]
        if isinstance(event, Prompt):
            p.scored = event
        elif isinstance(event, Finished):
            p.finished[event.index] = event


class _EventStream(StreamingResponse):
    """Server-sent events whose request leaves the engine however the response ends: a
    client that disconnects cancels the body's task, which may never resume the generator."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def create_app(models: Models, *, api_key: str | None = None, limits: Limits = Limits(),
               poll_seconds: float | None = POLL_SECONDS) -> FastAPI:
    """The HTTP app over ``models`` (and its engine, which must be started). ``poll_seconds``:
    how often the registry is re-read (None: never, for tests that refresh by hand)."""
    engine = models.engine
    metrics = Metrics(engine, models)
    logprobs = LogprobText(engine.tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if poll_seconds:
            models.watch(poll_seconds)

        async def sampler():
            while True:
                metrics.sample()
                await asyncio.sleep(1.0)

        task = asyncio.create_task(sampler())
        try:
            yield
        finally:
            task.cancel()
            models.close()

    app = FastAPI(title="ptune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.models, app.state.metrics = models, metrics

    if api_key:
        app.add_middleware(_Authorize, key=api_key)

    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def no_route(request: HttpRequest, exc: StarletteHTTPException):
        """A path or method the server has not: OpenAI's error shape, as its API answers it."""
        message = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code in (404, 405) else exc.detail
        return ApiError(exc.status_code, message, headers=exc.headers).response()

    @app.get("/health")
    async def health():
        s = engine.stats()
        return {"status": "ok", "models": models.aliases(), "waiting": s.waiting, "running": s.running,
                "not_servable": models.failures()}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # vLLM's tokenizer routes: every served version shares the base model's tokenizer (a
    # version trained on another base is not served), so a client such as lm-evaluation-harness
    # (``tokenizer_backend=remote``, its default when these answer) needs no copy of it.
    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = engine.tokenizer
        return {"tokenizer_class": type(tok).__name__, "bos_token": tok.bos_token, "eos_token": tok.eos_token,
                "pad_token": tok.pad_token, "unk_token": tok.unk_token,
                "chat_template": getattr(tok, "chat_template", None),
                "model_max_length": engine.context or tok.model_max_length}

    async def served_for(name: str | None) -> Served:
        try:
            return await anyio.to_thread.run_sync(models.resolve, name or BASE)
        except UnknownModel as exc:
            raise ApiError(404, exc.args[0], "model", "model_not_found") from None
        except NotServable as exc:
            raise ApiError(404, f"model {name!r} is registered but cannot be served here: {exc}",
                           "model", "model_not_servable") from None

    @app.post("/tokenize")
    async def tokenize(request: HttpRequest):
        body = parse(await read_body(request), TokenizeBody)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "prompt or messages: send exactly one", "prompt")
        served = await served_for(body.model)
        if body.messages is not None:
            try:
                ids = engine.encode(served.format_chat(_turns(body.messages), engine.tokenizer))
            except BadRequest as exc:
                raise ApiError(400, str(exc), exc.param) from None
        else:
            ids = engine.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens).input_ids
        return {"count": len(ids), "max_model_len": engine.context, "tokens": list(ids)}

    @app.post("/detokenize")
    async def detokenize(request: HttpRequest):
        body = parse(await read_body(request), DetokenizeBody)
        await served_for(body.model)
        if not all(0 <= t < engine.vocab for t in body.tokens):
            raise ApiError(400, f"tokens: ids must be in [0, {engine.vocab})", "tokens")
        return {"prompt": engine.tokenizer.decode(body.tokens)}

    @app.get("/v1/models")
    async def list_models():
        created = int(time.time())
        return {"object": "list", "data": [_model_object(m, created) for m in models.served()]}

    @app.get("/v1/models/{name:path}")
    async def retrieve_model(name: str):
        """OpenAI's retrieve: one entry of the list, by any name the list holds (nothing is loaded)."""
        entry = next((m for m in models.served() if m["id"] == name), None)
        if entry is None:
            raise ApiError(404, models.not_served(name), "model", "model_not_found")
        return _model_object(entry, int(time.time()))

    async def start(request: HttpRequest, body: _Body, endpoint: str) -> _Job:
        dec = decoding(body, limits, engine)
        inputs = prompts(body)
        if len(inputs) > engine.max_queue:
            raise ApiError(400, f"prompt: {len(inputs)} prompts are more than this server queues ({engine.max_queue})",
                           "prompt")
        job = _Job(asyncio.get_running_loop(), time.monotonic())
        chat = endpoint == "chat"

        def build(prompt):
            def build(served: Served):
                if chat:
                    text = served.format_chat(_turns(prompt), engine.tokenizer)
                elif isinstance(prompt, list):  # token ids: the model's input as it is
                    return tuple(prompt), dec
                elif isinstance(prompt, dict):
                    text = served.format_fields(prompt)
                elif body.raw_prompt:
                    text = prompt
                else:
                    text = served.format_text(prompt)
                return engine.encode(text), dec
            return build

        def param(name: str, index: int) -> str:  # a batch's prompt is named by its place: prompt.3
            if len(inputs) > 1 and name.split(".")[0] == "prompt":
                return f"prompt.{index}" + name[len("prompt"):]
            return name

        try:
            for i, prompt in enumerate(inputs):
                # A batch's later prompts go to the exact version the first resolved to,
                # so a promotion in between cannot split one request over two versions.
                name = job.served.name if job.served else body.model
                try:
                    served, request_, handle = await anyio.to_thread.run_sync(
                        models.submit, name, build(prompt), job.listener(i))
                except BadRequest as exc:
                    p = param(exc.param, i)
                    raise ApiError(400, str(exc).replace(exc.param, p, 1), p) from None
                except ValueError as exc:  # the engine's checks: "<field>: <why>"
                    field_, _, why = str(exc).partition(": ")
                    field_ = param({"prompt_ids": "messages" if chat else "prompt"}.get(field_, field_), i)
                    raise ApiError(400, f"{field_}: {why}", field_) from None
                job.served = job.served or served
                job.parts.append(_Part(handle, request_.prompt_ids))
        except UnknownModel as exc:
            raise ApiError(404, exc.args[0], "model", "model_not_found") from None
        except NotServable as exc:
            raise ApiError(404, f"model {body.model!r} is registered but cannot be served here: {exc}",
                           "model", "model_not_servable") from None
        except QueueFull as exc:
            raise ApiError(429, f"the queue is full: {exc}; retry after {RETRY_AFTER_S} s",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineClosed:
            raise ApiError(503, "the server is shutting down", code="shutting_down") from None
        finally:
            if len(job.parts) < len(inputs):  # refused part-way: what went in comes out
                job.cancel(engine)
        return job

    def record(job: _Job | None, endpoint: str, status: str) -> None:
        model = job.served.name if job and job.served else "-"  # never a client's string: bounded labels
        metrics.requests.labels(endpoint, model, status).inc()
        if job is not None and status == "ok":
            metrics.latency.labels(endpoint).observe(time.monotonic() - job.started)

    def saw_token(job: _Job, endpoint: str) -> None:
        if job.first_token is None:
            job.first_token = time.monotonic()
            metrics.ttft.labels(endpoint).observe(job.first_token - job.started)

    def usage(job: _Job) -> dict:
        completion = sum(f.completion_tokens for f in job.finished())
        return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
                "total_tokens": job.prompt_tokens + completion}

    def failed(f: Finished) -> ApiError | None:
        if f.reason == "error":
            return ApiError(500, f"decoding failed: {f.error}", code="engine_error")
        if f.reason == "cancelled":
            return ApiError(503, "the server is shutting down; the request was not finished", code="cancelled")
        return None

    async def collect(request: HttpRequest, job: _Job, endpoint: str) -> bool:
        """Wait for every choice; False if the client went away (its request is cancelled)."""
        look = time.monotonic() + DISCONNECT_CHECK_S
        while job.open():
            try:
                part, event = await asyncio.wait_for(job.events.get(), DISCONNECT_CHECK_S)
            except TimeoutError:
                part = event = None
            if time.monotonic() >= look:  # tokens may arrive without pause: look on a clock
                look = time.monotonic() + DISCONNECT_CHECK_S
                if await request.is_disconnected():
                    job.cancel(engine)
                    return False
            if event is None:
                continue
            if isinstance(event, Token):
                saw_token(job, endpoint)
            job.take(part, event)
        return True

    def echoed(part: _Part) -> str:
        return engine.tokenizer.decode(part.prompt_ids)

    async def run(request: HttpRequest, schema: type[_Body], endpoint: str):
        try:
            body = parse(await read_body(request), schema)
            job = await start(request, body, endpoint)
        except ApiError as exc:
            record(None, endpoint, str(exc.status))
            raise
        ident = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex
        head = {"id": ident, "created": int(time.time()), "model": job.served.name,
                "system_fingerprint": job.served.commit[:12] if job.served.commit else None}
        if body.stream:
            return _EventStream(stream(job, body, endpoint, head), lambda: job.cancel(engine))
        if not await collect(request, job, endpoint):
            record(job, endpoint, "disconnected")
            return Response(status_code=499)  # nobody reads it; nginx's code for a client that left
        for f in job.finished():
            if err := failed(f):
                record(job, endpoint, str(err.status))
                raise err
        choices, wants = [], job.wants_logprobs
        for p, part in enumerate(job.parts):
            for i in sorted(part.finished):
                f, index = part.finished[i], p * job.n + i
                generated = list(f.logprobs)
                if endpoint == "chat":
                    choices.append({"index": index, "message": {"role": "assistant", "content": f.text},
                                    "finish_reason": f.reason, "logprobs": logprobs.chat(generated) if wants else None})
                    continue
                echo = echoed(part) if body.echo else ""
                entries = [(lp.token_id, lp) for lp in generated]
                if body.echo and part.scored:
                    entries = list(zip(part.prompt_ids, part.scored.logprobs)) + entries
                choices.append({"index": index, "text": echo + f.text, "finish_reason": f.reason,
                                "logprobs": logprobs.completion(entries) if wants else None})
        record(job, endpoint, "ok")
        return {**head, "object": "chat.completion" if endpoint == "chat" else "text_completion",
                "choices": choices, "usage": usage(job)}

    async def stream(job: _Job, body: _Body, endpoint: str, head: dict):
        chat = endpoint == "chat"
        kind = "chat.completion.chunk" if chat else "text_completion"
        n, wants = job.n, job.wants_logprobs
        sent = {(p, i): "" for p in range(len(job.parts)) for i in range(n)}  # generated text streamed
        offset = dict.fromkeys(sent, 0)  # completions' text_offset: characters streamed, echo included
        status = "disconnected"

        def chunk(key: tuple[int, int], text: str | None, reason: str | None, first: bool = False,
                  entries: list[tuple[int, Logprob | None]] = ()) -> str:
            index = key[0] * n + key[1]
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                lp = logprobs.chat([e for _, e in entries]) if wants and entries else None
                choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": lp}
            else:
                lp = logprobs.completion(list(entries), offset[key]) if wants and entries else None
                choice = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": lp}
                offset[key] += len(text or "")
            return _sse({**head, "object": kind, "choices": [choice]})

        try:
            if chat:
                for key in sent:
                    yield chunk(key, None, None, first=True)
            elif body.echo and not wants:
                for key in sent:
                    yield chunk(key, echoed(job.parts[key[0]]), None)
            while job.open():
                p, event = await job.events.get()
                job.take(p, event)
                if isinstance(event, Prompt):  # echo with logprobs: the prompt first, scored
                    for i in range(n):
                        yield chunk((p, i), echoed(job.parts[p]), None,
                                    entries=list(zip(job.parts[p].prompt_ids, event.logprobs)))
                    continue
                key = (p, event.index)
                if isinstance(event, Token):
                    saw_token(job, endpoint)
                    if event.text or event.logprob is not None:
                        sent[key] += event.text
                        yield chunk(key, event.text, None,
                                    entries=[(event.token_id, event.logprob)] if event.logprob else ())
                    continue
                if err := failed(event):
                    status = str(err.status)
                    yield _sse({"error": {"message": err.message, "type": "server_error", "param": None,
                                          "code": err.code}})
                    return
                # The streamed pieces add up to the final text (serving.decoding); a tail the
                # engine held back and never released is sent here rather than lost.
                rest = event.text[len(sent[key]):] if event.text.startswith(sent[key]) else ""
                yield chunk(key, rest or None, event.reason)
            if body.stream_options and body.stream_options.include_usage:
                yield _sse({**head, "object": kind, "choices": [], "usage": usage(job)})
            yield "data: [DONE]\n\n"
            status = "ok"
        finally:
            job.cancel(engine)
            record(job, endpoint, status)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await run(request, CompletionBody, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await run(request, ChatBody, "chat")

    return app


class _Authorize:
    """Every route but /health needs ``Authorization: Bearer <key>``. Plain ASGI, not
    Starlette's BaseHTTPMiddleware, which wraps the response stream and ``receive``, which
    a streamed answer and disconnect detection rely on."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":  # health answers probes, and names nothing
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                error = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <PTUNE_API_KEY>'",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def read_body(request: HttpRequest) -> bytes:
    """The body, refused past MAX_BODY before it is all read (uvicorn sets no bound)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, f"request body: more than {MAX_BODY} bytes", "body", "body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# -- ptune serve ----------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host in OPEN:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _check_port(host: str, port: int) -> None:
    """A taken port, said in one line before the model loads (uvicorn would say it after)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise StageError(f"{host}:{port}: cannot listen there ({exc.strerror}); pass another --port "
                             "or --host") from None


def api_key_for(host: str) -> str | None:
    """PTUNE_API_KEY; required when ``host`` reaches beyond this machine."""
    key = os.environ.get(API_KEY_ENV) or None
    if key is None and not is_loopback(host):
        raise StageError(f"--host {host} serves beyond this machine, and then an API key is required: set "
                         f"{API_KEY_ENV} (clients send 'Authorization: Bearer <key>'), or bind 127.0.0.1")
    return key


class _DrainingServer(uvicorn.Server):
    """uvicorn's server with a bounded drain. On SIGTERM or Ctrl-C uvicorn stops accepting
    and waits for the requests in flight, without a bound by default: a long generation (or a
    full queue of them) held the process until an orchestrator's SIGKILL dropped every
    connection unanswered. Here, ``drain`` seconds into that wait, what is still waiting or
    running in the engine is cancelled: each such request answers 503 (a stream ends with an
    error event), which a client can retry elsewhere, and the process exits."""

    def __init__(self, config: uvicorn.Config, engine: Engine, drain: float):
        super().__init__(config)
        self.engine, self.drain = engine, drain

    async def shutdown(self, sockets=None) -> None:
        cut = threading.Thread(target=self._cut, name="ptune-drain", daemon=True)  # close() joins the engine's thread
        timer = asyncio.get_running_loop().call_later(self.drain, cut.start)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def _cut(self) -> None:
        left = self.engine.stats()
        if left.waiting or left.running:
            log.warning("shutting down: %d request(s) waiting and %d row(s) running after %g s end with 503",
                        left.waiting, left.running, self.drain)
        self.engine.close()


def serve(repo: Path, base: Path, host: str, port: int, *, max_batch: int, max_queue: int, limits: Limits,
          max_versions: int, poll_seconds: float, prefill_tokens: int | None = None,
          dtype: str | None = None, drain_seconds: float = DRAIN_SECONDS) -> None:
    """Load the base model and every prod version, then serve until Ctrl-C or SIGTERM (then
    requests in flight have ``drain_seconds`` to finish; what is left answers 503)."""
    import torch

    key = api_key_for(host)
    _check_port(host, port)
    engine = Engine(base, max_batch=max_batch, max_queue=max_queue, prefill_tokens=prefill_tokens,
                    dtype=getattr(torch, dtype) if dtype else None).start()
    models = Models(engine, repo, base, max_versions=max_versions)
    try:
        for failure in models.refresh():
            log.error("%s", failure)
        served = [m["id"] for m in models.served() if m["loaded"]]
        where = f"[{host}]" if ":" in host else host
        print(f"ptune serve: http://{where}:{port}/v1 serving {', '.join(served)} from {models.repo} "
              f"(any registered <artifact>@<version> on request; the registry is re-read every {poll_seconds:g} s); "
              f"{str(engine.dtype).removeprefix('torch.')} on {engine.device}")
        print("ptune serve: " + (f"API key required (Authorization: Bearer ${API_KEY_ENV})" if key else
                                 "no API key (loopback only; set PTUNE_API_KEY to require one)"), flush=True)
        app = create_app(models, api_key=key, limits=limits, poll_seconds=poll_seconds)
        try:
            # uvicorn's own bound is a fallback, past ours: it cancels handlers, whose clients get no answer
            config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                    timeout_graceful_shutdown=drain_seconds + 15)
            _DrainingServer(config, engine, drain_seconds).run()
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it has already shut down gracefully for
            print("ptune serve: stopped", flush=True)
    finally:
        models.close()
        engine.close()
