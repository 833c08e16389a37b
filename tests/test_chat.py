"""Chat tasks: conversations read (OpenAI and ShareGPT layouts, or built from flat columns),
checked, cleaned turn by turn, rendered with the base model's chat template with the loss on
every assistant turn, truncated by whole earliest exchanges, evaluated on the final answer
and served as conversations."""
from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from pipelines import conversations, tokenize
from pipelines.common import ConfigError, StageError
from pipelines.config import TokenizeConfig
from pipelines.prompts import PromptFormat
from pipelines.shards import IGNORE
from pipelines.tasks import from_declaration
from tests.test_tasks import _own_project, _stages

CHAT = {  # the README's chat declaration
    "kind": "chat",
    "fields": ["messages"],
    "group_key": "messages",
    "target_field": "messages",
    "system": "You are a helpful assistant.",
    "metrics": ["rouge_l", "chrf", "exact_match"],
    "primary_metric": "rouge_l",
}
TASK = from_declaration("support", CHAT, "tasks/support.yaml")


def conversation(i: int, exchanges: int = 2, system: bool = False) -> list[dict]:
    turns = [{"role": "system", "content": f"System prompt {i}."}] if system else []
    for j in range(exchanges):
        turns += [{"role": "user", "content": f"Question {j} of conversation {i}?"},
                  {"role": "assistant", "content": f"Answer {j} of conversation {i}."}]
    return turns


@pytest.mark.parametrize("turns, reason, detail", [
    ([{"role": "robot", "content": "hi"}], "unknown_role", "turn 0: role 'robot' is none of"),
    ([{"role": "user", "content": ["a", "list"]}, {"role": "assistant", "content": "x"}], "bad_content",
     "turn 0 (user): content is an array, not a string or an array of text parts"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
      {"role": "assistant", "content": "x"}], "bad_content", "turn 0 (user): content is an array, not a string"),
    ([{"role": "user", "content": [{"type": "text", "text": " "}]}, {"role": "assistant", "content": "x"}],
     "empty_content", "turn 0 (user): content is empty"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "empty_content",
     "turn 1 (assistant): content is empty or only whitespace"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}], "no_assistant_turn",
     "2 turn(s), none of them the assistant's"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], "turn_order",
     "turn 0 is assistant's where user's was due"),
    ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
     "turn_order", "turn 1 is system's where assistant's was due"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}],
     "turn_order", "the last turn (2) is the user's"),
    ("not json", "bad_value", "a string that is not a JSON array of turns"),
    ([], "bad_value", "an empty array"),
    ([{"content": "who?"}], "bad_value", "turn 0 has neither `role` (OpenAI) nor `from` (ShareGPT)"),
])
def test_a_bad_conversation_is_named_with_its_reason(turns, reason, detail):
    messages, problem = conversations.read(turns)
    assert messages is None or problem is not None
    assert problem.reason == reason and detail in problem.detail


def test_openai_text_parts_are_read_as_the_text_they_join():
    """OpenAI's layout lets a content be an array of text parts (the server takes them too);
    they were quarantined as bad_content."""
    parts = [{"type": "text", "text": "Question "}, {"type": "text", "text": "one?"}]
    messages, problem = conversations.read([{"role": "user", "content": parts}, {"role": "assistant", "content": "A."}])
    assert problem is None and messages[0] == {"role": "user", "content": "Question one?"}
    assert conversations.content_text([]) == "" and conversations.content_text([{"type": "text"}]) is None


def test_sharegpt_turns_and_json_cells_read_as_openai_turns():
    sharegpt = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"},
                {"from": "gpt", "value": "Hello."}]
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."}]
    assert conversations.read(sharegpt) == (expected, None)
    assert conversations.read(json.dumps(expected)) == (expected, None)  # a CSV cell holding JSON


