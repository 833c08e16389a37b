"""Tasks are declared in tasks/<name>.yaml: the three shipped ones load, a bad declaration
is refused with its file and key, and a new task needs its file and its sources, no code."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipelines.common import ConfigError
from pipelines.config import parse_params
from pipelines.shards import load_split, read_manifest
from pipelines.tasks import from_declaration, get_task, manifest_task, task_names
from tests.conftest import ROOT

TASKS = ROOT / "tasks"
REVIEWS = {  # a task of one's own: classification over two fields
    "kind": "classification",
    "fields": ["product", "text", "stars"],
    "labels": {1: "bad", 5: "good"},
    "group_key": "product",
    "target_field": "stars",
    "text_fields": ["text"],
    "prompt": "Product: {{ product }}\nReview: {{ text }}\nVerdict:",
    "target": " {{ verbalizer }}",
    "zero_shot": "Is this review of {{ product }} good or bad? One word.\n{{ text }}",
    "primary_metric": "accuracy",
}


def declare(root: Path, name: str, declaration: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.yaml").write_text(yaml.safe_dump(declaration, sort_keys=False))
    return root


def test_the_shipped_tasks_are_declared_and_load():
    assert task_names(TASKS) == ["e2e", "sst2", "stackexchange_chat", "stackexchange_qa"]
    e2e, sst2, chat, qa = (get_task(n, TASKS) for n in task_names(TASKS))
    assert (chat.kind, chat.fields, chat.prompt) == ("chat", ("messages",), "") and chat.system
    assert (e2e.kind, e2e.group_key, e2e.primary_metric) == ("generation", "mr", "bleu")
    assert sst2.labels == {"0": "negative", "1": "positive"} and sst2.primary_metric == "accuracy"
    assert qa.fields == ("title", "question", "answer") and qa.primary_metric == "rouge_l"
    assert e2e.zero_shot.endswith("\nAttributes: {{ mr }}")  # a YAML block keeps the line break
    for task in (e2e, sst2, chat, qa):  # what the manifest carries reads back as the same task
        assert from_declaration(task.name, json.loads(json.dumps(task.declaration())), "x") == task


def test_label_values_read_as_yaml_numbers_are_the_strings_label_key_matches(tmp_path):
    task = get_task("reviews", declare(tmp_path, "reviews", REVIEWS))
    assert task.labels == {"1": "bad", "5": "good"}


@pytest.mark.parametrize("change, message", [
    ({"shape": "x"}, r"shape: Extra inputs are not permitted"),
    ({"kind": "ranking"}, r"kind: Input should be 'generation', 'classification' or 'chat'"),
    ({"group_key": "brand"}, r"group_key: 'brand' is not one of the fields \['product', 'text', 'stars'\]"),
    ({"target_field": "score"}, r"target_field: 'score' is not one of the fields"),
    ({"text_fields": ["body"]}, r"text_fields: \['body'\]: not among the fields"),
    ({"fields": ["text", "text"]}, r"fields: \['text', 'text'\]: a field is listed twice"),
    ({"fields": ["the text"]}, r"fields: \['the text'\]: a field is a template variable"),
    ({"labels": {1: "bad"}}, r"labels: a classification task names at least two labels"),
    ({"labels": {1: "ok", 5: "ok"}}, r"labels: .*two labels share a word"),
    ({"prompt": "Review: {{ txt }}"}, r"prompt: reads \['txt'\], which the task does not have"),
    ({"prompt": "{{ text }} -> {{ verbalizer }}"}, r"prompt: reads \['verbalizer'\]: the answer would be in the "
                                                   r"model's input"),
    ({"zero_shot": "{{ text }} ({{ stars }} stars)"}, r"zero_shot: reads \['stars'\]: the answer would be in"),
    ({"target": " {{ product }}"}, r"target: reads neither 'stars' nor 'verbalizer'"),
    ({"prompt": "Review: {{ text "}, r"prompt: not a valid Jinja2 template \(line 1: "),
    ({"prompt": ""}, r"prompt: a template is required"),
    ({"primary_metric": "bleu"}, r"primary_metric: 'bleu': a classification task's primary metric is one of "
                                 r"\['accuracy'\]"),
    ({"primary_metric": "macro_f1"}, r"primary_metric: 'macro_f1': .* \(it gates promotion, with intervals from "
                                     r"resampling the test rows\)"),
    ({"metrics": ["accuracy", "bleu"]}, r"metrics: \['bleu'\]: a classification task's metrics are among "
                                        r"\['accuracy', 'macro_f1'\]"),
    ({"metrics": ["macro_f1"]}, r"primary_metric: 'accuracy' is not among the declared metrics \['macro_f1'\]"),
    ({"optional_fields": ["body"]}, r"optional_fields: \['body'\]: not among the fields"),
    ({"optional_fields": ["product"]}, r"optional_fields: \['product'\]: the group key and the target field "
                                       r"cannot be optional"),
])
def test_a_bad_declaration_is_refused_naming_its_file_and_key(tmp_path, change, message):
    root = declare(tmp_path / "tasks", "reviews", {**REVIEWS, **change})
    with pytest.raises(ConfigError, match=rf"{root / 'reviews.yaml'}: {message}"):
        get_task("reviews", root)


def test_bad_labels_are_reported_once_not_again_as_a_template_reading_an_unknown_verbalizer(tmp_path):
    root = declare(tmp_path / "tasks", "reviews", {**REVIEWS, "labels": {1: "ok", 5: "ok"}})
    with pytest.raises(ConfigError) as caught:
        get_task("reviews", root)
    assert str(caught.value).count("\n  ") == 1 and "two labels share a word" in str(caught.value)


def test_a_generation_task_has_no_labels_and_not_meteor_as_its_gate(tmp_path):
    gen = {**REVIEWS, "kind": "generation", "labels": {}, "target": " {{ stars }}", "zero_shot": "{{ text }}",
           "prompt": "{{ text }}", "primary_metric": "rouge_l"}
    assert get_task("g", declare(tmp_path, "g", gen)).labels == {}
    with pytest.raises(ConfigError, match=r"labels: only a classification task has labels"):
        get_task("g", declare(tmp_path, "g", {**gen, "labels": {"a": "x", "b": "y"}}))
    for metric in ("meteor", "nist", "cider", "chrf"):  # no Java here, or not a mean over rows
        with pytest.raises(ConfigError, match=rf"primary_metric: '{metric}': a generation task's primary metric is "
                                              r"one of \['bleu', 'rouge_l', 'exact_match'\]"):
            get_task("g", declare(tmp_path, "g", {**gen, "primary_metric": metric}))
    declared = get_task("g", declare(tmp_path, "g", {**gen, "metrics": ["exact_match", "chrf"],
                                                     "primary_metric": "exact_match"}))
    assert declared.scored_metrics == ("exact_match", "chrf") and declared.row_metric == "exact_match"
    assert get_task("e2e", TASKS).row_metric == "rouge_l"  # BLEU resamples from n-gram statistics


def test_an_unknown_task_a_bad_name_and_a_file_that_is_no_declaration(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown task 'nope': no .*nope.yaml \(declared: e2e, sst2, "
                                          r"stackexchange_chat, stackexchange_qa\)"):
        get_task("nope", TASKS)
    with pytest.raises(ConfigError, match=r"task name 'My-Task': lowercase letters"):
        get_task("My-Task", declare(tmp_path, "My-Task", REVIEWS))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"list.yaml: expected a mapping of the task's keys, got list"):
        get_task("list", tmp_path)
    (tmp_path / "broken.yaml").write_text("kind: [generation\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML"):
        get_task("broken", tmp_path)


def test_params_naming_a_task_with_a_bad_declaration_are_refused_with_its_key(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    tasks = tmp_path / "tasks"
    for name in task_names(TASKS):
        (tasks / f"{name}.yaml").parent.mkdir(exist_ok=True)
        (tasks / f"{name}.yaml").write_text((TASKS / f"{name}.yaml").read_text())
    bad = yaml.safe_load((tasks / "e2e.yaml").read_text()) | {"group_key": "name"}
    declare(tasks, "e2e", bad)
    with pytest.raises(ConfigError, match=r"params.yaml: task.name: invalid task declaration:\n  .*e2e.yaml: "
                                          r"group_key: 'name' is not one of the fields \['mr', 'ref'\]"):
        parse_params(raw, tasks_dir=tasks)
    with pytest.raises(ConfigError, match=r"params.yaml: collect.sources.e2e: invalid task declaration:\n  .*e2e.yaml: "
                                          r"group_key: 'name'"):  # another task's sources, checked too
        parse_params({**raw, "task": {"name": "sst2"}}, tasks_dir=tasks)
    raw["collect"]["sources"]["reviews"] = raw["collect"]["sources"].pop("e2e")
    with pytest.raises(ConfigError, match=r"collect.sources.reviews: no task 'reviews' \(no .*reviews.yaml\)"):
        parse_params({**raw, "task": {"name": "sst2"}}, tasks_dir=tasks)


def _own_project(tmp_path, name: str, declaration: dict, lines: list, columns: dict, filters: dict) -> Path:
    """A project with task ``name`` declared, one JSONL source of ``lines`` and the shipped params."""
    project = tmp_path / "project"
    declare(project / "tasks", name, declaration)
    source = project / f"data/sources/{name}/{name}.jsonl"
    source.parent.mkdir(parents=True)
    source.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["task"]["name"] = name
    raw["collect"]["sources"] = {name: [{"name": "mine", "uri": f"data/sources/{name}/{name}.jsonl",
                                         "columns": columns, "splits": {"train": 0.6, "validation": 0.2,
                                                                        "test": 0.2}}]}
    raw["package"]["datasets"] = {}  # hub ids of the shipped tasks' data
    raw["clean"]["filters"] = filters
    raw["clean"]["dedup"] = {"exact": True, "near": {"enabled": False}}
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    return project


def _stages(project: Path, name: str, tiny_base: Path):
    """collect, clean and tokenize as `dvc repro` runs them: the task, the splits, the shards."""
    from pipelines import clean, collect, tokenize
    from pipelines.config import load_params

    params = load_params(project / "params.yaml")
    task = get_task(name, project / "tasks")
    collect.run(params.collect, task, project, project / "data/raw")
    clean.run(params.clean, task, project / "data/raw", project / "data/clean")
    tokenize.run(params.tokenize, task, project / "data/clean", tiny_base, project / "data/shards")
    manifest = read_manifest(project / "data/shards")
    assert manifest["task"] == name and manifest_task(manifest, "manifest") == task
    splits = {s: [json.loads(line) for line in (project / f"data/clean/{s}.jsonl").open()] for s in
              ("train", "validation", "test")}
    return task, splits, load_split(project / "data/shards", "train")


def test_a_task_of_ones_own_is_collected_cleaned_and_tokenized_with_no_code(tmp_path, tiny_base):
    """The file, the declaration, the stages: what the README's "Bring your own data" promises."""
    rows = [{"product": f"p{i % 12}", "text": f"Review number {i} of product {i % 12}: it was {w} overall.",
             "stars": 5 if i % 2 else 1} for i, w in zip(range(60), ["fine", "poor"] * 30)]
    project = _own_project(tmp_path, "reviews", REVIEWS, rows,
                           {"product": "product", "text": "text", "stars": "stars"},
                           {"unicode": {}, "whitespace": {}, "label": {}})
    _, splits, train = _stages(project, "reviews", tiny_base)
    assert sum(map(len, splits.values())) == 60
    groups = {s: {r["product"] for r in rs} for s, rs in splits.items()}  # grouped by the declared key
    assert not groups["train"] & groups["test"] and not groups["train"] & groups["validation"]
    assert len(train) == len(splits["train"])
    # the declared verbalizer is what the model learns: the labelled tokens spell " good" or " bad"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    answers = {tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100])
               for row in train}
    assert answers <= {" good" + tok.eos_token, " bad" + tok.eos_token} and len(answers) == 2


