"""Every trained method in one table, on the same test rows.

The evaluate stage scores one adapter against the hand-written prompts. The other
methods are other runs of the same graph: registered versions (GTO tags) and DVC
experiments (``dvc exp run -S tune.method=prefix``, kept under ``refs/exps``). Their
``data/eval/metrics.json`` is committed with them (a ``cache: false`` metric), so
comparing them needs no re-scoring — provided they were scored on the same rows with
the same decoding. Each metrics file carries ``rows_sha256`` (the ids, inputs and
references of its test rows, in order); a run whose hash or decoding differs from the
reference run's is listed as excluded, with the reason, and never mixed into the table.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.common import StageError

METRICS = "data/eval/metrics.json"
TUNE_METRICS = "data/metrics/tune.json"


@dataclass
class Entry:
    source: str  # "workspace", "e2e-adapter@v0.0.2", "exp prefix-run"
    commit: str | None
    metrics: dict


@dataclass
class Comparison:
    reference: Entry
    rows: list[dict]  # one per system: label, source, trainable_parameters, train_seconds, metrics, tokens_per_s
    excluded: list[dict] = field(default_factory=list)  # {source, reason}


def _git(repo: Path, *args: str):
    from pipelines.registry import _git as git

    return git(repo, *args, check=False)


def _json_at(repo: Path, commit: str, path: str) -> dict | None:
    from pipelines.registry import metrics_at

    return metrics_at(repo, commit, path)


def candidates(repo: Path) -> list[Entry]:
    """Registered versions of every artifact, then DVC experiments, newest first."""
    from pipelines import registry

    found: list[Entry] = []
    for artifact in registry.artifacts(repo):
        for v in registry.list_versions(repo, artifact):
            m = _json_at(repo, v["commit"], METRICS)
            if m:
                found.append(Entry(f"{artifact}@{v['version']}", v["commit"], m))
    refs = _git(repo, "for-each-ref", "--sort=-creatordate", "--format=%(refname) %(objectname)", "refs/exps")
    for line in refs.stdout.splitlines() if refs.returncode == 0 else []:
        ref, commit = line.split()
        if ref.count("/") != 4:  # refs/exps/ab/cdef.../<name>; not refs/exps/exec/..., refs/exps/celery/...
            continue
        m = _json_at(repo, commit, METRICS)
        if m:
            found.append(Entry(f"exp {ref.rsplit('/', 1)[-1]}", commit, m))
    return found


def _train_seconds(repo: Path, entry: Entry) -> float | None:
    info = entry.metrics.get("system_info", {}).get("tuned", {})
    if info.get("train_seconds") is not None:
        return info["train_seconds"]
    if entry.commit:  # metrics written before evaluate recorded it: the tune stage's own
        tune = _json_at(repo, entry.commit, TUNE_METRICS) or {}
        return tune.get("train_seconds")
    return None


def _label(m: dict, system: str) -> str:
    default = f"{m.get('method', '?')} (tuned)" if system == "tuned" else system.replace("_", "-")
    return m.get("system_info", {}).get(system, {}).get("label", default)


def _row(label: str, source: str, system: str, m: dict, train_seconds) -> dict:
    info = m.get("system_info", {}).get(system, {})
    trainable = info.get("trainable_parameters", m.get("trainable_parameters") if system == "tuned" else 0)
    return {"label": label, "source": source, "trainable_parameters": trainable,
            "train_seconds": train_seconds, "metrics": m.get(system, {}),
            "tokens_per_s": m.get("tokens_per_s", {}).get(system)}


def compare(repo: Path, reference: Path | None = None, extra: list[Entry] | None = None) -> Comparison:
    """The reference run's systems (default: the workspace's ``data/eval/metrics.json``)
    and every other trained run scored on the same rows with the same decoding."""
    repo = Path(repo)
    path = Path(reference) if reference else repo / METRICS
    if not path.is_file():
        raise StageError(f"{path}: no evaluation to compare against; run `dvc repro evaluate` first")
    ref = Entry("workspace" if reference is None else str(reference), None, json.loads(path.read_text()))
    m = ref.metrics
    if "rows_sha256" not in m:
        raise StageError(f"{path}: written before evaluate recorded its rows' hash; rerun `dvc repro evaluate`")
    tune_path = repo / TUNE_METRICS
    ref_seconds = m.get("system_info", {}).get("tuned", {}).get("train_seconds")
    if ref_seconds is None and reference is None and tune_path.is_file():
        ref_seconds = json.loads(tune_path.read_text()).get("train_seconds")
    tuned = [_row(_label(m, "tuned"), ref.source, "tuned", m, ref_seconds)]
    baselines = [_row(_label(m, s), ref.source, s, m, None)
                 for s in m.get("systems", ["tuned", "zero_shot"]) if s != "tuned"]
    excluded, seen = [], {json.dumps(m["tuned"], sort_keys=True) + m.get("method", "")}
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
        key = json.dumps(other["tuned"], sort_keys=True) + other.get("method", "")
        if key in seen:  # the same run reached through several refs (a registered experiment)
            continue
        seen.add(key)
        tuned.append(_row(_label(other, "tuned"), entry.source, "tuned", other,
                          _train_seconds(repo, entry)))
    return Comparison(ref, tuned + baselines, excluded)


def markdown(c: Comparison) -> str:
    m = c.reference.metrics
    keys = list(dict.fromkeys(k for r in c.rows for k in r["metrics"]))
    primary = m.get("primary_metric")
    head = ["method", "run", "trainable params", "training s", *keys, "tokens/s"]
    lines = [f"### Methods compared: {m['task']}, the same {m['rows']} test rows "
             f"(rows sha256 {m['rows_sha256'][:12]})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in c.rows:
        def num(v):
            return "—" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v}")
        cells = [r["label"], r["source"], num(r["trainable_parameters"]), num(r["train_seconds"]),
                 *(num(r["metrics"].get(k)) for k in keys), num(r["tokens_per_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Primary metric: {primary}. Rows: the reference run (workspace) first, then registered "
              "versions and DVC experiments of the same task scored on the same rows with the same decoding, "
              "then the hand-written prompt baselines of the reference run."]
    if c.excluded:
        lines += ["", "Not comparable, left out:"]
        lines += [f"- {e['source']} ({e['method']}): {e['reason']}" for e in c.excluded]
    return "\n".join(lines) + "\n"
