"""ptune compare: other trained runs (DVC experiments, registered versions) join the
table only when they were scored on the same rows with the same decoding."""
import json
import subprocess

import pytest

from pipelines import compare, evaluation
from pipelines.common import StageError
from tests.conftest import git

DECODING = {"num_beams": 1, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "max_new_tokens": 32}


def metrics(method, bleu, rows_sha="a" * 64, decoding=DECODING, task="e2e", trainable=100):
    info = {"tuned": {"label": f"{method} (tuned)", "trainable_parameters": trainable, "train_seconds": 12.5,
                      "train_steps": 7},
            "zero_shot": {"label": "zero-shot prompt (base model)", "trainable_parameters": 0}}
    return {"task": task, "method": method, "primary_metric": "bleu", "rows": 3, "rows_sha256": rows_sha,
            "decoding": decoding, "systems": ["tuned", "zero_shot"], "system_info": info,
            "tuned": {"bleu": bleu}, "zero_shot": {"bleu": 1.0}, "tokens_per_s": {"tuned": 50.0, "zero_shot": 60.0}}


def commit_metrics(repo, m, message):
    path = repo / "data/eval/metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(m))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD").strip()


@pytest.fixture
def repo(tmp_path):
    git(tmp_path, "init", "-q", "-b", "main")
    base = commit_metrics(tmp_path, metrics("lora", 30.0), "lora run")
    experiments = {"prefix-run": metrics("prefix", 28.5, trainable=200),
                   "other-rows": metrics("prompt", 40.0, rows_sha="b" * 64),
                   "beam-search": metrics("full", 35.0, decoding={**DECODING, "num_beams": 5}),
                   "sst2-run": metrics("prompt", 90.0, task="sst2")}
    for name, m in experiments.items():
        git(tmp_path, "checkout", "-q", "--detach", base)
        exp = commit_metrics(tmp_path, m, name)
        git(tmp_path, "update-ref", f"refs/exps/ab/{base[2:]}/{name}", exp)
    git(tmp_path, "update-ref", "refs/exps/celery/stash", base)  # DVC's queue bookkeeping: not a run
    git(tmp_path, "checkout", "-q", "main")
    return tmp_path


def test_experiments_on_the_same_rows_join_the_table_others_are_named(repo):
    c = compare.compare(repo)
    labels = [(r["label"], r["source"]) for r in c.rows]
    assert labels == [("lora (tuned)", "workspace"), ("prefix (tuned)", "exp prefix-run"),
                      ("zero-shot prompt (base model)", "workspace")]
    assert c.rows[1]["metrics"] == {"bleu": 28.5} and c.rows[1]["trainable_parameters"] == 200
    assert c.rows[1]["train_seconds"] == 12.5
    reasons = {e["source"]: e["reason"] for e in c.excluded}
    assert set(reasons) == {"exp other-rows", "exp beam-search"}  # the SST-2 run is not a candidate
    assert "other test rows" in reasons["exp other-rows"] and "decoding" in reasons["exp beam-search"]
    text = compare.markdown(c)
    assert "| prefix (tuned) | exp prefix-run | 200 | 12.5 | 7 | 28.5 | 50.0 |" in text
    assert "exp other-rows (prompt): scored on other test rows" in text
    # an E2E BLEU table says why it is not the paper's (this record predates references_per_row)
    assert "BLEU scores are not comparable with the Prefix-Tuning paper's Table 1" in text


def test_the_same_run_reached_twice_is_listed_once(repo):
    head = git(repo, "rev-parse", "HEAD").strip()
    git(repo, "update-ref", f"refs/exps/cd/{head[2:]}/same-as-workspace", head)
    assert [r["source"] for r in compare.compare(repo).rows].count("workspace") == 2  # tuned + zero-shot
    assert "exp same-as-workspace" not in {r["source"] for r in compare.compare(repo).rows}


