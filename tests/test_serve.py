"""ptune serve and ptune generate on a registered tiny-model project (the real `dvc repro` and
`ptune register`): a real uvicorn server on a free loopback port, driven by the official
`openai` client. What is checked: served greedy answers equal what `evaluate` scored for the
same rows, with requests for two methods and the base model in flight together; streaming;
every bad input; the API key; a second version promoted by `ptune register` while requests
run; a full queue; a client that goes away."""
from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from pipelines import lineage
from pipelines.common import StageError
from pipelines.scoring import first_line
from serving.engine import Engine
from serving.models import CACHE, Models, NotServable
from serving.server import api_key_for, create_app
from serving.types import UnknownModel
from tests.conftest import build_tiny_model, free_port, git
from tests.pipeline_project import env_for, make_project, run, update_params
from tests.test_pipeline import TINY

pytestmark = pytest.mark.slow  # every test serves the project `dvc repro` builds below

FIRST, SECOND = "e2e-adapter@v0.0.1", "e2e-adapter@v0.1.0"  # lora, then prefix tuning
MAX_NEW_TOKENS = TINY["evaluate.max_new_tokens"]
SWAP_BOUND_S = 30  # the bound: a promoted version answers within 30 s


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    base = build_tiny_model(tmp / "tiny_base")
    # few_shot_k 0: the few-shot baseline is not what is served, and skipping it keeps the run short.
    project = make_project(tmp, {**TINY, "base_model.source": str(base), "evaluate.few_shot_k": 0,
                                 "register.min_margin_over_zero_shot": 0.0, "register.prod_tolerance": 100.0})
    run(project, "dvc", "repro")
    assert "registered e2e-adapter v0.0.1" in run(project, "ptune", "register").stdout
    return project


@pytest.fixture(scope="module")
def models(project):
    engine = Engine(project / "data/models/base", max_batch=8, max_queue=64).start()
    served = Models(engine, project, project / "data/models/base")
    assert served.refresh() == []
    yield served
    engine.close()


