"""The ``ptune`` command.

    ptune stage <name> ...   one DVC stage (dvc.yaml calls these; paths come from there)
    ptune register           after `dvc repro`: commit, GTO version + stages, dvc push (gate permitting)
    ptune registry           registered versions, their stages and key metrics
    ptune tasks              the tasks declared in tasks/<name>.yaml, each checked
    ptune evaluate --adapter <dir | artifact@version> --file <path>
                             score an adapter on any file in the task's source format
    ptune lineage <artifact>[@<version>] [--record-id ID]
                             commit, params, data hashes, validation and metrics of a version
    ptune export --adapter <dir | artifact@version> --out <dir>
                             what other engines load: a merged checkpoint (LoRA, full), a soft
                             prompt tensor (prompt tuning, P-tuning); prefix tuning is refused
    ptune compare            every trained method (registered versions, DVC experiments) on the
                             same test rows as data/eval/metrics.json, with the prompt baselines
                             and paired-bootstrap 95% intervals of the primary metric
    ptune serve [--host --port]  the registry's versions over an OpenAI-compatible API on 127.0.0.1:8000
    ptune generate --model e2e-adapter 'name[The Eagle], eatType[coffee shop]'
                             one request through the serving path, without a server
    ptune docs               the Great Expectations Data Docs of the stages' validations (offline HTML)
    ptune retrain [-S k=v]   the Prefect `retrain` flow: every stage, then register
    ptune server [--port N]  a local Prefect server (UI) on 127.0.0.1, database under .prefect/
    ptune deploy             the `retrain` deployment (schedule from params.yaml), process work pool
    ptune worker             a worker that runs the deployment's flow runs in this project

Errors a user can fix (bad params, bad input, failed validation) are printed as one
readable message and exit 1; there is no traceback for them.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Callable

from pipelines.common import StageError, check_output, setup_logging, write_json
from pipelines.config import ConfigError, load_params
from serving.types import DEFAULT_MAX_TOKENS, DRAIN_SECONDS, MAX_TOKENS_LIMIT, MAX_VERSIONS, POLL_SECONDS

log = logging.getLogger("ptune")


def _write_metrics(path: str | None, stats) -> None:
    if path:
        write_json(Path(path), asdict(stats) if is_dataclass(stats) else stats)


def _stage(args: argparse.Namespace) -> None:
    from pipelines import deps
    from pipelines.stages import CATALOG
    from pipelines.tasks import get_task

    params = load_params(args.params)
    task = get_task(params.task.name, Path(args.params).parent / "tasks")
    deps.check(args.stage, params, Path("."))  # under `dvc repro`: what params name must be a dep or pinned
    stage = CATALOG[args.stage]
    stats = stage.call(params, task, {o.name: getattr(args, o.name) for o in stage.options})
    _write_metrics(getattr(args, "stats", None), stats)


def _register(args: argparse.Namespace) -> None:
    from pipelines import registry

    params = load_params(args.params)
    result = registry.register(Path("."), params.register, Path(args.gate), Path(args.metrics))
    print(result.message)


def _registry(args: argparse.Namespace) -> None:
    from pipelines import registry

    if not Path(args.params).is_file():  # not a project: "no registered versions yet" would mislead
        raise StageError(f"no {args.params} in {Path.cwd()}: run `ptune registry` in the project, whose git "
                         "tags (GTO) are the registry")
    artifacts = registry.artifacts(Path("."))
    if not artifacts:
        print("no registered versions yet (`make run` registers the first)")
    for artifact in artifacts:
        versions = registry.list_versions(Path("."), artifact)
        print(f"{artifact}: {len(versions)} version(s), newest first")
        for v in versions:
            print("  " + registry.format_version(v))
        if note := registry.versions_note(versions):
            print("  " + note)


def _tasks(args: argparse.Namespace) -> None:
    from pipelines.tasks import get_task, task_names

    root = Path(args.params).parent / "tasks"
    names, bad = task_names(root), []
    if not names:
        raise StageError(f"no task declared: no {root}/<name>.yaml (see the README, \"Bring your own data: tasks\")")
    for name in names:
        try:
            t = get_task(name, root)
        except ConfigError as exc:
            bad.append(str(exc))
            print(f"{name:20} INVALID (below)")
            continue
        labels = f", labels {sorted(t.labels.values())}" if t.labels else ""
        optional = f" (optional: {list(t.optional_fields)})" if t.optional_fields else ""
        print(f"{name:20} {t.kind}: fields {list(t.fields)}{optional}, grouped by {t.group_key}, "
              f"primary metric {t.primary_metric}{labels}")
    if bad:
        raise ConfigError("\n".join(bad))


def _evaluate(args: argparse.Namespace) -> None:
    from pipelines import evaluate
    from pipelines.tasks import get_task

    params = load_params(args.params)
    if args.max_rows:
        params = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"max_rows": args.max_rows})})
    task = get_task(args.task or params.task.name, Path(args.params).parent / "tasks")
    metrics = evaluate.evaluate_file(params, task, args.adapter, Path(args.file), Path(args.base),
                                     Path(args.shards), Path(args.out), fmt=args.format)
    print(evaluate.report(metrics), end="")
    print(f"metrics, predictions and report in {args.out}/")


def _lineage(args: argparse.Namespace) -> None:
    import json

    from pipelines import lineage

    info = lineage.lineage(Path("."), args.version, args.record_id)
    print(json.dumps(info, indent=2, default=str) if args.json else lineage.format_lineage(info))


def _export(args: argparse.Namespace) -> None:
    from serving import export

    record = export.export(args.adapter, Path(args.base), Path(args.shards), Path(args.out), force=args.force)
    check = record["check"]
    what = {"merged_checkpoint": "a merged checkpoint", "checkpoint": "a checkpoint",
            "soft_prompt": "a soft prompt"}[record["kind"]]
    print(f"{record['source'].get('version', args.adapter)} ({record['method']}) exported as {what} to {args.out}/ (logits within "
          f"{check['max_abs_logit_difference']:.2g} of the PEFT model's on a training example); "
          f"prompt format in {args.out}/prompt_format.json")


def _quiet_loading() -> None:
    """No per-load progress bars: a server loads a version at every promotion, and its log
    should say which version, not draw bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _serve(args: argparse.Namespace) -> None:
    from serving import server

    _quiet_loading()

    repo = _repo(args.repo)
    server.serve(repo, Path(args.base) if args.base else repo / "data/models/base", args.host, args.port,
                 max_batch=args.max_batch, max_queue=args.max_queue, prefill_tokens=args.prefill_tokens,
                 dtype=args.dtype, drain_seconds=args.drain_seconds,
                 limits=server.Limits(max_tokens=args.max_tokens_limit), max_versions=args.max_versions,
                 poll_seconds=args.poll)