@pytest.mark.parametrize("change, message", [
    ({"prompt": "Q: {{ messages }}"}, "prompt: a chat task has no templates"),
    ({"fields": ["messages", "topic"]}, "fields: a chat task has one field, [messages]"),
    ({"kind": "generation", "prompt": "{{ messages }}", "target": "x", "zero_shot": "y"},
     "system: only a chat task has a system prompt"),
    ({"kind": "generation", "system": "", "target": "x", "zero_shot": "y"}, "prompt: a template is required"),
    ({"labels": {"0": "no", "1": "yes"}}, "labels: only a classification task has labels"),
])
def test_a_bad_chat_declaration_names_its_key(change, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_declaration("support", {**CHAT, **change}, "tasks/support.yaml")


def _encoded(tok, records: list[dict], max_length: int = 256, truncation: str = "source") -> tokenize.Encoded:
    fmt = PromptFormat(TASK, tok)
    encoder = tokenize.Encoder(fmt, tok, TokenizeConfig(max_length=max_length, truncation=truncation, shard_rows=100), [])
    return encoder(("train", "train.jsonl", 1, [json.dumps(r) for r in records]))


def test_the_loss_falls_on_every_assistant_turn_token_by_token(tiny_base):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    turns = conversation(0, exchanges=3)
    enc = _encoded(tok, [{"id": "c0", "messages": turns}])
    ids, labels = enc.input_ids.tolist(), enc.labels.tolist()
    with_system = [{"role": "system", "content": CHAT["system"]}, *turns]  # the task's, where it brings none
    assert ids == list(tok.apply_chat_template(with_system, tokenize=True, return_dict=False))
    # the labelled tokens, in runs, are exactly each assistant turn and the markup that closes it
    runs, run = [], []
    for token, label in zip(ids, labels):
        assert label in (IGNORE, token)
        if label == IGNORE and run:
            runs.append(run)
            run = []
        elif label != IGNORE:
            run.append(token)
    runs.append(run) if run else None
    assert [tok.decode(r) for r in runs] == [f"{t['content']}<|im_end|>\n" for t in turns if t["role"] == "assistant"]
    # the user turns and the system prompt carry no loss; the assistant header is context too
    unlabelled = tok.decode([t for t, label in zip(ids, labels) if label == IGNORE])
    assert "Question 0 of conversation 0?" in unlabelled and "Answer" not in unlabelled
    assert enc.source_len.tolist() == [labels.index(next(lab for lab in labels if lab != IGNORE))]


def test_too_long_conversations_lose_whole_earliest_exchanges_never_the_scored_one(tiny_base):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    records = [{"id": "long", "messages": conversation(1, exchanges=6, system=True)}]
    whole = len(_encoded(tok, records, max_length=1000).input_ids)
    last = conversation(1, exchanges=6, system=True)
    fits_two = len(tok.apply_chat_template([last[0], *last[-4:]], tokenize=True, return_dict=False))
    enc = _encoded(tok, records, max_length=fits_two)
    assert enc.truncated == [{"id": "long", "split": "train", "reason": "turns", "tokens_before": whole,
                              "tokens_after": fits_two}]
    kept = tok.decode(enc.input_ids)
    assert kept.startswith("<|im_start|>system\nSystem prompt 1.") and "Question 3 of" not in kept
    assert "Question 4 of" in kept and kept.endswith("Answer 5 of conversation 1.<|im_end|>\n")
    # the last exchange alone over the limit: dropped, never cut; with truncation: drop, at once
    assert [d["reason"] for d in _encoded(tok, records, max_length=12).dropped] == ["target_too_long"]
    assert [d["reason"] for d in _encoded(tok, records, max_length=fits_two, truncation="drop").dropped] == [
        "too_long"]


def test_a_chat_task_needs_a_chat_template_and_no_few_shot(tiny_base, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    tok.chat_template = None
    with pytest.raises(StageError, match="a chat task, but the base model's tokenizer has no chat template"):
        PromptFormat(TASK, tok)
    with pytest.raises(StageError, match="tokenize.few_shot=2: task 'support' is a chat task"):
        tokenize.run(TokenizeConfig(max_length=64, few_shot=2, shard_rows=100), TASK, _clean_dir(tmp_path), tiny_base,
                     tmp_path / "shards")


def _clean_dir(tmp_path):
    clean = tmp_path / "clean"
    clean.mkdir()
    for split in ("train", "validation", "test"):
        (clean / f"{split}.jsonl").write_text(json.dumps({"id": f"{split}:1", "messages": conversation(1)}) + "\n")
    return clean


def _chat_rows() -> list:
    rows = [{"messages": conversation(i, exchanges=1 + i % 3, system=i % 2 == 0)} for i in range(40)]
    rows[3]["messages"][0]["content"] += " Mail me at jane.doe@example.com please."  # PII, in a user turn
    rows[5]["messages"][1]["content"] += " Call +1 415 555 0100."  # and in an assistant turn
    rows.append({"messages": conversation(7, exchanges=1 + 7 % 3, system=False)})  # a copy of row 7
    rows.append({"messages": [{"from": "human", "value": "Question 0 of conversation 90?"},
                              {"from": "gpt", "value": "Answer 0 of conversation 90."}]})  # ShareGPT layout
    same_question = conversation(91, exchanges=1)  # asked again, answered differently: one group
    rows += [{"messages": same_question},
             {"messages": [same_question[0], {"role": "assistant", "content": "Another answer entirely."}]}]
    bad = [{"messages": [{"role": "robot", "content": "x"}]},
           {"messages": [{"role": "user", "content": 12}, {"role": "assistant", "content": "x"}]},
           {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]},
           {"messages": [{"role": "user", "content": "only a question"}]},
           {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q again"},
                         {"role": "assistant", "content": "a"}]},
           {"messages": "no conversation"}]
    return rows + bad