def test_runs_that_score_alike_are_both_listed_the_same_run_once(repo):
    """Equal scores are not the same run: dvc.lock's evaluate inputs tell them apart."""
    def lock(adapter_md5):
        return ("schema: '2.0'\nstages:\n  evaluate:\n    cmd: ptune stage evaluate\n    deps:\n"
                f"    - path: data/models/tuned\n      md5: {adapter_md5}.dir\n")

    (repo / "dvc.lock").write_text(lock("1" * 32))
    base = commit_metrics(repo, metrics("lora", 30.0), "lora run, lr 1e-3")
    git(repo, "checkout", "-q", "--detach", base)
    (repo / "dvc.lock").write_text(lock("2" * 32))
    exp = commit_metrics(repo, metrics("lora", 30.0), "lr-sweep-2")  # the same scores, another adapter
    git(repo, "update-ref", f"refs/exps/ef/{base[2:]}/lr-sweep-2", exp)
    git(repo, "update-ref", f"refs/exps/ef/{base[2:]}/the-workspace-run", base)
    git(repo, "checkout", "-q", "main")
    sources = [r["source"] for r in compare.compare(repo).rows if r["label"] == "lora (tuned)"]
    assert sources == ["workspace", "exp lr-sweep-2"]  # the other adapter listed; the same one once


def test_each_run_says_which_params_differ_from_the_reference_runs(repo):
    import yaml

    def params(method, lr, cron):
        return yaml.safe_dump({"tune": {"method": method, "learning_rate": lr, "prompt": {"num_virtual_tokens": 20}},
                               "prefect": {"schedule": {"cron": cron}}})

    (repo / "params.yaml").write_text(params("lora", None, "0 3 * * *"))
    base = commit_metrics(repo, metrics("lora", 30.0), "lora run")
    git(repo, "checkout", "-q", "--detach", base)
    (repo / "params.yaml").write_text(params("prefix", 0.01, "0 4 * * *"))  # the schedule is not a run setting
    exp = commit_metrics(repo, metrics("prefix", 28.5), "prefix run")
    git(repo, "update-ref", f"refs/exps/ef/{base[2:]}/prefix-lr", exp)
    git(repo, "checkout", "-q", "main")
    c = compare.compare(repo)
    row = next(r for r in c.rows if r["source"] == "exp prefix-lr")
    assert row["params_changed"] == [{"key": "tune.learning_rate", "value": 0.01, "reference": None},
                                     {"key": "tune.method", "value": "prefix", "reference": "lora"}]
    text = compare.markdown(c)
    assert ("- exp prefix-lr: `tune.learning_rate` 0.01 (reference null), `tune.method` prefix (reference lora)"
            in text)
    assert "exp prefix-run:" not in text  # committed without a params.yaml: nothing to compare


def test_metrics_without_a_rows_hash_are_refused_as_reference(repo):
    m = metrics("lora", 30.0)
    del m["rows_sha256"]
    (repo / "data/eval/metrics.json").write_text(json.dumps(m))
    with pytest.raises(StageError, match="rows' hash; rerun `dvc repro evaluate`"):
        compare.compare(repo)
    with pytest.raises(StageError, match="no evaluation to compare against"):
        compare.compare(repo, repo / "missing.json")


# --- significance: a paired bootstrap over the test rows ---------------------------

HYPS = ["the cat sat on the mat", "a dog ran in the park today", "it is raining in the city",
        "the food was good and cheap", "she reads a book every night", "we walked home after dinner"]
REFS = [["the cat sat on the mat", "a cat was sitting on the mat"], ["a dog ran in the park"],
        ["it rains in the city", "rain falls on the city", "the city is rainy"], ["the food was good and cheap"],
        ["she reads every night", "every night she reads a book"], ["we walked home after the dinner"]]


def predictions(system, hyps, refs=REFS, scores=None):
    return [{"system": system, "id": f"r{i}", "prompt": "p", "prediction": h, "references": r,
             "score": 0.0 if scores is None else scores[i]} for i, (h, r) in enumerate(zip(hyps, refs))]


def test_bleu_from_summed_row_statistics_is_the_corpus_bleu():
    import sacrebleu

    hyps = ["the cat sat on a mat", "a dog in the park", "rain in the city today", "good cheap food",
            "she reads a book", "we walked home"]
    streams = [[r[k] if k < len(r) else None for r in REFS] for k in range(3)]
    stats = compare._bleu_stats(predictions("tuned", hyps))
    assert compare._bleu(stats.sum(axis=0)) == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score, abs=1e-9)


