"""evaluate: the tuned model's prompts are the ones it was trained on; the metrics use
every reference and stay in range; the baselines score the same rows; the report."""
import dataclasses
import json

import pytest
import torch

from pipelines import baselines, evaluate, evaluation, scoring, tokenize, tune
from pipelines.common import StageError
from pipelines.config import EvaluateConfig, TokenizeConfig
from pipelines.prompts import render_zero_shot
from pipelines.shards import IGNORE, load_split
from tests.test_tokenize import MANY, write_clean
from tests.test_engine import adapter_dirs, lively_base  # noqa: F401  (fixtures)
from tests.test_tune import E2E, shards, tune_cfg  # noqa: F401  (shards: a fixture)

TEST = [{"mr": f"name[{n}], food[Italian]", "ref": f"{n} serves Italian food."} for n in ("Strada", "Zizzi")]


@pytest.mark.parametrize("opts", [{"chat_template": True}, {"few_shot": 2}, {"few_shot": 2, "chat_template": True},
                                  {}])
def test_tuned_prompt_is_the_source_tokenize_wrote(opts, tmp_path, tiny_base, tok):
    clean = write_clean(tmp_path / "clean", {**MANY, "test": TEST})
    opts = dict(opts)
    task = dataclasses.replace(E2E, chat_template=opts.pop("chat_template", False))  # the declaration's switch
    cfg = TokenizeConfig(max_length=512, shard_rows=10, num_proc=1, **opts)
    tokenize.run(cfg, task, clean, tiny_base, tmp_path / "shards")
    prompts = evaluate.TunedPrompts.from_dir(task, tok, tmp_path / "shards", tiny_base)
    records = {r["id"]: r for r in map(json.loads, (clean / "test.jsonl").read_text().splitlines())}
    written = load_split(tmp_path / "shards", "test")
    assert len(written) == len(TEST)
    for row in written:
        source = [t for t, label in zip(row["input_ids"], row["labels"]) if label == IGNORE]
        built = prompts.source(records[row["id"]])
        assert built == tok.decode(source)
        assert tok(built, add_special_tokens=False).input_ids == source
        if opts.get("few_shot"):
            assert built.count("Attributes:") == 3  # two demonstrations, then the row's own prompt


def test_tuned_prompts_refuse_shards_cut_with_other_templates(tmp_path, tiny_base, tok):
    clean = write_clean(tmp_path / "clean", {**MANY, "test": TEST})
    tokenize.run(TokenizeConfig(max_length=128, shard_rows=10, num_proc=1), E2E, clean, tiny_base,
                 tmp_path / "shards")
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    manifest["template_sha256"] = "0" * 64
    with pytest.raises(StageError, match="templates .* changed"):
        evaluate.TunedPrompts(E2E, tok, manifest, [])


def test_hard_prompt_baseline_draws_other_groups_deterministically(tok):
    train = [{"id": f"train:{i}", "group": r["mr"], **r} for i, r in enumerate(MANY["train"])]
    a = baselines.HardPrompts(E2E, tok, train, 2, seed=0)
    b = baselines.HardPrompts(E2E, tok, list(reversed(train)), 2, seed=0)
    row = {"id": "test:0", "group": train[0]["mr"], **MANY["train"][0]}
    shot = a.source(row, 2)
    assert shot == b.source(row, 2)
    assert shot.count("Attributes:") == 3 and shot.count(MANY["train"][0]["mr"]) == 1  # never its own group
    assert a.source(row, 0) == render_zero_shot(E2E, row, tok)


@pytest.mark.slow
def test_generation_metrics_use_every_reference():
    hyps = ["Aromi is a Chinese coffee shop.", "B is by the river."]
    one = scoring.generation_metrics(hyps, [["Aromi serves food."], ["B is by the river."]])[0]
    both, per_row, missing = scoring.generation_metrics(
        hyps, [["Aromi serves food.", "Aromi is a Chinese coffee shop."], ["B is by the river."]])
    assert both["bleu"] == 100.0 and one["bleu"] < 100.0
    assert both["rouge_l"] == 100.0 and per_row["rouge_l"] == [100.0, 100.0]
    assert both["exact_match"] == 100.0 and one["exact_match"] == 50.0 and both["chrf"] == 100.0 > one["chrf"]
    assert both["nist"] > one["nist"] > 0
    assert both["cider"] > one["cider"]
    assert set(both) | set(missing) == {"bleu", "nist", "meteor", "rouge_l", "cider", "chrf",
                                        "exact_match"}  # each computed or named
    if "meteor" in both:
        assert both["meteor"] > one["meteor"]