def _repo(path: str) -> Path:
    """The project whose registry names the models (``--repo``)."""
    if not Path(path).is_dir():
        raise StageError(f"--repo {path}: no such directory (the project whose registry names the models)")
    return Path(path)


def _generate(args: argparse.Namespace) -> None:
    import json

    from serving import models
    from serving.decoding import LogprobText
    from serving.types import Decoding

    _quiet_loading()
    fields = None
    if args.text == "-":  # a prompt too long or too awkward to quote: `ptune generate --model m - < prompt.txt`
        args.text = sys.stdin.read().removesuffix("\n")
    if args.field:
        if args.text is not None or args.raw:
            raise StageError("pass either TEXT or --field, not both")
        fields = {}
        for item in args.field:
            key, sep, value = item.partition("=")
            if not sep:
                raise StageError(f"--field {item!r}: expected name=value, e.g. --field 'mr=name[The Eagle]'")
            if key in fields:
                raise StageError(f"--field {key}: given twice; pass each field once")
            fields[key] = value
    elif args.text is None:
        raise StageError("nothing to generate from: pass TEXT (the task's input) or --field name=value")
    decoding = Decoding(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()), n=args.n,
                        num_beams=args.num_beams, length_penalty=args.length_penalty,
                        no_repeat_ngram_size=args.no_repeat_ngram_size, logprobs=args.logprobs)
    for name, why in decoding.problems()[:1]:  # said before the model loads
        raise StageError(f"{'-n' if name == 'n' else '--' + name.replace('_', '-')}: {why}")
    repo = _repo(args.repo)
    served, prompt_tokens, choices, tokenizer = models.generate(
        repo, Path(args.base) if args.base else repo / "data/models/base", args.model, decoding,
        text=args.text, fields=fields, raw=args.raw, chat=args.chat)
    failed = [c for c in choices if c.reason == "error"]
    if failed:
        raise StageError(f"decoding failed: {failed[0].error}")
    tokens = LogprobText(tokenizer)  # each token's text as the server gives it
    if args.json:
        print(json.dumps({"model": served.name, "commit": served.commit, "method": served.method,
                          "prompt_tokens": prompt_tokens,
                          "choices": [{"index": c.index, "text": c.text, "finish_reason": c.reason,
                                       "completion_tokens": c.completion_tokens,
                                       "logprobs": tokens.completion([(lp.token_id, lp) for lp in c.logprobs])
                                       if args.logprobs is not None else None} for c in choices]},
                         indent=2, ensure_ascii=False))
        return
    print(f"{served.name} ({served.method}{', commit ' + served.commit[:10] if served.commit else ''})",
          file=sys.stderr)
    for c in choices:
        print(f"[{c.index}] {c.text}" if len(choices) > 1 else c.text)
        for lp in c.logprobs:  # a token a line: its log-probability, the token, its alternatives
            others = "  ".join(f"{tokens.text(t)!r} {v:.3f}" for t, v in lp.top)
            print(f"  {lp.logprob:9.4f}  {tokens.text(lp.token_id)!r}" + (f"  ({others})" if others else ""))