@pytest.fixture
def dvc_repo(tmp_path):
    """A DVC project whose experiment keeps its predictions in the DVC cache, as the
    evaluate stage's outputs are kept."""
    import sys

    def dvc(*args):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=tmp_path, check=True, capture_output=True)

    git(tmp_path, "init", "-q", "-b", "main")
    dvc("init", "-q")
    dvc("config", "core.analytics", "false")
    eval_dir = tmp_path / "data/eval"
    eval_dir.mkdir(parents=True)
    (tmp_path / ".gitignore").write_text("/data/eval/predictions.jsonl\n")
    base = commit_metrics(tmp_path, metrics("lora", 30.0, rows_sha="c" * 64), "init")

    def experiment(name, m, preds):
        git(tmp_path, "checkout", "-q", "--detach", base)
        path = eval_dir / "predictions.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in preds))
        dvc("add", "-q", "data/eval/predictions.jsonl")
        exp = commit_metrics(tmp_path, m, name)
        git(tmp_path, "update-ref", f"refs/exps/ab/{base[2:]}/{name}", exp)
        git(tmp_path, "checkout", "-q", "main")
        return exp

    return tmp_path, experiment


def test_intervals_tell_a_real_gap_from_noise(dvc_repo):
    repo, experiment = dvc_repo
    worse = ["the cat", "a dog", "it is", "the food", "she reads", "we walked"]
    def run_metrics(method, hyps, zero_shot=None):
        m = metrics(method, bleu_of(hyps), rows_sha="c" * 64)
        m["rows"] = len(HYPS)
        m["zero_shot"] = {"bleu": bleu_of(zero_shot) if zero_shot else 1.0}
        return m

    twin_hyps = HYPS[:5] + ["we walked home after the dinner"]  # one row better than the workspace's
    experiment("twin", run_metrics("prefix", twin_hyps), predictions("tuned", twin_hyps))
    exp = experiment("lost", run_metrics("prompt", worse), predictions("tuned", worse))
    wrong = run_metrics("full", HYPS)
    wrong["tuned"]["bleu"] += 5  # its predictions are another run's
    experiment("mislabelled", wrong, predictions("tuned", ["the cat sat"] + HYPS[1:]))
    # This one's predictions are not in the cache (as after `dvc gc`, or on another machine).
    (repo / ".dvc/cache/files/md5" / _md5_dir(repo, exp)).unlink()
    # The workspace (evaluated last): the tuned run matches the references, the zero-shot prompt is worse.
    work = predictions("tuned", HYPS) + predictions("zero_shot", worse)
    (repo / "data/eval/predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in work))
    (repo / "data/eval/metrics.json").write_text(json.dumps(run_metrics("lora", HYPS, zero_shot=worse)))

    c = compare.compare(repo)
    s = compare.significance(repo, c, samples=300)
    rows = {r["source"]: r for r in c.rows if r["system"] == "tuned"}
    base_rows = {r["label"]: r for r in c.rows if r["system"] != "tuned"}
    assert s["best"]["source"] == "exp twin" and rows["exp twin"]["significance"]["best"]
    work_row = rows["workspace"]["significance"]
    assert work_row["ci95"][0] <= work_row["score"] <= work_row["ci95"][1]
    # The workspace differs from the best in one row of six: the interval holds 0.
    assert work_row["diff_to_best"] < 0 and work_row["indistinguishable_from_best"]
    # The zero-shot prompt is far worse on every row: its interval of the difference excludes 0.
    zs = base_rows["zero-shot prompt (base model)"]["significance"]
    assert zs["diff_to_best"] < 0 and zs["diff_ci95"][1] < 0 and not zs["indistinguishable_from_best"]
    assert "significance" not in rows["exp lost"] and "significance" not in rows["exp mislabelled"]
    missing = {m["source"]: m["reason"] for m in s["missing"]}
    assert set(missing) == {"exp lost", "exp mislabelled"} and "dvc pull" in missing["exp lost"]
    assert "not this run's" in missing["exp mislabelled"]
    text = compare.markdown(c)
    assert "| bleu | bleu 95% CI | vs best (95% CI) |" in text
    assert "paired bootstrap over the 6 test rows (300 resamples, seed 0)" in text
    assert "no interval for prompt (tuned) (exp lost): predictions not readable" in text
    # Seeded: the same intervals every time.
    again = compare.compare(repo)
    compare.significance(repo, again, samples=300)
    assert [r.get("significance") for r in again.rows] == [r.get("significance") for r in c.rows]


def bleu_of(hyps):
    return compare._bleu(compare._bleu_stats(predictions("tuned", hyps)).sum(axis=0))


def _md5_dir(repo, commit):
    """The cache path (relative to files/md5) of the predictions committed at ``commit``."""
    import yaml

    meta = yaml.safe_load(git(repo, "show", f"{commit}:data/eval/predictions.jsonl.dvc"))
    md5 = meta["outs"][0]["md5"]
    return f"{md5[:2]}/{md5[2:]}"


def test_classification_intervals_are_over_the_per_row_scores(tmp_path):
    ref = metrics("prompt", 75.0)
    ref.update(primary_metric="accuracy", rows=40, tuned={"accuracy": 75.0}, zero_shot={"accuracy": 50.0})
    (tmp_path / "metrics.json").write_text(json.dumps(ref))
    tuned = [100.0] * 30 + [0.0] * 10
    zero = [100.0] * 20 + [0.0] * 20
    rows = predictions("tuned", ["x"] * 40, [["y"]] * 40, tuned) + predictions("zero_shot", ["x"] * 40, [["y"]] * 40, zero)
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in rows))
    git(tmp_path, "init", "-q", "-b", "main")
    c = compare.compare(tmp_path, tmp_path / "metrics.json")
    compare.significance(tmp_path, c)
    t, z = (r["significance"] for r in c.rows)
    assert t["best"] and t["score"] == 75.0 and z["score"] == 50.0 and z["diff_to_best"] == -25.0
    # 20 of 40 rows differ, always in the tuned run's favour: the difference is never >= 0.
    assert z["diff_ci95"][1] < 0 and not z["indistinguishable_from_best"]


