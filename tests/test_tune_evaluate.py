import json

import pytest
import torch

from pipelines import evaluate, tokenize, tune
from pipelines.config import EvaluateConfig, PromptMethodConfig, TokenizeConfig, TuneConfig
from pipelines.tasks import get_task
from tests.test_tokenize import ROWS, write_clean

E2E = get_task("e2e")


def tune_cfg(method, **kw):
    pm = PromptMethodConfig(num_virtual_tokens=4, init="random")
    base = dict(method=method, epochs=2, batch_size=2, learning_rate=1e-2, eval_examples=1,
                prompt=pm, prefix=pm, ptuning=pm, encoder_hidden_size=16, lora_r=2, lora_alpha=4)
    return TuneConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_base):
    d = tmp_path_factory.mktemp("data")
    clean = write_clean(d / "clean", {**ROWS, "test": ROWS["train"]})
    tokenize.run(TokenizeConfig(max_length=64, shard_rows=100), E2E, clean, tiny_base, d / "shards")
    return d


@pytest.mark.parametrize("method", ["prompt", "prefix", "ptuning", "lora", "full"])
def test_every_method_trains_saves_and_records_provenance(method, shards, tiny_base, tmp_path):
    before = sorted(p.relative_to(shards) for p in (shards / "shards").rglob("*"))
    stats = tune.run(tune_cfg(method), shards / "shards", tiny_base, tmp_path / "adapter", tmp_path / "live")
    assert stats.steps == 4 and stats.train_loss == stats.train_loss  # finite, not NaN
    info = json.loads((tmp_path / "adapter" / "ptune_adapter.json").read_text())
    assert info["stats"]["trainable_parameters"] == stats.trainable_parameters > 0
    assert info["config"]["method"] == method
    assert info["data"]["manifest_sha256"] and info["data"]["train_shards"]
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert ("model.safetensors" if method == "full" else "adapter_model.safetensors") in files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    if method == "full":
        assert stats.trainable_share == 1.0
    else:
        assert stats.trainable_share < 0.5
    assert (tmp_path / "live" / "metrics.json").is_file()
    assert sorted(p.relative_to(shards) for p in (shards / "shards").rglob("*")) == before  # read-only


def test_lora_learns_the_training_targets(shards, tiny_base, tmp_path):
    """The adapter alone (base weights frozen) must lower the loss on what it saw."""
    cfg = tune_cfg("lora", epochs=30, learning_rate=3e-2, eval_examples=0, lora_r=8, lora_alpha=16)
    stats = tune.run(cfg, shards / "shards", tiny_base, tmp_path / "adapter", tmp_path / "live")
    rows = (tmp_path / "live" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()
    losses = [float(r.split("\t")[-1]) for r in rows[1:]]
    assert len(losses) >= 4
    assert losses[-1] < losses[0] - 0.15, losses  # DVCLive's curve, as `dvc plots` shows it


def test_prompt_init_text_requires_text(tiny_base):
    cfg = tune_cfg("prompt", prompt=PromptMethodConfig(num_virtual_tokens=4, init="text"))
    from pipelines.common import StageError
    with pytest.raises(StageError, match="init_text"):
        tune.build_peft_config(cfg, tiny_base)


def test_generation_metrics_use_every_reference():
    hyps = ["Aromi is a Chinese coffee shop.", "B is by the river."]
    one = evaluate.generation_metrics(hyps, [["Aromi serves food."], ["B is by the river."]])[0]
    both = evaluate.generation_metrics(hyps, [["Aromi serves food.", "Aromi is a Chinese coffee shop."],
                                             ["B is by the river."]])[0]
    assert both["bleu"] == 100.0 and one["bleu"] < 100.0
    assert both["rouge_l"] == 100.0


def test_classification_metrics():
    m, per_row = evaluate.classification_metrics(["1", "1", "0", "0"], ["1", "0", "0", "0"], ["0", "1"])
    assert m["accuracy"] == 75.0 and per_row == [100.0, 0.0, 100.0, 100.0]
    assert m["macro_f1"] == pytest.approx(100 * (0.8 + 2 / 3) / 2, abs=0.01)


def test_rank_scores_match_sequence_log_probability(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    prompts, options = ["Review: bleak\nSentiment:", "Review: it 's a charming journey\nSentiment:"], [" positive", " negative"]
    scores = evaluate.rank_scores(model, tok, prompts, options, batch_size=3, device="cpu")
    p = tok(prompts[1], add_special_tokens=False).input_ids
    o = tok(options[0], add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + o])).logits[0], -1)
    expected = sum(logp[len(p) - 1 + k, t] for k, t in enumerate(o))
    assert scores[1, 0].item() == pytest.approx(expected.item(), abs=1e-4)


def test_evaluate_scores_tuned_and_zero_shot_on_the_same_rows(shards, tiny_base, tmp_path):
    tune.run(tune_cfg("lora"), shards / "shards", tiny_base, tmp_path / "adapter", tmp_path / "live")
    cfg = EvaluateConfig(batch_size=2, max_new_tokens=8)
    metrics = evaluate.run(cfg, E2E, shards / "clean", tiny_base, tmp_path / "adapter", tmp_path / "eval")
    assert metrics["rows"] == 3
    assert set(metrics["tuned"]) == set(metrics["zero_shot"]) == {"bleu", "rouge_l"}
    preds = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds if p["system"] == "tuned"] == [p["id"] for p in preds if p["system"] == "zero_shot"]