@pytest.mark.slow
def test_generation_metrics_of_empty_answers_are_zero_not_errors():
    m, _, _ = scoring.generation_metrics(["", ""], [["Aromi serves food."], ["B is by the river."]])
    assert m["bleu"] == 0 and m["nist"] == 0 and m["rouge_l"] == 0 and m["cider"] == 0
    assert m["chrf"] == 0 and m["exact_match"] == 0


def test_nist_of_answers_shorter_than_five_tokens_is_mtevals(monkeypatch):
    """mteval-v13a adds 0 for an order no answer is long enough for (it divides by max(count, 1));
    NLTK alone raised ZeroDivisionError when every answer had fewer than 5 tokens. By hand for
    `a b` against `a b c`: Info(a) = Info(b) = log2(3/1), Info(a b) = log2(1/1) = 0, so the
    orders sum to (2 log2 3) / 2 + 0 / 1; the length penalty at 2/3 of the reference is 0.5."""
    import math

    assert scoring._nist(["a b"], [["a b c"]]) == pytest.approx(math.log2(3) / 2)
    monkeypatch.setattr(scoring.shutil, "which", lambda name: None)  # no METEOR jar: not what is tested
    m, _, _ = scoring.generation_metrics(["the eagle", "."], [["The Eagle is a coffee shop."], ["Aromi serves food."]])
    assert m["nist"] > 0 and m["rouge_l"] > 0


def test_rouge_l_is_the_e2e_challenges(monkeypatch):
    """pycocoevalcap's ROUGE-L on lower-cased 13a tokens: F = (1 + b^2) P R / (R + b^2 P),
    b = 1.2, with P and R each the best over the row's references; the mean over rows."""
    monkeypatch.setattr(scoring.shutil, "which", lambda name: None)  # no METEOR jar: not what is tested
    hyps = ["The cat sat on the mat.", "Aromi is a pub."]
    refs = [["The cat is on the mat.", "Cat sat."], ["Aromi is a Chinese pub near the river."]]
    metrics, per_row, _ = scoring.generation_metrics(hyps, refs)
    # row 1: 7 tokens; LCS 6 with the first reference (7 tokens), 3 with "cat sat ." (3 tokens):
    # P = 6/7 (first), R = 3/3 (second) -> 2.44 * 6/7 / (1 + 1.44 * 6/7) = 14.64 / 15.64
    # (the best single reference's F would be 6/7); row 2: LCS 5, P = 5/5, R = 5/9
    # -> 2.44 * 5/9 / (5/9 + 1.44) = 12.2 / 17.96 (beta 1 would give 10/14)
    expected = [100 * 14.64 / 15.64, 100 * 12.2 / 17.96]
    assert per_row["rouge_l"] == pytest.approx(expected)
    assert metrics["rouge_l"] == round(sum(expected) / 2, 2) == 80.77


def test_declared_metrics_are_what_is_reported_and_exact_match_folds_whitespace_only():
    hyps = ["Aromi  is a pub.", "aromi is a pub."]
    refs = [["Aromi is a pub."], ["Aromi is a pub."]]
    metrics, per_row, missing = scoring.generation_metrics(hyps, refs, ("exact_match", "chrf"))
    assert set(metrics) == {"exact_match", "chrf"} and missing == {}  # no METEOR wanted: none missing
    assert per_row["exact_match"] == [100.0, 0.0] and metrics["exact_match"] == 50.0


def test_classification_metrics():
    m, per_row = scoring.classification_metrics(["1", "1", "0", "0"], ["1", "0", "0", "0"], ["0", "1"])
    assert m["accuracy"] == 75.0 and per_row == [100.0, 0.0, 100.0, 100.0]
    assert m["macro_f1"] == pytest.approx(100 * (0.8 + 2 / 3) / 2, abs=0.01)


def test_rank_scores_match_sequence_log_probability(tiny_base, tok):
    from transformers import AutoModelForCausalLM

    from serving.engine import BASE, Engine

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    prompts, options = ["Review: bleak\nSentiment:", "Review: it 's a charming journey\nSentiment:"], [" positive", " negative"]
    scores = scoring.rank_scores(Engine(tiny_base, max_batch=3, device="cpu"), BASE, prompts, options)
    p = tok(prompts[1], add_special_tokens=False).input_ids
    o = tok(options[0], add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + o])).logits[0], -1)
    expected = sum(logp[len(p) - 1 + k, t] for k, t in enumerate(o))
    assert scores[1, 0].item() == pytest.approx(expected.item(), abs=1e-4)