def _compare(args: argparse.Namespace) -> None:
    import json

    from pipelines import compare

    c = compare.compare(Path("."), Path(args.reference) if args.reference else None)
    if not args.no_intervals:
        compare.significance(Path("."), c, samples=args.samples)
    text = compare.markdown(c)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    print(json.dumps({"rows": c.rows, "excluded": c.excluded, "significance": c.significance}, indent=2,
                     default=str)  # a params.yaml value YAML reads as a date
          if args.json else text, end="")


def _docs(args: argparse.Namespace) -> None:
    from pipelines import validation

    index, results = validation.build_docs()
    print(f"Great Expectations Data Docs (every suite, and the newest {results} stage validations' pages; "
          f"they render with no network):\n  {index.as_uri()}")
    if not results:
        print("no validation results yet: `make run` (or `dvc repro`) validates each stage's output")


def _retrain(args: argparse.Namespace) -> None:
    from flows.retrain import apply_overrides, retrain

    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"-S {item!r}: expected key=value, e.g. -S tune.method=prompt")
        if key in overrides:
            raise ConfigError(f"-S {key}: given twice; pass each parameter once")
        overrides[key] = value
    root = Path(".").resolve()
    if overrides:  # checked before the flow run starts: a typo is not a failed run in Prefect's history
        apply_overrides(root, overrides, write=False)
    retrain(repo=str(root), params_overrides=overrides or None)


def _server(args: argparse.Namespace) -> None:
    from pipelines import prefect_ops

    sys.exit(prefect_ops.server(Path(".").resolve(), load_params(args.params).prefect, args.port))


def _deploy(args: argparse.Namespace) -> None:
    from pipelines import prefect_ops

    prefect_ops.deploy(Path(".").resolve(), load_params(args.params).prefect, schedule=not args.no_schedule)


def _worker(args: argparse.Namespace) -> None:
    from pipelines import prefect_ops

    sys.exit(prefect_ops.worker(Path(".").resolve(), load_params(args.params).prefect, args.pool))