@contextmanager
def running(app):
    """uvicorn in a thread on a free loopback port -> the base URL; stopped on exit."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def server(models):
    with running(create_app(models, poll_seconds=0.5)) as url:
        yield url


def client(url: str, key: str = "unused") -> openai.OpenAI:
    # No retries: a 429 or 5xx must reach the test, not be retried away.
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def at_commit(project: Path, spec: str, path: str, dest: Path) -> Path:
    return lineage.materialize(project, lineage.resolve(project, spec)["commit"], path, dest)


def evaluated(project: Path, spec: str, dest: Path) -> list[dict]:
    """The version's own evaluate predictions (tuned and zero-shot rows), with each row's MR."""
    path = at_commit(project, spec, "data/eval/predictions.jsonl", dest / "predictions.jsonl")
    test = at_commit(project, spec, "data/clean/test.jsonl", dest / "test.jsonl")
    mr = {r["id"]: r["mr"] for r in map(json.loads, test.read_text().splitlines())}
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{**r, "mr": mr[r["id"]]} for r in rows]


# -- hot reload: a second version registered while requests run ----------------------


@pytest.fixture(scope="module")
def promoted(project, models, server):
    """Streams to `e2e-adapter` from three clients while `dvc repro` and `ptune register`
    make and promote a prefix-tuning version -> what the clients and the server saw."""
    mr = "name[The Eagle], eatType[coffee shop]"
    results, errors, stop = [], [], threading.Event()
    alias_moved = {}

    def traffic():
        api = client(server)
        while not stop.is_set():
            started = time.monotonic()
            try:
                chunks = list(api.completions.create(model="e2e-adapter", prompt=mr, max_tokens=120, stream=True))
                results.append({"start": started, "end": time.monotonic(), "models": {c.model for c in chunks},
                                "reason": chunks[-1].choices[0].finish_reason})
            except Exception as exc:  # any failure is what the test looks for
                errors.append(repr(exc))
            time.sleep(0.1)  # leave the CPUs to `dvc repro` too

    def watch_alias():
        while not stop.is_set():
            if models.aliases().get("e2e-adapter") == SECOND and not alias_moved:
                alias_moved["at"] = time.monotonic()
            time.sleep(0.02)

    threads = [threading.Thread(target=traffic) for _ in range(3)] + [threading.Thread(target=watch_alias)]
    for t in threads:
        t.start()
    try:
        update_params(project, {"tune.method": "prefix"})
        run(project, "dvc", "repro")
        out = run(project, "ptune", "register").stdout
        registered = time.monotonic()
        assert "registered e2e-adapter v0.1.0" in out and "prod" in out, out
        deadline = registered + SWAP_BOUND_S + 30
        while not any(SECOND in r["models"] for r in results if r["start"] > registered) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # requests that began on the old version finish meanwhile
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    return {"registered": registered, "alias_moved": alias_moved.get("at"), "results": results, "errors": errors}


def test_a_promoted_version_is_served_within_30s_and_no_request_fails(promoted, server, models):
    r = promoted
    assert r["errors"] == []
    assert r["alias_moved"] is not None and r["alias_moved"] - r["registered"] < SWAP_BOUND_S
    first_new = min(x["end"] for x in r["results"] if SECOND in x["models"])
    assert first_new - r["registered"] < SWAP_BOUND_S
    # Each answer names one exact version (no response mixes two), every one finished.
    assert all(len(x["models"]) == 1 for x in r["results"])
    assert {x["reason"] for x in r["results"]} <= {"stop", "length"}
    # Requests that ended before the alias moved were the old version's. (Whether one is still
    # in flight at the move is timing: the new version loads on the engine's stepping thread,
    # between steps, and the tiny model often ends the requests it paused right after; that no
    # answer mixes two versions is checked above.)
    assert all(x["models"] == {FIRST} for x in r["results"] if x["end"] < r["alias_moved"])
    assert any(x["models"] == {FIRST} for x in r["results"])
    # The old version stays reachable by its exact name; the alias lists the new one.
    api = client(server)
    assert api.completions.create(model=FIRST, prompt="name[Aromi]", max_tokens=2).model == FIRST
    listed = {m.id: m for m in api.models.list().data}
    assert listed["e2e-adapter"].root == SECOND and {FIRST, SECOND, "base"} <= set(listed)
    metrics = httpx.get(f"{server}/metrics").text
    assert f'ptune_serving{{name="e2e-adapter",version="{SECOND}"}} 1.0' in metrics


def test_concurrent_mixed_requests_answer_what_evaluate_scored(promoted, project, models, server, tmp_path):
    """Rows of both versions (LoRA, prefix tuning) and of the base model's zero-shot prompt,
    all in flight together, half streamed: each greedy answer is the one evaluate scored."""
    jobs = []
    for spec in (FIRST, SECOND):
        for row in evaluated(project, spec, tmp_path / spec):
            if row["system"] == "tuned":
                jobs.append((spec, {"mr": row["mr"]}, False, row))
            elif spec == FIRST:  # the base model's rows are the same in both versions
                jobs.append(("base", row["prompt"], True, row))
    assert len({j[0] for j in jobs}) == 3 and len(jobs) >= 12

    def ask(i_job):
        i, (model, prompt, raw, row) = i_job
        api = client(server)
        extra = {"raw_prompt": True} if raw else {}
        if i % 2:
            chunks = list(api.completions.create(model=model, prompt=prompt, max_tokens=MAX_NEW_TOKENS, stream=True,
                                                 stream_options={"include_usage": True}, extra_body=extra))
            return chunks[0].model, "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage
        r = api.completions.create(model=model, prompt=prompt, max_tokens=MAX_NEW_TOKENS, extra_body=extra)
        return r.model, r.choices[0].text, r.usage

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, enumerate(jobs)))
    for (model, _, _, row), (served, text, usage) in zip(jobs, answers):
        assert served == model
        assert first_line(text) == row["prediction"], (model, row["id"])
        # The prompt evaluate built for the row, to the token: the adapter's template came from its manifest.
        assert usage.prompt_tokens == len(models.engine.encode(row["prompt"]))


def test_generate_is_the_same_path_without_a_server(project, tmp_path, server):
    row = next(r for r in evaluated(project, FIRST, tmp_path) if r["system"] == "tuned")
    proc = run(project, "ptune", "generate", "--model", FIRST, row["mr"], "--max-tokens", str(MAX_NEW_TOKENS))
    assert first_line(proc.stdout) == row["prediction"]
    assert f"{FIRST} (lora, commit " in proc.stderr
    piped = run(project, "ptune", "generate", "--model", FIRST, "-", "--max-tokens", str(MAX_NEW_TOKENS),
                input=row["mr"] + "\n")  # TEXT -: standard input, its trailing newline dropped
    assert piped.stdout == proc.stdout
    out = json.loads(run(project, "ptune", "generate", "--model", FIRST, "--field", f"mr={row['mr']}", "--json",
                         "--max-tokens", str(MAX_NEW_TOKENS), "-n", "2", "--num-beams", "2").stdout)
    assert out["model"] == FIRST and len(out["choices"]) == 2
    # --logprobs: what the server's completions give for the same request
    out = json.loads(run(project, "ptune", "generate", "--model", FIRST, row["mr"], "--json", "--logprobs", "2",
                         "--max-tokens", "6").stdout)["choices"][0]["logprobs"]
    served = client(server).completions.create(model=FIRST, prompt=row["mr"], max_tokens=6, logprobs=2).choices[0]
    assert out["tokens"] == served.logprobs.tokens and out["top_logprobs"][0].keys() == served.logprobs.top_logprobs[0].keys()
    assert out["token_logprobs"] == pytest.approx(served.logprobs.token_logprobs, abs=1e-5)
    shown = run(project, "ptune", "generate", "--model", FIRST, row["mr"], "--logprobs", "1", "--max-tokens", "6").stdout
    assert len(shown.splitlines()) == 1 + len(out["tokens"]) and repr(out["tokens"][0]) in shown.splitlines()[1]
    bad = run(project, "ptune", "generate", "--model", "e2e-adapter@v9.9.9", "x", check=False)
    assert bad.returncode == 1 and "--model: model 'e2e-adapter@v9.9.9' is not served; served: base" in bad.stderr
    assert "Traceback" not in bad.stderr


# -- the API ------------------------------------------------------------------------


def test_models_lists_base_the_prod_alias_and_every_version_with_its_prompt_format(server):
    listed = {m.id: m for m in client(server).models.list().data}
    assert {"base", "e2e-adapter", FIRST} <= set(listed)
    alias = listed["e2e-adapter"].model_dump()
    assert alias["root"].startswith("e2e-adapter@v")
    assert alias["ptune"]["input_fields"] == ["mr"] and alias["ptune"]["template"].startswith("Attributes: {{ mr }}")
    api = client(server)
    for name in ("base", "e2e-adapter", FIRST):  # OpenAI's retrieve: the list's entry
        assert api.models.retrieve(name).model_dump(exclude={"created"}) == \
            listed[name].model_dump(exclude={"created"})
    with pytest.raises(openai.NotFoundError, match="model 'nope' is not served; served: base"):
        api.models.retrieve("nope")
    for method, path in (("GET", "/v1/nope"), ("DELETE", "/v1/models"), ("GET", "/v1/completions")):
        r = httpx.request(method, f"{server}{path}")  # OpenAI's error shape for what is not a route
        assert r.status_code in (404, 405) and r.json()["error"]["message"] == f"Invalid URL ({method} {path})"


def test_streaming_chat_and_decoding_options(server, models):
    api = client(server)
    whole = api.completions.create(model=FIRST, prompt="name[Aromi], food[Chinese]", max_tokens=12)
    assert whole.model == FIRST and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 12 and whole.usage.total_tokens == whole.usage.prompt_tokens + \
        whole.usage.completion_tokens
    assert whole.system_fingerprint and len(whole.system_fingerprint) == 12  # the version's commit
    streamed = list(api.completions.create(model=FIRST, prompt="name[Aromi], food[Chinese]", max_tokens=12,
                                           stream=True))
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert streamed[-1].choices[0].finish_reason == whole.choices[0].finish_reason

    # An adapter's chat: one user message holding its input, in its own prompt format.
    chat = api.chat.completions.create(model=FIRST, messages=[{"role": "user", "content": "name[Aromi], food[Chinese]"}],
                                       max_tokens=12)
    assert chat.choices[0].message.content == whole.choices[0].text and chat.object == "chat.completion"
    pieces = list(api.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hello"}],
                                              max_tokens=6, stream=True, stream_options={"include_usage": True}))
    assert pieces[0].choices[0].delta.role == "assistant" and pieces[-1].usage.completion_tokens >= 1
    chat_prompt = models.engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                                              add_generation_prompt=True)
    assert pieces[-1].usage.prompt_tokens == len(models.engine.encode(chat_prompt))  # the base's chat template
    said = {role: api.chat.completions.create(model="base", max_tokens=3, messages=[
        {"role": role, "content": "Be brief."}, {"role": "user", "content": "Hello"}]) for role in ("system", "developer")}
    assert said["developer"].usage == said["system"].usage  # OpenAI's newer name for the system message
    assert said["developer"].choices[0].message.content == said["system"].choices[0].message.content
    parts = api.chat.completions.create(model="base", max_tokens=3, messages=[
        {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}]}])
    assert parts.usage == said["system"].usage  # text parts are their joined text (as training data reads them)

    text = whole.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    if stop.strip():
        cut = api.completions.create(model=FIRST, prompt="name[Aromi], food[Chinese]", max_tokens=12, stop=[stop])
        assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [api.completions.create(model="base", prompt="Aromi is", max_tokens=8, temperature=1.0, seed=7, n=2)
               for _ in range(2)]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]  # seeded: reproducible
    assert len(sampled[0].choices) == 2
    beams = api.completions.create(model=FIRST, prompt="name[Aromi]", max_tokens=6, n=2,
                                   extra_body={"num_beams": 3, "length_penalty": 1.0})
    assert [c.index for c in beams.choices] == [0, 1]
    top_k = api.completions.create(model="base", prompt="Aromi is", max_tokens=4, temperature=0.7, seed=1,
                                   extra_body={"top_k": 5}, top_p=0.9)
    assert top_k.usage.completion_tokens >= 1


def test_logprobs_echo_and_token_id_batches_as_lm_evaluation_harness_asks(server, models):
    """lm-evaluation-harness' ``local-completions`` scores a continuation by sending prompt and
    continuation as token ids, a batch per request, with ``echo``, ``logprobs: 1`` and
    ``max_tokens: 1``, and reads ``token_logprobs[ctxlen:-1]`` and ``top_logprobs``: that is
    the log-likelihood the model gives the continuation when it generates it, and greedy
    where each token is its place's most likely."""
    api, tok = client(server), models.engine.tokenizer
    texts = ["name[Aromi], food[Chinese]", "name[Alimentum]"]
    made = api.completions.create(model=FIRST, prompt=texts, max_tokens=6, logprobs=2, n=2)
    assert [c.index for c in made.choices] == [0, 1, 2, 3]  # prompt-major, OpenAI's order
    alone = [api.completions.create(model=FIRST, prompt=t, max_tokens=6, logprobs=2).choices[0] for t in texts]
    assert [c.text for c in made.choices] == [alone[0].text] * 2 + [alone[1].text] * 2  # greedy: n agree
    by_fields = api.completions.create(model=FIRST, prompt=[{"mr": t} for t in texts], max_tokens=6)
    assert [c.text for c in by_fields.choices] == [c.text for c in alone]  # a batch of the task's fields
    for c in made.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) <= 6
        assert all(len(top) <= 2 and lp <= max(top.values()) + 1e-6
                   for lp, top in zip(c.logprobs.token_logprobs, c.logprobs.top_logprobs))

    # The adapter's formatted prompt as ids, then the continuation it generated for it.
    context = list(models.engine.encode(models.resolve(FIRST).format_text(texts[0])))
    gen = api.completions.create(model=FIRST, prompt=context, max_tokens=6, logprobs=1).choices[0]
    continuation = tok(gen.text, add_special_tokens=False).input_ids
    assert gen.text == alone[0].text and continuation  # token ids go in as they are: no template added
    scored = api.completions.create(model=FIRST, prompt=[context + continuation, context], max_tokens=1, logprobs=1,
                                    echo=True, temperature=0)
    first, second = sorted(scored.choices, key=lambda c: c.index)
    assert first.text.startswith(tok.decode(context + continuation)) and first.logprobs.token_logprobs[0] is None
    assert len(first.logprobs.token_logprobs) == len(context + continuation) + 1
    ctxlen = len(context)
    assert first.logprobs.token_logprobs[ctxlen:-1] == pytest.approx(gen.logprobs.token_logprobs[:len(continuation)],
                                                                     abs=1e-4)
    assert all(lp == pytest.approx(max(top.values()), abs=1e-6)  # lm-eval's is_greedy
               for lp, top in zip(first.logprobs.token_logprobs[ctxlen:-1], first.logprobs.top_logprobs[ctxlen:-1]))
    assert "".join(first.logprobs.tokens[:len(context)]) == tok.decode(context)
    assert first.logprobs.text_offset[:3] == [0, len(first.logprobs.tokens[0]),
                                             len(first.logprobs.tokens[0]) + len(first.logprobs.tokens[1])]
    assert len(second.logprobs.tokens) == ctxlen + 1
    assert second.logprobs.token_logprobs[-1] == pytest.approx(gen.logprobs.token_logprobs[0], abs=1e-4)
    assert scored.usage.prompt_tokens == 2 * ctxlen + len(continuation)
    # OpenAI's score-only request: max_tokens 0 with echo, the same prompt log-probabilities, nothing generated.
    only = api.completions.create(model=FIRST, prompt=[context + continuation], max_tokens=0, logprobs=1, echo=True)
    assert only.choices[0].text == tok.decode(context + continuation) and only.choices[0].finish_reason == "length"
    assert only.choices[0].logprobs.token_logprobs == first.logprobs.token_logprobs[:-1]
    assert (only.usage.completion_tokens, only.usage.prompt_tokens) == (0, len(context + continuation))
    streamed_only = list(api.completions.create(model=FIRST, prompt=context, max_tokens=0, logprobs=0, echo=True,
                                                stream=True))
    assert "".join(p.choices[0].text for p in streamed_only) == tok.decode(context)
    with pytest.raises(openai.BadRequestError, match="max_tokens: 0 only with echo and logprobs"):
        api.completions.create(model=FIRST, prompt=context, max_tokens=0, echo=True)
    with pytest.raises(openai.BadRequestError, match=r"max_completion_tokens: 0 is outside \[1, 1024\]"):
        api.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}], max_completion_tokens=0)

    # Streamed, the same log-probabilities token by token; echo without logprobs is text only.
    pieces = list(api.completions.create(model=FIRST, prompt=context, max_tokens=6, logprobs=1, stream=True))
    streamed = [lp for p in pieces if p.choices and p.choices[0].logprobs for lp in p.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(gen.logprobs.token_logprobs, abs=1e-6)
    echoed = list(api.completions.create(model="base", prompt="Aromi is", max_tokens=3, echo=True, stream=True))
    assert "".join(p.choices[0].text for p in echoed).startswith("Aromi is") and echoed[0].choices[0].logprobs is None
    plain = api.completions.create(model="base", prompt="Aromi is", max_tokens=3, echo=True)
    assert plain.choices[0].text == "".join(p.choices[0].text for p in echoed) and plain.choices[0].logprobs is None

    # Chat: a content entry per generated token, its alternatives most likely first.
    chat = api.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hello"}], max_tokens=5,
                                       logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(e.top_logprobs) == 3 for e in content)
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob) and e.token == e.top_logprobs[0].token
               for e in content)  # greedy picks the most likely
    assert "".join(e.token for e in content).startswith(chat.choices[0].message.content)
    assert content[0].bytes == list(content[0].token.encode())
    chunks = list(api.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hello"}],
                                              max_tokens=5, logprobs=True, stream=True))
    assert [e.logprob for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content] == \
        pytest.approx([e.logprob for e in content], abs=1e-6)


