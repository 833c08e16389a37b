"""Every trained method in one table, on the same test rows.

The evaluate stage scores one adapter against the hand-written prompts. The other
methods are other runs of the same graph: registered versions (GTO tags) and DVC
experiments (``dvc exp run -S tune.method=prefix``, listed through DVC's API). Their
``data/eval/metrics.json`` is committed with them (a ``cache: false`` metric), so
comparing them needs no re-scoring — provided they were scored on the same rows with
the same decoding. Each metrics file carries ``rows_sha256`` (the ids, inputs and
references of its test rows, in order); a run whose hash or decoding differs from the
reference run's is listed as excluded, with the reason, and never mixed into the table.

A difference of a point on 120 test rows may be noise. ``significance`` puts a paired
bootstrap over the test rows next to the primary metric (Koehn 2004; the resampling
sacrebleu's ``--paired-bs`` does): each run's 95% interval, and the difference to the
best run with its own 95% interval, from each run's ``predictions.jsonl`` (read from
the DVC cache at the run's commit).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipelines import evaluation
from pipelines.common import StageError

METRICS = evaluation.METRICS
PREDICTIONS = "data/eval/predictions.jsonl"
TUNE_METRICS = "data/metrics/tune.json"
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0


@dataclass
class Entry:
    source: str  # "workspace", "e2e-adapter@v0.0.2", "exp prefix-run"
    commit: str | None
    metrics: dict


@dataclass
class Comparison:
    reference: Entry
    rows: list[dict]  # one per system: label, source, trainable_parameters, train_seconds, train_steps, metrics, tokens_per_s
    excluded: list[dict] = field(default_factory=list)  # {source, reason}
    significance: dict | None = None  # see ``significance``


def _git(repo: Path, *args: str):
    from pipelines.registry import _git as git

    return git(repo, *args, check=False)


def _json_at(repo: Path, commit: str, path: str) -> dict | None:
    from pipelines.registry import json_at

    return json_at(repo, commit, path)


def _evaluation_at(repo: Path, commit: str) -> dict | None:
    from pipelines.registry import evaluation_at

    return evaluation_at(repo, commit, METRICS)


def experiments(repo: Path) -> list[tuple[str, str]]:
    """(name, commit) of every DVC experiment in ``repo``, newest first, as DVC lists them
    (``dvc exp list --all-commits``): queued and running ones have no commit yet and are left
    out; a directory outside git has none."""
    from dvc.repo import Repo
    from dvc.scm import NoSCMError

    try:
        with Repo(str(repo), uninitialized=True) as dvc:
            found = [(name, sha) for runs in dvc.experiments.ls(all_commits=True).values()
                     for name, sha in runs if sha]
    except NoSCMError:
        return []
    if not found:
        return []
    times = dict(line.split() for line in _git(repo, "show", "-s", "--format=%H %ct", *{sha for _, sha in found})
                 .stdout.splitlines())
    return sorted(found, key=lambda e: -int(times[e[1]]))


def candidates(repo: Path) -> list[Entry]:
    """Registered versions of every artifact, then DVC experiments, newest first."""
    from pipelines import registry

    found: list[Entry] = []
    for artifact in registry.artifacts(repo):
        for v in registry.list_versions(repo, artifact):
            m = _evaluation_at(repo, v["commit"])
            if m:
                found.append(Entry(f"{artifact}@{v['version']}", v["commit"], m))
    for name, commit in experiments(repo):
        m = _evaluation_at(repo, commit)
        if m:
            found.append(Entry(f"exp {name}", commit, m))
    return found


def _tune_stat(repo: Path, entry: Entry, key: str, stat: str):
    """``system_info.tuned[key]`` of a run's metrics, or (metrics written before evaluate
    recorded it) ``stat`` of the tune stage's own metrics at its commit or in the workspace."""
    info = entry.metrics.get("system_info", {}).get("tuned", {})
    if info.get(key) is not None:
        return info[key]
    if entry.commit:
        return (_json_at(repo, entry.commit, TUNE_METRICS) or {}).get(stat)
    if entry.source == "workspace" and (repo / TUNE_METRICS).is_file():
        return json.loads((repo / TUNE_METRICS).read_text()).get(stat)
    return None


def _label(m: dict, system: str) -> str:
    default = f"{m.get('method', '?')} (tuned)" if system == "tuned" else system.replace("_", "-")
    return m.get("system_info", {}).get(system, {}).get("label", default)