ALPACA = {  # instruction data as Stanford Alpaca ships it: `input` is empty for most records
    "kind": "generation",
    "fields": ["instruction", "input", "output"],
    "group_key": "instruction",
    "target_field": "output",
    "text_fields": ["instruction", "input", "output"],
    "optional_fields": ["input"],
    "prompt": "### Instruction:\n{{ instruction }}\n{% if input %}\n### Input:\n{{ input }}\n{% endif %}"
              "\n### Response:\n",
    "target": "{{ output }}",
    "zero_shot": "{{ instruction }}{% if input %}\n\n{{ input }}{% endif %}",
    "primary_metric": "rouge_l",
}


def test_instruction_data_with_an_optional_input_is_read_as_alpaca_ships_it(tmp_path, tiny_base):
    rows = [{"instruction": f"Name a colour that rhymes with word {i}.", "output": f"Colour number {i} is red."}
            for i in range(40)]  # no `input` key: the field is empty
    for i in range(0, 40, 4):
        rows[i]["input"] = f"The word is number {i}."
    rows[1]["input"], rows[2]["input"] = None, ""  # null and "" mean no input as well
    bad = [{"instruction": "", "input": "x", "output": "an answer"},  # the instruction is required
           {"instruction": "Count.", "input": 5, "output": "five"},  # optional, but text when given
           {"input": "no instruction at all", "output": "?"}]
    project = _own_project(tmp_path, "alpaca", ALPACA, rows + bad,
                           {"instruction": "instruction", "input": "input", "output": "output"},
                           {"unicode": {}, "whitespace": {}, "length": {"min_chars": 1, "min_words": 1}})
    task, splits, train = _stages(project, "alpaca", tiny_base)
    assert task.required_fields == ("instruction", "output") and task.input_fields == ("instruction", "input")
    quarantined = [json.loads(line) for line in (project / "data/raw/quarantine.jsonl").open()]
    assert [(q["location"].rsplit(":", 1)[1], q["reason"]) for q in quarantined] == [
        ("41", "empty_field"), ("42", "bad_value"), ("43", "missing_field")]
    assert "field 'input' is a number (5), not a string or null" in quarantined[1]["detail"]
    records = {r["instruction"]: r for rs in splits.values() for r in rs}
    assert len(records) == 40  # none removed for an empty optional field
    assert records["Name a colour that rhymes with word 1."]["input"] == ""
    assert records["Name a colour that rhymes with word 4."]["input"] == "The word is number 4."
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    sources = [tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab == -100]) for row in train]
    with_input = [s for s in sources if "### Input:" in s]
    assert with_input and len(with_input) < len(sources)  # the template's {% if input %} decided, per record
    assert all(s.endswith("\n### Response:\n") for s in sources)


def test_ptune_tasks_lists_each_declaration_and_fails_on_a_bad_one(tmp_path, capsys):
    from pipelines.cli import main

    declare(tmp_path / "tasks", "reviews", REVIEWS)
    assert main(["--params", str(tmp_path / "params.yaml"), "tasks"]) == 0
    assert "reviews              classification: fields ['product', 'text', 'stars'], grouped by product, " \
           "primary metric accuracy, labels ['bad', 'good']" in capsys.readouterr().out
    declare(tmp_path / "tasks", "worse", {**REVIEWS, "group_key": "brand"})
    assert main(["--params", str(tmp_path / "params.yaml"), "tasks"]) == 1
    out, err = capsys.readouterr()
    assert "worse                INVALID (below)" in out and "reviews              classification" in out
    assert "worse.yaml: group_key: 'brand' is not one of the fields" in err


def test_the_readmes_declaration_is_the_one_tested_here():
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("# tasks/alpaca.yaml\n"):]
    assert yaml.safe_load(block[:block.index("```")]) == ALPACA