def test_cli_prints_the_intervals_or_skips_them(tmp_path, monkeypatch, capsys):
    from pipelines import cli

    test_classification_intervals_are_over_the_per_row_scores(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["compare", "--reference", "metrics.json", "--samples", "200", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["significance"]["samples"] == 200 and out["rows"][0]["significance"]["best"]
    assert cli.main(["compare", "--reference", "metrics.json", "--no-intervals"]) == 0
    text = capsys.readouterr().out
    assert "| prompt (tuned) | metrics.json |" in text and "95% CI" not in text


def test_runs_scored_before_evaluate_recorded_training_take_it_from_the_tune_stage(repo):
    head = git(repo, "rev-parse", "HEAD").strip()
    old = metrics("ptuning", 27.0)
    del old["system_info"]["tuned"]["train_seconds"], old["system_info"]["tuned"]["train_steps"]
    git(repo, "checkout", "-q", "--detach", head)
    (repo / "data/metrics").mkdir(parents=True)
    (repo / "data/metrics/tune.json").write_text(json.dumps({"steps": 64, "train_seconds": 99.5, "best_step": 48}))
    exp = commit_metrics(repo, old, "old run")
    git(repo, "update-ref", f"refs/exps/ab/{head[2:]}/old-run", exp)
    git(repo, "checkout", "-q", "main")
    c = compare.compare(repo)
    row = next(r for r in c.rows if r["source"] == "exp old-run")
    assert (row["train_seconds"], row["train_steps"], row["train_best_step"]) == (99.5, 64, 48)
    assert "| ptuning (tuned) | exp old-run | 100 | 99.5 | 48 of 64 | 27.0 |" in compare.markdown(c)  # load_best kept 48


def test_a_directory_outside_git_has_no_experiments(tmp_path):
    assert compare.experiments(tmp_path) == []


def test_the_bleu_caveat_goes_with_e2e_bleu_only():
    assert evaluation.bleu_caveat("sst2", ["accuracy"], 1.0, 10) is None
    assert evaluation.bleu_caveat("e2e", ["rouge_l"], 2.7, 10) is None  # a declaration that reports no BLEU
    assert evaluation.bleu_caveat("e2e", ["bleu"], 2.74, 120, short=True) == (
        "E2E BLEU here is not comparable with the Prefix-Tuning paper's Table 1: 2.7 references per MR in the rows "
        "scored against 7.45 in the challenge's test set, and multi-reference BLEU rises with them.")