def test_tokenizer_routes_answer_as_vllms_do(server, models):
    """What lm-evaluation-harness' remote tokenizer reads (it uses them when /tokenizer_info
    and /tokenize answer): then it needs no copy of the base model's tokenizer."""
    tok = models.engine.tokenizer
    info = httpx.get(f"{server}/tokenizer_info").json()
    assert (info["eos_token"], info["model_max_length"]) == (tok.eos_token, 256)
    said = httpx.post(f"{server}/tokenize", json={"prompt": "Aromi is", "add_special_tokens": False}).json()
    assert said["tokens"] == tok("Aromi is", add_special_tokens=False).input_ids and said["count"] == len(said["tokens"])
    assert httpx.post(f"{server}/detokenize", json={"tokens": said["tokens"]}).json() == {"prompt": "Aromi is"}
    messages = [{"role": "user", "content": "name[Aromi]"}]
    for name in (FIRST, "base"):  # a conversation in the named version's format: what its chat endpoint sends
        counted = httpx.post(f"{server}/tokenize", json={"model": name, "messages": messages}).json()
        answer = client(server).chat.completions.create(model=name, messages=messages, max_tokens=2)
        assert counted["count"] == answer.usage.prompt_tokens
    for route, body, status, param in [("tokenize", {"prompt": "x", "messages": messages}, 400, "prompt"),
                                       ("tokenize", {}, 400, "prompt"),
                                       ("tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
                                       ("detokenize", {"tokens": [10**7]}, 400, "tokens"),
                                       ("detokenize", {"tokens": ["a"]}, 400, "tokens.0")]:
        r = httpx.post(f"{server}/{route}", json=body)
        assert (r.status_code, r.json()["error"]["param"]) == (status, param), r.text


def test_a_version_is_loaded_on_request_and_names_never_reach_the_filesystem(project, models):
    assert models.resolve(FIRST).version == "v0.0.1"
    before = sorted(p.relative_to(project) for p in (project / CACHE).rglob("*"))
    for name in ("../../etc/passwd", "e2e-adapter@../../x", "e2e-adapter@v0.0.1/../..", "/etc@x", "", "e2e"):
        with pytest.raises(UnknownModel, match="served: base"):
            models.resolve(name)
    assert sorted(p.relative_to(project) for p in (project / CACHE).rglob("*")) == before


def test_a_version_trained_on_another_base_is_refused_and_prod_keeps_serving(project, models):
    other = Models(models.engine, project, project / "data/models/base", cache=project / CACHE)
    other._base_sha = "0" * 64  # as if another base model were served
    failures = other.refresh()
    assert len(failures) == 1 and "trained on another base model" in failures[0]
    with pytest.raises(NotServable, match="serve it with --base"):
        other.resolve(FIRST)
    assert other.aliases() == {}


BAD = [  # (body, status, param, words in the message)
    ({"model": "nope", "prompt": "x"}, 404, "model", "served: base, e2e-adapter"),
    ({"prompt": "x"}, 400, "model", "missing"),
    ({"model": "base"}, 400, "prompt", "missing"),
    ({"model": "base", "prompt": "x", "max_tokens": -1}, 400, "max_tokens", "outside [1, 1024]"),
    ({"model": "base", "prompt": "x", "max_tokens": 10**6}, 400, "max_tokens", "outside [1, 1024]"),
    ({"model": "base", "prompt": "x", "max_tokens": "12"}, 400, "max_tokens", "valid integer"),
    ({"model": "base", "prompt": "hello " * 400}, 400, "prompt", "context of 256"),
    ({"model": "base", "prompt": "x", "temperature": -1}, 400, "temperature", "greater than or equal to 0"),
    ({"model": "base", "prompt": "x", "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"model": "base", "prompt": "x", "temperature": float("nan")}, 400, "temperature", "finite number"),
    ({"model": "base", "prompt": "x", "num_beams": 2, "length_penalty": float("inf")}, 400, "length_penalty",
     "finite number"),
    ({"model": "base", "prompt": "x", "n": 99}, 400, "n", "rows a batch holds"),
    ({"model": "base", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"model": "base", "prompt": "x", "num_beams": 2, "temperature": 0.5}, 400, "temperature", "beam search"),
    ({"model": "base", "prompt": "x", "logprobs": 21}, 400, "logprobs", "less than or equal to 20"),
    ({"model": "base", "prompt": "x", "logprobs": 1, "num_beams": 2}, 400, "logprobs", "beam search"),
    ({"model": "base", "prompt": "x", "best_of": 2}, 400, "best_of", "not supported"),
    ({"model": "base", "prompt": "x", "seed": 2**63}, 400, "seed", "less than or equal to 9223372036854775807"),
    ({"model": "base", "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options",
     "only with stream: true"),
    ({"model": "base", "prompt": []}, 400, "prompt", "empty"),
    ({"model": "base", "prompt": [[5, 6], [10**7]]}, 400, "prompt.1", "ids must be in"),
    ({"model": "base", "prompt": [[5, 6], []]}, 400, "prompt.1", "must not be empty"),
    ({"model": FIRST, "prompt": ["name[Aromi]", ""]}, 400, "prompt.1.mr", "prompt.1.mr: must be non-empty"),
    ({"model": FIRST, "prompt": [{"mr": "name[Aromi]"}, {"mr": "x", "colour": "red"}]}, 400, "prompt.1",
     "'colour': not an input field"),
    ({"model": "base", "prompt": "x", "frobnicate": 1}, 400, "frobnicate", "not a parameter"),
    ({"model": "base", "prompt": {"mr": "x"}}, 400, "prompt", "no task template"),
    ({"model": FIRST, "prompt": {"mr": "x", "colour": "red"}}, 400, "prompt", "'colour': not an input field"),
    ({"model": FIRST, "prompt": {"mr": ""}}, 400, "prompt.mr", "non-empty text"),
]


@pytest.mark.parametrize("body, status, param, words", BAD, ids=[f"{b[2]}-{b[1]}" for b in BAD])
def test_bad_input_names_the_field(server, body, status, param, words):
    # json.dumps writes nan as NaN, which Python's json (the server's) reads; httpx's json= refuses it
    r = httpx.post(f"{server}/v1/completions", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_malformed_json_and_bad_chat_messages(server):
    r = httpx.post(f"{server}/v1/completions", content=b'{"model": "base", "prompt": ', headers={
        "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body" and "not a JSON object" in r.text
    r = httpx.post(f"{server}/v1/completions", json=["model", "base"])
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "base", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "base", "messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": FIRST, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "name[Aromi]"}]})
    assert r.status_code == 400 and "one user message holding its input (mr)" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "x"}],
                                                          "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = httpx.post(f"{server}/v1/completions", json={"model": "base", "prompt": "x" * (2 << 20)})
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"
    r = httpx.post(f"{server}/v1/completions", json={"model": "x" * 5000, "prompt": "x"})
    assert r.status_code == 404 and len(r.json()["error"]["message"]) < 400  # a client's string is not echoed whole
    with pytest.raises(openai.NotFoundError, match="e2e-adapter@v0.0.1"):
        client(server).chat.completions.create(model="e2e-adapter@v7", messages=[{"role": "user", "content": "x"}])


def test_health_and_metrics(server):
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["models"]["e2e-adapter"].startswith("e2e-adapter@v")

    def prompt_tokens() -> float:
        line = next(x for x in httpx.get(f"{server}/metrics").text.splitlines() if x.startswith("ptune_prompt_tokens_total"))
        return float(line.split()[-1])

    before = prompt_tokens()
    made = client(server).completions.create(model="base", prompt="Aromi", max_tokens=3, n=2)
    assert prompt_tokens() - before == made.usage.prompt_tokens  # n choices share one prefill
    text = httpx.get(f"{server}/metrics").text
    for name in ("ptune_queue_depth", "ptune_running_batch_size", "ptune_generated_tokens_total",
                 "ptune_generated_tokens_per_second", "ptune_request_latency_seconds_bucket",
                 "ptune_time_to_first_token_seconds_bucket"):
        assert name in text, name
    assert 'ptune_requests_total{endpoint="completions",model="base",status="ok"}' in text
    assert httpx.post(f"{server}/v1/completions", json={"model": "made-up-name", "prompt": "x"}).status_code == 404
    text = httpx.get(f"{server}/metrics").text
    assert 'model="-",status="404"' in text and "made-up-name" not in text  # a client's string is never a label


# -- security -----------------------------------------------------------------------


def test_an_api_key_is_required_when_set_and_compared_exactly(models):
    with running(create_app(models, api_key="s3cret-key", poll_seconds=None)) as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        with pytest.raises(openai.AuthenticationError):
            client(url, "s3cret-key-and-more").models.list()
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200  # a probe needs no key, and learns nothing
        assert client(url, "s3cret-key").completions.create(model="base", prompt="x", max_tokens=2).model == "base"


def test_a_wide_host_needs_a_key_and_says_so_at_start(project, monkeypatch):
    monkeypatch.delenv("PTUNE_API_KEY", raising=False)
    with pytest.raises(StageError, match="set PTUNE_API_KEY"):
        api_key_for("0.0.0.0")
    assert api_key_for("127.0.0.1") is None and api_key_for("::1") is None
    env = {k: v for k, v in env_for(project).items() if k != "PTUNE_API_KEY"}
    port = free_port()
    refused = subprocess.run(["ptune", "serve", "--host", "0.0.0.0", "--port", str(port)], cwd=project, env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "--host 0.0.0.0 serves beyond this machine" in refused.stderr
    assert "Traceback" not in refused.stderr
    proc = subprocess.Popen(["ptune", "serve", "--host", "0.0.0.0", "--port", str(port), "--poll", "60"], cwd=project,
                            env={**env, "PTUNE_API_KEY": "k"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        assert f"http://0.0.0.0:{port}/v1 serving base, e2e-adapter" in lines[0]
        assert "API key required" in lines[1]
        for _ in range(100):  # the banner comes just before uvicorn binds
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer k"})
                break
            except httpx.ConnectError:
                time.sleep(0.1)
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    assert proc.returncode == 0


def test_sigterm_drains_then_answers_what_is_left_503(project):
    """SIGTERM with requests in flight: they get --drain-seconds to finish (uvicorn alone waits
    without a bound), then what is left answers 503 (a stream: an error event), the process
    exits, and no client is left without an answer. Here the drain is 0: the cut at once."""
    port = free_port()
    proc = subprocess.Popen(["ptune", "serve", "--port", str(port), "--poll", "60", "--drain-seconds", "0"],
                            cwd=project, env=env_for(project), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):  # the banner comes just before uvicorn binds
            try:
                httpx.get(f"http://127.0.0.1:{port}/health")
                break
            except httpx.ConnectError:
                time.sleep(0.1)
        long = {"model": "base", "prompt": "Aromi is", "max_tokens": 200, "temperature": 1.0, "seed": 1}
        whole = ThreadPoolExecutor(1).submit(httpx.post, f"http://127.0.0.1:{port}/v1/completions", json=long,
                                             timeout=60)
        for _ in range(300):  # running before the stream starts, so both are cut
            if httpx.get(f"http://127.0.0.1:{port}/health").json()["running"]:
                break
            time.sleep(0.01)
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json={**long, "stream": True},
                          timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: ")) and not whole.done()
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert json.loads(rest[-1][len("data: "):])["error"]["code"] == "cancelled", rest[-1]
        answer = whole.result(60)
        assert answer.status_code == 503 and "shutting down" in answer.json()["error"]["message"]
        proc.wait(60)
        assert "end with 503" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


# -- load -----------------------------------------------------------------------------


STEP_S = 0.02  # the tiny model decodes a step in ~1 ms; a real one takes tens


@contextmanager
def slow_server(project: Path, max_queue: int):
    """A server whose engine decodes one row at real-model speed and lets ``max_queue`` requests wait."""
    engine = Engine(project / "data/models/base", max_batch=1, max_queue=max_queue)
    step = engine.step

    def slow_step():
        time.sleep(STEP_S)
        return step()

    engine.step = slow_step  # the engine's loop calls self.step()
    engine.start()
    served = Models(engine, project, project / "data/models/base")
    served.refresh()
    try:
        with running(create_app(served, poll_seconds=None)) as url:
            yield url, engine
    finally:
        engine.close()


@pytest.fixture(scope="module")
def small(project):
    with slow_server(project, max_queue=1) as both:
        yield both


def wait_for(check, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


LONG = {"model": "base", "prompt": "Aromi is", "max_tokens": 240}  # ~5 s at STEP_S, near the context


def test_a_full_queue_answers_429_with_retry_after(small):
    url, engine = small
    api = client(url)
    running_stream = api.completions.create(**LONG, stream=True)
    next(iter(running_stream))  # decoding: the batch's one row is taken
    waiting = ThreadPoolExecutor(1).submit(api.completions.create, **LONG)
    assert wait_for(lambda: engine.stats().waiting == 1)
    with pytest.raises(openai.RateLimitError) as caught:
        api.completions.create(**LONG)
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.body["code"] == "queue_full"
    running_stream.close()
    assert waiting.result(120).choices[0].finish_reason in ("stop", "length")  # the queue then drains


def test_a_batch_the_queue_cannot_hold_is_refused_whole(project):
    with slow_server(project, max_queue=2) as (url, engine):
        api = client(url)
        running_stream = api.completions.create(**LONG, stream=True)
        next(iter(running_stream))  # the one row is taken
        waiting = ThreadPoolExecutor(1).submit(api.completions.create, **LONG)
        assert wait_for(lambda: engine.stats().waiting == 1)
        with pytest.raises(openai.RateLimitError):  # its first prompt fits in the queue, its second does not
            api.completions.create(model="base", prompt=["Aromi is", "Alimentum is"], max_tokens=4)
        assert wait_for(lambda: engine.stats().waiting == 1)  # the first left with it, at the next step
        with pytest.raises(openai.BadRequestError, match="3 prompts are more than this server queues"):
            api.completions.create(model="base", prompt=["a", "b", "c"], max_tokens=4)
        running_stream.close()
        assert waiting.result(120).choices[0].finish_reason in ("stop", "length")
        assert engine.stats().requests_finished == 3  # the stream, the cancelled prompt, the waiting one


def test_a_client_that_disconnects_frees_its_slot(small):
    url, engine = small
    api = client(url)
    stream = api.completions.create(**LONG, stream=True)
    next(iter(stream))
    assert wait_for(lambda: engine.stats().running == 1)  # counted at the end of the step that sent it
    stream.close()
    assert wait_for(lambda: engine.stats().running == 0, 5)
    with pytest.raises(httpx.ReadTimeout):  # not streamed: the server notices at its next look
        httpx.post(f"{url}/v1/completions", json=LONG, timeout=0.5)
    assert wait_for(lambda: engine.stats().running == 0 and engine.stats().waiting == 0, 5)
    assert 'status="disconnected"' in httpx.get(f"{url}/metrics").text


# -- the embedded model ---------------------------------------------------------------

def test_the_registered_real_adapter_serves_what_evaluate_scored(real_sliver, tmp_path):
    """SmolLM2-135M and the sliver run's registered e2e-adapter, in a clone of that run (the
    run is only read): the prod version's greedy answers equal its evaluate predictions."""
    project = real_sliver
    clone = tmp_path / "run"
    git(tmp_path, "clone", "-q", str(project), str(clone))
    run(clone, "dvc", "remote", "modify", "--local", "local", "url", str(project / "dvc-remote"))
    base = project / "data/models/base"
    engine = Engine(base, max_batch=8).start()
    try:
        served = Models(engine, clone, base)
        assert served.refresh() == []
        spec = served.aliases()["e2e-adapter"]
        rows = [r for r in evaluated(clone, spec, tmp_path) if r["system"] == "tuned"][:4]
        max_new = json.loads(git(clone, "show", f"{served.resolve(spec).commit}:data/eval/details.json"))[
            "decoding"]["max_new_tokens"]
        with running(create_app(served, poll_seconds=None)) as url:
            api = client(url)
            with ThreadPoolExecutor(len(rows)) as pool:
                answers = list(pool.map(lambda r: api.completions.create(
                    model="e2e-adapter", prompt=r["mr"], max_tokens=max_new), rows))
            assert all(a.model == spec for a in answers)
            assert [first_line(a.choices[0].text) for a in answers] == [r["prediction"] for r in rows]
            chat = api.chat.completions.create(model="base", max_tokens=12,
                                               messages=[{"role": "user", "content": "What is the capital of France?"}])
            assert "Paris" in chat.choices[0].message.content
    finally:
        engine.close()
