"""Lineage of a registered version: what produced ``<artifact>@<version>``.

Everything is read at the version's commit (a GTO tag names it): ``dvc.lock`` (the hash
of every stage's inputs and outputs), ``params.yaml``, the ``cache: false`` metrics and
gate committed with it, and — through ``dvc.api.DVCFileSystem`` at that commit, from the
local DVC cache or the remote — the validation report each cached output carries, and
the raw and clean outputs to say what became of a source record: trained on, in a split
but not trained on, removed by clean or quarantined by collect (with the reason), or never
collected.
Nothing in the working tree is read or changed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from pipelines import evaluation
from pipelines.common import SPLITS, StageError
from pipelines.stages import CATALOG

# Stage outputs whose hashes say which data produced a version (dvc.lock's names). The
# registered directory is package's output; in versions from before that stage, tune's.
DATA_OUTPUTS = {"base_model": "base model", "collect": "raw", "clean": "clean", "tokenize": "shards",
                "tune": "tuned", "package": "adapter"}
# Outputs that carry their stage's validation report inside (GX, see pipelines/validation.py);
# a version from before the package stage has no data/models/tuned (reported as "-").
VALIDATED = tuple(s.validated for s in CATALOG.values() if s.validated in s.writes)  # not evaluate's: in git
# Where a record that reached no split is: clean's removals (one file per reason), collect's quarantine.
REMOVED, QUARANTINE, RECORDS = "data/clean/removed", "data/raw/quarantine.jsonl", "data/raw/records.jsonl"
ADAPTER = "data/models/adapter"


def resolve(repo: Path, spec: str) -> dict:
    """{artifact, version, commit, stages} of ``artifact@version`` in ``repo``'s GTO registry;
    a bare ``artifact`` is its version in ``prod``, as ``ptune serve`` and ``generate`` name it."""
    from pipelines import registry

    artifact, sep, version = spec.partition("@")
    if not artifact or (sep and not version):
        raise StageError(f"{spec!r}: expected <artifact>@<version> or <artifact> (its prod version), e.g. "
                         "e2e-adapter@v0.0.1 (`ptune registry` lists them)")
    found = registry.list_versions(repo, artifact)
    if not found:
        raise StageError(f"{artifact}: no registered versions in {repo} (`ptune registry` lists what there is)")
    if not sep:
        prod = registry.prod_version(repo, artifact)
        if prod is None:
            raise StageError(f"{artifact}: no version in prod; name one: "
                             f"{', '.join(artifact + '@' + v['version'] for v in found)}")
        version = prod["version"]
    for v in found:
        if v["version"] == version:
            return {"artifact": artifact, "version": version, "commit": v["commit"], "stages": v["stages"]}
    raise StageError(f"{artifact} has no version {version}; registered: {', '.join(v['version'] for v in found)}")


def resolve_path_or_version(repo: Path, spec: str) -> dict:
    """``resolve`` for an argument that names a directory or a registered version, once it is
    known not to be a directory: the error says both readings failed."""
    try:
        return resolve(repo, spec)
    except StageError as exc:
        raise StageError(f"{spec}: no such directory; nor a registered version: {exc}") from None


def _show(repo: Path, commit: str, path: str) -> str | None:
    from pipelines.registry import _git

    proc = _git(repo, "show", f"{commit}:{path}", check=False)
    return proc.stdout if proc.returncode == 0 else None


def _fs(repo: Path, commit: str):
    from dvc.api import DVCFileSystem

    return DVCFileSystem(str(repo), rev=commit)


def materialize(repo: Path, commit: str, path: str, dest: Path) -> Path:
    """Copy ``path`` (a DVC-tracked file or directory) as it was at ``commit`` to ``dest``."""
    fs = _fs(repo, commit)
    if not fs.exists(path):
        raise StageError(f"{path}: not in the repository at {commit[:10]}")
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    try:
        fs.get(path, str(dest), recursive=fs.isdir(path))
    except Exception as exc:  # noqa: BLE001 - DVC's missing-cache errors have several types
        raise StageError(f"{path}@{commit[:10]}: cannot be read from the DVC cache or remote ({exc}); "
                         "`dvc pull` it or configure the remote it was pushed to") from None
    return dest


def _validation(fs, out: str) -> dict | None:
    path = f"{out}/validation.json"
    try:
        if not fs.exists(path):
            return None
        report = json.loads(fs.read_text(path))
    except Exception:  # noqa: BLE001 - an output missing from cache: reported as unknown
        return {"success": None, "note": "not in the DVC cache or remote"}
    return _summary(report)


def _hashes(lock: dict) -> dict:
    """stage -> {output path: md5 (.dir for directories)}, for the data stages."""
    out = {}
    for stage, entry in (lock.get("stages") or {}).items():
        out[stage] = {o["path"]: o.get("md5") or o.get("hash") for o in entry.get("outs", [])}
    return out


def _unavailable(path: str, exc: Exception) -> StageError:
    return StageError(f"{path}: in the version but not readable from the DVC cache or remote "
                      f"({type(exc).__name__}: {exc}); `dvc pull` it to tell what happened to a record")


def _files(fs, out: str) -> set[str]:
    """The files of the output directory ``out`` in the version, from its DVC listing.

    Asked of the listing, never of one file: for an output the cache and remote lack,
    DVCFileSystem may answer that a file does not exist, and an answer built on that
    ("never collected") would be a guess.
    """
    try:
        files = {p.lstrip("/") for p in fs.find(out)}
    except Exception as exc:  # noqa: BLE001 - DVC's missing-cache errors have several types
        raise _unavailable(out, exc) from None
    if not files:
        raise StageError(f"{out}: not in the version, so what became of a record cannot be told")
    return files


def _lines(fs, path: str):
    try:
        with fs.open(path, "r", encoding="utf-8") as f:
            yield from f
    except Exception as exc:  # noqa: BLE001 - as in _files
        raise _unavailable(path, exc) from None


def _trained_on(fs, record_id: str) -> tuple[bool, float | None] | None:
    """(is ``record_id`` in the adapter's train_ids.txt, epochs drawn), or None if not recorded."""
    files = _files(fs, ADAPTER)
    if f"{ADAPTER}/ptune_adapter.json" not in files:
        return None
    recorded = (json.loads("".join(_lines(fs, f"{ADAPTER}/ptune_adapter.json"))).get("data") or {}).get("train_ids")
    if not recorded:
        return None  # a version from before tune recorded its rows
    path = f"{ADAPTER}/{recorded['file']}"
    if path not in files:
        raise StageError(f"{path}: named in ptune_adapter.json but not in the version")
    return any(line.rstrip("\n") == record_id for line in _lines(fs, path)), recorded.get("epochs_drawn")


def _find(fs, files: set[str], path: str, record_id: str) -> dict | None:
    """The first JSON line of ``path`` whose id is ``record_id``; None if none or no such file."""
    needle = json.dumps(record_id, ensure_ascii=False)  # as the stages write ids
    if path in files:
        for line in _lines(fs, path):
            if needle in line and (row := json.loads(line)).get("id") == record_id:
                return row
    return None


def _outside_clean(fs, files: set[str], record_id: str) -> dict:
    """Why ``record_id`` is in no clean split: removed by clean, quarantined by collect, or never collected."""
    for path in sorted(p for p in files if p.startswith(f"{REMOVED}/") and p.endswith(".jsonl")):
        if row := _find(fs, files, path, record_id):
            return {"status": "removed", "reason": row.get("reason"), "detail": (
                f"removed by clean: {row.get('reason')} ({row.get('detail')}); {path}")}
    if row := _find(fs, files, QUARANTINE, record_id):
        return {"status": "quarantined", "reason": row.get("reason"), "detail": (
            f"quarantined by collect: {row.get('reason')} ({row.get('detail')}) at {row.get('location')}; "
            f"{QUARANTINE}")}
    if _find(fs, files, RECORDS, record_id):  # clean accounts for every record (in = out + removed)
        raise StageError(f"{record_id}: collected ({RECORDS}) but in no clean split and not in {REMOVED}: "
                         "the version's clean output is inconsistent")
    return {"status": "never_collected", "detail": (
        f"never collected: no source row of this version has that id ({RECORDS}, {QUARANTINE})")}


def membership(repo: Path, commit: str, record_id: str, params: dict, fs=None) -> dict:
    """What happened to ``record_id`` in the version: ``status`` is ``trained``, ``not_trained``
    (in a split, not in the training rows), ``removed`` (by clean, with its ``reason``),
    ``quarantined`` (by collect, with its ``reason``), ``never_collected``, or ``unknown``
    (a version older than tune's record of its rows). Reads the stage outputs at ``commit``."""
    fs = fs or _fs(repo, commit)
    files = _files(fs, "data/clean") | _files(fs, "data/raw")
    found = next((split for split in SPLITS if _find(fs, files, f"data/clean/{split}.jsonl", record_id)), None)
    answer = {"record_id": record_id, "split": found, "in_training_data": False}
    if found is None:
        answer.update(_outside_clean(fs, files, record_id))
        return answer
    if found != "train":
        answer.update(status="not_trained", detail=f"in the {found} split: held out from training")
        return answer
    trained = _trained_on(fs, record_id)
    if trained is not None:
        info, drawn = trained
        if info:
            partial = drawn is not None and drawn < 1
            answer.update(in_training_data=True, status="trained", detail=(
                "in the train split and in the adapter's training rows (data/models/adapter/train_ids.txt)"
                + (f"; training stopped after {drawn:.0%} of an epoch, so it may not have been drawn"
                   if partial else "")))
        else:
            answer.update(status="not_trained", detail=(
                "in the train split but not in the adapter's training rows: dropped by tokenize "
                "(data/shards/dropped.jsonl) or outside the tune.max_train_examples subset"))
        return answer
    # Versions from before tune recorded its rows: infer from the params where that is exact.
    limit = (params.get("tune") or {}).get("max_train_examples")
    try:
        manifest = json.loads(fs.read_text("data/shards/manifest.json"))
        train_rows = manifest["splits"]["train"]["examples"]
    except Exception:  # noqa: BLE001
        train_rows = None
    if not limit or (train_rows is not None and train_rows <= limit):
        answer.update(in_training_data=True, status="trained",
                      detail="in the train split, and tune trained on all of it")
    else:
        answer.update(in_training_data=None, status="unknown", detail=(
            f"in the train split; tune used a seeded subset of {limit} of its {train_rows or '?'} examples "
            "(tune.max_train_examples), and this version did not record which ones"))
    return answer


def lineage(repo: Path, spec: str, record_id: str | None = None) -> dict:
    repo = Path(repo)
    version = resolve(repo, spec)
    commit = version["commit"]
    lock_text = _show(repo, commit, "dvc.lock")
    if lock_text is None:
        raise StageError(f"{spec}: its commit {commit[:10]} has no dvc.lock; it was not produced by `dvc repro`")
    lock = yaml.safe_load(lock_text)
    params = yaml.safe_load(_show(repo, commit, "params.yaml") or "{}") or {}
    hashes = _hashes(lock)
    fs = _fs(repo, commit)
    committed = {}
    for path in (evaluation.METRICS, evaluation.DETAILS, "data/eval/gate.json", "data/eval/validation.json",
                 *(f"data/metrics/{s}.json" for s in ("collect", "clean", "tokenize", "tune", "package"))):
        text = _show(repo, commit, path)
        committed[path] = json.loads(text) if text else None
    numbers, details = committed.pop(evaluation.METRICS), committed.pop(evaluation.DETAILS)
    metrics = evaluation.join(numbers, details) if numbers else None
    out = {
        **version,
        "params": {k: params.get(k) for k in ("task", "base_model", "tokenize", "tune", "evaluate", "package")},
        "data": {name: hashes.get(stage, {}) for stage, name in DATA_OUTPUTS.items()},
        "validation": {**{o: _validation(fs, o) for o in VALIDATED},
                       "data/eval/validation.json": _summary(committed.pop("data/eval/validation.json"))},
        "stage_metrics": committed,
        "metrics": {k: metrics.get(k) for k in ("task", "method", "primary_metric", "rows", "systems",
                                                  "tuned", "zero_shot", "few_shot", "not_computed",
                                                  "references_per_row")
                    if k in metrics} if metrics else None,
    }
    if record_id:
        out["record"] = membership(repo, commit, record_id, params, fs)
    return out


def _summary(report: dict | None) -> dict | None:
    if report is None:
        return None
    return {"suite": report.get("suite"), "success": report.get("success"),
            "met": f"{report.get('successful')}/{report.get('evaluated')}", "rows": report.get("rows")}


def format_lineage(info: dict) -> str:
    lines = [f"{info['artifact']}@{info['version']}  commit {info['commit']}  stages: "
             f"{', '.join(info['stages']) or '-'}"]
    p = info["params"]
    base = p.get("base_model") or {}
    at = f" at commit {base['revision']}" if base.get("revision") else ""
    lines.append(f"  task {(p.get('task') or {}).get('name')}, base model {base.get('source')}{at}, "
                 f"tune.method {(p.get('tune') or {}).get('method')}")
    lines.append("  data (dvc.lock):")
    for name, outs in info["data"].items():
        for path, md5 in outs.items():
            lines.append(f"    {name:<10} {path:<32} {md5}")
    lines.append("  validation:")
    for path, v in info["validation"].items():
        state = "-" if v is None else {True: "passed", False: "FAILED", None: "unknown"}[v.get("success")]
        lines.append(f"    {path:<32} {state}" + (f" ({v['suite']})" if v and v.get("suite") else ""))
    m = info.get("metrics")
    if m:
        key = m.get("primary_metric")
        lines.append(f"  metrics ({m.get('rows')} test rows): " + "; ".join(
            f"{s} {key} {m[s].get(key)}" for s in m.get("systems", ["tuned", "zero_shot"]) if s in m))
        if note := evaluation.bleu_caveat(m.get("task"), [key], m.get("references_per_row"), m.get("rows"), short=True):
            lines.append(f"    {note}")
    if "record" in info:
        r = info["record"]
        verdict = {True: "yes", False: "no", None: "undetermined"}[r["in_training_data"]]
        lines.append(f"  record {r['record_id']}: in training data: {verdict} — {r['detail']}")
    return "\n".join(lines)