@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix", "lora", "full", "base"])
def test_rank_scores_are_the_trained_models_for_every_method(method, lively_base, adapter_dirs):
    """Prompts of several lengths (left padding in the engine), options of one and of several
    tokens: each score is the option's log-probability under the model as trained."""
    from serving.engine import BASE, Engine
    from tests.test_engine import as_trained

    engine = Engine(lively_base, max_batch=4, device="cpu", dtype=torch.float32)
    if method != BASE:
        engine.add(method, adapter_dirs[method])
    prompts = ["Review: bleak\nSentiment:", "Review: it 's a charming and often affecting journey\nSentiment:"]
    options = [" positive", " negative", " neither one nor the other"]
    scores = scoring.rank_scores(engine, method, prompts, options)
    model = as_trained(lively_base, adapter_dirs, method)
    for i, prompt in enumerate(prompts):
        for j, option in enumerate(options):
            p, o = engine.encode(prompt), engine.encode(option)
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([p + o])).logits[0, -len(p + o):], -1)
            expected = sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(o))
            assert scores[i, j].item() == pytest.approx(expected, abs=1e-4)


PROMPTS = ["Attributes: name[Aromi]\nDescription:", "Attributes: name[Alimentum], area[city centre], "
           "food[Chinese]\nDescription:", "Attributes: x\nDescription:"]