def _number(low: float, high: float | None = None, kind: type = int) -> Callable[[str], float]:
    """An argparse type: a number in [low, high], refused with the flag's name before any work
    (``--max-rows 0`` was ignored, ``--poll 0`` re-read the registry without pause, ``--port
    70000`` was a traceback)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):  # nan passes every comparison: --poll nan re-read without pause
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is outside [{low}, {high}]" if high is not None
                                             else f"{text}: must be at least {low}")
        return value
    return parse


PORT = _number(1, 65535)


def _finite(text: str) -> float:
    """An argparse type: a float that is a number (``--temperature nan`` was taken)."""
    return _number(-math.inf, kind=float)(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    st = sub.add_parser("stage", help="run one pipeline stage (as dvc.yaml does)")
    stages = st.add_subparsers(dest="stage", required=True)
    from pipelines.stages import CATALOG

    for stage in CATALOG.values():
        s = stages.add_parser(stage.name, help=stage.about)
        for o in stage.options:
            s.add_argument(f"--{o.name}", required=o.name != "stats", help=o.help)
    st.set_defaults(func=_stage)

    r = sub.add_parser("register", help="after dvc repro: commit, version with GTO, push (if the gate passed)")
    r.add_argument("--gate", default="data/eval/gate.json")
    r.add_argument("--metrics", default="data/eval/metrics.json")
    r.set_defaults(func=_register)

    sub.add_parser("registry", help="list registered versions").set_defaults(func=_registry)
    sub.add_parser("tasks", help="list the declared tasks (tasks/<name>.yaml), each checked").set_defaults(func=_tasks)

    e = sub.add_parser("evaluate", help="score an adapter (or a registered version) on any file")
    e.add_argument("--adapter", required=True, help="an adapter directory, or <artifact>[@<version>] (bare: its prod version)")
    e.add_argument("--file", required=True, help="records in the task's source format (as collect reads them)")
    e.add_argument("--task", help="default: task.name in params.yaml")
    e.add_argument("--format", help="the file's format, where its extension does not say")
    e.add_argument("--base", default="data/models/base")
    e.add_argument("--shards", default="data/shards", help="for an adapter directory: the shards it was trained on")
    e.add_argument("--out", default=".ptune/evaluate", help="where metrics, predictions and the report go (not a DVC output)")
    e.add_argument("--max-rows", type=_number(1), help="override evaluate.max_rows")
    e.set_defaults(func=_evaluate)

    li = sub.add_parser("lineage", help="what produced a registered version")
    li.add_argument("version", metavar="ARTIFACT[@VERSION]", help="a registered version; bare: its prod version")
    li.add_argument("--record-id", help="a source record id: was it in this version's training data?")
    li.add_argument("--json", action="store_true")
    li.set_defaults(func=_lineage)

    x = sub.add_parser("export", help="write what other engines load (merged checkpoint, soft prompt)")
    x.add_argument("--adapter", required=True, help="an adapter directory, or <artifact>[@<version>] (bare: its prod version)")
    x.add_argument("--out", required=True, help="the directory to write (refused if it exists, unless --force)")
    x.add_argument("--base", default="data/models/base", help="the base model the adapter was trained on")
    x.add_argument("--shards", default="data/shards", help="for an adapter directory: the shards it was trained on "
                   "(its prompt format)")
    x.add_argument("--force", action="store_true", help="replace --out if it is an earlier export (or empty)")
    x.set_defaults(func=_export)

    sv = sub.add_parser("serve", help="the registry's versions over an OpenAI-compatible HTTP API (Ctrl-C stops it)")
    sv.add_argument("--repo", default=".", help="the project whose registry is served (default: here)")
    sv.add_argument("--base", help="the base model directory (default: <repo>/data/models/base)")
    sv.add_argument("--host", default="127.0.0.1", help="anything but loopback requires PTUNE_API_KEY")
    sv.add_argument("--port", type=PORT, default=8000)
    sv.add_argument("--max-batch", type=_number(1), default=16, help="rows (choices) decoding together")
    sv.add_argument("--max-queue", type=_number(1), default=64, help="requests waiting beyond the batch; more get 429")
    sv.add_argument("--prefill-tokens", type=_number(1), default=None,
                    help="padded tokens a step prefills at most, in one forward or several; a longer prompt "
                         "goes alone (default: 2048 on CPU, 8192 on CUDA)")
    sv.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="the weights' dtype (default: bf16 on a GPU, fp32 on CPU, as evaluate decodes); bfloat16 "
                         "on a CPU with hardware bf16 is ~1.7x the tokens/s, a greedy answer then may differ from "
                         "evaluate's")
    sv.add_argument("--max-tokens-limit", type=_number(1), default=MAX_TOKENS_LIMIT,
                    help="the largest max_tokens a request may ask")
    sv.add_argument("--max-versions", type=_number(0), default=MAX_VERSIONS,
                    help="versions kept loaded besides the prod ones (least recently used go first)")
    sv.add_argument("--poll", type=_number(0.5, kind=float), default=POLL_SECONDS,
                    help="seconds between reads of the registry (hot reload)")
    sv.add_argument("--drain-seconds", type=_number(0, kind=float), default=DRAIN_SECONDS,
                    help="on SIGTERM or Ctrl-C: seconds the requests in flight get to finish; what is left "
                         f"then answers 503 (default {DRAIN_SECONDS:g}: inside Kubernetes' 30 s grace period)")
    sv.set_defaults(func=_serve)

    g = sub.add_parser("generate", help="one request through the serving path, without a server")
    g.add_argument("text", nargs="?", metavar="TEXT",
                   help="the task's input (E2E: the meaning representation); with --raw, the model's input as it "
                        "is; - reads it from standard input (one trailing newline dropped)")
    g.add_argument("--model", required=True, help="base, <artifact> (its prod version) or <artifact>@<version>")
    g.add_argument("--field", action="append", metavar="NAME=VALUE", help="one of the task's input fields (repeat)")
    g.add_argument("--raw", action="store_true", help="send TEXT as it is, without the adapter's template")
    g.add_argument("--chat", action="store_true", help="TEXT as one user message (base: in its chat template)")
    g.add_argument("--repo", default=".", help="the project whose registry names the model (default: here)")
    g.add_argument("--base", help="the base model directory (default: <repo>/data/models/base)")
    g.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    g.add_argument("--temperature", type=_finite, default=0.0, help="0: greedy (what evaluate scored)")
    g.add_argument("--top-p", type=_finite, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, help="sampling: the same seed gives the same sample")
    g.add_argument("--stop", action="append", help="a stop sequence (repeat for more)")
    g.add_argument("-n", type=int, default=1, help="choices to return")
    g.add_argument("--num-beams", type=int, default=1, help="> 1: beam search")
    g.add_argument("--length-penalty", type=_finite, default=1.0)
    g.add_argument("--no-repeat-ngram-size", type=int, default=0)
    g.add_argument("--logprobs", type=int, metavar="N", help="each generated token's log-probability and its N "
                   "most likely alternatives (0-20), as the server's completions give them")
    g.add_argument("--json", action="store_true", help="the version, token counts and every choice as JSON")
    g.set_defaults(func=_generate)

    c = sub.add_parser("compare", help="every trained method (registered versions, DVC experiments) "
                       "on the same test rows, with the prompt baselines")
    c.add_argument("--reference", help="a metrics.json to compare against (default: data/eval/metrics.json)")
    c.add_argument("--out", help="also write the markdown table here")
    c.add_argument("--samples", type=_number(100), default=1000,
                   help="bootstrap resamples for the 95%% intervals (at least 100: 2.5 in each tail)")
    c.add_argument("--no-intervals", action="store_true",
                   help="skip the paired bootstrap (it reads every run's predictions from the DVC cache)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_compare)

    sub.add_parser("docs", help="build the Great Expectations Data Docs from the stages' stored validations"
                   ).set_defaults(func=_docs)

    t = sub.add_parser("retrain", help="run the Prefect retrain flow (PREFECT_API_URL or ephemeral)")
    t.add_argument("-S", "--set", action="append", metavar="KEY=VALUE",
                   help="override a parameter for this run, like `dvc exp run -S`")
    t.set_defaults(func=_retrain)

    sv = sub.add_parser("server", help="a local Prefect server and UI on 127.0.0.1 (Ctrl-C stops it)")
    sv.add_argument("--port", type=PORT, help="default: prefect.port in params.yaml")
    sv.set_defaults(func=_server)
    d = sub.add_parser("deploy", help="create or update the retrain deployment (PREFECT_API_URL or the local server)")
    d.add_argument("--no-schedule", action="store_true", help="leave out prefect.schedule: triggered runs only")
    d.set_defaults(func=_deploy)
    w = sub.add_parser("worker", help="a process worker for the deployment (Ctrl-C stops it)")
    w.add_argument("--pool", help="default: prefect.work_pool in params.yaml")
    w.set_defaults(func=_worker)
    return p


def _check_outputs(args: argparse.Namespace) -> None:
    """Every path the command writes, before any work: a wrong --out would otherwise fail
    only at the end, after the work, beside a complete hidden output."""
    if args.command == "stage":
        from pipelines.stages import CATALOG

        outputs = {"out": CATALOG[args.stage].out_is_dir, "live": True, "stats": False}
    else:
        outputs = {"out": args.command in ("evaluate", "export")}  # compare --out is a markdown file
    for name, directory in outputs.items():
        if path := getattr(args, name, None):
            check_output(Path(path), directory)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        _check_outputs(args)
        args.func(args)
    except (StageError, ConfigError) as exc:
        where = f"ptune {args.command}" + (f" {args.stage}" if args.command == "stage" else "")
        print(f"{where}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
