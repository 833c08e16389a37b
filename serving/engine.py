"""The decoding engine: one base model, many adapters, every request in one running batch.

``evaluate``, ``ptune generate`` and ``ptune serve`` all decode here, so a served greedy
answer is the one ``evaluate`` scored, by construction: the same prefill, the same steps,
the same arg-max. What can still differ is float rounding from a batch's shape (which rows
share a step, how much left padding they carry). Measured on the embedded SmolLM2-135M
(CPU, fp32): a mixed batch over base, LoRA, prefix, prompt and P-tuning answered each row as
alone (20 of 20), and per method 32-48 E2E rows matched the fixed-batch ``generate``
decoding evaluate used before (all of them). In bf16 on a GPU rounding is coarser and a
near-tie can flip (not measured); tests/test_engine.py checks equality on a tiny model.

A step (``Engine.step``): cancelled rows leave; waiting requests are admitted while their
rows fit in ``max_batch``; admitted requests are prefilled (their virtual tokens placed,
the first token picked), oldest first, up to ``prefill_tokens`` padded tokens a step, and
join their weight group's batch; then one forward per group decodes every running row by
one token; finished rows leave at once. What is admitted but not yet prefilled waits for
a later step, so a burst of long prompts delays the running rows by one bounded prefill a
step instead of by all of them (vLLM's ``max_num_batched_tokens`` budget, at the grain of
whole rows: see ``_prefill_some``).
A request that asks for log-probabilities gets each picked token's (and its top
alternatives') from the logits the pick was made from; one that asks for its prompt scored
(``prompt_logprobs``: completions' ``echo``) prefills keeping every position's logits, in
forwards of its own bounded by ``SCORE_LOGITS_BYTES``, and gets a Prompt event first.
Rows of every method share the base group's forward: a soft prompt or a prefix matters
only at prefill (serving.batch), LoRA rows pick their adapter with PEFT's ``adapter_names``.
A fully fine-tuned version is other weights and steps as a group of its own.
Beam search (``num_beams`` > 1) runs outside the batch, grouped per adapter, through
transformers' ``generate`` with the same placement of virtual tokens (serving.beams),
between two steps; it holds the batch for that long.

Written here by hand, and why: transformers' continuous batching
(``transformers.generation.continuous_batching``, 5.25) takes token ids only
(``add_request(input_ids)``: no input embeddings, so no soft prompt), packs all requests
into one ``[1, tokens]`` sequence over its own paged cache (so PEFT's per-row
``adapter_names`` has no rows to split, and a prefix has no cache to be written into), and
samples with one generator for the whole batch (no per-request seed). So the loop here
keeps a left-padded, preallocated cache per group instead (``serving.batch``). What is not
written here: the model forward and its caches, the LoRA mixing (PEFT), the logits warpers and beam search
(transformers).

Threads: ``start()`` runs steps on a background thread; without it, ``generate`` runs them
in the caller's thread (``evaluate`` does). ``on_event`` is called on the stepping thread and
must not block; an exception from it cancels its request (a client that went away).
Once started, every torch computation of the engine runs on that one thread: ``add`` and
``remove`` from other threads (the server's registry poll) hand their work to it, run
between two steps. On CPU this is a matter of speed, not only of order: with torch's
OpenMP, a second thread that enters parallel regions makes a second thread team, and the
two teams slow each other down for the rest of the process (measured on 2 cores: a
576x1536 linear of 16 rows took 280 us on one thread, 390-435 us on either of two; the
served throughput fell by a third when adapters were loaded on the poll thread). Why: once
libgomp manages more threads than there are CPUs it cuts its workers' spinning to ~100
iterations, so every parallel region wakes them through the kernel (as under
``OMP_WAIT_POLICY=PASSIVE``). The same holds for torch work the embedding process did on
its own threads before ``start()``: one 2000x2000 matmul on the main thread took a started
engine from 110.6 to 67.2 tokens/s (16 clients, 2 cores). A process that steps on a
started engine should leave its torch work to it (``benchmarks/gpu_serve.py`` builds its
models in a child process).
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from pipelines.base_model import load_model, load_tokenizer
from serving import adapters, beams
from serving.adapters import Adapter, Group
from serving.batch import Batch
from serving.decoding import Choice, logprobs_of, new_choice, pick_all, scored
from serving.types import Decoding, EngineClosed, Finished, Logprob, Prompt, QueueFull, Request, Token, UnknownModel

log = logging.getLogger(__name__)

BASE = "base"  # the served name of the bare base model
Event = Token | Finished | Prompt
# A prompt scored in full (``prompt_logprobs``) needs the logits at every position, not at the
# last only: [rows, width, vocab] floats. Such rows prefill in forwards of at most this many
# bytes of logits (1,365 padded tokens for SmolLM2's 49,152-token vocabulary in float32); a
# longer row goes alone.
SCORE_LOGITS_BYTES = 256 << 20


@dataclass(frozen=True)
class Stats:
    waiting: int  # requests without their first token yet (queued, or admitted and waiting to prefill)
    running: int  # rows (choices) in the running batches
    tokens_generated: int  # since start
    requests_finished: int
    adapters: int  # served names, base included
    prompt_tokens: int = 0  # prompt tokens prefilled since start (a request's once, whatever its n)


@dataclass(eq=False)
class Handle:
    """A submitted request; pass it to ``Engine.cancel``. ``done`` is set once every choice has finished."""

    id: int
    request: Request
    adapter: Adapter
    on_event: Callable[[Event], None]
    open: int  # choices not yet finished
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class Engine:
    def __init__(self, base: Path, *, max_batch: int = 32, max_queue: int = 256,
                 device: str | None = None, dtype: torch.dtype | None = None, bounded_context: bool = True,
                 prefill_tokens: int | None = None):
        """Load the base model at ``base`` once. ``max_batch``: rows (choices) decoding at once;
        ``max_queue``: requests waiting beyond them before ``submit`` raises QueueFull.
        ``prefill_tokens``: padded tokens a step prefills at most, a forward or several (a
        longer row goes alone); None: 2048 on CPU, 8192 on CUDA (``_prefill_parts``,
        ``_prefill_some``).
        Device and dtype: CUDA and bf16 where there is a GPU, else CPU and fp32 (as ``evaluate``
        decodes); a ``dtype`` given alone applies on the device chosen.
        ``bounded_context``: a row (virtual tokens, prompt, answer) stays within the model's
        ``max_position_embeddings``; False lets it run past, rotary positions extrapolating,
        as transformers' ``generate`` does (evaluate scores every row, as it always has)."""
        if prefill_tokens is not None and prefill_tokens < 1:
            raise ValueError(f"prefill_tokens: {prefill_tokens} must be at least 1")
        if device is None:
            from pipelines.device import device_and_dtype

            device, default = device_and_dtype()
            dtype = dtype or default
        self.tokenizer = load_tokenizer(base)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = load_model(base, dtype or torch.float32).to(device).eval().requires_grad_(False)
        self.device, self.dtype = model.device, model.dtype
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_tokens = prefill_tokens or (8192 if self.device.type == "cuda" else 2048)
        self.context = model.config.max_position_embeddings if bounded_context else None
        self.vocab = model.get_input_embeddings().num_embeddings
        self._score_tokens = max(1, SCORE_LOGITS_BYTES // (self.vocab * 4))
        eos = model.generation_config.eos_token_id
        self.eos = sorted({self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None})
        self._base = Group(model)
        self._served: dict[str, Adapter] = {BASE: Adapter(BASE, "base", self._base)}
        self._retired: list[Adapter] = []
        self._waiting: deque[Handle] = deque()
        self._prefilling: list[Handle] = []  # admitted (their rows counted), not yet prefilled
        self._batches: dict[Group, Batch] = {}
        self._lock = threading.Lock()  # the queue, the served names, the counters: held briefly
        self._step_lock = threading.Lock()  # one step at a time, whoever runs it
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._jobs: queue.SimpleQueue[tuple[Callable[[], object], Future]] = queue.SimpleQueue()
        self._closed = False
        self._ids = itertools.count()
        self._tokens = self._finished = self._running = self._prompt_tokens = 0

    # -- adapters -------------------------------------------------------------------

    def add(self, name: str, adapter_dir: Path) -> None:
        """Serve ``adapter_dir`` as ``name`` from the next step on; a version already served
        under ``name`` finishes the requests it holds and is then freed."""
        if name == BASE:
            raise ValueError(f"{BASE!r} is the bare base model; serve adapters under other names")
        adapter = self._on_engine_thread(lambda: adapters.load(name, adapter_dir, self._base))
        with self._lock:
            old = self._served.get(name)
            self._served[name] = adapter
        if old is not None:
            self._retire(old)

    def remove(self, name: str) -> None:
        """Stop serving ``name``; its requests in flight finish with it."""
        with self._lock:
            if name == BASE or name not in self._served:
                raise UnknownModel(name)
            adapter = self._served.pop(name)
        self._retire(adapter)

    def models(self) -> dict[str, str]:
        """Served name -> method (base, prompt, ptuning, prefix, lora, full)."""
        with self._lock:
            return {name: a.method for name, a in self._served.items()}

    def _retire(self, adapter: Adapter) -> None:
        with self._lock:
            self._retired.append(adapter)
        self._on_engine_thread(self._free_retired)

    def _on_engine_thread(self, work: Callable[[], object]):
        """``work()``, on the stepping thread once it runs (between two steps), else here."""
        if self._thread is None or threading.current_thread() is self._thread:
            return work()
        done: Future = Future()
        with self._lock:  # close() drains what was put before it set _closed
            if self._closed:
                raise EngineClosed("the engine is closed")
            self._jobs.put((work, done))
        self._wake.set()
        return done.result()

    def _run_jobs(self) -> None:
        while True:
            try:
                work, done = self._jobs.get_nowait()
            except queue.Empty:
                return
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(work())
                except BaseException as exc:  # handed to the caller waiting on it
                    done.set_exception(exc)

    def _free_retired(self) -> None:
        with self._lock:
            idle = [a for a in self._retired if a.users == 0]
            self._retired = [a for a in self._retired if a.users > 0]
        for a in idle:
            if a.method == "lora":
                a.group.drop_lora(a.lora)
            # other methods hold only tensors or their own group, freed with the record

    # -- requests -------------------------------------------------------------------

    def encode(self, text: str) -> tuple[int, ...]:
        """A formatted prompt's ids, as ``tokenize`` wrote training sources (no special tokens added)."""
        return tuple(self.tokenizer(text, add_special_tokens=False).input_ids)

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> Handle:
        """Queue ``request``; ``on_event`` gets a Token per generated token and a Finished per choice.
        Raises UnknownModel, QueueFull, or ValueError naming a field that is out of range."""
        self._check(request)
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is closed")
            adapter = self._served.get(request.model)
            if adapter is None:
                raise UnknownModel(request.model)
            if self.context and len(request.prompt_ids) + adapter.virtual_tokens >= self.context:
                raise ValueError(f"prompt_ids: {len(request.prompt_ids)} tokens (+{adapter.virtual_tokens} virtual) "
                                 f"leave no room in the model's context of {self.context}")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests waiting (max_queue {self.max_queue})")
            adapter.users += 1
            handle = Handle(next(self._ids), request, adapter, on_event, request.decoding.n)
            self._waiting.append(handle)
        self._wake.set()
        return handle

    def cancel(self, handle: Handle) -> None:
        """Drop a request; its rows leave the batch at the next step (each choice: Finished "cancelled")."""
        handle.cancelled = True
        self._wake.set()

    def stats(self) -> Stats:
        with self._lock:
            return Stats(len(self._waiting) + len(self._prefilling), self._running, self._tokens, self._finished,
                         len(self._served), self._prompt_tokens)

    def generate(self, requests: Iterable[Request]) -> list[list[Finished]]:
        """Decode ``requests`` to the end -> for each, its choices in index order. Steps in the
        caller's thread unless ``start()`` was called; submits as the queue has room."""
        return [choices for choices, _ in self._drive(list(requests))]

    def score(self, model: str, sequences: Iterable[tuple[int, ...]]) -> list[tuple[Logprob | None, ...]]:
        """Each sequence's tokens' log-probabilities under ``model``, each given the tokens
        before it (and the model's virtual tokens; None for the first): what a served
        completion with ``echo`` and ``logprobs`` answers, and how ``evaluate`` ranks a
        classification task's labels. Steps as ``generate`` does."""
        scoring = Decoding(max_tokens=0, logprobs=0, prompt_logprobs=True)
        out = []
        for (choice,), prompt in self._drive([Request(model, tuple(s), scoring) for s in sequences]):
            if prompt is None:
                raise RuntimeError(f"scoring failed: {choice.error or choice.reason}")
            out.append(prompt.logprobs)
        return out

    def _drive(self, requests: list[Request]) -> list[tuple[list[Finished], Prompt | None]]:
        """Run ``requests`` to the end -> for each, its choices and its Prompt (if it asked)."""
        results: list[list[Finished | None]] = [[None] * r.decoding.n for r in requests]
        prompts: list[Prompt | None] = [None] * len(requests)
        progress = threading.Event()

        def collector(i: int):
            def on_event(event: Event) -> None:
                if isinstance(event, Finished):
                    results[i][event.index] = event
                    progress.set()
                elif isinstance(event, Prompt):
                    prompts[i] = event
            return on_event

        pending, handles = deque(range(len(requests))), []
        try:
            while pending or not all(h.done.is_set() for h in handles):
                while pending:
                    try:
                        handles.append(self.submit(requests[pending[0]], collector(pending[0])))
                    except QueueFull:
                        break  # the rest go in as the queue drains
                    pending.popleft()
                if self._thread is None:
                    self.step()
                else:
                    progress.wait(0.1)
                    progress.clear()
        except BaseException:
            for h in handles:
                self.cancel(h)
            raise
        return list(zip(results, prompts))

    def _check(self, request: Request) -> None:
        rules = [("prompt_ids", len(request.prompt_ids) > 0, "must not be empty"),
                 ("prompt_ids", all(0 <= t < self.vocab for t in request.prompt_ids), f"ids must be in [0, {self.vocab})")]
        problems = [(name, why) for name, ok, why in rules if not ok] + request.decoding.problems(self.max_batch)
        if problems:
            raise ValueError("{}: {}".format(*problems[0]))

    # -- the loop -------------------------------------------------------------------

    def start(self) -> "Engine":
        """Run steps on a background thread from now on."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ptune-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop stepping; every request still waiting or running finishes "cancelled"."""
        with self._lock:
            self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self._run_jobs()  # handed over too late for the loop: run here, no one waits forever
        with self._step_lock, torch.inference_mode():  # the batches' tensors were made in inference mode
            with self._lock:
                running = (c.handle for b in self._batches.values() for c in b.choices)
                for h in [*self._waiting, *self._prefilling, *running]:
                    h.cancelled = True
            self._sweep()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _loop(self) -> None:
        while not self._closed:
            self._wake.clear()
            self._run_jobs()
            if not self.step():
                self._wake.wait(1.0)

    @torch.inference_mode()
    def step(self) -> bool:
        """One step of every running batch (new requests joining first). -> whether there was work."""
        with self._step_lock:
            self._sweep()
            admitted = self._admit()
            prefilled = self._prefill_some()
            for group, batch in list(self._batches.items()):
                self._run(group, batch.choices, lambda: self._decode(group, batch))
            with self._lock:
                self._running = sum(len(b) for b in self._batches.values())
            self._free_retired()
            return bool(admitted or prefilled or self._batches or self._prefilling)

    def _sweep(self) -> None:
        """Cancelled requests leave the queue, the admitted and the batches."""
        with self._lock:
            gone = [h for h in (*self._waiting, *self._prefilling) if h.cancelled]
            self._waiting = deque(h for h in self._waiting if not h.cancelled)
            self._prefilling = [h for h in self._prefilling if not h.cancelled]
        for h in gone:
            for index in range(h.request.decoding.n):
                self._finish_unstarted(h, index, "cancelled")
        for group, batch in list(self._batches.items()):
            keep = [i for i, c in enumerate(batch.choices) if not c.handle.cancelled]
            if len(keep) < len(batch):
                for c in batch.choices:
                    if c.handle.cancelled:
                        self._finish(c, "cancelled", None)
                self._keep(group, batch, keep)

    def _admit(self) -> list[Handle]:
        """Waiting requests, first come first served, while their choices fit in ``max_batch``
        (they prefill in this step or a later one); beam requests (which do not stay in the
        batch) up to ``max_batch`` per step, run now."""
        with self._lock:
            room = (self.max_batch - sum(len(b) for b in self._batches.values())
                    - sum(h.request.decoding.n for h in self._prefilling))
            loop, beam = [], []
            while self._waiting:
                h = self._waiting[0]
                if h.request.decoding.num_beams > 1 and len(beam) < self.max_batch:
                    beam.append(h)
                elif h.request.decoding.num_beams == 1 and h.request.decoding.n <= room:
                    loop.append(h)
                    room -= h.request.decoding.n
                else:
                    break
                self._waiting.popleft()
            self._prefilling += loop
        self._beams(beam)
        return loop + beam

    def _prefill_some(self) -> list[Handle]:
        """Prefill admitted requests, oldest first, in forwards of like rows, while the step's
        padded tokens stay within ``prefill_tokens`` (the first forward always runs). -> those
        prefilled.

        Why a budget per step: decode rows wait while a prefill runs. Prefilling everything
        admitted in one step made a running row wait for all of it: 16 k-shot prompts of
        ~1,100 tokens held every running row ~36 s on 2 CPU cores (benchmarks/RESULTS.md).
        Why whole rows, not slices of a long row across steps (vLLM's chunked prefill): on CPU
        a 5,775-token row took 22.3 s in slices of 2048 against 19.2 s in one forward, and more
        memory, so a row longer than the budget still prefills in one step, alone. Oldest
        first, not shortest first, so short prompts arriving all the time cannot starve a long one."""
        with self._lock:
            pending = list(self._prefilling)
        parts = []
        for group in dict.fromkeys(h.adapter.group for h in pending):
            mine = [h for h in pending if h.adapter.group is group]
            # A soft prompt enters as embeddings; other rows as ids, as generate feeds them
            # (a LoRA on the embedding layer acts on ids only). A prompt to be scored keeps
            # the logits of every position: those rows go in forwards of their own, bounded.
            for soft in (False, True):
                for score in (False, True):
                    kind = [h for h in mine if (h.adapter.soft_prompt is not None) == soft
                            and h.request.decoding.prompt_logprobs == score]
                    bound = min(self.prefill_tokens, self._score_tokens) if score else self.prefill_tokens
                    parts += [(group, part, score) for part in self._prefill_parts(kind, bound)]
        parts.sort(key=lambda gp: min(h.id for h in gp[1]))
        done, budget = [], self.prefill_tokens
        for group, part, score in parts:
            cost = len(part) * max(map(_width, part))
            if done and cost > budget:
                break
            budget -= cost
            with self._lock:
                self._prefilling = [h for h in self._prefilling if h not in part]
            self._run(group, part, lambda: self._prefill(group, part, score))
            done += part
        return done

    def _prefill_parts(self, handles: list[Handle], bound: int) -> list[list[Handle]]:
        """``handles`` in prefill forwards of at most ``bound`` padded tokens each, rows
        of like length together (shortest first), a row longer than the bound alone.

        Why bound a prefill: attention over a left-padded batch is computed at the padded
        width, and on CPU sdpa with a mask materializes ``[rows, heads, width, width]`` scores:
        16 k-shot rows of ~1,100 tokens made 700 MB per layer, and the forward spent more
        time allocating than computing. Measured on 2 cores with the embedded model (16 such
        rows, the whole prefill): 55 s as one forward, 52 s in forwards of 8 rows, 42 s of 4,
        38 s of 2 or of 1; short prompts (E2E's ~40 tokens) still go in one forward of up to
        50 rows. The CUDA default is a guess at where a GPU's prefill is compute-bound, not a
        measurement. ``_prefill_some`` picks which parts run in a step."""
        parts: list[list[Handle]] = []
        for h in sorted(handles, key=_width):
            if parts and (len(parts[-1]) + 1) * _width(h) <= bound:
                parts[-1].append(h)
            else:
                parts.append([h])
        return parts

    def _run(self, group: Group, rows: list, work: Callable[[], None]) -> None:
        """``work`` on ``rows`` (choices or handles); if it fails, they finish "error" and the rest go on."""
        try:
            work()
        except Exception as exc:  # a bad row must not stop the engine: its requests end with the error
            log.exception("engine: a step of %d rows failed", len(rows))
            message = f"{type(exc).__name__}: {exc}"
            for r in rows:
                if isinstance(r, Choice):
                    self._finish(r, "error", None, message)
                else:
                    for index in range(r.request.decoding.n):
                        self._finish_unstarted(r, index, "error", message)
            batch = self._batches.get(group)
            if batch is not None and any(isinstance(r, Choice) for r in rows):
                self._keep(group, batch, [i for i, c in enumerate(batch.choices) if c not in rows])

    def _prefill(self, group: Group, handles: list[Handle], score: bool = False) -> None:
        """Prefill ``handles`` and pick each choice's first token; with ``score``, emit each
        request's Prompt first (its logits at every position: logits_to_keep=0). A request
        for no tokens (``max_tokens`` 0: its prompt scored only) ends here, keeping no row."""
        inputs, mask = self._prefill_inputs(group, handles)
        self._count_prompts(handles)
        out = group.forward([h.adapter.lora for h in handles], attention_mask=mask, use_cache=True,
                            logits_to_keep=0 if score else 1, **inputs)
        if score:
            width = out.logits.shape[1]
            for i, h in enumerate(handles):
                ids = list(h.request.prompt_ids)
                # Position j's logits predict token j + 1; the prompt ends the row.
                rows = out.logits[i, width - len(ids):width - 1]
                found = logprobs_of(rows, ids[1:], [h.request.decoding.logprobs or 0] * (len(ids) - 1)) if rows.numel() else []
                self._emit(h, Prompt((None, *found)))
        for h in handles:
            if h.request.decoding.max_tokens == 0:
                for index in range(h.request.decoding.n):
                    self._finish_unstarted(h, index, "length")
        counts = [h.request.decoding.n if h.request.decoding.max_tokens else 0 for h in handles]
        if not any(counts):
            return
        batch = Batch([new_choice(h, i, self.tokenizer, self.device) for h, n in zip(handles, counts) for i in range(n)],
                      out.cache, mask, repeat=counts, max_rows=self.max_batch)
        logits = out.logits[:, -1].repeat_interleave(torch.tensor(counts, device=self.device), dim=0)
        picked = pick_all(batch.choices, logits)
        keep = self._advance(batch.choices, picked, scored(batch.choices, logits, picked))
        if keep:  # every row may end at its first token (max_tokens=1, an EOS, a stop)
            batch.keep(keep)
            if group in self._batches:
                self._batches[group].join(batch)
            else:
                self._batches[group] = batch

    def _count_prompts(self, handles: list[Handle]) -> None:
        with self._lock:
            self._prompt_tokens += sum(len(h.request.prompt_ids) for h in handles)

    def _prefill_inputs(self, group: Group, handles: list[Handle]) -> tuple[dict, torch.Tensor]:
        """Left-padded rows: ``[prefix][pad][virtual][prompt]`` in cache and inputs, the mask
        1 on what each row has, positions counting its attended entries (as in training:
        after a prefix, from the first virtual token)."""
        from transformers import DynamicCache

        pad = self.tokenizer.pad_token_id
        prefix = [h.adapter.prefix for h in handles]
        soft = [h.adapter.soft_prompt for h in handles]
        p = [x[0][0].shape[1] if x else 0 for x in prefix]
        s = [x.shape[0] if x is not None else 0 for x in soft]
        t = [len(h.request.prompt_ids) for h in handles]
        P, L = max(p), max(a + b for a, b in zip(s, t))
        ids = torch.full((len(handles), L), pad, dtype=torch.long)
        mask = torch.zeros((len(handles), P + L), dtype=torch.long)
        positions = torch.zeros((len(handles), L), dtype=torch.long)
        for i, h in enumerate(handles):
            start = L - s[i] - t[i]
            ids[i, start + s[i]:] = torch.tensor(h.request.prompt_ids)
            mask[i, P - p[i]:P] = 1
            mask[i, P + start:] = 1
            positions[i, start:] = torch.arange(p[i], p[i] + s[i] + t[i])
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        inputs = {"position_ids": positions, "cache": DynamicCache()}
        if P:
            inputs["cache"] = DynamicCache(ddp_cache_data=[_prefix_layer(prefix, layer, P)
                                                           for layer in range(len(next(x for x in prefix if x)))])
        if any(s):
            embeds = group.model.get_input_embeddings()(ids)
            for i, x in enumerate(soft):
                embeds[i, L - s[i] - t[i]:L - t[i]] = x
            inputs["inputs_embeds"] = embeds
        else:
            inputs["input_ids"] = ids
        return inputs, mask

    def _decode(self, group: Group, batch: Batch) -> None:
        ids = torch.tensor([[c.last] for c in batch.choices], device=self.device)
        positions = batch.positions()
        out = group.forward([c.handle.adapter.lora for c in batch.choices], input_ids=ids, position_ids=positions,
                            attention_mask=batch.grow(), cache=batch.cache, use_cache=True)
        logits = out.logits[:, -1]
        picked = pick_all(batch.choices, logits)
        self._keep(group, batch, self._advance(batch.choices, picked, scored(batch.choices, logits, picked)))

    def _keep(self, group: Group, batch: Batch, rows: list[int]) -> None:
        if rows:
            batch.keep(rows)
        else:
            del self._batches[group]

    def _beams(self, handles: list[Handle]) -> None:
        """Beam requests, one ``generate`` per adapter and settings."""
        def key(h):
            d = h.request.decoding
            return h.adapter, d.num_beams, d.n, d.max_tokens, d.length_penalty, d.no_repeat_ngram_size

        for k in dict.fromkeys(map(key, handles)):
            same = [h for h in handles if key(h) == k]
            self._run(k[0].group, same, lambda: self._beam_search(same))

    def _beam_search(self, handles: list[Handle]) -> None:
        d = handles[0].request.decoding
        self._count_prompts(handles)
        found = beams.search(handles[0].adapter, [h.request.prompt_ids for h in handles], d,
                             self.tokenizer.pad_token_id, self.eos)
        for h, sequences in zip(handles, found):
            for index, tokens in enumerate(sequences):
                choice = new_choice(h, index, self.tokenizer, self.device)
                for token in tokens:  # the loop's own end rules: EOS, stop sequences, max_tokens
                    if not self._advance([choice], [token]):
                        break
                else:  # generate stops at max_new_tokens too, so this is only a guard against a hang
                    choice.stream.flush()
                    self._finish(choice, "length", len(choice.stream.text))

    def _advance(self, choices: list[Choice], tokens: list[int], logprobs: list[Logprob | None] | None = None) -> list[int]:
        """Append each row's token, stream it, finish the rows that end. -> the rows that go on."""
        keep = []
        for i, (c, token) in enumerate(zip(choices, tokens)):
            c.ids.append(token)
            c.last = token
            if logprobs and logprobs[i] is not None:
                c.logprobs.append(logprobs[i])
            end, reason = self._ends(c, token)
            self._emit(c.handle, Token(c.index, token, c.stream.release(end), logprobs[i] if logprobs else None))
            if reason:
                self._finish(c, reason, end)
            else:
                keep.append(i)
        with self._lock:
            self._tokens += len(tokens)
        return keep

    def _ends(self, c: Choice, token: int) -> tuple[int | None, str | None]:
        """(where the final text ends, why) if the choice ends with ``token``, else (None, None)."""
        if token in self.eos:
            c.stream.flush()
            return len(c.stream.text), "stop"
        c.stream.add(token)
        if (stop := c.stream.stop_at()) is not None:
            return stop, "stop"
        used = c.handle.adapter.virtual_tokens + len(c.prompt) + len(c.ids)
        if len(c.ids) >= c.decoding.max_tokens or (self.context and used >= self.context):
            c.stream.flush()
            return len(c.stream.text), "length"
        return None, None

    def _finish(self, c: Choice, reason: str, end: int | None, error: str | None = None) -> None:
        text = c.stream.text[:end] if end is not None else c.stream.text[:c.stream.sent]
        self._emit(c.handle, Finished(c.index, reason, text, len(c.ids), error=error, token_ids=tuple(c.ids),
                                      logprobs=tuple(c.logprobs)))
        self._close(c.handle)

    def _finish_unstarted(self, h: Handle, index: int, reason: str, error: str | None = None) -> None:
        self._emit(h, Finished(index, reason, "", 0, error=error))
        self._close(h)

    def _close(self, h: Handle) -> None:
        h.open -= 1
        if h.open == 0:
            with self._lock:
                h.adapter.users -= 1
                self._finished += 1
            h.done.set()

    def _emit(self, h: Handle, event: Event) -> None:
        if h.cancelled and not isinstance(event, Finished):
            return
        try:
            h.on_event(event)
        except Exception:  # the receiver is gone: stop decoding for it
            log.warning("engine: request %d's event handler failed; cancelling it", h.id, exc_info=True)
            h.cancelled = True


def _width(h: Handle) -> int:
    """A request's row in a prefill forward: its prompt and its soft prompt."""
    soft = h.adapter.soft_prompt
    return len(h.request.prompt_ids) + (soft.shape[0] if soft is not None else 0)


def _prefix_layer(prefix: list, layer: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's prefix keys and values for a prefill batch, each row's left-padded to ``width``."""
    like = next(x for x in prefix if x)[layer][0]
    out = []
    for part in (0, 1):
        rows = []
        for x in prefix:
            kv = x[layer][part] if x else like.new_zeros(like.shape[0], 0, like.shape[2])
            rows.append(torch.cat([kv.new_zeros(kv.shape[0], width - kv.shape[1], kv.shape[2]), kv], dim=1))
        out.append(torch.stack(rows))
    return out[0], out[1]