def test_batched_generation_equals_one_at_a_time(tiny_base):
    """Rows decoding together (left padding, one KV cache) answer as each would alone."""
    from serving.engine import BASE, Engine

    cfg = EvaluateConfig(batch_size=3, max_new_tokens=6)
    batched, _ = scoring.generate(Engine(tiny_base, max_batch=3, device="cpu"), BASE, PROMPTS, cfg)
    one = Engine(tiny_base, max_batch=1, device="cpu")
    assert batched == [scoring.generate(one, BASE, [p], cfg)[0][0] for p in PROMPTS]


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("method", ["prefix", "prompt", "ptuning"])
def test_prompt_learning_generation_decodes_as_trained(tiny_base, tok, method, num_beams, tmp_path):
    """PeftModel.generate drops a prefix and mis-positions padded prompt-tuning rows (PEFT
    0.21 + transformers 5.2x); evaluate's decoding (the serving engine) must not: batched
    greedy decoding equals decoding by full forward passes of the PEFT model (the training
    path), batched beams equal beams row by row, and the virtual tokens change the text."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    from serving import adapters, beams
    from serving.engine import Engine
    from serving.types import Decoding, Request

    torch.manual_seed(0)
    config = {"prefix": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4,
                                           prefix_projection=True, encoder_hidden_size=16),
              "prompt": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4),
              "ptuning": PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4,
                                             encoder_hidden_size=16)}[method]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), config).eval()
    with torch.no_grad():
        for param in model.prompt_encoder.parameters():
            param.copy_(torch.randn_like(param) * 3)  # virtual tokens that matter
    model.save_pretrained(tmp_path / "adapter")
    engines = [Engine(tiny_base, max_batch=size, device="cpu") for size in (3, 1)]
    for engine in engines:
        engine.add(method, tmp_path / "adapter")
    cfg = EvaluateConfig(batch_size=3, max_new_tokens=6, num_beams=num_beams)
    batched, _ = scoring.generate(engines[0], method, PROMPTS, cfg)
    assert batched == [scoring.generate(engines[1], method, [p], cfg)[0][0] for p in PROMPTS]
    ids = [tuple(tok(p, add_special_tokens=False).input_ids) for p in PROMPTS]
    base = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    with torch.no_grad():  # the virtual tokens matter
        assert not torch.allclose(model(input_ids=torch.tensor([ids[0]])).logits[0, -1],
                                  base(input_ids=torch.tensor([ids[0]])).logits[0, -1], atol=1e-3)
    if num_beams == 1:  # the greedy tokens are the training forward pass's, step by step
        answers = engines[0].generate([Request(method, p, Decoding(max_tokens=6)) for p in ids])
        for p, (answer,) in zip(ids, answers):
            seq = list(p)
            with torch.no_grad():
                for token in answer.token_ids:
                    assert token == int(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax())
                    seq.append(token)
        return
    # Beam search's placement: the first step of the padded batch sees what training sees.
    adapter = adapters.load(method, tmp_path / "adapter", adapters.Group(base))
    padded, mask = beams.left_padded(ids, tok.pad_token_id, "cpu")
    assert (mask == 0).any()  # rows of several lengths: left padding in play
    inputs = beams.placement(adapter, padded, mask, 1, tok.pad_token_id)
    with torch.no_grad():
        first = base.generate(**inputs, max_new_tokens=1, do_sample=False, output_scores=True,
                              return_dict_in_generate=True, pad_token_id=tok.pad_token_id).scores[0]
        for row, p in enumerate(ids):
            expected = model(input_ids=torch.tensor([p]), use_cache=False).logits[0, -1]
            torch.testing.assert_close(first[row], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_evaluate_scores_every_system_on_the_same_rows(shards, tiny_base, tmp_path):  # noqa: F811
    tune.run(tune_cfg("lora", checkpoint_dir=str(tmp_path / "ckpt")), shards / "shards", tiny_base,
             tmp_path / "adapter", tmp_path / "live")
    cfg = EvaluateConfig(batch_size=2, max_new_tokens=8, few_shot_k=1, min_nonempty_fraction=0.01)
    metrics = evaluate.run(cfg, E2E, shards / "clean", tiny_base, tmp_path / "adapter", tmp_path / "eval",
                           shards=shards / "shards")
    assert metrics["rows"] == 3 and metrics["systems"] == ["tuned", "zero_shot", "few_shot"]
    assert set(metrics["tuned"]) == set(metrics["zero_shot"]) == set(metrics["few_shot"])
    assert set(metrics["tuned"]) | set(metrics["not_computed"]) == {"bleu", "nist", "meteor", "rouge_l", "cider"}
    preds = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    ids = {s: [p["id"] for p in preds if p["system"] == s] for s in metrics["systems"]}
    assert ids["tuned"] == ids["zero_shot"] == ids["few_shot"] and len(ids["tuned"]) == 3
    table = (tmp_path / "eval" / "report.md").read_text()
    assert "| lora (tuned) | " in table and "1-shot prompt (base model)" in table and "tokens/s" in table
    per_row = sum(len(p["references"]) for p in preds if p["system"] == "tuned") / 3
    assert metrics["references_per_row"] == round(per_row, 2)  # details.json: what BLEU was judged against
    assert f"the 3 MRs scored here have {per_row:.1f} references each on average" in table  # not the paper's BLEU
    assert json.loads((tmp_path / "eval" / "validation.json").read_text())["success"] is True
    stats = json.loads((tmp_path / "adapter" / "ptune_adapter.json").read_text())["stats"]
    assert metrics["system_info"]["tuned"]["train_steps"] == stats["steps"]
    assert metrics["system_info"]["tuned"]["train_best_step"] == stats.get("best_step")  # None: no load_best
    # ptune compare's bootstrap recomputes every system's corpus BLEU from these predictions.
    from pipelines import compare

    c = compare.compare(tmp_path, tmp_path / "eval" / "metrics.json")
    compare.significance(tmp_path, c, samples=50)
    assert c.significance["missing"] == []
    assert [r["significance"]["score"] for r in c.rows] == [metrics[s]["bleu"] for s in metrics["systems"]]
    # metrics.json holds numbers only (what `dvc exp show` tabulates); details.json the rest.
    numbers = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    details = json.loads((tmp_path / "eval" / "details.json").read_text())

    def leaves(d):
        return [x for v in d.values() for x in (leaves(v) if isinstance(v, dict) else [v])]
    assert leaves(numbers) and all(isinstance(v, (int, float)) for v in leaves(numbers))
    assert {"primary_metric", "rows_sha256", "decoding", "systems"} <= set(details)
    assert evaluation.read(tmp_path / "eval" / "metrics.json") == metrics

    # The baselines stage scores what evaluate scored in-process; evaluate then reads them.
    baselines.run(cfg, E2E, shards / "clean", tiny_base, tmp_path / "baselines")
    again = evaluate.run(cfg, E2E, shards / "clean", tiny_base, tmp_path / "adapter", tmp_path / "eval2",
                         shards=shards / "shards", scored_baselines=tmp_path / "baselines")
    drop = ("tokens_per_s",)
    assert {k: v for k, v in again.items() if k not in drop} == {k: v for k, v in metrics.items() if k not in drop}
    assert (tmp_path / "eval2" / "predictions.jsonl").read_text() == (tmp_path / "eval" / "predictions.jsonl").read_text()
    assert json.loads((tmp_path / "baselines" / "validation.json").read_text())["success"] is True
    # Scores of other rows or another decoding are refused, not mixed in.
    with pytest.raises(StageError, match="decoded with"):
        evaluate.run(cfg.model_copy(update={"max_new_tokens": 9}), E2E, shards / "clean", tiny_base,
                     tmp_path / "adapter", tmp_path / "eval3", shards=shards / "shards",
                     scored_baselines=tmp_path / "baselines")
    with pytest.raises(StageError, match="other test rows"):
        evaluate.run(cfg.model_copy(update={"max_rows": 2}), E2E, shards / "clean", tiny_base,
                     tmp_path / "adapter", tmp_path / "eval3", shards=shards / "shards",
                     scored_baselines=tmp_path / "baselines")


def test_not_scored_records_keep_undecodable_bytes_escaped(tmp_path):
    """A row collect quarantined for bytes that are not UTF-8 holds them as surrogates; the
    list of what `ptune evaluate --file` did not score writes them escaped, as collect does."""
    from pipelines.common import read_jsonl

    row = {"stage": "collect", "reason": "invalid_utf8", "raw": "Caf\udce9 Aromi"}
    evaluate._write_not_scored(tmp_path, [row])
    assert read_jsonl(tmp_path / evaluate.NOT_SCORED) == [row]


SST = {"train": [{"sentence": s, "label": l} for s, l in [("a charming journey", "1"), ("unflinchingly bleak", "0"),
                                                          ("warm and funny", "1"), ("a dull mess", "0")]],
       "validation": [{"sentence": "quietly moving", "label": "1"}],
       "test": [{"sentence": s, "label": l} for s, l in [("it 's a charming and often affecting journey", "1"),
                                                         ("bleak and desperate", "0"), ("funny", "1")]]}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_classification_ranks_labels_by_the_trained_models_log_probability(method, tiny_base, tmp_path):
    """Rank scoring runs in the engine (what a served ``echo`` scores); each system's pick is
    the label whose verbalizer the model as trained (PEFT's forward, unpadded) finds likelier."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipelines.base_model import load_tokenizer
    from pipelines.tasks import get_task
    from tests.conftest import ROOT

    sst2 = get_task("sst2", ROOT / "tasks")
    clean = write_clean(tmp_path / "clean", SST)
    tokenize.run(TokenizeConfig(max_length=64, shard_rows=100), sst2, clean, tiny_base, tmp_path / "shards")
    tune.run(tune_cfg(method, checkpoint_dir=str(tmp_path / "ckpt")), tmp_path / "shards", tiny_base,
             tmp_path / "adapter", tmp_path / "live")
    cfg = EvaluateConfig(batch_size=2, max_new_tokens=4, few_shot_k=1)
    record = evaluate.run(cfg, sst2, clean, tiny_base, tmp_path / "adapter", tmp_path / "eval", shards=tmp_path / "shards")
    assert record["systems"] == ["tuned", "zero_shot", "few_shot"] and record["rows"] == 3
    preds = [json.loads(line) for line in (tmp_path / "eval/predictions.jsonl").read_text().splitlines()]

    base = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    models = {"tuned": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tmp_path / "adapter"),
              "zero_shot": base, "few_shot": base}
    tok = load_tokenizer(tiny_base)
    options = {"tuned": evaluate.TunedPrompts.from_dir(sst2, tok, tmp_path / "shards", tiny_base).options(),
               "zero_shot": dict(sst2.labels), "few_shot": dict(sst2.labels)}
    for p in preds:
        scores = {}
        for label, option in options[p["system"]].items():
            ids = tok(p["prompt"], add_special_tokens=False).input_ids
            o = tok(option, add_special_tokens=False).input_ids
            with torch.no_grad():
                logits = models[p["system"]].eval()(input_ids=torch.tensor([ids + o])).logits[0, -len(ids + o):]
            logp = torch.log_softmax(logits, -1)
            scores[label] = sum(float(logp[len(ids) - 1 + k, t]) for k, t in enumerate(o))
        assert p["prediction"] == max(scores, key=scores.get), (p, scores)
    # The baselines stage ranks as evaluate did in-process; evaluate then reads its scores.
    baselines.run(cfg, sst2, clean, tiny_base, tmp_path / "baselines")
    again = evaluate.run(cfg, sst2, clean, tiny_base, tmp_path / "adapter", tmp_path / "eval2",
                         shards=tmp_path / "shards", scored_baselines=tmp_path / "baselines")
    assert {k: v for k, v in again.items() if k != "tokens_per_s"} == \
        {k: v for k, v in record.items() if k != "tokens_per_s"}
