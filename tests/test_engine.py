"""serving.engine: every method decodes as it was trained, in one running batch with every
other, whoever joins when; evaluate scores what the engine serves; sampling, stops, n,
streaming, cancel, the queue bound and hot swaps."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from pipelines import scoring
from pipelines.config import EvaluateConfig
from serving.decoding import TextStream, choice_seed
from serving.engine import BASE, Engine
from serving.types import SEEDS, Decoding, Finished, Prompt, QueueFull, Request, Token, UnknownModel
from tests.conftest import build_tiny_model, liven

METHODS = ["prompt", "ptuning", "prefix", "lora", "full", BASE]
PROMPTS = ["Attributes: name[Aromi]\nDescription:",
           "Attributes: name[Alimentum], area[city centre], food[Chinese]\nDescription:",
           "Attributes: x\nDescription:"]
STEPS = 10  # new tokens per answer: enough for a misplaced position to show


@pytest.fixture(scope="session")
def lively_base(tmp_path_factory) -> Path:
    """The tiny Llama with weights drawn wide enough that greedy decoding varies (``liven``)."""
    return liven(build_tiny_model(tmp_path_factory.mktemp("lively") / "base"))


def _peft_config(method: str):
    from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    causal = TaskType.CAUSAL_LM
    return {"prompt": PromptTuningConfig(task_type=causal, num_virtual_tokens=4),
            "ptuning": PromptEncoderConfig(task_type=causal, num_virtual_tokens=5, encoder_hidden_size=16),
            "prefix": PrefixTuningConfig(task_type=causal, num_virtual_tokens=3, prefix_projection=True,
                                         encoder_hidden_size=16),
            "lora": LoraConfig(task_type=causal, r=4, target_modules=["q_proj", "v_proj"])}[method]


def build_adapter(base: Path, method: str, out: Path, seed: int = 0, config=None) -> Path:
    """An adapter of ``method`` (or of the PEFT ``config`` given) with random weights that
    matter, saved as ``tune`` saves it."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    if method == "full":
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(base).save_pretrained(out)
        return out
    model = get_peft_model(model, config or _peft_config(method))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.5)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def adapter_dirs(lively_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {m: build_adapter(lively_base, m, root / m) for m in METHODS if m != BASE}


@pytest.fixture(scope="module")
def engine(lively_base, adapter_dirs) -> Engine:
    eng = Engine(lively_base, max_batch=16, device="cpu", dtype=torch.float32)
    for method, path in adapter_dirs.items():
        eng.add(method, path)
    return eng


def as_trained(base: Path, adapter_dirs: dict, method: str):
    """The model as trained: PEFT's training forward (or the plain model), in eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if method == BASE:
        model = AutoModelForCausalLM.from_pretrained(base)
    elif method == "full":
        model = AutoModelForCausalLM.from_pretrained(adapter_dirs["full"])
    else:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dirs[method])
    return model.eval()


def trained(base: Path, adapter_dirs: dict, method: str, prompt: tuple[int, ...], steps: int = STEPS) -> list[int]:
    """Greedy decoding by full forward passes of the model as trained (PEFT's training forward, no cache),
    to an end-of-sequence token (kept, as the engine keeps it) or ``steps`` tokens."""
    from transformers import AutoTokenizer

    model = as_trained(base, adapter_dirs, method)
    ends = model.generation_config.eos_token_id
    eos = {AutoTokenizer.from_pretrained(base).eos_token_id, *(ends if isinstance(ends, list) else [ends])}
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model.eval()(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            out.append(token)
            seq.append(token)
            if token in eos:
                break
    return out


def greedy(model: str, prompt: tuple[int, ...], **decoding) -> Request:
    return Request(model, prompt, Decoding(**{"max_tokens": STEPS, **decoding}))


def alone(engine: Engine, request: Request) -> list[Finished]:
    return engine.generate([request])[0]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_decodes_as_trained_and_as_evaluate_scores(method, engine, lively_base, adapter_dirs):
    ids = [engine.encode(p) for p in PROMPTS]
    answers = [alone(engine, greedy(method, p))[0] for p in ids]
    for p, answer in zip(ids, answers):
        assert list(answer.token_ids) == trained(lively_base, adapter_dirs, method, p)
    texts, tokens = scoring.generate(engine, method, PROMPTS, EvaluateConfig(batch_size=16, max_new_tokens=STEPS))
    assert texts == [scoring.first_line(a.text) for a in answers]
    assert tokens == sum(a.completion_tokens for a in answers)
    if method != BASE:  # the adapter matters
        assert answers[0].token_ids != alone(engine, greedy(BASE, ids[0]))[0].token_ids


def test_a_mixed_batch_of_every_method_answers_each_row_as_alone(engine):
    requests = [greedy(m, engine.encode(p)) for m in METHODS for p in PROMPTS]
    mixed = engine.generate(requests)
    assert [c.token_ids for (c,) in mixed] == [alone(engine, r)[0].token_ids for r in requests]
    assert len({c.token_ids for (c,) in mixed}) > len(PROMPTS)  # the methods answer differently


def test_prefills_are_bounded_per_forward_and_per_step_oldest_first(engine, monkeypatch):
    """Rows of like length prefill together up to ``prefill_tokens``, a longer row alone; a step
    prefills the oldest parts while its padded tokens stay within the bound, so rows already
    running decode between the parts; every row answers as it does alone."""
    ids = [engine.encode(p) for p in PROMPTS]
    a, b, c = map(len, ids)
    assert c < a < b  # the premise of the parts below
    requests = [greedy(m, p) for m in ("lora", BASE) for p in ids]  # ids 0-2 lora, 3-5 base
    steps: list[list[list[int]]] = []
    prefill = engine._prefill
    monkeypatch.setattr(engine, "_prefill", lambda group, handles, *score: (
        steps[-1].append([len(h.request.prompt_ids) for h in handles]), prefill(group, handles, *score))[1])
    monkeypatch.setattr(engine, "prefill_tokens", 2 * a)
    got: dict[int, list] = {i: [] for i in range(len(requests))}
    tokens_by_step = []
    for i, r in enumerate(requests):
        engine.submit(r, lambda e, i=i: got[i].append(e.token_id) if isinstance(e, Token) else None)
    while True:
        steps.append([])
        if not engine.step():
            break
        tokens_by_step.append(len(got[0]))
    # parts: [c c] [a a] [b] [b] (shortest first), run in the order of their oldest request, one a step here
    assert steps[:4] == [[[a, a]], [[b]], [[c, c]], [[b]]] and not any(steps[4:])
    assert tokens_by_step[:4] == [2, 3, 4, 5]  # the first row decodes while the rest prefill
    assert [got[i] for i in range(len(requests))] == [list(alone(engine, r)[0].token_ids) for r in requests]


def test_requests_joining_mid_flight_answer_as_alone(engine):
    """A prefix row, then soft-prompt, LoRA and base rows of other lengths join a running batch
    step by step (the cache grows on either side), and a full fine-tune steps beside them."""
    order = ["prefix", "prompt", "lora", "ptuning", BASE, "full"]
    requests = [greedy(m, engine.encode(PROMPTS[i % 3]), max_tokens=STEPS + i) for i, m in enumerate(order)]
    got: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        engine.submit(r, lambda e, i=i: got.setdefault(i, []).append(e.token_id) if isinstance(e, Token) else None)
        engine.step()
        engine.step()
    while engine.step():
        pass
    assert [got[i] for i in range(len(requests))] == [list(alone(engine, r)[0].token_ids) for r in requests]


def test_every_seed_draws_its_own_samples():
    """Seeds 2**63 apart once drew the same samples (reduced modulo 2**63), and on CPU seeds
    2**32 apart too (torch's CPU generator keeps the low 32 bits of its seed): each signed
    64-bit seed now draws its own, for every choice index."""
    seeds = [SEEDS[0], -1, 0, 1, 2**31, 2**32, 2**32 + 1, 2**40, 2**62, SEEDS[1]]
    for index in range(3):
        mapped = [choice_seed(s, index) for s in seeds]
        assert len(set(mapped)) == len(seeds) and all(0 <= m < 2**64 for m in mapped)
        draws = {tuple(torch.rand(4, generator=torch.Generator().manual_seed(m)).tolist()) for m in mapped}
        assert len(draws) == len(seeds)
    assert choice_seed(7, 0) == choice_seed(7, 0) != choice_seed(7, 1)


def test_seeded_samples_are_reproducible_whatever_the_batch(engine):
    ids = engine.encode(PROMPTS[0])
    sampled = Decoding(max_tokens=STEPS, temperature=0.9, top_p=0.95, top_k=50, seed=7)
    one = Request("lora", ids, sampled)
    first = alone(engine, one)[0].token_ids
    company = [greedy("prefix", engine.encode(PROMPTS[1])),
               Request(BASE, ids, Decoding(max_tokens=STEPS, temperature=1.0, seed=1)), one]
    assert engine.generate(company)[2][0].token_ids == first
    others = {alone(engine, Request("lora", ids, Decoding(max_tokens=STEPS, temperature=0.9, top_p=0.95, top_k=50,
                                                          seed=s)))[0].token_ids for s in range(1, 5)}
    assert len(others | {first}) > 2  # the seed decides
    three = Request("lora", ids, Decoding(max_tokens=STEPS, temperature=0.9, seed=7, n=3))
    choices = alone(engine, three)
    assert [c.index for c in choices] == [0, 1, 2] and len({c.token_ids for c in choices}) > 1
    assert [c.token_ids for c in alone(engine, three)] == [c.token_ids for c in choices]


def test_n_greedy_choices_share_one_prefill_and_agree(engine):
    ids = engine.encode(PROMPTS[1])
    choices = alone(engine, greedy("prefix", ids, n=3))
    assert [c.token_ids for c in choices] == [alone(engine, greedy("prefix", ids))[0].token_ids] * 3


def stream(engine: Engine, request: Request) -> tuple[list[Token], list[Finished]]:
    events: list = []
    engine.submit(request, events.append)
    while engine.step():
        pass
    return [e for e in events if isinstance(e, Token)], [e for e in events if isinstance(e, Finished)]


def events_of(engine: Engine, requests: list[Request]) -> list[list]:
    """Every event of each request, submitted together and stepped to the end."""
    events: list[list] = [[] for _ in requests]
    for r, mine in zip(requests, events):
        engine.submit(r, mine.append)
    while engine.step():
        pass
    return events


@pytest.mark.parametrize("method", METHODS)
def test_logprobs_are_the_trained_models_for_the_prompt_and_each_token(method, engine, lively_base, adapter_dirs):
    """A scored request (echo and logprobs, as lm-evaluation-harness asks) in a batch with
    rows of other lengths and methods: the prompt's and each generated token's log-probability
    and alternatives are the trained model's over the whole unpadded sequence, the Prompt
    event comes first, and asking for them changes no token."""
    ids = engine.encode(PROMPTS[1])
    wanted = greedy(method, ids, logprobs=3, prompt_logprobs=True)
    others = [greedy("prefix", engine.encode(PROMPTS[0]), logprobs=0), greedy(BASE, engine.encode(PROMPTS[2]))]
    events, first, _ = events_of(engine, [wanted, *others])
    (prompt,), tokens = [e for e in events if isinstance(e, Prompt)], [e for e in events if isinstance(e, Token)]
    assert isinstance(events[0], Prompt)
    (done,) = [e for e in events if isinstance(e, Finished)]
    assert done.token_ids == alone(engine, greedy(method, ids))[0].token_ids
    assert done.logprobs == tuple(t.logprob for t in tokens)  # the choice's end holds them all

    seq = list(ids) + list(done.token_ids)
    with torch.no_grad():
        logits = as_trained(lively_base, adapter_dirs, method)(input_ids=torch.tensor([seq])).logits[0, -len(seq):]
    reference = torch.log_softmax(logits, -1)
    got = [*prompt.logprobs, *(t.logprob for t in tokens)]
    assert len(got) == len(seq) and got[0] is None
    for position, lp in enumerate(got[1:], start=1):
        row = reference[position - 1]
        assert lp.token_id == seq[position] and lp.logprob == pytest.approx(float(row[seq[position]]), abs=1e-4)
        top_values, top_ids = row.topk(3)
        assert [t for t, _ in lp.top] == top_ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top_values.tolist(), abs=1e-4)
    assert all(t.logprob.top == () for t in first if isinstance(t, Token))  # logprobs=0: the token alone
    assert not any(isinstance(e, Prompt) for e in first)


def test_scored_prompts_prefill_in_bounded_forwards_and_score_the_same(engine, monkeypatch):
    requests = [greedy(m, engine.encode(p), logprobs=1, prompt_logprobs=True, max_tokens=2)
                for m in ("lora", "prompt") for p in PROMPTS]
    whole = events_of(engine, requests)
    widths = []
    prefill = engine._prefill
    monkeypatch.setattr(engine, "_prefill", lambda group, handles, score=False: (
        widths.append(len(handles)), prefill(group, handles, score))[1])
    monkeypatch.setattr(engine, "_score_tokens", 1)  # every scored row alone
    alone_ = events_of(engine, requests)
    assert widths == [1] * len(requests)

    def flat(events):  # (kind, token ids, log-probabilities): the floats may round apart with the padding
        out = []
        for e in events:
            for lp in (e.logprobs if isinstance(e, Prompt) else [getattr(e, "logprob", None)]):
                out.append((type(e).__name__, lp and (lp.token_id, [t for t, _ in lp.top]), lp and lp.logprob))
        return out

    for a, b in zip(alone_, whole):
        assert [x[:2] for x in flat(a)] == [x[:2] for x in flat(b)]
        assert [x[2] for x in flat(a) if x[2] is not None] == pytest.approx([x[2] for x in flat(b) if x[2] is not None],
                                                                            abs=1e-4)


def test_a_prompt_scored_with_no_tokens_keeps_no_row_and_leaves_its_batch_mates_alone(engine):
    """max_tokens 0 (OpenAI's score-only echo): the Prompt event, then every choice finished
    "length" with nothing generated, no row kept; its batch-mates in the same prefill decode
    as they would without it, and the scores are those of a request that generates."""
    ids = engine.encode(PROMPTS[1])
    only = greedy("prompt", ids, max_tokens=0, logprobs=2, prompt_logprobs=True, n=2)
    mates = [greedy("lora", engine.encode(PROMPTS[0])), greedy("prompt", engine.encode(PROMPTS[2]), n=2)]
    events, *others = events_of(engine, [only, *mates])
    assert [type(e).__name__ for e in events] == ["Prompt", "Finished", "Finished"]
    assert [(e.index, e.reason, e.completion_tokens, e.text) for e in events[1:]] == [(0, "length", 0, ""),
                                                                                     (1, "length", 0, "")]
    assert [[e.token_ids for e in o if isinstance(e, Finished)] for o in others] == \
        [[c.token_ids for c in alone(engine, m)] for m in mates]
    generating = events_of(engine, [greedy("prompt", ids, max_tokens=1, logprobs=2, prompt_logprobs=True)])[0][0]
    assert [(lp and (lp.token_id, lp.top)) for lp in events[0].logprobs] == \
        [(lp and (lp.token_id, lp.top)) for lp in generating.logprobs]
    assert engine.stats().running == 0
    with pytest.raises(ValueError, match="max_tokens: must be at least 1"):
        engine.submit(greedy(BASE, ids, max_tokens=0), lambda e: None)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_streamed_text_adds_up_to_the_answer(engine, method):
    tokens, (done,) = stream(engine, greedy(method, engine.encode(PROMPTS[1]), max_tokens=30))
    assert "".join(t.text for t in tokens) == done.text
    assert done.text == engine.tokenizer.decode(done.token_ids, skip_special_tokens=True)
    assert [t.token_id for t in tokens] == list(done.token_ids) and done.completion_tokens == 30
    assert done.reason == "length"


def test_a_multibyte_character_is_held_until_complete(engine):
    tok = engine.tokenizer
    ids = tok("café ☕ ok", add_special_tokens=False).input_ids
    assert len(ids) > len("café ☕ ok".encode()) / 2  # byte-level pieces: the characters span tokens
    s, pieces = TextStream(tok, ()), []
    for i in ids:
        s.add(i)
        pieces.append(s.release())
    s.flush()
    pieces.append(s.release(len(s.text)))
    assert "".join(pieces) == "café ☕ ok" and not any("\ufffd" in p for p in pieces)


def test_stop_sequences_cut_the_text_and_are_never_streamed(engine):
    ids = engine.encode(PROMPTS[0])
    full = alone(engine, greedy("lora", ids, max_tokens=30))[0]
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 2]
    tokens, (done,) = stream(engine, greedy("lora", ids, max_tokens=30, stop=("\u2603never", stop)))
    assert done.reason == "stop" and done.text == full.text[:full.text.index(stop)]
    assert "".join(t.text for t in tokens) == done.text
    assert done.token_ids == full.token_ids[:len(done.token_ids)] and done.completion_tokens < 30


def test_max_tokens_and_eos_end_a_choice(engine):
    ids = engine.encode(PROMPTS[2])
    short = alone(engine, greedy(BASE, ids, max_tokens=3))[0]
    assert short.reason == "length" and short.completion_tokens == 3
    third = short.token_ids[2]
    eos = engine.eos
    engine.eos = [*eos, third]  # as if the model's end-of-sequence token came third
    try:
        ended = alone(engine, greedy(BASE, ids))[0]
    finally:
        engine.eos = eos
    assert ended.reason == "stop" and ended.token_ids == short.token_ids
    assert ended.text == engine.tokenizer.decode(short.token_ids[:2], skip_special_tokens=True)


def test_every_choice_ending_at_its_first_token_finishes_once(lively_base, adapter_dirs):
    """max_tokens=1: the whole prefilled batch ends at once, joins nothing, and frees its adapters."""
    eng = Engine(lively_base, max_batch=8, device="cpu", dtype=torch.float32)
    for method, path in adapter_dirs.items():
        eng.add(method, path)
    ids = eng.encode(PROMPTS[1])
    events: dict[str, list] = {m: [] for m in METHODS}
    handles = [eng.submit(greedy(m, ids, max_tokens=1, n=1 if m == BASE else 2, temperature=0 if m == BASE else 1.0,
                                 seed=1), events[m].append) for m in METHODS]
    while eng.step():
        pass
    assert all(h.done.is_set() for h in handles) and not eng._batches
    assert all(a.users == 0 for a in eng._served.values())
    assert (eng.stats().requests_finished, eng.stats().tokens_generated, eng.stats().running) == (6, 11, 0)
    for m in METHODS:
        finished = [e for e in events[m] if isinstance(e, Finished)]
        assert [(f.reason, f.completion_tokens, f.error) for f in finished] == [("length", 1, None)] * len(finished)
        assert sorted(f.index for f in finished) == list(range(1 if m == BASE else 2))
    assert events[BASE][-1].token_ids == alone(eng, greedy(BASE, ids))[0].token_ids[:1]


def test_beam_search_per_adapter_matches_row_by_row(engine):
    beams = Decoding(max_tokens=6, num_beams=3, n=2, length_penalty=0.8, no_repeat_ngram_size=3)
    requests = [Request(m, engine.encode(p), beams) for m in METHODS for p in PROMPTS[:2]]
    batched = engine.generate(requests)
    assert [[c.token_ids for c in r] for r in batched] == [[c.token_ids for c in alone(engine, r)] for r in requests]
    assert all(len(r) == 2 and r[0].token_ids != r[1].token_ids for r in batched)  # the two best beams


def test_cancel_frees_the_slot_at_the_next_step(lively_base):
    eng = Engine(lively_base, max_batch=1, device="cpu", dtype=torch.float32)
    events: list = []
    first = eng.submit(greedy(BASE, eng.encode(PROMPTS[0]), max_tokens=200), events.append)
    eng.step()
    second = eng.submit(greedy(BASE, eng.encode(PROMPTS[1]), max_tokens=5), events.append)
    eng.step()
    assert (eng.stats().running, eng.stats().waiting) == (1, 1)  # the second waits for the slot
    eng.cancel(first)
    eng.step()
    assert [e.reason for e in events if isinstance(e, Finished)] == ["cancelled"]
    assert (eng.stats().running, eng.stats().waiting) == (1, 0)
    while eng.step():
        pass
    assert second.done.is_set() and first.done.is_set()
    assert [e.reason for e in events if isinstance(e, Finished)] == ["cancelled", "length"]
    assert eng.stats().tokens_generated == sum(isinstance(e, Token) for e in events)
    assert eng.stats().requests_finished == 2 and eng.stats().running == 0


def test_an_admitted_request_cancelled_before_its_prefill_is_never_run(lively_base, monkeypatch):
    eng = Engine(lively_base, max_batch=4, device="cpu", dtype=torch.float32, prefill_tokens=1)
    prefilled: list[int] = []
    prefill = eng._prefill
    monkeypatch.setattr(eng, "_prefill", lambda group, handles, *score: (
        prefilled.extend(h.id for h in handles), prefill(group, handles, *score))[1])
    events: list = []
    first = eng.submit(greedy(BASE, eng.encode(PROMPTS[0])), events.append)
    second = eng.submit(greedy(BASE, eng.encode(PROMPTS[1]), n=2), events.append)
    eng.step()  # both admitted (3 rows of 4), one forward's worth prefilled: the first
    assert prefilled == [first.id] and (eng.stats().running, eng.stats().waiting) == (1, 1)
    eng.cancel(second)
    third = eng.submit(greedy(BASE, eng.encode(PROMPTS[2]), n=3), events.append)
    eng.step()  # the cancelled one's rows are free again: the third is admitted and prefilled
    assert second.done.is_set() and [e.reason for e in events if isinstance(e, Finished)] == ["cancelled"] * 2
    while eng.step():
        pass
    assert prefilled == [first.id, third.id] and first.done.is_set() and third.done.is_set()


def test_a_receiver_that_fails_is_cancelled_and_a_failed_step_ends_only_its_rows(lively_base):
    eng = Engine(lively_base, max_batch=4, device="cpu", dtype=torch.float32)
    ids = eng.encode(PROMPTS[0])

    def gone(event):
        raise ConnectionResetError("client went away")

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    dropped = eng.submit(greedy(BASE, ids, max_tokens=100), gone)
    eng.step()
    eng.step()
    assert dropped.done.is_set() and eng.stats().running == 0  # its slot is free again

    forward = eng._base.forward
    eng._base.forward = out_of_memory
    events: list = []
    eng.submit(greedy(BASE, ids), events.append)
    eng.step()
    eng._base.forward = forward
    assert [(e.reason, e.error) for e in events] == [("error", "RuntimeError: CUDA out of memory")]
    assert alone(eng, greedy(BASE, ids))[0].reason == "length"  # the engine goes on


def test_a_dtype_given_alone_applies_on_the_chosen_device(lively_base, adapter_dirs):
    """``ptune serve --dtype bfloat16`` on CPU: the weights in bf16, and every method decodes over them."""
    eng = Engine(lively_base, max_batch=8, dtype=torch.bfloat16)
    assert eng.dtype == eng._base.model.dtype == torch.bfloat16
    assert eng.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    for method, path in adapter_dirs.items():
        eng.add(method, path)
    answers = eng.generate([greedy(m, eng.encode(PROMPTS[0])) for m in METHODS])
    assert [(c.reason, c.completion_tokens) for (c,) in answers] == [("length", STEPS)] * len(METHODS)


def test_the_queue_is_bounded_and_requests_are_checked(lively_base):
    eng = Engine(lively_base, max_batch=2, max_queue=2, device="cpu", dtype=torch.float32)
    ids = eng.encode(PROMPTS[0])
    for _ in range(2):
        eng.submit(greedy(BASE, ids), lambda e: None)
    with pytest.raises(QueueFull, match="2 requests waiting"):
        eng.submit(greedy(BASE, ids), lambda e: None)
    eng.step()  # both admitted: the queue has room again
    eng.submit(greedy(BASE, ids), lambda e: None)
    assert eng.stats().waiting == 1 and eng.stats().running == 2
    with pytest.raises(UnknownModel):
        eng.submit(greedy("nope", ids), lambda e: None)
    for bad, field in [(Decoding(max_tokens=0), "max_tokens"), (Decoding(top_p=0), "top_p"),
                       (Decoding(n=3), "n"), (Decoding(num_beams=2, temperature=0.5), "temperature"),
                       (Decoding(logprobs=21), "logprobs"), (Decoding(num_beams=2, logprobs=1), "logprobs"),
                       (Decoding(temperature=float("inf")), "temperature: must be a finite number"),
                       (Decoding(top_p=float("nan")), "top_p: must be a finite number"),
                       (Decoding(num_beams=2, length_penalty=float("nan")), "length_penalty")]:
        with pytest.raises(ValueError, match=f"^{field}" if ":" in field else f"^{field}:"):
            eng.submit(Request(BASE, ids, bad), lambda e: None)
    with pytest.raises(ValueError, match="^prompt_ids:"):
        eng.submit(Request(BASE, (10**6,)), lambda e: None)
    with pytest.raises(ValueError, match="^prompt_ids: .* context of 256"):
        eng.submit(Request(BASE, ids * 60), lambda e: None)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["embed_tokens", "q_proj"]], ids=["hooks", "peft"])
def test_lora_rows_of_several_adapters_answer_as_each_alone(lively_base, adapter_dirs, tmp_path, targets):
    """Two LoRA adapters and base rows share one forward, each row with its own weights,
    whether the engine's hooks apply them (plain linear layers) or PEFT's ``adapter_names``
    does (a LoRA on the embedding layer): each answers as PEFT's own forward of that adapter."""
    from peft import LoraConfig, TaskType

    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=targets)
    eng = Engine(lively_base, max_batch=16, device="cpu", dtype=torch.float32)
    dirs = {"one": adapter_dirs["lora"] if targets == ["q_proj", "v_proj"] else
            build_adapter(lively_base, "lora", tmp_path / "one", seed=2, config=config),
            "two": build_adapter(lively_base, "lora", tmp_path / "two", seed=1, config=config)}
    for name, path in dirs.items():
        eng.add(name, path)
    assert eng._base._own_rows == (targets == ["q_proj", "v_proj"])
    ids = [eng.encode(p) for p in PROMPTS]
    requests = [greedy(name, p) for p in ids for name in ("one", BASE, "two")]
    mixed = eng.generate(requests)
    for r, (answer,) in zip(requests, mixed):
        model = r.model if r.model == BASE else "lora"
        assert list(answer.token_ids) == trained(lively_base, {"lora": dirs.get(r.model)}, model, r.prompt_ids)
    beam = Decoding(max_tokens=STEPS, num_beams=3)
    assert eng.generate([Request("two", ids[1], beam)])[0][0].token_ids != \
        eng.generate([Request(BASE, ids[1], beam)])[0][0].token_ids  # beam search runs with the adapter too
    eng.remove("one")
    eng.remove("two")
    assert eng._base.lora is None
    assert alone(eng, greedy(BASE, ids[0]))[0].token_ids == mixed[1][0].token_ids  # the base is the base again
    eng.close()


def test_once_started_every_adapter_loads_and_frees_on_the_stepping_thread(lively_base, adapter_dirs, monkeypatch):
    """add/remove from another thread run their torch work on the engine's own thread (one
    OpenMP team per process: a second one slows both), and fail once the engine is closed."""
    from serving import adapters

    threads = []
    load, drop = adapters.load, adapters.Group.drop_lora
    monkeypatch.setattr(adapters, "load", lambda *a: threads.append(threading.current_thread()) or load(*a))
    monkeypatch.setattr(adapters.Group, "drop_lora",
                        lambda self, name: threads.append(threading.current_thread()) or drop(self, name))
    eng = Engine(lively_base, max_batch=4, device="cpu", dtype=torch.float32).start()
    try:
        adder = threading.Thread(target=lambda: [eng.add("lora", adapter_dirs["lora"]), eng.remove("lora")])
        adder.start()
        adder.join(30)
        assert threads == [eng._thread, eng._thread]
        assert eng.models() == {BASE: "base"} and eng._base.lora is None
    finally:
        eng.close()
    with pytest.raises(RuntimeError, match="closed"):
        eng.add("x", adapter_dirs["prompt"])


def test_hot_add_and_remove_while_requests_run(lively_base, adapter_dirs, tmp_path):
    """On the background thread: a new version replaces "e2e" mid-flight; requests already
    submitted finish with the version they asked for, new ones get the new one, and the old
    LoRA weights are freed once nothing holds them."""
    eng = Engine(lively_base, max_batch=8, device="cpu", dtype=torch.float32)
    second = build_adapter(lively_base, "lora", tmp_path / "v2", seed=1)
    eng.add("e2e", adapter_dirs["lora"])
    eng.add("other", adapter_dirs["prefix"])
    ids = eng.encode(PROMPTS[1])
    old_answer = alone(eng, greedy("e2e", ids, max_tokens=40))[0].token_ids
    other_answer = alone(eng, greedy("other", ids, max_tokens=40))[0].token_ids
    eng.start()
    try:
        started = threading.Event()
        results: dict[str, Finished] = {}

        def collect(key):
            def on_event(e):
                if isinstance(e, Token) and len(results) == 0:
                    started.set()
                if isinstance(e, Finished):
                    results[key] = e
            return on_event

        h_old = eng.submit(greedy("e2e", ids, max_tokens=40), collect("old"))
        h_other = eng.submit(greedy("other", ids, max_tokens=40), collect("other"))
        assert started.wait(30)
        eng.add("e2e", second)
        eng.remove("other")
        with pytest.raises(UnknownModel):
            eng.submit(greedy("other", ids), lambda e: None)
        new = eng.generate([greedy("e2e", ids, max_tokens=40)])[0][0]
        assert h_old.done.wait(30) and h_other.done.wait(30)
    finally:
        eng.close()
    assert results["old"].token_ids == old_answer and results["other"].token_ids == other_answer
    assert new.token_ids != old_answer
    assert list(eng._base.lora.peft_config) == ["lora2"]  # version 1's LoRA weights are gone
    assert set(eng.models()) == {BASE, "e2e"}


@pytest.mark.slow
def test_real_model_mixed_batch_answers_as_alone(real_sliver, tmp_path):
    """SmolLM2-135M with a prefix and a prompt-tuning adapter built here (random, like an
    untrained init) and the sliver run's own LoRA adapter, all mixed with the base: greedy
    answers equal each row decoded alone, token for token."""
    models = real_sliver / "data/models"
    eng = Engine(models / "base", max_batch=16, device="cpu", dtype=torch.float32)
    names = [BASE]
    for method in ("prefix", "prompt"):
        eng.add(method, build_adapter(models / "base", method, tmp_path / method))
        names.append(method)
    eng.add("run", models / "adapter")
    names.append("run")
    mrs = ["name[The Eagle], eatType[coffee shop], food[French]", "name[Zizzi], area[riverside]",
           "name[Aromi], eatType[pub], customer rating[5 out of 5], familyFriendly[yes], near[Café Rouge]"]
    requests = [Request(m, eng.encode(f"Attributes: {mr}\nDescription:"), Decoding(max_tokens=24))
                for m in names for mr in mrs]
    mixed = eng.generate(requests)
    assert [c.token_ids for (c,) in mixed] == [alone(eng, r)[0].token_ids for r in requests]