def test_conversations_are_collected_cleaned_per_turn_and_split_by_their_opening(tmp_path, tiny_base):
    project = _own_project(tmp_path, "support", CHAT, _chat_rows(), {"messages": "messages"},
                           {"unicode": {}, "whitespace": {}, "pii": {"kinds": ["email", "phone"]}, "length": {}})
    task, splits, train = _stages(project, "support", tiny_base)
    quarantined = [json.loads(line) for line in (project / "data/raw/quarantine.jsonl").open()]
    assert [q["reason"] for q in quarantined] == ["unknown_role", "bad_content", "empty_content",
                                                  "no_assistant_turn", "turn_order", "bad_value"]
    assert quarantined[1]["detail"] == ("field 'messages': turn 0 (user): content is a number, not a string or an "
                                        "array of text parts ({type: text, text})")
    records = {r["id"]: r for rs in splits.values() for r in rs}
    assert len(records) == 43  # 44 read, one exact copy removed
    removed = [json.loads(line) for line in (project / "data/clean/removed/duplicate.jsonl").open()]
    assert [r["id"] for r in removed] == ["mine:41"] and "same text as mine:8" in removed[0]["detail"]
    assert "<EMAIL>" in records["mine:4"]["messages"][0]["content"]  # every turn scrubbed
    assert "<PHONE>" in records["mine:6"]["messages"][1]["content"]
    assert records["mine:42"]["messages"][1] == {"role": "assistant", "content": "Answer 0 of conversation 90."}
    split_of = {rid: s for s, rs in splits.items() for r in rs for rid in [r["id"]]}
    assert split_of["mine:43"] == split_of["mine:44"]  # the same opening: the same split
    assert len(train) == len(splits["train"])


def test_a_source_in_flat_columns_becomes_a_conversation_with_turns(tmp_path, tiny_base):
    rows = [{"title": f"Title {i}", "body": f"Body of question {i}.", "answer": f"The answer is {i}."}
            for i in range(30)] + [{"title": "t", "body": "b", "answer": ""}]
    project = _own_project(tmp_path, "support", CHAT, rows, {"title": "title", "body": "body", "answer": "answer"},
                           {"unicode": {}})
    import yaml
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["collect"]["sources"]["support"][0]["turns"] = [
        {"role": "user", "content": "{{ title }}\n\n{{ body }}"}, {"role": "assistant", "content": "{{ answer }}"}]
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    _, splits, _ = _stages(project, "support", tiny_base)
    records = {r["id"]: r for rs in splits.values() for r in rs}
    assert records["mine:1"]["messages"] == [{"role": "user", "content": "Title 0\n\nBody of question 0."},
                                             {"role": "assistant", "content": "The answer is 0."}]
    quarantined = [json.loads(line) for line in (project / "data/raw/quarantine.jsonl").open()]
    assert [q["reason"] for q in quarantined] == ["empty_field"]
    params["collect"]["sources"]["support"][0]["turns"][0]["content"] = "{{ headline }}"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    from pipelines.config import load_params
    with pytest.raises(ConfigError, match=r"turns.0.content reads \['headline'\], which `columns` does not name"):
        load_params(project / "params.yaml")