def _row(label: str, source: str, system: str, m: dict, train_seconds=None, train_steps=None,
         commit: str | None = None, predictions: Path | None = None, best_step=None) -> dict:
    """``commit`` (a run's) or ``predictions`` (a file): where its per-row predictions are;
    ``best_step``: the step whose weights a ``tune.load_best`` run kept."""
    info = m.get("system_info", {}).get(system, {})
    trainable = info.get("trainable_parameters", m.get("trainable_parameters") if system == "tuned" else 0)
    return {"label": label, "source": source, "trainable_parameters": trainable,
            "train_seconds": train_seconds, "train_steps": train_steps, "train_best_step": best_step,
            "metrics": m.get(system, {}),
            "tokens_per_s": m.get("tokens_per_s", {}).get(system), "system": system,
            "commit": commit, "predictions": str(predictions) if predictions else None}


def compare(repo: Path, reference: Path | None = None, extra: list[Entry] | None = None) -> Comparison:
    """The reference run's systems (default: the workspace's ``data/eval/metrics.json``)
    and every other trained run scored on the same rows with the same decoding."""
    repo = Path(repo)
    path = Path(reference) if reference else repo / METRICS
    if not path.is_file():
        raise StageError(f"{path}: no evaluation to compare against; run `dvc repro evaluate` first")
    ref = Entry("workspace" if reference is None else str(reference), None, evaluation.read(path))
    m = ref.metrics
    if "rows_sha256" not in m:
        raise StageError(f"{path}: written before evaluate recorded its rows' hash; rerun `dvc repro evaluate`")
    ref_predictions = path.parent / Path(PREDICTIONS).name
    tuned = [_row(_label(m, "tuned"), ref.source, "tuned", m, _tune_stat(repo, ref, "train_seconds", "train_seconds"),
                  _tune_stat(repo, ref, "train_steps", "steps"), predictions=ref_predictions,
                  best_step=_tune_stat(repo, ref, "train_best_step", "best_step"))]
    baselines = [_row(_label(m, s), ref.source, s, m, predictions=ref_predictions)
                 for s in m.get("systems", ["tuned", "zero_shot"]) if s != "tuned"]
    excluded, seen = [], {_run_key(repo, ref)}
    for entry in [*(extra or []), *candidates(repo)]:
        other = entry.metrics
        reason = None
        if other.get("task") != m.get("task"):
            continue  # another task's registry entry: not a candidate at all
        if "rows_sha256" not in other:
            reason = "scored before evaluate recorded its rows' hash: the rows cannot be shown equal"
        elif other["rows_sha256"] != m["rows_sha256"]:
            reason = f"scored on other test rows ({other.get('rows')} rows, hash {other['rows_sha256'][:12]})"
        elif other.get("decoding") != m.get("decoding"):
            reason = f"other decoding settings ({other.get('decoding')})"
        if reason:
            excluded.append({"source": entry.source, "method": other.get("method"), "reason": reason})
            continue
        key = _run_key(repo, entry)
        if key in seen:  # the same run reached through several refs (a registered experiment)
            continue
        seen.add(key)
        tuned.append(_row(_label(other, "tuned"), entry.source, "tuned", other,
                          _tune_stat(repo, entry, "train_seconds", "train_seconds"),
                          _tune_stat(repo, entry, "train_steps", "steps"), commit=entry.commit,
                          best_step=_tune_stat(repo, entry, "train_best_step", "best_step")))
    reference_params = _params_at(repo, ref)
    for row in tuned[1:]:
        at = _params_at(repo, Entry(row["source"], row["commit"], {}))
        row["params_changed"] = param_changes(reference_params, at) if reference_params and at else None
    return Comparison(ref, tuned + baselines, excluded)


# Sections that say where and how a run was scheduled, not what was trained or scored.
_NOT_A_RUN_SETTING = ("prefect.",)
PARAMS_SHOWN = 6  # differing params listed per run; more are counted


def _params_at(repo: Path, entry: Entry) -> dict | None:
    """params.yaml of a run: at its commit, or the workspace's for the workspace."""
    import yaml

    if entry.commit:
        shown = _git(repo, "show", f"{entry.commit}:params.yaml")
        text = shown.stdout if shown.returncode == 0 else None
    elif entry.source == "workspace" and (repo / "params.yaml").is_file():
        text = (repo / "params.yaml").read_text()
    else:
        text = None
    loaded = yaml.safe_load(text) if text else None
    return loaded if isinstance(loaded, dict) else None


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def param_changes(reference: dict, other: dict) -> list[dict]:
    """The dotted params.yaml keys whose values differ between two runs: {key, value, reference}."""
    a, b = _flat(reference), _flat(other)
    return [{"key": k, "value": b.get(k), "reference": a.get(k)} for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and not k.startswith(_NOT_A_RUN_SETTING)]


