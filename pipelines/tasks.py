"""Tasks: what a task reads, how it is prompted and how it is scored.

A task is declared, not coded: ``tasks/<name>.yaml`` beside params.yaml holds its fields,
templates, labels, the field that groups records for splitting, its primary metric and
the baselines' instruction; this module reads and checks it. Adding a task means that
file and its sources under ``collect.sources.<name>`` in params.yaml (files under
``data/sources/<name>/``); no code. A bad declaration is refused with its file and key,
e.g. ``tasks/e2e.yaml: group_key: 'name' is not one of the fields ['mr', 'ref']``.

Templates are Jinja2 over the record's fields (and, for classification, ``verbalizer``:
the label's word). The tokenize stage copies the declaration into the shards' manifest,
so a trained adapter keeps the task it was trained on wherever it is served.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import jinja2
import jinja2.meta
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from pipelines.common import ConfigError
from pipelines.conversations import FIELD as CONVERSATION

TASKS_DIR = Path("tasks")  # beside params.yaml, in the project root
NAME = re.compile(r"[a-z][a-z0-9_]*")  # also the registry's artifact name: <name>-adapter
# What evaluate can score, per kind: the E2E challenge's five, chrF (sacrebleu) and exact match
# for generation; accuracy and macro-F1 for classification. A task declares the ones it reports.
_GENERATED = ("bleu", "nist", "meteor", "rouge_l", "cider", "chrf", "exact_match")
METRICS = {"generation": _GENERATED, "chat": _GENERATED, "classification": ("accuracy", "macro_f1")}
# The primary metric gates promotion and gets paired-bootstrap intervals over the test rows, so
# it is one a resample of rows recomputes: BLEU from per-row n-gram statistics, the others as
# the mean of per-row scores (NIST, CIDEr, chrF and macro-F1 are not), and one evaluate always
# computes (METEOR needs a Java runtime).
PRIMARY_METRICS = {"generation": ("bleu", "rouge_l", "exact_match"), "chat": ("bleu", "rouge_l", "exact_match"),
                   "classification": ("accuracy",)}
VERBALIZER = "verbalizer"  # the template variable holding a classification label's word


@dataclass(frozen=True)
class Task:
    name: str
    kind: Literal["generation", "classification", "chat"]
    fields: tuple[str, ...]
    group_key: str  # records sharing this field always land in the same split
    prompt: str  # Jinja2 template of the tuned model's input ("" for chat: the conversation is)
    target: str  # Jinja2 template of what the model learns to produce ("" for chat: the assistant turns)
    zero_shot: str  # hand-written instruction for the untuned base model ("" for chat: the conversation)
    target_field: str
    labels: dict[str, str] = field(default_factory=dict)  # label value -> verbalizer
    text_fields: tuple[str, ...] = ()  # fields the length filters apply to
    primary_metric: str = "bleu"
    optional_fields: tuple[str, ...] = ()  # may be absent or empty in a record: then ""
    metrics: tuple[str, ...] = ()  # what evaluate reports; () = every metric of the kind
    system: str = ""  # chat: the system prompt of a conversation that brings none (training and serving)
    chat_template: bool = False  # the prompt as the user turn, the target as the assistant's (chat: always)

    @property
    def chat(self) -> bool:
        return self.kind == "chat"

    @property
    def scored_metrics(self) -> tuple[str, ...]:
        return self.metrics or METRICS[self.kind]

    @property
    def row_metric(self) -> str:
        """The per-row score each prediction carries: the primary metric's, or ROUGE-L's where
        the primary is BLEU (whose resamples use n-gram statistics instead)."""
        return "rouge_l" if self.primary_metric == "bleu" else self.primary_metric

    @property
    def input_fields(self) -> tuple[str, ...]:
        """What the model is given: every field but the target."""
        return tuple(f for f in self.fields if f != self.target_field)

    @property
    def required_fields(self) -> tuple[str, ...]:
        """The fields every record must hold as non-empty text: all but the optional ones."""
        return tuple(f for f in self.fields if f not in self.optional_fields)

    def declaration(self) -> dict:
        """The task as its YAML file declares it (without the name, which is the file's)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k != "name"}


class Declaration(BaseModel):
    """The schema of ``tasks/<name>.yaml``. Validators run in field order, so each checks
    against the keys above it."""
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["generation", "classification", "chat"]
    fields: tuple[str, ...] = Field(min_length=1, description="what collect's `columns` map onto")
    labels: dict[str, str] = Field(default_factory=dict, description="classification: label value -> word")
    group_key: str = Field(description="records sharing this field's value share a split")
    target_field: str
    text_fields: tuple[str, ...] = Field(default=(), description="what the length filters measure")
    optional_fields: tuple[str, ...] = Field(default=(), description="may be absent or empty (then \"\")")
    system: str = Field(default="", description="chat: the system prompt of a conversation without one")
    prompt: str = Field(default="", validate_default=True)  # required unless chat: the validator says so
    target: str = Field(default="", validate_default=True)
    zero_shot: str = Field(default="", validate_default=True)
    chat_template: bool = Field(default=False, description="the prompt as the user turn of the base model's chat "
                                                           "template, the target as the assistant's")
    metrics: tuple[str, ...] = Field(default=(), description="what evaluate reports (default: all of the kind)")
    primary_metric: str

    @field_validator("fields")
    @classmethod
    def _fields(cls, fields: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if info.data.get("kind") == "chat" and fields != (CONVERSATION,):
            raise ValueError(f"a chat task has one field, [{CONVERSATION}]: the conversation (a source maps its "
                             f"column onto it, or builds it from other columns with `turns`)")
        if bad := [f for f in fields if not f.isidentifier() or f == VERBALIZER]:
            raise ValueError(f"{bad}: a field is a template variable: letters, digits and _, "
                             f"not starting with a digit, and not {VERBALIZER!r}")
        if len(set(fields)) < len(fields):
            raise ValueError(f"{list(fields)}: a field is listed twice")
        return fields

    @field_validator("labels", mode="before")
    @classmethod
    def _label_values(cls, labels):
        """YAML reads ``{0: negative}``'s keys as numbers; a label value is a string, as
        ``label_key`` names it (1 -> "1", true -> "true")."""
        if isinstance(labels, dict):
            return {json.dumps(k) if isinstance(k, bool) else str(k) if isinstance(k, int) else k: v
                    for k, v in labels.items()}
        return labels

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        kind = info.data.get("kind")
        if kind == "classification" and len(labels) < 2:
            raise ValueError("a classification task names at least two labels (label value: word)")
        if kind in ("generation", "chat") and labels:
            raise ValueError("only a classification task has labels")
        if empty := [k for k, v in labels.items() if not v.strip()]:
            raise ValueError(f"label(s) {empty}: the word is empty")
        if len(set(labels.values())) < len(labels):
            raise ValueError(f"{labels}: two labels share a word; the model could not tell them apart")
        return labels

    @field_validator("group_key", "target_field")
    @classmethod
    def _a_field(cls, name: str, info: ValidationInfo) -> str:
        fields = info.data.get("fields")
        if fields is not None and name not in fields:
            raise ValueError(f"{name!r} is not one of the fields {list(fields)}")
        return name

    @field_validator("text_fields", "optional_fields")
    @classmethod
    def _some_fields(cls, names: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        fields = info.data.get("fields")
        if fields is not None and (unknown := [n for n in names if n not in fields]):
            raise ValueError(f"{unknown}: not among the fields {list(fields)}")
        return names

    @field_validator("optional_fields")
    @classmethod
    def _optional_fields(cls, names: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        essential = {info.data.get("group_key"), info.data.get("target_field")}
        if bad := [n for n in names if n in essential]:
            raise ValueError(f"{bad}: the group key and the target field cannot be optional (every record "
                             "needs a group to be split by and an answer to learn)")
        return names

    @field_validator("system")
    @classmethod
    def _system(cls, system: str, info: ValidationInfo) -> str:
        if system and info.data.get("kind") != "chat":
            raise ValueError("only a chat task has a system prompt (a template says what the model is told)")
        return system

    @field_validator("prompt", "target", "zero_shot")
    @classmethod
    def _template(cls, source: str, info: ValidationInfo) -> str:
        if info.data.get("kind") == "chat":
            if source:
                raise ValueError("a chat task has no templates: the conversation, in the base model's chat "
                                 "template, is the input, and its assistant turns are what is learned")
            return source
        if not source.strip():
            raise ValueError("a template is required (Jinja2 over the fields)")
        fields = info.data.get("fields")
        if fields is None:
            return source
        # Labels that failed their own check are not in info.data: a template reading the
        # verbalizer is then not judged, or one mistake would be reported twice.
        labelled = info.data.get("labels") or "labels" not in info.data
        allowed = set(fields) | ({VERBALIZER} if labelled else set())
        used = template_variables(source)
        if unknown := sorted(used - allowed):
            raise ValueError(f"reads {unknown}, which the task does not have (it has {sorted(allowed)})")
        target_field = info.data.get("target_field")
        if info.field_name != "target" and (leaked := used & {target_field, VERBALIZER}):
            raise ValueError(f"reads {sorted(leaked)}: the answer would be in the model's input")
        if info.field_name == "target" and not used & {target_field, VERBALIZER}:
            raise ValueError(f"reads neither {target_field!r} nor {VERBALIZER!r}: it would not depend on the answer")
        return source

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, metrics: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        known = METRICS.get(info.data.get("kind"), ())
        if known and (unknown := [m for m in metrics if m not in known]):
            raise ValueError(f"{unknown}: a {info.data['kind']} task's metrics are among {list(known)}")
        if len(set(metrics)) < len(metrics):
            raise ValueError(f"{list(metrics)}: a metric is listed twice")
        return metrics

    @field_validator("primary_metric")
    @classmethod
    def _metric(cls, metric: str, info: ValidationInfo) -> str:
        allowed = PRIMARY_METRICS.get(info.data.get("kind"), ())
        if allowed and metric not in allowed:
            raise ValueError(f"{metric!r}: a {info.data['kind']} task's primary metric is one of {list(allowed)} "
                             "(it gates promotion, with intervals from resampling the test rows)")
        if (declared := info.data.get("metrics")) and metric not in declared:
            raise ValueError(f"{metric!r} is not among the declared metrics {list(declared)}")
        return metric


def template_variables(source: str) -> set[str]:
    """The variables a Jinja2 template reads; a syntax error is a ValueError saying where."""
    env = jinja2.Environment(autoescape=False)
    try:
        return set(jinja2.meta.find_undeclared_variables(env.parse(source)))
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"not a valid Jinja2 template (line {exc.lineno}: {exc.message})") from None


def from_declaration(name: str, raw, where: str) -> Task:
    """The task ``name`` from its declaration ``raw`` (a mapping); ``where`` names it in errors."""
    if not NAME.fullmatch(name):
        raise ConfigError(f"{where}: task name {name!r}: lowercase letters, digits and _, starting with a letter "
                          "(it names the registry's artifact, <name>-adapter)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of the task's keys, got {type(raw).__name__}")
    try:
        d = Declaration.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{where}: {'.'.join(str(p) for p in e['loc']) or '(task)'}: {e['msg'].removeprefix('Value error, ')}"
                 for e in exc.errors()]
        raise ConfigError("invalid task declaration:\n  " + "\n  ".join(lines)) from None
    return Task(name=name, **d.model_dump())


def task_file(name: str, root: Path = TASKS_DIR) -> Path:
    return Path(root) / f"{name}.yaml"


def task_names(root: Path = TASKS_DIR) -> list[str]:
    """The tasks declared under ``root``."""
    return sorted(p.stem for p in Path(root).glob("*.yaml"))


def get_task(name: str, root: Path = TASKS_DIR) -> Task:
    """The task declared in ``root``/<name>.yaml, checked; a ConfigError naming the file and key."""
    path = task_file(name, root)
    if not path.is_file():
        declared = task_names(root)
        hint = "; run from the project root" if not root.is_absolute() and not declared else ""
        raise ConfigError(f"unknown task {name!r}: no {path} (declared: {', '.join(declared) or 'none'}{hint})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return from_declaration(name, raw, str(path))


def manifest_task(manifest: dict, where: str) -> Task:
    """The task a shards manifest (or an adapter's copy of it) was built for: the declaration
    it carries, so an adapter is served with its own task wherever it goes; a manifest from
    before declarations names the task only, which is read from ``tasks/``."""
    if "task_declaration" in manifest:
        return from_declaration(manifest["task"], manifest["task_declaration"], f"{where}: task_declaration")
    return get_task(manifest["task"])


def label_key(value, labels: dict[str, str]) -> str | None:
    """The one of ``labels`` a label field's value names, or None: a string as it is; a
    number or boolean by its value (SST-2's 1 -> "1", 1.0 -> "1"; true -> "true" where the
    task has that label, else "1"). Collect and tokenize judge a label by this one rule."""
    if isinstance(value, str):
        names: tuple[str, ...] = (value,)
    elif isinstance(value, bool):
        names = (json.dumps(value), str(int(value)))
    elif isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        names = (str(int(value)),)
    else:
        return None
    return next((n for n in names if n in labels), None)