def test_a_chat_adapter_is_tuned_scored_on_the_final_answer_and_served_as_evaluate_prompted(tmp_path):
    """Prompt tuning on conversations; evaluate and the baselines score each test conversation's
    final answer; the server, sent the same conversation, prompts and answers as evaluate did."""
    import torch

    from tests.conftest import build_tiny_model, liven
    tiny_base = liven(build_tiny_model(tmp_path / "base"))  # answers that vary (and are not empty)

    from pipelines import baselines, evaluate, tune
    from pipelines.config import EvaluateConfig
    from pipelines.evaluate import TunedPrompts
    from serving.engine import Engine
    from serving.models import BadRequest, Served
    from serving.types import Decoding, Request
    from tests.test_tune import tune_cfg

    project = _own_project(tmp_path, "support", CHAT, _chat_rows()[:44], {"messages": "messages"}, {"unicode": {}})
    task, splits, _ = _stages(project, "support", tiny_base)
    tune.run(tune_cfg("prompt", epochs=1), project / "data/shards", tiny_base, tmp_path / "adapter", tmp_path / "live")
    cfg = EvaluateConfig(batch_size=4, max_new_tokens=6, few_shot_k=1)
    record = evaluate.run(cfg, task, project / "data/clean", tiny_base, tmp_path / "adapter", tmp_path / "eval",
                          shards=project / "data/shards")
    assert record["systems"] == ["tuned", "zero_shot", "few_shot"]
    assert set(record["tuned"]) == {"rouge_l", "chrf", "exact_match"}
    test = {r["id"]: r for r in splits["test"]}
    predictions = [json.loads(line) for line in (tmp_path / "eval/predictions.jsonl").open()]
    tok = AutoTokenizer.from_pretrained(tiny_base)
    prompt_of: dict[str, str] = {}
    for p in predictions:  # tuned, zero_shot, few_shot, in that order
        turns = conversations.with_system(test[p["id"]]["messages"], CHAT["system"])
        history = test[p["id"]]["messages"][:-1]  # one row per history: every final answer to it is a reference
        assert p["references"] == [r["messages"][-1]["content"] for r in splits["test"] if r["messages"][:-1] == history]
        if p["system"] in ("tuned", "zero_shot"):  # the conversation so far, and the assistant's header
            assert p["prompt"] == prompt_of.setdefault(p["id"], conversations.prompt(tok, turns[:-1]))
        else:  # an exchange of a train conversation between the system prompt and the conversation
            assert p["prompt"].startswith(f"<|im_start|>system\n{turns[0]['content']}<|im_end|>\n<|im_start|>user\n")
            assert p["prompt"].endswith(conversations.prompt(tok, turns[1:-1])) and p["prompt"] != prompt_of[p["id"]]
    # served: the client's conversation (no system message: the task's is added), then greedy decoding
    prompts = TunedPrompts.from_dir(task, tok, project / "data/shards", tiny_base)
    served = Served("support-adapter@v1", "prompt", "support-adapter", "v1", "c" * 40, task, prompts)
    first = next(p for p in predictions if p["system"] == "tuned")
    text = served.format_chat(test[first["id"]]["messages"][:-1], tok)  # as a client sends it
    assert text == first["prompt"]
    engine = Engine(tiny_base, max_batch=4, device="cpu", dtype=torch.float32)
    try:
        engine.add("tuned", tmp_path / "adapter")
        (choice,), = engine.generate([Request("tuned", engine.encode(text), Decoding(max_tokens=6))])
        assert choice.text.strip() == first["prediction"]
    finally:
        engine.close()
    assert served.format_text("Question 0 of conversation 5?") == conversations.prompt(
        tok, [{"role": "system", "content": CHAT["system"]}, {"role": "user", "content": "Question 0 of conversation 5?"}])
    with pytest.raises(BadRequest, match="the last message is the assistant.s: a chat adapter answers"):
        served.format_chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], tok)
    with pytest.raises(BadRequest, match="role 'robot' is none of"):
        served.format_chat([{"role": "robot", "content": "q"}], tok)
    with pytest.raises(BadRequest, match="send its messages to /v1/chat/completions"):
        served.format_fields({"messages": "q"})
    baselines_record = baselines.run(cfg, task, project / "data/clean", tiny_base, tmp_path / "baselines")
    assert set(baselines_record) == {"zero_shot", "few_shot"}


def test_the_readmes_chat_declaration_is_the_one_tested_here():
    import yaml

    from tests.conftest import ROOT
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("# tasks/support.yaml\n"):]
    assert yaml.safe_load(block[:block.index("```")]) == CHAT


@pytest.fixture(scope="module")
def chat_shards(tmp_path_factory):
    """A tiny lively model and shards of conversations cut for it."""
    from tests.conftest import build_tiny_model, liven

    root = tmp_path_factory.mktemp("chat")
    base = liven(build_tiny_model(root / "base"))
    clean = root / "clean"
    clean.mkdir()
    for split, ids in (("train", range(12)), ("validation", range(12, 14)), ("test", range(14, 16))):
        (clean / f"{split}.jsonl").write_text("".join(
            json.dumps({"id": f"c{i}", "messages": conversation(i, 1 + i % 2, i % 3 == 0)}) + "\n" for i in ids))
    tokenize.run(TokenizeConfig(max_length=128, shard_rows=100), TASK, clean, base, root / "shards")
    return base, root / "shards"