def _run_key(repo: Path, entry: Entry) -> str:
    """What makes two entries the same run: the same scores of the same method, from an evaluate
    stage with the same inputs and params in dvc.lock, under the same params.yaml (the commit's;
    the workspace's for the workspace). Scores alone would merge two runs that happen to score
    alike (a sweep whose points tie, two collapsed adapters), hiding one of them."""
    import yaml

    m = entry.metrics
    if entry.commit is None:
        lock = (repo / "dvc.lock").read_text() if entry.source == "workspace" and (repo / "dvc.lock").is_file() else None
    else:
        shown = _git(repo, "show", f"{entry.commit}:dvc.lock")
        lock = shown.stdout if shown.returncode == 0 else None
    stage = ((yaml.safe_load(lock) or {}).get("stages") or {}).get("evaluate") if lock else None
    inputs = {"deps": stage.get("deps"), "params": stage.get("params")} if isinstance(stage, dict) else None
    return json.dumps([m["tuned"], m.get("method", ""), inputs, _params_at(repo, entry)], sort_keys=True, default=str)


def _read_predictions(repo: Path, row: dict) -> tuple[list[dict] | None, str | None]:
    """-> (this row's system's predictions in test-row order, or None with why)."""
    try:
        if row["predictions"]:
            text = Path(row["predictions"]).read_text(encoding="utf-8")
        elif row["commit"]:
            import dvc.api

            text = dvc.api.read(PREDICTIONS, repo=str(repo), rev=row["commit"], encoding="utf-8")
        else:
            return None, "no commit to read its predictions from"
    except Exception as exc:  # a missing file, or an output not in the local DVC cache
        return None, f"predictions not readable ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); `dvc pull` them"
    preds = [p for p in map(json.loads, text.splitlines()) if p.get("system") == row["system"]]
    return preds, None


def _bleu_stats(preds: list[dict]):
    """Per row: BLEU's sufficient statistics (n-gram matches and totals, hypothesis and
    closest reference length), so a resample's corpus BLEU is a sum and a formula."""
    import numpy as np
    from sacrebleu.metrics import BLEU

    bleu = BLEU()
    out = []
    for p in preds:
        s = bleu.corpus_score([p["prediction"]], [[r] for r in p["references"]])
        out.append([*s.counts, *s.totals, s.sys_len, s.ref_len])
    return np.asarray(out, dtype=np.int64)


def _bleu(summed) -> float:
    from sacrebleu.metrics import BLEU

    c = [int(v) for v in summed]
    return BLEU.compute_bleu(c[0:4], c[4:8], c[8], c[9]).score


def row_values(preds: list[dict], metric: str):
    """Per-row values a resample of ``metric`` is computed from: BLEU's n-gram statistics
    (``metric == "bleu"``), else the per-row scores evaluate saved (ROUGE-L for generation,
    accuracy for classification)."""
    import numpy as np

    return _bleu_stats(preds) if metric == "bleu" else np.asarray([p["score"] for p in preds], float)


def metric_of(values, metric: str) -> float:
    """``metric`` over the rows in ``values`` (``row_values``' output, or a resample of it)."""
    return _bleu(values.sum(axis=0)) if metric == "bleu" else float(values.mean())


