"""ptune compare: other trained runs (DVC experiments, registered versions) join the
table only when they were scored on the same rows with the same decoding."""
import json
import subprocess

import pytest

from pipelines import compare
from pipelines.common import StageError

DECODING = {"num_beams": 1, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "max_new_tokens": 32}


def metrics(method, bleu, rows_sha="a" * 64, decoding=DECODING, task="e2e", trainable=100):
    info = {"tuned": {"label": f"{method} (tuned)", "trainable_parameters": trainable, "train_seconds": 12.5},
            "zero_shot": {"label": "zero-shot prompt (base model)", "trainable_parameters": 0}}
    return {"task": task, "method": method, "primary_metric": "bleu", "rows": 3, "rows_sha256": rows_sha,
            "decoding": decoding, "systems": ["tuned", "zero_shot"], "system_info": info,
            "tuned": {"bleu": bleu}, "zero_shot": {"bleu": 1.0}, "tokens_per_s": {"tuned": 50.0, "zero_shot": 60.0}}


def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def commit_metrics(repo, m, message):
    path = repo / "data/eval/metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(m))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path):
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "config", "user.email", "t@example.com")
    git(tmp_path, "config", "user.name", "t")
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
    assert "| prefix (tuned) | exp prefix-run | 200 | 12.5 | 28.5 | 50.0 |" in text
    assert "exp other-rows (prompt): scored on other test rows" in text


def test_the_same_run_reached_twice_is_listed_once(repo):
    head = git(repo, "rev-parse", "HEAD")
    git(repo, "update-ref", f"refs/exps/cd/{head[2:]}/same-as-workspace", head)
    assert [r["source"] for r in compare.compare(repo).rows].count("workspace") == 2  # tuned + zero-shot
    assert "exp same-as-workspace" not in {r["source"] for r in compare.compare(repo).rows}


def test_metrics_without_a_rows_hash_are_refused_as_reference(repo):
    m = metrics("lora", 30.0)
    del m["rows_sha256"]
    (repo / "data/eval/metrics.json").write_text(json.dumps(m))
    with pytest.raises(StageError, match="rows' hash; rerun `dvc repro evaluate`"):
        compare.compare(repo)
    with pytest.raises(StageError, match="no evaluation to compare against"):
        compare.compare(repo, repo / "missing.json")