@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix", "lora", "full"])
def test_every_method_tunes_on_conversations_and_decodes_a_conversation_as_trained(method, chat_shards, tmp_path):
    """The soft prompt, prefix or LoRA weights sit where training put them: before the whole
    rendered conversation. The engine that evaluate and the server share decodes a chat prompt
    token for token as PEFT's training forward does."""
    import torch

    from pipelines import tune
    from serving.engine import Engine
    from tests.test_engine import alone, greedy, trained
    from tests.test_tune import tune_cfg

    base, shards = chat_shards
    stats = tune.run(tune_cfg(method, epochs=1), shards, base, tmp_path / "adapter", tmp_path / "live")
    assert stats.steps > 0 and stats.train_loss == stats.train_loss
    tok = AutoTokenizer.from_pretrained(base)
    prompt = PromptFormat(TASK, tok).prompt({"id": "x", "messages": conversation(99, 2)})
    assert prompt.endswith("Question 1 of conversation 99?<|im_end|>\n<|im_start|>assistant\n")
    engine = Engine(base, max_batch=4, device="cpu", dtype=torch.float32)
    try:
        engine.add(method, tmp_path / "adapter")
        ids = engine.encode(prompt)
        assert list(alone(engine, greedy(method, ids))[0].token_ids) == trained(base, {method: tmp_path / "adapter"},
                                                                                method, ids)
    finally:
        engine.close()


@pytest.mark.slow
def test_the_shipped_chat_task_runs_registers_and_is_served_as_evaluate_scored(tmp_path):
    """`stackexchange_chat` end to end on a tiny model: the real dumps built into conversations by
    `turns`, `dvc repro`, `ptune register`, then `ptune serve`'s app driven by the `openai`
    client: a test conversation sent as chat messages, and its question as plain text, get the
    answer evaluate scored for it."""
    from concurrent.futures import ThreadPoolExecutor

    from serving.engine import Engine
    from serving.models import Models
    from serving.server import create_app
    from tests.conftest import build_tiny_model, liven
    from tests.pipeline_project import make_project, run
    from tests.test_pipeline import TINY
    from tests.test_serve import client, running

    base = liven(build_tiny_model(tmp_path / "tiny_base", context=2048))  # SE posts in a 400-token vocabulary
    project = make_project(tmp_path, {
        **TINY, "task.name": "stackexchange_chat", "base_model.source": str(base), "collect.max_records_per_source": 120,
        "tokenize.max_length": 2048, "evaluate.few_shot_k": 0, "evaluate.min_nonempty_fraction": 0.01,
        "register.min_margin_over_zero_shot": 0.0, "register.prod_tolerance": 100.0})
    run(project, "dvc", "repro")
    assert "registered stackexchange_chat-adapter v0.0.1" in run(project, "ptune", "register").stdout
    test = {r["id"]: r for r in map(json.loads, (project / "data/clean/test.jsonl").read_text().splitlines())}
    rows = [json.loads(line) for line in (project / "data/eval/predictions.jsonl").read_text().splitlines()]
    tuned = [r for r in rows if r["system"] == "tuned"]
    assert tuned and all(test[r["id"]]["messages"][-1]["content"] in r["references"] for r in tuned)
    engine = Engine(project / "data/models/base", max_batch=8).start()
    try:
        models = Models(engine, project, project / "data/models/base")
        assert models.refresh() == []
        with running(create_app(models, poll_seconds=None)) as url:
            api = client(url)
            listed = {m.id: m for m in api.models.list().data}
            assert listed["stackexchange_chat-adapter"].ptune["task"] == "stackexchange_chat"

            def ask(row):
                messages = test[row["id"]]["messages"][:-1]  # the conversation so far, as a client sends it
                chat = api.chat.completions.create(model="stackexchange_chat-adapter", messages=messages,
                                                   max_tokens=TINY["evaluate.max_new_tokens"], temperature=0)
                text = api.completions.create(model="stackexchange_chat-adapter", prompt=messages[-1]["content"],
                                              max_tokens=TINY["evaluate.max_new_tokens"], temperature=0)
                return chat.choices[0].message.content, text.choices[0].text

            with ThreadPoolExecutor(len(tuned)) as pool:
                answers = list(pool.map(ask, tuned))
            assert [a.strip() for a, _ in answers] == [r["prediction"] for r in tuned]
            assert [t.strip() for _, t in answers] == [r["prediction"] for r in tuned]  # no system turn in `turns`
    finally:
        engine.close()