def bootstrap(values: dict, metric: str, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """{key: ``metric`` on each of ``samples`` resamples of the rows}, the same resamples for
    every key (paired: the values of all keys must be of the same rows, in the same order)."""
    import numpy as np

    n = len(next(iter(values.values())))
    idx = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    return {k: np.array([metric_of(v[rows], metric) for rows in idx]) for k, v in values.items()}


def interval(boot) -> list[float]:
    """The 95% percentile interval of bootstrap values, rounded as metrics.json rounds."""
    import numpy as np

    lo, hi = np.percentile(boot, [2.5, 97.5])
    return [round(float(lo), 2), round(float(hi), 2)]


def significance(repo: Path, c: Comparison, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """Paired bootstrap over the test rows for the primary metric: each row of ``c`` gets
    ``significance`` ({score, ci95, diff_to_best, diff_ci95, indistinguishable_from_best, best}),
    ``c.significance`` the summary (metric, samples, seed, best, rows without predictions).

    Every run is scored on the same ``samples`` resamples of the rows (paired), so the
    difference to the best run has its own interval: one that contains 0 means the two
    cannot be told apart on these rows. BLEU is recomputed from summed per-row n-gram
    statistics (corpus BLEU, as evaluate reports it); accuracy and ROUGE-L are means of
    the per-row scores evaluate saved."""
    m = c.reference.metrics
    metric = m.get("primary_metric")
    ids, per_row, full, missing = None, {}, {}, []
    for i, row in enumerate(c.rows):
        preds, why = _read_predictions(Path(repo), row)
        if preds is not None and (len(preds) != m["rows"] or (ids is not None and ids != [p["id"] for p in preds])):
            preds, why = None, f"its predictions are not the {m['rows']} test rows of the reference run"
        if preds is None:
            missing.append({"label": row["label"], "source": row["source"], "reason": why})
            continue
        values = row_values(preds, metric)
        again = metric_of(values, metric)
        recorded = row["metrics"].get(metric)
        if recorded is None or abs(again - recorded) > 0.01 + 1e-9:  # metrics.json rounds to 2 places
            missing.append({"label": row["label"], "source": row["source"], "reason":
                            f"its predictions give {metric} {again:.2f}, its metrics say {recorded}: not this run's"})
            continue
        ids = ids or [p["id"] for p in preds]
        per_row[i], full[i] = values, again
    result = {"metric": metric, "samples": samples, "seed": seed, "best": None, "missing": missing}
    c.significance = result
    if not per_row:
        return result
    boot = bootstrap(per_row, metric, samples, seed)
    best = max(full, key=full.get)
    result["best"] = {"label": c.rows[best]["label"], "source": c.rows[best]["source"], metric: round(full[best], 2)}
    for i in per_row:
        dlo, dhi = interval(boot[i] - boot[best])
        c.rows[i]["significance"] = {
            "score": round(full[i], 2), "ci95": interval(boot[i]),
            "diff_to_best": round(full[i] - full[best], 2), "diff_ci95": [dlo, dhi],
            "indistinguishable_from_best": bool(dlo <= 0 <= dhi), "best": i == best}
    return result


def _yaml_value(v) -> str:
    text = json.dumps(v) if v is None or isinstance(v, (bool, dict, list)) else str(v)
    return text if len(text) <= 60 else text[:57] + "..."


def markdown(c: Comparison) -> str:
    m = c.reference.metrics
    keys = list(dict.fromkeys(k for r in c.rows for k in r["metrics"]))
    primary = m.get("primary_metric")
    sig = c.significance
    with_ci = bool(sig and sig.get("best")) and primary in keys
    metric_head = list(keys)
    if with_ci:
        at = keys.index(primary) + 1
        metric_head[at:at] = [f"{primary} 95% CI", "vs best (95% CI)"]
    head = ["method", "run", "trainable params", "training s", "steps", *metric_head, "tokens/s"]
    lines = [f"### Methods compared: {m['task']}, the same {m['rows']} test rows "
             f"(rows sha256 {m['rows_sha256'][:12]})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in c.rows:
        def num(v):
            return "—" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v}")
        metric_cells = [num(r["metrics"].get(k)) for k in keys]
        if with_ci:
            b = r.get("significance")
            extra = ["—", "—"] if not b else [
                f"{b['ci95'][0]:.2f}–{b['ci95'][1]:.2f}",
                "best" if b["best"] else
                f"{b['diff_to_best']:+.2f} ({b['diff_ci95'][0]:+.2f} to {b['diff_ci95'][1]:+.2f})"
                + (" ≈" if b["indistinguishable_from_best"] else "")]
            metric_cells[at:at] = extra
        best = r.get("train_best_step")  # tune.load_best: the weights kept were this step's
        steps_cell = num(r["train_steps"]) if best is None else f"{num(best)} of {num(r['train_steps'])}"
        cells = [r["label"], r["source"], num(r["trainable_parameters"]), num(r["train_seconds"]),
                 steps_cell, *metric_cells, num(r["tokens_per_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Primary metric: {primary}. Rows: the reference run (workspace) first, then registered "
              "versions and DVC experiments of the same task scored on the same rows with the same decoding, "
              "then the hand-written prompt baselines of the reference run."]
    if note := evaluation.bleu_caveat(m.get("task"), keys, m.get("references_per_row"), m.get("rows")):
        lines += ["", note]
    if sig and sig.get("best"):
        lines += ["", f"Intervals: paired bootstrap over the {m['rows']} test rows ({sig['samples']:,} resamples, "
                  f"seed {sig['seed']}). ≈: the interval of the difference to the best run contains 0, so this "
                  "test set cannot tell the two apart."]
    for miss in (sig or {}).get("missing", []):
        lines.append(f"- no interval for {miss['label']} ({miss['source']}): {miss['reason']}")
    changed = [r for r in c.rows if r.get("params_changed") is not None]
    if changed:
        lines += ["", f"Params that differ from the reference run's ({c.reference.source}; params.yaml at each "
                  "run's commit):"]
        for r in changed:
            diffs = r["params_changed"]
            shown = ", ".join(f"`{d['key']}` {_yaml_value(d['value'])} (reference {_yaml_value(d['reference'])})"
                              for d in diffs[:PARAMS_SHOWN])
            more = f", and {len(diffs) - PARAMS_SHOWN} more" if len(diffs) > PARAMS_SHOWN else ""
            lines.append(f"- {r['source']}: {shown + more if diffs else 'none (the same params)'}")
    if c.excluded:
        lines += ["", "Not comparable, left out:"]
        lines += [f"- {e['source']} ({e['method']}): {e['reason']}" for e in c.excluded]
    return "\n".join(lines) + "\n"
